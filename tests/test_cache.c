/* KV cache state: appends, truncations and read-back against the plain-C
 * model (lib/reference_cache.c), failed appends, bad configs. */
#include "reference_cache.h"
#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define HEADS 2

typedef struct {
    const char *name;
    clkvq_layer_config cfg;
} scheme_case;

/* The schemes the state tests cycle through; small windows so that
 * transitions happen often. */
static int make_cases(scheme_case *cases, int dim, int32_t *perm_k, int32_t *perm_v)
{
    int n = 0;
    cases[n].name = "fp16";
    cases[n++].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_FP16);
    cases[n].name = "token q4/q2";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    cases[n++].cfg.format_v = CLKVQ_FMT_Q2;
    cases[n].name = "token q8/t1.5 fp8 int-zero";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    cases[n].cfg.format_k = CLKVQ_FMT_Q3;
    cases[n].cfg.format_v = CLKVQ_FMT_T15;
    cases[n].cfg.param_type = CLKVQ_PARAM_FP8_E4M3;
    cases[n++].cfg.zero_mode = CLKVQ_ZERO_INT;
    cases[n].name = "kivi q2/q2 R64";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    cases[n].cfg.format_k = cases[n].cfg.format_v = CLKVQ_FMT_Q2;
    cases[n++].cfg.residual = 64;
    cases[n].name = "skvq q2/t1.5 w16 s3 perm clip";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    cases[n].cfg.format_k = CLKVQ_FMT_Q2;
    cases[n].cfg.format_v = CLKVQ_FMT_T15;
    cases[n].cfg.group_size = dim % 64 == 0 ? 64 : 32;
    cases[n].cfg.window = 16;
    cases[n].cfg.n_sink = 3;
    cases[n].cfg.clip_k = 0.9f;
    cases[n].cfg.clip_v = 0.95f;
    cases[n].cfg.perm_k = perm_k;
    cases[n++].cfg.perm_v = perm_v;
    /* keys per channel inside SKVQ's window: the first block after the
     * sinks is partial */
    cases[n].name = "skvq kc q3/q2 fp8 w16 s5";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    cases[n].cfg.format_k = CLKVQ_FMT_Q3;
    cases[n].cfg.format_v = CLKVQ_FMT_Q2;
    cases[n].cfg.group_size = 32;
    cases[n].cfg.window = 16;
    cases[n].cfg.n_sink = 5;
    cases[n].cfg.param_type = CLKVQ_PARAM_FP8_E4M3;
    cases[n].cfg.clip_v = 0.7f;
    cases[n++].cfg.key_axis = CLKVQ_AXIS_CHANNEL;
    /* rotation and centering on top of the window, with a permutation */
    static float means[2][HEADS * 256];
    uint64_t rng = 77;
    for (int i = 0; i < HEADS * dim; i++) {
        means[0][i] = (float)test_normal(&rng);
        means[1][i] = (float)(0.5 * test_normal(&rng));
    }
    cases[n].name = "skvq q2/q2 w16 s3 rot mean perm";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    cases[n].cfg.format_k = cases[n].cfg.format_v = CLKVQ_FMT_Q2;
    cases[n].cfg.group_size = 32;
    cases[n].cfg.window = 16;
    cases[n].cfg.n_sink = 3;
    cases[n].cfg.rotate = 1;
    cases[n].cfg.rot_seed = 12345u;
    cases[n].cfg.mean_k = means[0];
    cases[n].cfg.mean_v = means[1];
    cases[n].cfg.perm_k = perm_k;
    cases[n++].cfg.perm_v = perm_v;
    cases[n].name = "kivi q4/t1.5 R32 rot";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    cases[n].cfg.format_v = CLKVQ_FMT_T15;
    cases[n].cfg.residual = 32;
    cases[n].cfg.rotate = 1;
    cases[n++].cfg.rot_seed = 7u;
    cases[n].name = "fp16 mean";
    cases[n].cfg = clkvq_layer_config_default(CLKVQ_SCHEME_FP16);
    cases[n++].cfg.mean_v = means[1];
    return n;
}

