/*
 * The one rule set for decode tunables: what clkvq_cache_set_tuning and
 * every decode check before launching, what the tuning database checks in
 * a file (without a device) and when it picks an entry for this device
 * (with one). Keeping one copy means a stored entry is always one a cache
 * accepts, and a shipped entry from a bigger device is skipped, not tried.
 * The cooperative variant's plan (work-group geometry, V words per lane,
 * query rows per work-group, local memory) is derived here too, so the
 * check and the launch see the same numbers.
 */
#ifndef CLKVQ_ATTN_FIT_H
#define CLKVQ_ATTN_FIT_H

#include "clkvq.h"

#include <stddef.h>

typedef struct {
    int qpk;                       /* query heads per kv head */
    int n_queries;                 /* queries per sequence (multi-query decode; 0 means 1) */
    int head_dim;
    int packed;                    /* some layer stores packed tokens (not fp16 only) */
    clkvq_layout layout_k, layout_v;
    /* what the cooperative variant's V lanes follow: V's format and group
     * size (the fp16 scheme: q8 in groups of 32, its lanes' shape), and
     * whether the query is rotated in the kernel (staging rows) */
    clkvq_format format_v;
    int group_size;
    int rotate;
} clkvq_attn_fit_shape;

/* The cooperative variant of one layer, as the kernel is built. */
typedef struct {
    int wgs, tpl;          /* work-group size, tokens per lane: tile = wgs * tpl */
    int vu;                /* V words per lane (a multiple of the format's unit) */
    int rb, n_rb;          /* query rows per work-group, row blocks per kv head */
    int mwgs;              /* the merge's work-group size */
    int waves;             /* work-groups per compute unit the split aims for */
    size_t local_bytes;    /* the decode kernel's local memory */
} clkvq_attn_coop_plan;

/*
 * CLKVQ_OK when t fits; else the status to report (INVALID_ARG for a bad
 * value, UNSUPPORTED for a variant the layouts cannot serve, DEVICE_LIMIT
 * beyond dev's work-group or local-memory size) with the reason in why.
 * dev NULL checks only what does not depend on a device.
 */
clkvq_status clkvq_attn_tuning_check(const clkvq_attn_tuning *t, const clkvq_attn_fit_shape *s,
                                     const clkvq_device_info *dev, char *why, size_t why_size);

/*
 * The cooperative plan of t (resolved: no 0 fields but vwpl) for shape s.
 * With dev and more than one query per sequence the tile shrinks (tpl,
 * then wgs) until the rows' local memory fits the device, as the
 * multi-query path may. Same statuses as clkvq_attn_tuning_check.
 */
clkvq_status clkvq_attn_coop_plan_get(const clkvq_attn_tuning *t, const clkvq_attn_fit_shape *s,
                                      const clkvq_device_info *dev, clkvq_attn_coop_plan *plan,
                                      char *why, size_t why_size);

/* Words of the smallest whole unit of a format whose codes sit at the same
 * bit positions in every unit (3 for q3, else 1), and its codes. */
int clkvq_format_unit_words(clkvq_format format);
int clkvq_format_unit_codes(clkvq_format format, int words);

#endif
