/* The format table, parameter validation/layout, and the scalar encodings
 * (fp16, fp8 e4m3, code packing) shared by the reference and the host side. */
#include "quant_format.h"

#include "internal.h"
#include "clkvq_packing.h"

#include <math.h>
#include <string.h>
#include <strings.h>

/* Rows from the shared table (cl_kernels/clkvq_packing.h), indexed by the
 * enum so that a row out of order cannot slip through. */
#define KVQ_INFO_ROW(id, name, bits_name, levels, bits, cpb, bpb) \
    [CLKVQ_FMT_##id] = {CLKVQ_FMT_##id, name, bits_name, levels, cpb, bpb, 8.0 * (bpb) / (cpb)},
static const clkvq_format_info g_formats[CLKVQ_FMT_COUNT] = {KVQ_FORMAT_TABLE(KVQ_INFO_ROW)};
#define KVQ_BITS_ROW(id, name, bits_name, levels, bits, cpb, bpb) [CLKVQ_FMT_##id] = bits,
static const int g_format_bits[CLKVQ_FMT_COUNT] = {KVQ_FORMAT_TABLE(KVQ_BITS_ROW)};
#define KVQ_COUNT_ROW(...) +1
_Static_assert(0 KVQ_FORMAT_TABLE(KVQ_COUNT_ROW) == CLKVQ_FMT_COUNT,
               "one format table row per clkvq_format");

int clkvq_format_bits(clkvq_format format) { return g_format_bits[format]; }

const clkvq_format_info *clkvq_format_get(clkvq_format format)
{
    if ((int)format < 0 || format >= CLKVQ_FMT_COUNT)
        return NULL;
    return &g_formats[format];
}

clkvq_status clkvq_format_parse(const char *text, clkvq_format *out)
{
    if (!text || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_format_parse: NULL argument");
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++) {
        if (!strcasecmp(text, g_formats[f].name) || !strcmp(text, g_formats[f].bits_name)) {
            *out = (clkvq_format)f;
            return CLKVQ_OK;
        }
    }
    return clkvq_fail(NULL, CLKVQ_ERR_UNSUPPORTED,
                      "format '%s' is not in the table (q8, q4, q3, q2, t1.5)", text);
}

size_t clkvq_group_bytes(clkvq_format format, int group_size)
{
    const clkvq_format_info *f = &g_formats[format];
    return (size_t)kvq_group_bytes(f->codes_per_block, f->bytes_per_block, group_size);
}

int clkvq_group_words(clkvq_format format, int group_size)
{
    const clkvq_format_info *f = &g_formats[format];
    return kvq_group_words(f->codes_per_block, f->bytes_per_block, group_size);
}

size_t clkvq_param_bytes(clkvq_param_type type) { return type == CLKVQ_PARAM_FP16 ? 4 : 2; }

clkvq_quant_params clkvq_quant_params_default(void)
{
    clkvq_quant_params qp = {CLKVQ_FMT_Q4, CLKVQ_AXIS_TOKEN, 32, 1.0f, CLKVQ_PARAM_FP16,
                             CLKVQ_ZERO_FLOAT};
    return qp;
}

/* Kernels index with 32-bit ints; keep every tensor well inside that. */
#define CLKVQ_MAX_ELEMENTS ((size_t)1 << 31)

clkvq_status clkvq_quant_params_validate(clkvq_context *ctx, const clkvq_quant_params *qp,
                                         const clkvq_shape *shape)
{
    if (!qp || !shape)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "quant params or shape is NULL");
    if ((int)qp->format < 0 || qp->format >= CLKVQ_FMT_COUNT)
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                          "format %d is not in the table (q8, q4, q3, q2, t1.5)", (int)qp->format);
    if (qp->axis != CLKVQ_AXIS_TOKEN && qp->axis != CLKVQ_AXIS_CHANNEL)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "axis %d is neither token nor channel",
                          (int)qp->axis);
    if (qp->param_type != CLKVQ_PARAM_FP16 && qp->param_type != CLKVQ_PARAM_FP8_E4M3)
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED, "param type %d is neither fp16 nor fp8",
                          (int)qp->param_type);
    if (qp->zero_mode != CLKVQ_ZERO_FLOAT && qp->zero_mode != CLKVQ_ZERO_INT)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "zero mode %d is neither float nor int",
                          (int)qp->zero_mode);
    if (qp->group_size <= 0 || qp->group_size % 32 != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "group_size %d must be a positive multiple of 32", qp->group_size);
    if (!(qp->clip_alpha > 0.0f && qp->clip_alpha <= 1.0f))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clip_alpha %g must be in (0, 1]",
                          (double)qp->clip_alpha);
    /* e4m3 holds integers exactly only up to 16: an 8-bit integer zero point
     * would be silently moved. */
    if (qp->zero_mode == CLKVQ_ZERO_INT && qp->param_type == CLKVQ_PARAM_FP8_E4M3 &&
        g_formats[qp->format].levels > 16)
        return clkvq_fail(ctx, CLKVQ_ERR_UNSUPPORTED,
                          "integer zero points of %s cannot be stored exactly in fp8 e4m3 "
                          "(use fp16 params)",
                          g_formats[qp->format].name);
    if (shape->n_heads <= 0 || shape->n_tokens <= 0 || shape->head_dim <= 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "shape %d heads x %d tokens x %d head_dim: all must be positive",
                          shape->n_heads, shape->n_tokens, shape->head_dim);
    if (qp->axis == CLKVQ_AXIS_TOKEN && shape->head_dim % qp->group_size != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "group_size %d does not divide head_dim %d (per-token groups)",
                          qp->group_size, shape->head_dim);
    size_t padded_tokens = clkvq_round_up((size_t)shape->n_tokens, (size_t)qp->group_size);
    if ((size_t)shape->n_heads * padded_tokens * (size_t)shape->head_dim >= CLKVQ_MAX_ELEMENTS)
        return clkvq_fail(ctx, CLKVQ_ERR_DEVICE_LIMIT,
                          "tensor of %d x %d x %d elements exceeds 2^31", shape->n_heads,
                          shape->n_tokens, shape->head_dim);
    return CLKVQ_OK;
}

