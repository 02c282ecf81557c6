/*
 * clkvq-synth-dump: writes a synthetic calibration dump (the safetensors
 * format clkvq_dump_open reads: layers.<i>.q/.k/.v) for a model shape, so
 * that clkvq-eval and the layer precision search can run where no real
 * model dump is at hand.
 *
 * The model, per layer l (its own seed: seed * 1000003 + l):
 *
 *   K, V   clkvq_synth_kv: key outlier channels (10-50x, fixed bias), RoPE
 *          rotation, a massive sink activation on token 0, per-token value
 *          scales (lib/synth.c documents it).
 *
 *   Q      queries that attend somewhere, because uniform attention averages
 *          key error away and makes every scheme look alike. For q head h
 *          (kv head kh = h / (n_q / n_kv)) at position t, with mu the mean key
 *          of kh over tokens 1.. and u_j = k_j - mu:
 *            q = sqrt(hd) * sum_m margin_m * u_{j_m} / |u_{j_m}|^2  + noise
 *          so that, were the u orthogonal, q.(k_{j_m} - mu) / sqrt(hd) =
 *          margin_m: token j_m's logit stands margin_m above an average
 *          token's. The picked tokens are
 *            j = 0            the attention sink        margin P
 *            j = t            the current token         margin P
 *            j = t - 1 - g    a recent token (g ~ geometric, mean 4) P - 1.5
 *            j ~ U[1, t]      one long-range retrieval   P - 2.5
 *          (clamped to [0, t]: attention is causal), and the noise is
 *          isotropic with 0.3x the signal's norm. P is the layer's peak
 *          (--peak, default 7): with ~2000 tokens around margin 0 a margin
 *          of 7 gives a token e^7 / 2000 ~ half the mass of all the rest
 *          together, i.e. moderately peaked. Keys are dominated by a few
 *          outlier channels, so the u's are far from orthogonal and the
 *          real peakedness is measured and printed per layer (mean max
 *          weight, mean weight on the sink, effective tokens exp(entropy)
 *          over the last 64 positions), not assumed.
 *
 *   --sensitive l1,l2,...  layers made harder to quantize, the way the
 *          layers KVTuner finds sensitive are: key outlier channels (and
 *          the token-0 sink channels, so the sink stays the largest entry)
 *          are scaled by a per-layer factor drawn in [3, 5], and the peak is
 *          P + 3. Heavier outliers stretch every per-token group that holds
 *          one; sharper attention turns a small logit error into a large
 *          output error (the softmax Jacobian grows with the logit scale).
 *
 * Why synthetic: no model weights are reachable from where this runs; the
 * shapes and the structure (outlier channels, sinks, RoPE, GQA) are the
 * real ones, the numbers are not a model's. Results on it rank schemes for
 * the reasons that rank them on real data, but are not a model's accuracy.
 */
#include "clkvq.h"
#include "cli_parse.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SENSITIVE 256
#define NOISE_REL 0.3
#define STATS_QUERIES 64

typedef struct {
    const char *name;
    int n_layers, n_q_heads, n_kv_heads, head_dim;
} model_shape;

/* Shapes of this program's own (layers, q heads, kv heads, head_dim); any
 * model of the library's table (clkvq_model_lookup) and any explicit
 * geometry (q32:kv8:d128:l32) are taken too. */
