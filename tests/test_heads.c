/* Per-head bits (KVTuner's per-head configs): a layer whose kv heads carry
 * different (K, V) pairs, stored as one share per pair (lib/kv_shares.c).
 * Read-back against the plain-C model bit for bit through appends,
 * truncations and forks; decode against fp64 attention over the read-back;
 * a share against the uniform layer of its pair; refused appends that
 * leave every share as it was; the memory plan; configs with head formats
 * (KVTuner's per-head file included) building caches and tune shapes. */
#include "reference.h"
#include "reference_cache.h"
#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define HEADS 5
#define QPK 2
#define DIM 64
#define TOLERANCE 1e-5

/* Two shares, neither contiguous: heads {0, 2, 3} K4V2, {1, 4} K2V2.
 * (Few pairs: every pair is a program variant per kernel, and a cold
 * machine compiles each.) */
static const clkvq_format g_head_k[HEADS] = {CLKVQ_FMT_Q4, CLKVQ_FMT_Q2, CLKVQ_FMT_Q4,
                                             CLKVQ_FMT_Q4, CLKVQ_FMT_Q2};
static const clkvq_format g_head_v[HEADS] = {CLKVQ_FMT_Q2, CLKVQ_FMT_Q2, CLKVQ_FMT_Q2,
                                             CLKVQ_FMT_Q2, CLKVQ_FMT_Q2};

typedef struct {
    const char *name;
    clkvq_layer_config cfg;
} head_case;

static float g_means[2][HEADS * DIM];

/* The packing schemes with per-head bits (kivi, skvq with per-token and
 * per-channel keys); small windows so tokens leave them often. */
static int make_cases(head_case *cases, const int32_t *perm_k, const int32_t *perm_v)
{
    uint64_t rng = 31;
    for (int i = 0; i < HEADS * DIM; i++) {
        g_means[0][i] = (float)test_normal(&rng);
        g_means[1][i] = (float)(0.5 * test_normal(&rng));
    }
    int n = 0;
    cases[n].name = "kivi R32";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    cases[n++].cfg.residual = 32;
    cases[n].name = "skvq w16 s3 perm clip";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    cases[n].cfg.group_size = 32;
    cases[n].cfg.window = 16;
    cases[n].cfg.n_sink = 3;
    cases[n].cfg.clip_k = 0.9f;
    cases[n].cfg.perm_k = perm_k;
    cases[n++].cfg.perm_v = perm_v;
    cases[n].name = "skvq kc w16 s5 rot mean";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    cases[n].cfg.group_size = 32;
    cases[n].cfg.window = 16;
    cases[n].cfg.n_sink = 5;
    cases[n].cfg.key_axis = CLKVQ_AXIS_CHANNEL;
    cases[n].cfg.rotate = 1;
    cases[n].cfg.rot_seed = 99u;
    cases[n].cfg.mean_k = g_means[0];
    cases[n++].cfg.mean_v = g_means[1];
    for (int i = 0; i < n; i++) {
        cases[i].cfg.head_format_k = g_head_k;
        cases[i].cfg.head_format_v = g_head_v;
    }
    return n;
}

static clkvq_cache *make_cache(const clkvq_layer_config *lc, int n_seqs, int capacity,
                               int block_size)
{
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = n_seqs, .capacity = capacity,
                              .n_kv_heads = HEADS, .n_q_heads = HEADS * QPK, .head_dim = DIM,
                              .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
                              .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR, .layers = lc,
                              .block_size = block_size};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(test_ctx(), &cfg, &cache);
    ck_assert_msg(st == CLKVQ_OK, "create: %s", clkvq_last_error(test_ctx()));
    return cache;
}

static void fill_chunk(uint64_t seed, float *k, float *v, int n_tokens)
{
    size_t n = (size_t)HEADS * n_tokens * DIM;
    test_fill_normal(seed, k, n, 1.0f);
    test_fill_normal(seed + 1, v, n, 2.0f);
    for (int h = 0; h < HEADS; h++) /* a key outlier channel */
        for (int t = 0; t < n_tokens; t++)
            k[((size_t)h * n_tokens + t) * DIM + 5] *= 20.0f;
}

