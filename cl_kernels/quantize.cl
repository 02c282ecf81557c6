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
#if TERNARY
    pk->acc += (ulong)(code * KVQ_POW3(j % 5));
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
#if TERNARY
    if (group_size % 5 != 0)
        group[pk->n_out++] = (uchar)pk->acc;
#endif
}

inline int src_channel(__global const int *perm, int head_dim, int h, int c)
{
    return perm ? perm[h * head_dim + c] : c;
}

/* Bytes of a group's codes: group_size is a multiple of 32, so a bit
 * stream ends on a byte; five trits share a byte. */
inline int group_bytes(int group_size) { return TERNARY ? (group_size + 4) / 5 : group_size * BITS / 8; }

/* ------------------------------------------------------------ kernels */

/* Flags any NaN, Inf or |x| > 65504; bad[0] gets the smallest bad index.
 * Each work-item scans per_item elements 16 at a time without branching:
 * |x| as bits is > the bits of 65504 exactly for those values (NaN and Inf
 * included), so a running max of the bits finds them; only a chunk that
 * has one is scanned again for the first. */
__kernel void clkvq_check_input(__global const float *x, int n, int per_item,
                                __global int *bad)
{
    int start = (int)get_global_id(0) * per_item;
    if (start >= n)
        return;
    int end = min(start + per_item, n);
    const uint limit = 0x477fe000u; /* as_uint(65504.0f) */
    uint16 m0 = (uint16)0, m1 = (uint16)0;
    int i = start;
    for (; i + 32 <= end; i += 32) {
        m0 = max(m0, as_uint16(vload16(0, x + i)) & 0x7fffffffu);
        m1 = max(m1, as_uint16(vload16(0, x + i + 16)) & 0x7fffffffu);
    }
    m0 = max(m0, m1);
    uint8 m8 = max(m0.lo, m0.hi);
    uint4 m4 = max(m8.lo, m8.hi);
    uint2 m2 = max(m4.lo, m4.hi);
    uint m = max(m2.x, m2.y);
    for (; i < end; i++)
        m = max(m, as_uint(x[i]) & 0x7fffffffu);
    if (m <= limit)
        return;
    for (i = start; i < end; i++) {
        if (!(fabs(x[i]) <= INPUT_MAX)) {
            atomic_min(bad, i);
            return;
        }
    }
}

/* 16 consecutive channels c.. of a row, through the permutation if any. */
inline float16 load16(__global const float *xr, __global const int *pr, int c)
{
    if (!pr)
        return vload16(0, xr + c);
    int16 i = vload16(0, pr + c);
    return (float16)(xr[i.s0], xr[i.s1], xr[i.s2], xr[i.s3], xr[i.s4], xr[i.s5], xr[i.s6],
                     xr[i.s7], xr[i.s8], xr[i.s9], xr[i.sa], xr[i.sb], xr[i.sc], xr[i.sd],
                     xr[i.se], xr[i.sf]);
}

inline float load1(__global const float *xr, __global const int *pr, int c)
{
    return xr[pr ? pr[c] : c];
}

/* The first element of group [c0, c0 + n) equal to v (to get the sign of a
 * zero minimum or maximum as the reference's sequential scan keeps it). */
float first_equal(__global const float *xr, __global const int *pr, int c0, int n, float v)
{
    for (int j = 0; j < n; j++) {
        float e = load1(xr, pr, c0 + j);
        if (e == v)
            return e;
    }
    return v;
}

/* min/max of group [c0, c0 + n) of a row, n a multiple of 16; a zero
 * extreme is the first zero of the group, as the reference's scan keeps it. */
__attribute__((always_inline)) float2 group_range(__global const float *xr, __global const int *pr, int c0, int n)
{
    float16 lo16 = (float16)INFINITY, hi16 = (float16)(-INFINITY);
    for (int k = 0; k < n; k += 16) {
        float16 v = load16(xr, pr, c0 + k);
        lo16 = VMIN(lo16, v);
        hi16 = VMAX(hi16, v);
    }
    float lo = hmin16(lo16), hi = hmax16(hi16);
    if (lo == 0.0f)
        lo = first_equal(xr, pr, c0, n, lo);
    if (hi == 0.0f)
        hi = first_equal(xr, pr, c0, n, hi);
    return (float2)(lo, hi);
}