static clkvq_cache *make_paged_cache(const clkvq_layer_config *lc, int n_seqs, int capacity,
                                     int dim, clkvq_layout layout, int block_size, int n_blocks)
{
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = n_seqs, .capacity = capacity,
                              .n_kv_heads = HEADS, .n_q_heads = HEADS * 2, .head_dim = dim,
                              .layout_k = layout, .layout_v = layout, .layers = lc,
                              .block_size = block_size, .n_blocks = n_blocks};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(test_ctx(), &cfg, &cache);
    ck_assert_msg(st == CLKVQ_OK, "create: %s", clkvq_last_error(test_ctx()));
    return cache;
}

static clkvq_cache *make_cache(const clkvq_layer_config *lc, int n_seqs, int capacity, int dim,
                               clkvq_layout layout)
{
    return make_paged_cache(lc, n_seqs, capacity, dim, layout, 0, 0);
}

static void fill_chunk(uint64_t seed, float *k, float *v, int n_tokens, int dim)
{
    size_t n = (size_t)HEADS * n_tokens * dim;
    test_fill_normal(seed, k, n, 1.0f);
    test_fill_normal(seed + 1, v, n, 2.0f);
    for (int h = 0; h < HEADS; h++) /* key outlier channel */
        for (int t = 0; t < n_tokens; t++)
            k[((size_t)h * n_tokens + t) * dim + 5] *= 20.0f;
}

static void snapshot_seq(clkvq_cache *cache, int seq, float *k, float *v, int *len)
{
    ck_assert_int_eq(clkvq_cache_length(cache, 0, seq, len), CLKVQ_OK);
    ck_assert_int_eq(clkvq_cache_read(cache, 0, seq, k, v), CLKVQ_OK);
}

static void snapshot(clkvq_cache *cache, int dim, float *k, float *v, int *len)
{
    ck_assert_int_eq(clkvq_cache_length(cache, 0, 0, len), CLKVQ_OK);
    ck_assert_int_eq(clkvq_cache_read(cache, 0, 0, k, v), CLKVQ_OK);
    (void)dim;
}

/* Random appends (prefill chunks and single decode tokens), truncations
 * and forks over three sequences, for every scheme and both layouts, in
 * the contiguous cache (block_size 0) or in pages. Paged: the pool ends
 * empty once every sequence is cleared. */
