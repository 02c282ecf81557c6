/*
 * Soak: a long seeded random walk over a paged cache with a small page pool
 * (appends of one token and of prefill chunks, forks, truncations, frees,
 * decodes), every layer a different scheme (fp16; token with fp8 integer
 * zeros; kivi; skvq with a permutation; skvq with per-channel keys, rotated
 * and centered rows), checked against plain-C models:
 *
 * - contents: lib/reference_cache.c per (layer, sequence); read-back is
 *   compared bit for bit at checkpoints, decode against fp64 attention over
 *   the model's tokens (lib/reference.c) within TOLERANCE;
 * - pages: a model of the pool (reference counts over abstract page ids)
 *   that says after every call how many pages are held and shared, and
 *   whether an append must fail for want of pages; such an append must
 *   return CLKVQ_ERR_OUT_OF_BLOCKS and change nothing (pool, length,
 *   read-back);
 * - memory: used + free = n_blocks throughout, no page held once every
 *   sequence is freed, and the decode scratch never grows past what a
 *   warm-up at the worst lengths allocated. Host memory: ctest runs a short
 *   walk under LeakSanitizer too (test_soak_lsan).
 *
 * Usage: test_soak [--steps N] [--seed S]; ctest runs the default (about a
 * minute on a 2-core PoCL machine), label soak.
 */
#include "kv_cache.h"
#include "reference_cache.h"
#include "test_util.h"

#include "cli_parse.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_LAYERS 5
#define N_SEQS 6
#define HEADS 2
#define QPK 2
#define N_Q (HEADS * QPK)
#define DIM 64
#define CAPACITY 384
#define BLOCK 32
#define MAX_BLOCKS (CAPACITY / BLOCK)
#define POOL 24 /* pages per layer: 768 tokens, a third of what 6 full sequences hold */
#define CHECK_EVERY 50
#define PREFILL_MAX 120 /* tokens of the largest append */
#define TOLERANCE 1e-5
#define DEFAULT_STEPS 3200

static long g_steps = DEFAULT_STEPS;
static uint64_t g_seed = 1;

/* ------------------------------------------------------------ page model */

/* One layer's pool as the library must keep it: which abstract page each
 * block of each sequence holds, and reference counts. Page ids need not
 * match the library's; only counts are compared. */
typedef struct {
    int blk[N_SEQS][MAX_BLOCKS];
    int refs[POOL];
    int free_ids[POOL];
    int n_free;
} page_model;

static void pm_init(page_model *pm)
{
    memset(pm, 0, sizeof *pm);
    for (int s = 0; s < N_SEQS; s++)
        for (int b = 0; b < MAX_BLOCKS; b++)
            pm->blk[s][b] = -1;
    for (int i = 0; i < POOL; i++)
        pm->free_ids[i] = i;
    pm->n_free = POOL;
}

static void pm_unref(page_model *pm, int page)
{
    if (--pm->refs[page] == 0)
        pm->free_ids[pm->n_free++] = page;
}

/* Pages a write of tokens [t0, t1) needs: missing or shared blocks. */
static int pm_need(const page_model *pm, int s, int t0, int t1)
{
    int need = 0;
    for (int b = t0 / BLOCK; t1 > t0 && b <= (t1 - 1) / BLOCK; b++)
        need += pm->blk[s][b] < 0 || pm->refs[pm->blk[s][b]] > 1;
    return need;
}

static void pm_write(page_model *pm, int s, int t0, int t1)
{
    for (int b = t0 / BLOCK; t1 > t0 && b <= (t1 - 1) / BLOCK; b++) {
        int old = pm->blk[s][b];
        if (old >= 0 && pm->refs[old] == 1)
            continue;
        int page = pm->free_ids[--pm->n_free];
        pm->refs[page] = 1;
        if (old >= 0)
            pm->refs[old]--; /* shared, so never the last holder */
        pm->blk[s][b] = page;
    }
}

/* Returns the pages whose tokens all lie at or after keep. */
static void pm_drop(page_model *pm, int s, int keep)
{
    for (int b = (keep + BLOCK - 1) / BLOCK; b < MAX_BLOCKS; b++)
        if (pm->blk[s][b] >= 0) {
            pm_unref(pm, pm->blk[s][b]);
            pm->blk[s][b] = -1;
        }
}

