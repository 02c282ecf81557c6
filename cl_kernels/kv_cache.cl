/*
 * KV cache maintenance: staging tokens that leave the fp16 window, packing
 * them into the cache layout, fp16 stores, read-back and truncation.
 * Built after quant_common.cl. lib/kv_cache.h documents the layouts.
 *
 * Extra build options:
 *   -D AXIS_CHANNEL=0|1  per-channel groups along tokens (KIVI keys)
 *   -D LAYOUT=0|1        token-major or group-planar packed rows (token axis)
 * Every kernel takes the store geometry as the same run-time arguments.
 */

#define GEOM_ARGS                                                                          \
    int n_heads, int head_dim, int capacity, int group_size, int group_words, int n_groups, \
        int fp_slots, int ring, int n_sink, int seq

typedef struct {
    size_t base;   /* word index of word 0 of the group */
    size_t stride; /* words between consecutive words of the group */
} group_ref;

/* The packed group holding channel c of token t (packed channel order). */
inline group_ref locate_group(int h, int t, int c, int head_dim, int capacity, int group_size,
                              int group_words, int n_groups, int seq, int n_heads, int *j)
{
    size_t sh = (size_t)seq * n_heads + h;
    group_ref ref;
#if AXIS_CHANNEL
    int n_blocks = capacity / group_size;
    ref.base = ((sh * n_blocks + t / group_size) * head_dim + c) * group_words;
    ref.stride = 1;
    *j = t % group_size;
#else
    int g = c / group_size;
    size_t row_words = (size_t)n_groups * group_words;
#if LAYOUT == 0
    ref.base = (sh * capacity + t) * row_words + (size_t)g * group_words;
    ref.stride = 1;
#else
    ref.base = (sh * row_words + (size_t)g * group_words) * capacity + t;
    ref.stride = capacity;
#endif
    *j = c % group_size;
#endif
    return ref;
}

/* Index of the parameter entry of the group holding (t, c). */
inline size_t locate_param(int h, int t, int c, int head_dim, int capacity, int group_size,
                           int n_groups, int seq, int n_heads)
{
    size_t sh = (size_t)seq * n_heads + h;
#if AXIS_CHANNEL
    int n_blocks = capacity / group_size;
    return (sh * n_blocks + t / group_size) * head_dim + c;
#else
    int g = c / group_size;
#if LAYOUT == 0
    return (sh * capacity + t) * n_groups + g;
#else
    return (sh * n_groups + g) * capacity + t;
#endif
#endif
}

/* fp16 row of token t (see kv_cache.h: sinks after the ring). */
inline size_t fp_row(int h, int t, int fp_slots, int ring, int n_sink, int seq, int n_heads,
                     int head_dim)
{
    int slot = t < n_sink ? ring + t : t % ring;
    return (((size_t)seq * n_heads + h) * fp_slots + slot) * head_dim;
}

/* Code j of a packed group (words may be strided). */
uint group_code(__global const uint *codes, group_ref ref, int j)
{
#ifdef TERNARY
    const uint pow3[5] = {1, 3, 9, 27, 81};
    uint word = codes[ref.base + (size_t)(j / 20) * ref.stride];
    uint byte = (word >> (8 * ((j / 5) % 4))) & 0xffu;
    return (byte / pow3[j % 5]) % 3u;
#else
    int bit = j * BITS, w = bit >> 5, shift = bit & 31;
    uint v = codes[ref.base + (size_t)w * ref.stride] >> shift;
    if (shift + BITS > 32)
        v |= codes[ref.base + (size_t)(w + 1) * ref.stride] << (32 - shift);
    return v & ((1u << BITS) - 1u);
#endif
}

/* Packs codes into whole words at strided addresses (ternary: 5 trits per
 * byte, 4 bytes per word; the last word of a group may be partial). */
typedef struct {
    ulong acc;
    int n_bits;
    int w;
} word_packer;

void wpack_put(word_packer *pk, __global uint *codes, group_ref ref, uint code, int j,
               int group_size)
{
#ifdef TERNARY
    const uint pow3[5] = {1, 3, 9, 27, 81};
    pk->acc += (ulong)(code * pow3[j % 5]) << (8 * ((j / 5) % 4));
    if (j % 20 == 19 || j == group_size - 1) {
        codes[ref.base + (size_t)pk->w++ * ref.stride] = (uint)pk->acc;
        pk->acc = 0;
    }
#else
    pk->acc |= (ulong)code << pk->n_bits;
    pk->n_bits += BITS;
    if (pk->n_bits >= 32) {
        codes[ref.base + (size_t)pk->w++ * ref.stride] = (uint)pk->acc;
        pk->acc >>= 32;
        pk->n_bits -= 32;
    }
#endif
}

float packed_value(__global const uint *codes, __global const uchar *params, int h, int t,
                   int c, int head_dim, int capacity, int group_size, int group_words,
                   int n_groups, int seq, int n_heads)
{
    int j;
    group_ref ref = locate_group(h, t, c, head_dim, capacity, group_size, group_words, n_groups,
                                 seq, n_heads, &j);
    __global const uchar *param =
        params + locate_param(h, t, c, head_dim, capacity, group_size, n_groups, seq, n_heads) *
                     PARAM_BYTES;
    float2 sz = (float2)(get_param(param, 0), get_param(param, 1));
    return value_of(group_code(codes, ref, j), sz);
}

/* staging[h][r][c] (packed channel order) for tokens t_first + r: from the
 * fp16 store for t < n_old, else from the new input (model order). */
