/*
 * The cooperative decode variant (docs/gpu-decode.md): built after
 * attention.cl, whose helpers (regions, pages, query rows, parameters) it
 * shares with the serial variant.
 *
 * One work-group of WGS lanes per (split, kv head, row block, sequence)
 * walks its split's tiles of TILE = WGS x TPL tokens with an online
 * softmax, then writes either the finished output (the only split) or a
 * partial (m, l, acc) that clkvq_attn_merge combines. Per tile:
 *   K  a lane scores TPL consecutive tokens for the block's RB query rows:
 *      group-planar K gives one aligned TPL-word load per word, the query
 *      comes from local memory as one RB-wide load per channel and is used
 *      for TPL tokens, codes become floats without an int -> float
 *      conversion (UNIT_CODE_F, exact), and a group's scale and zero are
 *      applied once per group (the query's per-group sums).
 *   softmax  the tile's max by a local tree, running max and rescale in
 *      registers (log2 domain: the query carries scale x log2(e)), p to
 *      local memory [token][row].
 *   V  a lane is (a unit of VU words of a row, a token slice): a unit's
 *      codes sit at compile-time bit positions; p x scale and p x zero are
 *      folded per token and group, so a code costs its unpacking and RB
 *      multiply-adds into register accumulators. Token-major V puts the
 *      lanes of one token side by side, group-planar V those of one unit's
 *      consecutive tokens: both coalesce.
 * The token slices are summed once per split through local memory.
 *
 * Rows: ROWS = QPK x NQ query rows per kv head (attention.cl), cut into
 * NRB blocks of RB <= 8 rows, each its own work-group; row r attends to
 * tokens t < row_limit(n, r) (multi-query decode is causal).
 *
 * Pages: packed tiles sit at absolute multiples of TILE (a multiple of 16),
 * so a lane's TPL tokens and every 16-token segment lie in one page; a K
 * lane looks its page up once per tile and publishes (page row, offset)
 * per segment for the V lanes. A page id outside the pool masks its
 * tokens. Sinks and recent tokens (fp16 rows: the rings, or the fp16
 * scheme's pages) come in tiles of their own after the packed tiles; KIVI's
 * packed-K / fp16-V tokens take the fp16 V path inside packed tiles.
 *
 * Transforms: the query is rotated here (ROT) and gathered through perm_k;
 * outputs are un-permuted (perm_v), un-rotated and get mean_v (a row that
 * sees no token gets zeros) wherever a finished row is written: by the
 * decode kernel when it is the only split, else by the merge.
 *
 * Empty partials (the convention of every decode kernel, serial ones
 * included): l = 0 marks a partial with no token; its m is M_EMPTY
 * (-FLT_MAX, finite: exp2(M_EMPTY - m) is 0 and M_EMPTY - M_EMPTY is 0,
 * never NaN) and its acc is not read. Merges key on l > 0.
 *
 * Build options (besides attention.cl's): WGS (a power of two, >= 16), TPL
 * (tokens per lane in K: 1, 2, 4), VU (V words per lane: a multiple of the
 * V format's unit dividing V_GW), RB (query rows per work-group, <= 8),
 * MWGS (merge work-group size, a power of two). lib/attn_fit.c sizes them.
 */
#pragma OPENCL FP_CONTRACT ON

#define INL inline __attribute__((always_inline))
#define TILE (WGS * TPL)
#define SEG 16
#define NSEG (TILE / SEG)
#define NRB ((ROWS + RB - 1) / RB)
#define M_EMPTY (-FLT_MAX)
/* rows that need their own causal limit or may be padding */
#define ROW_MASKS (NQ > 1 || ROWS % RB != 0)

/* A unit is the fewest whole words whose codes start at the same bit
 * positions in every unit: one word for widths dividing 32 and for base 3
 * (20 digits a word), lcm(bits, 32) / 32 words otherwise (3 for q3). */
#define BITS_NZ(B, T) ((B) | (T))
#define UNIT_MIN(B, T) ((T) ? 1 : BITS_NZ(B, T) / (BITS_NZ(B, T) & -BITS_NZ(B, T)))
#define UNIT_CODES(B, T, UW) ((T) ? 20 * (UW) : 32 * (UW) / BITS_NZ(B, T))

#define KU UNIT_MIN(K_BITS, K_TERNARY)
#define KUC UNIT_CODES(K_BITS, K_TERNARY, KU)
#define KUG (K_GW / KU)
#define VUC UNIT_CODES(V_BITS, V_TERNARY, VU)
#define VUG (V_GW / VU)
#define LPR (NG * VUG) /* V lanes per token row */
#define NS (WGS / LPR) /* token slices of the V phase */
#define NV (NS * LPR)  /* active V lanes */
#define VSTEPS ((TILE + NS - 1) / NS)
#define P_FLOATS_A (TILE * RB > NS * HEAD_DIM ? TILE * RB : NS * HEAD_DIM)
#define P_FLOATS (P_FLOATS_A > RB * HEAD_DIM ? P_FLOATS_A : RB * HEAD_DIM)

#if WGS & (WGS - 1) || WGS < 16
#error "WGS must be a power of two, at least 16"
#endif
#if TPL != 1 && TPL != 2 && TPL != 4
#error "TPL must be 1, 2 or 4"
#endif
#if V_GW % VU || VU % UNIT_MIN(V_BITS, V_TERNARY)
#error "VU must be a multiple of the V format's unit and divide V_GW"
#endif
#if LPR > WGS
#error "a V row needs more lanes than the work-group has: raise VU or WGS"
#endif
#if RB < 1 || RB > 8
#error "RB (query rows per work-group) must be 1..8"
#endif

