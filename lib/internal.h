/* Library-internal: the context object and error helpers. Not installed. */
#ifndef CLKVQ_INTERNAL_H
#define CLKVQ_INTERNAL_H

#include "clkvq.h"

#include <stdarg.h>

#define CLKVQ_MSG_MAX 8192

struct clkvq_program_cache; /* lib/program_cache.c */

struct clkvq_context {
    cl_platform_id platform;
    cl_context cl_ctx;
    cl_device_id device;
    cl_command_queue queue;
    clkvq_device_info info;
    int little_endian;
    int has_correct_div; /* CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT */
    struct clkvq_program_cache *programs;
    double last_device_ms; /* profiled kernel time of the last call, -1 if none */
    int profiling;         /* the queue has CL_QUEUE_PROFILING_ENABLE */
    unsigned features;     /* CLKVQ_FEATURE_* the device reports */
    cl_event timed[16];    /* kernels of the last asynchronous call, timed on demand */
    int n_timed;
    double timed_ms;       /* time of its kernels already waited for (more than timed holds) */
    int used_clblast;      /* a CLBlast routine ran on this context (prefill.c) */
    char last_error[CLKVQ_MSG_MAX];
};

/* Records a formatted message on ctx (or the thread's NULL-context slot)
 * and returns status, so a failure is one line: return clkvq_fail(...). */
clkvq_status clkvq_fail(clkvq_context *ctx, clkvq_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* CLKVQ_ERR_OPENCL with the OpenCL error name and what was being done. */
clkvq_status clkvq_cl_fail(clkvq_context *ctx, cl_int err, const char *what);

const char *clkvq_cl_error_name(cl_int err);

/* A caller's buffer: not NULL, of ctx's OpenCL context, at least `need`
 * bytes; else INVALID_ARG or BUFFER_TOO_SMALL naming `what`. */
clkvq_status clkvq_check_buffer(clkvq_context *ctx, cl_mem buf, const char *what, size_t need);

/* Device time (ms) of finished events, summed; -1 when the queue has no
 * profiling. */
double clkvq_events_ms(const cl_event *events, int n);

/* Timing of the last call (clkvq_last_device_ms): reset at the start of a
 * call that times its kernels (drops the events of an earlier asynchronous
 * call), or handed the events of an asynchronous one (taken over; waited
 * for and summed only when the time is asked for). */
void clkvq_timing_reset(clkvq_context *ctx);
/* Adds to the call's events (the call reset them when it began: a decode
 * of a per-head layer hands over each share's kernels in turn). */
void clkvq_timing_defer(clkvq_context *ctx, const cl_event *events, int n);

/* Optional device features the extension string reports (detected at
 * context creation). The decode kernels use none of them yet: neither
 * PoCL nor Oclgrind offers them, so a path built on one could not be
 * tested here; the tuner only ever offers a path the device reports
 * (clkvq_feature_name, autotune.c). */
#define CLKVQ_FEATURE_SUBGROUPS 1u  /* cl_khr_subgroups or cl_intel_subgroups */
#define CLKVQ_FEATURE_FP16 2u       /* cl_khr_fp16 */
#define CLKVQ_FEATURE_INT_DOT 4u    /* cl_khr_integer_dot_product */

/* What clkvq_context_release must drop before the OpenCL objects: the
 * programs CLBlast cached for the context (lib/prefill.c). */
void clkvq_blas_context_release(clkvq_context *ctx);

/* Clears the last message (at the start of a public call). */
void clkvq_clear_error(clkvq_context *ctx);

/* Round x up to a multiple of m. */
static inline size_t clkvq_round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

/*
 * Per-head bits (lib/kv_shares.c). The distinct (K, V) pairs of lc's kv
 * heads in order of first use: their count (1 when lc has no head formats
 * or they all agree), share_k/share_v [n_kv_heads] get each pair and
 * share_of [n_kv_heads] (may be NULL) each head's share.
 */
int clkvq_head_shares(const clkvq_layer_config *lc, int n_kv_heads, clkvq_format *share_k,
                      clkvq_format *share_v, int *share_of);

#endif
