/* The format table and the scalar encodings (host only, no device). */
#include "quant_format.h"
#include "test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

START_TEST(table_is_consistent)
{
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++) {
        const clkvq_format_info *info = clkvq_format_get((clkvq_format)f);
        ck_assert_ptr_nonnull(info);
        ck_assert_int_eq(info->format, f);
        /* the storage cost of a code is what a block holds */
        ck_assert_double_eq_tol(info->code_bits,
                                8.0 * info->bytes_per_block / info->codes_per_block, 1e-12);
        clkvq_format parsed;
        ck_assert_int_eq(clkvq_format_parse(info->name, &parsed), CLKVQ_OK);
        ck_assert_int_eq(parsed, f);
        ck_assert_int_eq(clkvq_format_parse(info->bits_name, &parsed), CLKVQ_OK);
        ck_assert_int_eq(parsed, f);
        for (int g = 32; g <= 256; g += 32)
            ck_assert_uint_ge(clkvq_group_bytes((clkvq_format)f, g) * 8,
                              (size_t)ceil(g * info->code_bits));
    }
    ck_assert_ptr_null(clkvq_format_get(CLKVQ_FMT_COUNT));
    clkvq_format parsed;
    ck_assert_int_eq(clkvq_format_parse("q5", &parsed), CLKVQ_ERR_UNSUPPORTED);
    ck_assert_str_ne(clkvq_last_error(NULL), "");
    ck_assert_uint_eq(clkvq_group_bytes(CLKVQ_FMT_Q3, 32), 12);
    ck_assert_uint_eq(clkvq_group_bytes(CLKVQ_FMT_T15, 32), 7);
    ck_assert_uint_eq(clkvq_group_bytes(CLKVQ_FMT_T15, 128), 26);
}
END_TEST

START_TEST(bits_per_element_counts_params)
{
    clkvq_quant_params qp = clkvq_quant_params_default();
    clkvq_shape shape = {1, 64, 128};
    clkvq_quant_layout layout;
    qp.format = CLKVQ_FMT_Q4;
    qp.group_size = 32;
    ck_assert_int_eq(clkvq_quant_layout_get(&qp, &shape, &layout), CLKVQ_OK);
    ck_assert_double_eq_tol(layout.bits_per_element, 5.0, 1e-12); /* 4 + 32/32 */
    qp.group_size = 128;
    qp.param_type = CLKVQ_PARAM_FP8_E4M3;
    ck_assert_int_eq(clkvq_quant_layout_get(&qp, &shape, &layout), CLKVQ_OK);
    ck_assert_double_eq_tol(layout.bits_per_element, 4.125, 1e-12); /* 4 + 16/128 */
}
END_TEST

START_TEST(pack_unpack_round_trip)
{
    uint64_t seed = 7;
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++) {
        const clkvq_format_info *info = clkvq_format_get((clkvq_format)f);
        for (int g = 32; g <= 128; g += 32) {
            uint8_t group[128];
            uint32_t codes[128];
            memset(group, 0, sizeof group);
            for (int i = 0; i < g; i++) {
                codes[i] = (uint32_t)(test_uniform(&seed) * info->levels);
                clkvq_pack_code((clkvq_format)f, group, i, codes[i]);
            }
            for (int i = 0; i < g; i++)
                ck_assert_uint_eq(clkvq_unpack_code((clkvq_format)f, group, i), codes[i]);
            /* nothing is written past the group */
            for (size_t b = clkvq_group_bytes((clkvq_format)f, g); b < sizeof group; b++)
                ck_assert_uint_eq(group[b], 0);
        }
    }
}
END_TEST