static void pm_share(page_model *pm, int src, int dst)
{
    for (int b = 0; b < MAX_BLOCKS; b++) {
        pm->blk[dst][b] = pm->blk[src][b];
        if (pm->blk[src][b] >= 0)
            pm->refs[pm->blk[src][b]]++;
    }
}

static void pm_counts(const page_model *pm, int *used, int *shared)
{
    *used = *shared = 0;
    for (int p = 0; p < POOL; p++) {
        *used += pm->refs[p] > 0;
        *shared += pm->refs[p] > 1;
    }
}

/* ------------------------------------------------------------ the walk */

typedef struct {
    clkvq_cache *cache;
    clkvq_layer_config layers[N_LAYERS];
    int32_t *perm_k, *perm_v;
    float *mean_k, *mean_v;
    clkvq_ref_cache *model[N_LAYERS][N_SEQS];
    page_model pages[N_LAYERS];
    uint64_t rng;
    float *k, *v;             /* input staging, [HEADS][CAPACITY][DIM] */
    float *rk, *rv, *ck, *cv; /* read-back staging */
    cl_mem qm, om;
    float *q, *out;
    double *ref;
    size_t partials_max;      /* decode scratch after the warm-up */
    size_t xform_max[2];      /* append scratch of the transforming layer, the same */
    long step;
    /* what the walk did */
    long n_appends, n_tokens, n_oob, n_forks, n_truncs, n_frees, n_decodes, n_misuse;
    int peak_used, peak_shared;
} soak;

static const char *layer_name(int l)
{
    static const char *const names[N_LAYERS] = {"fp16", "token k4/q2 fp8 int-zero",
                                                "kivi k2/v2 R64", "skvq q2/t1.5 w16 s3 perm",
                                                "skvq k4/v2 channel keys w40 s5 rot mean"};
    return names[l];
}

static void make_layers(soak *sk)
{
    sk->layers[0] = clkvq_layer_config_default(CLKVQ_SCHEME_FP16);
    clkvq_layer_config *lc = &sk->layers[1];
    *lc = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    lc->format_v = CLKVQ_FMT_Q2;
    lc->param_type = CLKVQ_PARAM_FP8_E4M3;
    lc->zero_mode = CLKVQ_ZERO_INT;
    lc = &sk->layers[2];
    *lc = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    lc->format_k = lc->format_v = CLKVQ_FMT_Q2;
    lc->residual = 64;
    lc = &sk->layers[3];
    *lc = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    lc->format_k = CLKVQ_FMT_Q2;
    lc->format_v = CLKVQ_FMT_T15;
    lc->group_size = 32;
    lc->window = 16;
    lc->n_sink = 3;
    lc->clip_k = 0.9f;
    lc->clip_v = 0.95f;
    sk->perm_k = test_random_perm(71, HEADS, DIM);
    sk->perm_v = test_random_perm(72, HEADS, DIM);
    lc->perm_k = sk->perm_k;
    lc->perm_v = sk->perm_v;
    /* skvq with per-channel keys (blocks of the group, a partial one after
     * the sinks), rotated and centered rows */
    lc = &sk->layers[4];
    *lc = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    lc->format_v = CLKVQ_FMT_Q2;
    lc->group_size = 32;
    lc->window = 40;
    lc->n_sink = 5;
    lc->key_axis = CLKVQ_AXIS_CHANNEL;
    lc->rotate = 1;
    lc->rot_seed = 99;
    sk->mean_k = malloc(sizeof(float) * HEADS * DIM);
    sk->mean_v = malloc(sizeof(float) * HEADS * DIM);
    test_fill_normal(73, sk->mean_k, (size_t)HEADS * DIM, 1.0f);
    test_fill_normal(74, sk->mean_v, (size_t)HEADS * DIM, 0.5f);
    lc->mean_k = sk->mean_k;
    lc->mean_v = sk->mean_v;
}

static int len_of(const soak *sk, int l, int s) { return clkvq_ref_cache_length(sk->model[l][s]); }