clkvq_status clkvq_quant_layout_get(const clkvq_quant_params *qp, const clkvq_shape *shape,
                                    clkvq_quant_layout *out)
{
    clkvq_status st = clkvq_quant_params_validate(NULL, qp, shape);
    if (st != CLKVQ_OK)
        return st;
    if (!out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "layout output is NULL");
    size_t heads = (size_t)shape->n_heads, tokens = (size_t)shape->n_tokens;
    size_t dim = (size_t)shape->head_dim, group = (size_t)qp->group_size;
    out->group_bytes = clkvq_group_bytes(qp->format, qp->group_size);
    out->param_bytes = clkvq_param_bytes(qp->param_type);
    if (qp->axis == CLKVQ_AXIS_TOKEN)
        out->n_groups = heads * tokens * (dim / group);
    else
        out->n_groups = heads * ((tokens + group - 1) / group) * dim;
    out->code_bytes = out->n_groups * out->group_bytes;
    out->params_bytes = out->n_groups * out->param_bytes;
    out->bits_per_element =
        8.0 * (double)(out->code_bytes + out->params_bytes) / (double)(heads * tokens * dim);
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ fp16 */

uint16_t clkvq_f32_to_f16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t mag = bits & 0x7fffffffu;
    if (mag >= 0x7f800000u) /* Inf or NaN (quiet) */
        return (uint16_t)(sign | (mag > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (mag >= 0x477ff000u) /* >= 65520 rounds to Inf */
        return (uint16_t)(sign | 0x7c00u);
    if (mag < 0x38800000u) { /* below 2^-14: a half subnormal (or zero) */
        float a;
        memcpy(&a, &mag, sizeof a);
        /* scaling by 2^24 is exact; rintf rounds half to even */
        return (uint16_t)(sign | (uint16_t)rintf(a * 16777216.0f));
    }
    uint32_t h = ((mag >> 23) - 112u) << 10 | ((mag >> 13) & 0x3ffu);
    uint32_t rest = mag & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++; /* a carry out of the mantissa correctly bumps the exponent */
    return (uint16_t)(sign | h);
}

float clkvq_f16_to_f32(uint16_t h) { return kvq_f16_to_f32(h); }

/* ------------------------------------------------------------ fp8 e4m3 */

uint8_t clkvq_f32_to_e4m3(float x) { return kvq_f32_to_e4m3(x); }

float clkvq_e4m3_to_f32(uint8_t v) { return kvq_e4m3_to_f32(v); }

float clkvq_param_min_scale(clkvq_param_type type)
{
    return type == CLKVQ_PARAM_FP16 ? KVQ_MIN_SCALE_FP16 : KVQ_MIN_SCALE_FP8;
}

float clkvq_param_round(clkvq_param_type type, float x)
{
    if (type == CLKVQ_PARAM_FP16)
        return clkvq_f16_to_f32(clkvq_f32_to_f16(x));
    return clkvq_e4m3_to_f32(clkvq_f32_to_e4m3(x));
}

/* ------------------------------------------------------------ packing */

uint32_t clkvq_unpack_code(clkvq_format format, const uint8_t *group, int i)
{
    return kvq_code_in_bytes(group, i, g_format_bits[format]);
}

void clkvq_pack_code(clkvq_format format, uint8_t *group, int i, uint32_t code)
{
    int bits = g_format_bits[format];
    if (!bits) {
        /* digits are added into a byte that starts at zero */
        group[i / 5] = (uint8_t)(group[i / 5] + code * KVQ_POW3(i % 5));
        return;
    }
    int bit = i * bits, byte = bit >> 3, shift = bit & 7;
    uint32_t v = code << shift;
    group[byte] = (uint8_t)(group[byte] | (v & 0xffu));
    if (shift + bits > 8)
        group[byte + 1] = (uint8_t)(group[byte + 1] | (v >> 8));
}
