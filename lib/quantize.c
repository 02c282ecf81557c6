/* Host side of quantization: validation, program variants, launches. */
#include "internal.h"
#include "kernel_args.h"
#include "kernel_defines.h"
#include "program_cache.h"
#include "quantize.h"
#include "quant_format.h"
#include "reference.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* Work-items per work-group for the group kernels; the autotuner will own it. */
#define QUANT_LOCAL_SIZE 64
/* Elements each work-item of the input check scans (16 at a time). */
#define CHECK_PER_ITEM 4096

static const char *const g_quant_sources[] = {"quant_common.cl", "quantize.cl"};

/* The one program variant a parameter set needs: formats, parameter
 * storage and zero mode are compile-time; everything else is an argument. */
static clkvq_status get_kernel(clkvq_context *ctx, const clkvq_quant_params *qp,
                               const char *name, cl_kernel *out)
{
    clkvq_defines d;
    clkvq_defines_init(&d);
    clkvq_defines_format(&d, "", qp->format);
    clkvq_defines_params(&d, qp->param_type, qp->zero_mode);
    const char *options = clkvq_defines_get(ctx, &d);
    if (!options)
        return CLKVQ_ERR_BUILD;
    return clkvq_kernel_get(ctx, g_quant_sources, 2, options, name, out);
}

/* Reads the permutation back and checks it: a bad one would make kernels
 * read out of bounds, so it is never trusted. It is n_heads*head_dim ints. */
static clkvq_status check_perm(clkvq_context *ctx, cl_mem perm, const clkvq_shape *shape)
{
    size_t n = (size_t)shape->n_heads * (size_t)shape->head_dim;
    clkvq_status st = clkvq_check_buffer(ctx, perm, "perm", n * sizeof(int32_t));
    if (st != CLKVQ_OK)
        return st;
    int32_t *host = malloc(n * sizeof(int32_t));
    if (!host)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "no memory to check perm");
    cl_int err = clEnqueueReadBuffer(ctx->queue, perm, CL_TRUE, 0, n * sizeof(int32_t), host, 0,
                                     NULL, NULL);
    int ok = err == CL_SUCCESS && clkvq_ref_is_permutation(host, shape->n_heads, shape->head_dim);
    free(host);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, "reading perm");
    if (!ok)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "perm is not a permutation of 0..%d for every one of %d heads",
                          shape->head_dim - 1, shape->n_heads);
    return CLKVQ_OK;
}

static size_t global_size(size_t items) { return clkvq_round_up(items ? items : 1, QUANT_LOCAL_SIZE); }

static clkvq_status launch(clkvq_context *ctx, cl_kernel kernel, size_t items, const char *what,
                           cl_event *event)
{
    size_t global = global_size(items), local = QUANT_LOCAL_SIZE;
    cl_int err = clEnqueueNDRangeKernel(ctx->queue, kernel, 1, NULL, &global, &local, 0, NULL,
                                        event);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, what);
}

/* Queues the check of n floats of x, setting *flag (INT_MAX: none bad). */
static clkvq_status queue_check(clkvq_context *ctx, cl_kernel kernel, cl_mem x, size_t n,
                                cl_mem *flag, cl_event *event)
{
    cl_int err;
    cl_int none = INT_MAX;
    *flag = clCreateBuffer(ctx->cl_ctx, CL_MEM_READ_WRITE | CL_MEM_COPY_HOST_PTR, sizeof none,
                           &none, &err);
    if (err != CL_SUCCESS) {
        *flag = NULL;
        return clkvq_cl_fail(ctx, err, "creating the input-check flag");
    }
    clkvq_args a;
    clkvq_args_begin(&a, kernel, 0);
    clkvq_args_mem(&a, x);
    clkvq_args_int(&a, (int)n);
    clkvq_args_int(&a, CHECK_PER_ITEM);
    clkvq_args_mem(&a, *flag);
    clkvq_status st = clkvq_args_end(ctx, &a, "the input check");
    if (st == CLKVQ_OK)
        st = launch(ctx, kernel, (n + CHECK_PER_ITEM - 1) / CHECK_PER_ITEM, "input check", event);
    return st;
}