static void run_state_test_paged(int dim, clkvq_layout layout, int block_size)
{
    const int n_seqs = 3, capacity = 300;
    int32_t *perm_k = test_random_perm(3, HEADS, dim), *perm_v = test_random_perm(4, HEADS, dim);
    scheme_case cases[12];
    int n_cases = make_cases(cases, dim, perm_k, perm_v);
    float *k = malloc(sizeof(float) * HEADS * capacity * dim);
    float *v = malloc(sizeof(float) * HEADS * capacity * dim);
    for (int ci = 0; ci < n_cases; ci++) {
        clkvq_cache *cache =
            make_paged_cache(&cases[ci].cfg, n_seqs, capacity, dim, layout, block_size, 0);
        clkvq_ref_cache *model[3];
        for (int s = 0; s < n_seqs; s++)
            model[s] = clkvq_ref_cache_create(&cases[ci].cfg, HEADS, dim, capacity);
        uint64_t rng = 1000 + (uint64_t)ci;
        for (int step = 0; step < 24; step++) {
            int s = (int)(test_uniform(&rng) * n_seqs);
            int len = clkvq_ref_cache_length(model[s]);
            double pick = test_uniform(&rng);
            if (pick > 0.94 && len > 0) {
                /* fork s into another sequence, cleared first */
                int d = (s + 1 + (int)(test_uniform(&rng) * (n_seqs - 1))) % n_seqs;
                ck_assert_int_eq(clkvq_cache_truncate(cache, d, 0), CLKVQ_OK);
                clkvq_ref_cache_truncate(model[d], 0);
                clkvq_status st = clkvq_cache_fork(cache, s, d);
                ck_assert_msg(st == CLKVQ_OK, "%s: fork: %s", cases[ci].name,
                              clkvq_last_error(test_ctx()));
                clkvq_ref_cache_copy(model[d], model[s]);
            } else if (pick < 0.12 && len > 0) {
                int to = (int)(test_uniform(&rng) * len);
                ck_assert_int_eq(clkvq_cache_truncate(cache, s, to), CLKVQ_OK);
                clkvq_ref_cache_truncate(model[s], to);
            } else {
                int n = pick < 0.6 ? 1 : 1 + (int)(test_uniform(&rng) * 90);
                if (len + n > capacity)
                    continue;
                fill_chunk(rng, k, v, n, dim);
                clkvq_status st = clkvq_cache_append(cache, 0, s, n, k, v);
                ck_assert_msg(st == CLKVQ_OK, "%s: append: %s", cases[ci].name,
                              clkvq_last_error(test_ctx()));
                clkvq_ref_cache_append(model[s], n, k, v);
            }
            char label[128];
            snprintf(label, sizeof label, "%s d=%d layout=%d step %d", cases[ci].name, dim,
                     (int)layout, step);
            test_expect_model(cache, model, n_seqs, HEADS, dim, label);
        }
        clkvq_pool_stats ps;
        ck_assert_int_eq(clkvq_cache_pool_stats(cache, 0, &ps), CLKVQ_OK);
        ck_assert_int_eq(ps.used_blocks + ps.free_blocks, ps.n_blocks);
        for (int s = 0; s < n_seqs; s++) {
            ck_assert_int_eq(clkvq_cache_truncate(cache, s, 0), CLKVQ_OK);
            clkvq_ref_cache_free(model[s]);
        }
        ck_assert_int_eq(clkvq_cache_pool_stats(cache, 0, &ps), CLKVQ_OK);
        if (block_size)
            ck_assert_msg(ps.used_blocks == 0 && ps.shared_blocks == 0,
                          "%s: %d pages (%d shared) still held with every sequence empty",
                          cases[ci].name, ps.used_blocks, ps.shared_blocks);
        clkvq_cache_release(cache);
    }
    free(k);
    free(v);
    free(perm_k);
    free(perm_v);
}

static void run_state_test(int dim, clkvq_layout layout)
{
    run_state_test_paged(dim, layout, 0);
}

START_TEST(state_matches_model_token_major)
{
    run_state_test(64, CLKVQ_LAYOUT_TOKEN_MAJOR);
    run_state_test(96, CLKVQ_LAYOUT_TOKEN_MAJOR);
}
END_TEST

START_TEST(state_matches_model_group_planar)
{
    run_state_test(128, CLKVQ_LAYOUT_GROUP_PLANAR);
}
END_TEST

/* The same random walk in pages of 32 and 64 tokens (both layouts): pages
 * come and go, forks share them, copy-on-write keeps sequences apart. */
START_TEST(state_matches_model_paged)
{
    run_state_test_paged(64, CLKVQ_LAYOUT_GROUP_PLANAR, 64);
    run_state_test_paged(64, CLKVQ_LAYOUT_TOKEN_MAJOR, 32);
}
END_TEST

/* A fork shares every page; the first append to either side copies only
 * the page it writes, and the other side reads what it had. */
