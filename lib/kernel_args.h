/*
 * Setting a kernel's arguments in order, stopping at the first failure and
 * remembering which argument failed and why: OR-ing cl_int codes together
 * would merge two errors into a third (-50 | -51 = -49), and a message
 * must name the real one.
 *
 *     clkvq_args a;
 *     clkvq_args_begin(&a, kernel, 0);
 *     clkvq_args_mem(&a, codes);
 *     clkvq_args_int(&a, n_tokens);
 *     if ((st = clkvq_args_end(ctx, &a, "cache quantize")) != CLKVQ_OK) ...
 */
#ifndef CLKVQ_KERNEL_ARGS_H
#define CLKVQ_KERNEL_ARGS_H

#include "internal.h"

typedef struct {
    cl_kernel kernel;
    cl_uint next;   /* index of the next argument */
    cl_int err;     /* first failure, CL_SUCCESS if none */
    cl_uint failed; /* its index */
} clkvq_args;

void clkvq_args_begin(clkvq_args *a, cl_kernel kernel, cl_uint first);
/* m may be NULL (an optional buffer argument). */
void clkvq_args_mem(clkvq_args *a, cl_mem m);
void clkvq_args_int(clkvq_args *a, int v);
void clkvq_args_float(clkvq_args *a, float v);
/* A __local argument of `bytes` bytes. */
void clkvq_args_local(clkvq_args *a, size_t bytes);
/* CLKVQ_OK, or CLKVQ_ERR_OPENCL naming the failing argument and `what`. */
clkvq_status clkvq_args_end(clkvq_context *ctx, const clkvq_args *a, const char *what);

#endif
