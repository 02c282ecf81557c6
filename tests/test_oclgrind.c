/*
 * The kernels under Oclgrind, the OpenCL simulator that checks every memory
 * access and every pair of work-items: ctest label `oclgrind`, run by .ci/run
 * as `oclgrind --data-races --check-api test_oclgrind` (tests/CMakeLists.txt).
 * Any out-of-bounds access, data race (global or local memory), barrier
 * divergence, unaligned access or failing OpenCL call that Oclgrind reports
 * fails the test (ctest's FAIL_REGULAR_EXPRESSION on its messages), and
 * every result is checked as well, so the sweep also proves the kernels
 * compute the right thing on a second, very different implementation.
 * Run without Oclgrind it is an ordinary test on the default device.
 *
 * A covering design, not the cross product: a configuration costs a program
 * build and seconds of simulated work-items.
 * - quantize/dequantize: every format on both axes (and the generic
 *   per-channel kernel, for a head_dim that is no multiple of 16), codes and
 *   params byte for byte against lib/reference.c, dequantized values bit for
 *   bit.
 * - decode: the 25 (K, V) format pairs, each once, over the quantized schemes
 *   (every fifth with its second kv head on another key format: per-head
 *   bits, two shares), (token, kivi, skvq) in turn, plus the fp16 scheme with each
 *   variant. The variant cycles through cooperative at work-group sizes 16/32/64/128 (tokens
 *   per lane 1/2/4, V words per lane automatic/1/2/4, one split written
 *   directly or several and the merge) and serial (vw 4/8/16); head_dim
 *   32/64/128 and GQA 1/4/7 cycle on other
 *   strides so that every pair of (scheme, variant, head_dim, GQA) levels
 *   occurs, and the four K/V packed layout pairs cycle over the cooperative
 *   configurations (serial reads group-planar only). Parameter storage
 *   (fp16/fp8, float/int zero), permutations and group sizes vary along.
 *   Each configuration appends two sequences (over several split-K chunks;
 *   short or empty) as a prefill chunk plus single tokens, some truncated
 *   and refilled, checks the read-back against lib/reference_cache.c bit
 *   for bit and decode against fp64 attention over the read-back (1e-5, as
 *   tests/test_attention.c).
 * - the CLBlast paths: causal prefill (our softmax between CLBlast's batched
 *   GEMMs) for three schemes, and the fp32 GEMV decode baseline, against
 *   fp64 attention. CLBlast's own kernels run under the same checks.
 *
 * Oclgrind's --uninitialized is not part of the check, for two reasons
 * seen with Debian's Oclgrind 21.10 (built on LLVM 14):
 * - it aborts at the first LLVM `freeze` instruction ("OCLGRIND FATAL
 *   ERROR ... Unsupported instruction: freeze", in clkvq_quantize_token at
 *   `%mul2.frozen = freeze i32 %mul2`): the optimizer emits freeze for an
 *   integer division and remainder of the same operands (DivRemPairs), as
 *   in any index arithmetic. The Uninitialized plugin handles freeze from
 *   Oclgrind commit ee3a739 (February 2026, "Add support for LLVM's freeze
 *   instruction in Uninitialized plugin"), first released in 26.03.1. With
 *   21.10, `--build-options -cl-opt-disable` got the quantize kernels past
 *   it;
 * - it then reports "Controlflow depends on uninitialized value" on vector
 *   halves (v.lo, v.hi) of a vload16 from a buffer written whole from the
 *   host, which a 7-line kernel reproduces: a false positive, in the
 *   min/max reductions of clkvq_check_input and clkvq_quantize_token.
 * A gate on it needs an Oclgrind newer than 21.10 (built from source on
 * Debian 12) and a check that those reports are gone there.
 */
#include "reference.h"
#include "reference_cache.h"
#include "test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KV_HEADS 2
#define N_SEQS 2
#define TOLERANCE 1e-5

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------ quantize */

#define N_QUANT (2 * CLKVQ_FMT_COUNT + 1)

