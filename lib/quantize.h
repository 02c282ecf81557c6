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

#endif
