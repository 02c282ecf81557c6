/* clkvq_eval_layer: the accuracy numbers the precision search and
 * clkvq-eval report. fp16 must measure only fp16 rounding, more bits must
 * mean less error, a window covering every token must look like fp16, the
 * storage count must match a hand computation, and bad arguments must be
 * refused with a message. And the clkvq-eval program: fits made on
 * another dump (--fit) are out of sample, rotated rows run. */
#include "test_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KV_HEADS 2
#define Q_HEADS 4
#define HEAD_DIM 128
#define TOKENS 300
#define QUERIES 12

typedef struct {
    float *q, *k, *v;
} eval_data;

/*
 * Synthetic keys/values (outlier channels, a sink) and queries that attend
 * somewhere: each query is the centered key of a nearby token, scaled so
 * its own token's logit stands about 4 above an average one, plus noise. Plain
 * Gaussian queries would spread attention evenly and hide key error.
 */
static eval_data make_data(uint64_t seed)
{
    eval_data d;
    size_t kv = (size_t)KV_HEADS * TOKENS * HEAD_DIM, qn = (size_t)Q_HEADS * TOKENS * HEAD_DIM;
    d.k = malloc(sizeof(float) * kv);
    d.v = malloc(sizeof(float) * kv);
    d.q = malloc(sizeof(float) * qn);
    clkvq_shape shape = {KV_HEADS, TOKENS, HEAD_DIM};
    ck_assert_int_eq(clkvq_synth_kv(seed, &shape, d.k, d.v), CLKVQ_OK);
    uint64_t s = seed * 31 + 7;
    double mean[HEAD_DIM];
    for (int h = 0; h < Q_HEADS; h++) {
        int kh = h / (Q_HEADS / KV_HEADS);
        const float *kb = d.k + (size_t)kh * TOKENS * HEAD_DIM;
        for (int c = 0; c < HEAD_DIM; c++) {
            mean[c] = 0.0;
            for (int t = 1; t < TOKENS; t++)
                mean[c] += kb[(size_t)t * HEAD_DIM + c] / (TOKENS - 1);
        }
        for (int t = 0; t < TOKENS; t++) {
            int j = t - (int)(test_uniform(&s) * 8.0);
            j = j < 0 ? 0 : j;
            double norm = 0.0, u[HEAD_DIM];
            for (int c = 0; c < HEAD_DIM; c++) {
                u[c] = kb[(size_t)j * HEAD_DIM + c] - mean[c];
                norm += u[c] * u[c];
            }
            /* q.u / sqrt(d) = 4: the chosen token's logit 4 above an
             * average one; noise at a fifth of the signal's norm */
            double gain = 4.0 * sqrt((double)HEAD_DIM) / (norm + 1e-9);
            double noise = 0.2 * gain * norm / sqrt((double)HEAD_DIM);
            float *qv = d.q + ((size_t)h * TOKENS + t) * HEAD_DIM;
            for (int c = 0; c < HEAD_DIM; c++)
                qv[c] = (float)(gain * u[c] + noise * test_normal(&s));
        }
    }
    return d;
}

static void free_data(eval_data *d)
{
    free(d->q);
    free(d->k);
    free(d->v);
}

static clkvq_eval_result run(const clkvq_layer_config *cfg, const eval_data *d)
{
    clkvq_eval_result r;
    clkvq_status st = clkvq_eval_layer(test_ctx(), cfg, Q_HEADS, KV_HEADS, TOKENS, HEAD_DIM, d->q,
                                       d->k, d->v, QUERIES, &r);
    ck_assert_msg(st == CLKVQ_OK, "eval %s: %s", clkvq_scheme_name(cfg->scheme),
                  clkvq_last_error(test_ctx()));
    return r;
}

static clkvq_layer_config token_config(clkvq_format f, int group)
{
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    lc.format_k = lc.format_v = f;
    lc.group_size = group;
    return lc;
}

/* fp16 storage: the only error is rounding K, V to half (2^-11 relative). */
START_TEST(fp16_is_rounding_only)
{
    eval_data d = make_data(1);
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_FP16);
    clkvq_eval_result r = run(&lc, &d);
    ck_assert_msg(r.rel_err < 1e-3 && r.k_rel_err < 1e-3 && r.v_rel_err < 1e-3 &&
                      r.cosine > 0.99999 && r.bits_per_element == 16.0 &&
                      r.n_queries == QUERIES,
                  "fp16: rel %.3g k %.3g v %.3g cos %.9f bits %g queries %d", r.rel_err,
                  r.k_rel_err, r.v_rel_err, r.cosine, r.bits_per_element, r.n_queries);
    free_data(&d);
}
END_TEST