/* Random appends, truncations and forks over three sequences: the
 * read-back equals the model (each head quantized with its own pair). */
static void state_walk(int block_size)
{
    const int n_seqs = 3, capacity = 256;
    int32_t *perm_k = test_random_perm(3, HEADS, DIM), *perm_v = test_random_perm(4, HEADS, DIM);
    head_case cases[8];
    int n_cases = make_cases(cases, perm_k, perm_v);
    float *k = malloc(sizeof(float) * HEADS * capacity * DIM);
    float *v = malloc(sizeof(float) * HEADS * capacity * DIM);
    for (int ci = 0; ci < n_cases; ci++) {
        clkvq_cache *cache = make_cache(&cases[ci].cfg, n_seqs, capacity, block_size);
        clkvq_ref_cache *model[3];
        for (int s = 0; s < n_seqs; s++)
            model[s] = clkvq_ref_cache_create(&cases[ci].cfg, HEADS, DIM, capacity);
        uint64_t rng = 500 + (uint64_t)ci;
        for (int step = 0; step < 16; step++) {
            int s = (int)(test_uniform(&rng) * n_seqs);
            int len = clkvq_ref_cache_length(model[s]);
            double pick = test_uniform(&rng);
            if (pick > 0.9 && len > 0) {
                int d = (s + 1) % n_seqs;
                ck_assert_int_eq(clkvq_cache_truncate(cache, d, 0), CLKVQ_OK);
                clkvq_ref_cache_truncate(model[d], 0);
                ck_assert_int_eq(clkvq_cache_fork(cache, s, d), CLKVQ_OK);
                clkvq_ref_cache_copy(model[d], model[s]);
            } else if (pick < 0.15 && len > 0) {
                int to = (int)(test_uniform(&rng) * len);
                ck_assert_int_eq(clkvq_cache_truncate(cache, s, to), CLKVQ_OK);
                clkvq_ref_cache_truncate(model[s], to);
            } else {
                int n = pick < 0.55 ? 1 : 1 + (int)(test_uniform(&rng) * 70);
                if (len + n > capacity)
                    continue;
                fill_chunk(rng, k, v, n);
                clkvq_status st = clkvq_cache_append(cache, 0, s, n, k, v);
                ck_assert_msg(st == CLKVQ_OK, "%s: append: %s", cases[ci].name,
                              clkvq_last_error(test_ctx()));
                clkvq_ref_cache_append(model[s], n, k, v);
            }
            char label[128];
            snprintf(label, sizeof label, "%s block %d step %d", cases[ci].name, block_size,
                     step);
            test_expect_model(cache, model, n_seqs, HEADS, DIM, label);
        }
        for (int s = 0; s < n_seqs; s++) {
            ck_assert_int_eq(clkvq_cache_truncate(cache, s, 0), CLKVQ_OK);
            clkvq_ref_cache_free(model[s]);
        }
        clkvq_pool_stats ps;
        ck_assert_int_eq(clkvq_cache_pool_stats(cache, 0, &ps), CLKVQ_OK);
        if (block_size)
            ck_assert_int_eq(ps.used_blocks, 0);
        clkvq_cache_release(cache);
    }
    free(k);
    free(v);
    free(perm_k);
    free(perm_v);
}

START_TEST(state_matches_model)
{
    state_walk(0);
}
END_TEST

START_TEST(state_matches_model_paged)
{
    state_walk(32);
}
END_TEST

/* Appends n tokens to seq (a prefill chunk, then single tokens). */
static void fill_sequence(clkvq_cache *cache, int seq, int n, uint64_t seed)
{
    float *k = malloc(sizeof(float) * HEADS * (size_t)(n + 1) * DIM);
    float *v = malloc(sizeof(float) * HEADS * (size_t)(n + 1) * DIM);
    for (int done = 0; done < n;) {
        int step = n - done > 3 ? n - done - 3 : 1;
        fill_chunk(seed + (uint64_t)done, k, v, step);
        clkvq_status st = clkvq_cache_append(cache, 0, seq, step, k, v);
        ck_assert_msg(st == CLKVQ_OK, "append: %s", clkvq_last_error(test_ctx()));
        done += step;
    }
    free(k);
    free(v);
}

