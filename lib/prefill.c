/*
 * The GEMM/GEMV-shaped attention paths on CLBlast:
 *  - clkvq_gemv_decode: the fp32 decode baseline (scores = K q and
 *    out = V^T p per query head as CLBlast GEMVs, our softmax in between);
 *  - clkvq_cache_prefill_host: causal prefill attention over a cache
 *    sequence dequantized to fp32 scratch, as two strided-batched GEMMs
 *    (one batch entry per kv head, its GQA group of query heads stacked
 *    into the rows) around a causal softmax.
 * CLBlast takes the context's queue, so everything stays in order on it.
 */
#include "internal.h"
#include "kernel_args.h"
#include "kv_cache.h"
#include "program_cache.h"
#ifdef CLKVQ_TESTING
#include "test_hooks.h"
#endif

#include <clblast_c.h>

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* Work-items per softmax row (a power of two; fewer if the device says so). */
#define SOFTMAX_LOCAL_MAX 64
/* Most bytes of prefill scores (one query chunk) held at once: bounds the
 * scratch for long prompts; the queries are processed in chunks under it.
 * The test library makes it a variable that tests lower (test_hooks.h). */
#define SCORE_BUDGET_DEFAULT ((size_t)256 << 20)
#ifdef CLKVQ_TESTING
size_t clkvq_prefill_score_budget = SCORE_BUDGET_DEFAULT;
#define SCORE_BUDGET clkvq_prefill_score_budget
#else
#define SCORE_BUDGET SCORE_BUDGET_DEFAULT
#endif

static const char *const g_softmax_sources[] = {"softmax.cl"};

/*
 * CLBlast keeps the programs it builds, per (cl_context, device), in one
 * process-wide cache that retains them, and through them the cl_context,
 * until CLBlastClearCache() or the process exits. Left there, a released
 * context stays alive to the end, and its programs are released by
 * CLBlast's static destructor, when the OpenCL implementation may already
 * be torn down (Oclgrind aborts there, "corrupted double-linked list").
 * CLBlast's API can only evict everything, so a context that ran CLBlast
 * clears the whole cache when it is released: another CLBlast user in the
 * process rebuilds its programs on next use, which is correct, only slower.
 */
void clkvq_blas_context_release(clkvq_context *ctx)
{
    if (ctx->used_clblast)
        CLBlastClearCache();
    ctx->used_clblast = 0;
}

/* ------------------------------------------------------------ helpers */

/*
 * Device time of one call, as a list of timed items: a single command
 * (begin NULL: its START..END) or a span (begin a marker enqueued before a
 * run of commands: END(begin)..END(end), end the last command's event).
 * Spans are for commands that hand back no event of their own: the cache's
 * read kernels, and CLBlast GEMMs, whose event is only their last kernel
 * (the indirect GEMM's pad/transpose kernels before it would be missed).
 * On the in-order queue the marker completes when everything before it
 * has, so a span is the device time of the run; it also holds any time the
 * queue sat idle waiting for the host inside the run, which is what CLBlast
 * compiling its kernels on its first call in a process looks like.
 */
typedef struct {
    cl_event begin, end;
} timed_event;

typedef struct {
    timed_event *ev;
    int n, cap; /* ev[n] is the slot being filled; slots past it are all NULL */
} event_list;

/* Makes room for one more item before its events are created, so an event
 * a command hands back always has a slot (and is never leaked). */
static clkvq_status events_reserve(clkvq_context *ctx, event_list *list)
{
    if (list->n < list->cap)
        return CLKVQ_OK;
    int cap = list->cap ? list->cap * 2 : 16;
    timed_event *ev = realloc(list->ev, (size_t)cap * sizeof *ev);
    if (!ev)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "no memory for profiling events");
    for (int i = list->cap; i < cap; i++)
        ev[i].begin = ev[i].end = NULL;
    list->ev = ev;
    list->cap = cap;
    return CLKVQ_OK;
}

/* Where the next command's event goes (after events_reserve);
 * events_commit closes the item once the command was enqueued. */
static cl_event *events_slot(event_list *list) { return &list->ev[list->n].end; }
static void events_commit(event_list *list) { list->n++; }

/* Opens a span: a marker in the current slot; the span's last command
 * then takes events_slot and events_commit closes it. */