static int max_len(const soak *sk, int s)
{
    int m = 0;
    for (int l = 0; l < N_LAYERS; l++)
        m = len_of(sk, l, s) > m ? len_of(sk, l, s) : m;
    return m;
}

static int min_len(const soak *sk, int s)
{
    int m = CAPACITY;
    for (int l = 0; l < N_LAYERS; l++)
        m = len_of(sk, l, s) < m ? len_of(sk, l, s) : m;
    return m;
}

static int pick(soak *sk, int n) { return (int)(test_uniform(&sk->rng) * n); }

static void fill_input(soak *sk, int n)
{
    uint64_t seed = sk->rng ^ ((uint64_t)sk->step << 20);
    size_t count = (size_t)HEADS * n * DIM;
    test_fill_normal(seed, sk->k, count, 1.0f);
    test_fill_normal(seed + 1, sk->v, count, 2.0f);
    /* a key outlier channel, x6 as in test_attention, whose data the
     * decode TOLERANCE is set for (with x20 the int-zero fp8 layer reached
     * 1.7e-5 once in 2,000 steps: fp32 rounding of s * (q.c - z * sum q)) */
    for (int h = 0; h < HEADS; h++)
        for (int t = 0; t < n; t++)
            sk->k[((size_t)h * n + t) * DIM + 9] *= 6.0f;
}

/* Read-back of (layer, seq) equals the model bit for bit. */
static void expect_contents(soak *sk, int l, int s, const char *when)
{
    int n = len_of(sk, l, s), got;
    ck_assert_int_eq(clkvq_cache_length(sk->cache, l, s, &got), CLKVQ_OK);
    ck_assert_msg(got == n, "step %ld %s: layer %d seq %d holds %d tokens, the model %d",
                  sk->step, when, l, s, got, n);
    if (n == 0)
        return;
    ck_assert_int_eq(clkvq_cache_read(sk->cache, l, s, sk->ck, sk->cv), CLKVQ_OK);
    clkvq_ref_cache_read(sk->model[l][s], sk->rk, sk->rv);
    size_t count = (size_t)HEADS * n * DIM;
    for (size_t i = 0; i < count; i++)
        ck_assert_msg(sk->ck[i] == sk->rk[i] && sk->cv[i] == sk->rv[i],
                      "step %ld %s: layer %d (%s) seq %d len %d: element %zu: k %.9g / model "
                      "%.9g, v %.9g / model %.9g",
                      sk->step, when, l, layer_name(l), s, n, i, (double)sk->ck[i],
                      (double)sk->rk[i], (double)sk->cv[i], (double)sk->rv[i]);
}

/* The library's pool of layer l equals the page model. */
static void expect_pool(soak *sk, int l, const char *when)
{
    clkvq_pool_stats ps;
    ck_assert_int_eq(clkvq_cache_pool_stats(sk->cache, l, &ps), CLKVQ_OK);
    int used, shared;
    pm_counts(&sk->pages[l], &used, &shared);
    ck_assert_msg(ps.n_blocks == POOL && ps.used_blocks + ps.free_blocks == ps.n_blocks,
                  "step %ld %s: layer %d: %d used + %d free of %d", sk->step, when, l,
                  ps.used_blocks, ps.free_blocks, ps.n_blocks);
    ck_assert_msg(ps.used_blocks == used && ps.shared_blocks == shared,
                  "step %ld %s: layer %d (%s): %d pages used, %d shared; the model says %d, %d",
                  sk->step, when, l, layer_name(l), ps.used_blocks, ps.shared_blocks, used,
                  shared);
    sk->peak_used = used > sk->peak_used ? used : sk->peak_used;
    sk->peak_shared = shared > sk->peak_shared ? shared : sk->peak_shared;
}

static void expect_pools(soak *sk, const char *when)
{
    for (int l = 0; l < N_LAYERS; l++)
        expect_pool(sk, l, when);
}

/* Appends n tokens to seq s of layer l; an append the pool cannot serve
 * must fail with OUT_OF_BLOCKS and leave everything as it was. */
