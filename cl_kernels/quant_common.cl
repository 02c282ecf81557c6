/*
 * Per-group quantization math shared by every program that quantizes
 * (quantize.cl, kv_cache.cl): the format constants, parameter storage and
 * the code <-> value maps. Concatenated in front of those sources.
 *
 * Build options:
 *   -D FMT=0..4        q8, q4, q3, q2, t1.5 (lib/quant_format.h has the packing rule)
 *   -D PARAM_FP8=0|1   (scale, zero) stored as fp16 (4 bytes) or fp8 e4m3 (2 bytes)
 *   -D ZERO_INT=0|1    zero point as float (x = c*s + z) or integer code (x = (c - z)*s)
 *
 * The arithmetic is lib/reference.c's, operation for operation (no fma
 * contraction, correctly rounded division requested by the host), so codes
 * and parameters match the C reference bit for bit.
 */
#pragma OPENCL FP_CONTRACT OFF

#if FMT == 0
#define BITS 8
#define LEVELS 256
#elif FMT == 1
#define BITS 4
#define LEVELS 16
#elif FMT == 2
#define BITS 3
#define LEVELS 8
#elif FMT == 3
#define BITS 2
#define LEVELS 4
#elif FMT == 4
#define TERNARY 1
#define LEVELS 3
#else
#error "FMT must be 0..4"
#endif

#if PARAM_FP8
#define PARAM_BYTES 2
#define MIN_SCALE 0.001953125f
#else
#define PARAM_BYTES 4
#define MIN_SCALE 5.9604644775390625e-08f
#endif

#define INPUT_MAX 65504.0f

/* ------------------------------------------------------------ parameters */

#if PARAM_FP8
uchar f32_to_e4m3(float x)
{
    if (isnan(x))
        return (uchar)0x7f;
    uchar sign = signbit(x) ? (uchar)0x80 : (uchar)0;
    float a = fabs(x);
    if (a >= 448.0f)
        return sign | (uchar)0x7e;
    if (a < 0.015625f)
        return sign | (uchar)rint(a * 512.0f);
    int e;
    float m = frexp(a, &e);
    float sig = m * 2.0f;
    int e_unb = e - 1;
    int q = (int)rint((sig - 1.0f) * 8.0f);
    if (q == 8) {
        q = 0;
        e_unb++;
    }
    return sign | (uchar)((e_unb + 7) << 3) | (uchar)q;
}

float e4m3_to_f32(uchar v)
{
    int exp = (v >> 3) & 0xf, mant = v & 7;
    float out = exp == 0 ? ldexp((float)mant, -9) : ldexp(1.0f + (float)mant / 8.0f, exp - 7);
    return (v & 0x80) ? -out : out;
}

/* Stores v at slot i (0 scale, 1 zero) and returns the stored value. */
float put_param(__global uchar *param, int i, float v)
{
    uchar e = f32_to_e4m3(v);
    param[i] = e;
    return e4m3_to_f32(e);
}

float get_param(__global const uchar *param, int i) { return e4m3_to_f32(param[i]); }
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
    zero = fmin(fmax(zero, 0.0f), (float)(LEVELS - 1));
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