static clkvq_status span_begin(clkvq_context *ctx, event_list *list)
{
    clkvq_status st = events_reserve(ctx, list);
    if (st != CLKVQ_OK)
        return st;
    cl_int err = clEnqueueMarkerWithWaitList(ctx->queue, 0, NULL, &list->ev[list->n].begin);
    if (err != CL_SUCCESS) {
        list->ev[list->n].begin = NULL;
        return clkvq_cl_fail(ctx, err, "enqueueing a timing marker");
    }
    return CLKVQ_OK;
}

/* Releases every event, including the marker of a span an error left
 * open. The open slot's end is not touched: a command that failed made no
 * event, whatever it left there. */
static void events_release(event_list *list)
{
    for (int i = 0; i < list->cap && i <= list->n; i++) {
        if (list->ev[i].begin)
            clReleaseEvent(list->ev[i].begin);
        if (i < list->n && list->ev[i].end)
            clReleaseEvent(list->ev[i].end);
    }
    free(list->ev);
    list->ev = NULL;
    list->n = list->cap = 0;
}

/* Sums the device time of the (finished) items into ctx->last_device_ms;
 * -1 when the queue has no profiling. */
static void record_time(clkvq_context *ctx, const event_list *list)
{
    double ms = 0.0;
    for (int i = 0; i < list->n; i++) {
        const timed_event *t = &list->ev[i];
        cl_ulong start = 0, end = 0;
        cl_event from = t->begin ? t->begin : t->end;
        cl_profiling_info from_info =
            t->begin ? CL_PROFILING_COMMAND_END : CL_PROFILING_COMMAND_START;
        if (clGetEventProfilingInfo(from, from_info, sizeof start, &start, NULL) !=
                CL_SUCCESS ||
            clGetEventProfilingInfo(t->end, CL_PROFILING_COMMAND_END, sizeof end, &end, NULL) !=
                CL_SUCCESS) {
            ms = -1.0;
            break;
        }
        ms += end > start ? (double)(end - start) * 1e-6 : 0.0;
    }
    ctx->last_device_ms = ms;
}

static const char *clblast_status_name(CLBlastStatusCode s)
{
    switch (s) {
    case CLBlastSuccess: return "success";
    case CLBlastOpenCLCompilerNotAvailable: return "OpenCL compiler not available";
    case CLBlastTempBufferAllocFailure: return "temporary buffer allocation failed";
    case CLBlastOpenCLOutOfResources: return "OpenCL out of resources";
    case CLBlastOpenCLOutOfHostMemory: return "OpenCL out of host memory";
    case CLBlastOpenCLBuildProgramFailure: return "kernel build failed";
    case CLBlastInvalidValue: return "invalid value";
    case CLBlastInvalidCommandQueue: return "invalid command queue";
    case CLBlastInvalidMemObject: return "invalid memory object";
    case CLBlastInvalidLocalThreadsTotal: return "work-group too large";
    case CLBlastInvalidBufferSize: return "invalid buffer size";
    case CLBlastNotImplemented: return "not implemented";
    case CLBlastInvalidMatrixA: return "matrix A is not a valid buffer";
    case CLBlastInvalidMatrixB: return "matrix B is not a valid buffer";
    case CLBlastInvalidMatrixC: return "matrix C is not a valid buffer";
    case CLBlastInvalidVectorX: return "vector x is not a valid buffer";
    case CLBlastInvalidVectorY: return "vector y is not a valid buffer";
    case CLBlastInvalidDimension: return "a dimension is zero";
    case CLBlastInvalidLeadDimA: return "leading dimension of A too small";
    case CLBlastInvalidLeadDimB: return "leading dimension of B too small";
    case CLBlastInvalidLeadDimC: return "leading dimension of C too small";
    case CLBlastInsufficientMemoryA: return "buffer of A too small";
    case CLBlastInsufficientMemoryB: return "buffer of B too small";
    case CLBlastInsufficientMemoryC: return "buffer of C too small";
    case CLBlastInsufficientMemoryX: return "buffer of x too small";
    case CLBlastInsufficientMemoryY: return "buffer of y too small";
    case CLBlastInvalidBatchCount: return "invalid batch count";
    case CLBlastInvalidLocalMemUsage: return "not enough local memory";
    case CLBlastDatabaseError: return "device not in the tuning database";
    case CLBlastUnknownError: return "unknown error";
    case CLBlastUnexpectedError: return "unexpected error";
    default: return "see clblast_c.h";
    }
}

