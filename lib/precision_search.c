/*
 * KVTuner's layer precision search (clkvq_precision_search): measure each
 * layer under each (key bits, value bits) pair on a calibration dump,
 * prune, cluster, and solve the multiple-choice knapsack exactly.
 *
 * Error: what clkvq-eval reports for a config, pooled over layers,
 *   E = sqrt(sum_l N_l / sum_l D_l),
 * N_l = sum over heads and evaluated queries of |o - o_ref|^2 under the
 * layer's pair, D_l = sum of |o_ref|^2 (the fp64 reference over the
 * original K/V: the same for every pair). Both tools measure a layer with
 * the others unquantized, so this is an identity, not an approximation,
 * and since sqrt is monotone, minimizing E is the additive knapsack with
 * cost[l][p] = N_lp / sum_j D_j; a front point's error is sqrt(its cost).
 *
 * Weights: KVTuner's average (bits_k + bits_v) / 2, or bits_long (codes +
 * params per element). Both are exact multiples of 1/64 bit for every
 * group of up to 512 (bits in {8, 4, 3, 2, 1.5}, params 16 or 32 bits per
 * group), so the knapsack runs over integer 64ths and is exact; a pair
 * that is not is refused rather than rounded.
 */
#include "internal.h"
#include "quant_format.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_PAIRS 32
#define KMEANS_ITERS 50
#define UNITS_PER_BIT 64

struct clkvq_search_result {
    int n_layers, n_pairs, n_q_heads, n_kv_heads, head_dim;
    char model[128];
    clkvq_layer_config defaults;
    clkvq_bit_pair pairs[MAX_PAIRS];
    clkvq_search_weight weight;
    int units[MAX_PAIRS]; /* weight of each pair, 64ths of a bit */
    double *err;      /* [layer][pair] relative error, -1 where pruned */
    double *err_sq;   /* [layer][pair] N: squared output error */
    double *ref_sq;   /* [layer] D: squared reference output */
    double *bpe;      /* [layer][pair] bits/element, ours */
    double *bits_long;/* [layer][pair] */
    float *clip;      /* [layer][pair][2] fitted clips */
    int32_t **perm;   /* [layer][2] fitted perms or NULL */
    float **mean;     /* [layer][2] fitted means or NULL */
    int fitted;       /* clips come from clip[] */
    double latency_us[MAX_PAIRS]; /* measured decode time per layer, < 0 unknown */
    int n_front;
    clkvq_front_point *front;
    int *choices;     /* [front][layer] */
};

static double pair_bits(const clkvq_bit_pair *p)
{
    return (atof(clkvq_format_get(p->format_k)->bits_name) +
            atof(clkvq_format_get(p->format_v)->bits_name)) / 2.0;
}

void clkvq_search_free(clkvq_search_result *res)
{
    if (!res)
        return;
    for (int i = 0; res->perm && i < 2 * res->n_layers; i++)
        free(res->perm[i]);
    for (int i = 0; res->mean && i < 2 * res->n_layers; i++)
        free(res->mean[i]);
    free(res->perm);
    free(res->mean);
    free(res->err);
    free(res->err_sq);
    free(res->ref_sq);
    free(res->bpe);
    free(res->bits_long);
    free(res->clip);
    free(res->front);
    free(res->choices);
    free(res);
}

/* ------------------------------------------------------------ measuring */

/* Layer l under pair p: the defaults, the pair's formats, the layer's
 * rotation seed, and what was fitted. */
static clkvq_layer_config layer_config(const clkvq_search_result *res, int l, int p)
{
    clkvq_layer_config lc = res->defaults;
    lc.format_k = res->pairs[p].format_k;
    lc.format_v = res->pairs[p].format_v;
    lc.rot_seed = res->defaults.rot_seed + (uint32_t)l; /* as clkvq-eval's and a config's */
    if (res->perm) {
        lc.perm_k = res->perm[2 * l];
        lc.perm_v = res->perm[2 * l + 1];
    }
    if (res->mean) {
        lc.mean_k = res->mean[2 * l];
        lc.mean_v = res->mean[2 * l + 1];
    }
    if (res->fitted) {
        lc.clip_k = res->clip[((size_t)l * res->n_pairs + p) * 2];
        lc.clip_v = res->clip[((size_t)l * res->n_pairs + p) * 2 + 1];
    }
    return lc;
}