static const model_shape g_shapes[] = {
    {"llama3-8b", 32, 32, 8, 128},  {"llama2-7b", 32, 32, 32, 128},
    {"mistral-7b", 32, 32, 8, 128}, {"qwen2.5-7b", 28, 28, 4, 128},
    {"llama3-70b", 80, 64, 8, 128}, {"tiny", 4, 4, 2, 64},
};

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t *s) /* (0, 1) */
{
    return ((double)(splitmix64(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double normal01(uint64_t *s)
{
    double u1 = uniform01(s), u2 = uniform01(s);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: clkvq-synth-dump -o FILE [--shape NAME] [--layers L] [--tokens T]\n"
            "                        [--seed S] [--peak P] [--sensitive l1,l2,...] [--f16]\n"
            "Writes a synthetic calibration dump (safetensors, layers.<i>.q/k/v).\n"
            "  -o, --output FILE    where to write (atomically)\n"
            "  --shape NAME         model attention shape (default llama3-8b):");
    for (size_t i = 0; i < sizeof g_shapes / sizeof g_shapes[0]; i++)
        fprintf(f, " %s", g_shapes[i].name);
    fprintf(f,
            ",\n"
            "                       a model of clkvq-tune --list-models, or a geometry\n"
            "                       q<heads>:kv<kv heads>:d<head_dim>:l<layers>\n"
            "  --layers L           layers to write (default: the model's)\n"
            "  --tokens T           tokens per layer (default 2048)\n"
            "  --seed S             base seed (default 1)\n"
            "  --peak P             logit margin of the attended tokens (default 7)\n"
            "  --sensitive LIST     layers with 3-5x key outliers and peak P + 3\n"
            "  --f16                store F16 instead of F32 (half the file)\n"
            "  --device D           OpenCL device (index or name substring)\n"
            "Prints per-layer attention statistics on stderr.\n");
}

static int parse_int(const char *text, const char *what, long lo, long hi, int *out)
{
    return cli_parse_int("clkvq-synth-dump", what, text, (int)lo, (int)hi, out);
}

/* Scales key outlier channels (and the sink's channels on token 0) of every
 * head by factor. An outlier channel is one whose RMS over tokens 1.. is 4x
 * the head's median channel RMS: the synth's outliers are 10-50x. */
static void heavier_outliers(float *k, int n_kv, int n_tokens, int hd, double factor)
{
    double *rms = malloc(sizeof(double) * (size_t)hd), *sorted = malloc(sizeof(double) * (size_t)hd);
    for (int h = 0; h < n_kv; h++) {
        float *kb = k + (size_t)h * n_tokens * hd;
        double max_rest = 0.0;
        for (int c = 0; c < hd; c++) {
            double s = 0.0;
            for (int t = 1; t < n_tokens; t++) {
                double x = kb[(size_t)t * hd + c];
                s += x * x;
                max_rest = fabs(x) > max_rest ? fabs(x) : max_rest;
            }
            rms[c] = sorted[c] = n_tokens > 1 ? sqrt(s / (n_tokens - 1)) : 0.0;
        }
        for (int i = 1; i < hd; i++) /* insertion sort: hd is small */
            for (int j = i; j > 0 && sorted[j - 1] > sorted[j]; j--) {
                double t = sorted[j];
                sorted[j] = sorted[j - 1];
                sorted[j - 1] = t;
            }
        double median = sorted[hd / 2];
        for (int c = 0; c < hd; c++) {
            int outlier = rms[c] > 4.0 * median;
            int sink = n_tokens > 1 && fabs(kb[c]) > max_rest; /* token 0 beyond all others */
            if (outlier)
                for (int t = 1; t < n_tokens; t++)
                    kb[(size_t)t * hd + c] = (float)(kb[(size_t)t * hd + c] * factor);
            if (outlier || sink)
                kb[c] = (float)(kb[c] * factor);
        }
    }
    free(rms);
    free(sorted);
}

/* Queries of one layer (see the model at the top). */
static void make_queries(uint64_t seed, const float *k, int n_q, int n_kv, int n_tokens, int hd,
                         double peak, float *q)
{
    const int group = n_q / n_kv;
    double *mu = malloc(sizeof(double) * (size_t)hd);
    double *inv_sq = malloc(sizeof(double) * (size_t)n_tokens); /* 1 / |u_t|^2 */
    double *dir = malloc(sizeof(double) * (size_t)hd);
    for (int kh = 0; kh < n_kv; kh++) {
        const float *kb = k + (size_t)kh * n_tokens * hd;
        for (int c = 0; c < hd; c++) {
            double s = 0.0;
            for (int t = 1; t < n_tokens; t++)
                s += kb[(size_t)t * hd + c];
            mu[c] = n_tokens > 1 ? s / (n_tokens - 1) : 0.0;
        }
        for (int t = 0; t < n_tokens; t++) {
            double s = 0.0;
            for (int c = 0; c < hd; c++) {
                double u = kb[(size_t)t * hd + c] - mu[c];
                s += u * u;
            }
            inv_sq[t] = s > 0.0 ? 1.0 / s : 0.0;
        }
        for (int g = 0; g < group; g++) {
            const int h = kh * group + g;
            uint64_t rng = seed ^ (0xA24BAED4963EE407ULL * (uint64_t)(h + 1));
            for (int t = 0; t < n_tokens; t++) {
                int geo = 0;
                while (geo < 64 && uniform01(&rng) > 0.2) /* geometric, mean 4 */
                    geo++;
                int recent = t - 1 - geo;
                int far = 1 + (int)(uniform01(&rng) * t);
                const int picks[4] = {0, t, recent < 0 ? 0 : recent, far > t ? t : far};
                const double margins[4] = {peak, peak, peak - 1.5, peak - 2.5};
                for (int c = 0; c < hd; c++)
                    dir[c] = 0.0;
                for (int m = 0; m < 4; m++) {
                    const float *kj = kb + (size_t)picks[m] * hd;
                    double w = margins[m] * sqrt((double)hd) * inv_sq[picks[m]];
                    for (int c = 0; c < hd; c++)
                        dir[c] += w * (kj[c] - mu[c]);
                }
                double norm = 0.0;
                for (int c = 0; c < hd; c++)
                    norm += dir[c] * dir[c];
                double sigma = NOISE_REL * sqrt(norm / hd);
                float *qv = q + ((size_t)h * n_tokens + t) * hd;
                for (int c = 0; c < hd; c++)
                    qv[c] = (float)(dir[c] + sigma * normal01(&rng));
            }
        }
    }
    free(mu);
    free(inv_sq);
    free(dir);
}

/* Mean over (q head, last STATS_QUERIES positions) of the max attention
 * weight, the weight on token 0, and exp(entropy) (effective tokens). */
static void attention_stats(const float *q, const float *k, int n_q, int n_kv, int n_tokens,
                            int hd, double *max_w, double *sink_w, double *eff)
{
    const int group = n_q / n_kv;
    const int first = n_tokens > STATS_QUERIES ? n_tokens - STATS_QUERIES : 0;
    double *s = malloc(sizeof(double) * (size_t)n_tokens);
    double a_max = 0.0, a_sink = 0.0, a_eff = 0.0;
    long count = 0;
    for (int h = 0; h < n_q; h++) {
        const float *kb = k + (size_t)(h / group) * n_tokens * hd;
        for (int p = first; p < n_tokens; p++) {
            const float *qv = q + ((size_t)h * n_tokens + p) * hd;
            double m = -INFINITY;
            for (int t = 0; t <= p; t++) {
                double d = 0.0;
                for (int c = 0; c < hd; c++)
                    d += (double)qv[c] * kb[(size_t)t * hd + c];
                s[t] = d / sqrt((double)hd);
                m = s[t] > m ? s[t] : m;
            }
            double l = 0.0;
            for (int t = 0; t <= p; t++)
                l += s[t] = exp(s[t] - m);
            double mx = 0.0, ent = 0.0;
            for (int t = 0; t <= p; t++) {
                double w = s[t] / l;
                mx = w > mx ? w : mx;
                if (w > 0.0)
                    ent -= w * log(w);
            }
            a_max += mx;
            a_sink += s[0] / l;
            a_eff += exp(ent);
            count++;
        }
    }
    *max_w = a_max / count;
    *sink_w = a_sink / count;
    *eff = a_eff / count;
    free(s);
}

int main(int argc, char **argv)
{
    const char *output = NULL, *device = NULL;
    const model_shape *shape = &g_shapes[0];
    int n_layers = -1, n_tokens = 2048, as_f16 = 0, n_sensitive = 0;
    int sensitive[MAX_SENSITIVE];
    uint64_t seed = 1;
    double peak = 7.0;
    enum { OPT_SHAPE = 256, OPT_LAYERS, OPT_TOKENS, OPT_SEED, OPT_PEAK, OPT_SENSITIVE,
           OPT_F16, OPT_DEVICE };
    static const struct option opts[] = {{"output", required_argument, NULL, 'o'},
                                         {"shape", required_argument, NULL, OPT_SHAPE},
                                         {"layers", required_argument, NULL, OPT_LAYERS},
                                         {"tokens", required_argument, NULL, OPT_TOKENS},
                                         {"seed", required_argument, NULL, OPT_SEED},
                                         {"peak", required_argument, NULL, OPT_PEAK},
                                         {"sensitive", required_argument, NULL, OPT_SENSITIVE},
                                         {"f16", no_argument, NULL, OPT_F16},
                                         {"device", required_argument, NULL, OPT_DEVICE},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "o:h", opts, NULL)) != -1) {
        switch (c) {
        case 'o': output = optarg; break;
        case 'h': usage(stdout); return 0;
        case OPT_SHAPE: {
            static model_shape other;
            static char other_name[128];
            clkvq_model_geometry g;
            shape = NULL;
            for (size_t i = 0; i < sizeof g_shapes / sizeof g_shapes[0]; i++)
                if (!strcmp(optarg, g_shapes[i].name))
                    shape = &g_shapes[i];
            /* a geometry has ':'s, a name none: the message fits what was meant */
            int is_geometry = strchr(optarg, ':') != NULL;
            if (!shape && (is_geometry ? clkvq_model_parse(optarg, &g)
                                       : clkvq_model_lookup(optarg, &g)) == CLKVQ_OK) {
                const char *c = clkvq_model_canonical(optarg);
                snprintf(other_name, sizeof other_name, "%s", c ? c : optarg);
                other = (model_shape){other_name, g.n_layers, g.n_q_heads, g.n_kv_heads,
                                      g.head_dim};
                shape = &other;
            }
            if (!shape) {
                fprintf(stderr, "clkvq-synth-dump: unknown shape '%s' (see --help): %s\n", optarg,
                        clkvq_last_error(NULL));
                return 2;
            }
            break;
        }
        case OPT_LAYERS:
            if (parse_int(optarg, "--layers", 1, 4096, &n_layers))
                return 2;
            break;
        case OPT_TOKENS:
            if (parse_int(optarg, "--tokens", 1, 1 << 20, &n_tokens))
                return 2;
            break;
        case OPT_SEED:
            if (cli_parse_u64("clkvq-synth-dump", "--seed", optarg, &seed))
                return 2;
            break;
        case OPT_PEAK:
            if (cli_parse_double("clkvq-synth-dump", "--peak", optarg, 0.0, 30.0, &peak))
                return 2;
            break;
        case OPT_SENSITIVE: {
            char *list = strdup(optarg), *save = NULL;
            for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
                if (n_sensitive == MAX_SENSITIVE ||
                    parse_int(tok, "--sensitive layer", 0, 4095, &sensitive[n_sensitive])) {
                    free(list);
                    return 2;
                }
                n_sensitive++;
            }
            free(list);
            break;
        }
        case OPT_F16: as_f16 = 1; break;
        case OPT_DEVICE: device = optarg; break;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc || !output) {
        fprintf(stderr, "clkvq-synth-dump: %s\n",
                optind < argc ? "unexpected argument" : "-o FILE is required");
        usage(stderr);
        return 2;
    }
    if (n_layers < 0)
        n_layers = shape->n_layers;
    for (int i = 0; i < n_sensitive; i++)
        if (sensitive[i] >= n_layers) {
            fprintf(stderr, "clkvq-synth-dump: --sensitive layer %d is beyond %d layers\n",
                    sensitive[i], n_layers);
            return 2;
        }

    const size_t q_count = (size_t)shape->n_q_heads * n_tokens * shape->head_dim;
    const size_t kv_count = (size_t)shape->n_kv_heads * n_tokens * shape->head_dim;
    float **q = calloc((size_t)n_layers, sizeof *q), **k = calloc((size_t)n_layers, sizeof *k),
          **v = calloc((size_t)n_layers, sizeof *v);
    int rc = 0;
    clkvq_context *ctx = NULL;
    if (!q || !k || !v) {
        fprintf(stderr, "clkvq-synth-dump: out of memory\n");
        rc = 1;
        goto done;
    }
    fprintf(stderr, "layer  sensitive  outlier_x  peak  max_weight  sink_weight  eff_tokens\n");
    for (int l = 0; l < n_layers; l++) {
        q[l] = malloc(sizeof(float) * q_count);
        k[l] = malloc(sizeof(float) * kv_count);
        v[l] = malloc(sizeof(float) * kv_count);
        if (!q[l] || !k[l] || !v[l]) {
            fprintf(stderr, "clkvq-synth-dump: out of memory at layer %d\n", l);
            rc = 1;
            goto done;
        }
        uint64_t layer_seed = seed * 1000003ULL + (uint64_t)l;
        clkvq_shape kv_shape = {shape->n_kv_heads, n_tokens, shape->head_dim};
        clkvq_status st = clkvq_synth_kv(layer_seed, &kv_shape, k[l], v[l]);
        if (st != CLKVQ_OK) {
            fprintf(stderr, "clkvq-synth-dump: %s: %s\n", clkvq_status_string(st),
                    clkvq_last_error(NULL));
            rc = 1;
            goto done;
        }
        int is_sensitive = 0;
        for (int i = 0; i < n_sensitive; i++)
            is_sensitive |= sensitive[i] == l;
        double factor = 1.0, layer_peak = peak;
        if (is_sensitive) {
            uint64_t r = layer_seed ^ 0x5E45171FEULL;
            factor = 3.0 + 2.0 * uniform01(&r);
            layer_peak = peak + 3.0;
            heavier_outliers(k[l], shape->n_kv_heads, n_tokens, shape->head_dim, factor);
        }
        make_queries(layer_seed, k[l], shape->n_q_heads, shape->n_kv_heads, n_tokens,
                     shape->head_dim, layer_peak, q[l]);
        double max_w, sink_w, eff;
        attention_stats(q[l], k[l], shape->n_q_heads, shape->n_kv_heads, n_tokens,
                        shape->head_dim, &max_w, &sink_w, &eff);
        fprintf(stderr, "%5d  %9s  %9.2f  %4.1f  %10.3f  %11.3f  %10.1f\n", l,
                is_sensitive ? "yes" : "no", factor, layer_peak, max_w, sink_w, eff);
    }

    clkvq_status st = clkvq_context_create(&ctx, device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-synth-dump: %s: %s\n", clkvq_status_string(st),
                clkvq_last_error(NULL));
        rc = 1;
        goto done;
    }
    clkvq_dump_info info;
    memset(&info, 0, sizeof info);
    info.n_layers = n_layers;
    info.n_q_heads = shape->n_q_heads;
    info.n_kv_heads = shape->n_kv_heads;
    info.n_tokens = n_tokens;
    info.head_dim = shape->head_dim;
    snprintf(info.model, sizeof info.model, "synthetic-%s", shape->name);
    st = clkvq_dump_write(ctx, output, &info, (const float *const *)q, (const float *const *)k,
                          (const float *const *)v, as_f16);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-synth-dump: %s: %s\n", clkvq_status_string(st),
                clkvq_last_error(ctx));
        rc = 1;
        goto done;
    }
    fprintf(stderr, "wrote %s: %s shape, %d layers x %d tokens, %s\n", output, shape->name,
            n_layers, n_tokens, as_f16 ? "F16" : "F32");

done:
    for (int l = 0; q && k && v && l < n_layers; l++) {
        free(q[l]);
        free(k[l]);
        free(v[l]);
    }
    free(q);
    free(k);
    free(v);
    clkvq_context_release(ctx);
    return rc;
}