clkvq_status clkvq_check_finite_n(clkvq_context *ctx, const clkvq_quant_params *qp,
                                  const cl_mem *x, const size_t *n, int count, int *bad_tensor,
                                  cl_event *event)
{
    if (count < 1 || count > CLKVQ_CHECK_MAX)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "checking %d tensors at once (1..%d)",
                          count, CLKVQ_CHECK_MAX);
    cl_kernel kernel;
    clkvq_quant_params any = clkvq_quant_params_default();
    clkvq_status st = get_kernel(ctx, qp ? qp : &any, "clkvq_check_input", &kernel);
    if (st != CLKVQ_OK)
        return st;
    cl_mem flags[CLKVQ_CHECK_MAX] = {NULL};
    cl_int first_bad[CLKVQ_CHECK_MAX];
    for (int i = 0; i < count && st == CLKVQ_OK; i++)
        st = queue_check(ctx, kernel, x[i], n[i], &flags[i], i == 0 ? event : NULL);
    /* every flag read in one wait: the last read blocks, the in-order queue
     * finishes the others first */
    for (int i = 0; i < count && st == CLKVQ_OK; i++) {
        cl_int err = clEnqueueReadBuffer(ctx->queue, flags[i], i == count - 1 ? CL_TRUE : CL_FALSE,
                                         0, sizeof first_bad[i], &first_bad[i], 0, NULL, NULL);
        if (err != CL_SUCCESS) {
            st = clkvq_cl_fail(ctx, err, "reading the input-check flag");
            clFinish(ctx->queue); /* no read may still target first_bad */
        }
    }
    for (int i = 0; i < count; i++)
        if (flags[i])
            clReleaseMemObject(flags[i]);
    for (int i = 0; i < count && st == CLKVQ_OK; i++)
        if (first_bad[i] != INT_MAX) {
            if (bad_tensor)
                *bad_tensor = i;
            return clkvq_fail(ctx, CLKVQ_ERR_NONFINITE,
                              "input element %d is NaN, Inf or beyond +-65504; nothing was "
                              "written",
                              (int)first_bad[i]);
        }
    return st;
}

clkvq_status clkvq_check_finite(clkvq_context *ctx, const clkvq_quant_params *qp, cl_mem x,
                                size_t n, cl_event *event)
{
    return clkvq_check_finite_n(ctx, qp, &x, &n, 1, NULL, event);
}

long clkvq_first_nonfinite(const float *x, size_t n)
{
    /* the kernel's test, !(|x| <= 65504), in blocks: a block without a bad
     * value (the usual case) is a branch-free reduction */
    for (size_t b = 0; b < n; b += 256) {
        size_t e = n - b < 256 ? n : b + 256;
        int bad = 0;
        for (size_t i = b; i < e; i++)
            bad |= !(fabsf(x[i]) <= KVQ_INPUT_MAX);
        if (bad)
            for (size_t i = b; i < e; i++)
                if (!(fabsf(x[i]) <= KVQ_INPUT_MAX))
                    return (long)i;
    }
    return -1;
}

/* Arguments 0..7 of every group kernel: four buffers, then the shape. */
static clkvq_status set_group_args(clkvq_context *ctx, cl_kernel kernel, cl_mem a0, cl_mem a1,
                                   cl_mem a2, cl_mem a3, const clkvq_shape *shape,
                                   int group_size, const char *what)
{
    clkvq_args a;
    clkvq_args_begin(&a, kernel, 0);
    clkvq_args_mem(&a, a0);
    clkvq_args_mem(&a, a1);
    clkvq_args_mem(&a, a2);
    clkvq_args_mem(&a, a3);
    clkvq_args_int(&a, shape->n_heads);
    clkvq_args_int(&a, shape->n_tokens);
    clkvq_args_int(&a, shape->head_dim);
    clkvq_args_int(&a, group_size);
    return clkvq_args_end(ctx, &a, what);
}