/* The fits of layer l on the dump: means and perms once (they do not
 * depend on the bits), a clip per (tensor, format), reused by every pair
 * with that format. */
static clkvq_status fit_layer(clkvq_context *ctx, clkvq_search_result *res, int l,
                              unsigned fit, const clkvq_dump_info *info, const float *k,
                              const float *v)
{
    const size_t hd = (size_t)info->n_kv_heads * info->head_dim;
    unsigned once = fit & (CLKVQ_FIT_MEAN | CLKVQ_FIT_PERM);
    clkvq_calib_options opt = {.fit = once};
    float *means[2] = {NULL, NULL};
    int32_t *perms[2] = {NULL, NULL};
    for (int i = 0; i < 2; i++) {
        if ((once & (i ? CLKVQ_FIT_MEAN_V : CLKVQ_FIT_MEAN_K)) &&
            !(means[i] = res->mean[2 * l + i] = malloc(sizeof(float) * hd)))
            return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search: means");
        if ((once & (i ? CLKVQ_FIT_PERM_V : CLKVQ_FIT_PERM_K)) &&
            !(perms[i] = res->perm[2 * l + i] = malloc(sizeof(int32_t) * hd)))
            return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search: permutations");
    }
    opt.mean_k = means[0];
    opt.mean_v = means[1];
    opt.perm_k = perms[0];
    opt.perm_v = perms[1];
    clkvq_layer_config lc = layer_config(res, l, 0), out = lc;
    clkvq_status st = once ? clkvq_calibrate_layer(ctx, &lc, info->n_kv_heads, info->n_tokens,
                                                   info->head_dim, k, v, &opt, &out)
                           : CLKVQ_OK;
    if (st != CLKVQ_OK)
        return st;
    for (int i = 0; i < 2; i++) { /* what a fit left unset (a key perm per channel) */
        const int32_t *got = i ? out.perm_v : out.perm_k;
        if (perms[i] && !got) {
            free(perms[i]);
            res->perm[2 * l + i] = NULL;
        }
    }
    for (int p = 0; p < res->n_pairs; p++) {
        float *clip = res->clip + ((size_t)l * res->n_pairs + p) * 2;
        clip[0] = res->defaults.clip_k;
        clip[1] = res->defaults.clip_v;
        clkvq_calib_options copt = {.fit = 0};
        for (int i = 0; i < 2; i++) {
            if (!(fit & (i ? CLKVQ_FIT_CLIP_V : CLKVQ_FIT_CLIP_K)))
                continue;
            int reuse = -1;
            for (int q = 0; q < p && reuse < 0; q++)
                if ((i ? res->pairs[q].format_v == res->pairs[p].format_v
                       : res->pairs[q].format_k == res->pairs[p].format_k))
                    reuse = q;
            if (reuse >= 0)
                clip[i] = res->clip[((size_t)l * res->n_pairs + reuse) * 2 + i];
            else
                copt.fit |= i ? CLKVQ_FIT_CLIP_V : CLKVQ_FIT_CLIP_K;
        }
        if (!copt.fit)
            continue;
        lc = layer_config(res, l, p);
        if ((st = clkvq_calibrate_layer(ctx, &lc, info->n_kv_heads, info->n_tokens,
                                        info->head_dim, k, v, &copt, &out)) != CLKVQ_OK)
            return st;
        if (copt.fit & CLKVQ_FIT_CLIP_K)
            clip[0] = out.clip_k;
        if (copt.fit & CLKVQ_FIT_CLIP_V)
            clip[1] = out.clip_v;
    }
    return CLKVQ_OK;
}