START_TEST(packing_is_lsb_first)
{
    uint8_t group[16] = {0};
    clkvq_pack_code(CLKVQ_FMT_Q4, group, 0, 0x3);
    clkvq_pack_code(CLKVQ_FMT_Q4, group, 1, 0xa);
    ck_assert_uint_eq(group[0], 0xa3);
    memset(group, 0, sizeof group);
    clkvq_pack_code(CLKVQ_FMT_Q3, group, 2, 7); /* bits 6..8 straddle a byte */
    ck_assert_uint_eq(group[0], 0xc0);
    ck_assert_uint_eq(group[1], 0x01);
    memset(group, 0, sizeof group);
    for (int i = 0; i < 5; i++)
        clkvq_pack_code(CLKVQ_FMT_T15, group, i, 2);
    ck_assert_uint_eq(group[0], 242); /* 2 * (1+3+9+27+81) */
}
END_TEST

/* clkvq_packing.h's division-free base-3 digit, for every byte and digit. */
START_TEST(trit_digits_without_division)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t div = 1;
        for (int d = 0; d < 5; d++, div *= 3)
            ck_assert_msg(KVQ_TRIT(b, d) == (b / div) % 3, "byte %u digit %d", b, d);
    }
}
END_TEST

/* The decode kernels' float digit (KVQ_TRIT_FLOAT: multiplies and floors
 * in IEEE single precision, as on the device), for every byte a packed
 * group can hold (at most 2 * (1 + 3 + 9 + 27 + 81) = 242) and digit. */
START_TEST(trit_digits_in_float)
{
    for (uint32_t b = 0; b < 243; b++) {
        uint32_t div = 1;
        volatile float x = (float)b; /* no constant folding in wider precision */
        for (int d = 0; d < 5; d++, div *= 3) {
            float digit = KVQ_TRIT_FLOAT(x, d, floorf);
            ck_assert_msg(digit == (float)((b / div) % 3), "byte %u digit %d: %g", b, d,
                          (double)digit);
        }
    }
}
END_TEST

/* The kernels' word-level unpacking (KVQ_CODE from a group padded to
 * whole words, as the cache stores it) reads what the byte-level packer
 * wrote, for every format and code position; a code that straddles two
 * words is the only one that reads the second. */
START_TEST(word_unpacking_matches_byte_packing)
{
    uint64_t seed = 11;
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++) {
        const clkvq_format_info *info = clkvq_format_get((clkvq_format)f);
        int bits = clkvq_format_bits((clkvq_format)f);
        ck_assert_int_eq(bits == 0, info->levels == 3);
        for (int g = 32; g <= 256; g += 32) {
            uint8_t group[256 + 8];
            uint32_t codes[256], words[66];
            memset(group, 0, sizeof group);
            for (int i = 0; i < g; i++) {
                codes[i] = (uint32_t)(test_uniform(&seed) * info->levels);
                clkvq_pack_code((clkvq_format)f, group, i, codes[i]);
            }
            int n_words = clkvq_group_words((clkvq_format)f, g);
            ck_assert_uint_eq((size_t)n_words, (clkvq_group_bytes((clkvq_format)f, g) + 3) / 4);
            for (int w = 0; w < n_words; w++)
                words[w] = (uint32_t)group[4 * w] | (uint32_t)group[4 * w + 1] << 8 |
                           (uint32_t)group[4 * w + 2] << 16 | (uint32_t)group[4 * w + 3] << 24;
            for (int i = 0; i < g; i++) {
                int w = KVQ_WORD_OF(i, bits);
                ck_assert_int_lt(w, n_words);
                uint32_t hi = KVQ_STRADDLES(i, bits) ? words[w + 1] : 0xdeadbeefu;
                if (KVQ_STRADDLES(i, bits))
                    ck_assert_int_lt(w + 1, n_words);
                ck_assert_msg(KVQ_CODE(words[w], hi, i, bits) == codes[i], "%s g%d code %d",
                              info->name, g, i);
            }
        }
    }
}
END_TEST

/* The randomized Walsh-Hadamard rotation of clkvq_packing.h: orthogonal
 * (norms and dot products kept), unrotate(rotate(x)) = x within fp32, one
 * block per largest power of two dividing head_dim, signs that depend on
 * the seed and the head. */
