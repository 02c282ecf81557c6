/*
 * Threads and scale-out, the rules README.md and docs/design.md state:
 *
 * - one clkvq_context per thread: two threads, each with its own context on
 *   the default device, run append + decode schedules at the same time and
 *   get exactly (bit for bit, every decode output of every step) what one
 *   thread gets running the same schedules one after the other;
 * - clkvq_last_error(NULL) is per thread;
 * - tensor parallelism: caches in two contexts, each holding a range of the
 *   kv heads (their query heads, permutation rows and centering means with
 *   them), decode to the unsharded cache's outputs concatenated, bit for
 *   bit, with the same tunables. (Not with rotate = 1: the rotation's signs
 *   follow the kv head's index within its cache, so a shard's heads would
 *   be rotated differently; docs/design.md says so.)
 */
#include "test_util.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ schedules */

#define SCHED_SEQS 2
#define SCHED_KV 2
#define SCHED_QPK 2
#define SCHED_DIM 64
#define SCHED_STEPS 1000
#define SCHED_CAPACITY 1100

/* One worker's deterministic workload: a paged cache, then per step one
 * token appended to each sequence and a decode of both; every fourth of
 * the way the second sequence is cut to half (pages go back to the pool). */
typedef struct {
    const char *name;
    clkvq_layer_config layer;
    int block_size;
    uint64_t seed;
    float *outputs; /* [steps][n_seqs][n_q][dim] */
    clkvq_status status;
    char error[512];
} schedule;

static size_t step_floats(void) { return (size_t)SCHED_SEQS * SCHED_KV * SCHED_QPK * SCHED_DIM; }

static void schedule_init(schedule *sc, const char *name, clkvq_scheme scheme, clkvq_format fk,
                          clkvq_format fv, int block_size, uint64_t seed)
{
    memset(sc, 0, sizeof *sc);
    sc->name = name;
    sc->layer = clkvq_layer_config_default(scheme);
    sc->layer.format_k = fk;
    sc->layer.format_v = fv;
    if (scheme == CLKVQ_SCHEME_KIVI)
        sc->layer.residual = 64;
    sc->block_size = block_size;
    sc->seed = seed;
    sc->outputs = malloc(sizeof(float) * SCHED_STEPS * step_floats());
    ck_assert_ptr_nonnull(sc->outputs);
}

static int sched_fail(schedule *sc, clkvq_context *ctx, clkvq_status st, const char *what)
{
    sc->status = st;
    snprintf(sc->error, sizeof sc->error, "%s: %s: %s", what, clkvq_status_string(st),
             ctx ? clkvq_last_error(ctx) : clkvq_last_error(NULL));
    return -1;
}

static clkvq_status write_buf(clkvq_context *ctx, cl_mem m, const float *x, size_t n)
{
    cl_int err = clEnqueueWriteBuffer(clkvq_context_cl_queue(ctx), m, CL_TRUE, 0,
                                      n * sizeof(float), x, 0, NULL, NULL);
    return err == CL_SUCCESS ? CLKVQ_OK : CLKVQ_ERR_OPENCL;
}

/* Runs sc on ctx, filling sc->outputs; 0 or -1 (sc->error says why). The
 * barrier, when given, lines the threads up once their caches exist, so
 * their appends and decodes overlap. */