clkvq_status clkvq_quantize(clkvq_context *ctx, const clkvq_quant_params *qp,
                            const clkvq_shape *shape, cl_mem x, cl_mem perm, cl_mem codes,
                            cl_mem params)
{
    if (!ctx)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_quantize: context is NULL");
    clkvq_clear_error(ctx);
    clkvq_timing_reset(ctx);
    clkvq_quant_layout layout;
    clkvq_status st = clkvq_quant_params_validate(ctx, qp, shape);
    if (st != CLKVQ_OK)
        return st;
    clkvq_quant_layout_get(qp, shape, &layout);
    size_t n = (size_t)shape->n_heads * shape->n_tokens * shape->head_dim;
    if ((st = clkvq_check_buffer(ctx, x, "x", n * sizeof(float))) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, codes, "codes", layout.code_bytes)) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, params, "params", layout.params_bytes)) != CLKVQ_OK)
        return st;
    if (perm && (st = check_perm(ctx, perm, shape)) != CLKVQ_OK)
        return st;

    cl_event events[2] = {NULL, NULL};
    if ((st = clkvq_check_finite(ctx, qp, x, n, &events[0])) != CLKVQ_OK) {
        if (events[0])
            clReleaseEvent(events[0]);
        return st;
    }
    /* token axis: one work-item per 16 consecutive groups; channel axis: one
     * per block of tokens (all channels, 16 per vector) when head_dim allows,
     * else one per group */
    int token_axis = qp->axis == CLKVQ_AXIS_TOKEN;
    int lanes16 = !token_axis && shape->head_dim % 16 == 0 && shape->head_dim <= 256;
    size_t items = token_axis ? (layout.n_groups + 15) / 16
                   : lanes16  ? layout.n_groups / (size_t)shape->head_dim
                              : layout.n_groups;
    cl_kernel kernel;
    st = get_kernel(ctx, qp,
                    token_axis ? "clkvq_quantize_token"
                    : lanes16  ? "clkvq_quantize_channel16"
                               : "clkvq_quantize_channel",
                    &kernel);
    if (st == CLKVQ_OK)
        st = set_group_args(ctx, kernel, x, perm, codes, params, shape, qp->group_size,
                            "quantize");
    if (st == CLKVQ_OK) {
        clkvq_args a;
        clkvq_args_begin(&a, kernel, 8);
        clkvq_args_float(&a, qp->clip_alpha);
        st = clkvq_args_end(ctx, &a, "quantize");
    }
    if (st == CLKVQ_OK)
        st = launch(ctx, kernel, items, "quantize", &events[1]);
    if (st == CLKVQ_OK) {
        cl_int err = clWaitForEvents(1, &events[1]);
        if (err != CL_SUCCESS)
            st = clkvq_cl_fail(ctx, err, "waiting for quantize");
        else
            ctx->last_device_ms = clkvq_events_ms(events, 2);
    }
    for (int i = 0; i < 2; i++)
        if (events[i])
            clReleaseEvent(events[i]);
    return st;
}

clkvq_status clkvq_dequantize(clkvq_context *ctx, const clkvq_quant_params *qp,
                              const clkvq_shape *shape, cl_mem codes, cl_mem params,
                              cl_mem perm, cl_mem out)
{
    if (!ctx)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_dequantize: context is NULL");
    clkvq_clear_error(ctx);
    clkvq_timing_reset(ctx);
    clkvq_quant_layout layout;
    clkvq_status st = clkvq_quant_params_validate(ctx, qp, shape);
    if (st != CLKVQ_OK)
        return st;
    clkvq_quant_layout_get(qp, shape, &layout);
    size_t n = (size_t)shape->n_heads * shape->n_tokens * shape->head_dim;
    if ((st = clkvq_check_buffer(ctx, codes, "codes", layout.code_bytes)) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, params, "params", layout.params_bytes)) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, out, "out", n * sizeof(float))) != CLKVQ_OK)
        return st;
    if (perm && (st = check_perm(ctx, perm, shape)) != CLKVQ_OK)
        return st;

    cl_kernel kernel;
    int token_axis = qp->axis == CLKVQ_AXIS_TOKEN;
    st = get_kernel(ctx, qp, token_axis ? "clkvq_dequantize_token" : "clkvq_dequantize_channel",
                    &kernel);
    if (st != CLKVQ_OK)
        return st;
    if ((st = set_group_args(ctx, kernel, codes, params, perm, out, shape, qp->group_size,
                             "dequantize")) != CLKVQ_OK)
        return st;
    cl_event event;
    if ((st = launch(ctx, kernel, layout.n_groups, "dequantize", &event)) != CLKVQ_OK)
        return st;
    cl_int err = clWaitForEvents(1, &event);
    if (err == CL_SUCCESS)
        ctx->last_device_ms = clkvq_events_ms(&event, 1);
    clReleaseEvent(event);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, "waiting for dequantize");
}

/* ------------------------------------------------------------ host wrappers */

typedef struct {
    cl_mem mem[5];
    int n;
} buffer_set;

static void release_buffers(buffer_set *set)
{
    for (int i = 0; i < set->n; i++)
        if (set->mem[i])
            clReleaseMemObject(set->mem[i]);
}