static clkvq_status measure(clkvq_context *ctx, clkvq_search_result *res,
                            const clkvq_kv_dump *dump, const clkvq_dump_info *info,
                            const clkvq_search_options *opt, unsigned fit)
{
    size_t kv = (size_t)info->n_kv_heads * info->n_tokens * info->head_dim;
    size_t qn = (size_t)info->n_q_heads * info->n_tokens * info->head_dim;
    float *q = malloc(qn * sizeof(float)), *k = malloc(kv * sizeof(float)),
          *v = malloc(kv * sizeof(float));
    clkvq_status st = q && k && v ? CLKVQ_OK
                                  : clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search: layer data");
    int n_queries = opt->n_queries > 0 ? opt->n_queries : CLKVQ_DEFAULT_QUERIES;
    if (n_queries > info->n_tokens)
        n_queries = info->n_tokens;
    int done = 0, total = res->n_layers * res->n_pairs;
    for (int l = 0; l < res->n_layers && st == CLKVQ_OK; l++) {
        if ((st = clkvq_dump_read(dump, l, 'q', q)) != CLKVQ_OK ||
            (st = clkvq_dump_read(dump, l, 'k', k)) != CLKVQ_OK ||
            (st = clkvq_dump_read(dump, l, 'v', v)) != CLKVQ_OK)
            break;
        if (fit)
            st = fit_layer(ctx, res, l, fit, info, k, v);
        for (int p = 0; p < res->n_pairs && st == CLKVQ_OK; p++) {
            clkvq_layer_config lc = layer_config(res, l, p);
            clkvq_eval_result ev;
            st = clkvq_eval_layer(ctx, &lc, info->n_q_heads, info->n_kv_heads, info->n_tokens,
                                  info->head_dim, q, k, v, n_queries, &ev);
            if (st != CLKVQ_OK)
                break;
            size_t i = (size_t)l * res->n_pairs + p;
            res->err[i] = ev.rel_err;
            res->err_sq[i] = ev.err_sq;
            res->ref_sq[l] = ev.ref_sq; /* the reference: the same for every pair */
            res->bpe[i] = ev.bits_per_element;
            res->bits_long[i] = ev.bits_long;
            if (opt->progress) {
                char what[96];
                snprintf(what, sizeof what, "layer %d K%sV%s: error %.4f", l,
                         clkvq_format_get(lc.format_k)->bits_name,
                         clkvq_format_get(lc.format_v)->bits_name, ev.rel_err);
                opt->progress(opt->user, ++done, total, what);
            }
        }
    }
    free(q);
    free(k);
    free(v);
    return st;
}

/* Each pair's weight in 64ths of a bit: KVTuner's (k + v) / 2, or its
 * bits_long (the same in every layer: the layers share their settings). */
static clkvq_status set_units(clkvq_context *ctx, clkvq_search_result *res)
{
    for (int p = 0; p < res->n_pairs; p++) {
        double bits = res->weight == CLKVQ_SEARCH_WEIGHT_BITS_LONG ? res->bits_long[p]
                                                                   : pair_bits(&res->pairs[p]);
        double units = bits * UNITS_PER_BIT;
        if (fabs(units - nearbyint(units)) > 1e-6)
            return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                              "search: pair K%sV%s weighs %.9g bits, not a multiple of 1/%d "
                              "(a group over 512?): the knapsack would not be exact",
                              clkvq_format_get(res->pairs[p].format_k)->bits_name,
                              clkvq_format_get(res->pairs[p].format_v)->bits_name, bits,
                              UNITS_PER_BIT);
        res->units[p] = (int)nearbyint(units);
    }
    return CLKVQ_OK;
}

/* Decode time per pair at the dump's shape, with this device's tuned
 * parameters, when tuning results exist for it (else left < 0). */
