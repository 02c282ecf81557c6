/*
 * KVTuner's layer precision search (clkvq_precision_search): measure each
 * layer under each (key bits, value bits) pair on a calibration dump,
 * prune, cluster, and solve the multiple-choice knapsack exactly.
 *
 * Units: a pair costs (bits_k + bits_v) / 2 bits (KVTuner's count); with
 * bits in {8, 4, 3, 2, 1.5} that is always a multiple of 1/4, so the
 * knapsack runs over integer quarter-bits and is exact.
 * Error: the sum over layers of clkvq_eval_layer's relative attention
 * error. That sum is the search's assumption: layers are measured one at a
 * time with the others unquantized, as KVTuner does.
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

struct clkvq_search_result {
    int n_layers, n_pairs, n_q_heads, n_kv_heads, head_dim;
    char model[128];
    clkvq_layer_config defaults;
    clkvq_bit_pair pairs[MAX_PAIRS];
    double *err;      /* [layer][pair], -1 where pruned */
    double *bpe;      /* [layer][pair] bits/element, ours */
    float *clip;      /* [layer][pair][2] calibrated clips (skvq) */
    int32_t **perm;   /* [layer][2] calibrated perms or NULL */
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

static int pair_units(const clkvq_bit_pair *p) { return (int)lround(pair_bits(p) * 4.0); }

void clkvq_search_free(clkvq_search_result *res)
{
    if (!res)
        return;
    if (res->perm)
        for (int i = 0; i < 2 * res->n_layers; i++)
            free(res->perm[i]);
    free(res->perm);
    free(res->err);
    free(res->bpe);
    free(res->clip);
    free(res->front);
    free(res->choices);
    free(res);
}

/* ------------------------------------------------------------ measuring */

/* SKVQ calibration of one layer on the dump itself: a permutation per
 * tensor, a clip per (tensor, format) over 0.80..1.00. */
static clkvq_status calibrate_layer(clkvq_context *ctx, clkvq_search_result *res, int l,
                                    const clkvq_dump_info *info, const float *k, const float *v)
{
    const float *x[2] = {k, v};
    clkvq_shape shape = {info->n_kv_heads, info->n_tokens, info->head_dim};
    for (int i = 0; i < 2; i++) {
        int32_t *perm = malloc(sizeof(int32_t) * (size_t)info->n_kv_heads * info->head_dim);
        if (!perm)
            return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search: permutation");
        res->perm[2 * l + i] = perm;
        clkvq_status st = clkvq_calibrate_permutation(ctx, &shape, x[i], res->defaults.group_size,
                                                      perm);
        if (st != CLKVQ_OK)
            return st;
        for (int p = 0; p < res->n_pairs; p++) {
            clkvq_quant_params qp = clkvq_quant_params_default();
            qp.format = i ? res->pairs[p].format_v : res->pairs[p].format_k;
            qp.group_size = res->defaults.group_size;
            qp.param_type = res->defaults.param_type;
            qp.zero_mode = res->defaults.zero_mode;
            double mse;
            float alpha;
            /* the same format was calibrated for an earlier pair: reuse it */
            int reuse = -1;
            for (int q = 0; q < p && reuse < 0; q++)
                if ((i ? res->pairs[q].format_v : res->pairs[q].format_k) == qp.format)
                    reuse = q;
            if (reuse >= 0) {
                alpha = res->clip[((size_t)l * res->n_pairs + reuse) * 2 + i];
            } else {
                st = clkvq_calibrate_clip(ctx, &qp, &shape, x[i], perm, 0.80f, 1.00f, 0.02f,
                                          &alpha, &mse);
                if (st != CLKVQ_OK)
                    return st;
            }
            res->clip[((size_t)l * res->n_pairs + p) * 2 + i] = alpha;
        }
    }
    return CLKVQ_OK;
}

static clkvq_layer_config layer_config(const clkvq_search_result *res, int l, int p)
{
    clkvq_layer_config lc = res->defaults;
    lc.format_k = res->pairs[p].format_k;
    lc.format_v = res->pairs[p].format_v;
    if (res->perm && res->perm[2 * l]) {
        lc.perm_k = res->perm[2 * l];
        lc.perm_v = res->perm[2 * l + 1];
        lc.clip_k = res->clip[((size_t)l * res->n_pairs + p) * 2];
        lc.clip_v = res->clip[((size_t)l * res->n_pairs + p) * 2 + 1];
    }
    return lc;
}

