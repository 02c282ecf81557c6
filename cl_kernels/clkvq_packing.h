/*
 * clkvq_packing.h: the one definition of clkvq's packed data, read by the
 * host and by every kernel.
 *
 * It compiles as C11 (lib/quant_format.c, lib/kv_cache.c, the reference
 * oracles: sizes, unpacking, region bounds) and as OpenCL C 1.2 (embedded
 * with cl_kernels/ and put in front of every program's sources by
 * lib/program_cache.c, so kernels and host cannot drift apart). What is
 * here:
 *   - the scheme / layout / axis numbers the kernels see, tied to the
 *     public enums by _Static_assert (C side);
 *   - the format table (one X-macro row per format) and the unpacking of a
 *     code from its words or bytes (bit streams, base-3 digits);
 *   - where a packed group's words and parameters lie, per layout, and
 *     where an fp16 row lies;
 *   - the token regions of a sequence (sinks / quantized / recent);
 *   - fp16 and fp8 e4m3 scalar encodings.
 * Kernels get a format's properties as -D <P>BITS / <P>TERNARY / <P>LEVELS
 * from the host (lib/kernel_defines.c reads the table), never its number.
 *
 * Packing rule: the codes of a group form a little-endian bit stream, code
 * i at bits [i*b, i*b + b); base-3 formats put five digits in a byte (byte
 * = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4), code i in byte i/5, digit i%5.
 * Standalone tensors pack each group from a byte boundary; the KV cache
 * pads every group to whole 32-bit words (group_words), so kernels never
 * straddle groups.
 */
#ifndef CLKVQ_PACKING_H
#define CLKVQ_PACKING_H