static void measure_latency(clkvq_context *ctx, clkvq_search_result *res,
                            const clkvq_dump_info *info)
{
    for (int p = 0; p < res->n_pairs; p++) {
        res->latency_us[p] = -1.0;
        clkvq_layer_config lc = layer_config(res, 0, p);
        lc.perm_k = lc.perm_v = NULL; /* timing does not depend on their values */
        lc.mean_k = lc.mean_v = NULL;
        clkvq_tune_shape shape = {lc.scheme, lc.format_k, lc.format_v, lc.group_size,
                                  info->head_dim, info->n_q_heads, info->n_kv_heads,
                                  info->n_tokens, 1};
        clkvq_tune_params tp;
        clkvq_tuning_source source;
        if (clkvq_tuning_lookup(ctx, &shape, &tp, &source) != CLKVQ_OK ||
            (source != CLKVQ_TUNED_EXACT && source != CLKVQ_TUNED_NEAREST))
            continue;
        clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = 1, .capacity = info->n_tokens,
                                  .n_kv_heads = info->n_kv_heads, .n_q_heads = info->n_q_heads,
                                  .head_dim = info->head_dim, .layout_k = tp.layout_k,
                                  .layout_v = tp.layout_v, .layers = &lc};
        clkvq_cache *cache = NULL;
        if (clkvq_cache_create(ctx, &cfg, &cache) != CLKVQ_OK)
            continue;
        size_t kv = (size_t)info->n_kv_heads * info->n_tokens * info->head_dim;
        size_t qn = (size_t)info->n_q_heads * info->head_dim;
        float *k = calloc(kv, sizeof(float)), *q = calloc(qn, sizeof(float)),
              *o = malloc(qn * sizeof(float));
        double best = -1.0;
        if (k && q && o && clkvq_cache_append(cache, 0, 0, info->n_tokens, k, k) == CLKVQ_OK)
            for (int r = 0; r < 6; r++) /* the first run builds the program */
                if (clkvq_cache_decode_host(cache, 0, q, o, 1.0f) == CLKVQ_OK && r > 0) {
                    double ms = clkvq_last_device_ms(ctx);
                    if (ms >= 0 && (best < 0 || ms < best))
                        best = ms;
                }
        res->latency_us[p] = best >= 0 ? best * 1000.0 : -1.0;
        free(k);
        free(q);
        free(o);
        clkvq_cache_release(cache);
    }
    clkvq_clear_error(ctx);
}

/* ------------------------------------------------------------ pruning */

/* Drops, per layer, pairs with at least as many bits and at least as much
 * error as another (strictly more in one); exact ties keep the first. */
static void prune(clkvq_search_result *res)
{
    for (int l = 0; l < res->n_layers; l++) {
        double *e = res->err + (size_t)l * res->n_pairs;
        double keep[MAX_PAIRS];
        memcpy(keep, e, sizeof(double) * (size_t)res->n_pairs);
        for (int p = 0; p < res->n_pairs; p++)
            for (int q = 0; q < res->n_pairs; q++) {
                if (q == p)
                    continue;
                int bq = res->units[q], bp = res->units[p];
                int no_worse = bq <= bp && keep[q] <= keep[p];
                int better = bq < bp || keep[q] < keep[p] || q < p;
                if (no_worse && better) {
                    e[p] = -1.0;
                    break;
                }
            }
    }
}

/* ------------------------------------------------------------ clustering */

/* k-means on each layer's log-error profile over all pairs; a
 * deterministic start (layers spread over the order of mean log error). */
