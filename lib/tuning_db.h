/*
 * The tuning database: tuned decode parameters per device and shape.
 *
 * File: <cache dir>/tuning/<device key>.json, one JSON object:
 *   {"clkvq_tuning": 2,
 *    "device": {"vendor": .., "name": .., "driver": .., "compute_units": n, "type": "cpu"|"gpu"},
 *    "entries": [{"kernel": "decode",
 *                 "shape": {"scheme": "token", "format_k": "q4", "format_v": "q4",
 *                           "group_size": 32, "head_dim": 128, "n_q_heads": 32,
 *                           "n_kv_heads": 8, "tokens": 4096, "batch": 1},
 *                 "params": {"variant": "serial"|"cooperative", "wgs": 64, "chunk": 256,
 *                            "vw": 16, "tpl": 4, "vwpl": 0, "waves": 2,
 *                            "layout_k": "planar"|"token", "layout_v": ..},
 *                 "default_ms": 2.5, "tuned_ms": 1.9}, ...]}
 * Shipped results (results/tuning/<name>.json, the same format) are embedded in
 * the library and serve as vendor + device-type defaults.
 * A file that does not parse, has another "clkvq_tuning" version, or names
 * another device is reported (clkvq_tuning_show, ctx message) and ignored.
 * Writers hold an flock on <file>.lock while they read, merge and rename,
 * so two tuners never lose each other's entries or leave a broken file.
 */
#ifndef CLKVQ_TUNING_DB_H
#define CLKVQ_TUNING_DB_H

#include "internal.h"

/* Parses a tuning file's text; entries for kernel "decode" only are kept.
 * CLKVQ_ERR_CORRUPT (with the reason) on anything malformed. The caller
 * frees *entries with free(). device_out may be NULL. */
clkvq_status clkvq_tuning_parse(clkvq_context *ctx, const char *text, clkvq_tune_result **entries,
                                int *n_entries, clkvq_device_info *device_out);

/* Serializes entries for ctx's device (malloc'd text; free() it). NULL on
 * allocation failure or an entry the parser would refuse. */
char *clkvq_tuning_serialize(const clkvq_context *ctx, const clkvq_tune_result *entries, int n);

/* The same for a device described by info (only vendor, name,
 * driver_version, compute_units and is_gpu are written): what a parsed
 * file's device_out reproduces, with no OpenCL context (the fuzz target). */
char *clkvq_tuning_serialize_device(const clkvq_device_info *info, const clkvq_tune_result *entries,
                                    int n);

/* Distance between shapes for "nearest": 0 = equal; big penalties for
 * head_dim / GQA group / scheme / format mismatches, small for tokens. */
double clkvq_tuning_shape_distance(const clkvq_tune_shape *a, const clkvq_tune_shape *b);

/* The built-in defaults (the last link of the lookup chain): the one
 * place attention.c, the tuner and the lookup take them from. */
clkvq_tune_params clkvq_tuning_builtin(const clkvq_context *ctx);

/* This device's entries (free() them): 0 and n 0 when there is no file or
 * it is not trusted (the lookup ignores it too), 1 when read. */
int clkvq_tuning_device_entries(clkvq_context *ctx, clkvq_tune_result **entries, int *n);

/* This device's tuned entries of shape's structure (the same scheme,
 * formats, group size, head_dim and GQA group: any tokens, batch and kv
 * heads), tuned on the layouts (layout_k, layout_v) and fitting the
 * device: what a cache keeps per layer so that each decode takes the
 * split and chunk tuned nearest its own batch and length. *entries is
 * malloc'd (free()) or NULL when there are none; a missing or bad file
 * gives none. CLKVQ_OK unless memory runs out. */
clkvq_status clkvq_tuning_entries_for(clkvq_context *ctx, const clkvq_tune_shape *shape,
                                      clkvq_layout layout_k, clkvq_layout layout_v,
                                      clkvq_tune_result **entries, int *n);

/* Index of the entry nearest shape (clkvq_tuning_shape_distance), -1 for
 * none. */
int clkvq_tuning_nearest(const clkvq_tune_result *entries, int n, const clkvq_tune_shape *shape);

#endif
