/* Plain-C reference quantization (see reference.h). Readable first. */
#include "reference.h"

#include "internal.h"
#include "quant_format.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int levels_of(const clkvq_quant_params *qp) { return clkvq_format_get(qp->format)->levels; }

static void encode_param(clkvq_param_type type, float value, uint8_t *out)
{
    if (type == CLKVQ_PARAM_FP16) {
        uint16_t h = clkvq_f32_to_f16(value);
        out[0] = (uint8_t)(h & 0xff); /* little-endian, as the device stores it */
        out[1] = (uint8_t)(h >> 8);
    } else {
        out[0] = clkvq_f32_to_e4m3(value);
    }
}

static float decode_param(clkvq_param_type type, const uint8_t *in)
{
    if (type == CLKVQ_PARAM_FP16)
        return clkvq_f16_to_f32((uint16_t)(in[0] | (in[1] << 8)));
    return clkvq_e4m3_to_f32(in[0]);
}

void clkvq_ref_group_params(const clkvq_quant_params *qp, const float *values, int n,
                            float *scale_out, float *zero_out, uint8_t *param_out)
{
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < n; j++) {
        lo = fminf(lo, values[j]);
        hi = fmaxf(hi, values[j]);
    }
    /* SKVQ clipping: both ends of the range are pulled in by alpha */
    lo = qp->clip_alpha * lo;
    hi = qp->clip_alpha * hi;
    int levels = levels_of(qp);
    float scale = (hi - lo) / (float)(levels - 1);
    /* a constant group has no range: floor the scale at the smallest value
     * the parameter type can hold, so no code ever divides by zero */
    scale = fmaxf(scale, clkvq_param_min_scale(qp->param_type));
    scale = clkvq_param_round(qp->param_type, scale);

    float zero;
    if (qp->zero_mode == CLKVQ_ZERO_FLOAT) {
        zero = clkvq_param_round(qp->param_type, lo);
    } else {
        zero = rintf(-lo / scale);
        /* rintf(-0.4f) is -0: clamp with a select, which gives +0 whatever
         * fmax does with signed zeros (the kernels do the same) */
        zero = zero > 0.0f ? fminf(zero, (float)(levels - 1)) : 0.0f;
    }
    size_t half = clkvq_param_bytes(qp->param_type) / 2;
    encode_param(qp->param_type, scale, param_out);
    encode_param(qp->param_type, zero, param_out + half);
    *scale_out = scale;
    *zero_out = zero;
}

void clkvq_ref_decode_params(const clkvq_quant_params *qp, const uint8_t *param, float *scale,
                             float *zero)
{
    size_t half = clkvq_param_bytes(qp->param_type) / 2;
    *scale = decode_param(qp->param_type, param);
    *zero = decode_param(qp->param_type, param + half);
}

uint32_t clkvq_ref_code(const clkvq_quant_params *qp, float x, float scale, float zero)
{
    float code;
    if (qp->zero_mode == CLKVQ_ZERO_FLOAT)
        code = rintf((x - zero) / scale);
    else
        code = rintf(x / scale) + zero;
    code = fminf(fmaxf(code, 0.0f), (float)(levels_of(qp) - 1));
    return (uint32_t)code;
}

float clkvq_ref_dequant_value(const clkvq_quant_params *qp, uint32_t code, float scale,
                              float zero)
{
    if (qp->zero_mode == CLKVQ_ZERO_FLOAT)
        return (float)code * scale + zero;
    return ((float)code - zero) * scale;
}

int clkvq_ref_is_permutation(const int32_t *perm, int n_heads, int head_dim)
{
    char *seen = malloc((size_t)head_dim);
    if (!seen)
        return 0;
    int ok = 1;
    for (int h = 0; h < n_heads && ok; h++) {
        memset(seen, 0, (size_t)head_dim);
        for (int c = 0; c < head_dim; c++) {
            int32_t p = perm[(size_t)h * head_dim + c];
            if (p < 0 || p >= head_dim || seen[p]) {
                ok = 0;
                break;
            }
            seen[p] = 1;
        }
    }
    free(seen);
    return ok;
}

/* The input channel at packed position c of head h. */
static int source_channel(const int32_t *perm, int head_dim, int h, int c)
{
    return perm ? perm[(size_t)h * head_dim + c] : c;
}

/* One group: gather n values, compute params, pack codes. */
static void quantize_group(const clkvq_quant_params *qp, const float *values, int n,
                           uint8_t *codes, uint8_t *param)
{
    float scale, zero;
    clkvq_ref_group_params(qp, values, n, &scale, &zero, param);
    memset(codes, 0, clkvq_group_bytes(qp->format, qp->group_size));
    for (int j = 0; j < n; j++)
        clkvq_pack_code(qp->format, codes, j, clkvq_ref_code(qp, values[j], scale, zero));
}

