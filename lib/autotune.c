/*
 * The decode-attention autotuner (clkvq_tune_decode).
 *
 * Space: on GPUs the cooperative variant (work-group size 64/128/256 x
 * tokens per lane 1/2/4 x V words per lane 1/2/4 x waves per compute unit
 * 1/2/4/8) on each of the four K/V layout pairs, and a few serial
 * candidates; on other devices the serial variant (vector width x chunk)
 * on group-planar layouts and a few cooperative candidates (PoCL runs a
 * work-group's lanes as loops: the cooperative kernel is a GPU kernel).
 * Candidates beyond device limits are skipped. Paths that need an
 * optional extension (subgroups, fp16 arithmetic, integer dot products)
 * would join the space only where ctx->features reports it; none is
 * implemented yet, so none is offered (docs/gpu-decode.md).
 * Every candidate's output is checked against double-precision attention
 * over the cache's own read-back before it is timed: a wrong candidate is
 * counted and dropped. Timing: OpenCL profiling events, median of `reps`
 * runs after a warm-up run (which also builds the program, through the
 * on-disk program cache).
 * Strategy: the whole space when no budget is given; with a budget, the
 * built-in default first, then candidates in a seeded random order for 70%
 * of it, then a local search around the best (one tunable doubled or
 * halved at a time) for the rest.
 */
#include "internal.h"
#include "reference.h"
#include "tuning_db.h"
#ifdef CLKVQ_TESTING
#include "test_hooks.h"
#endif

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef CLKVQ_TESTING
int clkvq_tune_perturb_for_tests;
#endif

#define MAX_CANDIDATES 512
#define VERIFY_TOLERANCE 1e-4

typedef struct {
    clkvq_tune_params p;
#ifdef CLKVQ_TESTING
    int perturbed; /* test_hooks.h: output made wrong before verification */
#endif
    int done;
    double ms;
} candidate;

typedef struct {
    candidate c[MAX_CANDIDATES];
    int n;
} candidate_set;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Fields a candidate leaves to the other variant keep the built-in values
 * (a stored entry is then one the fit check reads as it reads any). */
static candidate *add(candidate_set *set, const clkvq_tune_params *base,
                      clkvq_attn_variant variant, clkvq_layout lk, clkvq_layout lv)
{
    if (set->n >= MAX_CANDIDATES)
        return NULL;
    candidate *c = &set->c[set->n++];
    memset(c, 0, sizeof *c);
    c->p = *base;
    c->p.attn.variant = variant;
    c->p.layout_k = lk;
    c->p.layout_v = lv;
    return c;
}

static void add_coop(candidate_set *set, const clkvq_tune_params *base, int wgs, int tpl,
                     int vwpl, int waves, clkvq_layout lk, clkvq_layout lv)
{
    candidate *c = add(set, base, CLKVQ_ATTN_COOPERATIVE, lk, lv);
    if (c) {
        c->p.attn.wgs = wgs;
        c->p.attn.tpl = tpl;
        c->p.attn.vwpl = vwpl;
        c->p.attn.waves = waves;
    }
}

static void add_serial(candidate_set *set, const clkvq_tune_params *base, int chunk, int vw)
{
    candidate *c = add(set, base, CLKVQ_ATTN_SERIAL, CLKVQ_LAYOUT_GROUP_PLANAR,
                       CLKVQ_LAYOUT_GROUP_PLANAR);
    if (c) {
        c->p.attn.chunk = chunk;
        c->p.attn.vw = vw;
    }
}