#ifdef __OPENCL_C_VERSION__
#define KVQ_FN inline
#define KVQ_GLOBAL __global
typedef uint kvq_u32;
typedef uchar kvq_u8;
#define KVQ_FREXP(x, e) frexp((x), (e))
#define KVQ_RINT(x) rint(x)
#define KVQ_FABS(x) fabs(x)
#define KVQ_NAN NAN
KVQ_FN float kvq_as_float(kvq_u32 u) { return as_float(u); }
#else
#include "clkvq.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#define KVQ_FN static inline
#define KVQ_GLOBAL
typedef uint32_t kvq_u32;
typedef uint8_t kvq_u8;
#define KVQ_FREXP(x, e) frexpf((x), (e))
#define KVQ_RINT(x) rintf(x)
#define KVQ_FABS(x) fabsf(x)
#define KVQ_NAN NAN
KVQ_FN float kvq_as_float(kvq_u32 u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#endif

/* ------------------------------------------------------------ numbers */

#define KVQ_SCHEME_FP16 0
#define KVQ_SCHEME_TOKEN 1
#define KVQ_SCHEME_KIVI 2
#define KVQ_SCHEME_SKVQ 3
#define KVQ_LAYOUT_TOKEN_MAJOR 0
#define KVQ_LAYOUT_GROUP_PLANAR 1
#define KVQ_AXIS_TOKEN 0
#define KVQ_AXIS_CHANNEL 1

/* Largest magnitude an input may have (fp16 max), and the scale floors. */
#define KVQ_INPUT_MAX 65504.0f
#define KVQ_MIN_SCALE_FP16 5.9604644775390625e-08f /* 2^-24, smallest half */
#define KVQ_MIN_SCALE_FP8 0.001953125f             /* 2^-9, smallest e4m3 */

#ifndef __OPENCL_C_VERSION__
_Static_assert(KVQ_SCHEME_FP16 == (int)CLKVQ_SCHEME_FP16, "scheme numbers");
_Static_assert(KVQ_SCHEME_TOKEN == (int)CLKVQ_SCHEME_TOKEN, "scheme numbers");
_Static_assert(KVQ_SCHEME_KIVI == (int)CLKVQ_SCHEME_KIVI, "scheme numbers");
_Static_assert(KVQ_SCHEME_SKVQ == (int)CLKVQ_SCHEME_SKVQ, "scheme numbers");
_Static_assert(KVQ_LAYOUT_TOKEN_MAJOR == (int)CLKVQ_LAYOUT_TOKEN_MAJOR, "layout numbers");
_Static_assert(KVQ_LAYOUT_GROUP_PLANAR == (int)CLKVQ_LAYOUT_GROUP_PLANAR, "layout numbers");
_Static_assert(KVQ_AXIS_TOKEN == (int)CLKVQ_AXIS_TOKEN, "axis numbers");
_Static_assert(KVQ_AXIS_CHANNEL == (int)CLKVQ_AXIS_CHANNEL, "axis numbers");
#endif

/* ------------------------------------------------------------ formats
 * One row per format: X(id, name, bits_name, levels, bits, codes_per_block,
 * bytes_per_block). bits is the code width of a bit-stream format and 0
 * for a base-3 one; a block is the smallest whole number of codes that
 * ends on a byte. The C side builds clkvq_format_get()'s table from these
 * rows (indexed by CLKVQ_FMT_<id>); adding a format is one row here and
 * its enum value in clkvq.h (any width up to 8 bits unpacks generically). */
#define KVQ_FORMAT_TABLE(X)                  \
    X(Q8, "q8", "8", 256, 8, 4, 4)           \
    X(Q4, "q4", "4", 16, 4, 8, 4)            \
    X(Q3, "q3", "3", 8, 3, 32, 12)           \
    X(Q2, "q2", "2", 4, 2, 16, 4)            \
    X(T15, "t1.5", "1.5", 3, 0, 5, 1)

/* 3^d for a digit position d < 5. */
#define KVQ_POW3(d) ((d) == 0 ? 1u : (d) == 1 ? 3u : (d) == 2 ? 9u : (d) == 3 ? 27u : 81u)

/* Digit d of a base-3 byte b < 256 without division (slow in vector lanes
 * on CPUs): b / 3^d == (b * ceil(2^16 / 3^d)) >> 16 and x % 3 == x - 3 *
 * ((x * 21846) >> 16) for these ranges (tests/test_format.c checks every
 * byte and digit). Works on scalars and on OpenCL vectors of uint. */
#define KVQ_TRIT_MAGIC(d) \
    ((d) == 0 ? 65536u : (d) == 1 ? 21846u : (d) == 2 ? 7282u : (d) == 3 ? 2428u : 810u)
#define KVQ_MOD3(x) ((x) - 3u * (((x) * 21846u) >> 16))
#define KVQ_TRIT(b, d) KVQ_MOD3(((b) * KVQ_TRIT_MAGIC(d)) >> 16)

/* The same digit from the byte's value x < 243 held in a float (decode
 * kernels, where the code is wanted as a float anyway): floor(x C(d)) -
 * 3 floor(x C(d + 1)) with C(d) = 1/3^d rounded up to a float, so a float
 * multiply and a floor replace vector integer multiply-shifts. FLOOR_ is
 * the caller's floor (any that is exact for x >= 0). Exact for every x <
 * 243 and d < 5 (tests/test_format.c checks all of them; bytes 243..255
 * never occur in a packed group). */
#define KVQ_TRIT_C(d)                                                              \
    ((d) == 1 ? 0x1.555558p-2f : (d) == 2 ? 0x1.c71c74p-4f : (d) == 3 ? 0x1.2f684ep-5f \
                                                                   : 0x1.948b12p-7f)
#define KVQ_TRIT_FLOAT(x, d, FLOOR_)                                                   \
    ((d) == 0   ? (x) - 3.0f * FLOOR_((x) * KVQ_TRIT_C(1))                             \
     : (d) == 4 ? FLOOR_((x) * KVQ_TRIT_C(4))                                          \
                : FLOOR_((x) * KVQ_TRIT_C(d)) - 3.0f * FLOOR_((x) * KVQ_TRIT_C((d) + 1)))

/* `bits` bits at bit position pos (< 32) of the 64-bit little-endian
 * window hi:lo. Scalars or OpenCL uint vectors (pos and bits scalar). */
#define KVQ_BITS_AT(lo, hi, pos, bits)                                                      \
    ((((lo) >> (kvq_u32)(pos)) |                                                            \
      ((pos) + (bits) > 32 ? (hi) << (kvq_u32)(32 - (pos)) : (lo) - (lo))) &                \
     ((1u << (bits)) - 1u))

/* Code j of a word-aligned group: the word holding its first bit
 * (KVQ_WORD_OF) is lo, the next word hi (read only by a code that
 * straddles them: 3-bit and other widths that do not divide 32). */
#define KVQ_WORD_OF(j, bits) ((bits) ? ((j) * (bits)) >> 5 : (j) / 20)
#define KVQ_CODE(lo, hi, j, bits)                                             \
    ((bits) ? KVQ_BITS_AT(lo, hi, ((j) * (bits)) & 31, bits)                  \
            : KVQ_TRIT(((lo) >> (kvq_u32)(8 * (((j) / 5) % 4))) & 0xffu, (j) % 5))

/* Whether code j of a bit-stream group straddles two words. */
#define KVQ_STRADDLES(j, bits) ((bits) && (((j) * (bits)) & 31) + (bits) > 32)

/* Bytes of one group's codes packed from a byte boundary (standalone
 * tensors), and words of one group padded to whole words (the cache). */
KVQ_FN int kvq_group_bytes(int codes_per_block, int bytes_per_block, int group_size)
{
    return (group_size + codes_per_block - 1) / codes_per_block * bytes_per_block;
}
KVQ_FN int kvq_group_words(int codes_per_block, int bytes_per_block, int group_size)
{
    return (kvq_group_bytes(codes_per_block, bytes_per_block, group_size) + 3) / 4;
}

/* Code i of a group packed from a byte boundary (standalone tensors). */
KVQ_FN kvq_u32 kvq_code_in_bytes(KVQ_GLOBAL const kvq_u8 *group, int i, int bits)
{
    if (!bits)
        return KVQ_TRIT((kvq_u32)group[i / 5], i % 5);
    int bit = i * bits, byte = bit >> 3, pos = bit & 7;
    kvq_u32 window = group[byte];
    if (pos + bits > 8)
        window |= (kvq_u32)group[byte + 1] << 8;
    return KVQ_BITS_AT(window, 0u, pos, bits);
}

/* ------------------------------------------------------------ parameters
 * A group's (scale, zero): two halves or two e4m3 bytes, scale first. */

/* fp8 e4m3 (OCP "FN": no Inf, 0x7f/0xff NaN, max 448) to float, exact. */
KVQ_FN float kvq_e4m3_to_f32(kvq_u32 v)
{
    kvq_u32 e = (v >> 3) & 15u, m = v & 7u;
    float mag;
    if (e == 15u && m == 7u)
        mag = KVQ_NAN;
    else if (e == 0u)
        mag = (float)m * 0.001953125f; /* m 2^-9, exact */
    else
        mag = kvq_as_float(((e + 120u) << 23) | (m << 20));
    return (v & 0x80u) ? -mag : mag;
}

/* float to e4m3, round to nearest even, saturating at 448; NaN -> 0x7f. */
KVQ_FN kvq_u8 kvq_f32_to_e4m3(float x)
{
    if (x != x)
        return (kvq_u8)0x7f;
    kvq_u8 sign = signbit(x) ? (kvq_u8)0x80 : (kvq_u8)0;
    float a = KVQ_FABS(x);
    if (a >= 448.0f)
        return (kvq_u8)(sign | 0x7e);
    if (a < 0.015625f) /* subnormal: steps of 2^-9; 8 steps = min normal */
        return (kvq_u8)(sign | (kvq_u8)KVQ_RINT(a * 512.0f));
    int e;
    float m = KVQ_FREXP(a, &e); /* a = m 2^e, m in [0.5, 1) */
    int e_unb = e - 1;
    int q = (int)KVQ_RINT((m * 2.0f - 1.0f) * 8.0f);
    if (q == 8) {
        q = 0;
        e_unb++;
    }
    return (kvq_u8)(sign | (kvq_u8)((e_unb + 7) << 3) | (kvq_u8)q);
}

/* IEEE half bits to float, exact (= vload_half). */
KVQ_FN float kvq_f16_to_f32(kvq_u32 h)
{
    kvq_u32 sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0u) {
        float f = (float)m * 5.9604644775390625e-08f; /* m 2^-24, exact */
        return sign ? -f : f;
    }
    return kvq_as_float(sign | (e == 31u ? 0x7f800000u : (e + 112u) << 23) | (m << 13));
}

