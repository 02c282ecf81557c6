/*
 * Group quantization, bit packing and dequantization of standalone tensors
 * (OpenCL C 1.2). Built after quant_common.cl (formats, params, code maps).
 * Group size, shapes and the permutation are run-time arguments, so one
 * program serves every shape of a format.
 */
/* ------------------------------------------------------------ packing */

/* Packs codes one at a time into a group; words for bit formats (a 64-bit
 * accumulator carries 3-bit codes across word edges), bytes for trits. */
typedef struct {
    ulong acc;
    int n_bits;
    int n_out;
} packer;

void pack_put(packer *pk, __global uchar *group, uint code, int j)
{
#ifdef TERNARY
    const uint pow3[5] = {1, 3, 9, 27, 81};
    pk->acc += (ulong)(code * pow3[j % 5]);
    if (j % 5 == 4) {
        group[pk->n_out++] = (uchar)pk->acc;
        pk->acc = 0;
    }
#else
    pk->acc |= (ulong)code << pk->n_bits;
    pk->n_bits += BITS;
    if (pk->n_bits >= 32) {
        ((__global uint *)group)[pk->n_out++] = (uint)pk->acc;
        pk->acc >>= 32;
        pk->n_bits -= 32;
    }
#endif
}

void pack_flush(packer *pk, __global uchar *group, int group_size)
{
#ifdef TERNARY
    if (group_size % 5 != 0)
        group[pk->n_out++] = (uchar)pk->acc;
#endif
}

uint unpack_code(__global const uchar *group, int i)
{
#ifdef TERNARY
    const uint pow3[5] = {1, 3, 9, 27, 81};
    return ((uint)group[i / 5] / pow3[i % 5]) % 3u;
#else
    int bit = i * BITS, byte = bit >> 3, shift = bit & 7;
    uint window = group[byte];
    if (shift + BITS > 8)
        window |= (uint)group[byte + 1] << 8;
    return (window >> shift) & ((1u << BITS) - 1u);
#endif
}

inline int src_channel(__global const int *perm, int head_dim, int h, int c)
{
    return perm ? perm[h * head_dim + c] : c;
}

inline int group_bytes(int group_size)
{
#ifdef TERNARY
    return (group_size + 4) / 5;
#else
    return group_size * BITS / 8;
#endif
}

/* ------------------------------------------------------------ kernels */

/* Flags any NaN, Inf or |x| > 65504; bad[0] gets the smallest bad index. */
__kernel void clkvq_check_input(__global const float *x, int n, int per_item,
                                __global int *bad)
{
    int start = (int)get_global_id(0) * per_item;
    int end = min(start + per_item, n);
    for (int i = start; i < end; i++) {
        if (!(fabs(x[i]) <= INPUT_MAX)) {
            atomic_min(bad, i);
            return;
        }
    }
}

/* One work-item per (head, token, channel group). */
__kernel void clkvq_quantize_token(__global const float *x, __global const int *perm,
                                   __global uchar *codes, __global uchar *params,
                                   int n_heads, int n_tokens, int head_dim, int group_size,
                                   float alpha)
{
    int gid = (int)get_global_id(0);
    int groups_per_row = head_dim / group_size;
    if (gid >= n_heads * n_tokens * groups_per_row)
        return;
    int row = gid / groups_per_row;            /* h * n_tokens + t */
    int c0 = (gid % groups_per_row) * group_size;
    int h = row / n_tokens;
    __global const float *xr = x + (size_t)row * head_dim;

    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < group_size; j++) {
        float v = xr[src_channel(perm, head_dim, h, c0 + j)];
        lo = fmin(lo, v);
        hi = fmax(hi, v);
    }
    float2 sz = group_params(lo, hi, alpha, params + (size_t)gid * PARAM_BYTES);

    __global uchar *group = codes + (size_t)gid * group_bytes(group_size);
    packer pk = {0, 0, 0};
    for (int j = 0; j < group_size; j++)
        pack_put(&pk, group, code_of(xr[src_channel(perm, head_dim, h, c0 + j)], sz), j);
    pack_flush(&pk, group, group_size);
}