static void build_space(const clkvq_context *ctx, int quick, int fp16, candidate_set *set)
{
    static const int wgs_list[] = {64, 128, 256};
    static const int tpl_list[] = {1, 2, 4};
    static const int vwpl_list[] = {1, 2, 4};
    static const int waves_list[] = {1, 2, 4, 8};
    static const int serial_chunks[] = {64, 128, 256, 512, 1024};
    static const int vw_list[] = {4, 8, 16};
    const clkvq_layout P = CLKVQ_LAYOUT_GROUP_PLANAR, T = CLKVQ_LAYOUT_TOKEN_MAJOR;
    const clkvq_layout pairs[4][2] = {{P, T}, {P, P}, {T, T}, {T, P}};
    int n_pairs = fp16 ? 1 : 4; /* the fp16 scheme stores nothing packed */
    const clkvq_tune_params base = clkvq_tuning_builtin(ctx);
    if (quick) {
        add_coop(set, &base, 128, 4, 0, 2, P, T);
        add_coop(set, &base, 64, 2, 0, 1, P, P);
        add_serial(set, &base, 256, 8);
        add_serial(set, &base, 512, 16);
        return;
    }
    if (ctx->info.is_gpu) {
        for (int pi = 0; pi < n_pairs; pi++)
            for (int w = 0; w < 3; w++) {
                if ((size_t)wgs_list[w] > ctx->info.max_work_group_size)
                    continue;
                for (int t = 0; t < 3; t++)
                    for (int v = 0; v < 3; v++)
                        for (int a = 0; a < 4; a++)
                            add_coop(set, &base, wgs_list[w], tpl_list[t], vwpl_list[v],
                                     waves_list[a], pairs[pi][0], pairs[pi][1]);
            }
        for (int c = 2; c < 5; c++)
            add_serial(set, &base, serial_chunks[c], 16);
        return;
    }
    for (int v = 0; v < 3; v++)
        for (int c = 0; c < 5; c++)
            add_serial(set, &base, serial_chunks[c], vw_list[v]);
    for (int pi = 0; pi < (fp16 ? 1 : 2); pi++)
        for (int w = 0; w < 2; w++)
            for (int t = 1; t < 3; t++)
                for (int a = 0; a < 2; a++)
                    add_coop(set, &base, wgs_list[w], tpl_list[t], 0, waves_list[a],
                             pairs[pi][0], pairs[pi][1]);
}

static int same_params(const clkvq_tune_params *a, const clkvq_tune_params *b)
{
    if (a->attn.variant != b->attn.variant || a->layout_k != b->layout_k ||
        a->layout_v != b->layout_v)
        return 0;
    if (a->attn.variant == CLKVQ_ATTN_SERIAL)
        return a->attn.vw == b->attn.vw && a->attn.chunk == b->attn.chunk;
    return a->attn.wgs == b->attn.wgs && a->attn.tpl == b->attn.tpl &&
           a->attn.vwpl == b->attn.vwpl && a->attn.waves == b->attn.waves;
}

/* ------------------------------------------------------------ data */

typedef struct {
    clkvq_context *ctx;
    clkvq_tune_shape shape;
    clkvq_layer_config layer;  /* the cache's settings: the caller's or the scheme's */
    clkvq_cache *caches[2][2]; /* [layout_k][layout_v], made on demand */
    float *q;                  /* [batch][n_q][head_dim] */
    double *ref;               /* reference output, same shape */
    cl_mem q_mem, out_mem;
    float *out;
    int reps;
} tune_state;

static clkvq_status make_cache(tune_state *ts, clkvq_layout lk, clkvq_layout lv,
                               clkvq_cache **out)
{
    const clkvq_tune_shape *sh = &ts->shape;
    clkvq_layer_config lc = ts->layer;
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = sh->batch, .capacity = sh->tokens,
                              .n_kv_heads = sh->n_kv_heads, .n_q_heads = sh->n_q_heads,
                              .head_dim = sh->head_dim, .layout_k = lk, .layout_v = lv,
                              .layers = &lc};
    clkvq_status st = clkvq_cache_create(ts->ctx, &cfg, out);
    if (st != CLKVQ_OK)
        return st;
    /* the same seeds for every layout: the packed contents are identical */
    const int step = 2048;
    size_t per = (size_t)sh->n_kv_heads * step * sh->head_dim;
    float *k = malloc(per * sizeof(float)), *v = malloc(per * sizeof(float));
    if (!k || !v)
        st = clkvq_fail(ts->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "tuning data");
    for (int s = 0; s < sh->batch && st == CLKVQ_OK; s++)
        for (int done = 0; done < sh->tokens && st == CLKVQ_OK; done += step) {
            int n = sh->tokens - done < step ? sh->tokens - done : step;
            clkvq_shape part = {sh->n_kv_heads, n, sh->head_dim};
            st = clkvq_synth_kv(1000003u * (uint64_t)s + (uint64_t)done + 1, &part, k, v);
            if (st == CLKVQ_OK)
                st = clkvq_cache_append(*out, 0, s, n, k, v);
        }
    free(k);
    free(v);
    if (st != CLKVQ_OK) {
        clkvq_cache_release(*out);
        *out = NULL;
    }
    return st;
}