START_TEST(rotation_round_trips)
{
    const int dims[] = {32, 64, 96, 128, 160, 256};
    uint64_t rng = 3;
    ck_assert_int_eq(kvq_rot_block(96), 32);
    ck_assert_int_eq(kvq_rot_block(128), 128);
    ck_assert_int_eq(kvq_rot_block(160), 32);
    for (int di = 0; di < 6; di++) {
        int d = dims[di];
        for (int trial = 0; trial < 20; trial++) {
            float x[256], y[256], z[256], w[256];
            double xx = 0, yy = 0, xz = 0, yw = 0;
            for (int c = 0; c < d; c++) {
                x[c] = c == 5 ? 50.0f : (float)test_normal(&rng); /* an outlier */
                z[c] = (float)test_normal(&rng);
            }
            memcpy(y, x, sizeof(float) * d);
            memcpy(w, z, sizeof(float) * d);
            kvq_rotate(y, d, 1234u + (uint32_t)trial, trial % 3);
            kvq_rotate(w, d, 1234u + (uint32_t)trial, trial % 3);
            float ymax = 0;
            for (int c = 0; c < d; c++) {
                xx += (double)x[c] * x[c];
                yy += (double)y[c] * y[c];
                xz += (double)x[c] * z[c];
                yw += (double)y[c] * w[c];
                ymax = fabsf(y[c]) > ymax ? fabsf(y[c]) : ymax;
            }
            ck_assert_msg(fabs(yy - xx) <= 1e-5 * xx, "d %d: norm %g -> %g", d, xx, yy);
            ck_assert_msg(fabs(yw - xz) <= 1e-5 * sqrt(xx * yy) + 1e-5, "d %d: dot %g -> %g", d,
                          xz, yw);
            /* the outlier is spread over its block */
            ck_assert_msg(ymax < 0.9f * fabsf(x[5]), "d %d: max %g of outlier %g", d, ymax, x[5]);
            kvq_unrotate(y, d, 1234u + (uint32_t)trial, trial % 3);
            for (int c = 0; c < d; c++)
                ck_assert_msg(fabsf(y[c] - x[c]) <= 1e-5f * (1.0f + fabsf(x[c])),
                              "d %d channel %d: %g -> %g", d, c, x[c], y[c]);
        }
    }
    /* signs depend on the seed and the head */
    int differ_seed = 0, differ_head = 0;
    for (int c = 0; c < 128; c++) {
        differ_seed += kvq_rot_sign(1u, 0, c) != kvq_rot_sign(2u, 0, c);
        differ_head += kvq_rot_sign(1u, 0, c) != kvq_rot_sign(1u, 1, c);
    }
    ck_assert_int_gt(differ_seed, 32);
    ck_assert_int_gt(differ_head, 32);
}
END_TEST

static uint16_t f16_bits_of(_Float16 h)
{
    uint16_t b;
    memcpy(&b, &h, sizeof b);
    return b;
}

START_TEST(fp16_matches_compiler_conversion)
{
    /* the compiler's float -> _Float16 conversion rounds to nearest even */
    uint64_t seed = 11;
    for (int i = 0; i < 200000; i++) {
        uint32_t bits = (uint32_t)(test_uniform(&seed) * 4294967296.0);
        float x;
        memcpy(&x, &bits, sizeof x);
        if (isnan(x))
            continue;
        ck_assert_uint_eq(clkvq_f32_to_f16(x), f16_bits_of((_Float16)x));
    }
    const float edges[] = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 6.1035156e-05f,
                           5.9604645e-08f, 2.9802322e-08f, 2.9802326e-08f, 1.0f + 1.0f / 2048};
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; i++)
        ck_assert_uint_eq(clkvq_f32_to_f16(edges[i]), f16_bits_of((_Float16)edges[i]));
    for (uint32_t h = 0; h < 0x10000; h++) {
        float x = clkvq_f16_to_f32((uint16_t)h);
        if (!isnan(x))
            ck_assert_uint_eq(clkvq_f32_to_f16(x), h);
    }
}
END_TEST