/* Codes of one group of a row with (scale, zero) sz, packed at group. */
__attribute__((always_inline)) void pack_group(__global const float *xr, __global const int *pr, int c0, int group_size,
                float2 sz, __global uchar *group)
{
#if !TERNARY
    for (int k = 0; k < group_size; k += 32) {
        uint16 a = codes_of16(load16(xr, pr, c0 + k), sz);
        uint16 b = codes_of16(load16(xr, pr, c0 + k + 16), sz);
        store_words32((__global uint *)group + (k / 32) * BITS, 1, a, b);
    }
#else
    int gbytes = group_bytes(group_size);
    for (int k = 0; k < group_size; k += 80) {
        uint16 c[5];
        for (int q = 0; q < 5; q++)
            c[q] = k + 16 * q < group_size ? codes_of16(load16(xr, pr, c0 + k + 16 * q), sz)
                                           : (uint16)0;
        uchar16 b = convert_uchar16(trit_bytes80(c[0], c[1], c[2], c[3], c[4]));
        int b0 = k / 5, nb = min(16, gbytes - b0);
        if (nb == 16) {
            vstore16(b, 0, group + b0);
        } else {
            uchar t[16];
            vstore16(b, 0, t);
            for (int i = 0; i < nb; i++)
                group[b0 + i] = t[i];
        }
    }
#endif
}

/* One work-item per 16 consecutive groups (storage order: head, token,
 * channel group): min/max of each, their parameters as 16 lanes, then the
 * codes. Loads and codes run 16 lanes at a time (group_size is a multiple
 * of 32). */
__kernel void clkvq_quantize_token(__global const float *x, __global const int *perm,
                                   __global uchar *codes, __global uchar *params,
                                   int n_heads, int n_tokens, int head_dim, int group_size,
                                   float alpha)
{
    int groups_per_row = head_dim / group_size;
    int n_groups = n_heads * n_tokens * groups_per_row;
    int g0 = (int)get_global_id(0) * 16;
    if (g0 >= n_groups)
        return;
    int count = min(16, n_groups - g0);
    int row0 = g0 / groups_per_row, gr0 = g0 % groups_per_row;

    float lo[16], hi[16];
    int row = row0, gr = gr0;
    for (int i = 0; i < count; i++) {
        __global const float *xr = x + (size_t)row * head_dim;
        __global const int *pr =
            perm ? perm + (size_t)(row / n_tokens) * head_dim : (__global const int *)0;
        float2 r = group_range(xr, pr, gr * group_size, group_size);
        lo[i] = r.x;
        hi[i] = r.y;
        if (++gr == groups_per_row) {
            gr = 0;
            row++;
        }
    }
    for (int i = count; i < 16; i++)
        lo[i] = hi[i] = 0.0f;
    float16 s16, z16;
    uint16 entry;
    group_params16(vload16(0, lo), vload16(0, hi), alpha, &entry, &s16, &z16);
    store_params16(params + (size_t)g0 * PARAM_BYTES, entry, count);
    float s[16], z[16];
    vstore16(s16, 0, s);
    vstore16(z16, 0, z);

    int gbytes = group_bytes(group_size);
    row = row0;
    gr = gr0;
    for (int i = 0; i < count; i++) {
        __global const float *xr = x + (size_t)row * head_dim;
        __global const int *pr =
            perm ? perm + (size_t)(row / n_tokens) * head_dim : (__global const int *)0;
        pack_group(xr, pr, gr * group_size, group_size, (float2)(s[i], z[i]),
                   codes + (size_t)(g0 + i) * gbytes);
        if (++gr == groups_per_row) {
            gr = 0;
            row++;
        }
    }
}

/* One work-item per (head, block of group_size tokens) when head_dim is a
 * multiple of 16 and at most 256: rows are read in order, each 16 channels
 * the lanes of a vector, each lane the reference's sequential scan of its
 * channel's group; a last partial block quantizes the tokens it has and
 * packs zeros after them. */
