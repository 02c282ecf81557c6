/*
 * Per-group quantization math shared by every program that quantizes
 * (quantize.cl, kv_cache.cl): the format constants, parameter storage and
 * the code <-> value maps. Concatenated in front of those sources.
 *
 * Build options:
 *   -D BITS, TERNARY, LEVELS  the format's row of the table (clkvq_packing.h
 *                      has the packing rule; lib/kernel_defines.c writes them)
 *   -D PARAM_FP8=0|1   (scale, zero) stored as fp16 (4 bytes) or fp8 e4m3 (2 bytes)
 *   -D ZERO_INT=0|1    zero point as float (x = c*s + z) or integer code (x = (c - z)*s)
 *
 * The arithmetic is lib/reference.c's, operation for operation (no fma
 * contraction, correctly rounded division requested by the host), so codes
 * and parameters match the C reference bit for bit.
 */
#pragma OPENCL FP_CONTRACT OFF

#if !defined(BITS) || !defined(TERNARY) || !defined(LEVELS)
#error "BITS, TERNARY and LEVELS come from the format table (lib/kernel_defines.c)"
#endif

#if PARAM_FP8
#define PARAM_BYTES 2
#define MIN_SCALE KVQ_MIN_SCALE_FP8
#else
#define PARAM_BYTES 4
#define MIN_SCALE KVQ_MIN_SCALE_FP16
#endif

#define INPUT_MAX KVQ_INPUT_MAX

/* ------------------------------------------------------------ parameters */

#if PARAM_FP8
/* Stores v at slot i (0 scale, 1 zero) and returns the stored value. */
float put_param(__global uchar *param, int i, float v)
{
    uchar e = kvq_f32_to_e4m3(v);
    param[i] = e;
    return kvq_e4m3_to_f32(e);
}

float get_param(__global const uchar *param, int i) { return kvq_e4m3_to_f32(param[i]); }
#else
float put_param(__global uchar *param, int i, float v)
{
    __global half *p = (__global half *)param;
    vstore_half_rte(v, i, p);
    return vload_half(i, p);
}

float get_param(__global const uchar *param, int i)
{
    return vload_half(i, (__global const half *)param);
}
#endif

/* (scale, zero) of a group from its min and max, as stored. */
float2 group_params(float lo, float hi, float alpha, __global uchar *param)
{
    lo = alpha * lo;
    hi = alpha * hi;
    float scale = (hi - lo) / (float)(LEVELS - 1);
    scale = fmax(scale, MIN_SCALE);
    scale = put_param(param, 0, scale);
#if ZERO_INT
    float zero = rint(-lo / scale);
    /* a select, not fmax: fmax(-0, +0) is -0 on some devices (OpenCL's
     * "x unless x < y"), +0 on others; the stored zero must be +0 */
    zero = zero > 0.0f ? fmin(zero, (float)(LEVELS - 1)) : 0.0f;
    put_param(param, 1, zero);
#else
    float zero = put_param(param, 1, lo);
#endif
    return (float2)(scale, zero);
}

uint code_of(float x, float2 sz)
{
#if ZERO_INT
    float code = rint(x / sz.x) + sz.y;
#else
    float code = rint((x - sz.y) / sz.x);
#endif
    return (uint)fmin(fmax(code, 0.0f), (float)(LEVELS - 1));
}

float value_of(uint code, float2 sz)
{
#if ZERO_INT
    return ((float)code - sz.y) * sz.x;
#else
    return (float)code * sz.x + sz.y;
#endif
}


/* ------------------------------------------------------------ vector helpers
 * Sixteen elements at a time, the same elementwise float operations as the
 * scalar code above (so codes are bit-identical); the CPU runs them as SIMD. */

/* min/max for finite values without the NaN handling of fmin/fmax (one
 * instruction each on a CPU). Ties keep the first operand's rule of the C
 * library's fminf(held, v): the held value wins. */
#define VMIN(held, v) ((v) < (held) ? (v) : (held))
#define VMAX(held, v) ((v) > (held) ? (v) : (held))