static clkvq_status cache_for(tune_state *ts, clkvq_layout lk, clkvq_layout lv,
                              clkvq_cache **out)
{
    clkvq_cache **slot = &ts->caches[lk][lv];
    if (!*slot) {
        clkvq_status st = make_cache(ts, lk, lv, slot);
        if (st != CLKVQ_OK)
            return st;
    }
    *out = *slot;
    return CLKVQ_OK;
}

/* softmax(scale q.K^T) V in double over the read-back, per sequence. */
static clkvq_status reference(tune_state *ts, clkvq_cache *cache, float scale)
{
    const clkvq_tune_shape *sh = &ts->shape;
    int d = sh->head_dim, n = sh->tokens;
    size_t kv = (size_t)sh->n_kv_heads * n * d;
    float *k = malloc(kv * sizeof(float)), *v = malloc(kv * sizeof(float));
    clkvq_status st = k && v ? CLKVQ_OK
                             : clkvq_fail(ts->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "tuning reference");
    clkvq_ref_attn_shape rs = {sh->n_q_heads, sh->n_kv_heads, d, n, (size_t)n * d, 1,
                               (size_t)d, scale};
    for (int s = 0; s < sh->batch && st == CLKVQ_OK; s++) {
        st = clkvq_cache_read(cache, 0, s, k, v);
        if (st == CLKVQ_OK)
            clkvq_ref_attention(&rs, ts->q + (size_t)s * sh->n_q_heads * d, k, v,
                                ts->ref + (size_t)s * sh->n_q_heads * d);
    }
    free(k);
    free(v);
    return st;
}

/* Worst relative error over (sequence, head) of the last decode. */
static double output_error(tune_state *ts)
{
    const clkvq_tune_shape *sh = &ts->shape;
    int d = sh->head_dim;
    double worst = 0.0;
    for (int h = 0; h < sh->batch * sh->n_q_heads; h++) {
        double num = 0.0, den = 0.0;
        for (int c = 0; c < d; c++) {
            double r = ts->ref[(size_t)h * d + c], o = ts->out[(size_t)h * d + c];
            num += (o - r) * (o - r);
            den += r * r;
        }
        double e = den > 0.0 ? sqrt(num / den) : sqrt(num);
        if (!(e <= worst)) /* NaN counts as the worst */
            worst = isnan(e) ? INFINITY : e;
    }
    return worst;
}

static int compare_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Builds, verifies and times one candidate. Returns CLKVQ_OK with *ms set,
 * or *ms < 0 when the candidate was rejected (wrong) or skipped (limits). */