static clkvq_status clblast_fail(clkvq_context *ctx, CLBlastStatusCode s, const char *what)
{
    return clkvq_fail(ctx, CLKVQ_ERR_OPENCL, "CLBlast status %d (%s) while %s", (int)s,
                      clblast_status_name(s), what);
}

/* A scratch buffer of `floats` floats; the caller has checked the size
 * against the device's allocation limit. */
static clkvq_status scratch_create(clkvq_context *ctx, size_t floats, const char *what,
                                   cl_mem *out)
{
    cl_int err;
    *out = clCreateBuffer(ctx->cl_ctx, CL_MEM_READ_WRITE, floats * sizeof(float), NULL, &err);
    if (err != CL_SUCCESS) {
        *out = NULL;
        char msg[128];
        snprintf(msg, sizeof msg, "creating the %s scratch (%zu bytes)", what,
                 floats * sizeof(float));
        return clkvq_cl_fail(ctx, err, msg);
    }
    return CLKVQ_OK;
}

/* Zeros a buffer. CLBlast's GEMV/GEMM kernels compute alpha*AB + beta*C
 * literally, reading C even when beta is 0, so an uninitialized output
 * holding a NaN bit pattern would poison the result (0 * NaN = NaN). */
static clkvq_status zero_fill(clkvq_context *ctx, event_list *events, cl_mem buf, size_t bytes,
                              const char *what)
{
    clkvq_status st = events_reserve(ctx, events);
    if (st != CLKVQ_OK)
        return st;
    const cl_float zero = 0.0f;
    cl_int err = clEnqueueFillBuffer(ctx->queue, buf, &zero, sizeof zero, 0, bytes, 0, NULL,
                                     events_slot(events));
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, what);
    events_commit(events);
    return CLKVQ_OK;
}

/* The softmax kernel and its work-group size: SOFTMAX_LOCAL_MAX, halved
 * until the device and the compiled kernel accept it (the reduction needs
 * a power of two). */
static clkvq_status softmax_kernel(clkvq_context *ctx, const char *name, cl_kernel *kernel,
                                   size_t *local)
{
    clkvq_status st = clkvq_kernel_get(ctx, g_softmax_sources, 1, "", name, kernel);
    if (st != CLKVQ_OK)
        return st;
    size_t kernel_max = 0;
    cl_int err = clGetKernelWorkGroupInfo(*kernel, ctx->device, CL_KERNEL_WORK_GROUP_SIZE,
                                          sizeof kernel_max, &kernel_max, NULL);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, "querying the softmax work-group size");
    size_t limit = ctx->info.max_work_group_size;
    if (kernel_max < limit)
        limit = kernel_max;
    size_t lsz = SOFTMAX_LOCAL_MAX;
    while (lsz > 1 && lsz > limit)
        lsz /= 2;
    *local = lsz;
    return CLKVQ_OK;
}

/* One work-group per row; the arguments before the local scratch are set
 * by the caller. event may be NULL. */
static clkvq_status launch_softmax(clkvq_context *ctx, cl_kernel kernel, cl_uint red_arg,
                                   size_t n_rows, size_t local, cl_event *event)
{
    cl_int err = clSetKernelArg(kernel, red_arg, local * sizeof(cl_float), NULL);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, "setting the softmax scratch argument");
    size_t global = n_rows * local;
    err = clEnqueueNDRangeKernel(ctx->queue, kernel, 1, NULL, &global, &local, 0, NULL, event);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, "launching softmax");
}

/* Waits for everything this call enqueued. On an error path the commands
 * already enqueued may still use our scratch: finishing first keeps the
 * releases that follow simple and safe. */
static clkvq_status finish(clkvq_context *ctx, clkvq_status st, const char *what)
{
    cl_int err = clFinish(ctx->queue);
    if (st == CLKVQ_OK && err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, what);
    return st;
}

/* ------------------------------------------------------------ GEMV decode */