/* Fewer bits, more error: q8 < q4 < q2 in output, K and V error. */
START_TEST(error_grows_as_bits_shrink)
{
    eval_data d = make_data(2);
    const clkvq_format fmts[3] = {CLKVQ_FMT_Q8, CLKVQ_FMT_Q4, CLKVQ_FMT_Q2};
    clkvq_eval_result r[3];
    for (int i = 0; i < 3; i++) {
        clkvq_layer_config lc = token_config(fmts[i], 32);
        r[i] = run(&lc, &d);
    }
    ck_assert_msg(r[0].rel_err < r[1].rel_err && r[1].rel_err < r[2].rel_err &&
                      r[0].k_rel_err < r[1].k_rel_err && r[1].k_rel_err < r[2].k_rel_err &&
                      r[0].v_rel_err < r[1].v_rel_err && r[1].v_rel_err < r[2].v_rel_err &&
                      r[0].cosine > r[2].cosine && r[2].rel_err > 1e-3,
                  "q8/q4/q2 rel %.3g %.3g %.3g, k %.3g %.3g %.3g, v %.3g %.3g %.3g", r[0].rel_err,
                  r[1].rel_err, r[2].rel_err, r[0].k_rel_err, r[1].k_rel_err, r[2].k_rel_err,
                  r[0].v_rel_err, r[1].v_rel_err, r[2].v_rel_err);
    free_data(&d);
}
END_TEST

/* A window over every token: nothing is packed, so skvq k2v1.5 measures
 * exactly what fp16 does, and costs 16 bits. */
START_TEST(skvq_full_window_is_fp16)
{
    eval_data d = make_data(3);
    clkvq_layer_config fp = clkvq_layer_config_default(CLKVQ_SCHEME_FP16);
    clkvq_eval_result ref = run(&fp, &d);
    clkvq_layer_config lc = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    lc.format_k = CLKVQ_FMT_Q2;
    lc.format_v = CLKVQ_FMT_T15;
    lc.window = TOKENS;
    lc.clip_k = lc.clip_v = 0.92f;
    clkvq_eval_result r = run(&lc, &d);
    ck_assert_msg(r.rel_err < 1e-3 && fabs(r.rel_err - ref.rel_err) < 1e-5 &&
                      r.k_rel_err == ref.k_rel_err && r.v_rel_err == ref.v_rel_err &&
                      r.bits_per_element == 16.0,
                  "skvq full window: rel %.6g (fp16 %.6g) k %.3g v %.3g bits %g", r.rel_err,
                  ref.rel_err, r.k_rel_err, r.v_rel_err, r.bits_per_element);
    free_data(&d);
}
END_TEST