/* out = decode of nq queries per sequence (q [n_seqs][nq][HEADS*QPK][DIM]). */
static void run_decode(clkvq_cache *cache, int n_seqs, int nq, const float *q, float *out)
{
    clkvq_context *ctx = test_ctx();
    size_t bytes = sizeof(float) * n_seqs * nq * HEADS * QPK * DIM;
    cl_int err;
    cl_mem qm = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR, bytes,
                               (void *)q, &err);
    cl_mem om = clCreateBuffer(clkvq_context_cl_context(ctx), 0, bytes, NULL, &err);
    clkvq_status st = clkvq_cache_decode_multi(cache, 0, nq, qm, om, 0.125f);
    ck_assert_msg(st == CLKVQ_OK, "decode: %s", clkvq_last_error(ctx));
    clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), om, CL_TRUE, 0, bytes, out, 0, NULL, NULL);
    clReleaseMemObject(qm);
    clReleaseMemObject(om);
}

/* Worst relative error over (sequence, query, query head) of the decode
 * vs fp64 causal attention over the read-back. */
static double decode_error(clkvq_cache *cache, int n_seqs, const int *lengths, int nq)
{
    const int n_q = HEADS * QPK;
    size_t q_count = (size_t)n_seqs * nq * n_q * DIM;
    float *q = malloc(sizeof(float) * q_count), *out = malloc(sizeof(float) * q_count);
    test_fill_normal(4242, q, q_count, 1.0f);
    run_decode(cache, n_seqs, nq, q, out);
    double worst = test_decode_error(cache, n_seqs, lengths, HEADS, QPK, DIM, nq, q, out, 0.125f);
    free(q);
    free(out);
    return worst;
}

/* Both decode variants, one and three queries, two sequences of other
 * lengths, contiguous and paged: each share's launch writes its heads'
 * outputs and nothing else's. (The kernels themselves are test_attention's;
 * here kivi, and skvq with rotation and centering on the cooperative
 * variant: each combination is programs to compile on a cold machine.) */
START_TEST(decode_matches_reference)
{
    int32_t *perm_k = test_random_perm(5, HEADS, DIM), *perm_v = test_random_perm(6, HEADS, DIM);
    head_case cases[8];
    make_cases(cases, perm_k, perm_v);
    const int lengths[2] = {150, 37};
    for (int ci = 0; ci < 3; ci += 2)
        for (int variant = CLKVQ_ATTN_COOPERATIVE; variant <= (ci ? 1 : CLKVQ_ATTN_SERIAL);
             variant++) {
            clkvq_cache *cache = make_cache(&cases[ci].cfg, 2, 192, variant == 1 ? 0 : 64);
            clkvq_attn_tuning t = {0};
            t.variant = (clkvq_attn_variant)variant;
            ck_assert_int_eq(clkvq_cache_set_tuning(cache, &t), CLKVQ_OK);
            for (int s = 0; s < 2; s++)
                fill_sequence(cache, s, lengths[s], 71 + (uint64_t)s);
            for (int nq = 1; nq <= (ci || variant == CLKVQ_ATTN_SERIAL ? 1 : 3); nq += 2) {
                double err = decode_error(cache, 2, lengths, nq);
                ck_assert_msg(err <= TOLERANCE, "%s variant %d, %d queries: %.3g",
                              cases[ci].name, variant, nq, err);
            }
            clkvq_cache_release(cache);
        }
    free(perm_k);
    free(perm_v);
}
END_TEST

/* A share holds and decodes its heads exactly as a layer of its pair on
 * every head would (no rotation: its signs follow the head's index). */