static clkvq_status evaluate(tune_state *ts, candidate *c, int *rejected, int *skipped)
{
    clkvq_cache *cache;
    clkvq_status st = cache_for(ts, c->p.layout_k, c->p.layout_v, &cache);
    if (st != CLKVQ_OK)
        return st;
    c->done = 1;
    c->ms = -1.0;
    st = clkvq_cache_set_tuning(cache, &c->p.attn);
    if (st == CLKVQ_ERR_DEVICE_LIMIT || st == CLKVQ_ERR_UNSUPPORTED) {
        (*skipped)++;
        return CLKVQ_OK;
    }
    if (st != CLKVQ_OK)
        return st;
    float scale = 1.0f / sqrtf((float)ts->shape.head_dim);
    size_t bytes = (size_t)ts->shape.batch * ts->shape.n_q_heads * ts->shape.head_dim *
                   sizeof(float);
    st = clkvq_cache_decode(cache, 0, ts->q_mem, ts->out_mem, scale);
    if (st == CLKVQ_OK) {
        cl_int err = clEnqueueReadBuffer(ts->ctx->queue, ts->out_mem, CL_TRUE, 0, bytes, ts->out,
                                         0, NULL, NULL);
        if (err != CL_SUCCESS)
            st = clkvq_cl_fail(ts->ctx, err, "reading a candidate's output");
    }
#ifdef CLKVQ_TESTING
    if (st == CLKVQ_OK && c->perturbed)
        for (size_t i = 0; i < bytes / sizeof(float); i++)
            ts->out[i] *= 1.01f;
#endif
    if (st == CLKVQ_ERR_BUILD || st == CLKVQ_ERR_DEVICE_LIMIT) { /* the device refused it */
        (*skipped)++;
        return CLKVQ_OK;
    }
    if (st == CLKVQ_OK && !(output_error(ts) <= VERIFY_TOLERANCE)) {
        (*rejected)++;
        return CLKVQ_OK;
    }
    double times[64];
    int reps = ts->reps < 64 ? ts->reps : 64;
    for (int r = 0; r < reps && st == CLKVQ_OK; r++) {
        st = clkvq_cache_decode(cache, 0, ts->q_mem, ts->out_mem, scale);
        times[r] = clkvq_last_device_ms(ts->ctx);
    }
    if (st != CLKVQ_OK)
        return st;
    qsort(times, (size_t)reps, sizeof(double), compare_double);
    c->ms = times[reps / 2];
    return CLKVQ_OK;
}

static clkvq_status validate_shape(clkvq_context *ctx, const clkvq_tune_shape *sh)
{
    if (sh->head_dim <= 0 || sh->n_q_heads <= 0 || sh->n_kv_heads <= 0 || sh->tokens <= 0 ||
        sh->batch <= 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "tuning shape needs positive head_dim, heads, tokens and batch");
    if ((int)sh->scheme < 0 || sh->scheme >= CLKVQ_SCHEME_COUNT)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "tuning shape: unknown scheme %d",
                          (int)sh->scheme);
    return CLKVQ_OK;
}

/* options->layer must be the layer the shape describes (fp16 packs
 * nothing: its formats and group do not matter). */
static clkvq_status validate_layer(clkvq_context *ctx, const clkvq_tune_shape *sh,
                                   const clkvq_layer_config *lc)
{
    if (!lc || (lc->scheme == sh->scheme &&
                (sh->scheme == CLKVQ_SCHEME_FP16 ||
                 (lc->format_k == sh->format_k && lc->format_v == sh->format_v &&
                  lc->group_size == sh->group_size))))
        return CLKVQ_OK;
    return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                      "clkvq_tune_decode: options->layer (scheme %s, formats %d/%d, group %d) is "
                      "not the shape's (scheme %s, formats %d/%d, group %d)",
                      clkvq_scheme_name(lc->scheme), (int)lc->format_k, (int)lc->format_v,
                      lc->group_size, clkvq_scheme_name(sh->scheme), (int)sh->format_k,
                      (int)sh->format_v, sh->group_size);
}

static void release_state(tune_state *ts)
{
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            clkvq_cache_release(ts->caches[i][j]);
    if (ts->q_mem)
        clReleaseMemObject(ts->q_mem);
    if (ts->out_mem)
        clReleaseMemObject(ts->out_mem);
    free(ts->q);
    free(ts->ref);
    free(ts->out);
}

/* The layer settings the candidates' caches get: the caller's (without
 * the per-head arrays, perms and means, whose shape is the caller's
 * model's: a per-head layer's share comes with the share's formats), else
 * the scheme's defaults with the shape's formats and group. */