/* Gaussian data with an outlier channel and a loud first token. */
static float *kv_like(uint64_t seed, const clkvq_shape *shape)
{
    size_t n = (size_t)shape->n_heads * shape->n_tokens * shape->head_dim;
    float *x = malloc(n * sizeof(float));
    test_fill_normal(seed, x, n, 1.0f);
    for (int h = 0; h < shape->n_heads; h++)
        for (int t = 0; t < shape->n_tokens; t++) {
            float *row = x + ((size_t)h * shape->n_tokens + t) * shape->head_dim;
            row[(3 + 5 * h) % shape->head_dim] *= 25.0f;
            if (t == 0)
                row[1] *= 60.0f;
        }
    return x;
}

/* Configuration i: format i/2 on axis i%2; the last one the generic
 * per-channel kernel (head_dim 40). */
static void quant_config(int i, clkvq_quant_params *qp, clkvq_shape *shape, int *permute)
{
    static const int dims[] = {32, 64, 128};
    *qp = clkvq_quant_params_default();
    if (i == N_QUANT - 1) {
        qp->format = CLKVQ_FMT_Q3;
        qp->axis = CLKVQ_AXIS_CHANNEL;
        *shape = (clkvq_shape){2, 37, 40};
        *permute = 1;
        return;
    }
    qp->format = (clkvq_format)(i / 2);
    qp->axis = (clkvq_axis)(i % 2);
    int d = dims[i % 3];
    /* token axis: groups of 32 or 64 channels; channel axis: of 32 tokens */
    qp->group_size = qp->axis == CLKVQ_AXIS_TOKEN && d >= 64 && i % 4 == 0 ? 64 : 32;
    qp->clip_alpha = i % 3 == 1 ? 0.9f : 1.0f;
    if (i % 3 == 1)
        qp->param_type = CLKVQ_PARAM_FP8_E4M3;
    if (i % 3 == 2)
        qp->zero_mode = CLKVQ_ZERO_INT;
    /* 37 tokens: no multiple of a group on the channel axis */
    *shape = (clkvq_shape){2, 37, d};
    *permute = i % 2 == 0;
}

START_TEST(quantize_sweep)
{
    double start = now_s();
    clkvq_context *ctx = test_ctx();
    clkvq_quant_params qp;
    clkvq_shape shape;
    int permute;
    quant_config(_i, &qp, &shape, &permute);
    char label[128];
    snprintf(label, sizeof label, "quantize %d/%d: %s %s-axis g%d d%d%s%s%s", _i + 1, N_QUANT,
             clkvq_format_get(qp.format)->name, qp.axis == CLKVQ_AXIS_TOKEN ? "token" : "channel",
             qp.group_size, shape.head_dim, qp.param_type ? " fp8" : "",
             qp.zero_mode ? " int-zero" : "", permute ? " perm" : "");
    clkvq_quant_layout layout;
    ck_assert_int_eq(clkvq_quant_layout_get(&qp, &shape, &layout), CLKVQ_OK);
    size_t n = (size_t)shape.n_heads * shape.n_tokens * shape.head_dim;
    float *x = kv_like(1000 + (uint64_t)_i, &shape);
    int32_t *perm = permute ? test_random_perm(7 + (uint64_t)_i, shape.n_heads, shape.head_dim)
                            : NULL;
    uint8_t *codes = malloc(layout.code_bytes), *params = malloc(layout.params_bytes);
    uint8_t *ref_codes = malloc(layout.code_bytes), *ref_params = malloc(layout.params_bytes);
    float *deq = malloc(n * sizeof(float)), *ref_deq = malloc(n * sizeof(float));

    clkvq_status st = clkvq_quantize_host(ctx, &qp, &shape, x, perm, codes, layout.code_bytes,
                                          params, layout.params_bytes);
    ck_assert_msg(st == CLKVQ_OK, "%s: %s", label, clkvq_last_error(ctx));
    ck_assert_int_eq(clkvq_ref_quantize(&qp, &shape, x, perm, ref_codes, ref_params), CLKVQ_OK);
    size_t i = 0;
    while (i < layout.params_bytes && params[i] == ref_params[i])
        i++;
    ck_assert_msg(i == layout.params_bytes, "%s: param byte %zu differs", label, i);
    i = 0;
    while (i < layout.code_bytes && codes[i] == ref_codes[i])
        i++;
    ck_assert_msg(i == layout.code_bytes, "%s: code byte %zu differs", label, i);
    st = clkvq_dequantize_host(ctx, &qp, &shape, codes, params, perm, deq);
    ck_assert_msg(st == CLKVQ_OK, "%s: dequantize: %s", label, clkvq_last_error(ctx));
    clkvq_ref_dequantize(&qp, &shape, ref_codes, ref_params, perm, ref_deq);
    ck_assert_msg(memcmp(deq, ref_deq, n * sizeof(float)) == 0, "%s: dequantized differ", label);
    printf("%s: ok (%.1f s)\n", label, now_s() - start);
    fflush(stdout);
    free(x);
    free(perm);
    free(codes);
    free(params);
    free(ref_codes);
    free(ref_params);
    free(deq);
    free(ref_deq);
}
END_TEST