START_TEST(share_matches_uniform_layer)
{
    head_case cases[8];
    make_cases(cases, NULL, NULL);
    const clkvq_layer_config *mixed = &cases[0].cfg; /* kivi */
    clkvq_cache *cache = make_cache(mixed, 1, 160, 0);
    fill_sequence(cache, 0, 133, 9);
    size_t kv = (size_t)HEADS * 133 * DIM, qn = (size_t)HEADS * QPK * DIM;
    float *k = malloc(kv * 4), *v = malloc(kv * 4), *uk = malloc(kv * 4), *uv = malloc(kv * 4);
    float *q = malloc(qn * 4), *out = malloc(qn * 4), *uout = malloc(qn * 4);
    test_fill_normal(17, q, qn, 1.0f);
    ck_assert_int_eq(clkvq_cache_read(cache, 0, 0, k, v), CLKVQ_OK);
    run_decode(cache, 1, 1, q, out);
    for (int h = 0; h < HEADS; h++) {
        clkvq_layer_config lc = *mixed;
        lc.head_format_k = lc.head_format_v = NULL;
        lc.format_k = g_head_k[h];
        lc.format_v = g_head_v[h];
        clkvq_cache *uniform = make_cache(&lc, 1, 160, 0);
        fill_sequence(uniform, 0, 133, 9);
        ck_assert_int_eq(clkvq_cache_read(uniform, 0, 0, uk, uv), CLKVQ_OK);
        size_t row = (size_t)133 * DIM;
        ck_assert_msg(!memcmp(k + h * row, uk + h * row, row * 4) &&
                          !memcmp(v + h * row, uv + h * row, row * 4),
                      "head %d: read-back differs from the uniform layer's", h);
        run_decode(uniform, 1, 1, q, uout);
        for (size_t i = (size_t)h * QPK * DIM; i < (size_t)(h + 1) * QPK * DIM; i++)
            ck_assert_msg(fabsf(out[i] - uout[i]) <= 1e-5f * (1.0f + fabsf(uout[i])),
                          "head %d output %zu: %g vs %g", h, i, (double)out[i], (double)uout[i]);
        clkvq_cache_release(uniform);
    }
    clkvq_cache_release(cache);
    free(k);
    free(v);
    free(uk);
    free(uv);
    free(q);
    free(out);
    free(uout);
}
END_TEST

/* A value that leaves the fp16 range only after centering, in a head of
 * the second share: refused before the first share writes anything. */
START_TEST(refused_append_changes_no_share)
{
    static float mean_k[HEADS * DIM];
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    lc.group_size = 32;
    lc.window = 8;
    lc.n_sink = 2;
    lc.head_format_k = g_head_k;
    lc.head_format_v = g_head_v;
    lc.mean_k = mean_k;
    mean_k[4 * DIM] = -60000.0f; /* head 4 (the second share), channel 0 */
    clkvq_cache *cache = make_cache(&lc, 1, 128, 0);
    fill_sequence(cache, 0, 40, 3);
    size_t kv = (size_t)HEADS * 40 * DIM;
    float *k0 = malloc(kv * 4), *v0 = malloc(kv * 4), *k1 = malloc(kv * 4), *v1 = malloc(kv * 4);
    ck_assert_int_eq(clkvq_cache_read(cache, 0, 0, k0, v0), CLKVQ_OK);
    float *k = malloc(sizeof(float) * HEADS * 20 * DIM), *v = malloc(sizeof(float) * HEADS * 20 * DIM);
    fill_chunk(8, k, v, 20);
    k[((size_t)4 * 20 + 7) * DIM] = 60000.0f; /* 120000 once centered */
    clkvq_status st = clkvq_cache_append(cache, 0, 0, 20, k, v);
    ck_assert_int_eq(st, CLKVQ_ERR_NONFINITE);
    ck_assert_msg(strstr(clkvq_last_error(test_ctx()), "nothing was appended"), "%s",
                  clkvq_last_error(test_ctx()));
    int n;
    ck_assert_int_eq(clkvq_cache_length(cache, 0, 0, &n), CLKVQ_OK);
    ck_assert_int_eq(n, 40);
    ck_assert_int_eq(clkvq_cache_read(cache, 0, 0, k1, v1), CLKVQ_OK);
    ck_assert(!memcmp(k0, k1, kv * 4) && !memcmp(v0, v1, kv * 4));
    /* NaN in the first share: the input check, before any share */
    fill_chunk(8, k, v, 20);
    v[((size_t)2 * 20 + 2) * DIM + 1] = NAN;
    ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 20, k, v), CLKVQ_ERR_NONFINITE);
    ck_assert_int_eq(clkvq_cache_read(cache, 0, 0, k1, v1), CLKVQ_OK);
    ck_assert(!memcmp(k0, k1, kv * 4) && !memcmp(v0, v1, kv * 4));
    /* and the layer still takes a good append */
    fill_chunk(8, k, v, 20);
    ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 20, k, v), CLKVQ_OK);
    clkvq_cache_release(cache);
    free(k0);
    free(v0);
    free(k1);
    free(v1);
    free(k);
    free(v);
}
END_TEST