static int schedule_run(schedule *sc, clkvq_context *ctx, pthread_barrier_t *barrier)
{
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = SCHED_SEQS, .capacity = SCHED_CAPACITY,
                              .n_kv_heads = SCHED_KV, .n_q_heads = SCHED_KV * SCHED_QPK,
                              .head_dim = SCHED_DIM, .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
                              .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR, .layers = &sc->layer,
                              .block_size = sc->block_size};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(ctx, &cfg, &cache);
    if (barrier)
        pthread_barrier_wait(barrier);
    if (st != CLKVQ_OK)
        return sched_fail(sc, ctx, st, "create");
    cl_context clc = clkvq_context_cl_context(ctx);
    size_t kv_n = (size_t)SCHED_KV * SCHED_DIM, q_n = step_floats();
    cl_int err;
    cl_mem km = clCreateBuffer(clc, CL_MEM_READ_WRITE, kv_n * 4, NULL, &err);
    cl_mem vm = clCreateBuffer(clc, CL_MEM_READ_WRITE, kv_n * 4, NULL, &err);
    cl_mem qm = clCreateBuffer(clc, CL_MEM_READ_WRITE, q_n * 4, NULL, &err);
    cl_mem om = clCreateBuffer(clc, CL_MEM_READ_WRITE, q_n * 4, NULL, &err);
    float *k = malloc(kv_n * sizeof(float)), *v = malloc(kv_n * sizeof(float));
    float *q = malloc(q_n * sizeof(float));
    int rc = 0;
    if (!km || !vm || !qm || !om || !k || !v || !q)
        rc = sched_fail(sc, ctx, CLKVQ_ERR_OUT_OF_MEMORY, "buffers");
    for (int step = 0; step < SCHED_STEPS && rc == 0; step++) {
        for (int s = 0; s < SCHED_SEQS && rc == 0; s++) {
            uint64_t seed = sc->seed * 1000003u + (uint64_t)step * SCHED_SEQS + (uint64_t)s;
            test_fill_normal(seed, k, kv_n, 1.0f);
            test_fill_normal(seed + 77, v, kv_n, 2.0f);
            k[5] *= 12.0f; /* an outlier channel */
            if ((st = write_buf(ctx, km, k, kv_n)) != CLKVQ_OK ||
                (st = write_buf(ctx, vm, v, kv_n)) != CLKVQ_OK ||
                (st = clkvq_cache_append_mem(cache, 0, s, 1, km, vm)) != CLKVQ_OK)
                rc = sched_fail(sc, ctx, st, "append");
        }
        if (rc == 0 && step % (SCHED_STEPS / 4) == SCHED_STEPS / 4 - 1) {
            int len;
            clkvq_cache_length(cache, 0, 1, &len);
            if ((st = clkvq_cache_truncate(cache, 1, len / 2)) != CLKVQ_OK)
                rc = sched_fail(sc, ctx, st, "truncate");
        }
        if (rc != 0)
            break;
        test_fill_normal(sc->seed * 7919u + (uint64_t)step, q, q_n, 1.0f);
        float *out = sc->outputs + (size_t)step * q_n;
        if ((st = write_buf(ctx, qm, q, q_n)) != CLKVQ_OK ||
            (st = clkvq_cache_decode(cache, 0, qm, om, 0.125f)) != CLKVQ_OK)
            rc = sched_fail(sc, ctx, st, "decode");
        else if (clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), om, CL_TRUE, 0, q_n * 4, out, 0,
                                     NULL, NULL) != CL_SUCCESS)
            rc = sched_fail(sc, ctx, CLKVQ_ERR_OPENCL, "read out");
    }
    cl_mem mems[] = {km, vm, qm, om};
    for (int i = 0; i < 4; i++)
        if (mems[i])
            clReleaseMemObject(mems[i]);
    free(k);
    free(v);
    free(q);
    clkvq_cache_release(cache);
    return rc;
}

/* ------------------------------------------------------------ two threads */

typedef struct {
    schedule *sc;
    pthread_barrier_t *barrier;
    int rc;
    int null_error_ok; /* this thread's NULL-context message survived the other's */
} worker;

static void *worker_main(void *arg)
{
    worker *w = arg;
    clkvq_context *ctx = NULL;
    clkvq_status st = clkvq_context_create(&ctx, NULL);
    /* each thread leaves a NULL-context message naming itself; the other
     * thread's, left meanwhile, must not replace it */
    char mine[64];
    snprintf(mine, sizeof mine, "no-such-scheme-%s", w->sc->name);
    clkvq_scheme scheme;
    clkvq_scheme_parse(mine, &scheme);
    pthread_barrier_wait(w->barrier);
    w->null_error_ok = strstr(clkvq_last_error(NULL), mine) != NULL;
    if (st != CLKVQ_OK) {
        sched_fail(w->sc, NULL, st, "context");
        pthread_barrier_wait(w->barrier); /* the partner waits here after its create */
        w->rc = -1;
        return NULL;
    }
    w->rc = schedule_run(w->sc, ctx, w->barrier);
    clkvq_context_release(ctx);
    return NULL;
}

static void compare_outputs(const schedule *a, const schedule *b)
{
    size_t n = step_floats();
    for (int step = 0; step < SCHED_STEPS; step++) {
        const float *x = a->outputs + (size_t)step * n, *y = b->outputs + (size_t)step * n;
        if (memcmp(x, y, n * sizeof(float)) == 0)
            continue;
        size_t i = 0;
        while (x[i] == y[i])
            i++;
        ck_abort_msg("%s: step %d: threaded output %zu is %.9g, single-threaded %.9g", a->name,
                     step, i, (double)y[i], (double)x[i]);
    }
}