/* ------------------------------------------------------------ decode */

#define N_PAIRS (CLKVQ_FMT_COUNT * CLKVQ_FMT_COUNT)
#define N_FP16 5
#define N_DECODE (N_PAIRS + N_FP16)

typedef struct {
    clkvq_layer_config lc;
    int head_dim, qpk;
    clkvq_layout layout_k, layout_v;
    clkvq_attn_tuning tuning;
    int lengths[N_SEQS];
    int truncate; /* seq 0: cut 20 tokens, then append 5 */
    int permute;
    clkvq_format head_k[KV_HEADS], head_v[KV_HEADS]; /* per-head bits (some configurations) */
} decode_config;

/* Configuration i (see the header): the strides were chosen so that every
 * pair of (scheme, variant slot, head_dim, GQA) levels occurs among the 25
 * quantized configurations, and every (scheme, layout pair) and (head_dim,
 * layout pair) among their cooperative ones. */
static void decode_config_get(int i, decode_config *c)
{
    static const int dims[] = {32, 64, 128}, qpks[] = {1, 4, 7}, wgs[] = {16, 32, 64, 128};
    static const clkvq_scheme schemes[] = {CLKVQ_SCHEME_TOKEN, CLKVQ_SCHEME_KIVI,
                                           CLKVQ_SCHEME_SKVQ};
    const clkvq_layout P = CLKVQ_LAYOUT_GROUP_PLANAR, T = CLKVQ_LAYOUT_TOKEN_MAJOR;
    const clkvq_layout layouts[4][2] = {{P, P}, {T, T}, {P, T}, {T, P}};
    memset(c, 0, sizeof *c);
    int slot, hd_i, q_i;
    if (i < N_PAIRS) {
        c->lc = clkvq_layer_config_default(schemes[i % 3]);
        c->lc.format_k = (clkvq_format)(i / 5);
        c->lc.format_v = (clkvq_format)(i % 5);
        slot = (i + i / 5) % 5;
        hd_i = (i / 4) % 3;
        q_i = (i / 3 + i) % 3;
    } else {
        int j = i - N_PAIRS;
        c->lc = clkvq_layer_config_default(CLKVQ_SCHEME_FP16);
        slot = j;
        hd_i = j % 3;
        q_i = (j + 1) % 3;
    }
    c->head_dim = dims[hd_i];
    c->qpk = qpks[q_i];
    clkvq_layer_config *lc = &c->lc;
    int d = c->head_dim;
    switch (lc->scheme) {
    case CLKVQ_SCHEME_TOKEN:
        lc->group_size = d >= 64 && i % 2 ? 64 : 32;
        c->permute = i % 2;
        break;
    case CLKVQ_SCHEME_KIVI:
        lc->group_size = 32;
        lc->residual = i % 2 ? 64 : 32;
        break;
    case CLKVQ_SCHEME_SKVQ:
        lc->group_size = i % 2 ? d : 32;
        lc->window = 16;
        lc->n_sink = i % 4 == 2 ? 0 : 2;
        lc->clip_k = 0.9f;
        lc->clip_v = 0.95f;
        c->permute = 1;
        break;
    default:
        break;
    }
    if (lc->scheme != CLKVQ_SCHEME_FP16 && i % 5 == 1) {
        /* per-head bits: head 1 on another key format, a share of its own
         * (its launch reads queries gathered from, and writes outputs
         * scattered to, the middle of q and out). The value format stays:
         * the configuration's tunables must fit every share, and the
         * cooperative tile's local memory follows the value format. */
        c->head_k[0] = lc->format_k;
        c->head_v[0] = c->head_v[1] = lc->format_v;
        c->head_k[1] = (clkvq_format)((lc->format_k + 2) % CLKVQ_FMT_COUNT);
    }
    if (lc->scheme != CLKVQ_SCHEME_FP16) {
        int pv = (i / 2) % 3; /* fp16 float, fp8 float, fp16 int */
        lc->param_type = pv == 1 ? CLKVQ_PARAM_FP8_E4M3 : CLKVQ_PARAM_FP16;
        lc->zero_mode = pv == 2 ? CLKVQ_ZERO_INT : CLKVQ_ZERO_FLOAT;
    }
    if (slot < 4) {
        int lp = (i / 7 + i) % 4;
        c->layout_k = layouts[lp][0];
        c->layout_v = layouts[lp][1];
        /* tiles of at most 256 tokens (simulated work-items are slow);
         * waves 64 splits every sequence (the merge), 1 does not */
        int tpl = 1 << ((i / 5) % 3);
        while (wgs[slot] * tpl > 256)
            tpl /= 2;
        c->tuning = (clkvq_attn_tuning){CLKVQ_ATTN_COOPERATIVE, wgs[slot], 0, 0, tpl,
                                        (i / 3) % 4 == 3 ? 4 : (i / 3) % 4, i % 2 ? 64 : 1};
    } else {
        int vw = 4 << (i % 3);
        c->layout_k = c->layout_v = P;
        c->tuning = (clkvq_attn_tuning){CLKVQ_ATTN_SERIAL, 0, 4 * vw, vw, 0, 0, 0};
    }
    /* seq 0 spans two chunks (tiles) and part of a third, and is past
     * every window, residual and group; seq 1 is empty, one token or a few */
    int chunk = c->tuning.variant == CLKVQ_ATTN_SERIAL ? c->tuning.chunk
                                                       : c->tuning.wgs * c->tuning.tpl;
    c->lengths[0] = 2 * chunk + 13;
    if (c->lengths[0] < 80)
        c->lengths[0] = 80;
    static const int short_lengths[] = {0, 1, 7, 40};
    c->lengths[1] = short_lengths[i % 4];
    c->truncate = i % 4 == 3;
}

