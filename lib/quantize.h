/* Internal helpers of lib/quantize.c that other modules launch. */
#ifndef CLKVQ_QUANTIZE_H
#define CLKVQ_QUANTIZE_H

#include "internal.h"

/*
 * Scans n floats of x for NaN, Inf or |x| > 65504 (blocking). Returns
 * CLKVQ_ERR_NONFINITE naming the first bad element, so callers can reject
 * input before writing anything. qp only picks an already-built program
 * variant (NULL: the default). *event, if set, must be released.
 */
clkvq_status clkvq_check_finite(clkvq_context *ctx, const clkvq_quant_params *qp, cl_mem x,
                                size_t n, cl_event *event);

/* The same for count (at most CLKVQ_CHECK_MAX) tensors with one wait for
 * all of them (each wait is a round trip through the device queue, which
 * a decode step's one-token append would otherwise pay per tensor). On
 * CLKVQ_ERR_NONFINITE, *bad_tensor (if not NULL) is the first failing
 * tensor's index. *event, if set, is the first check's. */
#define CLKVQ_CHECK_MAX 4
clkvq_status clkvq_check_finite_n(clkvq_context *ctx, const clkvq_quant_params *qp,
                                  const cl_mem *x, const size_t *n, int count, int *bad_tensor,
                                  cl_event *event);

/* The check on the host, for input that is still there: the index of the
 * first NaN, Inf or |x| > 65504 of x[0..n), or -1. */
long clkvq_first_nonfinite(const float *x, size_t n);

#endif