START_TEST(two_contexts_on_two_threads_match_one_thread)
{
    schedule ref[2], par[2];
    schedule_init(&ref[0], "token-k4v4-b64", CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q4, CLKVQ_FMT_Q4, 64,
                  1);
    schedule_init(&ref[1], "kivi-k2v2-b32", CLKVQ_SCHEME_KIVI, CLKVQ_FMT_Q2, CLKVQ_FMT_Q2, 32, 2);
    for (int i = 0; i < 2; i++) {
        schedule_init(&par[i], ref[i].name, ref[i].layer.scheme, ref[i].layer.format_k,
                      ref[i].layer.format_v, ref[i].block_size, ref[i].seed);
        int rc = schedule_run(&ref[i], test_ctx(), NULL);
        ck_assert_msg(rc == 0, "%s single-threaded: %s", ref[i].name, ref[i].error);
    }
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, 2);
    worker w[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        w[i] = (worker){&par[i], &barrier, 0, 0};
        ck_assert_int_eq(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    pthread_barrier_destroy(&barrier);
    for (int i = 0; i < 2; i++) {
        ck_assert_msg(w[i].rc == 0, "%s on its thread: %s", par[i].name, par[i].error);
        ck_assert_msg(w[i].null_error_ok, "%s: the NULL-context message is not per thread",
                      par[i].name);
        compare_outputs(&ref[i], &par[i]);
        free(ref[i].outputs);
        free(par[i].outputs);
    }
}
END_TEST

/* ------------------------------------------------------------ sharding */

#define TP_SEQS 2
#define TP_KV 8
#define TP_QPK 2
#define TP_DIM 64
#define TP_CAPACITY 256
#define TP_STEPS 40
#define TP_SHARDS 2

/* One cache over kv heads [h0, h0 + n_kv) of the model: its query heads
 * [h0 * qpk, (h0 + n_kv) * qpk) and its rows of the permutations. */
typedef struct {
    clkvq_context *ctx; /* NULL: a thread creates its own */
    int h0, n_kv;
    const clkvq_attn_tuning *tuning;
    const int32_t *perm_k, *perm_v; /* the whole model's [TP_KV][dim] */
    const float *mean_k, *mean_v;   /* the same: centering means */
    const float *prefill_k, *prefill_v; /* [TP_SEQS][TP_KV][n][dim] */
    const int *prefill_len;
    const float *step_k, *step_v;   /* [TP_STEPS][TP_SEQS][TP_KV][dim] */
    const float *q;                 /* [TP_STEPS][TP_SEQS][n_q][dim], the whole model's */
    float *out;                     /* the same shape: this shard writes its heads */
    int block_size;
    clkvq_attn_tuning used;         /* what decode resolved */
    char error[512];
} shard;

static int shard_fail(shard *sh, clkvq_context *ctx, clkvq_status st, const char *what)
{
    snprintf(sh->error, sizeof sh->error, "heads %d..%d: %s: %s: %s", sh->h0,
             sh->h0 + sh->n_kv - 1, what, clkvq_status_string(st),
             ctx ? clkvq_last_error(ctx) : clkvq_last_error(NULL));
    return -1;
}

static int shard_run(shard *sh, clkvq_context *ctx)
{
    const int d = TP_DIM, nq_all = TP_KV * TP_QPK, nq = sh->n_kv * TP_QPK;
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    lc.format_k = CLKVQ_FMT_Q2;
    lc.format_v = CLKVQ_FMT_T15;
    lc.group_size = 32;
    lc.window = 16;
    lc.n_sink = 3;
    lc.clip_k = 0.9f;
    lc.clip_v = 0.95f;
    lc.perm_k = sh->perm_k + (size_t)sh->h0 * d;
    lc.perm_v = sh->perm_v + (size_t)sh->h0 * d;
    lc.mean_k = sh->mean_k + (size_t)sh->h0 * d;
    lc.mean_v = sh->mean_v + (size_t)sh->h0 * d;
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = TP_SEQS, .capacity = TP_CAPACITY,
                              .n_kv_heads = sh->n_kv, .n_q_heads = nq, .head_dim = d,
                              .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
                              .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR, .layers = &lc,
                              .block_size = sh->block_size};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(ctx, &cfg, &cache);
    if (st != CLKVQ_OK)
        return shard_fail(sh, ctx, st, "create");
    int rc = 0;
    if ((st = clkvq_cache_set_tuning(cache, sh->tuning)) != CLKVQ_OK ||
        (st = clkvq_cache_get_tuning(cache, &sh->used)) != CLKVQ_OK)
        rc = shard_fail(sh, ctx, st, "tuning");
    size_t max_n = TP_CAPACITY;
    float *k = malloc(sizeof(float) * sh->n_kv * max_n * d);
    float *v = malloc(sizeof(float) * sh->n_kv * max_n * d);
    float *q = malloc(sizeof(float) * TP_SEQS * nq * d);
    float *o = malloc(sizeof(float) * TP_SEQS * nq * d);
    /* [kv][n][dim] inputs: this shard's heads are one contiguous slice */
    for (int s = 0; s < TP_SEQS && rc == 0; s++) {
        int n = sh->prefill_len[s];
        const float *pk = sh->prefill_k + (size_t)s * TP_KV * max_n * d;
        const float *pv = sh->prefill_v + (size_t)s * TP_KV * max_n * d;
        for (int h = 0; h < sh->n_kv; h++) {
            memcpy(k + (size_t)h * n * d, pk + ((size_t)(sh->h0 + h) * n) * d,
                   sizeof(float) * n * d);
            memcpy(v + (size_t)h * n * d, pv + ((size_t)(sh->h0 + h) * n) * d,
                   sizeof(float) * n * d);
        }
        if ((st = clkvq_cache_append(cache, 0, s, n, k, v)) != CLKVQ_OK)
            rc = shard_fail(sh, ctx, st, "prefill");
    }
    for (int step = 0; step < TP_STEPS && rc == 0; step++) {
        for (int s = 0; s < TP_SEQS && rc == 0; s++) {
            size_t base = (((size_t)step * TP_SEQS + s) * TP_KV + sh->h0) * d;
            if ((st = clkvq_cache_append(cache, 0, s, 1, sh->step_k + base, sh->step_v + base)) !=
                CLKVQ_OK)
                rc = shard_fail(sh, ctx, st, "append");
        }
        for (int s = 0; s < TP_SEQS; s++)
            memcpy(q + (size_t)s * nq * d,
                   sh->q + (((size_t)step * TP_SEQS + s) * nq_all + (size_t)sh->h0 * TP_QPK) * d,
                   sizeof(float) * nq * d);
        if (rc == 0 && (st = clkvq_cache_decode_host(cache, 0, q, o, 0.125f)) != CLKVQ_OK)
            rc = shard_fail(sh, ctx, st, "decode");
        for (int s = 0; s < TP_SEQS && rc == 0; s++)
            memcpy(sh->out + (((size_t)step * TP_SEQS + s) * nq_all + (size_t)sh->h0 * TP_QPK) * d,
                   o + (size_t)s * nq * d, sizeof(float) * nq * d);
    }
    free(k);
    free(v);
    free(q);
    free(o);
    clkvq_cache_release(cache);
    return rc;
}