clkvq_status clkvq_ref_quantize(const clkvq_quant_params *qp, const clkvq_shape *shape,
                                const float *x, const int32_t *perm, uint8_t *codes,
                                uint8_t *params)
{
    clkvq_status st = clkvq_quant_params_validate(NULL, qp, shape);
    if (st != CLKVQ_OK)
        return st;
    int heads = shape->n_heads, tokens = shape->n_tokens, dim = shape->head_dim;
    int group = qp->group_size;
    size_t n_elements = (size_t)heads * tokens * dim;
    for (size_t i = 0; i < n_elements; i++)
        if (!(fabsf(x[i]) <= CLKVQ_INPUT_MAX))
            return clkvq_fail(NULL, CLKVQ_ERR_NONFINITE,
                              "input element %zu is %g (NaN, Inf or beyond +-65504)", i,
                              (double)x[i]);
    if (perm && !clkvq_ref_is_permutation(perm, heads, dim))
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "perm is not a permutation of 0..%d",
                          dim - 1);

    size_t group_bytes = clkvq_group_bytes(qp->format, group);
    size_t param_bytes = clkvq_param_bytes(qp->param_type);
    float *values = malloc(sizeof(float) * (size_t)group);
    if (!values)
        return clkvq_fail(NULL, CLKVQ_ERR_OUT_OF_MEMORY, "reference: no memory for a group");
    size_t g = 0; /* group index, in storage order */
    if (qp->axis == CLKVQ_AXIS_TOKEN) {
        for (int h = 0; h < heads; h++)
            for (int t = 0; t < tokens; t++)
                for (int c0 = 0; c0 < dim; c0 += group, g++) {
                    const float *row = x + ((size_t)h * tokens + t) * dim;
                    for (int j = 0; j < group; j++)
                        values[j] = row[source_channel(perm, dim, h, c0 + j)];
                    quantize_group(qp, values, group, codes + g * group_bytes,
                                   params + g * param_bytes);
                }
    } else {
        int blocks = (tokens + group - 1) / group;
        for (int h = 0; h < heads; h++)
            for (int b = 0; b < blocks; b++)
                for (int c = 0; c < dim; c++, g++) {
                    int n = tokens - b * group < group ? tokens - b * group : group;
                    int src = source_channel(perm, dim, h, c);
                    for (int j = 0; j < n; j++)
                        values[j] = x[((size_t)h * tokens + (size_t)b * group + j) * dim + src];
                    quantize_group(qp, values, n, codes + g * group_bytes,
                                   params + g * param_bytes);
                }
    }
    free(values);
    return CLKVQ_OK;
}

void clkvq_ref_dequantize(const clkvq_quant_params *qp, const clkvq_shape *shape,
                          const uint8_t *codes, const uint8_t *params, const int32_t *perm,
                          float *out)
{
    int heads = shape->n_heads, tokens = shape->n_tokens, dim = shape->head_dim;
    int group = qp->group_size;
    size_t group_bytes = clkvq_group_bytes(qp->format, group);
    size_t param_bytes = clkvq_param_bytes(qp->param_type);
    float scale, zero;
    size_t g = 0;
    if (qp->axis == CLKVQ_AXIS_TOKEN) {
        for (int h = 0; h < heads; h++)
            for (int t = 0; t < tokens; t++)
                for (int c0 = 0; c0 < dim; c0 += group, g++) {
                    clkvq_ref_decode_params(qp, params + g * param_bytes, &scale, &zero);
                    float *row = out + ((size_t)h * tokens + t) * dim;
                    for (int j = 0; j < group; j++) {
                        uint32_t code = clkvq_unpack_code(qp->format, codes + g * group_bytes, j);
                        row[source_channel(perm, dim, h, c0 + j)] =
                            clkvq_ref_dequant_value(qp, code, scale, zero);
                    }
                }
    } else {
        int blocks = (tokens + group - 1) / group;
        for (int h = 0; h < heads; h++)
            for (int b = 0; b < blocks; b++)
                for (int c = 0; c < dim; c++, g++) {
                    clkvq_ref_decode_params(qp, params + g * param_bytes, &scale, &zero);
                    int n = tokens - b * group < group ? tokens - b * group : group;
                    int dst = source_channel(perm, dim, h, c);
                    for (int j = 0; j < n; j++) {
                        uint32_t code = clkvq_unpack_code(qp->format, codes + g * group_bytes, j);
                        out[((size_t)h * tokens + (size_t)b * group + j) * dim + dst] =
                            clkvq_ref_dequant_value(qp, code, scale, zero);
                    }
                }
    }
}

void clkvq_ref_attention(const clkvq_ref_attn_shape *sh, const float *q, const float *k,
                         const float *v, double *out)
{
    const int d = sh->head_dim, group = sh->n_q_heads / sh->n_kv_heads;
    double *p = malloc(sizeof(double) * (size_t)(sh->n_keys > 0 ? sh->n_keys : 1));
    if (!p)
        abort(); /* an oracle that cannot run must not pass */
    for (int h = 0; h < sh->n_q_heads; h++) {
        const float *kh = k + (size_t)(h / group) * sh->kv_head_stride;
        const float *vh = v + (size_t)(h / group) * sh->kv_head_stride;
        for (int i = 0; i < sh->n_queries; i++) {
            const float *qi = q + (size_t)h * sh->q_head_stride + (size_t)i * d;
            const int len = sh->n_keys - sh->n_queries + i + 1;
            double *o = out + ((size_t)h * sh->n_queries + i) * d;
            double m = -INFINITY, sum = 0.0;
            for (int t = 0; t < len; t++) {
                double s = 0.0;
                for (int c = 0; c < d; c++)
                    s += (double)qi[c] * (double)kh[(size_t)t * d + c];
                p[t] = s * sh->scale;
                if (p[t] > m)
                    m = p[t];
            }
            for (int t = 0; t < len; t++)
                sum += p[t] = exp(p[t] - m);
            for (int c = 0; c < d; c++)
                o[c] = 0.0;
            for (int t = 0; t < len; t++)
                for (int c = 0; c < d; c++)
                    o[c] += p[t] * (double)vh[(size_t)t * d + c];
            for (int c = 0; c < d; c++)
                o[c] = len > 0 ? o[c] / sum : 0.0;
        }
    }
    free(p);
}