static void describe(int i, const decode_config *c, char *buf, size_t size)
{
    const clkvq_layer_config *lc = &c->lc;
    int fp16 = lc->scheme == CLKVQ_SCHEME_FP16;
    int serial = c->tuning.variant == CLKVQ_ATTN_SERIAL;
    char tun[64];
    if (serial)
        snprintf(tun, sizeof tun, "serial vw %d chunk %d", c->tuning.vw, c->tuning.chunk);
    else
        snprintf(tun, sizeof tun, "cooperative wgs %d tpl %d vwpl %d waves %d", c->tuning.wgs,
                 c->tuning.tpl, c->tuning.vwpl, c->tuning.waves);
    snprintf(buf, size, "decode %d/%d: %s %s/%s d%d gqa%d %s layouts %s/%s%s%s%s%s",
             i + 1, N_DECODE, clkvq_scheme_name(lc->scheme),
             fp16 ? "-" : clkvq_format_get(lc->format_k)->name,
             fp16 ? "-" : clkvq_format_get(lc->format_v)->name, c->head_dim, c->qpk, tun,
             c->layout_k == CLKVQ_LAYOUT_GROUP_PLANAR ? "P" : "T",
             c->layout_v == CLKVQ_LAYOUT_GROUP_PLANAR ? "P" : "T",
             lc->param_type ? " fp8" : "", lc->zero_mode ? " int-zero" : "",
             c->permute ? " perm" : "", c->head_k[1] != c->head_k[0] ? " per-head" : "");
}

/* Appends n tokens to seq of the cache and of its model. */
static void append_both(clkvq_cache *cache, clkvq_ref_cache *model, int seq, int n, int d,
                        uint64_t seed, const char *label)
{
    size_t count = (size_t)KV_HEADS * n * d;
    float *k = malloc(count * sizeof(float) + 4), *v = malloc(count * sizeof(float) + 4);
    test_fill_normal(seed, k, count, 1.0f);
    test_fill_normal(seed + 7919, v, count, 2.0f);
    for (int h = 0; h < KV_HEADS; h++)
        for (int t = 0; t < n; t++)
            k[((size_t)h * n + t) * d + 3] *= 8.0f; /* an outlier channel */
    clkvq_status st = clkvq_cache_append(cache, 0, seq, n, k, v);
    ck_assert_msg(st == CLKVQ_OK, "%s: append: %s", label, clkvq_last_error(test_ctx()));
    clkvq_ref_cache_append(model, n, k, v);
    free(k);
    free(v);
}