/* ------------------------------------------------------------ regions
 * Token regions of one tensor (K or V) of a sequence of length n:
 *   sinks      [0, sink_end)        fp16, sink_end = min(n, n_sink)
 *   quantized  [sink_end, q_end)    packed codes + params
 *   recent     [q_end, n)           fp16 (window / residual)
 * q_end: fp16 -> sink_end (0); token -> n; skvq -> max(sink_end, n -
 * window), or with per-channel keys (blocks of g tokens) max(sink_end,
 * floor((n - window) / g) * g) for K and V alike (a first block may start
 * after the sinks); kivi K -> floor(n / R) * R (keys wait for whole blocks
 * of R); kivi V -> max(0, n - R). q_end(V) <= q_end(K) for every scheme.
 * `block` is skvq's alignment: 1, or g with per-channel keys. */
KVQ_FN int kvq_sink_end(int n, int n_sink) { return n < n_sink ? n : n_sink; }

KVQ_FN int kvq_q_end(int scheme, int is_v, int n, int n_sink, int window, int residual,
                     int block)
{
    int sink_end = kvq_sink_end(n, n_sink);
    if (scheme == KVQ_SCHEME_FP16)
        return sink_end;
    if (scheme == KVQ_SCHEME_KIVI)
        return is_v ? (n > residual ? n - residual : 0) : n / residual * residual;
    if (scheme == KVQ_SCHEME_SKVQ) {
        int end = n - window > 0 ? (n - window) / block * block : 0;
        return end > sink_end ? end : sink_end;
    }
    return n;
}