clkvq_status clkvq_gemv_decode(clkvq_context *ctx, int n_q_heads, int n_kv_heads, int head_dim,
                               int n_tokens, cl_mem k, cl_mem v, cl_mem q, cl_mem out,
                               float scale)
{
    if (!ctx)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_gemv_decode: context is NULL");
    clkvq_clear_error(ctx);
    clkvq_timing_reset(ctx);
    if (n_q_heads < 1 || n_kv_heads < 1 || head_dim < 1 || n_tokens < 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_gemv_decode: n_q_heads %d, n_kv_heads %d, head_dim %d must be "
                          ">= 1 and n_tokens %d >= 0",
                          n_q_heads, n_kv_heads, head_dim, n_tokens);
    if (n_q_heads % n_kv_heads != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_gemv_decode: n_q_heads %d is not a multiple of n_kv_heads %d",
                          n_q_heads, n_kv_heads);
    if (!isfinite(scale))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_gemv_decode: scale is not finite");
    /* CLBlast's kernels index with int: every element offset must fit */
    size_t kv_elems = (size_t)n_kv_heads * (size_t)n_tokens * (size_t)head_dim;
    size_t q_elems = (size_t)n_q_heads * (size_t)head_dim;
    size_t s_elems = (size_t)n_q_heads * (size_t)n_tokens;
    if (kv_elems > INT_MAX || q_elems > INT_MAX || s_elems > INT_MAX)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "clkvq_gemv_decode: %d kv heads x %d tokens x %d dims exceeds 2^31 "
                          "elements (CLBlast indexes with int)",
                          n_kv_heads, n_tokens, head_dim);
    if (s_elems * sizeof(float) > ctx->info.max_alloc_bytes)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "clkvq_gemv_decode: scores scratch of %zu bytes exceeds the device's "
                          "largest allocation (%llu bytes)",
                          s_elems * sizeof(float), (unsigned long long)ctx->info.max_alloc_bytes);
    clkvq_status st;
    if ((st = clkvq_check_buffer(ctx, k, "k", kv_elems * sizeof(float))) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, v, "v", kv_elems * sizeof(float))) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, q, "q", q_elems * sizeof(float))) != CLKVQ_OK ||
        (st = clkvq_check_buffer(ctx, out, "out", q_elems * sizeof(float))) != CLKVQ_OK)
        return st;

    event_list events = {NULL, 0, 0};
    if (n_tokens == 0) {
        /* nothing to attend to: zeros, as clkvq_cache_decode gives an empty sequence */
        st = zero_fill(ctx, &events, out, q_elems * sizeof(float), "zeroing out");
        st = finish(ctx, st, "waiting for the zero fill");
        if (st == CLKVQ_OK)
            record_time(ctx, &events);
        events_release(&events);
        return st;
    }

    /* build (or fetch) the softmax before anything is enqueued */
    cl_kernel softmax;
    size_t local = 1;
    if ((st = softmax_kernel(ctx, "clkvq_softmax_rows", &softmax, &local)) != CLKVQ_OK)
        return st;
    cl_mem scores;
    if ((st = scratch_create(ctx, s_elems, "scores", &scores)) != CLKVQ_OK)
        return st;

    const int group = n_q_heads / n_kv_heads;
    const size_t hd = (size_t)head_dim, n = (size_t)n_tokens;
    cl_command_queue queue = ctx->queue;
    char what[128];
    ctx->used_clblast = 1; /* see clkvq_blas_context_release */
    if ((st = zero_fill(ctx, &events, scores, s_elems * sizeof(float), "zeroing scores")) ==
        CLKVQ_OK)
        st = zero_fill(ctx, &events, out, q_elems * sizeof(float), "zeroing out");

    /* scores_h = scale * K_kvh q_h: K_kvh is n x hd row-major at kvh*n*hd.
     * CLBlast's GEMV is a single kernel, so its event is its whole time. */
    for (int h = 0; h < n_q_heads && st == CLKVQ_OK; h++) {
        size_t kv_off = (size_t)(h / group) * n * hd;
        if ((st = events_reserve(ctx, &events)) != CLKVQ_OK)
            break;
        CLBlastStatusCode s = CLBlastSgemv(CLBlastLayoutRowMajor, CLBlastTransposeNo, n, hd,
                                           scale, k, kv_off, hd, q, (size_t)h * hd, 1, 0.0f,
                                           scores, (size_t)h * n, 1, &queue,
                                           events_slot(&events));
        if (s != CLBlastSuccess) {
            snprintf(what, sizeof what, "computing the scores of query head %d (Sgemv K q)", h);
            st = clblast_fail(ctx, s, what);
        } else {
            events_commit(&events);
        }
    }
    if (st == CLKVQ_OK && (st = events_reserve(ctx, &events)) == CLKVQ_OK) {
        clkvq_args a;
        clkvq_args_begin(&a, softmax, 0);
        clkvq_args_mem(&a, scores);
        clkvq_args_int(&a, n_tokens);
        st = clkvq_args_end(ctx, &a, "the softmax");
        if (st == CLKVQ_OK)
            st = launch_softmax(ctx, softmax, 2, (size_t)n_q_heads, local, events_slot(&events));
        if (st == CLKVQ_OK)
            events_commit(&events);
    }
    /* out_h = V_kvh^T p_h */
    for (int h = 0; h < n_q_heads && st == CLKVQ_OK; h++) {
        size_t kv_off = (size_t)(h / group) * n * hd;
        if ((st = events_reserve(ctx, &events)) != CLKVQ_OK)
            break;
        CLBlastStatusCode s = CLBlastSgemv(CLBlastLayoutRowMajor, CLBlastTransposeYes, n, hd,
                                           1.0f, v, kv_off, hd, scores, (size_t)h * n, 1, 0.0f,
                                           out, (size_t)h * hd, 1, &queue,
                                           events_slot(&events));
        if (s != CLBlastSuccess) {
            snprintf(what, sizeof what, "computing the output of query head %d (Sgemv V^T p)",
                     h);
            st = clblast_fail(ctx, s, what);
        } else {
            events_commit(&events);
        }
    }
    st = finish(ctx, st, "waiting for GEMV decode");
    if (st == CLKVQ_OK)
        record_time(ctx, &events);
    events_release(&events);
    clReleaseMemObject(scores);
    return st;
}