/* A prefill chunk, then single tokens (the last three). */
static void fill(clkvq_cache *cache, clkvq_ref_cache *model, int seq, int n, int d, uint64_t seed,
                 const char *label)
{
    int done = 0;
    while (done < n) {
        int step = n - done > 3 ? n - done - 3 : 1;
        append_both(cache, model, seq, step, d, seed + (uint64_t)done, label);
        done += step;
    }
}

/* Checks the read-back against the model bit for bit and returns it. */
static void read_back(clkvq_cache *cache, clkvq_ref_cache *model, int seq, int d, float *k,
                      float *v, const char *label)
{
    int n = clkvq_ref_cache_length(model), got = -1;
    ck_assert_int_eq(clkvq_cache_length(cache, 0, seq, &got), CLKVQ_OK);
    ck_assert_msg(got == n, "%s: seq %d has %d tokens, the model %d", label, seq, got, n);
    size_t count = (size_t)KV_HEADS * n * d;
    float *rk = malloc(count * sizeof(float) + 4), *rv = malloc(count * sizeof(float) + 4);
    ck_assert_int_eq(clkvq_cache_read(cache, 0, seq, k, v), CLKVQ_OK);
    clkvq_ref_cache_read(model, rk, rv);
    size_t bad = 0;
    while (bad < count && k[bad] == rk[bad] && v[bad] == rv[bad])
        bad++;
    ck_assert_msg(bad == count, "%s: seq %d: read-back differs from the model at %zu", label, seq,
                  bad);
    free(rk);
    free(rv);
}

/* Worst relative error over query heads of out [n_q][stride] (query i at
 * offset i * d) against ref [n_q][d]. */
static double head_error(const float *out, size_t stride, const double *ref, int n_q, int d)
{
    double worst = 0.0;
    for (int h = 0; h < n_q; h++) {
        double num = 0.0, den = 0.0;
        for (int c = 0; c < d; c++) {
            double r = ref[(size_t)h * d + c], o = out[(size_t)h * stride + c];
            num += (o - r) * (o - r);
            den += r * r;
        }
        /* a row that sees no token (a sequence shorter than the queries)
         * must be zeros: absolute error there */
        double err = den > 0.0 ? sqrt(num / den) : sqrt(num);
        worst = err > worst || isnan(err) ? err : worst;
    }
    return worst;
}

/* Worst relative error of an nq-query decode (q [seq][query][head][d])
 * against the causal fp64 reference over the read-back. */
static double multi_query_error(clkvq_cache *cache, clkvq_ref_cache **model, int n_q, int d,
                                int nq, float scale, const char *label)
{
    clkvq_context *ctx = test_ctx();
    size_t q_count = (size_t)N_SEQS * nq * n_q * d;
    float *q = malloc(q_count * sizeof(float)), *out = malloc(q_count * sizeof(float));
    float *qt = malloc((size_t)n_q * nq * d * sizeof(float));
    double *ref = malloc((size_t)n_q * nq * d * sizeof(double)), worst = 0.0;
    test_fill_normal(7, q, q_count, 1.0f);
    cl_int err;
    cl_mem qm = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_COPY_HOST_PTR,
                               q_count * sizeof(float), q, &err);
    cl_mem om = clCreateBuffer(clkvq_context_cl_context(ctx), 0, q_count * sizeof(float), NULL,
                               &err);
    clkvq_status st = clkvq_cache_decode_multi(cache, 0, nq, qm, om, scale);
    ck_assert_msg(st == CLKVQ_OK, "%s: multi-query decode: %s", label, clkvq_last_error(ctx));
    clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), om, CL_TRUE, 0, q_count * sizeof(float), out,
                        0, NULL, NULL);
    for (int s = 0; s < N_SEQS; s++) {
        int n = clkvq_ref_cache_length(model[s]);
        size_t kv_count = (size_t)KV_HEADS * n * d;
        float *k = malloc(kv_count * sizeof(float) + 4), *v = malloc(kv_count * sizeof(float) + 4);
        clkvq_ref_cache_read(model[s], k, v);
        for (int i = 0; i < nq; i++)
            for (int h = 0; h < n_q; h++)
                memcpy(qt + ((size_t)h * nq + i) * d, q + (((size_t)s * nq + i) * n_q + h) * d,
                       (size_t)d * sizeof(float));
        clkvq_ref_attn_shape rs = {n_q, KV_HEADS, d, n, (size_t)n * d, nq, (size_t)nq * d, scale};
        clkvq_ref_attention(&rs, qt, k, v, ref);
        for (int i = 0; i < nq; i++)
            for (int h = 0; h < n_q; h++) {
                double e = head_error(out + (((size_t)s * nq + i) * n_q + h) * d, (size_t)d,
                                      ref + ((size_t)h * nq + i) * d, 1, d);
                worst = e > worst || isnan(e) ? e : worst;
            }
        free(k);
        free(v);
    }
    clReleaseMemObject(qm);
    clReleaseMemObject(om);
    free(q);
    free(out);
    free(qt);
    free(ref);
    return worst;
}

