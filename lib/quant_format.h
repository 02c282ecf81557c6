/*
 * The format table and the scalar encodings every part shares.
 *
 * Packing rule (all formats): the codes of one group form a little-endian
 * bit stream, code i at bits [i*b, i*b+b) for b in {8,4,3,2}, i.e. LSB
 * first inside 32-bit words; a group's codes start on a byte boundary and
 * take group_bytes = ceil(group_size / codes_per_block) * bytes_per_block.
 * Ternary packs 5 trits per byte in base 3: byte = t0 + 3 t1 + 9 t2 + 27 t3
 * + 81 t4 (at most 242), code i in byte i/5, digit i%5.
 *
 * Parameters of a group: (scale, zero), each as fp16 (2 bytes, scale first)
 * or fp8 e4m3 (1 byte each), stored back to back.
 */
#ifndef CLKVQ_QUANT_FORMAT_H
#define CLKVQ_QUANT_FORMAT_H

#include "clkvq.h"

#include <stdint.h>

/* Largest magnitude accepted in an input (fp16 max). */
#define CLKVQ_INPUT_MAX 65504.0f

size_t clkvq_group_bytes(clkvq_format format, int group_size);
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