START_TEST(fork_shares_pages_until_written)
{
    const int dim = 64, capacity = 256, block = 32;
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    clkvq_cache *cache =
        make_paged_cache(&lc, 2, capacity, dim, CLKVQ_LAYOUT_GROUP_PLANAR, block, 0);
    clkvq_ref_cache *model[2] = {clkvq_ref_cache_create(&lc, HEADS, dim, capacity),
                                 clkvq_ref_cache_create(&lc, HEADS, dim, capacity)};
    size_t big = (size_t)HEADS * capacity * dim;
    float *k = malloc(big * sizeof(float)), *v = malloc(big * sizeof(float));
    fill_chunk(21, k, v, 100, dim); /* 100 tokens: 4 pages, the last partial */
    ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 100, k, v), CLKVQ_OK);
    clkvq_ref_cache_append(model[0], 100, k, v);
    ck_assert_int_eq(clkvq_cache_fork(cache, 0, 1), CLKVQ_OK);
    clkvq_ref_cache_copy(model[1], model[0]);
    clkvq_pool_stats ps;
    ck_assert_int_eq(clkvq_cache_pool_stats(cache, 0, &ps), CLKVQ_OK);
    ck_assert_int_eq(ps.used_blocks, 4);
    ck_assert_int_eq(ps.shared_blocks, 4);
    ck_assert_int_eq(ps.block_size, block);
    test_expect_model(cache, model, 2, HEADS, dim, "after fork");

    fill_chunk(22, k, v, 1, dim);
    ck_assert_int_eq(clkvq_cache_append(cache, 0, 1, 1, k, v), CLKVQ_OK);
    clkvq_ref_cache_append(model[1], 1, k, v);
    ck_assert_int_eq(clkvq_cache_pool_stats(cache, 0, &ps), CLKVQ_OK);
    ck_assert_int_eq(ps.used_blocks, 5); /* the partial page was copied */
    ck_assert_int_eq(ps.shared_blocks, 3);
    fill_chunk(23, k, v, 40, dim);
    ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 40, k, v), CLKVQ_OK);
    clkvq_ref_cache_append(model[0], 40, k, v);
    test_expect_model(cache, model, 2, HEADS, dim, "after appends to both sides");
    /* the copy of a fork is independent of its source's later truncation */
    ck_assert_int_eq(clkvq_cache_truncate(cache, 0, 10), CLKVQ_OK);
    clkvq_ref_cache_truncate(model[0], 10);
    test_expect_model(cache, model, 2, HEADS, dim, "after truncating the source");
    ck_assert_int_eq(clkvq_cache_fork(cache, 0, 1), CLKVQ_ERR_INVALID_ARG); /* not empty */
    ck_assert_int_eq(clkvq_cache_fork(cache, 0, 0), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_fork(cache, 0, 2), CLKVQ_ERR_INVALID_ARG);
    for (int s = 0; s < 2; s++)
        clkvq_ref_cache_free(model[s]);
    clkvq_cache_release(cache);
    free(k);
    free(v);
}
END_TEST

/* Out of pages: a clear error, and the cache exactly as before. */
START_TEST(out_of_blocks_changes_nothing)
{
    const int dim = 64, capacity = 512, block = 64;
    scheme_case cases[12];
    int32_t *perm = test_random_perm(2, HEADS, dim);
    int n_cases = make_cases(cases, dim, perm, perm);
    size_t big = (size_t)HEADS * capacity * dim;
    float *k = malloc(big * sizeof(float)), *v = malloc(big * sizeof(float));
    float *k0 = malloc(big * sizeof(float)), *v0 = malloc(big * sizeof(float));
    float *k1 = malloc(big * sizeof(float)), *v1 = malloc(big * sizeof(float));
    for (int ci = 0; ci < n_cases; ci++) {
        clkvq_context *ctx = test_ctx();
        /* 3 pages of 64 tokens for two sequences */
        clkvq_cache *cache =
            make_paged_cache(&cases[ci].cfg, 2, capacity, dim, CLKVQ_LAYOUT_GROUP_PLANAR, block, 3);
        fill_chunk(5, k, v, 150, dim);
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 150, k, v), CLKVQ_OK);
        int len0, len1;
        clkvq_pool_stats before, after;
        ck_assert_int_eq(clkvq_cache_pool_stats(cache, 0, &before), CLKVQ_OK);
        snapshot(cache, dim, k0, v0, &len0);
        fill_chunk(6, k, v, 250, dim);
        clkvq_status st = clkvq_cache_append(cache, 0, 0, 250, k, v);
        if (st == CLKVQ_OK) /* schemes that keep these tokens in fp16 need no page */
            ck_assert_int_eq(cases[ci].cfg.scheme, CLKVQ_SCHEME_SKVQ);
        else {
            ck_assert_int_eq(st, CLKVQ_ERR_OUT_OF_BLOCKS);
            ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "free"));
            snapshot(cache, dim, k1, v1, &len1);
            ck_assert_int_eq(len1, len0);
            ck_assert(memcmp(k0, k1, sizeof(float) * HEADS * len0 * dim) == 0);
            ck_assert(memcmp(v0, v1, sizeof(float) * HEADS * len0 * dim) == 0);
            ck_assert_int_eq(clkvq_cache_pool_stats(cache, 0, &after), CLKVQ_OK);
            ck_assert_int_eq(after.used_blocks, before.used_blocks);
            /* the other sequence cannot take more than what is left either */
            st = clkvq_cache_append(cache, 0, 1, 250, k, v);
            ck_assert_int_eq(st, CLKVQ_ERR_OUT_OF_BLOCKS);
        }
        clkvq_cache_release(cache);
    }
    free(k);
    free(v);
    free(k0);
    free(v0);
    free(k1);
    free(v1);
    free(perm);
}
END_TEST