/* Storage counted by hand for the state after TOKENS = 300 tokens. */
START_TEST(bits_match_hand_count)
{
    eval_data d = make_data(4);
    const double elems = (double)TOKENS * HEAD_DIM;

    /* token q4 g32, fp16 params: 4 + 32/32 = 5 exactly. */
    clkvq_layer_config t4 = token_config(CLKVQ_FMT_Q4, 32);
    clkvq_eval_result r_t4 = run(&t4, &d);

    /* token q4 g128 fp8 params: 4 + 16/128 = 4.125. */
    clkvq_layer_config t4f8 = token_config(CLKVQ_FMT_Q4, 128);
    t4f8.param_type = CLKVQ_PARAM_FP8_E4M3;
    clkvq_eval_result r_t4f8 = run(&t4f8, &d);

    /* skvq q4/t1.5 g128 w64 s5: 5 sinks + 64 window tokens fp16, 231
     * packed; q4 row 64 code bytes + 4 param bytes, t1.5 row 26 + 4. */
    clkvq_layer_config sk = clkvq_layer_config_default(CLKVQ_SCHEME_SKVQ);
    sk.format_k = CLKVQ_FMT_Q4;
    sk.format_v = CLKVQ_FMT_T15;
    sk.window = 64;
    clkvq_eval_result r_sk = run(&sk, &d);
    double fp_bits = 69.0 * 16 * HEAD_DIM;
    double sk_k = (231.0 * 8 * (64 + 4) + fp_bits) / elems;
    double sk_v = (231.0 * 8 * (26 + 4) + fp_bits) / elems;

    /* kivi q2/q2 g32 R128: K packs whole blocks of 128 (256 tokens; per
     * channel, 8 groups of 32 tokens x 128 channels, 8 code + 4 param
     * bytes each), 44 fp16; V keeps the last 128 fp16, packs 172 rows of
     * 4 groups x (8 + 4) bytes. */
    clkvq_layer_config kv = clkvq_layer_config_default(CLKVQ_SCHEME_KIVI);
    kv.format_k = kv.format_v = CLKVQ_FMT_Q2;
    clkvq_eval_result r_kv = run(&kv, &d);
    double kv_k = (8.0 * 128 * 8 * 12 + 44.0 * 16 * HEAD_DIM) / elems;
    double kv_v = (172.0 * 4 * 8 * 12 + 128.0 * 16 * HEAD_DIM) / elems;

    /* bits_long: the packed size alone (no sinks, window or residual):
     * skvq K q4 g128 fp16 params 4.25, V t1.5 26 bytes + 4 per 128 = 1.875;
     * kivi K per channel 32 tokens (8 code + 4 param bytes) 3, V 3 */
    ck_assert_msg(r_t4.bits_long == 5.0 && r_t4f8.bits_long == 4.125 &&
                      r_sk.bits_long == 0.5 * (4.25 + 1.875) && r_kv.bits_long == 3.0,
                  "bits_long: token q4 %.6g, g128 fp8 %.6g, skvq %.6g, kivi %.6g",
                  r_t4.bits_long, r_t4f8.bits_long, r_sk.bits_long, r_kv.bits_long);
    /* the sums behind the ratios */
    const clkvq_eval_result *all[4] = {&r_t4, &r_t4f8, &r_sk, &r_kv};
    for (int i = 0; i < 4; i++)
        ck_assert_msg(all[i]->ref_sq > 0 && all[i]->k_ref_sq > 0 && all[i]->v_ref_sq > 0 &&
                          all[i]->rel_err == sqrt(all[i]->err_sq / all[i]->ref_sq) &&
                          all[i]->k_rel_err == sqrt(all[i]->k_err_sq / all[i]->k_ref_sq) &&
                          all[i]->v_rel_err == sqrt(all[i]->v_err_sq / all[i]->v_ref_sq),
                      "row %d: sums %.6g/%.6g do not give rel_err %.6g", i, all[i]->err_sq,
                      all[i]->ref_sq, all[i]->rel_err);
    ck_assert_msg(r_t4.bits_per_element == 5.0 && r_t4f8.bits_per_element == 4.125 &&
                      fabs(r_sk.bits_per_element - 0.5 * (sk_k + sk_v)) < 1e-12 &&
                      fabs(r_kv.bits_per_element - 0.5 * (kv_k + kv_v)) < 1e-12,
                  "bits: token q4 %.6g (5), token q4 g128 fp8 %.6g (4.125), skvq %.6g (%.6g), "
                  "kivi %.6g (%.6g)",
                  r_t4.bits_per_element, r_t4f8.bits_per_element, r_sk.bits_per_element,
                  0.5 * (sk_k + sk_v), r_kv.bits_per_element, 0.5 * (kv_k + kv_v));
    free_data(&d);
}
END_TEST

/* Every query evaluated (n_queries == n_tokens: no prefill at all) works. */
START_TEST(all_positions_as_queries)
{
    enum { N = 40 };
    float *q = malloc(sizeof(float) * Q_HEADS * N * HEAD_DIM);
    float *k = malloc(sizeof(float) * KV_HEADS * N * HEAD_DIM);
    float *v = malloc(sizeof(float) * KV_HEADS * N * HEAD_DIM);
    test_fill_normal(5, q, (size_t)Q_HEADS * N * HEAD_DIM, 1.0f);
    test_fill_normal(6, k, (size_t)KV_HEADS * N * HEAD_DIM, 1.0f);
    test_fill_normal(7, v, (size_t)KV_HEADS * N * HEAD_DIM, 1.0f);
    clkvq_layer_config lc = token_config(CLKVQ_FMT_Q8, 32);
    clkvq_eval_result r;
    clkvq_status st =
        clkvq_eval_layer(test_ctx(), &lc, Q_HEADS, KV_HEADS, N, HEAD_DIM, q, k, v, N, &r);
    ck_assert_msg(st == CLKVQ_OK && r.n_queries == N && r.rel_err < 0.02 && r.cosine > 0.999,
                  "st %d (%s) rel %.3g cos %.6f", (int)st, clkvq_last_error(test_ctx()),
                  r.rel_err, r.cosine);
    free(q);
    free(k);
    free(v);
}
END_TEST