static void do_append_layer(soak *sk, int l, int s, int n)
{
    clkvq_cache_layer *layer = &sk->cache->layers[l];
    int n_old = len_of(sk, l, s), t0, t1;
    clkvq_cache_page_writes(layer, n_old, n_old + n, &t0, &t1);
    int oob = pm_need(&sk->pages[l], s, t0, t1) > sk->pages[l].n_free;
    clkvq_status st = clkvq_cache_append(sk->cache, l, s, n, sk->k, sk->v);
    if (!oob) {
        ck_assert_msg(st == CLKVQ_OK, "step %ld: append %d to layer %d seq %d (len %d): %s",
                      sk->step, n, l, s, n_old, clkvq_last_error(test_ctx()));
        clkvq_ref_cache_append(sk->model[l][s], n, sk->k, sk->v);
        pm_write(&sk->pages[l], s, t0, t1);
        sk->n_appends++;
        sk->n_tokens += n;
        return;
    }
    ck_assert_msg(st == CLKVQ_ERR_OUT_OF_BLOCKS,
                  "step %ld: append %d to layer %d seq %d (len %d) needs more pages than the "
                  "%d free, yet returned %s",
                  sk->step, n, l, s, n_old, sk->pages[l].n_free, clkvq_status_string(st));
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(test_ctx()), "nothing was appended"));
    sk->n_oob++;
    expect_pool(sk, l, "after out of blocks");
    expect_contents(sk, l, s, "after out of blocks");
}

static void do_append(soak *sk, int s, int n)
{
    fill_input(sk, n);
    for (int l = 0; l < N_LAYERS; l++)
        do_append_layer(sk, l, s, n);
}

static void do_truncate(soak *sk, int s, int n)
{
    clkvq_status st = clkvq_cache_truncate(sk->cache, s, n);
    ck_assert_msg(st == CLKVQ_OK, "step %ld: truncate seq %d to %d: %s", sk->step, s, n,
                  clkvq_last_error(test_ctx()));
    for (int l = 0; l < N_LAYERS; l++) {
        clkvq_ref_cache_truncate(sk->model[l][s], n);
        pm_drop(&sk->pages[l], s, clkvq_cache_pages_kept(&sk->cache->layers[l], n));
    }
}

static void do_fork(soak *sk, int src, int dst)
{
    if (max_len(sk, dst) > 0) {
        /* a fork into a sequence that holds tokens is refused, unchanged */
        ck_assert_int_eq(clkvq_cache_fork(sk->cache, src, dst), CLKVQ_ERR_INVALID_ARG);
        expect_pools(sk, "after a refused fork");
        do_truncate(sk, dst, 0);
    }
    clkvq_status st = clkvq_cache_fork(sk->cache, src, dst);
    ck_assert_msg(st == CLKVQ_OK, "step %ld: fork %d -> %d: %s", sk->step, src, dst,
                  clkvq_last_error(test_ctx()));
    for (int l = 0; l < N_LAYERS; l++) {
        clkvq_ref_cache_copy(sk->model[l][dst], sk->model[l][src]);
        pm_share(&sk->pages[l], src, dst);
    }
    sk->n_forks++;
}

/* Decode of layer l: every sequence against fp64 attention over the
 * model's tokens (exactly what the cache holds), empty ones zeros. */