/* ------------------------------------------------------------ prefill */

/* Scratch of one prefill call. */
typedef struct {
    cl_mem k, v;   /* [n_kv_heads][n][head_dim] */
    cl_mem q, o;   /* [n_q_heads][chunk][head_dim] */
    cl_mem s;      /* [n_q_heads][chunk][<= n] */
} prefill_scratch;

static void scratch_release(prefill_scratch *sc)
{
    cl_mem *all[] = {&sc->k, &sc->v, &sc->q, &sc->o, &sc->s};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (*all[i]) {
            clReleaseMemObject(*all[i]);
            *all[i] = NULL;
        }
}

/* One chunk of queries [q0, q0 + c) of the n_queries given: upload, the
 * two batched GEMMs around the causal softmax, read back. */
typedef struct {
    int n_q_heads, n_kv_heads, head_dim;
    int n;         /* sequence length */
    int n_queries; /* all queries of the call */
    float scale;
    const float *q;
    float *out;
    cl_kernel softmax;
    size_t local;
} prefill_job;

static clkvq_status prefill_chunk(clkvq_context *ctx, const prefill_job *job,
                                  const prefill_scratch *sc, int q0, int c, event_list *events)
{
    const size_t H = (size_t)job->n_q_heads, hd = (size_t)job->head_dim, n = (size_t)job->n;
    const size_t group = H / (size_t)job->n_kv_heads;
    /* query i of the chunk sits at pos0 + i; tokens past the chunk's last
     * query are masked for every row of it, so the GEMMs stop there */
    const int pos0 = job->n - job->n_queries + q0;
    const size_t n_cols = (size_t)pos0 + (size_t)c;
    const size_t rows = group * (size_t)c; /* rows of one kv head's stacked queries */
    cl_command_queue queue = ctx->queue;
    cl_int err;

    /* q rows [q0, q0 + c) of every head -> contiguous [H][c][hd] */
    const size_t buf_origin[3] = {0, 0, 0};
    const size_t host_origin[3] = {(size_t)q0 * hd * sizeof(float), 0, 0};
    const size_t region[3] = {(size_t)c * hd * sizeof(float), H, 1};
    err = clEnqueueWriteBufferRect(queue, sc->q, CL_TRUE, buf_origin, host_origin, region,
                                   (size_t)c * hd * sizeof(float), 0,
                                   (size_t)job->n_queries * hd * sizeof(float), 0, job->q, 0,
                                   NULL, NULL);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, "uploading queries");

    /* the chunk's device work is one span: CLBlast's events would miss
     * the GEMMs' helper kernels */
    clkvq_status st = span_begin(ctx, events);
    if (st != CLKVQ_OK)
        return st;

    /* S = scale * Q_group K^T per kv head */
    ctx->used_clblast = 1; /* see clkvq_blas_context_release */
    CLBlastStatusCode s = CLBlastSgemmStridedBatched(
        CLBlastLayoutRowMajor, CLBlastTransposeNo, CLBlastTransposeYes, rows, n_cols, hd,
        job->scale, sc->q, 0, hd, rows * hd, sc->k, 0, hd, n * hd, 0.0f, sc->s, 0, n_cols,
        rows * n_cols, (size_t)job->n_kv_heads, &queue, NULL);
    if (s != CLBlastSuccess)
        return clblast_fail(ctx, s, "computing prefill scores (SgemmStridedBatched Q K^T)");

    clkvq_args a;
    clkvq_args_begin(&a, job->softmax, 0);
    clkvq_args_mem(&a, sc->s);
    clkvq_args_int(&a, (int)n_cols);
    clkvq_args_int(&a, (int)c);
    clkvq_args_int(&a, (int)pos0);
    if ((st = clkvq_args_end(ctx, &a, "the causal softmax")) != CLKVQ_OK)
        return st;
    if ((st = launch_softmax(ctx, job->softmax, 4, H * (size_t)c, job->local, NULL)) !=
        CLKVQ_OK)
        return st;

    /* O = P V per kv head; its (last kernel's) event closes the span */
    s = CLBlastSgemmStridedBatched(CLBlastLayoutRowMajor, CLBlastTransposeNo,
                                   CLBlastTransposeNo, rows, hd, n_cols, 1.0f, sc->s, 0, n_cols,
                                   rows * n_cols, sc->v, 0, hd, n * hd, 0.0f, sc->o, 0, hd,
                                   rows * hd, (size_t)job->n_kv_heads, &queue,
                                   events_slot(events));
    if (s != CLBlastSuccess)
        return clblast_fail(ctx, s, "computing prefill outputs (SgemmStridedBatched P V)");
    events_commit(events);

    /* [H][c][hd] -> rows [q0, q0 + c) of out (blocking: waits for the GEMM) */
    err = clEnqueueReadBufferRect(queue, sc->o, CL_TRUE, buf_origin, host_origin, region,
                                  (size_t)c * hd * sizeof(float), 0,
                                  (size_t)job->n_queries * hd * sizeof(float), 0, job->out, 0,
                                  NULL, NULL);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, "reading prefill output");
}