__kernel void clkvq_quantize_channel16(__global const float *x, __global const int *perm,
                                       __global uchar *codes, __global uchar *params,
                                       int n_heads, int n_tokens, int head_dim, int group_size,
                                       float alpha)
{
    int gid = (int)get_global_id(0);
    int n_blocks = (n_tokens + group_size - 1) / group_size;
    if (gid >= n_heads * n_blocks)
        return;
    int b = gid % n_blocks, h = gid / n_blocks;
    int n_chunks = head_dim / 16;
    int t0 = b * group_size;
    int n = min(group_size, n_tokens - t0);
    __global const float *xb = x + ((size_t)h * n_tokens + t0) * head_dim;
    __global const int *pr = perm ? perm + (size_t)h * head_dim : (__global const int *)0;

    float16 lo[16], hi[16], s[16], z[16];
    for (int cc = 0; cc < n_chunks; cc++) {
        lo[cc] = (float16)INFINITY;
        hi[cc] = (float16)(-INFINITY);
    }
    for (int j = 0; j < n; j++) {
        __global const float *xr = xb + (size_t)j * head_dim;
        for (int cc = 0; cc < n_chunks; cc++) {
            float16 v = load16(xr, pr, cc * 16);
            lo[cc] = VMIN(lo[cc], v);
            hi[cc] = VMAX(hi[cc], v);
        }
    }
    size_t g0 = ((size_t)h * n_blocks + b) * head_dim; /* group of channel 0 */
    for (int cc = 0; cc < n_chunks; cc++) {
        uint16 entry;
        group_params16(lo[cc], hi[cc], alpha, &entry, &s[cc], &z[cc]);
        store_params16(params + (g0 + cc * 16) * PARAM_BYTES, entry, 16);
    }

    int gbytes = group_bytes(group_size);
#if !TERNARY
    /* every lane packs its own group; all lanes are at the same bit */
    uint16 acc[16];
    for (int cc = 0; cc < n_chunks; cc++)
        acc[cc] = (uint16)0;
    int n_bits = 0, w = 0;
    for (int j = 0; j < group_size; j++) {
        __global const float *xr = xb + (size_t)j * head_dim;
        int full = n_bits + BITS >= 32;
        for (int cc = 0; cc < n_chunks; cc++) {
            uint16 code =
                j < n ? codes_of16v(load16(xr, pr, cc * 16), s[cc], z[cc]) : (uint16)0;
            uint16 a = acc[cc] | (code << (uint)n_bits);
            if (full) {
                store_lanes((__global uint *)(codes + (g0 + cc * 16) * gbytes), gbytes / 4, w, a);
                a = code >> (uint)(32 - n_bits);
            }
            acc[cc] = a;
        }
        n_bits += BITS;
        if (full) {
            n_bits -= 32;
            w++;
        }
    }
#else
    uint16 acc[16];
    for (int cc = 0; cc < n_chunks; cc++)
        acc[cc] = (uint16)0;
    for (int j = 0; j < group_size; j++) {
        __global const float *xr = xb + (size_t)j * head_dim;
        int full = j % 5 == 4 || j == group_size - 1;
        for (int cc = 0; cc < n_chunks; cc++) {
            uint16 code =
                j < n ? codes_of16v(load16(xr, pr, cc * 16), s[cc], z[cc]) : (uint16)0;
            uint16 a = acc[cc] + code * KVQ_POW3(j % 5);
            if (full) {
                uchar t[16];
                vstore16(convert_uchar16(a), 0, t);
                __global uchar *g = codes + (g0 + cc * 16) * gbytes + j / 5;
                for (int l = 0; l < 16; l++)
                    g[(size_t)l * gbytes] = t[l];
                a = (uint16)0;
            }
            acc[cc] = a;
        }
    }
#endif
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
        orow[src_channel(perm, head_dim, h, c0 + j)] = value_of(kvq_code_in_bytes(group, j, BITS), sz);
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
        oc[(size_t)j * head_dim] = value_of(kvq_code_in_bytes(group, j, BITS), sz);
}