START_TEST(e4m3_round_trips_and_rounds_to_even)
{
    for (int v = 0; v < 256; v++) {
        if ((v & 0x7f) == 0x7f) {
            ck_assert(isnan(clkvq_e4m3_to_f32((uint8_t)v)));
            continue;
        }
        float x = clkvq_e4m3_to_f32((uint8_t)v);
        ck_assert_uint_eq(clkvq_f32_to_e4m3(x), v == 0x80 ? 0x80 : v);
    }
    ck_assert_float_eq(clkvq_e4m3_to_f32(0x7e), 448.0f);
    ck_assert_uint_eq(clkvq_f32_to_e4m3(1000.0f), 0x7e); /* saturates */
    ck_assert_uint_eq(clkvq_f32_to_e4m3(-INFINITY), 0xfe);
    /* halfway between 1.0 (even mantissa) and 1.125 goes to 1.0; between
     * 1.125 and 1.25 goes to 1.25 */
    ck_assert_float_eq(clkvq_e4m3_to_f32(clkvq_f32_to_e4m3(1.0625f)), 1.0f);
    ck_assert_float_eq(clkvq_e4m3_to_f32(clkvq_f32_to_e4m3(1.1875f)), 1.25f);
    /* the smallest subnormal */
    ck_assert_float_eq(clkvq_e4m3_to_f32(clkvq_f32_to_e4m3(0.001953125f)), 0.001953125f);
    ck_assert_float_eq(clkvq_param_min_scale(CLKVQ_PARAM_FP8_E4M3), 0.001953125f);
}
END_TEST

START_TEST(validation_messages)
{
    clkvq_quant_params qp = clkvq_quant_params_default();
    clkvq_shape shape = {2, 10, 96};
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, NULL, &shape), CLKVQ_ERR_INVALID_ARG);
    qp.group_size = 64; /* 64 does not divide 96 */
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_ERR_INVALID_ARG);
    ck_assert_ptr_nonnull(strstr(clkvq_last_error(NULL), "does not divide"));
    qp.axis = CLKVQ_AXIS_CHANNEL; /* along tokens it is fine */
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_OK);
    qp = clkvq_quant_params_default();
    qp.group_size = 48;
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_ERR_INVALID_ARG);
    qp = clkvq_quant_params_default();
    qp.format = (clkvq_format)9;
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_ERR_UNSUPPORTED);
    qp = clkvq_quant_params_default();
    qp.clip_alpha = 0.0f;
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_ERR_INVALID_ARG);
    qp.clip_alpha = NAN;
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_ERR_INVALID_ARG);
    qp.clip_alpha = 1.01f;
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_ERR_INVALID_ARG);
    qp = clkvq_quant_params_default();
    qp.format = CLKVQ_FMT_Q8;
    qp.zero_mode = CLKVQ_ZERO_INT;
    qp.param_type = CLKVQ_PARAM_FP8_E4M3;
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_ERR_UNSUPPORTED);
    qp.format = CLKVQ_FMT_Q4; /* integer zeros up to 15 are exact in e4m3 */
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_OK);
    shape.n_tokens = 0;
    ck_assert_int_eq(clkvq_quant_params_validate(NULL, &qp, &shape), CLKVQ_ERR_INVALID_ARG);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("format");
    TCase *tc = tcase_create("format");
    tcase_add_test(tc, table_is_consistent);
    tcase_add_test(tc, bits_per_element_counts_params);
    tcase_add_test(tc, pack_unpack_round_trip);
    tcase_add_test(tc, packing_is_lsb_first);
    tcase_add_test(tc, trit_digits_without_division);
    tcase_add_test(tc, trit_digits_in_float);
    tcase_add_test(tc, word_unpacking_matches_byte_packing);
    tcase_add_test(tc, rotation_round_trips);
    tcase_add_test(tc, fp16_matches_compiler_conversion);
    tcase_add_test(tc, e4m3_round_trips_and_rounds_to_even);
    tcase_add_test(tc, validation_messages);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