/* One work-item per (head, block of group_size tokens, channel); a last
 * partial block quantizes the tokens it has and packs zeros after them. */
__kernel void clkvq_quantize_channel(__global const float *x, __global const int *perm,
                                     __global uchar *codes, __global uchar *params,
                                     int n_heads, int n_tokens, int head_dim, int group_size,
                                     float alpha)
{
    int gid = (int)get_global_id(0);
    int n_blocks = (n_tokens + group_size - 1) / group_size;
    if (gid >= n_heads * n_blocks * head_dim)
        return;
    int c = gid % head_dim;
    int b = (gid / head_dim) % n_blocks;
    int h = gid / (head_dim * n_blocks);
    int t0 = b * group_size;
    int n = min(group_size, n_tokens - t0);
    __global const float *xc =
        x + ((size_t)h * n_tokens + t0) * head_dim + src_channel(perm, head_dim, h, c);

    float lo = INFINITY, hi = -INFINITY;
    for (int j = 0; j < n; j++) {
        float v = xc[(size_t)j * head_dim];
        lo = fmin(lo, v);
        hi = fmax(hi, v);
    }
    float2 sz = group_params(lo, hi, alpha, params + (size_t)gid * PARAM_BYTES);

    __global uchar *group = codes + (size_t)gid * group_bytes(group_size);
    packer pk = {0, 0, 0};
    for (int j = 0; j < group_size; j++)
        pack_put(&pk, group, j < n ? code_of(xc[(size_t)j * head_dim], sz) : 0u, j);
    pack_flush(&pk, group, group_size);
}

__kernel void clkvq_dequantize_token(__global const uchar *codes, __global const uchar *params,
                                     __global const int *perm, __global float *out,
                                     int n_heads, int n_tokens, int head_dim, int group_size)
{
    int gid = (int)get_global_id(0);
    int groups_per_row = head_dim / group_size;
    if (gid >= n_heads * n_tokens * groups_per_row)
        return;
    int row = gid / groups_per_row;
    int c0 = (gid % groups_per_row) * group_size;
    int h = row / n_tokens;
    __global const uchar *param = params + (size_t)gid * PARAM_BYTES;
    float2 sz = (float2)(get_param(param, 0), get_param(param, 1));
    __global const uchar *group = codes + (size_t)gid * group_bytes(group_size);
    __global float *orow = out + (size_t)row * head_dim;
    for (int j = 0; j < group_size; j++)
        orow[src_channel(perm, head_dim, h, c0 + j)] = value_of(unpack_code(group, j), sz);
}

__kernel void clkvq_dequantize_channel(__global const uchar *codes,
                                       __global const uchar *params, __global const int *perm,
                                       __global float *out, int n_heads, int n_tokens,
                                       int head_dim, int group_size)
{
    int gid = (int)get_global_id(0);
    int n_blocks = (n_tokens + group_size - 1) / group_size;
    if (gid >= n_heads * n_blocks * head_dim)
        return;
    int c = gid % head_dim;
    int b = (gid / head_dim) % n_blocks;
    int h = gid / (head_dim * n_blocks);
    int t0 = b * group_size;
    int n = min(group_size, n_tokens - t0);
    __global const uchar *param = params + (size_t)gid * PARAM_BYTES;
    float2 sz = (float2)(get_param(param, 0), get_param(param, 1));
    __global const uchar *group = codes + (size_t)gid * group_bytes(group_size);
    __global float *oc =
        out + ((size_t)h * n_tokens + t0) * head_dim + src_channel(perm, head_dim, h, c);
    for (int j = 0; j < n; j++)
        oc[(size_t)j * head_dim] = value_of(unpack_code(group, j), sz);
}
