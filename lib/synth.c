/*
 * Seeded synthetic K/V for one layer: data that looks, to a quantizer, like
 * what a RoPE transformer's attention layer caches. Every feature is here
 * because it is what decides between quantization choices; plain Gaussian
 * data would make every method look the same.
 *
 * Keys, per head h, token t, channel c (typical magnitude about 1):
 *   pre[c]  = base_h[c] + sigma_h[c] * z            (z ~ N(0,1), clamped to +-4)
 *   rot     = RoPE_t(pre): pair (i, i + head_dim/2) rotated by t * theta_i,
 *             theta_i = 10000^(-2i/head_dim)
 *   k[c]    = rot[c]                                  normal channel
 *   k[c]    = m_c * (b_c + 0.25 * rot[c])             outlier channel
 *   k[0][s] = +-S_h                                   sink channels, token 0 only
 *
 *  - Outlier channels (2-6% of head_dim, at least 1; m_c in [10, 50], bias
 *    b_c = +-[0.8, 1.5]): a channel-wise scale and bias fixed across tokens,
 *    as LLM keys have (KIVI, KVQuant). This is why keys are quantized per
 *    channel, or, with per-token groups, why the channels are reordered
 *    (SKVQ): a group holding one outlier channel spends all its levels on it.
 *    Real outlier channels sit in low-frequency RoPE dimensions that barely
 *    turn over a context, so they are applied after the rotation, fixed.
 *  - RoPE pairs around a per-head base vector: low-frequency pairs drift
 *    slowly (their range over the tokens is small next to their mean), high
 *    frequency ones sweep a full circle (range = twice the pair's norm). So
 *    channel ranges differ for a structural reason, not only from the noise,
 *    which is the signal range-based channel grouping works on.
 *  - Sink: token 0 carries a few channels far larger than anything else in
 *    its head: 1.2-1.6x max(20, an analytic bound of every other entry of
 *    the head), so at least 24x typical and, by the bounds below, under 400.
 *    Sinks stay in fp16 at run time (SKVQ, StreamingLLM), but anything that
 *    quantizes or calibrates on token 0 sees a value that would otherwise
 *    set its group's whole scale (a per-channel group of KIVI keys, or the
 *    range of a channel in reorder calibration).
 *
 * Values, per head, token t, channel c:
 *   v[t][c] = r_t * (mu_c + s_c * z),  r_t = exp(0.5 * N(0,1)), r_0 *= 4,
 *   mu_c ~ N(0, 0.1^2), s_c = exp(N(0, 0.15^2)).
 *  No channel outliers (values are quantized per token in every method we
 *  implement); the per-token log-normal factor is what makes per-token
 *  groups, and a per-token scale, the right axis for values.
 *
 * Bounds: keys clamp z at 4, hence the sink bound above. Box-Muller with
 * u1 >= 2^-53 keeps |z| < 8.6, so values stay under
 * 4 * e^4.3 * (0.86 + e^1.3 * 8.6), about 1.1e4 < 65504: the data is always
 * accepted by the quantizers.
 *
 * Determinism: each (seed, tensor, head) has its own splitmix64 stream, the
 * per-head parameters are drawn first and then tokens in order with a fixed
 * number of draws each. So k does not depend on whether v is asked for, and
 * a run with fewer tokens is a prefix of one with more (the same sequence,
 * shorter), which appending tests rely on.
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

typedef struct {
    uint64_t state;
} synth_rng;

static uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static synth_rng rng_for(uint64_t seed, uint64_t tensor, uint64_t head)
{
    /* Mix the stream id through splitmix once so neighbouring seeds and
     * heads start far apart in the sequence. */
    uint64_t s = seed ^ (tensor * 0xD1B54A32D192ED03ULL) ^ (head * 0x8CB92BA72F3D8DD7ULL);
    synth_rng r = {splitmix64(&s)};
    return r;
}

/* In [2^-53, 1): never 0, so log() in Box-Muller stays finite. */
static double rng_uniform(synth_rng *r)
{
    return (double)((splitmix64(&r->state) >> 11) + 1) * (1.0 / 9007199254740992.0);
}