/* The shares' packed bytes are the uniform layers' in proportion to their
 * heads; head formats on the fp16 scheme change nothing. */
START_TEST(plan_adds_up_the_shares)
{
    clkvq_context *ctx = test_ctx();
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    lc.head_format_k = g_head_k;
    lc.head_format_v = g_head_v;
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = 2, .capacity = 512,
                              .n_kv_heads = HEADS, .n_q_heads = HEADS * QPK, .head_dim = DIM,
                              .layers = &lc};
    clkvq_cache_memory mixed, one;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mixed), CLKVQ_OK);
    size_t expect = 0;
    for (int h = 0; h < HEADS; h++) {
        clkvq_layer_config u = lc;
        u.head_format_k = u.head_format_v = NULL;
        u.format_k = g_head_k[h];
        u.format_v = g_head_v[h];
        cfg.layers = &u;
        ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &one), CLKVQ_OK);
        ck_assert_uint_eq(one.quantized_bytes % HEADS, 0);
        expect += one.quantized_bytes / HEADS;
    }
    ck_assert_uint_eq(mixed.quantized_bytes, expect);
    clkvq_layer_config fp = clkvq_layer_config_default(CLKVQ_SCHEME_FP16), fph = fp;
    fph.head_format_k = g_head_k;
    cfg.layers = &fp;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &one), CLKVQ_OK);
    cfg.layers = &fph;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mixed), CLKVQ_OK);
    ck_assert_uint_eq(one.device_bytes, mixed.device_bytes);
}
END_TEST

START_TEST(bad_head_configs_are_refused)
{
    clkvq_context *ctx = test_ctx();
    int32_t *perm = test_random_perm(1, HEADS, DIM);
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    lc.group_size = 32;
    lc.head_format_k = g_head_k;
    lc.head_format_v = g_head_v;
    lc.rotate = 1;
    lc.perm_k = perm;
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = 1, .capacity = 64,
                              .n_kv_heads = HEADS, .n_q_heads = HEADS * QPK, .head_dim = DIM,
                              .layers = &lc};
    clkvq_cache *cache = NULL;
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_ERR_UNSUPPORTED);
    ck_assert(strstr(clkvq_last_error(ctx), "rotation signs"));
    ck_assert_ptr_null(cache);
    /* rotation alone, or perms alone, are fine */
    lc.perm_k = NULL;
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_OK);
    clkvq_cache_release(cache);
    clkvq_format bad[HEADS] = {CLKVQ_FMT_Q4, CLKVQ_FMT_Q4, (clkvq_format)77, CLKVQ_FMT_Q4,
                               CLKVQ_FMT_Q4};
    lc.rotate = 0;
    lc.head_format_k = bad;
    cache = NULL;
    ck_assert_int_ne(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_OK);
    ck_assert_ptr_null(cache);
    free(perm);
}
END_TEST

/* A config with per-head bits: built with head formats, saved and loaded
 * back, its tune shapes (one per share: pair and head count), and a cache
 * from it that decodes. */