/* rint(q) for |q| <= 2^22 in the default rounding mode (ties to even), as
 * two adds: the CPU compilers lower vector rint to a slow sequence. */
inline float16 rint_small16(float16 q)
{
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    return (q + magic) - magic;
}

/* code_of on 16 lanes, each lane with its own (scale, zero). The quotient
 * is clamped to a range the final clamp maps the same way before rounding
 * (codes are equal: rint is monotonic, zero is an integer in [0, LEVELS)),
 * which keeps it small enough for rint_small16. */
uint16 codes_of16v(float16 x, float16 s, float16 z)
{
#if ZERO_INT
    float16 q = x / s;
    q = VMAX(q, (float16)(-(float)LEVELS));
    q = VMIN(q, (float16)LEVELS);
    float16 code = rint_small16(q) + z;
#else
    float16 q = (x - z) / s;
    q = VMAX(q, (float16)(-1.0f));
    q = VMIN(q, (float16)LEVELS);
    float16 code = rint_small16(q);
#endif
    code = VMAX(code, (float16)0.0f);
    code = VMIN(code, (float16)(LEVELS - 1));
    return convert_uint16(code);
}

/* code_of on 16 lanes, one (scale, zero) broadcast to all. */
inline uint16 codes_of16(float16 x, float2 sz)
{
    return codes_of16v(x, (float16)sz.x, (float16)sz.y);
}

/* float -> IEEE half bits rounded to nearest even, = vstore_half_rte for
 * every non-NaN float (checked exhaustively): the device's vstore_half is a
 * slow scalar routine. Subnormal halves round in the float add. */
inline uint16 f32_to_f16_bits16(float16 x)
{
    uint16 f = as_uint16(x);
    uint16 sign = (f >> 16) & 0x8000u;
    f &= 0x7fffffffu;
    uint16 n = (f + (0xc8000fffu + ((f >> 13) & 1u))) >> 13; /* rebias, round */
    uint16 d = as_uint16(as_float16(f) + 0.5f) - 0x3f000000u;
    uint16 o = select(n, d, f < 0x38800000u);
    o = select(o, (uint16)0x7c00u, f >= 0x47800000u);
    return o | sign;
}

/* IEEE half bits -> float, exact (= vload_half, checked exhaustively). */
inline float16 f16_bits_to_f32_16(uint16 h)
{
    uint16 e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint16 o = ((e + 112u) << 23) | (m << 13);
    o = select(o, as_uint16(convert_float16(m) * 0x1p-24f), e == 0u);
    o = select(o, 0x7f800000u | (m << 13), e == 31u);
    return as_float16(o | ((h & 0x8000u) << 16));
}

/* group_params of 16 groups (lanes) without storing: *entry gets each
 * group's parameter entry as stored (PARAM_BYTES bytes, little-endian),
 * *s and *z the stored (scale, zero). */
void group_params16(float16 lo, float16 hi, float alpha, uint16 *entry, float16 *s, float16 *z)
{
#if PARAM_FP8
    float l[16], h[16], sa[16], za[16];
    uint e[16];
    vstore16(lo, 0, l);
    vstore16(hi, 0, h);
    for (int i = 0; i < 16; i++) {
        float lo1 = alpha * l[i], hi1 = alpha * h[i];
        float scale = (hi1 - lo1) / (float)(LEVELS - 1);
        scale = fmax(scale, MIN_SCALE);
        uchar se = kvq_f32_to_e4m3(scale);
        scale = kvq_e4m3_to_f32(se);
#if ZERO_INT
        float zero = rint(-lo1 / scale);
        zero = zero > 0.0f ? fmin(zero, (float)(LEVELS - 1)) : 0.0f; /* +0, as above */
        uchar ze = kvq_f32_to_e4m3(zero);
#else
        uchar ze = kvq_f32_to_e4m3(lo1);
        float zero = kvq_e4m3_to_f32(ze);
#endif
        sa[i] = scale;
        za[i] = zero;
        e[i] = (uint)se | ((uint)ze << 8);
    }
    *s = vload16(0, sa);
    *z = vload16(0, za);
    *entry = vload16(0, e);
#else
    lo = alpha * lo;
    hi = alpha * hi;
    float16 scale = (hi - lo) / (float)(LEVELS - 1);
    scale = fmax(scale, MIN_SCALE);
    uint16 sb = f32_to_f16_bits16(scale);
    scale = f16_bits_to_f32_16(sb);
#if ZERO_INT
    float16 zero = rint(-lo / scale);
    zero = select((float16)0.0f, fmin(zero, (float)(LEVELS - 1)), zero > 0.0f); /* +0 */
    uint16 zb = f32_to_f16_bits16(zero);
#else
    uint16 zb = f32_to_f16_bits16(lo);
    float16 zero = f16_bits_to_f32_16(zb);
#endif
    *entry = sb | (zb << 16);
    *s = scale;
    *z = zero;
#endif
}