START_TEST(decode_sweep)
{
    double start = now_s();
    clkvq_context *ctx = test_ctx();
    decode_config c;
    decode_config_get(_i, &c);
    char label[192];
    describe(_i, &c, label, sizeof label);
    int d = c.head_dim, n_q = KV_HEADS * c.qpk;
    int32_t *perm_k = NULL, *perm_v = NULL;
    if (c.permute) {
        perm_k = test_random_perm(11 + (uint64_t)_i, KV_HEADS, d);
        perm_v = test_random_perm(12 + (uint64_t)_i, KV_HEADS, d);
        c.lc.perm_k = perm_k;
        c.lc.perm_v = perm_v;
    }
    if (c.head_k[1] != c.head_k[0]) {
        c.lc.head_format_k = c.head_k;
        c.lc.head_format_v = c.head_v;
    }
    int capacity = c.lengths[0] + 8;
    /* every other configuration in pages (of a kivi key group at least) */
    int block = _i % 2 ? (c.lc.scheme == CLKVQ_SCHEME_KIVI && c.lc.group_size > 32
                              ? c.lc.group_size
                              : 32)
                       : 0;
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = N_SEQS, .capacity = capacity,
                              .n_kv_heads = KV_HEADS, .n_q_heads = n_q, .head_dim = d,
                              .layout_k = c.layout_k, .layout_v = c.layout_v, .layers = &c.lc,
                              .block_size = block};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(ctx, &cfg, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s: create: %s", label, clkvq_last_error(ctx));
    st = clkvq_cache_set_tuning(cache, &c.tuning);
    ck_assert_msg(st == CLKVQ_OK, "%s: tuning: %s", label, clkvq_last_error(ctx));

    clkvq_ref_cache *model[N_SEQS];
    for (int s = 0; s < N_SEQS; s++) {
        model[s] = clkvq_ref_cache_create(&c.lc, KV_HEADS, d, capacity);
        fill(cache, model[s], s, c.lengths[s], d, 100 * (uint64_t)_i + 10 * (uint64_t)s, label);
    }
    if (c.truncate) { /* the fp16 window refilled from packed tokens */
        ck_assert_int_eq(clkvq_cache_truncate(cache, 0, c.lengths[0] - 20), CLKVQ_OK);
        clkvq_ref_cache_truncate(model[0], c.lengths[0] - 20);
        fill(cache, model[0], 0, 5, d, 5000 + (uint64_t)_i, label);
    }

    size_t q_count = (size_t)N_SEQS * n_q * d;
    float *q = malloc(q_count * sizeof(float)), *out = malloc(q_count * sizeof(float));
    double *ref = malloc((size_t)n_q * d * sizeof(double));
    test_fill_normal(99 + (uint64_t)_i, q, q_count, 1.0f);
    float scale = 1.0f / sqrtf((float)d);
    st = clkvq_cache_decode_host(cache, 0, q, out, scale);
    ck_assert_msg(st == CLKVQ_OK, "%s: decode: %s", label, clkvq_last_error(ctx));
    double worst = 0.0;
    for (int s = 0; s < N_SEQS; s++) {
        int n = clkvq_ref_cache_length(model[s]);
        size_t kv_count = (size_t)KV_HEADS * n * d;
        float *k = malloc(kv_count * sizeof(float) + 4), *v = malloc(kv_count * sizeof(float) + 4);
        read_back(cache, model[s], s, d, k, v, label);
        test_attention_reference(q + (size_t)s * n_q * d, k, v, n, n_q, c.qpk, d, scale, ref);
        for (int h = 0; h < n_q; h++) {
            double num = 0.0, den = 0.0;
            for (int ch = 0; ch < d; ch++) {
                double r = ref[(size_t)h * d + ch], o = out[((size_t)s * n_q + h) * d + ch];
                num += (o - r) * (o - r);
                den += r * r;
            }
            double err = n > 0 ? sqrt(num / den) : sqrt(num);
            worst = err > worst || isnan(err) ? err : worst;
        }
        free(k);
        free(v);
    }
    ck_assert_msg(worst <= TOLERANCE, "%s: decode relative error %.3g", label, worst);
    if (_i % 5 == 2) /* multi-query decode: 3 queries per sequence, causal */
        worst = multi_query_error(cache, model, n_q, d, 3, scale, label);
    ck_assert_msg(worst <= TOLERANCE, "%s: 3-query decode relative error %.3g", label, worst);
    printf("%s%s: ok (%.1f s)\n", label, block ? " paged" : "", now_s() - start);
    fflush(stdout);
    for (int s = 0; s < N_SEQS; s++)
        clkvq_ref_cache_free(model[s]);
    clkvq_cache_release(cache);
    free(q);
    free(out);
    free(ref);
    free(perm_k);
    free(perm_v);
}
END_TEST