static void do_decode_layer(soak *sk, int l)
{
    clkvq_context *ctx = test_ctx();
    size_t qn = (size_t)N_SEQS * N_Q * DIM;
    test_fill_normal(sk->rng ^ (uint64_t)(sk->step * 31 + l), sk->q, qn, 1.0f);
    cl_command_queue queue = clkvq_context_cl_queue(ctx);
    ck_assert_int_eq(clEnqueueWriteBuffer(queue, sk->qm, CL_TRUE, 0, qn * 4, sk->q, 0, NULL,
                                          NULL),
                     CL_SUCCESS);
    const float scale = 0.125f;
    clkvq_status st = clkvq_cache_decode(sk->cache, l, sk->qm, sk->om, scale);
    ck_assert_msg(st == CLKVQ_OK, "step %ld: decode layer %d: %s", sk->step, l,
                  clkvq_last_error(ctx));
    ck_assert_int_eq(clEnqueueReadBuffer(queue, sk->om, CL_TRUE, 0, qn * 4, sk->out, 0, NULL,
                                         NULL),
                     CL_SUCCESS);
    for (int s = 0; s < N_SEQS; s++) {
        int n = len_of(sk, l, s);
        const float *q = sk->q + (size_t)s * N_Q * DIM, *o = sk->out + (size_t)s * N_Q * DIM;
        clkvq_ref_cache_read(sk->model[l][s], sk->rk, sk->rv);
        test_attention_reference(q, sk->rk, sk->rv, n, N_Q, QPK, DIM, scale, sk->ref);
        for (int h = 0; h < N_Q; h++) {
            double num = 0.0, den = 0.0;
            for (int c = 0; c < DIM; c++) {
                double r = sk->ref[h * DIM + c], x = o[h * DIM + c];
                num += (x - r) * (x - r);
                den += r * r;
            }
            double err = den > 0.0 ? sqrt(num / den) : sqrt(num);
            ck_assert_msg(n > 0 ? err <= TOLERANCE : num == 0.0,
                          "step %ld: decode layer %d (%s) seq %d len %d head %d: relative "
                          "error %.3g",
                          sk->step, l, layer_name(l), s, n, h, err);
        }
    }
    /* the scratch a decode keeps (queries, their sums, split-K partials)
     * and the appends' transform scratch stay what the warm-up allocated */
    if (sk->partials_max) {
        ck_assert_msg(sk->cache->partials_bytes == sk->partials_max,
                      "step %ld: decode scratch grew from %zu to %zu bytes", sk->step,
                      sk->partials_max, sk->cache->partials_bytes);
        for (int i = 0; i < 2; i++)
            ck_assert_msg(sk->cache->xform_bytes[i] == sk->xform_max[i],
                          "step %ld: transform scratch %d grew from %zu to %zu bytes", sk->step,
                          i, sk->xform_max[i], sk->cache->xform_bytes[i]);
    }
    ck_assert_uint_eq(sk->cache->q_scratch_bytes, qn * sizeof(float));
    sk->n_decodes++;
}

static void do_decode(soak *sk)
{
    for (int l = 0; l < N_LAYERS; l++)
        do_decode_layer(sk, l);
}

static void checkpoint(soak *sk, const char *when)
{
    for (int l = 0; l < N_LAYERS; l++)
        for (int s = 0; s < N_SEQS; s++)
            expect_contents(sk, l, s, when);
    expect_pools(sk, when);
    do_decode(sk);
}

/* Split-K chunks (attention.c's count): the most packed chunks and the most
 * fp16 chunks any sequence length up to the capacity needs in layer l. */
static void worst_lengths(const clkvq_cache_layer *layer, int chunk, int *n_packed, int *n_fp)
{
    int best_p = -1, best_f = -1;
    *n_packed = *n_fp = 0;
    for (int n = 0; n <= CAPACITY; n++) {
        int sink_end = clkvq_cache_n_sink_eff(layer, n);
        int qk = clkvq_cache_q_end(layer, 0, n);
        int p = layer->cfg.scheme == CLKVQ_SCHEME_FP16 || qk <= sink_end
                    ? 0
                    : (qk + chunk - 1) / chunk - sink_end / chunk;
        int f = (sink_end + (n - qk) + chunk - 1) / chunk;
        if (p > best_p) {
            best_p = p;
            *n_packed = n;
        }
        if (f > best_f) {
            best_f = f;
            *n_fp = n;
        }
    }
}

/* The largest append, then per layer two sequences at the lengths that
 * need the most packed and the most fp16 chunks, decoded, and everything
 * freed: the scratch must never grow after this. */