/* fp16 store per (seq, kv head): fp_slots rows of head_dim halves; token t
 * lives in slot t < n_sink ? ring + t : t % ring, and never moves. */
KVQ_FN int kvq_fp_slot(int t, int ring, int n_sink) { return t < n_sink ? ring + t : t % ring; }

/* ------------------------------------------------------------ transforms
 * A layer may store K and V as y = P(R(x - mu)) instead of x: mu a
 * per-channel mean (centering), R = (H_b / sqrt(b)) D a randomized
 * Walsh-Hadamard rotation (per block of b channels, b the largest power
 * of two dividing head_dim; D = diag of signs drawn from (seed, kv head,
 * channel)), P the channel permutation. Attention is unchanged: the query
 * gets q' = P(R q) (q . mu_k is the same for every token, so softmax
 * ignores it) and the output is mu_v + R^T P^-1 (sum p y). Host and
 * kernels run these functions in the same operation order, so a cache's
 * read-back matches the plain-C model bit for bit. */

/* The largest power of two (at most 256) dividing head_dim. */
KVQ_FN int kvq_rot_block(int head_dim)
{
    int b = 1;
    while (b < 256 && head_dim % (2 * b) == 0)
        b *= 2;
    return b;
}

/* Sign (+1 or -1) of channel c of kv head h: a 32-bit mix of the three. */
KVQ_FN float kvq_rot_sign(kvq_u32 seed, int h, int c)
{
    kvq_u32 x = seed ^ ((kvq_u32)h * 0x9e3779b9u) ^ ((kvq_u32)c * 0x85ebca6bu);
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return (x & 1u) ? -1.0f : 1.0f;
}

/* 1/sqrt(b) for a power of two b: halvings of 1 or of 1/sqrt(2), exact
 * steps from one rounded constant. */
KVQ_FN float kvq_rot_scale(int b)
{
    int k = 0;
    while ((1 << k) < b)
        k++;
    float s = k % 2 ? 0.70710678118654752f : 1.0f;
    for (int i = 0; i < k / 2; i++)
        s *= 0.5f;
    return s;
}

/* x[0..b) <- (H_b / sqrt(b)) x in place (H_b symmetric and H_b H_b = b I,
 * so it is its own inverse), butterflies in a fixed order. */
KVQ_FN void kvq_fwht(float *x, int b)
{
    for (int len = 1; len < b; len *= 2)
        for (int i = 0; i < b; i += 2 * len)
            for (int j = i; j < i + len; j++) {
                float u = x[j], v = x[j + len];
                x[j] = u + v;
                x[j + len] = u - v;
            }
    float s = kvq_rot_scale(b);
    for (int i = 0; i < b; i++)
        x[i] *= s;
}

/* row <- R row (rotate) or R^T row (unrotate), head_dim channels of kv
 * head h. */