START_TEST(bad_arguments)
{
    eval_data d = make_data(8);
    clkvq_context *ctx = test_ctx();
    clkvq_layer_config lc = token_config(CLKVQ_FMT_Q4, 32);
    clkvq_eval_result r;
    const int H = HEAD_DIM;
    clkvq_status st[10];
    st[0] = clkvq_eval_layer(NULL, &lc, Q_HEADS, KV_HEADS, TOKENS, H, d.q, d.k, d.v, 4, &r);
    st[1] = clkvq_eval_layer(ctx, NULL, Q_HEADS, KV_HEADS, TOKENS, H, d.q, d.k, d.v, 4, &r);
    st[2] = clkvq_eval_layer(ctx, &lc, Q_HEADS, KV_HEADS, TOKENS, H, d.q, d.k, d.v, 0, &r);
    st[3] = clkvq_eval_layer(ctx, &lc, Q_HEADS, KV_HEADS, TOKENS, H, d.q, d.k, d.v, TOKENS + 1,
                             &r);
    st[4] = clkvq_eval_layer(ctx, &lc, 3, KV_HEADS, TOKENS, H, d.q, d.k, d.v, 4, &r);
    st[5] = clkvq_eval_layer(ctx, &lc, Q_HEADS, KV_HEADS, TOKENS, H, d.q, d.k, NULL, 4, &r);
    st[6] = clkvq_eval_layer(ctx, &lc, Q_HEADS, KV_HEADS, 0, H, d.q, d.k, d.v, 1, &r);
    /* group 48 is not a multiple of 32: the cache refuses the config */
    clkvq_layer_config bad = lc;
    bad.group_size = 48;
    st[7] = clkvq_eval_layer(ctx, &bad, Q_HEADS, KV_HEADS, TOKENS, H, d.q, d.k, d.v, 4, &r);
    d.q[5] = NAN;
    st[8] = clkvq_eval_layer(ctx, &lc, Q_HEADS, KV_HEADS, TOKENS, H, d.q, d.k, d.v, 4, &r);
    d.q[5] = 0.0f;
    d.k[(size_t)(TOKENS - 2) * H] = INFINITY; /* a decode-step token */
    st[9] = clkvq_eval_layer(ctx, &lc, Q_HEADS, KV_HEADS, TOKENS, H, d.q, d.k, d.v, 4, &r);
    const char *msg = clkvq_last_error(ctx);
    ck_assert_msg(st[0] == CLKVQ_ERR_INVALID_ARG && st[1] == CLKVQ_ERR_INVALID_ARG &&
                      st[2] == CLKVQ_ERR_INVALID_ARG && st[3] == CLKVQ_ERR_INVALID_ARG &&
                      st[4] == CLKVQ_ERR_INVALID_ARG && st[5] == CLKVQ_ERR_INVALID_ARG &&
                      st[6] == CLKVQ_ERR_INVALID_ARG && st[7] != CLKVQ_OK &&
                      st[8] == CLKVQ_ERR_NONFINITE && st[9] == CLKVQ_ERR_NONFINITE &&
                      msg[0] != '\0',
                  "statuses %d %d %d %d %d %d %d %d %d %d, last message '%s'", st[0], st[1],
                  st[2], st[3], st[4], st[5], st[6], st[7], st[8], st[9], msg);
    free_data(&d);
}
END_TEST


/* ------------------------------------------------------------ clkvq-eval */

#define TL 2   /* layers */
#define TH 2   /* kv heads = q heads */
#define TD 32  /* head_dim: skvq's default group becomes 32 */
#define TT 200 /* tokens */

/* A dump whose values carry a per-channel offset `sign` * 6 sin(c) and
 * heavy tails scaled by `tail`: centering and clips fitted on one sign
 * and tail are wrong for the other. Queries copy (scaled) the key of a
 * recent token, so attention is peaked. */
