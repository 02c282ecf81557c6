/*
 * Plain-C reference of every operation: the oracle tests compare kernels
 * against. Written to be read line by line, not to be fast. The float
 * operations are the kernels' operations in the same order (no FMA
 * contraction), so codes and params match bit for bit.
 */
#ifndef CLKVQ_REFERENCE_H
#define CLKVQ_REFERENCE_H

#include "clkvq.h"

#include <stdint.h>

/* Quantization parameters of one group of n values (already gathered and
 * in packed order). Returns the stored (rounded) scale and zero as floats
 * and writes their encoded bytes to param_out (clkvq_param_bytes long). */
void clkvq_ref_group_params(const clkvq_quant_params *qp, const float *values, int n,
                            float *scale_out, float *zero_out, uint8_t *param_out);

/* The code of one value given the stored scale and zero. */
uint32_t clkvq_ref_code(const clkvq_quant_params *qp, float x, float scale, float zero);

/* The value a code stands for. */
float clkvq_ref_dequant_value(const clkvq_quant_params *qp, uint32_t code, float scale,
                              float zero);

/* Decodes one group's stored (scale, zero). */
void clkvq_ref_decode_params(const clkvq_quant_params *qp, const uint8_t *param, float *scale,
                             float *zero);

/* Whole-tensor quantization, same layout as the kernels (see clkvq.h).
 * perm may be NULL. Returns CLKVQ_ERR_NONFINITE (writing nothing) on
 * NaN/Inf/|x| > 65504, CLKVQ_ERR_INVALID_ARG on a bad shape/params. */
clkvq_status clkvq_ref_quantize(const clkvq_quant_params *qp, const clkvq_shape *shape,
                                const float *x, const int32_t *perm, uint8_t *codes,
                                uint8_t *params);

/* Whole-tensor dequantization; with perm the channels are put back in
 * their original order. */
void clkvq_ref_dequantize(const clkvq_quant_params *qp, const clkvq_shape *shape,
                          const uint8_t *codes, const uint8_t *params, const int32_t *perm,
                          float *out);

/*
 * Attention in double precision: the one oracle of every attention path
 * (tests, the autotuner's verification, clkvq_eval_layer). Query i of
 * query head h attends causally to keys 0 .. n_keys - n_queries + i
 * (n_queries = 1: decode over every key), reading kv head h / (n_q_heads /
 * n_kv_heads) (GQA): out = softmax(scale q.K^T) V, [n_q_heads][n_queries]
 * [head_dim]. Zero keys give zeros.
 */
typedef struct {
    int n_q_heads, n_kv_heads, head_dim;
    int n_keys;            /* keys (tokens) each kv head holds */
    size_t kv_head_stride; /* floats between kv heads in k and v */
    int n_queries;         /* queries per head, the last n_queries positions */
    size_t q_head_stride;  /* floats between query heads in q; query i at + i * head_dim */
    double scale;
} clkvq_ref_attn_shape;

void clkvq_ref_attention(const clkvq_ref_attn_shape *shape, const float *q, const float *k,
                         const float *v, double *out);

/* 1 if perm[h*head_dim ..] is a permutation of 0..head_dim-1 for every head. */
int clkvq_ref_is_permutation(const int32_t *perm, int n_heads, int head_dim);

#endif