/* The runtime's own block manager: its table (pages in a scrambled order)
 * gives exactly the library-managed cache's read-back and decode; a bad
 * page id is refused before anything is written. */
START_TEST(runtime_tables_match_library_pages)
{
    clkvq_context *ctx = test_ctx();
    const int dim = 64, capacity = 256, block = 32, n_seqs = 2;
    const int max_blocks = capacity / block, n_pages = n_seqs * max_blocks;
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    lc.residual = 32;
    clkvq_cache *own = make_paged_cache(&lc, n_seqs, capacity, dim, CLKVQ_LAYOUT_GROUP_PLANAR,
                                        block, 0);
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = n_seqs, .capacity = capacity,
                              .n_kv_heads = HEADS, .n_q_heads = HEADS * 2, .head_dim = dim,
                              .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
                              .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR, .layers = &lc,
                              .block_size = block, .runtime_tables = 1};
    clkvq_cache *rt = NULL;
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &rt), CLKVQ_OK);
    int table[16];
    for (int i = 0; i < n_pages; i++)
        table[i] = (i * 7 + 3) % n_pages; /* a permutation of the pool */
    cl_int err;
    cl_mem tmem = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR,
                                 sizeof table, table, &err);
    ck_assert_int_eq(err, CL_SUCCESS);
    size_t big = (size_t)HEADS * capacity * dim;
    float *k = malloc(big * sizeof(float)), *v = malloc(big * sizeof(float));
    float *ka = malloc(big * sizeof(float)), *va = malloc(big * sizeof(float));
    float *kb = malloc(big * sizeof(float)), *vb = malloc(big * sizeof(float));
    cl_mem km = clCreateBuffer(clkvq_context_cl_context(ctx), 0, big * 4, NULL, &err);
    cl_mem vm = clCreateBuffer(clkvq_context_cl_context(ctx), 0, big * 4, NULL, &err);
    ck_assert_int_eq(clkvq_cache_append_mem(rt, 0, 0, 1, km, vm), CLKVQ_ERR_INVALID_ARG);
    const int chunks[] = {70, 1, 1, 57, 33};
    for (int i = 0; i < 5; i++) {
        int s = i % n_seqs;
        fill_chunk(40 + (uint64_t)i, k, v, chunks[i], dim);
        ck_assert_int_eq(clkvq_cache_append(own, 0, s, chunks[i], k, v), CLKVQ_OK);
        size_t bytes = (size_t)HEADS * chunks[i] * dim * sizeof(float);
        clEnqueueWriteBuffer(clkvq_context_cl_queue(ctx), km, CL_TRUE, 0, bytes, k, 0, NULL, NULL);
        clEnqueueWriteBuffer(clkvq_context_cl_queue(ctx), vm, CL_TRUE, 0, bytes, v, 0, NULL, NULL);
        clkvq_status st = clkvq_cache_append_paged(rt, 0, s, chunks[i], km, vm, tmem, max_blocks);
        ck_assert_msg(st == CLKVQ_OK, "append_paged: %s", clkvq_last_error(ctx));
    }
    for (int s = 0; s < n_seqs; s++) {
        int la, lb;
        snapshot_seq(own, s, ka, va, &la);
        snapshot_seq(rt, s, kb, vb, &lb);
        ck_assert_int_eq(la, lb);
        ck_assert(memcmp(ka, kb, sizeof(float) * HEADS * la * dim) == 0);
        ck_assert(memcmp(va, vb, sizeof(float) * HEADS * la * dim) == 0);
    }
    size_t qn = (size_t)n_seqs * HEADS * 2 * dim;
    float *q = malloc(qn * sizeof(float)), *oa = malloc(qn * sizeof(float));
    float *ob = malloc(qn * sizeof(float));
    test_fill_normal(9, q, qn, 1.0f);
    ck_assert_int_eq(clkvq_cache_decode_host(own, 0, q, oa, 0.125f), CLKVQ_OK);
    cl_mem qm = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR, qn * 4, q, &err);
    cl_mem om = clCreateBuffer(clkvq_context_cl_context(ctx), 0, qn * 4, NULL, &err);
    ck_assert_int_eq(clkvq_cache_decode(rt, 0, qm, om, 0.125f), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_decode_paged(rt, 0, 1, qm, om, 0.125f, tmem, max_blocks),
                     CLKVQ_OK);
    clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), om, CL_TRUE, 0, qn * 4, ob, 0, NULL, NULL);
    ck_assert(memcmp(oa, ob, qn * sizeof(float)) == 0);

    /* a page id outside the pool: refused, nothing written */
    int la, lb;
    snapshot_seq(rt, 1, ka, va, &la);
    table[max_blocks + 2] = n_pages + 5;
    clEnqueueWriteBuffer(clkvq_context_cl_queue(ctx), tmem, CL_TRUE, 0, sizeof table, table, 0,
                         NULL, NULL);
    ck_assert_int_eq(clkvq_cache_append_paged(rt, 0, 1, 40, km, vm, tmem, max_blocks),
                     CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "not a page"));
    snapshot_seq(rt, 1, kb, vb, &lb);
    ck_assert_int_eq(la, lb);
    ck_assert(memcmp(ka, kb, sizeof(float) * HEADS * la * dim) == 0);
    ck_assert_int_eq(clkvq_cache_append_paged(rt, 0, 1, 1, km, vm, tmem, 1),
                     CLKVQ_ERR_INVALID_ARG); /* a table too narrow for the capacity */
    /* copy-on-write pages of the runtime: contents move */
    int src = table[0], dst = table[max_blocks + 7];
    ck_assert_int_eq(clkvq_cache_copy_blocks(rt, &src, &dst, 1), CLKVQ_OK);
    ck_assert_int_eq(clkvq_cache_copy_blocks(rt, &src, &src, 1), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_cache_copy_blocks(own, &src, &dst, 1), CLKVQ_ERR_INVALID_ARG);
    clkvq_pool_stats ps;
    ck_assert_int_eq(clkvq_cache_pool_stats(rt, 0, &ps), CLKVQ_OK);
    ck_assert_int_eq(ps.used_blocks, -1);
    ck_assert_int_eq(ps.n_blocks, n_pages);
    clReleaseMemObject(qm);
    clReleaseMemObject(om);
    clReleaseMemObject(km);
    clReleaseMemObject(vm);
    clReleaseMemObject(tmem);
    clkvq_cache_release(own);
    clkvq_cache_release(rt);
    free(q);
    free(oa);
    free(ob);
    free(k);
    free(v);
    free(ka);
    free(va);
    free(kb);
    free(vb);
}
END_TEST