static void warm_up(soak *sk, int chunk)
{
    do_append(sk, 2, PREFILL_MAX);
    do_truncate(sk, 2, 0);
    for (int l = 0; l < N_LAYERS; l++) {
        int n_p, n_f;
        worst_lengths(&sk->cache->layers[l], chunk, &n_p, &n_f);
        int lens[2] = {n_p, n_f};
        for (int s = 0; s < 2; s++)
            for (int done = 0; done < lens[s];) {
                int n = lens[s] - done < PREFILL_MAX ? lens[s] - done : PREFILL_MAX;
                fill_input(sk, n);
                do_append_layer(sk, l, s, n);
                done += n;
            }
        do_decode_layer(sk, l);
        do_truncate(sk, 0, 0);
        do_truncate(sk, 1, 0);
    }
    sk->partials_max = sk->cache->partials_bytes;
    for (int i = 0; i < 2; i++)
        sk->xform_max[i] = sk->cache->xform_bytes[i];
    expect_pools(sk, "after the warm-up");
}

static void soak_init(soak *sk)
{
    memset(sk, 0, sizeof *sk);
    make_layers(sk);
    clkvq_cache_config cfg = {.n_layers = N_LAYERS, .n_seqs = N_SEQS, .capacity = CAPACITY,
                              .n_kv_heads = HEADS, .n_q_heads = N_Q, .head_dim = DIM,
                              .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
                              .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR, .layers = sk->layers,
                              .block_size = BLOCK, .n_blocks = POOL};
    clkvq_status st = clkvq_cache_create(test_ctx(), &cfg, &sk->cache);
    ck_assert_msg(st == CLKVQ_OK, "create: %s", clkvq_last_error(test_ctx()));
    for (int l = 0; l < N_LAYERS; l++) {
        pm_init(&sk->pages[l]);
        for (int s = 0; s < N_SEQS; s++)
            sk->model[l][s] = clkvq_ref_cache_create(&sk->layers[l], HEADS, DIM, CAPACITY);
    }
    size_t kv = (size_t)HEADS * CAPACITY * DIM, qn = (size_t)N_SEQS * N_Q * DIM;
    sk->k = calloc(kv, sizeof(float)); /* a refused oversized append uploads it all */
    sk->v = calloc(kv, sizeof(float));
    sk->rk = malloc(kv * sizeof(float));
    sk->rv = malloc(kv * sizeof(float));
    sk->ck = malloc(kv * sizeof(float));
    sk->cv = malloc(kv * sizeof(float));
    sk->q = malloc(qn * sizeof(float));
    sk->out = malloc(qn * sizeof(float));
    sk->ref = malloc((size_t)N_Q * DIM * sizeof(double));
    cl_int err;
    cl_context clc = clkvq_context_cl_context(test_ctx());
    sk->qm = clCreateBuffer(clc, CL_MEM_READ_WRITE, qn * 4, NULL, &err);
    ck_assert_int_eq(err, CL_SUCCESS);
    sk->om = clCreateBuffer(clc, CL_MEM_READ_WRITE, qn * 4, NULL, &err);
    ck_assert_int_eq(err, CL_SUCCESS);
    sk->rng = g_seed * 0x9E3779B97F4A7C15ULL + 17;
}

static void soak_free(soak *sk)
{
    for (int l = 0; l < N_LAYERS; l++)
        for (int s = 0; s < N_SEQS; s++)
            clkvq_ref_cache_free(sk->model[l][s]);
    clkvq_cache_release(sk->cache);
    clReleaseMemObject(sk->qm);
    clReleaseMemObject(sk->om);
    void *bufs[] = {sk->k, sk->v, sk->rk, sk->rv, sk->ck, sk->cv, sk->q, sk->out, sk->ref,
                    sk->perm_k, sk->perm_v, sk->mean_k, sk->mean_v};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
}

/* One random operation; weights lean on decode-style one-token appends, as
 * serving does, with enough prefill chunks to run the pool dry. */