__kernel void clkvq_cache_stage(__global const half *fp, __global const float *in,
                                __global const int *perm, __global float *staging, GEOM_ARGS,
                                int t_first, int n_stage, int n_old, int n_in)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * n_stage * head_dim)
        return;
    int c = gid % head_dim, r = (gid / head_dim) % n_stage, h = gid / (head_dim * n_stage);
    int t = t_first + r;
    float value;
    if (t < n_old) {
        value = vload_half(fp_row(h, t, fp_slots, ring, n_sink, seq, n_heads, head_dim) + c, fp);
    } else {
        int src = perm ? perm[h * head_dim + c] : c;
        value = in[((size_t)h * n_in + (t - n_old)) * head_dim + src];
    }
    staging[gid] = value;
}

/* One work-item per (head, staged token, channel group). */
__kernel void clkvq_cache_quantize_token(__global const float *staging, __global uint *codes,
                                         __global uchar *params, GEOM_ARGS, float alpha,
                                         int t_first, int n_stage)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * n_stage * n_groups)
        return;
    int g = gid % n_groups, r = (gid / n_groups) % n_stage, h = gid / (n_groups * n_stage);
    int t = t_first + r, c0 = g * group_size;
    __global const float *x = staging + ((size_t)h * n_stage + r) * head_dim + c0;
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < group_size; j++) {
        lo = fmin(lo, x[j]);
        hi = fmax(hi, x[j]);
    }
    size_t pidx = locate_param(h, t, c0, head_dim, capacity, group_size, n_groups, seq, n_heads);
    float2 sz = group_params(lo, hi, alpha, params + pidx * PARAM_BYTES);
    int j0;
    group_ref ref = locate_group(h, t, c0, head_dim, capacity, group_size, group_words,
                                 n_groups, seq, n_heads, &j0);
    word_packer pk = {0, 0, 0};
    for (int j = 0; j < group_size; j++)
        wpack_put(&pk, codes, ref, code_of(x[j], sz), j, group_size);
}

/* One work-item per (head, staged block, channel); t_first and n_stage are
 * whole blocks (KIVI quantizes keys only in blocks of R tokens). */
__kernel void clkvq_cache_quantize_channel(__global const float *staging, __global uint *codes,
                                           __global uchar *params, GEOM_ARGS, float alpha,
                                           int t_first, int n_stage)
{
    int gid = (int)get_global_id(0);
    int n_stage_blocks = n_stage / group_size;
    if (gid >= n_heads * n_stage_blocks * head_dim)
        return;
    int c = gid % head_dim, bb = (gid / head_dim) % n_stage_blocks;
    int h = gid / (head_dim * n_stage_blocks);
    int t0 = t_first + bb * group_size;
    __global const float *x = staging + ((size_t)h * n_stage + bb * group_size) * head_dim + c;
    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < group_size; j++) {
        float v = x[(size_t)j * head_dim];
        lo = fmin(lo, v);
        hi = fmax(hi, v);
    }
    size_t pidx = locate_param(h, t0, c, head_dim, capacity, group_size, n_groups, seq, n_heads);
    float2 sz = group_params(lo, hi, alpha, params + pidx * PARAM_BYTES);
    int j0;
    group_ref ref = locate_group(h, t0, c, head_dim, capacity, group_size, group_words, n_groups,
                                 seq, n_heads, &j0);
    word_packer pk = {0, 0, 0};
    for (int j = 0; j < group_size; j++)
        wpack_put(&pk, codes, ref, code_of(x[(size_t)j * head_dim], sz), j, group_size);
}

/* New tokens that stay in fp16 (sinks and the recent window). */
__kernel void clkvq_cache_store_fp16(__global const float *in, __global const int *perm,
                                     __global half *fp, GEOM_ARGS, int n_old, int n_in,
                                     int q_end_new)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * n_in * head_dim)
        return;
    int c = gid % head_dim, i = (gid / head_dim) % n_in, h = gid / (head_dim * n_in);
    int t = n_old + i;
    if (t >= n_sink && t < q_end_new)
        return;
    int src = perm ? perm[h * head_dim + c] : c;
    vstore_half_rte(in[((size_t)h * n_in + i) * head_dim + src],
                    fp_row(h, t, fp_slots, ring, n_sink, seq, n_heads, head_dim) + c, fp);
}

/* out[h][r][c'] for tokens t_from + r, c' the model channel (unpermuted). */
__kernel void clkvq_cache_read(__global const uint *codes, __global const uchar *params,
                               __global const half *fp, __global const int *perm,
                               __global float *out, GEOM_ARGS, int n_tokens, int q_end,
                               int t_from, int t_count)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * t_count * head_dim)
        return;
    int c = gid % head_dim, r = (gid / head_dim) % t_count, h = gid / (head_dim * t_count);
    int t = t_from + r;
    int sink_end = min(n_tokens, n_sink);
    float value;
    if (t < sink_end || t >= q_end)
        value = vload_half(fp_row(h, t, fp_slots, ring, n_sink, seq, n_heads, head_dim) + c, fp);
    else
        value = packed_value(codes, params, h, t, c, head_dim, capacity, group_size, group_words,
                             n_groups, seq, n_heads);
    int dst = perm ? perm[h * head_dim + c] : c;
    out[((size_t)h * t_count + r) * head_dim + dst] = value;
}

/* Truncation: packed tokens that fall back into the window get fp16 rows. */
__kernel void clkvq_cache_refill_fp16(__global const uint *codes, __global const uchar *params,
                                      __global half *fp, GEOM_ARGS, int t_from, int t_count)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * t_count * head_dim)
        return;
    int c = gid % head_dim, r = (gid / head_dim) % t_count, h = gid / (head_dim * t_count);
    int t = t_from + r;
    float value = packed_value(codes, params, h, t, c, head_dim, capacity, group_size,
                               group_words, n_groups, seq, n_heads);
    vstore_half_rte(value, fp_row(h, t, fp_slots, ring, n_sink, seq, n_heads, head_dim) + c, fp);
}