/* Decode-style appends one token at a time cross every window boundary. */
START_TEST(window_transitions_one_token_at_a_time)
{
    const int dim = 64, capacity = 200;
    scheme_case cases[12];
    int32_t *perm = test_random_perm(9, HEADS, dim);
    int n_cases = make_cases(cases, dim, perm, perm);
    float k[HEADS * 64], v[HEADS * 64];
    for (int ci = 1; ci < n_cases; ci++) {
        clkvq_cache *cache = make_cache(&cases[ci].cfg, 1, capacity, dim, CLKVQ_LAYOUT_GROUP_PLANAR);
        clkvq_ref_cache *model[1] = {clkvq_ref_cache_create(&cases[ci].cfg, HEADS, dim, capacity)};
        for (int t = 0; t < 150; t++) {
            fill_chunk(77 + (uint64_t)t, k, v, 1, dim);
            ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 1, k, v), CLKVQ_OK);
            clkvq_ref_cache_append(model[0], 1, k, v);
            if (t % 7 == 0 || t > 125)
                test_expect_model(cache, model, 1, HEADS, dim, cases[ci].name);
        }
        clkvq_ref_cache_free(model[0]);
        clkvq_cache_release(cache);
    }
    free(perm);
}
END_TEST

/* A failed append leaves the cache exactly as it was. */
START_TEST(failed_appends_change_nothing)
{
    const int dim = 64, capacity = 100;
    scheme_case cases[12];
    int32_t *perm = test_random_perm(2, HEADS, dim);
    int n_cases = make_cases(cases, dim, perm, perm);
    size_t big = (size_t)HEADS * capacity * dim;
    float *k = malloc(big * sizeof(float)), *v = malloc(big * sizeof(float));
    float *k0 = malloc(big * sizeof(float)), *v0 = malloc(big * sizeof(float));
    float *k1 = malloc(big * sizeof(float)), *v1 = malloc(big * sizeof(float));
    for (int ci = 0; ci < n_cases; ci++) {
        clkvq_context *ctx = test_ctx();
        clkvq_cache *cache = make_cache(&cases[ci].cfg, 1, capacity, dim, CLKVQ_LAYOUT_TOKEN_MAJOR);
        fill_chunk(5, k, v, 70, dim);
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 70, k, v), CLKVQ_OK);
        int len0, len1;
        snapshot(cache, dim, k0, v0, &len0);

        fill_chunk(6, k, v, 31, dim); /* one token too many */
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 31, k, v), CLKVQ_ERR_INVALID_ARG);
        ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "capacity"));
        fill_chunk(6, k, v, 20, dim);
        v[HEADS * 20 * dim - 3] = NAN;
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 20, k, v), CLKVQ_ERR_NONFINITE);
        ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "v:"));
        v[HEADS * 20 * dim - 3] = 0.0f;
        k[17] = INFINITY;
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 20, k, v), CLKVQ_ERR_NONFINITE);
        k[17] = 1e6f; /* beyond fp16 */
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 20, k, v), CLKVQ_ERR_NONFINITE);
        /* the same from device buffers: checked on the device, K and V with
         * one wait, the failing tensor named */
        for (int bad_v = 0; bad_v < 2; bad_v++) {
            float saved = v[HEADS * 20 * dim - 1];
            if (bad_v) {
                k[17] = 0.0f;
                v[HEADS * 20 * dim - 1] = -INFINITY;
            }
            cl_int err;
            size_t bytes = sizeof(float) * HEADS * 20 * dim;
            cl_mem km = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR, bytes,
                                       k, &err);
            cl_mem vm = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR, bytes,
                                       v, &err);
            ck_assert_int_eq(clkvq_cache_append_mem(cache, 0, 0, 20, km, vm),
                             CLKVQ_ERR_NONFINITE);
            ck_assert_ptr_nonnull(
                strstr(clkvq_last_error(ctx), bad_v ? "v: input element" : "k: input element"));
            clReleaseMemObject(km);
            clReleaseMemObject(vm);
            v[HEADS * 20 * dim - 1] = saved;
        }
        k[17] = 1e6f;
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 0, k, v), CLKVQ_ERR_INVALID_ARG);
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 0, 5, NULL, v), CLKVQ_ERR_INVALID_ARG);
        ck_assert_int_eq(clkvq_cache_append(cache, 1, 0, 5, k, v), CLKVQ_ERR_INVALID_ARG);
        ck_assert_int_eq(clkvq_cache_append(cache, 0, 1, 5, k, v), CLKVQ_ERR_INVALID_ARG);
        cl_int err;
        cl_mem small = clCreateBuffer(clkvq_context_cl_context(ctx), 0, 64, NULL, &err);
        ck_assert_int_eq(clkvq_cache_append_mem(cache, 0, 0, 5, small, small),
                         CLKVQ_ERR_BUFFER_TOO_SMALL);
        clReleaseMemObject(small);
        ck_assert_int_eq(clkvq_cache_truncate(cache, 0, 71), CLKVQ_ERR_INVALID_ARG);

        snapshot(cache, dim, k1, v1, &len1);
        ck_assert_int_eq(len1, len0);
        ck_assert(memcmp(k0, k1, sizeof(float) * HEADS * len0 * dim) == 0);
        ck_assert(memcmp(v0, v1, sizeof(float) * HEADS * len0 * dim) == 0);
        clkvq_cache_release(cache);
    }
    free(k);
    free(v);
    free(k0);
    free(v0);
    free(k1);
    free(v1);
    free(perm);
}
END_TEST

