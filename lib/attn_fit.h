/*
 * The one rule set for decode tunables: what clkvq_cache_set_tuning and
 * every decode check before launching, what the tuning database checks in
 * a file (without a device) and when it picks an entry for this device
 * (with one). Keeping one copy means a stored entry is always one a cache
 * accepts, and a shipped entry from a bigger device is skipped, not tried.
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
} clkvq_attn_fit_shape;

/*
 * CLKVQ_OK when t fits; else the status to report (INVALID_ARG for a bad
 * value, UNSUPPORTED for a variant the layouts cannot serve, DEVICE_LIMIT
 * beyond dev's work-group or local-memory size) with the reason in why.
 * dev NULL checks only what does not depend on a device.
 */
clkvq_status clkvq_attn_tuning_check(const clkvq_attn_tuning *t, const clkvq_attn_fit_shape *s,
                                     const clkvq_device_info *dev, char *why, size_t why_size);

/* Local memory (bytes) the cooperative variant needs for rows = qpk x
 * n_queries query rows. */
size_t clkvq_attn_local_bytes(const clkvq_attn_tuning *t, int rows, int head_dim);

#endif