static void tool_dump(const char *path, double sign, float tail, uint64_t seed)
{
    size_t n = (size_t)TH * TT * TD;
    float *q[TL], *k[TL], *v[TL];
    uint64_t s = seed;
    for (int l = 0; l < TL; l++) {
        q[l] = malloc(sizeof(float) * n);
        k[l] = malloc(sizeof(float) * n);
        v[l] = malloc(sizeof(float) * n);
        for (size_t i = 0; i < n; i++) {
            int c = (int)(i % TD);
            double z = test_normal(&s);
            k[l][i] = (float)(test_normal(&s) + 2.0 * sign * cos(c));
            v[l][i] = (float)(6.0 * sign * sin(c + l) + z * (fabs(z) > 2.0 ? tail : 1.0f));
        }
        for (int h = 0; h < TH; h++)
            for (int t = 0; t < TT; t++) {
                int j = t - (int)(test_uniform(&s) * 4.0);
                j = j < 0 ? 0 : j;
                for (int c = 0; c < TD; c++)
                    q[l][((size_t)h * TT + t) * TD + c] =
                        0.8f * k[l][((size_t)h * TT + j) * TD + c] + (float)test_normal(&s) * 0.1f;
            }
    }
    clkvq_dump_info info;
    memset(&info, 0, sizeof info);
    info.n_layers = TL;
    info.n_q_heads = info.n_kv_heads = TH;
    info.n_tokens = TT;
    info.head_dim = TD;
    clkvq_status st = clkvq_dump_write(test_ctx(), path, &info, (const float *const *)q,
                                       (const float *const *)k, (const float *const *)v, 0);
    ck_assert_msg(st == CLKVQ_OK, "%s", clkvq_last_error(test_ctx()));
    for (int l = 0; l < TL; l++) {
        free(q[l]);
        free(k[l]);
        free(v[l]);
    }
}

/* clkvq-eval's JSON for the given arguments (malloc'd), its exit status in *rc. */
static char *run_tool(const char *args, int *rc)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "'%s' --json --queries 24 %s 2>/dev/null", CLKVQ_EVAL_BIN, args);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    size_t cap = 1 << 16, len = 0;
    char *out = calloc(cap, 1);
    while (len + 1 < cap && fgets(out + len, (int)(cap - len), p))
        len += strlen(out + len);
    *rc = pclose(p);
    return out;
}

/* A number of the result row of `scheme` ("rel_err", "bits_long", ...). */
static double row_number(const char *json, const char *scheme, const char *key)
{
    char needle[256];
    snprintf(needle, sizeof needle, "{\"scheme\": \"%s\"", scheme);
    const char *row = strstr(json, needle);
    ck_assert_msg(row != NULL, "no row %s in\n%s", scheme, json);
    snprintf(needle, sizeof needle, "\"%s\": ", key);
    const char *at = strstr(row, needle);
    ck_assert_msg(at != NULL, "row %s has no %s", scheme, key);
    return atof(at + strlen(needle));
}

static const char *row_text(const char *json, const char *scheme, const char *key, char *buf,
                            size_t size)
{
    char needle[256];
    snprintf(needle, sizeof needle, "{\"scheme\": \"%s\"", scheme);
    const char *row = strstr(json, needle);
    ck_assert_ptr_nonnull(row);
    snprintf(needle, sizeof needle, "\"%s\": ", key);
    const char *at = strstr(row, needle);
    ck_assert_ptr_nonnull(at);
    at += strlen(needle);
    size_t n = strcspn(at, ",}");
    snprintf(buf, size, "%.*s", (int)(n < size - 1 ? n : size - 1), at);
    return buf;
}

/*
 * Fitted on dump A itself (in-sample), fitted on B (--fit B: out of
 * sample) and fitted on A through --fit A. B's offsets have the other sign
 * and its tails are heavier, so its means and clips are wrong for A: the
 * out-of-sample row must be worse, --fit A must give the in-sample numbers
 * exactly, and the JSON must say which is which. Rows with rotation (the
 * three rotation spec strings among them) run and report bits_long.
 */