START_TEST(bad_configs_are_reported)
{
    clkvq_context *ctx = test_ctx();
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = 1, .capacity = 256, .n_kv_heads = 2,
                              .n_q_heads = 4, .head_dim = 64,
                              .layout_k = CLKVQ_LAYOUT_TOKEN_MAJOR,
                              .layout_v = CLKVQ_LAYOUT_TOKEN_MAJOR, .layers = &lc};
    clkvq_cache *cache = NULL;
    clkvq_cache_memory mem;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_OK);
    ck_assert_uint_gt(mem.device_bytes, 0);
    lc.residual = 48; /* not a multiple of the group */
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "residual"));
    ck_assert_ptr_null(cache);
    lc = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    lc.window = 8; /* a window is an skvq setting */
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_ERR_INVALID_ARG);
    lc = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    lc.format_v = (clkvq_format)42;
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_ERR_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "layer 0 V"));
    lc = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    cfg.n_q_heads = 3;
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_ERR_INVALID_ARG);
    cfg.n_q_heads = 4;
    int32_t perm[2 * 64];
    for (int i = 0; i < 128; i++)
        perm[i] = i % 64;
    perm[70] = 3;
    lc.perm_k = perm;
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "perm_k"));
    lc.perm_k = NULL;
    cfg.capacity = 1 << 30; /* far beyond this device */
    ck_assert_int_eq(clkvq_cache_create(ctx, &cfg, &cache), CLKVQ_ERR_DEVICE_LIMIT);
    /* memory is reported before allocating: 4-bit + fp16 per 32 = 5 bits */
    cfg.capacity = 1024;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_OK);
    ck_assert_double_eq_tol(8.0 * mem.quantized_bytes / (2.0 * 1024 * 2 * 64), 5.0, 1e-9);
    /* pages: multiples of 16 and of per-channel key groups */
    cfg.block_size = 40;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "multiple of 16"));
    lc = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    lc.group_size = 64;
    lc.key_axis = CLKVQ_AXIS_CHANNEL;
    cfg.block_size = 32;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "per-channel keys"));
    cfg.block_size = 0;
    cfg.n_blocks = 8; /* a pool size needs pages */
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_ERR_INVALID_ARG);
    cfg.n_blocks = 0;
    lc.key_axis = (clkvq_axis)5;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_ERR_INVALID_ARG);
    lc = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    lc.key_axis = CLKVQ_AXIS_CHANNEL; /* an skvq setting */
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_ERR_INVALID_ARG);
    lc.key_axis = CLKVQ_AXIS_TOKEN;
    lc.rotate = 2;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_ERR_INVALID_ARG);
    lc.rotate = 0;
    float mean[2 * 64] = {0};
    mean[77] = NAN;
    lc.mean_v = mean;
    ck_assert_int_eq(clkvq_cache_plan(ctx, &cfg, &mem), CLKVQ_ERR_NONFINITE);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(ctx), "mean_v[77]"));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("cache");
    TCase *tc = tcase_create("cache");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, bad_configs_are_reported);
    tcase_add_test(tc, failed_appends_change_nothing);
    tcase_add_test(tc, window_transitions_one_token_at_a_time);
    tcase_add_test(tc, state_matches_model_token_major);
    tcase_add_test(tc, state_matches_model_group_planar);
    tcase_add_test(tc, state_matches_model_paged);
    tcase_add_test(tc, fork_shares_pages_until_written);
    tcase_add_test(tc, out_of_blocks_changes_nothing);
    tcase_add_test(tc, runtime_tables_match_library_pages);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