static clkvq_layer_config tuned_layer(const clkvq_tune_shape *sh, const clkvq_layer_config *given)
{
    clkvq_layer_config lc;
    if (given) {
        lc = *given;
        lc.perm_k = lc.perm_v = NULL;
        lc.mean_k = lc.mean_v = NULL;
        lc.head_format_k = lc.head_format_v = NULL;
        return lc;
    }
    lc = clkvq_layer_config_default(sh->scheme);
    lc.format_k = sh->format_k;
    lc.format_v = sh->format_v;
    if (sh->scheme != CLKVQ_SCHEME_FP16)
        lc.group_size = sh->group_size;
    if (sh->scheme == CLKVQ_SCHEME_KIVI)
        lc.residual = sh->group_size * ((128 + sh->group_size - 1) / sh->group_size);
    return lc;
}

static clkvq_status init_state(clkvq_context *ctx, const clkvq_tune_shape *shape,
                               const clkvq_layer_config *layer, int reps, tune_state *ts)
{
    memset(ts, 0, sizeof *ts);
    ts->ctx = ctx;
    ts->shape = *shape;
    ts->layer = tuned_layer(shape, layer);
    ts->reps = reps > 0 ? reps : 5;
    size_t n = (size_t)shape->batch * shape->n_q_heads * shape->head_dim;
    ts->q = malloc(n * sizeof(float));
    ts->out = malloc(n * sizeof(float));
    ts->ref = malloc(n * sizeof(double));
    if (!ts->q || !ts->out || !ts->ref)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "tuning buffers");
    uint64_t x = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < n; i++) { /* a fixed query in [-1, 1) */
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ts->q[i] = (float)((double)(x >> 11) / 4503599627370496.0 - 1.0);
    }
    cl_int err;
    ts->q_mem = clCreateBuffer(ctx->cl_ctx, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                               n * sizeof(float), ts->q, &err);
    if (err == CL_SUCCESS)
        ts->out_mem = clCreateBuffer(ctx->cl_ctx, CL_MEM_READ_WRITE, n * sizeof(float), NULL, &err);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, "tuning buffers");
}

/* Seeded Fisher-Yates over candidates [first, n). */
static void shuffle(candidate_set *set, int first, uint64_t seed)
{
    uint64_t x = seed ? seed : 1;
    for (int i = set->n - 1; i > first; i--) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        int j = first + (int)(x % (uint64_t)(i - first + 1));
        candidate t = set->c[i];
        set->c[i] = set->c[j];
        set->c[j] = t;
    }
}

static int neighbours(const candidate *a, const candidate *b)
{
    const clkvq_attn_tuning *x = &a->p.attn, *y = &b->p.attn;
    if (x->variant != y->variant || a->p.layout_k != b->p.layout_k ||
        a->p.layout_v != b->p.layout_v)
        return 0;
    int diffs = x->variant == CLKVQ_ATTN_SERIAL
                    ? (x->chunk != y->chunk) + (x->vw != y->vw)
                    : (x->wgs != y->wgs) + (x->tpl != y->tpl) + (x->vwpl != y->vwpl) +
                          (x->waves != y->waves);
    return diffs == 1;
}