START_TEST(tool_fit_is_out_of_sample)
{
    char a[64], b[64];
    snprintf(a, sizeof a, "/tmp/clkvq-eval-a-XXXXXX");
    snprintf(b, sizeof b, "/tmp/clkvq-eval-b-XXXXXX");
    int fa = mkstemp(a), fb = mkstemp(b);
    ck_assert(fa >= 0 && fb >= 0);
    close(fa);
    close(fb);
    tool_dump(a, 1.0, 1.0f, 1);
    tool_dump(b, -1.0, 6.0f, 2);
    const char *fitted = "token:k2v2:g32:center:calib";
    const char *rows = "--scheme fp16 --scheme token:k2v2:g32:center:calib "
                       "--scheme skvq:k2v2:g32:w128:s5:rot:calib "
                       "--scheme skvq:k2v1.5:g32:w128:s5:rot:calib "
                       "--scheme skvq:k3v2:g32:w128:s5:fp8:rot:calib "
                       "--scheme skvq:k3v2:w64:s5:kc:fp8:rot7:center:calib";
    char args[1024];
    int rc_in, rc_out, rc_self;
    snprintf(args, sizeof args, "--calib %s %s", a, rows);
    char *in = run_tool(args, &rc_in);
    snprintf(args, sizeof args, "--calib %s --fit %s %s", a, b, rows);
    char *out = run_tool(args, &rc_out);
    snprintf(args, sizeof args, "--calib %s --fit %s %s", a, a, rows);
    char *self = run_tool(args, &rc_self);
    ck_assert_msg(rc_in == 0 && rc_out == 0 && rc_self == 0, "exit %d %d %d\n%s\n%s", rc_in,
                  rc_out, rc_self, in, out);

    double e_in = row_number(in, fitted, "rel_err"), e_out = row_number(out, fitted, "rel_err"),
           e_self = row_number(self, fitted, "rel_err");
    ck_assert_msg(e_out > 1.2 * e_in && e_self == e_in,
                  "in-sample %.6g, fitted on the other dump %.6g, --fit on itself %.6g", e_in,
                  e_out, e_self);
    char buf[64];
    ck_assert_str_eq(row_text(in, fitted, "fitted", buf, sizeof buf), "\"in-sample\"");
    ck_assert_str_eq(row_text(in, fitted, "in_sample", buf, sizeof buf), "true");
    ck_assert_str_eq(row_text(out, fitted, "fitted", buf, sizeof buf), "\"out-of-sample\"");
    ck_assert_str_eq(row_text(out, fitted, "in_sample", buf, sizeof buf), "false");
    ck_assert_str_eq(row_text(out, "fp16", "fitted", buf, sizeof buf), "\"-\"");
    /* nothing fitted: the same number either way */
    ck_assert_double_eq(row_number(in, "fp16", "rel_err"), row_number(out, "fp16", "rel_err"));

    /* the rotated rows ran, with the storage they should have */
    const char *named[] = {"skvq:k2v2:g32:w128:s5:rot:calib", "skvq:k2v1.5:g32:w128:s5:rot:calib",
                           "skvq:k3v2:g32:w128:s5:fp8:rot:calib",
                           "skvq:k3v2:w64:s5:kc:fp8:rot7:center:calib"};
    const double bits_long[] = {3.0, 0.5 * (3.0 + 2.75), 3.0, 3.0};
    for (int i = 0; i < 4; i++) {
        double e = row_number(out, named[i], "rel_err"), bl = row_number(out, named[i], "bits_long");
        ck_assert_msg(e > 1e-4 && e < 1.0 && bl == bits_long[i], "%s: rel_err %.6g bits_long %.6g",
                      named[i], e, bl);
    }

    /* every example spec of --help runs on this head_dim-32 dump (skvq's
     * default group follows the head) */
    char cmd[512], word[256], examples[1024] = "";
    snprintf(cmd, sizeof cmd, "'%s' --help", CLKVQ_EVAL_BIN);
    FILE *help = popen(cmd, "r");
    ck_assert_ptr_nonnull(help);
    int n_examples = 0;
    while (fscanf(help, "%255s", word) == 1)
        if ((!strcmp(word, "fp16") || !strncmp(word, "token:", 6) || !strncmp(word, "kivi:", 5) ||
             (!strncmp(word, "skvq:", 5) && word[5])) &&
            !strstr(examples, word)) {
            size_t len = strlen(examples);
            snprintf(examples + len, sizeof examples - len, " --scheme %s", word);
            n_examples++;
        }
    ck_assert_int_eq(pclose(help), 0);
    snprintf(args, sizeof args, "--calib %s%s", a, examples);
    char *ex = run_tool(args, &rc_in);
    ck_assert_msg(rc_in == 0 && n_examples >= 8, "%d examples:%s\nexit %d", n_examples, examples,
                  rc_in);
    free(ex);
    free(in);
    free(out);
    free(self);
    unlink(a);
    unlink(b);
}
END_TEST