/* Code j of a unit whose words are in the private array w (j a
 * compile-time constant after unrolling: shifts and masks fold). */
#define UNIT_CODE(w, j, BITS)                                                                 \
    KVQ_CODE((w)[KVQ_WORD_OF(j, BITS)],                                                       \
             KVQ_STRADDLES(j, BITS) ? (w)[KVQ_WORD_OF(j, BITS) + 1] : 0u, j, BITS)

/* Codes are used centred, as code - MID with MID = levels / 2 (an integer:
 * every step stays exact), and a group's zero point absorbs s * MID:
 * s * code + z = s * (code - MID) + (z + s * MID). Both terms of a sum of
 * p * v over tokens would otherwise be about as large as the group's range
 * while the sum itself is small (values around 0): fp32 would lose the
 * difference. The centring costs nothing (it folds into the constant
 * subtracted below). */
#define K_MID ((float)(K_LEVELS / 2))
#define V_MID ((float)(V_LEVELS / 2))

/* Exact integer -> float (minus mid) for codes < 2^23 in two full-rate
 * operations (an int -> float conversion is a quarter- or sixteenth-rate
 * one on GPUs). */
INL float code_f(uint c, float mid) { return as_float(c | 0x4B000000u) - (8388608.0f + mid); }

/* Code j of a unit as a float, for widths dividing 16 (8, 4, 2 bits),
 * without shifting it down: the field at bit o < 23 - bits is masked in
 * place and given the exponent that makes its lowest bit weigh 1, 2^(23 -
 * o); taking 2^(23 - o) + MID off leaves the centred code, exactly.
 * Fields higher up come from the word shifted by 16 (one shift per word,
 * shared by its codes). Three operations per code; other widths take the
 * generic path. */
#define FIELD_POS(j, BITS) (((j) * (BITS)) & 31)
#define FIELD_EXP(o) ((uint)(150 - (o)) << 23)
#define FIELD_F(x, o, BITS, MID)                                                              \
    (as_float(((x) & (((1u << (BITS)) - 1u) << (o))) | FIELD_EXP(o)) -                        \
     (as_float(FIELD_EXP(o)) + (MID)))
#define UNIT_CODE_F(w, j, BITS, TERN, MID)                                                    \
    ((!(TERN) && 16 % BITS_NZ(BITS, TERN) == 0)                                               \
         ? (FIELD_POS(j, BITS) + (BITS) <= 23                                                 \
                ? FIELD_F((w)[KVQ_WORD_OF(j, BITS)], FIELD_POS(j, BITS), BITS, MID)           \
                : FIELD_F((w)[KVQ_WORD_OF(j, BITS)] >> 16, FIELD_POS(j, BITS) - 16, BITS, MID)) \
         : code_f(UNIT_CODE(w, j, BITS), MID))

/* RB consecutive floats of local memory (16-byte aligned when RB % 4 == 0):
 * one wide load per four rows. */
#if RB % 4 == 0
#define LOAD_ROWS(dst, src)                                                                   \
    do {                                                                                      \
        _Pragma("unroll") for (int h4_ = 0; h4_ < RB / 4; h4_++)                             \
        {                                                                                     \
            float4 v_ = ((__local const float4 *)(src))[h4_];                                 \
            (dst)[4 * h4_] = v_.s0;                                                           \
            (dst)[4 * h4_ + 1] = v_.s1;                                                       \
            (dst)[4 * h4_ + 2] = v_.s2;                                                       \
            (dst)[4 * h4_ + 3] = v_.s3;                                                       \
        }                                                                                     \
    } while (0)
#elif RB % 2 == 0
#define LOAD_ROWS(dst, src)                                                                   \
    do {                                                                                      \
        _Pragma("unroll") for (int h2_ = 0; h2_ < RB / 2; h2_++)                             \
        {                                                                                     \
            float2 v_ = ((__local const float2 *)(src))[h2_];                                 \
            (dst)[2 * h2_] = v_.s0;                                                           \
            (dst)[2 * h2_ + 1] = v_.s1;                                                       \
        }                                                                                     \
    } while (0)
#else
#define LOAD_ROWS(dst, src)                                                                   \
    do {                                                                                      \
        _Pragma("unroll") for (int h_ = 0; h_ < RB; h_++)(dst)[h_] = (src)[h_];               \
    } while (0)
#endif

/* TPL consecutive words from an address aligned to TPL words. */
#if TPL == 4
#define LOAD_TPL(dst, stride, k, p)                                                           \
    do {                                                                                      \
        uint4 v_ = *(__global const uint4 *)(p);                                              \
        (dst)[k] = v_.s0;                                                                     \
        (dst)[(stride) + (k)] = v_.s1;                                                        \
        (dst)[2 * (stride) + (k)] = v_.s2;                                                    \
        (dst)[3 * (stride) + (k)] = v_.s3;                                                    \
    } while (0)
#elif TPL == 2
#define LOAD_TPL(dst, stride, k, p)                                                           \
    do {                                                                                      \
        uint2 v_ = *(__global const uint2 *)(p);                                              \
        (dst)[k] = v_.s0;                                                                     \
        (dst)[(stride) + (k)] = v_.s1;                                                        \
    } while (0)
#else
#define LOAD_TPL(dst, stride, k, p) ((dst)[k] = *(p))
#endif

/* ------------------------------------------------------------------ helpers */

/* A reduction over the work-group (is_max: max, else sum; a constant at
 * each call), RB values per lane, in uniform control flow; the result is
 * in red[h * WGS], read before red is reused. lid is passed in: PoCL 3.1
 * miscompiles get_local_id() in an inlined helper after a barrier region
 * (see write_empty in attention.cl). */