START_TEST(config_with_head_formats)
{
    clkvq_context *ctx = test_ctx();
    clkvq_layer_config layers[2];
    layers[0] = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    layers[0].residual = 32;
    layers[0].head_format_k = g_head_k;
    layers[0].head_format_v = g_head_v;
    layers[1] = layers[0];
    layers[1].head_format_k = layers[1].head_format_v = NULL;
    layers[1].format_k = CLKVQ_FMT_Q2;
    layers[1].format_v = CLKVQ_FMT_Q2;
    clkvq_precision_config *cfg = NULL, *back = NULL;
    ck_assert_int_eq(clkvq_config_create(ctx, "heads-test", 2, layers, HEADS, DIM, &cfg),
                     CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_n_heads(cfg, 0), HEADS);
    ck_assert_int_eq(clkvq_config_n_heads(cfg, 1), 0);
    char path[] = "/tmp/clkvq-heads-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    close(fd);
    ck_assert_int_eq(clkvq_config_save(ctx, cfg, path), CLKVQ_OK);
    ck_assert_int_eq(clkvq_config_load(ctx, path, NULL, &back), CLKVQ_OK);
    remove(path);
    clkvq_layer_config got;
    ck_assert_int_eq(clkvq_config_layer(back, 0, &got), CLKVQ_OK);
    ck_assert_ptr_nonnull(got.head_format_k);
    for (int h = 0; h < HEADS; h++) {
        ck_assert_int_eq(got.head_format_k[h], g_head_k[h]);
        ck_assert_int_eq(got.head_format_v[h], g_head_v[h]);
    }
    ck_assert_int_eq(got.format_k, CLKVQ_FMT_Q4); /* the widest head */
    clkvq_model_geometry g = {2, HEADS * QPK, HEADS, DIM};
    clkvq_tune_shape shapes[8];
    int n = 0, head_shape[2 * HEADS], first[8];
    ck_assert_int_eq(clkvq_config_tune_shapes(ctx, back, &g, 256, 1, shapes, 8, &n, head_shape,
                                              first),
                     CLKVQ_OK);
    /* two shares of layer 0; layer 1 is the second's pair on every head */
    ck_assert_int_eq(n, 3);
    const int heads_of[3] = {3, 2, HEADS};
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(shapes[i].n_kv_heads, heads_of[i]);
        ck_assert_int_eq(shapes[i].n_q_heads, heads_of[i] * QPK);
    }
    const int expect[2 * HEADS] = {0, 1, 0, 0, 1, 2, 2, 2, 2, 2};
    for (int i = 0; i < 2 * HEADS; i++)
        ck_assert_int_eq(head_shape[i], expect[i]);
    ck_assert_int_eq(shapes[0].format_k, CLKVQ_FMT_Q4);
    ck_assert_int_eq(shapes[1].format_k, CLKVQ_FMT_Q2);
    ck_assert_int_eq(first[2], 1);

    clkvq_cache *cache = NULL;
    ck_assert_int_eq(clkvq_cache_create_from_config(ctx, back, 1, 96, HEADS, HEADS * QPK, DIM,
                                                    CLKVQ_LAYOUT_AUTO, CLKVQ_LAYOUT_AUTO, &cache),
                     CLKVQ_OK);
    fill_sequence(cache, 0, 70, 5);
    int lengths[1] = {70};
    double err = decode_error(cache, 1, lengths, 1);
    ck_assert_msg(err <= TOLERANCE, "config cache: %.3g", err);
    clkvq_cache_release(cache);
    /* another head count than the config's heads */
    ck_assert_int_eq(clkvq_cache_create_from_config(ctx, back, 1, 96, 4, 8, DIM,
                                                    CLKVQ_LAYOUT_AUTO, CLKVQ_LAYOUT_AUTO, &cache),
                     CLKVQ_ERR_INVALID_ARG);
    clkvq_config_free(cfg);
    clkvq_config_free(back);
}
END_TEST

/* KVTuner's per-head Llama-3-8B file (K8V4 on every head of every layer)
 * builds a cache at the model's geometry that decodes; the same layers with
 * every other head moved to K2V2 split every layer in two. */