/* Dequantizes the sequence into the K/V scratch, timed as a span (the
 * cache's read kernels hand back no events). */
static clkvq_status read_kv(clkvq_context *ctx, clkvq_cache *cache, int layer, int seq,
                            const prefill_scratch *sc, event_list *events)
{
    clkvq_status st = span_begin(ctx, events);
    if (st == CLKVQ_OK)
        st = clkvq_cache_read_device(cache, layer, seq, sc->k, sc->v);
    if (st != CLKVQ_OK)
        return st;
    cl_int err = clEnqueueMarkerWithWaitList(ctx->queue, 0, NULL, events_slot(events));
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(ctx, err, "enqueueing a timing marker");
    events_commit(events);
    return CLKVQ_OK;
}

clkvq_status clkvq_cache_prefill_host(clkvq_cache *cache, int layer, int seq, int n_queries,
                                      const float *q, float *out, float scale)
{
    if (!cache)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_prefill_host: cache is NULL");
    clkvq_context *ctx = cache->ctx;
    clkvq_clear_error(ctx);
    clkvq_timing_reset(ctx);
    const clkvq_cache_config *cfg = &cache->cfg;
    if (layer < 0 || layer >= cfg->n_layers)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_cache_prefill_host: layer %d outside [0, %d)", layer,
                          cfg->n_layers);
    if (seq < 0 || seq >= cfg->n_seqs)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_cache_prefill_host: seq %d outside [0, %d)", seq, cfg->n_seqs);
    if (!q || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_prefill_host: q or out is NULL");
    if (!isfinite(scale))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_cache_prefill_host: scale is not finite");
    const int n = cache->layers[cache->first_stored[layer]].length[seq];
    if (n_queries < 1 || n_queries > n)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_cache_prefill_host: n_queries %d outside [1, %d] (the length "
                          "of seq %d in layer %d; append the tokens first)",
                          n_queries, n, seq, layer);

    const size_t H = (size_t)cfg->n_q_heads, KV = (size_t)cfg->n_kv_heads;
    const size_t hd = (size_t)cfg->head_dim;
    const size_t kv_elems = KV * (size_t)n * hd;
    const size_t max_alloc = (size_t)ctx->info.max_alloc_bytes;
    if (kv_elems > INT_MAX || kv_elems * sizeof(float) > max_alloc)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "clkvq_cache_prefill_host: the fp32 K/V scratch of %zu elements "
                          "exceeds the device's largest allocation (%zu bytes) or 2^31 elements",
                          kv_elems, max_alloc);
    /* queries per chunk: the scores of a chunk ([H][chunk][<= n]) stay
     * under the budget and CLBlast's int indexing */
    size_t budget = SCORE_BUDGET < max_alloc ? SCORE_BUDGET : max_alloc;
    size_t per_query = H * (size_t)n; /* score floats of one query over all heads */
    size_t chunk = budget / sizeof(float) / per_query;
    if (chunk > (size_t)INT_MAX / per_query)
        chunk = (size_t)INT_MAX / per_query;
    if (chunk > (size_t)INT_MAX / (H * hd)) /* the query/output scratch too */
        chunk = (size_t)INT_MAX / (H * hd);
    if (chunk > (size_t)n_queries)
        chunk = (size_t)n_queries;
    if (chunk == 0)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "clkvq_cache_prefill_host: the scores of one query (%zu heads x %d "
                          "tokens) exceed the scratch limit (%zu bytes)",
                          H, n, budget);

    prefill_job job = {cfg->n_q_heads, cfg->n_kv_heads, cfg->head_dim, n, n_queries, scale,
                       q, out, NULL, 0};
    clkvq_status st = softmax_kernel(ctx, "clkvq_softmax_causal", &job.softmax, &job.local);
    if (st != CLKVQ_OK)
        return st;
    prefill_scratch sc = {NULL, NULL, NULL, NULL, NULL};
    event_list events = {NULL, 0, 0};
    if ((st = scratch_create(ctx, kv_elems, "K", &sc.k)) == CLKVQ_OK &&
        (st = scratch_create(ctx, kv_elems, "V", &sc.v)) == CLKVQ_OK &&
        (st = scratch_create(ctx, H * chunk * hd, "query", &sc.q)) == CLKVQ_OK &&
        (st = scratch_create(ctx, H * chunk * hd, "output", &sc.o)) == CLKVQ_OK &&
        (st = scratch_create(ctx, H * chunk * (size_t)n, "scores", &sc.s)) == CLKVQ_OK &&
        (st = zero_fill(ctx, &events, sc.s, H * chunk * (size_t)n * sizeof(float),
                        "zeroing scores")) == CLKVQ_OK &&
        (st = zero_fill(ctx, &events, sc.o, H * chunk * hd * sizeof(float),
                        "zeroing the output scratch")) == CLKVQ_OK)
        st = read_kv(ctx, cache, layer, seq, &sc, &events);
    for (int q0 = 0; q0 < n_queries && st == CLKVQ_OK; q0 += (int)chunk) {
        int c = n_queries - q0 < (int)chunk ? n_queries - q0 : (int)chunk;
        st = prefill_chunk(ctx, &job, &sc, q0, c, &events);
    }
    st = finish(ctx, st, "waiting for prefill");
    if (st == CLKVQ_OK)
        record_time(ctx, &events);
    events_release(&events);
    scratch_release(&sc);
    return st;
}