static void *shard_thread(void *arg)
{
    shard *sh = arg;
    clkvq_context *ctx = NULL;
    clkvq_status st = clkvq_context_create(&ctx, NULL);
    if (st != CLKVQ_OK) {
        shard_fail(sh, NULL, st, "context");
        return (void *)1;
    }
    int rc = shard_run(sh, ctx);
    clkvq_context_release(ctx);
    return rc ? (void *)1 : NULL;
}

/* The unsharded cache in the test's context, then two shards of 4 kv heads
 * on two threads with their own contexts; the variant's tunables are fixed
 * (the tuning lookup may pick others for a 4-head shape). */
static void run_sharded(clkvq_attn_tuning tuning, int block_size)
{
    const int d = TP_DIM, nq_all = TP_KV * TP_QPK;
    const int prefill_len[TP_SEQS] = {150, 37};
    size_t pre = (size_t)TP_SEQS * TP_KV * TP_CAPACITY * d;
    size_t steps_kv = (size_t)TP_STEPS * TP_SEQS * TP_KV * d;
    size_t steps_q = (size_t)TP_STEPS * TP_SEQS * nq_all * d;
    float *pk = calloc(pre, sizeof(float)), *pv = calloc(pre, sizeof(float));
    float *sk = malloc(steps_kv * sizeof(float)), *sv = malloc(steps_kv * sizeof(float));
    float *q = malloc(steps_q * sizeof(float));
    float *whole = malloc(steps_q * sizeof(float)), *split = malloc(steps_q * sizeof(float));
    for (int s = 0; s < TP_SEQS; s++) {
        size_t n = (size_t)TP_KV * prefill_len[s] * d;
        test_fill_normal(300 + (uint64_t)s, pk + (size_t)s * TP_KV * TP_CAPACITY * d, n, 1.0f);
        test_fill_normal(400 + (uint64_t)s, pv + (size_t)s * TP_KV * TP_CAPACITY * d, n, 2.0f);
    }
    test_fill_normal(500, sk, steps_kv, 1.0f);
    test_fill_normal(501, sv, steps_kv, 2.0f);
    test_fill_normal(502, q, steps_q, 1.0f);
    for (size_t i = 7; i < steps_kv; i += d)
        sk[i] *= 15.0f; /* an outlier channel the permutation moves */
    memset(whole, 0xff, steps_q * sizeof(float));
    memset(split, 0xff, steps_q * sizeof(float));
    int32_t *perm_k = test_random_perm(61, TP_KV, d), *perm_v = test_random_perm(62, TP_KV, d);
    float *mean_k = malloc(sizeof(float) * TP_KV * d), *mean_v = malloc(sizeof(float) * TP_KV * d);
    test_fill_normal(63, mean_k, (size_t)TP_KV * d, 1.0f);
    test_fill_normal(64, mean_v, (size_t)TP_KV * d, 0.5f);

    shard all = {test_ctx(), 0, TP_KV, &tuning, perm_k, perm_v, mean_k, mean_v, pk, pv,
                 prefill_len, sk, sv, q, whole, block_size, {0}, ""};
    ck_assert_msg(shard_run(&all, test_ctx()) == 0, "unsharded: %s", all.error);
    shard parts[TP_SHARDS];
    pthread_t th[TP_SHARDS];
    for (int i = 0; i < TP_SHARDS; i++) {
        parts[i] = all;
        parts[i].ctx = NULL;
        parts[i].h0 = i * TP_KV / TP_SHARDS;
        parts[i].n_kv = TP_KV / TP_SHARDS;
        parts[i].tuning = &all.used; /* exactly what the unsharded decode ran */
        parts[i].out = split;
        ck_assert_int_eq(pthread_create(&th[i], NULL, shard_thread, &parts[i]), 0);
    }
    for (int i = 0; i < TP_SHARDS; i++) {
        void *ret;
        pthread_join(th[i], &ret);
        ck_assert_msg(ret == NULL, "shard %d: %s", i, parts[i].error);
        ck_assert(memcmp(&parts[i].used, &all.used, sizeof all.used) == 0);
    }
    for (size_t i = 0; i < steps_q; i++)
        if (memcmp(&whole[i], &split[i], sizeof(float)) != 0) {
            size_t per_step = (size_t)TP_SEQS * nq_all * d;
            ck_abort_msg("variant %d block %d: step %zu seq %zu q head %zu channel %zu: sharded "
                         "%.9g, unsharded %.9g",
                         (int)tuning.variant, block_size, i / per_step,
                         i % per_step / ((size_t)nq_all * d), i % ((size_t)nq_all * d) / d, i % d,
                         (double)split[i], (double)whole[i]);
        }
    free(pk);
    free(pv);
    free(sk);
    free(sv);
    free(q);
    free(whole);
    free(split);
    free(perm_k);
    free(perm_v);
    free(mean_k);
    free(mean_v);
}

START_TEST(sharded_kv_heads_match_unsharded)
{
    clkvq_attn_tuning serial = {CLKVQ_ATTN_SERIAL, 0, 64, 8, 0, 0, 0};
    clkvq_attn_tuning coop = {CLKVQ_ATTN_COOPERATIVE, 32, 64, 0, 0, 0, 0};
    run_sharded(serial, 32);
    run_sharded(coop, 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("concurrency");
    TCase *tc = tcase_create("concurrency");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, two_contexts_on_two_threads_match_one_thread);
    tcase_add_test(tc, sharded_kv_heads_match_unsharded);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