INL void tree_reduce(__local float *red, const float *v, int lid, int is_max)
{
#pragma unroll
    for (int h = 0; h < RB; h++)
        red[h * WGS + lid] = v[h];
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WGS / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
#pragma unroll
            for (int h = 0; h < RB; h++) {
                float a = red[h * WGS + lid], b = red[h * WGS + lid + stride];
                red[h * WGS + lid] = is_max ? fmax(a, b) : a + b;
            }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
}

/* x[0 .. n_rows * HEAD_DIM) <- (H_b / sqrt(b)) x per block of b channels
 * (clkvq_packing.h's kvq_fwht, which is its own inverse), by nt lanes:
 * butterflies of one stage spread over the lanes, a barrier per stage
 * (uniform trip counts). Blocks never cross rows (b divides HEAD_DIM). */
INL void fwht_local(__local float *x, int n_rows, int lid, int nt)
{
    const int b = kvq_rot_block(HEAD_DIM);
    const int pairs = n_rows * HEAD_DIM / 2;
    for (int len = 1; len < b; len *= 2) {
        for (int p = lid; p < pairs; p += nt) {
            int k = p % (b / 2);
            int j = p / (b / 2) * b + k / len * 2 * len + k % len;
            float u = x[j], v = x[j + len];
            x[j] = u + v;
            x[j + len] = u - v;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float sc = kvq_rot_scale(b);
    for (int i = lid; i < n_rows * HEAD_DIM; i += nt)
        x[i] *= sc;
    barrier(CLK_LOCAL_MEM_FENCE);
}

/* Finished rows in packed order (rows[i * HEAD_DIM + c], normalized; zero
 * for a row that saw no token, l_rows[i] == 0) -> the model's order in
 * tmp: un-permuted through perm_v, then un-rotated except for the signs,
 * which emit_row applies (kvq_unrotate: butterflies, then signs). */
INL void unmap_rows(__local const float *rows, __local float *tmp, int n_rows,
                    __global const int *perm_v, int kh, int lid, int nt)
{
    for (int i = lid; i < n_rows * HEAD_DIM; i += nt) {
        int r = i / HEAD_DIM, c = i % HEAD_DIM;
        tmp[r * HEAD_DIM + (perm_v ? perm_v[kh * HEAD_DIM + c] : c)] = rows[i];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
#if ROT
    fwht_local(tmp, n_rows, lid, nt);
#endif
}

/* Channel d of an unmapped row: the rotation's sign, and mean_v when the
 * row saw a token. */
INL float emit_value(float x, int d, int kh, int seen, __global const float *mean_v,
                     uint rot_seed)
{
#if ROT
    x *= kvq_rot_sign(rot_seed, kh, d);
#else
    (void)rot_seed;
#endif
    return seen && mean_v ? x + mean_v[kh * HEAD_DIM + d] : x;
}

/* (scale, zero) of TPL consecutive parameter entries (group-planar). */
INL void params_tpl(__global const uchar *params, size_t e0, float *s, float *z)
{
#if PARAM_FP8 || TPL == 1
#pragma unroll
    for (int i = 0; i < TPL; i++) {
        float2 sz = load_params(params, e0 + i);
        s[i] = sz.x;
        z[i] = sz.y;
    }
#elif TPL == 2
    float4 v = vload_half4(0, (__global const half *)params + 2 * e0);
    s[0] = v.s0;
    z[0] = v.s1;
    s[1] = v.s2;
    z[1] = v.s3;
#else
    float8 v = vload_half8(0, (__global const half *)params + 2 * e0);
    s[0] = v.s0;
    z[0] = v.s1;
    s[1] = v.s2;
    z[1] = v.s3;
    s[2] = v.s4;
    z[2] = v.s5;
    s[3] = v.s6;
    z[3] = v.s7;
#endif
}

/* ------------------------------------------------------------------ K
 * sc[i * RB + h]: score of the lane's token i for row h (log2 domain). */

#if SCHEME != KVQ_SCHEME_FP16
#if K_CHANNEL
/* Per-channel key groups (GROUP_SIZE tokens of one channel, contiguous
 * words): the lane's TPL tokens sit in one group at code positions j0 ..
 * j0 + TPL - 1, the same for every channel, so their bit positions are
 * computed once. score = sum_c (q_c s_c) code + sum_c q_c z_c: the second
 * sum is the same for the lane's tokens. */
INL void k_scores(__global const uint *kc, __global const uchar *kp, size_t hb, int off, int B,
                  __local const float *q_loc, __local const float *qsum_loc, float *sc)
{
    (void)qsum_loc;
    int j0 = off % GROUP_SIZE;
    int wlo = KVQ_WORD_OF(j0, K_BITS);
    int whi = min(wlo + 1, K_GW - 1); /* in the group: never past the buffer */
    size_t base = kvq_channel_group_word(hb, off, 0, B, GROUP_SIZE, HEAD_DIM, K_GW);
    size_t pbase = kvq_channel_param(hb, off, 0, B, GROUP_SIZE, HEAD_DIM);
    float zq[RB];
#pragma unroll
    for (int i = 0; i < TPL * RB; i++)
        sc[i] = 0.0f;
#pragma unroll
    for (int h = 0; h < RB; h++)
        zq[h] = 0.0f;
    for (int c = 0; c < HEAD_DIM; c++) {
        __global const uint *w = kc + base + (size_t)c * K_GW;
        uint lo = w[wlo], hi = w[whi];
        float2 sz = load_params(kp, pbase + c);
        float qv[RB], qs[RB];
        LOAD_ROWS(qv, q_loc + c * RB);
#pragma unroll
        for (int h = 0; h < RB; h++) {
            qs[h] = qv[h] * sz.x;
#if ZERO_INT
            zq[h] = mad(qs[h], K_MID - sz.y, zq[h]);
#else
            zq[h] = mad(qv[h], mad(sz.x, K_MID, sz.y), zq[h]);
#endif
        }
#pragma unroll
        for (int i = 0; i < TPL; i++) {
#if K_TERNARY
            int j = j0 + i;
            uint code = KVQ_TRIT((lo >> (8 * ((j / 5) % 4))) & 0xffu, j % 5);
#else
            int pos = (j0 + i) * K_BITS - 32 * wlo; /* < 64 */
            ulong win = (ulong)lo | ((ulong)hi << 32);
            uint code = (uint)(win >> pos) & ((1u << K_BITS) - 1u);
#endif
            float cf = code_f(code, K_MID);
#pragma unroll
            for (int h = 0; h < RB; h++)
                sc[i * RB + h] = mad(qs[h], cf, sc[i * RB + h]);
        }
    }
#pragma unroll
    for (int i = 0; i < TPL; i++)
#pragma unroll
        for (int h = 0; h < RB; h++)
            sc[i * RB + h] += zq[h];
}
#else
/* Per-token groups: per group the RB x TPL dot products with the raw
 * codes, then s * dot + z * sum(q) (float zero) or s * (dot - z * sum(q)). */
INL void k_scores(__global const uint *kc, __global const uchar *kp, size_t hb, int off, int B,
                  __local const float *q_loc, __local const float *qsum_loc, float *sc)
{
#pragma unroll
    for (int i = 0; i < TPL * RB; i++)
        sc[i] = 0.0f;
    /* groups: left to the compiler (the body is large; nothing private is
     * indexed by g) */
    for (int g = 0; g < NG; g++) {
        float dot[TPL * RB];
#pragma unroll
        for (int i = 0; i < TPL * RB; i++)
            dot[i] = 0.0f;
#pragma unroll
        for (int u = 0; u < KUG; u++) {
            uint kw[TPL * KU];
#pragma unroll
            for (int k = 0; k < KU; k++) {
#if LAYOUT_K == KVQ_LAYOUT_GROUP_PLANAR
                __global const uint *wp = kc +
                                          kvq_token_group_word(LAYOUT_K, hb, off, g, B, NG, K_GW) +
                                          (size_t)(u * KU + k) * B;
                LOAD_TPL(kw, KU, k, wp);
#else
#pragma unroll
                for (int i = 0; i < TPL; i++)
                    kw[i * KU + k] = kc[kvq_token_group_word(LAYOUT_K, hb, off + i, g, B, NG, K_GW) +
                                        u * KU + k];
#endif
            }
#pragma unroll
            for (int j = 0; j < KUC; j++) {
                const int jg = u * KUC + j;
                if (jg < GROUP_SIZE) { /* base-3 groups end inside their last word */
                    float qv[RB];
                    LOAD_ROWS(qv, q_loc + (g * GROUP_SIZE + jg) * RB);
#pragma unroll
                    for (int i = 0; i < TPL; i++) {
                        float cf = UNIT_CODE_F(kw + i * KU, j, K_BITS, K_TERNARY, K_MID);
#pragma unroll
                        for (int h = 0; h < RB; h++)
                            dot[i * RB + h] = mad(qv[h], cf, dot[i * RB + h]);
                    }
                }
            }
        }
        float s[TPL], z[TPL];
#if LAYOUT_K == KVQ_LAYOUT_GROUP_PLANAR
        params_tpl(kp, kvq_token_param(LAYOUT_K, hb, off, g, B, NG), s, z);
#else
#pragma unroll
        for (int i = 0; i < TPL; i++) {
            float2 sz = load_params(kp, kvq_token_param(LAYOUT_K, hb, off + i, g, B, NG));
            s[i] = sz.x;
            z[i] = sz.y;
        }
#endif
        float qg[RB];
        LOAD_ROWS(qg, qsum_loc + g * RB);
#pragma unroll
        for (int i = 0; i < TPL; i++)
#if ZERO_INT
            z[i] -= K_MID; /* s (dot - (z - MID) sum(q)) */
#else
            z[i] = mad(s[i], K_MID, z[i]); /* s dot + (z + s MID) sum(q) */
#endif
#pragma unroll
        for (int i = 0; i < TPL; i++)
#pragma unroll
            for (int h = 0; h < RB; h++) {
#if ZERO_INT
                sc[i * RB + h] = mad(s[i], mad(-z[i], qg[h], dot[i * RB + h]), sc[i * RB + h]);
#else
                sc[i * RB + h] = mad(s[i], dot[i * RB + h], mad(z[i], qg[h], sc[i * RB + h]));
#endif
            }
    }
}
#endif
#endif

/* fp16 keys of the lane's tokens (row[i]: offset of token i's fp16 row,
 * -1 when it is masked). */
INL void k_scores_fp16(__global const half *kfp, const long *row, __local const float *q_loc,
                       float *sc)
{
#pragma unroll
    for (int i = 0; i < TPL * RB; i++)
        sc[i] = 0.0f;
    for (int c0 = 0; c0 < HEAD_DIM; c0 += 8) {
#pragma unroll
        for (int i = 0; i < TPL; i++) {
            if (row[i] >= 0) {
                float8 k8 = vload_half8(0, kfp + row[i] + c0);
                float kk[8] = {k8.s0, k8.s1, k8.s2, k8.s3, k8.s4, k8.s5, k8.s6, k8.s7};
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    float qv[RB];
                    LOAD_ROWS(qv, q_loc + (c0 + e) * RB);
#pragma unroll
                    for (int h = 0; h < RB; h++)
                        sc[i * RB + h] = mad(qv[h], kk[e], sc[i * RB + h]);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ V */

#if SCHEME != KVQ_SCHEME_FP16
/* One packed token into the lane's unit accumulators: acc[j][h] += (p_h
 * s) code_j; the zero point goes to zacc once per token (float zero: p z;
 * integer zero: -p s z), added to every channel of the group at the end. */
INL void v_packed(__global const uint *vc, __global const uchar *vp, size_t hb, int off, int B,
                  int g, int w0, const float *p, float *acc, float *zacc)
{
    uint uw[VU];
    size_t base = kvq_token_group_word(LAYOUT_V, hb, off, g, B, NG, V_GW);
#if LAYOUT_V == KVQ_LAYOUT_TOKEN_MAJOR
    __global const uint *wp = vc + base + w0; /* aligned to VU words */
#if VU == 4
    uint4 v4 = *(__global const uint4 *)wp;
    uw[0] = v4.s0;
    uw[1] = v4.s1;
    uw[2] = v4.s2;
    uw[3] = v4.s3;
#elif VU == 2
    uint2 v2 = *(__global const uint2 *)wp;
    uw[0] = v2.s0;
    uw[1] = v2.s1;
#else
#pragma unroll
    for (int k = 0; k < VU; k++)
        uw[k] = wp[k];
#endif
#else
#pragma unroll
    for (int k = 0; k < VU; k++)
        uw[k] = vc[base + (size_t)(w0 + k) * B];
#endif
    float2 sz = load_params(vp, kvq_token_param(LAYOUT_V, hb, off, g, B, NG));
    float ps[RB];
#if ZERO_INT
    const float zc = V_MID - sz.y; /* (code - z) s = (code - MID) s + (MID - z) s */
#else
    const float zc = mad(sz.x, V_MID, sz.y);
#endif
#pragma unroll
    for (int h = 0; h < RB; h++) {
        ps[h] = p[h] * sz.x;
#if ZERO_INT
        zacc[h] = mad(ps[h], zc, zacc[h]);
#else
        zacc[h] = mad(p[h], zc, zacc[h]);
#endif
    }
#pragma unroll
    for (int j = 0; j < VUC; j++) {
        float cf = UNIT_CODE_F(uw, j, V_BITS, V_TERNARY, V_MID);
#pragma unroll
        for (int h = 0; h < RB; h++)
            acc[j * RB + h] = mad(ps[h], cf, acc[j * RB + h]);
    }
}
#endif

/* One fp16 row (at offset row) into the same accumulators: channels chan0
 * .. chan0 + VUC - 1 (a base-3 unit's last codes may lie past its group:
 * never read, never written out). */
INL void v_fp16(__global const half *vfp, long row, int chan0, int j0, const float *p,
                float *acc)
{
    (void)j0;
#pragma unroll
    for (int j = 0; j < VUC; j += 4) {
        /* a predicate, not a break: the loop must unroll (acc in registers);
         * VUC, j0 and GROUP_SIZE are multiples of 4 */
        if (!V_TERNARY || j0 + j < GROUP_SIZE) {
            float4 v = vload_half4(0, vfp + row + chan0 + j);
            float vv[4] = {v.s0, v.s1, v.s2, v.s3};
#pragma unroll
            for (int e = 0; e < 4; e++)
#pragma unroll
                for (int h = 0; h < RB; h++)
                    acc[(j + e) * RB + h] = mad(p[h], vv[e], acc[(j + e) * RB + h]);
        }
    }
}

/* ------------------------------------------------------------------ tiles
 * Tiles of a sequence of length n: packed tiles sit at absolute positions
 * c * TILE, from the one holding the first packed token to q_end(K)
 * (tokens before the sinks' end are masked), so aligned vectors never
 * straddle pages; then fp16 tiles hold the sinks and the recent tokens in
 * a virtual order u (sinks, then [q_end(K), n)). lib/attention.c counts
 * them the same way to size the split. */
INL void seq_tiles(int n, int n_sink, int window, int residual, int *sink_end, int *qk, int *qv,
                   int *pk_tile0, int *n_pk_tiles, int *n_fp, int *n_tiles)
{
    *sink_end = kvq_sink_end(n, n_sink);
    *qk = q_end_k(n, n_sink, window, residual);
    *qv = q_end_v(n, n_sink, window, residual);
    *pk_tile0 = *sink_end / TILE;
    *n_pk_tiles = *qk > *sink_end ? (*qk + TILE - 1) / TILE - *pk_tile0 : 0;
    *n_fp = *sink_end + (n - *qk);
    *n_tiles = *n_pk_tiles + (*n_fp + TILE - 1) / TILE;
}

/* ------------------------------------------------------------------ decode
 * Grid (n_slots * WGS, n_kv_heads * NRB, n_seqs). q: [seq][query][q head]
 * [HEAD_DIM] in the model's order. With n_slots == 1 the output is written
 * finished; otherwise partials [row][slot][m, l, acc[HEAD_DIM]] (m in the
 * log2 domain; packed channel order) for clkvq_attn_merge. */
__kernel __attribute__((reqd_work_group_size(WGS, 1, 1))) void
clkvq_attn_decode(__global const float *q, __global const int *perm_k,
                  __global const int *perm_v, __global const float *mean_v,
                  __global const uint *kc, __global const uchar *kp, __global const uint *vc,
                  __global const uchar *vp, __global const half *kfp, __global const half *vfp,
                  __global const int *table, __global const int *seq_len,
                  __global float *partials, __global float *out, int n_q_heads, int n_kv_heads,
                  int max_blocks, int block_size, int n_pages, int fp_slots, int ring,
                  int n_sink, int window, int residual, int tiles_per_split, int n_slots,
                  float scale_log2, uint rot_seed)
{
    __local float q_loc[HEAD_DIM * RB] __attribute__((aligned(16)));
    __local float qsum_loc[NG * RB] __attribute__((aligned(16)));
    /* p of the tile [token][row]; after the last tile the token slices'
     * sums [slice][channel] (xbuf); the rotation's staging rows */
    __local float p_loc[P_FLOATS] __attribute__((aligned(16)));
    __local float red[RB * WGS];
    __local float l_rows[RB];
    __local int seg_hb[NSEG], seg_off[NSEG];
    __local float *xbuf = p_loc;
    __local float *out_loc = q_loc; /* finished rows, once q is no longer read */

    const int split = (int)get_group_id(0), s = (int)get_group_id(2);
    const int kh = (int)get_group_id(1) / NRB, rb = (int)get_group_id(1) % NRB;
    const int lid = (int)get_local_id(0);
    const int B = block_size;
    const int n = seq_len[s];
    int sink_end, qk, qv, pk_tile0, n_pk_tiles, n_fp, n_tiles;
    seq_tiles(n, n_sink, window, residual, &sink_end, &qk, &qv, &pk_tile0, &n_pk_tiles, &n_fp,
              &n_tiles);
    const int tile0 = split * tiles_per_split;
    const int tile1 = min(tile0 + tiles_per_split, n_tiles);
    const int direct = n_slots == 1;
    if (tile0 >= tile1) { /* uniform: the whole work-group leaves */
        if (direct) {
            for (int i = lid; i < RB * HEAD_DIM; i += WGS)
                if (rb * RB + i / HEAD_DIM < ROWS)
                    out[row_index(s, kh, rb * RB + i / HEAD_DIM, n_q_heads) * HEAD_DIM +
                        i % HEAD_DIM] = 0.0f;
        } else if (lid < RB && rb * RB + lid < ROWS) {
            __global float *pp =
                partial_of(partials, s, kh, rb * RB + lid, split, n_q_heads, n_slots);
            pp[0] = M_EMPTY;
            pp[1] = 0.0f;
        }
        return;
    }

    /* the block's query rows: rotated (ROT), gathered through perm_k and
     * scaled into [channel][row] */
#if ROT
    __local float *stage = p_loc;
    for (int i = lid; i < RB * HEAD_DIM; i += WGS) {
        int r = rb * RB + i / HEAD_DIM, c = i % HEAD_DIM;
        stage[i] = r < ROWS ? q[row_index(s, kh, r, n_q_heads) * HEAD_DIM + c] *
                                  kvq_rot_sign(rot_seed, kh, c)
                            : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    fwht_local(stage, RB, lid, WGS);
#endif
    for (int i = lid; i < RB * HEAD_DIM; i += WGS) {
        int h = i / HEAD_DIM, c = i % HEAD_DIM, r = rb * RB + h;
        int src = perm_k ? perm_k[kh * HEAD_DIM + c] : c;
#if ROT
        float v = stage[h * HEAD_DIM + src];
#else
        float v = r < ROWS ? q[row_index(s, kh, r, n_q_heads) * HEAD_DIM + src] : 0.0f;
#endif
        q_loc[c * RB + h] = v * scale_log2;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
#if !K_CHANNEL && SCHEME != KVQ_SCHEME_FP16
    for (int i = lid; i < NG * RB; i += WGS) {
        int g = i / RB, h = i % RB;
        float sum = 0.0f;
        for (int j = 0; j < GROUP_SIZE; j++)
            sum += q_loc[(g * GROUP_SIZE + j) * RB + h];
        qsum_loc[i] = sum;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
#endif

#if ROW_MASKS
    /* each row's causal limit: t < lim[h] (padding rows see nothing) */
    int lim[RB];
#pragma unroll
    for (int h = 0; h < RB; h++)
        lim[h] = rb * RB + h < ROWS ? row_limit(n, rb * RB + h) : 0;
#endif

    /* the lane's V unit and token slice */
#if LAYOUT_V == KVQ_LAYOUT_TOKEN_MAJOR
    const int ui = lid % LPR, ts = lid / LPR; /* a token's units are adjacent lanes */
#else
    const int ts = lid % NS, ui = lid / NS; /* a unit's tokens are adjacent lanes */
#endif
    const int v_active = lid < NV;
    const int gv = ui / VUG, w0 = (ui % VUG) * VU, j0v = (ui % VUG) * VUC;
    const int chan0 = gv * GROUP_SIZE + j0v;

    float acc[VUC * RB], zacc[RB], m_run[RB], l_lane[RB];
#pragma unroll
    for (int i = 0; i < VUC * RB; i++)
        acc[i] = 0.0f;
#pragma unroll
    for (int h = 0; h < RB; h++) {
        zacc[h] = 0.0f;
        m_run[h] = M_EMPTY;
        l_lane[h] = 0.0f;
    }

    for (int tile = tile0; tile < tile1; tile++) {
        const int fp_tile = tile >= n_pk_tiles;
        const int tt0 = lid * TPL;
        float sc[TPL * RB];
        int valid[TPL];
#if ROW_MASKS
        int t_of[TPL]; /* the token in the lane's slot i */
#define SET_T(i, t) (t_of[i] = (t))
#define ROW_OK(i, h) (valid[i] && t_of[i] < lim[h])
#else
#define SET_T(i, t) ((void)0)
#define ROW_OK(i, h) valid[i]
#endif
#pragma unroll
        for (int i = 0; i < TPL * RB; i++)
            sc[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < TPL; i++) {
            valid[i] = 0;
            SET_T(i, 0);
        }
        if (!fp_tile) {
#if SCHEME != KVQ_SCHEME_FP16
            const int t0 = (pk_tile0 + tile) * TILE + tt0;
#pragma unroll
            for (int i = 0; i < TPL; i++) {
                SET_T(i, t0 + i);
                valid[i] = t0 + i >= sink_end && t0 + i < qk;
            }
            if (t0 < qk) {
                int page = kvq_page_of(table, s, max_blocks, t0, B);
                int good = page >= 0 && page < n_pages;
                size_t hb = good ? (size_t)page * n_kv_heads + kh : 0;
                int off = t0 % B;
                if (tt0 % SEG == 0) {
                    seg_hb[tt0 / SEG] = good ? (int)hb : -1;
                    seg_off[tt0 / SEG] = off;
                }
#pragma unroll
                for (int i = 0; i < TPL; i++)
                    valid[i] = valid[i] && good;
                if (t0 + TPL > sink_end && good)
                    k_scores(kc, kp, hb, off, B, q_loc, qsum_loc, sc);
            }
#endif
        } else {
            const int u0 = (tile - n_pk_tiles) * TILE + tt0;
            long row[TPL];
#pragma unroll
            for (int i = 0; i < TPL; i++) {
                int u = u0 + i;
                int t = u < sink_end ? u : qk + (u - sink_end);
                row[i] = u < n_fp ? fp_row(PAGES, kh, t, fp_slots, ring, n_sink) : -1;
                valid[i] = row[i] >= 0;
                SET_T(i, t);
            }
            k_scores_fp16(kfp, row, q_loc, sc);
        }

        /* online softmax: the tile's max over the work-group, then p */
        float mx[RB];
#pragma unroll
        for (int h = 0; h < RB; h++) {
            mx[h] = M_EMPTY;
#pragma unroll
            for (int i = 0; i < TPL; i++)
                mx[h] = ROW_OK(i, h) ? fmax(mx[h], sc[i * RB + h]) : mx[h];
        }
        tree_reduce(red, mx, lid, 1);
        float alpha[RB];
        int rescale = 0;
#pragma unroll
        for (int h = 0; h < RB; h++) {
            float m_new = fmax(m_run[h], red[h * WGS]);
            alpha[h] = exp2(m_run[h] - m_new);
            rescale |= m_new != m_run[h];
            m_run[h] = m_new;
        }
#pragma unroll
        for (int i = 0; i < TPL; i++) {
            float pv[RB];
#pragma unroll
            for (int h = 0; h < RB; h++) {
                pv[h] = ROW_OK(i, h) ? exp2(sc[i * RB + h] - m_run[h]) : 0.0f;
                l_lane[h] = i == 0 ? mad(l_lane[h], alpha[h], pv[h]) : l_lane[h] + pv[h];
            }
#pragma unroll
            for (int h = 0; h < RB; h++)
                p_loc[(tt0 + i) * RB + h] = pv[h];
        }
#ifdef CLKVQ_PLANTED_BUG /* the tests' own check: this build must fail them */
        rescale = 0;
#endif
        if (rescale) { /* uniform: m_run is the same in every lane */
#pragma unroll
            for (int j = 0; j < VUC; j++)
#pragma unroll
                for (int h = 0; h < RB; h++)
                    acc[j * RB + h] *= alpha[h];
#pragma unroll
            for (int h = 0; h < RB; h++)
                zacc[h] *= alpha[h];
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        if (v_active) {
            for (int k = 0; k < VSTEPS; k++) {
                const int tt = ts + k * NS;
                if (TILE % NS && tt >= TILE)
                    break;
                float p[RB];
                LOAD_ROWS(p, p_loc + tt * RB);
                if (!fp_tile) {
#if SCHEME != KVQ_SCHEME_FP16
                    const int t = (pk_tile0 + tile) * TILE + tt;
                    uint seg = (uint)tt / SEG; /* non-negative: shifts, not divisions */
                    int hb = t < qk ? seg_hb[seg] : -1;
                    if (t >= sink_end && t < qv && hb >= 0) {
                        int off = seg_off[seg] + (int)((uint)tt % SEG);
                        v_packed(vc, vp, (size_t)hb, off, B, gv, w0, p, acc, zacc);
                    }
#if SCHEME == KVQ_SCHEME_KIVI /* packed keys, fp16 values: the last R tokens */
                    else if (t >= qv && t < qk && hb >= 0) {
                        v_fp16(vfp, fp_row(PAGES, kh, t, fp_slots, ring, n_sink), chan0, j0v, p,
                               acc);
                    }
#endif
#endif
                } else {
                    const int u = (tile - n_pk_tiles) * TILE + tt;
                    if (u < n_fp) {
                        int t = u < sink_end ? u : qk + (u - sink_end);
                        long row = fp_row(PAGES, kh, t, fp_slots, ring, n_sink);
                        if (row >= 0)
                            v_fp16(vfp, row, chan0, j0v, p, acc);
                    }
                }
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
#undef SET_T
#undef ROW_OK
    }

    /* the split's sums: l over lanes, acc over token slices (per row) */
    tree_reduce(red, l_lane, lid, 0);
    float l_tot[RB];
#pragma unroll
    for (int h = 0; h < RB; h++)
        l_tot[h] = red[h * WGS];
    if (lid < RB)
        l_rows[lid] = red[lid * WGS];
    /* one row per round, the row a compile-time constant (a private array
     * indexed at run time would live in memory) */
#define XH(H) ((H) < RB ? (H) : 0) /* in bounds in the rounds RB leaves out */
#define XROUND(H)                                                                             \
    if ((H) < RB) {                                                                           \
        if (v_active) {                                                                       \
            _Pragma("unroll") for (int j = 0; j < VUC; j++)                                  \
            {                                                                                 \
                if (!V_TERNARY || j0v + j < GROUP_SIZE)                                       \
                    xbuf[ts * HEAD_DIM + chan0 + j] = acc[j * RB + XH(H)] + zacc[XH(H)];       \
            }                                                                                 \
        }                                                                                     \
        barrier(CLK_LOCAL_MEM_FENCE);                                                         \
        for (int c = lid; c < HEAD_DIM; c += WGS) {                                           \
            float sum = 0.0f;                                                                 \
            for (int r = 0; r < NS; r++)                                                      \
                sum += xbuf[r * HEAD_DIM + c];                                                \
            if (direct)                                                                       \
                out_loc[XH(H) * HEAD_DIM + c] = l_tot[XH(H)] > 0.0f ? sum / l_tot[XH(H)] : 0.0f; \
            else if (rb * RB + (H) < ROWS)                                                    \
                partial_of(partials, s, kh, rb * RB + (H), split, n_q_heads, n_slots)[2 + c] = \
                    sum;                                                                      \
        }                                                                                     \
        barrier(CLK_LOCAL_MEM_FENCE);                                                         \
        if (!direct && lid == 0 && rb * RB + (H) < ROWS) {                                    \
            __global float *pp =                                                              \
                partial_of(partials, s, kh, rb * RB + (H), split, n_q_heads, n_slots);        \
            pp[0] = m_run[XH(H)];                                                             \
            pp[1] = l_tot[XH(H)];                                                             \
        }                                                                                     \
    }
    XROUND(0) XROUND(1) XROUND(2) XROUND(3) XROUND(4) XROUND(5) XROUND(6) XROUND(7)
#undef XROUND
#undef XH
    if (direct) { /* the only split: the finished rows, in the model's space */
        unmap_rows(out_loc, xbuf, RB, perm_v, kh, lid, WGS);
        for (int i = lid; i < RB * HEAD_DIM; i += WGS) {
            int h = i / HEAD_DIM, d = i % HEAD_DIM;
            if (rb * RB + h < ROWS)
                out[row_index(s, kh, rb * RB + h, n_q_heads) * HEAD_DIM + d] =
                    emit_value(xbuf[i], d, kh, l_rows[h] > 0.0f, mean_v, rot_seed);
        }
    }
}

/* ------------------------------------------------------------------ merge
 * One work-group per (q head, sequence and query), as vLLM v2's reduce:
 * the max over slots by a tree, then the weights of MWGS slots at a time
 * in local memory, lanes over channels; empty slots (l = 0: their acc is
 * never read) get weight 0. Then the row is mapped back (perm_v, ROT,
 * mean_v). Grid (n_q_heads * MWGS, n_seqs * NQ). */
#define MCPL ((HEAD_DIM + MWGS - 1) / MWGS)
__kernel __attribute__((reqd_work_group_size(MWGS, 1, 1))) void
clkvq_attn_merge(__global const float *partials, __global const int *perm_v,
                 __global const float *mean_v, __global float *out, int n_q_heads, int n_slots,
                 uint rot_seed)
{
    __local float red[MWGS];
    __local float w_loc[MWGS];
    __local float row_loc[HEAD_DIM], tmp_loc[HEAD_DIM];
    const int qh = (int)get_group_id(0), sq = (int)get_group_id(1);
    const int lid = (int)get_local_id(0), kh = qh / QPK;
    const size_t qrow = (size_t)sq * n_q_heads + qh;
    __global const float *P = partials + qrow * n_slots * PARTIAL_STRIDE;

    float m = M_EMPTY;
    for (int i = lid; i < n_slots; i += MWGS)
        m = P[(size_t)i * PARTIAL_STRIDE + 1] > 0.0f ? fmax(m, P[(size_t)i * PARTIAL_STRIDE]) : m;
    red[lid] = m;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = MWGS / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            red[lid] = fmax(red[lid], red[lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float M = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);

    float acc[MCPL], lsum = 0.0f;
#pragma unroll
    for (int k = 0; k < MCPL; k++)
        acc[k] = 0.0f;
    for (int base = 0; base < n_slots; base += MWGS) {
        int i = base + lid;
        float w = 0.0f;
        if (i < n_slots) {
            float l_i = P[(size_t)i * PARTIAL_STRIDE + 1];
            if (l_i > 0.0f) {
                w = exp2(P[(size_t)i * PARTIAL_STRIDE] - M);
                lsum = mad(w, l_i, lsum);
            }
        }
        w_loc[lid] = w;
        barrier(CLK_LOCAL_MEM_FENCE);
        int cnt = min(MWGS, n_slots - base);
        for (int r = 0; r < cnt; r++) {
            float wr = w_loc[r];
            if (wr == 0.0f) /* uniform: the same slot for every lane */
                continue;
            __global const float *pa = P + (size_t)(base + r) * PARTIAL_STRIDE + 2;
#pragma unroll
            for (int k = 0; k < MCPL; k++) {
                int c = lid + k * MWGS;
                if (c < HEAD_DIM)
                    acc[k] = mad(wr, pa[c], acc[k]);
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    red[lid] = lsum;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = MWGS / 2; stride > 0; stride >>= 1) {
        if (lid < stride)
            red[lid] += red[lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float L = red[0];
#pragma unroll
    for (int k = 0; k < MCPL; k++) {
        int c = lid + k * MWGS;
        if (c < HEAD_DIM)
            row_loc[c] = L > 0.0f ? acc[k] / L : 0.0f;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    unmap_rows(row_loc, tmp_loc, 1, perm_v, kh, lid, MWGS);
    for (int d = lid; d < HEAD_DIM; d += MWGS)
        out[qrow * HEAD_DIM + d] = emit_value(tmp_loc[d], d, kh, L > 0.0f, mean_v, rot_seed);
}