KVQ_FN void kvq_rotate(float *row, int head_dim, kvq_u32 seed, int h)
{
    int b = kvq_rot_block(head_dim);
    for (int c = 0; c < head_dim; c++)
        row[c] *= kvq_rot_sign(seed, h, c);
    for (int c0 = 0; c0 < head_dim; c0 += b)
        kvq_fwht(row + c0, b);
}

KVQ_FN void kvq_unrotate(float *row, int head_dim, kvq_u32 seed, int h)
{
    int b = kvq_rot_block(head_dim);
    for (int c0 = 0; c0 < head_dim; c0 += b)
        kvq_fwht(row + c0, b);
    for (int c = 0; c < head_dim; c++)
        row[c] *= kvq_rot_sign(seed, h, c);
}

/* ------------------------------------------------------------ pages
 * A layer's packed tokens (and the fp16 scheme's fp16 rows) live in a
 * pool of pages of block_size tokens. Page p of kv head h is row hb = p *
 * n_kv_heads + h of the placement formulas below, with stride =
 * block_size and the token at offset t % block_size; token t of sequence
 * s lives in page table[s * max_blocks + t / block_size]. The contiguous
 * cache is the case of one page per sequence (block_size = the capacity
 * rounded up to 256, table[s][0] = s). Sinks and recent tokens of the
 * skvq/kivi schemes stay in per-sequence fp16 rings (kvq_fp_slot). */
KVQ_FN int kvq_page_of(KVQ_GLOBAL const int *table, int seq, int max_blocks, int t,
                       int block_size)
{
    return table[(size_t)seq * max_blocks + t / block_size];
}

/* ------------------------------------------------------------ placement
 * Packed groups of one row hb = page * n_kv_heads + kv head, in 32-bit
 * words, for tokens t at offsets 0 .. stride - 1 of the page (stride =
 * block_size: a multiple of 16, so vectors of up to 16 aligned tokens stay
 * in one page, and of the group size, so KIVI blocks never straddle).
 * Per-token groups (row_words = n_groups * group_words):
 *   TOKEN_MAJOR   word(t, g, w) = (hb * stride + t) * row_words + g * group_words + w
 *   GROUP_PLANAR  word(t, g, w) = (hb * row_words + g * group_words + w) * stride + t
 *   params        TOKEN_MAJOR (hb * stride + t) * n_groups + g,
 *                 GROUP_PLANAR (hb * n_groups + g) * stride + t
 * Per-channel groups (KIVI keys: group_size tokens of one channel, block
 * b = t / group_size, n_blocks = stride / group_size):
 *   word(b, c, w) = ((hb * n_blocks + b) * head_dim + c) * group_words + w
 *   params        (hb * n_blocks + b) * head_dim + c
 * Channels are in packed (permuted) order. */

/* Word 0 of the per-token group g of token t. */
KVQ_FN size_t kvq_token_group_word(int layout, size_t hb, int t, int g, int stride, int n_groups,
                                   int group_words)
{
    size_t row_words = (size_t)n_groups * group_words;
    if (layout == KVQ_LAYOUT_TOKEN_MAJOR)
        return (hb * stride + t) * row_words + (size_t)g * group_words;
    return (hb * row_words + (size_t)g * group_words) * stride + t;
}

/* Words between word w and w + 1 of a per-token group. */
KVQ_FN size_t kvq_token_word_step(int layout, int stride)
{
    return layout == KVQ_LAYOUT_TOKEN_MAJOR ? 1 : (size_t)stride;
}

KVQ_FN size_t kvq_token_param(int layout, size_t hb, int t, int g, int stride, int n_groups)
{
    if (layout == KVQ_LAYOUT_TOKEN_MAJOR)
        return (hb * stride + t) * n_groups + g;
    return (hb * n_groups + g) * stride + t;
}

/* Word 0 of the per-channel group holding (t, c); its words are contiguous. */
KVQ_FN size_t kvq_channel_group_word(size_t hb, int t, int c, int stride, int group_size,
                                     int head_dim, int group_words)
{
    size_t n_blocks = (size_t)(stride / group_size);
    return ((hb * n_blocks + (size_t)(t / group_size)) * head_dim + c) * group_words;
}

KVQ_FN size_t kvq_channel_param(size_t hb, int t, int c, int stride, int group_size, int head_dim)
{
    size_t n_blocks = (size_t)(stride / group_size);
    return (hb * n_blocks + (size_t)(t / group_size)) * head_dim + c;
}

#endif