/* Stores entries 0..count-1 at params entries p0, p0 + 1, ... */
void store_params16(__global uchar *param0, uint16 entry, int count)
{
#if PARAM_FP8
    __global ushort *p = (__global ushort *)param0;
    if (count == 16) {
        vstore16(convert_ushort16(entry), 0, p);
        return;
    }
#else
    __global uint *p = (__global uint *)param0;
    if (count == 16) {
        vstore16(entry, 0, p);
        return;
    }
#endif
    uint a[16];
    vstore16(entry, 0, a);
    for (int i = 0; i < count; i++)
        p[i] = a[i];
}

inline float hmin16(float16 v)
{
    float8 a = VMIN(v.lo, v.hi);
    float4 b = VMIN(a.lo, a.hi);
    float2 c = VMIN(b.lo, b.hi);
    return VMIN(c.x, c.y);
}

inline float hmax16(float16 v)
{
    float8 a = VMAX(v.lo, v.hi);
    float4 b = VMAX(a.lo, a.hi);
    float2 c = VMAX(b.lo, b.hi);
    return VMAX(c.x, c.y);
}

#if !TERNARY
/* n words at p[k * stride]. */
inline void store_words4(__global uint *p, size_t stride, uint4 w)
{
    if (stride == 1) {
        vstore4(w, 0, p);
    } else {
        p[0] = w.x;
        p[stride] = w.y;
        p[2 * stride] = w.z;
        p[3 * stride] = w.w;
    }
}

inline void store_words2(__global uint *p, size_t stride, uint2 w)
{
    if (stride == 1) {
        vstore2(w, 0, p);
    } else {
        p[0] = w.x;
        p[stride] = w.y;
    }
}

/* Packs adjacent lane pairs: lane 2i | lane 2i+1 << b (b = the bits a lane
 * holds), via 64-bit lanes and a narrowing convert. */
#define PAIR8(u, b) convert_uint8(((u) | ((u) >> (32 - (b)))) & ((1ul << (2 * (b))) - 1ul))
#define PAIR4(u, b) convert_uint4(((u) | ((u) >> (32 - (b)))) & ((1ul << (2 * (b))) - 1ul))
#define PAIR2(u, b) convert_uint2(((u) | ((u) >> (32 - (b)))) & ((1ul << (2 * (b))) - 1ul))

/* The BITS words that 32 codes (c0: codes 0-15, c1: 16-31) pack into,
 * stored at p[k * stride], k < BITS (LSB-first bit stream, as pack_put). */
