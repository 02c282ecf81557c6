/* clkvq_copy_bandwidth: device copy bandwidth, the roof for benchmark ratios. */
#include "internal.h"
#include "program_cache.h"

#include <stdlib.h>

#define COPY_LOCAL_SIZE 64

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Runs the copy once; *ms = device time from the profiling event. */
static clkvq_status run_copy(clkvq_context *ctx, cl_kernel kernel, size_t global, double *ms) {
    size_t local = COPY_LOCAL_SIZE;
    cl_event ev = NULL;
    cl_int err = clEnqueueNDRangeKernel(ctx->queue, kernel, 1, NULL, &global, &local, 0, NULL, &ev);
    if (err != CL_SUCCESS) return clkvq_cl_fail(ctx, err, "enqueue clkvq_copy_f4");
    err = clWaitForEvents(1, &ev);
    if (err != CL_SUCCESS) {
        clReleaseEvent(ev);
        return clkvq_cl_fail(ctx, err, "wait for clkvq_copy_f4");
    }
    cl_ulong start = 0, end = 0;
    err = clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_START, sizeof start, &start, NULL);
    if (err == CL_SUCCESS)
        err = clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_END, sizeof end, &end, NULL);
    clReleaseEvent(ev);
    if (err != CL_SUCCESS) return clkvq_cl_fail(ctx, err, "profiling info of clkvq_copy_f4");
    *ms = (double)(end - start) * 1e-6;
    return CLKVQ_OK;
}

clkvq_status clkvq_copy_bandwidth(clkvq_context *ctx, size_t bytes, int reps, double *gbps) {
    if (!ctx) return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_copy_bandwidth: ctx is NULL");
    clkvq_clear_error(ctx);
    if (!gbps) return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_copy_bandwidth: gbps is NULL");
    if (bytes == 0 || reps < 1)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_copy_bandwidth: bytes (%zu) and reps (%d) must be positive", bytes,
                          reps);
    *gbps = 0.0;

    cl_command_queue_properties props = 0;
    cl_int err = clGetCommandQueueInfo(ctx->queue, CL_QUEUE_PROPERTIES, sizeof props, &props, NULL);
    if (err != CL_SUCCESS) return clkvq_cl_fail(ctx, err, "query queue properties");
    if (!(props & CL_QUEUE_PROFILING_ENABLE))
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                          "clkvq_copy_bandwidth: the queue has no profiling "
                          "(CL_QUEUE_PROFILING_ENABLE); cannot time the copy");

    bytes = clkvq_round_up(bytes, 16);
    size_t n4 = bytes / 16;
    if (n4 > 0xffffffffu)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "clkvq_copy_bandwidth: %zu bytes exceed the kernel's 32-bit index",
                          bytes);
    if ((uint64_t)bytes > ctx->info.max_alloc_bytes)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "clkvq_copy_bandwidth: %zu bytes exceed the device's max allocation "
                          "(%llu bytes)",
                          bytes, (unsigned long long)ctx->info.max_alloc_bytes);
    if (ctx->info.max_work_group_size < COPY_LOCAL_SIZE)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "clkvq_copy_bandwidth: the device's max work-group size %zu < %d",
                          ctx->info.max_work_group_size, COPY_LOCAL_SIZE);

    cl_kernel kernel = NULL;
    clkvq_status st =
        clkvq_kernel_get(ctx, (const char *[]){"copy.cl"}, 1, "", "clkvq_copy_f4", &kernel);
    if (st != CLKVQ_OK) return st;

    double *times = malloc((size_t)reps * sizeof *times);
    if (!times) return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "clkvq_copy_bandwidth: host");
    cl_mem src = clCreateBuffer(ctx->cl_ctx, CL_MEM_READ_ONLY, bytes, NULL, &err);
    cl_mem dst = NULL;
    if (err != CL_SUCCESS) {
        st = clkvq_cl_fail(ctx, err, "create copy source buffer");
        goto done;
    }
    dst = clCreateBuffer(ctx->cl_ctx, CL_MEM_WRITE_ONLY, bytes, NULL, &err);
    if (err != CL_SUCCESS) {
        st = clkvq_cl_fail(ctx, err, "create copy destination buffer");
        goto done;
    }
    /* Defined contents, so no driver can short-cut an untouched buffer. */
    float zero = 0.0f;
    err = clEnqueueFillBuffer(ctx->queue, src, &zero, sizeof zero, 0, bytes, 0, NULL, NULL);
    if (err != CL_SUCCESS) {
        st = clkvq_cl_fail(ctx, err, "fill copy source buffer");
        goto done;
    }
    cl_uint n4_arg = (cl_uint)n4;
    err = clSetKernelArg(kernel, 0, sizeof src, &src);
    if (err == CL_SUCCESS) err = clSetKernelArg(kernel, 1, sizeof dst, &dst);
    if (err == CL_SUCCESS) err = clSetKernelArg(kernel, 2, sizeof n4_arg, &n4_arg);
    if (err != CL_SUCCESS) {
        st = clkvq_cl_fail(ctx, err, "set clkvq_copy_f4 arguments");
        goto done;
    }

    size_t global = clkvq_round_up(n4, COPY_LOCAL_SIZE);
    double warm_ms = 0.0;
    st = run_copy(ctx, kernel, global, &warm_ms); /* warm-up, not counted */
    for (int r = 0; st == CLKVQ_OK && r < reps; r++) st = run_copy(ctx, kernel, global, &times[r]);
    if (st != CLKVQ_OK) goto done;

    qsort(times, (size_t)reps, sizeof *times, cmp_double);
    double median_ms = reps % 2 ? times[reps / 2] : 0.5 * (times[reps / 2 - 1] + times[reps / 2]);
    if (median_ms <= 0.0) {
        st = clkvq_fail(ctx, CLKVQ_ERR_OPENCL,
                        "clkvq_copy_bandwidth: the device reported a zero copy time");
        goto done;
    }
    *gbps = 2.0 * (double)bytes / (median_ms * 1e-3) / 1e9;
    clkvq_timing_reset(ctx);
    ctx->last_device_ms = median_ms;

done:
    if (dst) clReleaseMemObject(dst);
    if (src) clReleaseMemObject(src);
    free(times);
    return st;
}