/* A device buffer of size bytes, filled from host when host != NULL. */
static clkvq_status add_buffer(clkvq_context *ctx, buffer_set *set, size_t size,
                               const void *host, cl_mem *out)
{
    cl_int err;
    cl_mem_flags flags = CL_MEM_READ_WRITE | (host ? CL_MEM_COPY_HOST_PTR : 0);
    *out = clCreateBuffer(ctx->cl_ctx, flags, size, (void *)host, &err);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, "creating a buffer");
    set->mem[set->n++] = *out;
    return CLKVQ_OK;
}

static clkvq_status read_back(clkvq_context *ctx, cl_mem mem, size_t size, void *host)
{
    cl_int err = clEnqueueReadBuffer(ctx->queue, mem, CL_TRUE, 0, size, host, 0, NULL, NULL);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, "reading results back");
}

clkvq_status clkvq_quantize_host(clkvq_context *ctx, const clkvq_quant_params *qp,
                                 const clkvq_shape *shape, const float *x, const int32_t *perm,
                                 void *codes, size_t codes_size, void *params,
                                 size_t params_size)
{
    if (!ctx)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_quantize_host: context is NULL");
    clkvq_quant_layout layout;
    clkvq_status st = clkvq_quant_params_validate(ctx, qp, shape);
    if (st != CLKVQ_OK)
        return st;
    clkvq_quant_layout_get(qp, shape, &layout);
    if (!x || !codes || !params)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "x, codes or params is NULL");
    if (codes_size < layout.code_bytes || params_size < layout.params_bytes)
        return clkvq_fail(ctx, CLKVQ_ERR_BUFFER_TOO_SMALL,
                          "codes/params hold %zu/%zu bytes, %zu/%zu needed", codes_size,
                          params_size, layout.code_bytes, layout.params_bytes);
    size_t n = (size_t)shape->n_heads * shape->n_tokens * shape->head_dim;
    buffer_set set = {{0}, 0};
    cl_mem x_mem, perm_mem = NULL, codes_mem, params_mem;
    if ((st = add_buffer(ctx, &set, n * sizeof(float), x, &x_mem)) == CLKVQ_OK &&
        (!perm || (st = add_buffer(ctx, &set, (size_t)shape->n_heads * shape->head_dim *
                                                  sizeof(int32_t),
                                   perm, &perm_mem)) == CLKVQ_OK) &&
        (st = add_buffer(ctx, &set, layout.code_bytes, NULL, &codes_mem)) == CLKVQ_OK &&
        (st = add_buffer(ctx, &set, layout.params_bytes, NULL, &params_mem)) == CLKVQ_OK &&
        (st = clkvq_quantize(ctx, qp, shape, x_mem, perm_mem, codes_mem, params_mem)) ==
            CLKVQ_OK &&
        (st = read_back(ctx, codes_mem, layout.code_bytes, codes)) == CLKVQ_OK)
        st = read_back(ctx, params_mem, layout.params_bytes, params);
    release_buffers(&set);
    return st;
}

clkvq_status clkvq_dequantize_host(clkvq_context *ctx, const clkvq_quant_params *qp,
                                   const clkvq_shape *shape, const void *codes,
                                   const void *params, const int32_t *perm, float *out)
{
    if (!ctx)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_dequantize_host: context is NULL");
    clkvq_quant_layout layout;
    clkvq_status st = clkvq_quant_params_validate(ctx, qp, shape);
    if (st != CLKVQ_OK)
        return st;
    clkvq_quant_layout_get(qp, shape, &layout);
    if (!codes || !params || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "codes, params or out is NULL");
    size_t n = (size_t)shape->n_heads * shape->n_tokens * shape->head_dim;
    buffer_set set = {{0}, 0};
    cl_mem codes_mem, params_mem, perm_mem = NULL, out_mem;
    if ((st = add_buffer(ctx, &set, layout.code_bytes, codes, &codes_mem)) == CLKVQ_OK &&
        (st = add_buffer(ctx, &set, layout.params_bytes, params, &params_mem)) == CLKVQ_OK &&
        (!perm || (st = add_buffer(ctx, &set, (size_t)shape->n_heads * shape->head_dim *
                                                  sizeof(int32_t),
                                   perm, &perm_mem)) == CLKVQ_OK) &&
        (st = add_buffer(ctx, &set, n * sizeof(float), NULL, &out_mem)) == CLKVQ_OK &&
        (st = clkvq_dequantize(ctx, qp, shape, codes_mem, params_mem, perm_mem, out_mem)) ==
            CLKVQ_OK)
        st = read_back(ctx, out_mem, n * sizeof(float), out);
    release_buffers(&set);
    return st;
}