static void random_step(soak *sk)
{
    int s = pick(sk, N_SEQS);
    double r = test_uniform(&sk->rng);
    if (r < 0.50) { /* a decode step's token */
        if (max_len(sk, s) < CAPACITY)
            do_append(sk, s, 1);
    } else if (r < 0.66) { /* a prefill chunk */
        int room = CAPACITY - max_len(sk, s);
        if (room > 0)
            do_append(sk, s, 1 + pick(sk, room < PREFILL_MAX ? room : PREFILL_MAX));
    } else if (r < 0.74) { /* fork s into another sequence */
        do_fork(sk, s, (s + 1 + pick(sk, N_SEQS - 1)) % N_SEQS);
    } else if (r < 0.84) { /* cut back (speculation rejected, a retry) */
        do_truncate(sk, s, pick(sk, min_len(sk, s) + 1));
        sk->n_truncs++;
    } else if (r < 0.89) { /* a request finishes */
        do_truncate(sk, s, 0);
        sk->n_frees++;
    } else if (r < 0.97) {
        do_decode(sk);
    } else { /* misuse is refused and changes nothing */
        ck_assert_int_eq(clkvq_cache_truncate(sk->cache, s, max_len(sk, s) + 1),
                         CLKVQ_ERR_INVALID_ARG);
        ck_assert_int_eq(clkvq_cache_fork(sk->cache, s, s), CLKVQ_ERR_INVALID_ARG);
        ck_assert_int_eq(clkvq_cache_append(sk->cache, 0, s, CAPACITY + 1 - len_of(sk, 0, s),
                                            sk->k, sk->v),
                         CLKVQ_ERR_INVALID_ARG);
        sk->n_misuse++;
    }
    expect_pools(sk, "after a step");
}

START_TEST(soak_paged_cache)
{
    soak sk;
    soak_init(&sk);
    clkvq_attn_tuning tuning;
    ck_assert_int_eq(clkvq_cache_get_tuning(sk.cache, &tuning), CLKVQ_OK);
    ck_assert_int_eq(clkvq_cache_set_tuning(sk.cache, &tuning), CLKVQ_OK); /* every layer alike */
    warm_up(&sk, tuning.chunk);
    for (sk.step = 1; sk.step <= g_steps; sk.step++) {
        random_step(&sk);
        if (sk.step % CHECK_EVERY == 0 || sk.step == g_steps)
            checkpoint(&sk, "at a checkpoint");
    }
    for (int s = 0; s < N_SEQS; s++)
        do_truncate(&sk, s, 0);
    for (int l = 0; l < N_LAYERS; l++) {
        clkvq_pool_stats ps;
        ck_assert_int_eq(clkvq_cache_pool_stats(sk.cache, l, &ps), CLKVQ_OK);
        ck_assert_msg(ps.used_blocks == 0 && ps.free_blocks == POOL,
                      "layer %d: %d pages still held with every sequence freed", l,
                      ps.used_blocks);
    }
    printf("soak: %ld steps, seed %llu: %ld appends (%ld tokens), %ld out of blocks, %ld forks, "
           "%ld truncations, %ld frees, %ld decodes, %ld refused misuses; at most %d pages "
           "used and %d shared in a layer of %d; decode scratch %zu bytes throughout\n",
           g_steps, (unsigned long long)g_seed, sk.n_appends, sk.n_tokens, sk.n_oob, sk.n_forks,
           sk.n_truncs, sk.n_frees, sk.n_decodes, sk.n_misuse, sk.peak_used, sk.peak_shared,
           POOL, sk.partials_max);
    /* a walk that never ran the pool dry or shared a page tested too little */
    if (g_steps >= 1000) {
        ck_assert_int_gt(sk.n_oob, 0);
        ck_assert_int_gt(sk.peak_shared, 0);
    }
    soak_free(&sk);
}
END_TEST

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        long v;
        if (!strcmp(argv[i], "--steps") && i + 1 < argc && cli_long(argv[i + 1], 1, 100000000L,
                                                                     &v) == 0) {
            g_steps = v;
            i++;
        } else if (!strcmp(argv[i], "--seed") && i + 1 < argc &&
                   cli_long(argv[i + 1], 0, 1L << 62, &v) == 0) {
            g_seed = (uint64_t)v;
            i++;
        } else {
            fprintf(stderr, "usage: %s [--steps N] [--seed S] (default %d steps, seed 1)\n",
                    argv[0], DEFAULT_STEPS);
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    Suite *s = suite_create("soak");
    TCase *tc = tcase_create("soak");
    tcase_set_timeout(tc, 86400); /* --steps decides; ctest has its own limit */
    tcase_add_test(tc, soak_paged_cache);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