clkvq_status clkvq_tune_decode(clkvq_context *ctx, const clkvq_tune_shape *shape,
                               const clkvq_tune_options *options, clkvq_tune_result *out)
{
    if (!ctx || !shape || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_tune_decode: NULL argument");
    clkvq_clear_error(ctx);
    clkvq_tune_options opt;
    memset(&opt, 0, sizeof opt);
    if (options)
        opt = *options;
    clkvq_status st = validate_shape(ctx, shape);
    if (st == CLKVQ_OK)
        st = validate_layer(ctx, shape, opt.layer);
    if (st != CLKVQ_OK)
        return st;
    memset(out, 0, sizeof *out);
    snprintf(out->kernel, sizeof out->kernel, "decode");
    out->shape = *shape;

    candidate_set *set = calloc(1, sizeof *set);
    if (!set)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "tuning candidates");
    /* the built-in default first: its time is the baseline */
    set->c[0].p = clkvq_tuning_builtin(ctx);
    set->n = 1;
    build_space(ctx, opt.quick, shape->scheme == CLKVQ_SCHEME_FP16, set);
    for (int i = 1; i < set->n; i++) /* drop the copy of the default */
        if (same_params(&set->c[i].p, &set->c[0].p)) {
            set->c[i] = set->c[--set->n];
            break;
        }
#ifdef CLKVQ_TESTING
    if (clkvq_tune_perturb_for_tests && set->n < MAX_CANDIDATES) {
        set->c[set->n] = set->c[0];
        set->c[set->n++].perturbed = 1;
    }
#endif
    if (opt.budget_s > 0)
        shuffle(set, 1, opt.seed ? opt.seed : 12345);

    tune_state ts;
    st = init_state(ctx, shape, opt.layer, opt.reps, &ts);
    clkvq_cache *first = NULL;
    if (st == CLKVQ_OK)
        st = cache_for(&ts, set->c[0].p.layout_k, set->c[0].p.layout_v, &first);
    if (st == CLKVQ_OK)
        st = reference(&ts, first, 1.0f / sqrtf((float)shape->head_dim));

    double start = now_s();
    int best = -1, evaluated = 0;
    for (int phase = 0; phase < 2 && st == CLKVQ_OK; phase++) {
        /* phase 0: every candidate (or the random order until 70% of the
         * budget); phase 1: neighbours of the best, with what is left */
        for (int i = 0; i < set->n && st == CLKVQ_OK; i++) {
            candidate *c = &set->c[i];
            if (c->done)
                continue;
            double spent = now_s() - start;
            if (opt.budget_s > 0 && i > 0) {
                if (phase == 0 && spent > 0.7 * opt.budget_s)
                    break;
                if (phase == 1 && (spent > opt.budget_s || best < 0 ||
                                   !neighbours(c, &set->c[best])))
                    continue;
            }
            st = evaluate(&ts, c, &out->n_rejected, &out->n_skipped);
            evaluated++;
            if (st == CLKVQ_OK && c->ms >= 0) {
                out->n_candidates++;
                if (i == 0)
                    out->default_ms = c->ms;
                if (best < 0 || c->ms < set->c[best].ms)
                    best = i;
            }
            if (opt.progress) {
                char what[160], tun[64];
                if (c->p.attn.variant == CLKVQ_ATTN_SERIAL)
                    snprintf(tun, sizeof tun, "serial chunk %d vw %d", c->p.attn.chunk,
                             c->p.attn.vw);
                else
                    snprintf(tun, sizeof tun, "cooperative wgs %d tpl %d vwpl %d waves %d",
                             c->p.attn.wgs, c->p.attn.tpl, c->p.attn.vwpl, c->p.attn.waves);
                snprintf(what, sizeof what, "%s, layouts %s/%s: %s", tun,
                         c->p.layout_k == CLKVQ_LAYOUT_GROUP_PLANAR ? "planar" : "token",
                         c->p.layout_v == CLKVQ_LAYOUT_GROUP_PLANAR ? "planar" : "token",
                         c->ms >= 0 ? "ok" : "rejected or skipped");
                opt.progress(opt.user, evaluated, set->n, what);
            }
        }
        if (opt.budget_s <= 0)
            break;
    }
    for (int i = 0; i < set->n; i++)
        if (!set->c[i].done)
            out->n_skipped++;
    if (st == CLKVQ_OK && best < 0)
        st = clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED, "no decode candidate ran correctly on %s",
                        ctx->info.name);
    if (st == CLKVQ_OK) {
        out->params = set->c[best].p;
        out->tuned_ms = set->c[best].ms;
        if (out->default_ms <= 0) /* the default itself failed: compare to the best */
            out->default_ms = out->tuned_ms;
    }
    release_state(&ts);
    free(set);
    return st;
}