void store_words32(__global uint *p, size_t stride, uint16 c0, uint16 c1)
{
#if BITS == 8
    store_words4(p, stride, as_uint4(convert_uchar16(c0)));
    store_words4(p + 4 * stride, stride, as_uint4(convert_uchar16(c1)));
#elif BITS == 4
    uint2 wa = as_uint2(convert_uchar8(PAIR8(as_ulong8(c0), 4)));
    uint2 wb = as_uint2(convert_uchar8(PAIR8(as_ulong8(c1), 4)));
    store_words4(p, stride, (uint4)(wa, wb));
#elif BITS == 3
    uint2 ba = PAIR2(as_ulong2(PAIR4(as_ulong4(PAIR8(as_ulong8(c0), 3)), 6)), 12);
    uint2 bb = PAIR2(as_ulong2(PAIR4(as_ulong4(PAIR8(as_ulong8(c1), 3)), 6)), 12);
    /* four 24-bit blocks of 8 codes -> 3 words */
    p[0] = ba.x | (ba.y << 24);
    p[stride] = (ba.y >> 8) | (bb.x << 16);
    p[2 * stride] = (bb.x >> 16) | (bb.y << 8);
#elif BITS == 2
    uint wa = as_uint(convert_uchar4(PAIR4(as_ulong4(PAIR8(as_ulong8(c0), 2)), 4)));
    uint wb = as_uint(convert_uchar4(PAIR4(as_ulong4(PAIR8(as_ulong8(c1), 2)), 4)));
    store_words2(p, stride, (uint2)(wa, wb));
#else
    /* any other width: the bit stream through a 64-bit accumulator; 32
     * codes of BITS bits fill exactly BITS words */
    uint a[32];
    vstore16(c0, 0, a);
    vstore16(c1, 0, a + 16);
    ulong acc = 0;
    int n_bits = 0, w = 0;
    for (int i = 0; i < 32; i++) {
        acc |= (ulong)a[i] << n_bits;
        n_bits += BITS;
        if (n_bits >= 32) {
            p[(size_t)w++ * stride] = (uint)acc;
            acc >>= 32;
            n_bits -= 32;
        }
    }
#endif
}
#endif

#if TERNARY
/* 80 codes (c0: codes 0-15 ... c4: 64-79) -> 16 trit bytes, byte b =
 * sum of 3^d * code(5b + d): each digit is a lane shuffle of the codes
 * (written as swizzles, which compile to permutes). */
uint16 trit_bytes80(uint16 c0, uint16 c1, uint16 c2, uint16 c3, uint16 c4)
{
    uint16 d0 = (uint16)(c0.s0, c0.s5, c0.sa, c0.sf, c1.s4, c1.s9, c1.se, c2.s3, c2.s8, c2.sd, c3.s2, c3.s7, c3.sc, c4.s1, c4.s6, c4.sb);
    uint16 d1 = (uint16)(c0.s1, c0.s6, c0.sb, c1.s0, c1.s5, c1.sa, c1.sf, c2.s4, c2.s9, c2.se, c3.s3, c3.s8, c3.sd, c4.s2, c4.s7, c4.sc);
    uint16 d2 = (uint16)(c0.s2, c0.s7, c0.sc, c1.s1, c1.s6, c1.sb, c2.s0, c2.s5, c2.sa, c2.sf, c3.s4, c3.s9, c3.se, c4.s3, c4.s8, c4.sd);
    uint16 d3 = (uint16)(c0.s3, c0.s8, c0.sd, c1.s2, c1.s7, c1.sc, c2.s1, c2.s6, c2.sb, c3.s0, c3.s5, c3.sa, c3.sf, c4.s4, c4.s9, c4.se);
    uint16 d4 = (uint16)(c0.s4, c0.s9, c0.se, c1.s3, c1.s8, c1.sd, c2.s2, c2.s7, c2.sc, c3.s1, c3.s6, c3.sb, c4.s0, c4.s5, c4.sa, c4.sf);
    return d0 + 3u * d1 + 9u * d2 + 27u * d3 + 81u * d4;
}
#endif

/* Stores word w of lane l at p[l * lane_stride + w]. */
inline void store_lanes(__global uint *p, int lane_stride, int w, uint16 v)
{
    uint a[16];
    vstore16(v, 0, a);
    __global uint *q = p + w;
    for (int l = 0; l < 16; l++, q += lane_stride)
        *q = a[l];
}
