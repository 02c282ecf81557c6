/*
 * Host access to the format table and the scalar encodings. The table, the
 * packing rule and the encodings themselves are defined once, in
 * cl_kernels/clkvq_packing.h, which the kernels compile too.
 */
#ifndef CLKVQ_QUANT_FORMAT_H
#define CLKVQ_QUANT_FORMAT_H

#include "clkvq.h"
#include "clkvq_packing.h"

#include <stdint.h>

/* Largest magnitude accepted in an input (fp16 max). */
#define CLKVQ_INPUT_MAX KVQ_INPUT_MAX

/* Code width of a bit-stream format, 0 for a base-3 one. */
int clkvq_format_bits(clkvq_format format);
size_t clkvq_group_bytes(clkvq_format format, int group_size);
/* Words of one group padded to whole 32-bit words (the cache's groups). */
int clkvq_group_words(clkvq_format format, int group_size);
size_t clkvq_param_bytes(clkvq_param_type type); /* both params of a group */

/* IEEE half, round to nearest even (= vstore_half_rte). */
uint16_t clkvq_f32_to_f16(float x);
float clkvq_f16_to_f32(uint16_t h);
/* fp8 e4m3 (OCP FN variant: no Inf, max 448), round to nearest even,
 * saturating; NaN encodes as 0x7f. Same algorithm as the kernel's. */
uint8_t clkvq_f32_to_e4m3(float x);
float clkvq_e4m3_to_f32(uint8_t v);

/* Smallest positive stored scale of a parameter type (the scale floor). */
float clkvq_param_min_scale(clkvq_param_type type);
/* Round a float through the parameter type (encode then decode). */
float clkvq_param_round(clkvq_param_type type, float x);

/* Reads/writes code i of a packed group. */
uint32_t clkvq_unpack_code(clkvq_format format, const uint8_t *group, int i);
void clkvq_pack_code(clkvq_format format, uint8_t *group, int i, uint32_t code);

#endif