static clkvq_status measure(clkvq_context *ctx, clkvq_search_result *res,
                            const clkvq_kv_dump *dump, const clkvq_dump_info *info,
                            const clkvq_search_options *opt)
{
    size_t kv = (size_t)info->n_kv_heads * info->n_tokens * info->head_dim;
    size_t qn = (size_t)info->n_q_heads * info->n_tokens * info->head_dim;
    float *q = malloc(qn * sizeof(float)), *k = malloc(kv * sizeof(float)),
          *v = malloc(kv * sizeof(float));
    clkvq_status st = q && k && v ? CLKVQ_OK
                                  : clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search: layer data");
    int n_queries = opt->n_queries > 0 ? opt->n_queries : 16;
    if (n_queries > info->n_tokens)
        n_queries = info->n_tokens;
    int done = 0, total = res->n_layers * res->n_pairs;
    for (int l = 0; l < res->n_layers && st == CLKVQ_OK; l++) {
        if ((st = clkvq_dump_read(dump, l, 'q', q)) != CLKVQ_OK ||
            (st = clkvq_dump_read(dump, l, 'k', k)) != CLKVQ_OK ||
            (st = clkvq_dump_read(dump, l, 'v', v)) != CLKVQ_OK)
            break;
        if (res->perm)
            st = calibrate_layer(ctx, res, l, info, k, v);
        for (int p = 0; p < res->n_pairs && st == CLKVQ_OK; p++) {
            clkvq_layer_config lc = layer_config(res, l, p);
            clkvq_eval_result ev;
            st = clkvq_eval_layer(ctx, &lc, info->n_q_heads, info->n_kv_heads, info->n_tokens,
                                  info->head_dim, q, k, v, n_queries, &ev);
            if (st != CLKVQ_OK)
                break;
            res->err[(size_t)l * res->n_pairs + p] = ev.rel_err;
            res->bpe[(size_t)l * res->n_pairs + p] = ev.bits_per_element;
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

/* Decode time per pair at the dump's shape, with this device's tuned
 * parameters, when tuning results exist for it (else left < 0). */
static void measure_latency(clkvq_context *ctx, clkvq_search_result *res,
                            const clkvq_dump_info *info)
{
    for (int p = 0; p < res->n_pairs; p++) {
        res->latency_us[p] = -1.0;
        clkvq_layer_config lc = layer_config(res, 0, p);
        lc.perm_k = lc.perm_v = NULL; /* timing does not depend on them */
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
                int bq = pair_units(&res->pairs[q]), bp = pair_units(&res->pairs[p]);
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
 * (cost = sum of its layers' errors, weight = layers x quarter-bits);
 * every reachable total weight keeps its minimal error, and the points
 * whose error beats every lighter point form the front. */
static clkvq_status solve(clkvq_context *ctx, clkvq_search_result *res, const double *raw_err,
                          const int *label, int n_groups)
{
    int L = res->n_layers, P = res->n_pairs;
    int max_units = 0;
    for (int p = 0; p < P; p++)
        if (pair_units(&res->pairs[p]) > max_units)
            max_units = pair_units(&res->pairs[p]);
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
                    cost += raw_err[(size_t)l * P + p];
                    alive |= res->err[(size_t)l * P + p] >= 0;
                }
            if (!alive)
                continue;
            int wp = members * pair_units(&res->pairs[p]);
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
            rest -= members * pair_units(&res->pairs[p]);
        }
        clkvq_front_point *pt = &res->front[f++];
        pt->avg_bits = w / 4.0 / L;
        pt->total_error = last[w];
        pt->choice = choice;
        double bpe = 0.0, lat = 0.0;
        int lat_known = 1;
        for (int l = 0; l < L; l++) {
            bpe += res->bpe[(size_t)l * res->n_pairs + choice[l]] / L;
            if (res->latency_us[choice[l]] < 0)
                lat_known = 0;
            lat += res->latency_us[choice[l]];
        }
        pt->bits_per_element = bpe;
        pt->latency_us = lat_known ? lat : -1.0;
    }
    res->n_front = f;
    free(dp);
    free(pick);
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ API */

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
    snprintf(res->model, sizeof res->model, "%s", info.model);
    res->defaults = opt->defaults ? *opt->defaults : clkvq_layer_config_default(CLKVQ_SCHEME_TOKEN);
    res->defaults.perm_k = res->defaults.perm_v = NULL;
    memcpy(res->pairs, opt->pairs, sizeof(clkvq_bit_pair) * (size_t)opt->n_pairs);
    size_t cells = (size_t)info.n_layers * opt->n_pairs;
    res->err = calloc(cells, sizeof(double));
    res->bpe = calloc(cells, sizeof(double));
    res->clip = calloc(cells * 2, sizeof(float));
    int calibrate = opt->calibrate && res->defaults.scheme == CLKVQ_SCHEME_SKVQ;
    if (calibrate)
        res->perm = calloc((size_t)2 * info.n_layers, sizeof(int32_t *));
    if (!res->err || !res->bpe || !res->clip || (calibrate && !res->perm)) {
        clkvq_search_free(res);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search tables");
    }
    st = measure(ctx, res, dump, &info, opt);
    double *raw = NULL;
    int *label = NULL;
    if (st == CLKVQ_OK) {
        measure_latency(ctx, res, &info);
        raw = malloc(sizeof(double) * cells);
        label = malloc(sizeof(int) * (size_t)info.n_layers);
        if (!raw || !label)
            st = clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "search tables");
    }
    if (st == CLKVQ_OK) {
        memcpy(raw, res->err, sizeof(double) * cells);
        prune(res);
        int k = opt->n_clusters > 0 && opt->n_clusters < info.n_layers ? opt->n_clusters : 0;
        if (k)
            cluster(res, raw, k, label);
        else
            for (int l = 0; l < info.n_layers; l++)
                label[l] = l;
        st = solve(ctx, res, raw, label, k ? k : info.n_layers);
    }
    free(raw);
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

clkvq_status clkvq_search_config(clkvq_context *ctx, const clkvq_search_result *res,
                                 double budget_bits, clkvq_precision_config **out)
{
    if (!res || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_search_config: NULL argument");
    int best = -1;
    for (int f = 0; f < res->n_front; f++)
        if (res->front[f].avg_bits <= budget_bits + 1e-9)
            best = f; /* ordered by bits: the last one within budget has the least error */
    if (best < 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "no searched configuration fits %.3g bits (the smallest needs %.3g)",
                          budget_bits, res->n_front ? res->front[0].avg_bits : 0.0);
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