static void cluster(const clkvq_search_result *res, const double *raw_err, int k, int *label)
{
    int L = res->n_layers, P = res->n_pairs;
    double *feat = malloc(sizeof(double) * (size_t)L * P);
    double *cent = malloc(sizeof(double) * (size_t)k * P);
    int *order = malloc(sizeof(int) * (size_t)L);
    double *mean = malloc(sizeof(double) * (size_t)L);
    for (int l = 0; l < L; l++) {
        mean[l] = 0;
        for (int p = 0; p < P; p++) {
            feat[(size_t)l * P + p] = log(raw_err[(size_t)l * P + p] + 1e-9);
            mean[l] += feat[(size_t)l * P + p] / P;
        }
        order[l] = l;
    }
    for (int i = 1; i < L; i++) /* insertion sort by mean: L is small */
        for (int j = i; j > 0 && mean[order[j]] < mean[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    for (int c = 0; c < k; c++)
        memcpy(cent + (size_t)c * P, feat + (size_t)order[(2 * c + 1) * L / (2 * k)] * P,
               sizeof(double) * (size_t)P);
    for (int it = 0; it < KMEANS_ITERS; it++) {
        for (int l = 0; l < L; l++) {
            double best = INFINITY;
            for (int c = 0; c < k; c++) {
                double d = 0;
                for (int p = 0; p < P; p++) {
                    double x = feat[(size_t)l * P + p] - cent[(size_t)c * P + p];
                    d += x * x;
                }
                if (d < best) {
                    best = d;
                    label[l] = c;
                }
            }
        }
        for (int c = 0; c < k; c++) {
            int n = 0;
            for (int p = 0; p < P; p++)
                cent[(size_t)c * P + p] = 0;
            for (int l = 0; l < L; l++)
                if (label[l] == c) {
                    n++;
                    for (int p = 0; p < P; p++)
                        cent[(size_t)c * P + p] += feat[(size_t)l * P + p];
                }
            for (int p = 0; p < P && n; p++)
                cent[(size_t)c * P + p] /= n;
        }
    }
    free(feat);
    free(cent);
    free(order);
    free(mean);
}

/* ------------------------------------------------------------ knapsack */

/* Exact multiple-choice knapsack over groups: each group picks one pair
 * (cost = the sum of its layers' costs N_lp / sum D, weight = layers x the
 * pair's 64ths of a bit); every reachable total weight keeps its least
 * cost, and the points whose cost beats every lighter point form the
 * front, each with error sqrt(cost). */
static clkvq_status solve(clkvq_context *ctx, clkvq_search_result *res, const double *cost_lp,
                          const int *label, int n_groups)
{
    int L = res->n_layers, P = res->n_pairs;
    int max_units = 0;
    for (int p = 0; p < P; p++)
        if (res->units[p] > max_units)
            max_units = res->units[p];
    int W = L * max_units + 1;
    double *dp = malloc(sizeof(double) * (size_t)(n_groups + 1) * W);
    signed char *pick = malloc((size_t)n_groups * W);
    if (!dp || !pick) {
        free(dp);
        free(pick);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search: knapsack table");
    }
    for (int w = 0; w < W; w++)
        dp[w] = w == 0 ? 0.0 : INFINITY;
    for (int g = 0; g < n_groups; g++) {
        double *prev = dp + (size_t)g * W, *cur = dp + (size_t)(g + 1) * W;
        for (int w = 0; w < W; w++) {
            cur[w] = INFINITY;
            pick[(size_t)g * W + w] = -1;
        }
        int members = 0;
        for (int l = 0; l < L; l++)
            members += label[l] == g;
        for (int p = 0; p < P; p++) {
            /* a pair pruned in every member layer is never the group's best */
            double cost = 0.0;
            int alive = 0;
            for (int l = 0; l < L; l++)
                if (label[l] == g) {
                    cost += cost_lp[(size_t)l * P + p];
                    alive |= res->err[(size_t)l * P + p] >= 0;
                }
            if (!alive)
                continue;
            int wp = members * res->units[p];
            for (int w = 0; w + wp < W; w++)
                if (prev[w] + cost < cur[w + wp]) {
                    cur[w + wp] = prev[w] + cost;
                    pick[(size_t)g * W + w + wp] = (signed char)p;
                }
        }
    }
    double *last = dp + (size_t)n_groups * W;
    int n_front = 0;
    double best = INFINITY;
    for (int w = 0; w < W; w++)
        if (last[w] < best) {
            best = last[w];
            n_front++;
        }
    res->front = calloc((size_t)n_front, sizeof *res->front);
    res->choices = malloc(sizeof(int) * (size_t)n_front * L);
    if (!res->front || !res->choices) {
        free(dp);
        free(pick);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search: front");
    }
    best = INFINITY;
    int f = 0;
    for (int w = 0; w < W; w++) {
        if (!(last[w] < best))
            continue;
        best = last[w];
        int *choice = res->choices + (size_t)f * L;
        int rest = w;
        for (int g = n_groups - 1; g >= 0; g--) {
            int p = pick[(size_t)g * W + rest];
            int members = 0;
            for (int l = 0; l < L; l++)
                if (label[l] == g) {
                    choice[l] = p;
                    members++;
                }
            rest -= members * res->units[p];
        }
        clkvq_front_point *pt = &res->front[f++];
        pt->total_error = sqrt(last[w]);
        pt->choice = choice;
        double avg = 0.0, bpe = 0.0, bl = 0.0, lat = 0.0;
        int lat_known = 1;
        for (int l = 0; l < L; l++) {
            avg += pair_bits(&res->pairs[choice[l]]) / L;
            bpe += res->bpe[(size_t)l * P + choice[l]] / L;
            bl += res->bits_long[(size_t)l * P + choice[l]] / L;
            if (res->latency_us[choice[l]] < 0)
                lat_known = 0;
            lat += res->latency_us[choice[l]];
        }
        pt->avg_bits = avg;
        pt->bits_per_element = bpe;
        pt->bits_long = bl;
        pt->latency_us = lat_known ? lat : -1.0;
    }
    res->n_front = f;
    free(dp);
    free(pick);
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ API */

/* What calibrate fits: the options' flags, or skvq's permutation and clip
 * (the meaning calibrate had before it had flags). */
static unsigned fit_flags(const clkvq_search_options *opt, const clkvq_layer_config *d)
{
    if (!opt->calibrate || d->scheme == CLKVQ_SCHEME_FP16)
        return 0;
    if (opt->fit)
        return opt->fit;
    return d->scheme == CLKVQ_SCHEME_SKVQ ? (unsigned)(CLKVQ_FIT_PERM | CLKVQ_FIT_CLIP) : 0u;
}

clkvq_status clkvq_precision_search(clkvq_context *ctx, const clkvq_kv_dump *dump,
                                    const clkvq_search_options *opt, clkvq_search_result **out)
{
    if (!ctx || !dump || !opt || !out || !opt->pairs)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_precision_search: NULL argument");
    *out = NULL;
    clkvq_clear_error(ctx);
    if (opt->n_pairs <= 0 || opt->n_pairs > MAX_PAIRS)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "n_pairs %d must be in 1..%d",
                          opt->n_pairs, MAX_PAIRS);
    for (int p = 0; p < opt->n_pairs; p++)
        if (!clkvq_format_get(opt->pairs[p].format_k) || !clkvq_format_get(opt->pairs[p].format_v))
            return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED, "pair %d: format not in the table", p);
    if (opt->weight != CLKVQ_SEARCH_WEIGHT_KVTUNER && opt->weight != CLKVQ_SEARCH_WEIGHT_BITS_LONG)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "search weight %d is unknown",
                          (int)opt->weight);
    if (opt->fit & ~(unsigned)(CLKVQ_FIT_CLIP | CLKVQ_FIT_MEAN | CLKVQ_FIT_PERM))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "search fit 0x%x has unknown flags",
                          opt->fit);
    clkvq_dump_info info;
    clkvq_status st = clkvq_dump_info_get(dump, &info);
    if (st != CLKVQ_OK)
        return st;
    clkvq_search_result *res = calloc(1, sizeof *res);
    if (!res)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search result");
    res->n_layers = info.n_layers;
    res->n_pairs = opt->n_pairs;
    res->n_q_heads = info.n_q_heads;
    res->n_kv_heads = info.n_kv_heads;
    res->head_dim = info.head_dim;
    res->weight = opt->weight;
    snprintf(res->model, sizeof res->model, "%s", info.model);
    res->defaults = opt->defaults ? *opt->defaults : clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    res->defaults.perm_k = res->defaults.perm_v = NULL;
    res->defaults.mean_k = res->defaults.mean_v = NULL;
    memcpy(res->pairs, opt->pairs, sizeof(clkvq_bit_pair) * (size_t)opt->n_pairs);
    size_t cells = (size_t)info.n_layers * opt->n_pairs;
    res->err = calloc(cells, sizeof(double));
    res->err_sq = calloc(cells, sizeof(double));
    res->ref_sq = calloc((size_t)info.n_layers, sizeof(double));
    res->bpe = calloc(cells, sizeof(double));
    res->bits_long = calloc(cells, sizeof(double));
    res->clip = calloc(cells * 2, sizeof(float));
    unsigned fit = fit_flags(opt, &res->defaults);
    res->fitted = fit != 0;
    if (fit & CLKVQ_FIT_PERM)
        res->perm = calloc((size_t)2 * info.n_layers, sizeof(int32_t *));
    if (fit & CLKVQ_FIT_MEAN)
        res->mean = calloc((size_t)2 * info.n_layers, sizeof(float *));
    if (!res->err || !res->err_sq || !res->ref_sq || !res->bpe || !res->bits_long || !res->clip ||
        ((fit & CLKVQ_FIT_PERM) && !res->perm) || ((fit & CLKVQ_FIT_MEAN) && !res->mean)) {
        clkvq_search_free(res);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search tables");
    }
    st = measure(ctx, res, dump, &info, opt, fit);
    if (st == CLKVQ_OK)
        st = set_units(ctx, res);
    double *cost = NULL;
    int *label = NULL;
    if (st == CLKVQ_OK) {
        measure_latency(ctx, res, &info);
        cost = malloc(sizeof(double) * cells);
        label = malloc(sizeof(int) * (size_t)info.n_layers);
        if (!cost || !label)
            st = clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search tables");
    }
    if (st == CLKVQ_OK) {
        double den = 0.0;
        for (int l = 0; l < info.n_layers; l++)
            den += res->ref_sq[l];
        /* an all-zero reference: the error is absolute (as clkvq-eval's) */
        for (size_t i = 0; i < cells; i++)
            cost[i] = den > 0.0 ? res->err_sq[i] / den : res->err_sq[i];
        /* clustering looks at the relative errors, before pruning */
        double *raw = malloc(sizeof(double) * cells);
        if (!raw)
            st = clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search tables");
        else
            memcpy(raw, res->err, sizeof(double) * cells);
        prune(res);
        int k = opt->n_clusters > 0 && opt->n_clusters < info.n_layers ? opt->n_clusters : 0;
        if (st == CLKVQ_OK && k)
            cluster(res, raw, k, label);
        else
            for (int l = 0; l < info.n_layers; l++)
                label[l] = l;
        free(raw);
        if (st == CLKVQ_OK)
            st = solve(ctx, res, cost, label, k ? k : info.n_layers);
    }
    free(cost);
    free(label);
    if (st != CLKVQ_OK) {
        clkvq_search_free(res);
        return st;
    }
    *out = res;
    return CLKVQ_OK;
}