static double rng_range(synth_rng *r, double lo, double hi)
{
    return lo + (hi - lo) * rng_uniform(r);
}

static double rng_normal(synth_rng *r)
{
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static double rng_normal_clamped(synth_rng *r, double limit)
{
    double z = rng_normal(r);
    return z > limit ? limit : (z < -limit ? -limit : z);
}

static double rng_sign(synth_rng *r) { return rng_uniform(r) < 0.5 ? -1.0 : 1.0; }

/* Marks `count` distinct random channels of head_dim (partial Fisher-Yates
 * over `order`, a scratch of head_dim ints). */
static void pick_channels(synth_rng *r, int head_dim, int count, int *order, unsigned char *mark)
{
    for (int c = 0; c < head_dim; c++)
        order[c] = c;
    for (int i = 0; i < count; i++) {
        int j = i + (int)(rng_uniform(r) * (double)(head_dim - i));
        if (j >= head_dim)
            j = head_dim - 1;
        int tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
        mark[order[i]] = 1;
    }
}

#define KEY_Z_LIMIT 4.0
#define KEY_OUTLIER_NOISE 0.25

typedef struct {
    double *base, *sigma, *gain, *bias, *theta, *pre, *bound;
    int *order;
    unsigned char *outlier, *sink;
} key_scratch;

static void synth_keys_head(uint64_t seed, int head, const clkvq_shape *shape, key_scratch *s,
                            float *k)
{
    const int head_dim = shape->head_dim, half = head_dim / 2;
    synth_rng r = rng_for(seed, 1, (uint64_t)head);

    for (int c = 0; c < head_dim; c++) {
        s->base[c] = 0.8 * rng_normal_clamped(&r, KEY_Z_LIMIT);
        s->sigma[c] = 0.5 * exp(0.3 * rng_normal_clamped(&r, KEY_Z_LIMIT));
        s->outlier[c] = 0;
        s->sink[c] = 0;
        s->gain[c] = 1.0;
        s->bias[c] = 0.0;
    }
    for (int i = 0; i < half; i++)
        s->theta[i] = pow(10000.0, -2.0 * (double)i / (double)head_dim);

    int n_outliers = (int)lround((double)head_dim * rng_range(&r, 0.02, 0.06));
    if (n_outliers < 1)
        n_outliers = 1;
    pick_channels(&r, head_dim, n_outliers, s->order, s->outlier);
    for (int c = 0; c < head_dim; c++) {
        if (!s->outlier[c])
            continue;
        s->gain[c] = rng_range(&r, 10.0, 50.0);
        s->bias[c] = rng_sign(&r) * rng_range(&r, 0.8, 1.5);
    }

    /* Largest |k| any non-sink entry can take: the rotated pair never
     * exceeds the pair's norm, whose entries are bounded through the z clamp. */
    double head_bound = 0.0;
    for (int c = 0; c < head_dim; c++)
        s->bound[c] = fabs(s->base[c]) + KEY_Z_LIMIT * s->sigma[c];
    for (int c = 0; c < head_dim; c++) {
        double b = s->bound[c];
        if (c < half)
            b = hypot(s->bound[c], s->bound[c + half]);
        else if (c < 2 * half)
            b = hypot(s->bound[c], s->bound[c - half]);
        if (s->outlier[c])
            b = s->gain[c] * (fabs(s->bias[c]) + KEY_OUTLIER_NOISE * b);
        if (b > head_bound)
            head_bound = b;
    }
    int n_sink = 2 + (int)(rng_uniform(&r) * 3.0);
    if (n_sink > head_dim)
        n_sink = head_dim;
    pick_channels(&r, head_dim, n_sink, s->order, s->sink);
    /* The floor keeps the sink massive (>= 24x typical) even in a head whose
     * outliers happen to be mild. */
    double sink_magnitude = rng_range(&r, 1.2, 1.6) * fmax(head_bound, 20.0);

    for (int t = 0; t < shape->n_tokens; t++) {
        float *row = k + ((size_t)head * (size_t)shape->n_tokens + (size_t)t) * (size_t)head_dim;
        for (int c = 0; c < head_dim; c++)
            s->pre[c] = s->base[c] + s->sigma[c] * rng_normal_clamped(&r, KEY_Z_LIMIT);
        for (int c = 0; c < head_dim; c++) {
            double rot = s->pre[c];
            if (c < 2 * half) {
                int i = c < half ? c : c - half;
                double angle = (double)t * s->theta[i];
                double x0 = s->pre[i], x1 = s->pre[i + half];
                rot = c < half ? x0 * cos(angle) - x1 * sin(angle)
                               : x0 * sin(angle) + x1 * cos(angle);
            }
            if (s->outlier[c])
                rot = s->gain[c] * (s->bias[c] + KEY_OUTLIER_NOISE * rot);
            row[c] = (float)rot;
        }
        if (t == 0) {
            /* Signs are drawn for every channel so the draw count per token
             * stays fixed whatever the sink set is. */
            for (int c = 0; c < head_dim; c++) {
                double sign = rng_sign(&r);
                if (s->sink[c])
                    row[c] = (float)(sign * sink_magnitude);
            }
        }
    }
}

static void synth_values_head(uint64_t seed, int head, const clkvq_shape *shape, double *mu,
                              double *spread, float *v)
{
    const int head_dim = shape->head_dim;
    synth_rng r = rng_for(seed, 2, (uint64_t)head);
    for (int c = 0; c < head_dim; c++) {
        mu[c] = 0.1 * rng_normal(&r);
        spread[c] = exp(0.15 * rng_normal(&r));
    }
    for (int t = 0; t < shape->n_tokens; t++) {
        float *row = v + ((size_t)head * (size_t)shape->n_tokens + (size_t)t) * (size_t)head_dim;
        double token_scale = exp(0.5 * rng_normal(&r));
        if (t == 0)
            token_scale *= 4.0;
        for (int c = 0; c < head_dim; c++)
            row[c] = (float)(token_scale * (mu[c] + spread[c] * rng_normal(&r)));
    }
}

clkvq_status clkvq_synth_kv(uint64_t seed, const clkvq_shape *shape, float *k, float *v)
{
    clkvq_clear_error(NULL);
    if (!shape)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_synth_kv: shape is NULL");
    if (shape->n_heads <= 0 || shape->n_tokens <= 0 || shape->head_dim <= 0)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_synth_kv: shape %d heads x %d tokens x %d head_dim: all must "
                          "be positive",
                          shape->n_heads, shape->n_tokens, shape->head_dim);
    if (!k && !v)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_synth_kv: k and v are both NULL (nothing to write)");
    if ((size_t)shape->n_heads > SIZE_MAX / (size_t)shape->n_tokens / (size_t)shape->head_dim /
                                     sizeof(float))
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_synth_kv: %d x %d x %d floats overflow size_t", shape->n_heads,
                          shape->n_tokens, shape->head_dim);

    const size_t head_dim = (size_t)shape->head_dim;
    double *doubles = malloc(7 * head_dim * sizeof(double));
    int *order = malloc(head_dim * sizeof(int));
    unsigned char *marks = malloc(2 * head_dim);
    if (!doubles || !order || !marks) {
        free(doubles);
        free(order);
        free(marks);
        return clkvq_fail(NULL, CLKVQ_ERR_OUT_OF_MEMORY,
                          "clkvq_synth_kv: no memory for per-head parameters (head_dim %d)",
                          shape->head_dim);
    }
    key_scratch s = {doubles,
                     doubles + head_dim,
                     doubles + 2 * head_dim,
                     doubles + 3 * head_dim,
                     doubles + 4 * head_dim,
                     doubles + 5 * head_dim,
                     doubles + 6 * head_dim,
                     order,
                     marks,
                     marks + head_dim};
    for (int h = 0; h < shape->n_heads; h++) {
        if (k)
            synth_keys_head(seed, h, shape, &s, k);
        if (v)
            synth_values_head(seed, h, shape, s.base, s.sigma, v);
    }
    free(doubles);
    free(order);
    free(marks);
    return CLKVQ_OK;
}