/* Writes a config: every layer's head 0 on (k0, v0) bits, head 1 on (k1, v1). */
static void write_head_config(const char *path, int k0, int v0, int k1, int v1)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    for (int l = 0; l < TL; l++)
        fprintf(f, "%d:\n  0: {nbits_key: %d, nbits_value: %d}\n"
                   "  1: {nbits_key: %d, nbits_value: %d}\n",
                l, k0, v0, k1, v1);
    fclose(f);
}

/* clkvq-eval on a per-head config: each kv head (and its query head) keeps
 * its own pair, so the error and bits land between the two uniform
 * configs' (the error sums over heads), and a head count other than the
 * dump's is refused. */
START_TEST(tool_runs_per_head_configs)
{
    char dump[64], dir[64];
    snprintf(dump, sizeof dump, "/tmp/clkvq-eval-h-XXXXXX");
    snprintf(dir, sizeof dir, "/tmp/clkvq-eval-hd-XXXXXX");
    int fd = mkstemp(dump);
    ck_assert(fd >= 0 && mkdtemp(dir));
    close(fd);
    tool_dump(dump, 1.0, 1.0f, 3);
    char hi[128], lo[128], mixed[128], bad[128];
    snprintf(hi, sizeof hi, "%s/k4v4.yaml", dir);
    snprintf(lo, sizeof lo, "%s/k2v2.yaml", dir);
    snprintf(mixed, sizeof mixed, "%s/mixed.yaml", dir);
    snprintf(bad, sizeof bad, "%s/three.yaml", dir);
    write_head_config(hi, 4, 4, 4, 4);
    write_head_config(lo, 2, 2, 2, 2);
    write_head_config(mixed, 4, 4, 2, 2);
    char args[1024];
    snprintf(args, sizeof args, "--calib %s --config %s --config %s --config %s", dump, hi, lo,
             mixed);
    int rc;
    char *json = run_tool(args, &rc);
    ck_assert_msg(rc == 0, "exit %d\n%s", rc, json);
    double e_hi = row_number(json, "k4v4.yaml", "rel_err"), e_lo = row_number(json, "k2v2.yaml",
                                                                             "rel_err");
    double e_mix = row_number(json, "mixed.yaml", "rel_err");
    double b_hi = row_number(json, "k4v4.yaml", "bits_long");
    double b_lo = row_number(json, "k2v2.yaml", "bits_long");
    double b_mix = row_number(json, "mixed.yaml", "bits_long");
    ck_assert_msg(e_hi < e_mix && e_mix < e_lo, "rel_err k4v4 %.6g, mixed %.6g, k2v2 %.6g", e_hi,
                  e_mix, e_lo);
    ck_assert_msg(fabs(b_mix - 0.5 * (b_hi + b_lo)) < 1e-9, "bits_long %.6g %.6g %.6g", b_hi,
                  b_mix, b_lo);
    free(json);
    FILE *f = fopen(bad, "w");
    ck_assert_ptr_nonnull(f);
    for (int l = 0; l < TL; l++)
        fprintf(f, "%d:\n  0: {nbits_key: 4, nbits_value: 4}\n  1: {nbits_key: 2, nbits_value: "
                   "2}\n  2: {nbits_key: 2, nbits_value: 2}\n",
                l);
    fclose(f);
    snprintf(args, sizeof args, "--calib %s --config %s", dump, bad);
    json = run_tool(args, &rc);
    ck_assert_int_ne(rc, 0);
    free(json);
    unlink(hi);
    unlink(lo);
    unlink(mixed);
    unlink(bad);
    rmdir(dir);
    unlink(dump);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("eval");
    TCase *tc = tcase_create("eval");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, fp16_is_rounding_only);
    tcase_add_test(tc, error_grows_as_bits_shrink);
    tcase_add_test(tc, skvq_full_window_is_fp16);
    tcase_add_test(tc, bits_match_hand_count);
    tcase_add_test(tc, all_positions_as_queries);
    tcase_add_test(tc, bad_arguments);
    tcase_add_test(tc, tool_fit_is_out_of_sample);
    tcase_add_test(tc, tool_runs_per_head_configs);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