int clkvq_search_front_size(const clkvq_search_result *res) { return res ? res->n_front : 0; }

clkvq_status clkvq_search_front_point(const clkvq_search_result *res, int i,
                                      clkvq_front_point *out)
{
    if (!res || !out || i < 0 || i >= res->n_front)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "front point %d is out of range", i);
    *out = res->front[i];
    return CLKVQ_OK;
}

double clkvq_search_layer_error(const clkvq_search_result *res, int layer, int pair)
{
    if (!res || layer < 0 || layer >= res->n_layers || pair < 0 || pair >= res->n_pairs)
        return -1.0;
    return res->err[(size_t)layer * res->n_pairs + pair];
}

int clkvq_search_front_index(const clkvq_search_result *res, double budget_bits)
{
    if (!res)
        return -1;
    int best = -1, by_long = res->weight == CLKVQ_SEARCH_WEIGHT_BITS_LONG;
    for (int f = 0; f < res->n_front; f++)
        if ((by_long ? res->front[f].bits_long : res->front[f].avg_bits) <= budget_bits + 1e-9)
            best = f; /* ordered by bits: the last one within budget has the least error */
    return best;
}

clkvq_status clkvq_search_config(clkvq_context *ctx, const clkvq_search_result *res,
                                 double budget_bits, clkvq_precision_config **out)
{
    if (!res || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_search_config: NULL argument");
    int best = clkvq_search_front_index(res, budget_bits);
    int by_long = res->weight == CLKVQ_SEARCH_WEIGHT_BITS_LONG;
    if (best < 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "no searched configuration fits %.3g bits%s (the smallest needs %.3g)",
                          budget_bits, by_long ? " (bits_long)" : "",
                          res->n_front ? (by_long ? res->front[0].bits_long
                                                  : res->front[0].avg_bits)
                                       : 0.0);
    clkvq_layer_config *layers = calloc((size_t)res->n_layers, sizeof *layers);
    if (!layers)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search config");
    for (int l = 0; l < res->n_layers; l++)
        layers[l] = layer_config(res, l, res->front[best].choice[l]);
    clkvq_status st = clkvq_config_create(ctx, res->model[0] ? res->model : NULL, res->n_layers,
                                          layers, res->n_kv_heads, res->head_dim, out);
    free(layers);
    /* the config carries the dump's geometry: it was searched for that model */
    clkvq_model_geometry g = {res->n_layers, res->n_q_heads, res->n_kv_heads, res->head_dim};
    if (st == CLKVQ_OK && (st = clkvq_config_set_geometry(ctx, *out, &g)) != CLKVQ_OK) {
        clkvq_config_free(*out);
        *out = NULL;
    }
    return st;
}