/* ------------------------------------------------------------ CLBlast paths */

#define N_BLAS 4


/* Causal prefill (configurations 0-2: our softmax between CLBlast's batched
 * GEMMs) and the fp32 GEMV decode baseline (3), against fp64 attention over
 * the read-back. */
START_TEST(blas_sweep)
{
    static const struct {
        clkvq_scheme scheme;
        clkvq_format fk, fv;
        int head_dim, qpk, length, n_queries;
    } cases[N_BLAS] = {
        {CLKVQ_SCHEME_TOKEN, CLKVQ_FMT_Q4, CLKVQ_FMT_Q2, 64, 4, 40, 9},
        {CLKVQ_SCHEME_KIVI, CLKVQ_FMT_Q2, CLKVQ_FMT_Q2, 32, 7, 70, 5},
        {CLKVQ_SCHEME_SKVQ, CLKVQ_FMT_Q3, CLKVQ_FMT_T15, 128, 1, 50, 50},
        {CLKVQ_SCHEME_FP16, 0, 0, 64, 4, 45, 1},
    };
    double start = now_s();
    clkvq_context *ctx = test_ctx();
    int d = cases[_i].head_dim, qpk = cases[_i].qpk, n = cases[_i].length;
    int nq = cases[_i].n_queries, n_q = KV_HEADS * qpk;
    clkvq_layer_config lc = clkvq_layer_config_default(cases[_i].scheme);
    lc.format_k = cases[_i].fk;
    lc.format_v = cases[_i].fv;
    if (lc.scheme == CLKVQ_SCHEME_KIVI)
        lc.residual = 32;
    int32_t *perm = lc.scheme == CLKVQ_SCHEME_SKVQ ? test_random_perm(5, KV_HEADS, d) : NULL;
    lc.perm_k = lc.perm_v = perm;
    if (lc.scheme == CLKVQ_SCHEME_SKVQ)
        lc.window = 16;
    char label[128];
    snprintf(label, sizeof label, "%s %d/%d: %s d%d gqa%d, %d tokens, %d queries",
             _i < 3 ? "prefill" : "gemv decode", _i + 1, N_BLAS, clkvq_scheme_name(lc.scheme), d,
             qpk, n, nq);
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = 1, .capacity = n, .n_kv_heads = KV_HEADS,
                              .n_q_heads = n_q, .head_dim = d,
                              .layout_k = CLKVQ_LAYOUT_TOKEN_MAJOR,
                              .layout_v = CLKVQ_LAYOUT_TOKEN_MAJOR, .layers = &lc};
    clkvq_cache *cache = NULL;
    clkvq_status st = clkvq_cache_create(ctx, &cfg, &cache);
    ck_assert_msg(st == CLKVQ_OK, "%s: create: %s", label, clkvq_last_error(ctx));
    clkvq_ref_cache *model = clkvq_ref_cache_create(&lc, KV_HEADS, d, n);
    fill(cache, model, 0, n, d, 300 + (uint64_t)_i, label);
    size_t kv_count = (size_t)KV_HEADS * n * d, q_count = (size_t)n_q * nq * d;
    float *k = malloc(kv_count * sizeof(float)), *v = malloc(kv_count * sizeof(float));
    float *q = malloc(q_count * sizeof(float)), *out = malloc(q_count * sizeof(float));
    read_back(cache, model, 0, d, k, v, label);
    test_fill_normal(77 + (uint64_t)_i, q, q_count, 1.0f);
    float scale = 1.0f / sqrtf((float)d);
    if (_i < 3)
        st = clkvq_cache_prefill_host(cache, 0, 0, nq, q, out, scale);
    else {
        cl_context cl = clkvq_context_cl_context(ctx);
        cl_command_queue queue = clkvq_context_cl_queue(ctx);
        cl_int err;
        cl_mem bufs[4];
        const float *src[4] = {k, v, q, NULL};
        size_t sizes[4] = {kv_count, kv_count, q_count, q_count};
        for (int b = 0; b < 4; b++) {
            bufs[b] = clCreateBuffer(cl, CL_MEM_READ_WRITE | (src[b] ? CL_MEM_COPY_HOST_PTR : 0),
                                     sizes[b] * sizeof(float), (void *)src[b], &err);
            ck_assert_int_eq(err, CL_SUCCESS);
        }
        st = clkvq_gemv_decode(ctx, n_q, KV_HEADS, d, n, bufs[0], bufs[1], bufs[2], bufs[3],
                               scale);
        if (st == CLKVQ_OK)
            ck_assert_int_eq(clEnqueueReadBuffer(queue, bufs[3], CL_TRUE, 0,
                                                 q_count * sizeof(float), out, 0, NULL, NULL),
                             CL_SUCCESS);
        for (int b = 0; b < 4; b++)
            clReleaseMemObject(bufs[b]);
    }
    ck_assert_msg(st == CLKVQ_OK, "%s: %s", label, clkvq_last_error(ctx));
    /* query i sits at position n - nq + i and sees tokens 0..that */
    float *kp = malloc(kv_count * sizeof(float)), *vp = malloc(kv_count * sizeof(float));
    float *qi = malloc((size_t)n_q * d * sizeof(float));
    double *ref = malloc((size_t)n_q * d * sizeof(double)), worst = 0.0;
    for (int i = 0; i < nq; i++) {
        int len = n - nq + i + 1;
        for (int h = 0; h < KV_HEADS; h++) {
            memcpy(kp + (size_t)h * len * d, k + (size_t)h * n * d, (size_t)len * d * sizeof(float));
            memcpy(vp + (size_t)h * len * d, v + (size_t)h * n * d, (size_t)len * d * sizeof(float));
        }
        for (int h = 0; h < n_q; h++)
            memcpy(qi + (size_t)h * d, q + ((size_t)h * nq + i) * d, (size_t)d * sizeof(float));
        test_attention_reference(qi, kp, vp, len, n_q, qpk, d, scale, ref);
        double e = head_error(out + (size_t)i * d, (size_t)nq * d, ref, n_q, d);
        worst = e > worst || isnan(e) ? e : worst;
    }
    ck_assert_msg(worst <= TOLERANCE, "%s: relative error %.3g", label, worst);
    printf("%s: ok (%.1f s)\n", label, now_s() - start);
    fflush(stdout);
    clkvq_ref_cache_free(model);
    clkvq_cache_release(cache);
    free(perm);
    free(k);
    free(v);
    free(q);
    free(out);
    free(kp);
    free(vp);
    free(qi);
    free(ref);
}
END_TEST

int main(void)
{
    clkvq_device_info info;
    clkvq_context_device_info(test_ctx(), &info);
    printf("device: %s / %s; %d quantize, %d decode, %d CLBlast-path configurations\n",
           info.platform, info.name, N_QUANT, N_DECODE, N_BLAS);
    Suite *s = suite_create("oclgrind");
    TCase *tc = tcase_create("oclgrind");
    tcase_set_timeout(tc, 900);
    tcase_add_loop_test(tc, quantize_sweep, 0, N_QUANT);
    tcase_add_loop_test(tc, decode_sweep, 0, N_DECODE);
    tcase_add_loop_test(tc, blas_sweep, 0, N_BLAS);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