START_TEST(kvtuner_per_head_file_decodes)
{
    clkvq_context *ctx = test_ctx();
    clkvq_model_geometry g;
    ck_assert_int_eq(clkvq_model_lookup("llama-3-8b", &g), CLKVQ_OK);
    clkvq_precision_config *cfg = NULL;
    clkvq_status st = clkvq_config_load_for_model(
        ctx, CLKVQ_PRESET_DIR "/meta-llama_Meta-Llama-3-8B-Instruct_k8_v4._per_head.yaml", NULL,
        &g, &cfg);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
    ck_assert_int_eq(clkvq_config_n_heads(cfg, 0), g.n_kv_heads);
    clkvq_layer_config *layers = calloc((size_t)g.n_layers, sizeof *layers);
    clkvq_format *half = malloc(sizeof(clkvq_format) * 2 * g.n_kv_heads);
    for (int h = 0; h < g.n_kv_heads; h++) {
        half[h] = h % 2 ? CLKVQ_FMT_Q2 : CLKVQ_FMT_Q8;
        half[g.n_kv_heads + h] = h % 2 ? CLKVQ_FMT_Q2 : CLKVQ_FMT_Q4;
    }
    for (int l = 0; l < g.n_layers; l++) {
        ck_assert_int_eq(clkvq_config_layer(cfg, l, &layers[l]), CLKVQ_OK);
        ck_assert_int_eq(layers[l].head_format_k[0], CLKVQ_FMT_Q8);
        ck_assert_int_eq(layers[l].head_format_v[0], CLKVQ_FMT_Q4);
    }
    for (int mixed = 0; mixed < 2; mixed++) {
        clkvq_cache *cache = NULL;
        if (!mixed) {
            st = clkvq_cache_create_from_config(ctx, cfg, 1, 48, g.n_kv_heads, g.n_q_heads,
                                                g.head_dim, CLKVQ_LAYOUT_AUTO, CLKVQ_LAYOUT_AUTO,
                                                &cache);
        } else {
            for (int l = 0; l < g.n_layers; l++)
            {
                layers[l].head_format_k = half;
                layers[l].head_format_v = half + g.n_kv_heads;
            }
            clkvq_cache_config cc = {.n_layers = g.n_layers, .n_seqs = 1, .capacity = 48,
                                     .n_kv_heads = g.n_kv_heads, .n_q_heads = g.n_q_heads,
                                     .head_dim = g.head_dim, .layers = layers};
            st = clkvq_cache_create(ctx, &cc, &cache);
        }
        ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
        const int layer_ids[2] = {0, g.n_layers - 1};
        size_t kv = (size_t)g.n_kv_heads * 40 * g.head_dim;
        size_t qn = (size_t)g.n_q_heads * g.head_dim;
        float *k = malloc(kv * 4), *v = malloc(kv * 4), *q = malloc(qn * 4), *o = malloc(qn * 4);
        double *ref = malloc(qn * sizeof(double));
        for (int i = 0; i < 2; i++) {
            int l = layer_ids[i];
            test_fill_normal(100 + (uint64_t)l, k, kv, 1.0f);
            test_fill_normal(200 + (uint64_t)l, v, kv, 1.0f);
            test_fill_normal(300 + (uint64_t)l, q, qn, 1.0f);
            ck_assert_int_eq(clkvq_cache_append(cache, l, 0, 40, k, v), CLKVQ_OK);
            st = clkvq_cache_decode_host(cache, l, q, o, 0.088f);
            ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(ctx));
            ck_assert_int_eq(clkvq_cache_read(cache, l, 0, k, v), CLKVQ_OK);
            clkvq_ref_attn_shape rs = {g.n_q_heads, g.n_kv_heads, g.head_dim, 40,
                                       (size_t)40 * g.head_dim, 1, (size_t)g.head_dim, 0.088f};
            clkvq_ref_attention(&rs, q, k, v, ref);
            double num = 0.0, den = 0.0;
            for (size_t j = 0; j < qn; j++) {
                num += (o[j] - ref[j]) * (o[j] - ref[j]);
                den += ref[j] * ref[j];
            }
            ck_assert_msg(sqrt(num / den) <= TOLERANCE, "%s layer %d: %.3g",
                          mixed ? "mixed" : "file", l, sqrt(num / den));
        }
        free(k);
        free(v);
        free(q);
        free(o);
        free(ref);
        clkvq_cache_release(cache);
    }
    free(half);
    free(layers);
    clkvq_config_free(cfg);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("heads");
    TCase *tc = tcase_create("heads");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, bad_head_configs_are_refused);
    tcase_add_test(tc, plan_adds_up_the_shares);
    tcase_add_test(tc, refused_append_changes_no_share);
    tcase_add_test(tc, share_matches_uniform_layer);
    tcase_add_test(tc, state_matches_model);
    tcase_add_test(tc, state_matches_model_paged);
    tcase_add_test(tc, decode_matches_reference);
    tcase_add_test(tc, config_with_head_formats);
    tcase_add_test(tc, kvtuner_per_head_file_decodes);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
