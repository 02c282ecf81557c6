/*
 * The "serial" decode variant: one work-item per (chunk, kv head, sequence)
 * doing the whole chunk with explicit vectors. Built after attention.cl
 * (same options, plus VW = 4, 8 or 16).
 *
 * Packed tokens run VW tokens per vector (lanes = tokens): with the
 * group-planar layout, word w of group g for VW consecutive tokens is one
 * contiguous vector load, so every format unpacks with shifts and masks
 * that are compile-time constants. CPUs (PoCL) compile these vectors to
 * SIMD directly instead of relying on vectorization across work-items.
 * Vectors start at multiples of VW, so they never straddle a page (page
 * sizes are multiples of 16). fp16 tokens run lanes = channels (vload_half
 * over a row). Query rows, causal limits and pages are attention.cl's.
 *
 * Code generation (read in PoCL's x86 output): left to itself
 * LLVM keeps the loops over rows and codes rolled, so accumulators live in
 * stack memory (a load, add and store per multiply-add) and shifts take
 * run-time amounts. Here every loop over rows, codes, words and vector
 * slots is unrolled (#pragma unroll; the bounds are build options), rows
 * are taken in blocks whose accumulators fit the vector registers (RB_QK,
 * RB_PV, JB, DVB), and q.k keeps two accumulators per row for short blocks
 * (an FMA's latency would otherwise bound the chain). Multiply-adds
 * contract to FMAs (FP_CONTRACT ON below, for these two kernels only:
 * decode is checked against fp64 at a tolerance, while the quantize
 * kernels must stay bit-exact; PoCL's mad() is a separate multiply and
 * add). Hot loops use no floor(), rint(), convert_*_rte() or integer
 * division: on PoCL those are sequences of instructions (or an idiv).
 */

#if VW == 16
#define floatv float16
#define uintv uint16
#define intv int16
#define VLOAD vload16
#define VSTORE vstore16
#define VLOAD_HALF vload_half16
#define CONVERT_FLOATV convert_float16
#define CONVERT_INTV convert_int16
#define AS_INTV as_int16
#define LANE_IDS ((intv)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))
#elif VW == 8
#define floatv float8
#define uintv uint8
#define intv int8
#define VLOAD vload8
#define VSTORE vstore8
#define VLOAD_HALF vload_half8
#define CONVERT_FLOATV convert_float8
#define CONVERT_INTV convert_int8
#define AS_INTV as_int8
#define LANE_IDS ((intv)(0, 1, 2, 3, 4, 5, 6, 7))
#elif VW == 4
#define floatv float4
#define uintv uint4
#define intv int4
#define VLOAD vload4
#define VSTORE vstore4
#define VLOAD_HALF vload_half4
#define CONVERT_FLOATV convert_float4
#define CONVERT_INTV convert_int4
#define AS_INTV as_int4
#define LANE_IDS ((intv)(0, 1, 2, 3))
#else
#error "VW must be 4, 8 or 16"
#endif

/* helpers whose loops unroll only once their constant arguments are in */
#define ALWAYS_INLINE inline __attribute__((always_inline))

#pragma OPENCL FP_CONTRACT ON
/* a * b + c: one FMA under FP_CONTRACT ON */
#define MAD(a, b, c) ((a) * (b) + (c))

/* floor of x >= 0: llvm.floor where the compiler has it (one instruction on
 * x86), else truncation (one conversion each way; also under Oclgrind,
 * which does not implement llvm.floor on vectors) */
#if defined(__has_builtin) && !KVQ_INTERPRETER
#if __has_builtin(__builtin_elementwise_floor)
#define FLOOR_NONNEG(x) __builtin_elementwise_floor(x)
#endif
#endif
#ifndef FLOOR_NONNEG
#define FLOOR_NONNEG(x) CONVERT_FLOATV(CONVERT_INTV(x))
#endif

/* Software prefetch of the token vectors PF_AHEAD ahead, for chunks that
 * cross pages: each group-planar word row the kernel streams jumps to
 * another page at every page boundary, where the hardware prefetchers
 * (which follow one stream per load) start over; inside one page (the
 * contiguous cache) they need no help, and the kernel does not issue it. */
#if defined(__has_builtin) && !KVQ_INTERPRETER
#if __has_builtin(__builtin_prefetch)
#define PREFETCH(p) __builtin_prefetch(p)
#endif
#endif
#ifndef PREFETCH
#define PREFETCH(p) ((void)(p))
#endif
#define PF_AHEAD 8  /* token vectors ahead, packed kernels */
#define PF_TOKENS 16 /* tokens ahead, fp16 rows */

/* Per-channel keys (K_CHANNEL): a channel's codes of VW consecutive tokens
 * are VW * K_BITS consecutive bits. For widths that divide 32 (8, 4, 2)
 * they lie in one word or in K_VEC_WORDS whole words (vectors start at
 * multiples of VW), so every lane takes its word and shift as vectors:
 * a load, a shuffle, a shift and a mask instead of VW scalar extractions
 * with run-time shifts. 3-bit codes (which straddle words) and ternary
 * digits keep the scalar path. */
#define K_LANES_VEC (K_CHANNEL && K_BITS && 32 % K_BITS == 0)
#if K_LANES_VEC
#define K_VEC_WORDS ((VW * K_BITS + 31) / 32)
#define K_LANE_BITS (as_uintv(LANE_IDS) * (uintv)K_BITS)
#if VW == 16
#define as_uintv as_uint16
#elif VW == 8
#define as_uintv as_uint8
#else
#define as_uintv as_uint4
#endif
/* The word of each lane from w (K_VEC_WORDS words, or the one word). */
ALWAYS_INLINE uintv k_lane_words(__global const uint *w)
{
#if K_VEC_WORDS == 1
    return (uintv)(w[0]);
#elif K_VEC_WORDS == 2
    return shuffle(vload2(0, w), K_LANE_BITS >> (uintv)5);
#elif K_VEC_WORDS == 4
    return shuffle(vload4(0, w), K_LANE_BITS >> (uintv)5);
#else
#error "K_VEC_WORDS must be 1, 2 or 4"
#endif
}
#endif

/* 2^-e for 0 <= e < 127, exact */
#define EXP2_NEG(e) as_float((uint)(127 - (e)) << 23)

/* Rows per block: RB_QK in q.k (two accumulators per row up to 4 rows),
 * RB_PV x JB codes in P.V and RB_PV x DVB vector slots in the fp16 P.V:
 * about 8 accumulator vectors. Each block size divides ROWS. */
#define ROWS_DIV(n) (ROWS % (n) == 0)
#define RB_QK                                                                           \
    (ROWS <= 8      ? ROWS                                                              \
     : ROWS_DIV(8) ? 8                                                                  \
     : ROWS_DIV(6) ? 6                                                                  \
     : ROWS_DIV(4) ? 4                                                                  \
     : ROWS_DIV(3) ? 3                                                                  \
     : ROWS_DIV(2) ? 2                                                                  \
                   : 1)
#define QK_PAIR (RB_QK <= 4)
#define RB_PV RB_QK
#define JB (RB_PV == 1 ? 8 : RB_PV == 2 ? 4 : RB_PV <= 4 ? 2 : 1)
#define NV (HEAD_DIM / VW) /* vectors per fp16 row: even (HEAD_DIM % 32 == 0) */
#define DVB (NV % JB == 0 ? JB : 2)
/* q.k of packed tokens takes each query value from a vector holding it in
 * every lane (an FMA with a memory operand, no broadcast per code) when
 * a row block's copies fit 16 KiB, a half of a typical L1 */
#ifndef QB
#define QB (RB_QK * HEAD_DIM * VW <= 4096)
#endif

inline float hsum(floatv v)
{
#if VW == 16
    float8 a = v.lo + v.hi;
    float4 b = a.lo + a.hi;
#elif VW == 8
    float4 b = v.lo + v.hi;
#else
    float4 b = v;
#endif
    float2 c = b.lo + b.hi;
    return c.x + c.y;
}

inline float hmax(floatv v)
{
#if VW == 16
    float8 a = fmax(v.lo, v.hi);
    float4 b = fmax(a.lo, a.hi);
#elif VW == 8
    float4 b = fmax(v.lo, v.hi);
#else
    float4 b = v;
#endif
    float2 c = fmax(b.lo, b.hi);
    return fmax(c.x, c.y);
}

/* Softmax over a chunk's scores, VW at a time, in place (masked lanes hold
 * -inf: exp gives 0; a row with no token keeps m = -inf and zero weights). */
inline void serial_softmax(float *sc, int n_blocks, float *m, float *l)
{
    for (int r = 0; r < ROWS; r++) {
        floatv mv = (floatv)(-INFINITY);
        for (int b = 0; b < n_blocks; b++)
            mv = fmax(mv, VLOAD(0, sc + r * CHUNK + b * VW));
        m[r] = hmax(mv);
        floatv lv = (floatv)0.0f;
        for (int b = 0; b < n_blocks; b++) {
            floatv p = m[r] == -INFINITY ? (floatv)0.0f
                                         : exp(VLOAD(0, sc + r * CHUNK + b * VW) - m[r]);
            VSTORE(p, 0, sc + r * CHUNK + b * VW);
            lv += p;
        }
        l[r] = hsum(lv);
    }
}

/* (scale, zero) of VW consecutive parameter entries (entry e = 2 values). */
ALWAYS_INLINE void params_lanes(__global const uchar *params, size_t entry0, floatv *scale,
                         floatv *zero)
{
#if PARAM_FP8
#pragma unroll
    for (int l = 0; l < VW; l++) {
        float2 sz = load_params(params, entry0 + l);
        ((float *)scale)[l] = sz.x;
        ((float *)zero)[l] = sz.y;
    }
#else
    __global const half *h = (__global const half *)params + 2 * entry0;
    floatv a = VLOAD_HALF(0, h), b = VLOAD_HALF(0, h + VW);
    *scale = (floatv)(a.even, b.even);
    *zero = (floatv)(a.odd, b.odd);
#endif
}

#if SCHEME != KVQ_SCHEME_FP16
/* The serial variant reads packed tokens as vectors of VW consecutive
 * tokens: group-planar placement (clkvq_packing.h). */
#define PLANAR KVQ_LAYOUT_GROUP_PLANAR
#define NB (CHUNK / VW) /* vectors of tokens per chunk */

/* Code j of a per-token group as floats, for VW tokens whose group words
 * start at gw (step words apart), read "in place": a bit-stream code at bit
 * pos of its word is masked but not shifted, and converted exactly (code x
 * 2^pos < 2^31), so the caller scales the other factor by 2^-code_shift
 * instead; the top code of a word is one shift, a straddling code reads
 * two words. Base-3 digits (bits 0) are taken in float. j and bits are
 * constants once the caller's loops are unrolled. */
ALWAYS_INLINE int code_shift(int j, int bits)
{
    return bits && ((j * bits) & 31) + bits < 32 ? (j * bits) & 31 : 0;
}

ALWAYS_INLINE floatv code_float(__global const uint *gw, size_t step, int j, int bits)
{
    if (!bits) {
        uintv w = VLOAD(0, gw + (size_t)(j / 20) * step);
        int byte = (j / 5) % 4;
        floatv x = CONVERT_FLOATV(AS_INTV(byte == 3 ? w >> 24u : (w >> (uint)(8 * byte)) & 0xffu));
        return KVQ_TRIT_FLOAT(x, j % 5, FLOOR_NONNEG);
    }
    int wi = (j * bits) >> 5, pos = (j * bits) & 31;
    uintv lo = VLOAD(0, gw + (size_t)wi * step);
    if (pos + bits < 32)
        return CONVERT_FLOATV(AS_INTV(lo & (uintv)(((1u << bits) - 1u) << pos)));
    if (pos + bits == 32)
        return CONVERT_FLOATV(AS_INTV(lo >> (uint)pos));
    uintv hi = VLOAD(0, gw + (size_t)(wi + 1) * step);
    return CONVERT_FLOATV(AS_INTV(KVQ_BITS_AT(lo, hi, pos, bits)));
}

/* The shifts of a bit-stream group repeat every PERIOD codes, which fill
 * WPP whole words; base-3 groups hold 20 codes per word. Unrolling one
 * period (not the whole group) keeps every shift a constant at a fraction
 * of the code size and build time. Groups are multiples of 32 codes, so
 * only base-3 groups end in a partial period (TAIL codes, a multiple of 4). */
#define PERIOD_OF(b) ((b) == 0 ? 20 : (b) % 8 == 0 ? 4 : (b) % 4 == 0 ? 8 : (b) % 2 == 0 ? 16 : 32)
#define WPP_OF(b) ((b) ? PERIOD_OF(b) * (b) / 32 : 1)
#define K_PERIOD PERIOD_OF(K_BITS)
#define K_TAIL (GROUP_SIZE % K_PERIOD)
#define V_PERIOD PERIOD_OF(V_BITS)
#define V_WPP WPP_OF(V_BITS)
#define V_TAIL (GROUP_SIZE % V_PERIOD)
/* codes per P.V block: divides the period and the tail */
#define JBV (JB > 4 && V_PERIOD % JB ? 4 : JB)

/* q.k of n_codes codes (a period, or the tail) for RB_QK rows: the codes'
 * words at pw (step words apart), the rows' queries at qp (HEAD_DIM
 * apart), two accumulators per row when QK_PAIR. */
#if QB
#define QK_Q_VAR floatv
#else
#define QK_Q_VAR float
#endif
#define QK_Q const QK_Q_VAR
ALWAYS_INLINE void qk_codes(__global const uint *pw, size_t step, QK_Q *qp, int n_codes,
                            floatv *d0, floatv *d1)
{
#pragma unroll
    for (int j = 0; j < n_codes; j++) {
        floatv code = code_float(pw, step, j, K_BITS);
#pragma unroll
        for (int r = 0; r < RB_QK; r++) {
            if (QK_PAIR && (j & 1))
                d1[r] = MAD(qp[r * HEAD_DIM + j], code, d1[r]);
            else
                d0[r] = MAD(qp[r * HEAD_DIM + j], code, d0[r]);
        }
    }
}

/* P.V of codes c0 .. c0 + n_codes - 1 (a period, or the tail) of group g
 * for RB_PV rows, JBV codes x RB_PV rows of accumulators over the chunk:
 * out[r * HEAD_DIM + g * GROUP_SIZE + c] = sum_t ps * code + zsum[r].
 * vb[b]: word 0 of token vector b's group 0 in vc (any page row when
 * masked: its ps are 0). */
ALWAYS_INLINE void pv_codes(__global const uint *vc, const long *vb, int g, int c0, int n_codes,
                     const floatv *ps, int n_vblocks, const float *zsum, float *out,
                     int block_size, int page_pf)
{
    size_t w0 = ((size_t)g * V_GW + (size_t)(c0 / V_PERIOD * V_WPP)) * block_size;
#pragma unroll
    for (int jb = 0; jb < n_codes; jb += JBV) {
        floatv acc[RB_PV * JBV];
#pragma unroll
        for (int i = 0; i < RB_PV * JBV; i++)
            acc[i] = (floatv)0.0f;
        for (int b = 0; b < n_vblocks; b++) {
            __global const uint *pw = vc + vb[b] + w0;
            if (page_pf) {
                __global const uint *pf = vc + vb[min(b + PF_AHEAD, n_vblocks - 1)] + w0;
                PREFETCH(pf + (size_t)KVQ_WORD_OF(jb, V_BITS) * block_size);
                PREFETCH(pf + (size_t)KVQ_WORD_OF(jb + JBV - 1, V_BITS) * block_size);
            }
#pragma unroll
            for (int jj = 0; jj < JBV; jj++) {
                floatv code = code_float(pw, block_size, jb + jj, V_BITS);
#pragma unroll
                for (int r = 0; r < RB_PV; r++)
                    acc[r * JBV + jj] = MAD(ps[r * NB + b], code, acc[r * JBV + jj]);
            }
        }
#pragma unroll
        for (int r = 0; r < RB_PV; r++)
#pragma unroll
            for (int jj = 0; jj < JBV; jj++)
                out[r * HEAD_DIM + g * GROUP_SIZE + c0 + jb + jj] =
                    MAD(hsum(acc[r * JBV + jj]), EXP2_NEG(code_shift(jb + jj, V_BITS)), zsum[r]);
    }
}

__kernel __attribute__((reqd_work_group_size(1, 1, 1))) void
clkvq_attn_packed_serial(__global const float *qs, __global const float *qsum,
                         __global const uint *kc, __global const uchar *kp,
                         __global const uint *vc, __global const uchar *vp,
                         __global const half *vfp, __global const int *seq_len,
                         __global const int *table, __global float *partials, int n_q_heads,
                         int n_kv_heads, int block_size, int max_blocks, int n_pages,
                         int fp_slots, int ring, int n_sink, int window, int residual,
                         int n_slots)
{
    int chunk = (int)get_global_id(0), kh = (int)get_global_id(1), s = (int)get_global_id(2);
    int n = seq_len[s];
    int sink_end = kvq_sink_end(n, n_sink);
    int qk = q_end_k(n, n_sink, window, residual);
    int base = (chunk + sink_end / CHUNK) * CHUNK;
    int t_lo = max(base, sink_end), t_hi = min(base + CHUNK, qk);
    if (t_lo >= t_hi) { /* a work-group of one: its only work-item writes */
        write_empty(partials, s, kh, chunk, n_q_heads, n_slots, 0);
        return;
    }
    int n_blocks = (t_hi - base + VW - 1) / VW;
    int page_pf = block_size < CHUNK; /* a chunk crosses pages */

    float qg[ROWS * NG];
    int lim[ROWS];
    for (int r = 0; r < ROWS; r++) {
        size_t row = row_index(s, kh, r, n_q_heads);
        for (int g = 0; g < NG; g++)
            qg[r * NG + g] = qsum[row * NG + g];
        lim[r] = min(t_hi, row_limit(n, r));
    }

    /* Token vector b's page row (-1: masked) and offset, as kb[b] (word 0
     * of its K group 0), vb[b] (V) and pb[b] (parameter entry of group 0,
     * K and V alike; -1: masked); later groups are g * block_size words or
     * entries on. A masked vector's vb is page row 0 (its weights are 0, its
     * codes finite): no branch in the P.V loop. */
    long kb[NB], vb[NB], pb[NB];
    for (int b = 0; b < n_blocks; b++) {
        int t0 = base + b * VW;
        long hb = t0 + VW > t_lo ? page_row(PAGES, kh, t0) : -1;
        int o0 = t0 % block_size;
        kb[b] = hb < 0 ? -1 : (long)kvq_token_group_word(PLANAR, hb, o0, 0, block_size, NG, K_GW);
        vb[b] = hb < 0 ? 0 : (long)kvq_token_group_word(PLANAR, hb, o0, 0, block_size, NG, V_GW);
        pb[b] = hb < 0 ? -1 : (long)kvq_token_param(PLANAR, hb, o0, 0, block_size, NG);
    }

    /* scores, VW tokens at a time, RB_QK rows at a time */
    float sc[ROWS * CHUNK];
    for (int rb = 0; rb < ROWS; rb += RB_QK) {
#if QB
        /* the block's queries in every lane (FMAs take them from memory:
         * no broadcast per code), each channel times 2^-code_shift of its
         * code (exact) */
        floatv q[RB_QK * HEAD_DIM];
#else
        float q[RB_QK * HEAD_DIM];
#endif
#if K_CHANNEL
        /* per-channel keys: a token group's scale and zero hold for every
         * vector of the group, so the scales are folded into the query
         * (qsc) and the zeros' dot (zq) taken once per group: a code then
         * costs one multiply-add per row, as the per-token path's do */
        QK_Q_VAR qsc[RB_QK * HEAD_DIM];
        QK_Q_VAR zq[RB_QK];
        long grp_row = -1;
        int grp_o = -1;
#endif
        for (int r = 0; r < RB_QK; r++) {
            __global const float *qr = qs + row_index(s, kh, rb + r, n_q_heads) * HEAD_DIM;
            for (int g = 0; g < NG; g++)
#pragma unroll
                for (int j = 0; j < GROUP_SIZE; j++)
#if K_CHANNEL
                    q[r * HEAD_DIM + g * GROUP_SIZE + j] = qr[g * GROUP_SIZE + j];
#else
                    q[r * HEAD_DIM + g * GROUP_SIZE + j] =
                        qr[g * GROUP_SIZE + j] * EXP2_NEG(code_shift(j, K_BITS));
#endif
        }
        for (int b = 0; b < n_blocks; b++) {
            int t0 = base + b * VW;
            if (pb[b] < 0) {
#pragma unroll
                for (int r = 0; r < RB_QK; r++)
                    VSTORE((floatv)(-INFINITY), 0, sc + (rb + r) * CHUNK + b * VW);
                continue;
            }
            floatv acc[RB_QK];
#pragma unroll
            for (int r = 0; r < RB_QK; r++)
                acc[r] = (floatv)0.0f;
#if K_CHANNEL /* keys: per-channel groups along tokens; t0 % VW == 0 */
            long hb = page_row(PAGES, kh, t0);
            int o0 = t0 % block_size, j0 = o0 % GROUP_SIZE;
            /* a token group of every channel is one stretch of words (and of
             * parameters): the next one, maybe on another page, ahead */
            if (page_pf && j0 == 0 && t0 + GROUP_SIZE < t_hi) {
                int tn = t0 + GROUP_SIZE, on = tn % block_size;
                long hn = page_row(PAGES, kh, tn);
                if (hn >= 0) {
                    __global const uint *wn = kc + kvq_channel_group_word(
                                                       hn, on, 0, block_size, GROUP_SIZE,
                                                       HEAD_DIM, K_GW);
                    for (int i = 0; i < HEAD_DIM * K_GW; i += 16)
                        PREFETCH(wn + i);
                    __global const uchar *pn =
                        kp + kvq_channel_param(hn, on, 0, block_size, GROUP_SIZE, HEAD_DIM) *
                                 (PARAM_FP8 ? 2 : 4);
                    for (int i = 0; i < HEAD_DIM * (PARAM_FP8 ? 2 : 4); i += 64)
                        PREFETCH(pn + i);
                }
            }
            if (hb != grp_row || o0 - j0 != grp_o) { /* a new token group */
                grp_row = hb;
                grp_o = o0 - j0;
#pragma unroll
                for (int r = 0; r < RB_QK; r++)
                    zq[r] = 0.0f;
                for (int c = 0; c < HEAD_DIM; c++) {
                    float2 sz = load_params(
                        kp, kvq_channel_param(hb, o0, c, block_size, GROUP_SIZE, HEAD_DIM));
#pragma unroll
                    for (int r = 0; r < RB_QK; r++) {
                        QK_Q_VAR qs = q[r * HEAD_DIM + c] * sz.x;
                        qsc[r * HEAD_DIM + c] = qs;
#if ZERO_INT /* (code - z) s q = code (s q) - z (s q) */
                        zq[r] = MAD(-qs, sz.y, zq[r]);
#else /* (code s + z) q = code (s q) + z q */
                        zq[r] = MAD(q[r * HEAD_DIM + c], sz.y, zq[r]);
#endif
                    }
                }
            }
#if K_LANES_VEC
            /* the vector's codes of a channel: one word (or K_VEC_WORDS
             * words spread over the lanes), shifted and masked per lane */
            const int w_at = (j0 * K_BITS) >> 5;
            const uintv shifts = K_VEC_WORDS == 1
                                     ? (uintv)((j0 * K_BITS) & 31) + K_LANE_BITS
                                     : K_LANE_BITS & (uintv)31;
#endif
            for (int c = 0; c < HEAD_DIM; c++) {
                __global const uint *w = kc + kvq_channel_group_word(hb, o0, c, block_size,
                                                                     GROUP_SIZE, HEAD_DIM, K_GW);
#if K_LANES_VEC
                floatv code = CONVERT_FLOATV((k_lane_words(w + w_at) >> shifts) &
                                             (uintv)((1u << K_BITS) - 1u));
#else
                uint lanes[VW];
#pragma unroll
                for (int l = 0; l < VW; l++) {
                    int j = j0 + l, wi = KVQ_WORD_OF(j, K_BITS);
                    lanes[l] =
                        KVQ_CODE(w[wi], KVQ_STRADDLES(j, K_BITS) ? w[wi + 1] : 0u, j, K_BITS);
                }
                floatv code = CONVERT_FLOATV(VLOAD(0, lanes));
#endif
#pragma unroll
                for (int r = 0; r < RB_QK; r++)
                    acc[r] = MAD(qsc[r * HEAD_DIM + c], code, acc[r]);
            }
#pragma unroll
            for (int r = 0; r < RB_QK; r++)
                acc[r] += zq[r];
#else
            if (page_pf) {
                int bp = min(b + PF_AHEAD, n_blocks - 1);
                if (pb[bp] >= 0) {
#pragma unroll
                    for (int i = 0; i < NG * K_GW; i++)
                        PREFETCH(kc + kb[bp] + (size_t)i * block_size);
#pragma unroll
                    for (int g = 0; g < NG; g++)
                        PREFETCH(kp + ((size_t)pb[bp] + (size_t)g * block_size) *
                                          (PARAM_FP8 ? 2 : 4));
                }
            }
            for (int g = 0; g < NG; g++) {
                __global const uint *gw = kc + kb[b] + (size_t)g * K_GW * block_size;
                floatv d0[RB_QK], d1[RB_QK];
#pragma unroll
                for (int r = 0; r < RB_QK; r++)
                    d0[r] = d1[r] = (floatv)0.0f;
                for (int c0 = 0; c0 < GROUP_SIZE - K_TAIL; c0 += K_PERIOD)
                    qk_codes(gw + (size_t)(c0 / K_PERIOD * WPP_OF(K_BITS)) * block_size,
                             block_size, q + g * GROUP_SIZE + c0, K_PERIOD, d0, d1);
#if K_TAIL
                qk_codes(gw + (size_t)((GROUP_SIZE - K_TAIL) / K_PERIOD) * block_size, block_size,
                         q + g * GROUP_SIZE + GROUP_SIZE - K_TAIL, K_TAIL, d0, d1);
#endif
                floatv scale, zero;
                params_lanes(kp, (size_t)pb[b] + (size_t)g * block_size, &scale, &zero);
#pragma unroll
                for (int r = 0; r < RB_QK; r++) {
                    floatv dot = QK_PAIR ? d0[r] + d1[r] : d0[r];
                    float qsum_g = qg[(rb + r) * NG + g];
#if ZERO_INT
                    acc[r] = MAD(scale, dot - zero * qsum_g, acc[r]);
#else
                    acc[r] = MAD(scale, dot, MAD(zero, qsum_g, acc[r]));
#endif
                }
            }
#endif
            intv t = t0 + LANE_IDS;
#pragma unroll
            for (int r = 0; r < RB_QK; r++) {
                intv valid = t >= (intv)t_lo && t < (intv)lim[rb + r];
                VSTORE(select((floatv)(-INFINITY), acc[r], valid), 0,
                       sc + (rb + r) * CHUNK + b * VW);
            }
        }
    }

    float m[ROWS], l[ROWS];
    serial_softmax(sc, n_blocks, m, l);

    /* P.V: tokens before q_end(V) are packed; KIVI keeps later ones fp16.
     * Per group and block of rows: p * scale for every token vector once,
     * then the codes a period at a time (pv_codes). */
    float out[ROWS * HEAD_DIM];
    int qv = q_end_v(n, n_sink, window, residual);
    int v_hi = min(qv, t_hi);
    int n_vblocks = v_hi > base ? (v_hi - base + VW - 1) / VW : 0;
    floatv ps[RB_PV * NB];
    for (int g = 0; g < NG; g++)
        for (int rb = 0; rb < ROWS; rb += RB_PV) {
            floatv zacc[RB_PV];
#pragma unroll
            for (int r = 0; r < RB_PV; r++)
                zacc[r] = (floatv)0.0f;
            for (int b = 0; b < n_vblocks; b++) {
                int t0 = base + b * VW;
                intv t = t0 + LANE_IDS;
                intv valid = t >= (intv)t_lo && t < (intv)v_hi;
                floatv scale = (floatv)0.0f, zero = (floatv)0.0f;
                int live = pb[b] >= 0;
                if (live)
                    params_lanes(vp, (size_t)pb[b] + (size_t)g * block_size, &scale, &zero);
                long pbp = pb[min(b + PF_AHEAD, n_vblocks - 1)];
                if (page_pf && pbp >= 0)
                    PREFETCH(vp + ((size_t)pbp + (size_t)g * block_size) * (PARAM_FP8 ? 2 : 4));
#pragma unroll
                for (int r = 0; r < RB_PV; r++) {
                    floatv p = live ? VLOAD(0, sc + (rb + r) * CHUNK + b * VW) : (floatv)0.0f;
                    /* lanes past the last token hold unwritten memory: mask
                     * after multiplying (0 * NaN would be NaN) */
                    floatv pscale = p * scale;
                    ps[r * NB + b] = select((floatv)0.0f, pscale, valid);
#if ZERO_INT
                    zacc[r] -= select((floatv)0.0f, pscale * zero, valid);
#else
                    zacc[r] += select((floatv)0.0f, p * zero, valid);
#endif
                }
            }
            float zsum[RB_PV];
#pragma unroll
            for (int r = 0; r < RB_PV; r++)
                zsum[r] = hsum(zacc[r]);
            for (int c0 = 0; c0 < GROUP_SIZE - V_TAIL; c0 += V_PERIOD)
                pv_codes(vc, vb, g, c0, V_PERIOD, ps, n_vblocks, zsum, out + rb * HEAD_DIM,
                         block_size, page_pf);
#if V_TAIL
            pv_codes(vc, vb, g, GROUP_SIZE - V_TAIL, V_TAIL, ps, n_vblocks, zsum,
                     out + rb * HEAD_DIM, block_size, page_pf);
#endif
        }
#if SCHEME == KVQ_SCHEME_KIVI
    for (int t = max(qv, t_lo); t < t_hi; t++) {
        size_t row = (size_t)fp_row(PAGES, kh, t, fp_slots, ring, n_sink);
        int i = t - base;
        for (int d = 0; d < HEAD_DIM; d++) {
            float v = vload_half(row + d, vfp);
            for (int r = 0; r < ROWS; r++)
                out[r * HEAD_DIM + d] = MAD(sc[r * CHUNK + i], v, out[r * HEAD_DIM + d]);
        }
    }
#endif
    for (int r = 0; r < ROWS; r++) {
        __global float *p = partial_of(partials, s, kh, r, chunk, n_q_heads, n_slots);
        p[0] = m[r];
        p[1] = l[r];
        for (int d = 0; d < HEAD_DIM; d++)
            p[2 + d] = out[r * HEAD_DIM + d];
    }
}
#endif

/* Offsets (halves) of the fp16 rows of virtual tokens u_begin ..
 * u_begin + n_valid - 1 (sinks first, then [qk, n)), -1 for a bad page:
 * fp_row's rows, with the page, page offset or ring slot carried from token
 * to token instead of a division per token. */
ALWAYS_INLINE void chunk_fp_rows(PAGE_ARGS, int kh, int u_begin, int n_valid, int sink_end, int qk,
                          int fp_slots, int ring, int n_sink, long *rows)
{
#if SCHEME == KVQ_SCHEME_FP16 /* every token in pages; token t = u */
    int t = u_begin, off = t % block_size;
    long hb = page_row(PAGES, kh, t);
    for (int i = 0; i < n_valid; i++, t++, off++) {
        if (off == block_size) {
            off = 0;
            hb = page_row(PAGES, kh, t);
        }
        rows[i] = hb < 0 ? -1 : (hb * block_size + off) * HEAD_DIM;
    }
#else
    long row0 = ((long)s * n_kv_heads + kh) * fp_slots;
    int slot = 0, t_prev = -2;
    for (int i = 0; i < n_valid; i++) {
        int u = u_begin + i;
        int t = u < sink_end ? u : qk + (u - sink_end);
        if (t < n_sink)
            slot = ring + t;
        else if (t == t_prev + 1 && t_prev >= n_sink)
            slot = slot + 1 == ring ? 0 : slot + 1;
        else
            slot = t % ring;
        t_prev = t;
        rows[i] = (row0 + slot) * HEAD_DIM;
    }
#endif
}

/* fp16 tokens (sinks + recent window; all tokens for the fp16 scheme), one
 * work-item per chunk, lanes over channels. */
__kernel __attribute__((reqd_work_group_size(1, 1, 1))) void
clkvq_attn_fp16_serial(__global const float *qs, __global const half *kfp,
                       __global const half *vfp, __global const int *seq_len,
                       __global const int *table, __global float *partials, int n_q_heads,
                       int n_kv_heads, int block_size, int max_blocks, int n_pages,
                       int fp_slots, int ring, int n_sink, int window, int residual, int slot0,
                       int n_slots)
{
    int chunk = (int)get_global_id(0), kh = (int)get_global_id(1), s = (int)get_global_id(2);
    int n = seq_len[s];
    int sink_end = kvq_sink_end(n, n_sink), qk = q_end_k(n, n_sink, window, residual);
    int n_fp = sink_end + (n - qk);
    int u_begin = chunk * CHUNK;
    if (u_begin >= n_fp) {
        write_empty(partials, s, kh, slot0 + chunk, n_q_heads, n_slots, 0);
        return;
    }
    int n_valid = min(CHUNK, n_fp - u_begin);
    floatv q[ROWS * NV];
    int lim[ROWS];
    for (int r = 0; r < ROWS; r++) {
        size_t row = row_index(s, kh, r, n_q_heads) * HEAD_DIM;
        for (int dv = 0; dv < NV; dv++)
            q[r * NV + dv] = VLOAD(dv, qs + row);
        lim[r] = row_limit(n, r);
    }
    long rows[CHUNK];
    chunk_fp_rows(PAGES, kh, u_begin, n_valid, sink_end, qk, fp_slots, ring, n_sink, rows);
    int page_pf = block_size < CHUNK; /* a chunk crosses pages */

    float sc[ROWS * CHUNK];
    for (int i = 0; i < n_valid; i++) {
        long row = rows[i];
        long ahead = rows[min(i + PF_TOKENS, n_valid - 1)];
        if (page_pf && ahead >= 0)
#pragma unroll
            for (int c = 0; c < HEAD_DIM; c += 32) /* one 64-byte line per 32 halves */
                PREFETCH(kfp + ahead + c);
        if (row < 0) {
            for (int r = 0; r < ROWS; r++)
                sc[r * CHUNK + i] = -INFINITY;
            continue;
        }
        __global const half *krow = kfp + row;
        for (int rb = 0; rb < ROWS; rb += RB_QK) {
            floatv a0[RB_QK], a1[RB_QK];
#pragma unroll
            for (int r = 0; r < RB_QK; r++)
                a0[r] = a1[r] = (floatv)0.0f;
#pragma unroll
            for (int dv = 0; dv < NV; dv++) {
                floatv k = VLOAD_HALF(dv, krow);
#pragma unroll
                for (int r = 0; r < RB_QK; r++) {
                    if (QK_PAIR && (dv & 1))
                        a1[r] = MAD(q[(rb + r) * NV + dv], k, a1[r]);
                    else
                        a0[r] = MAD(q[(rb + r) * NV + dv], k, a0[r]);
                }
            }
#pragma unroll
            for (int r = 0; r < RB_QK; r++)
                sc[(rb + r) * CHUNK + i] = hsum(QK_PAIR ? a0[r] + a1[r] : a0[r]);
        }
    }
#if NQ > 1
    /* the causal limits, apart: a select per score in the loop above
     * becomes a branch around each row's dot product */
    for (int r = 0; r < ROWS; r++)
        for (int i = 0; i < n_valid; i++) {
            int u = u_begin + i;
            if ((u < sink_end ? u : qk + (u - sink_end)) >= lim[r])
                sc[r * CHUNK + i] = -INFINITY;
        }
#endif
    int n_blocks = (n_valid + VW - 1) / VW;
    for (int r = 0; r < ROWS; r++)
        for (int i = n_valid; i < n_blocks * VW; i++)
            sc[r * CHUNK + i] = -INFINITY;
    float m[ROWS], l[ROWS];
    serial_softmax(sc, n_blocks, m, l);

    /* P.V: DVB vector slots x RB_PV rows of accumulators over the chunk */
    for (int rb = 0; rb < ROWS; rb += RB_PV)
#pragma unroll
        for (int dvb = 0; dvb < NV; dvb += DVB) {
            floatv o[RB_PV * DVB];
#pragma unroll
            for (int i = 0; i < RB_PV * DVB; i++)
                o[i] = (floatv)0.0f;
            for (int i = 0; i < n_valid; i++) {
                long row = rows[i];
                long ahead = rows[min(i + PF_TOKENS, n_valid - 1)];
                if (page_pf && ahead >= 0)
                    PREFETCH(vfp + ahead + dvb * VW);
                if (row < 0)
                    continue;
                __global const half *vrow = vfp + row;
                floatv v[DVB];
#pragma unroll
                for (int d = 0; d < DVB; d++)
                    v[d] = VLOAD_HALF(dvb + d, vrow);
#pragma unroll
                for (int r = 0; r < RB_PV; r++) {
                    float p = sc[(rb + r) * CHUNK + i];
#pragma unroll
                    for (int d = 0; d < DVB; d++)
                        o[r * DVB + d] = MAD(p, v[d], o[r * DVB + d]);
                }
            }
#pragma unroll
            for (int r = 0; r < RB_PV; r++) {
                __global float *p =
                    partial_of(partials, s, kh, rb + r, slot0 + chunk, n_q_heads, n_slots);
#pragma unroll
                for (int d = 0; d < DVB; d++)
                    VSTORE(o[r * DVB + d], dvb + d, p + 2);
            }
        }
    for (int r = 0; r < ROWS; r++) {
        __global float *p = partial_of(partials, s, kh, r, slot0 + chunk, n_q_heads, n_slots);
        p[0] = m[r];
        p[1] = l[r];
    }
}

/* The merge below is not a decode chunk kernel: no contraction there. */
#pragma OPENCL FP_CONTRACT OFF

/* One work-item per (sequence, query, q head), channels in vector lanes:
 * the log-sum-exp merge of the serial chunks, reading each partial once.
 * It also maps the output back: unpermute, unrotate (ROT), add the mean of
 * V. n_rows = n_seqs * NQ. */
__kernel __attribute__((reqd_work_group_size(1, 1, 1))) void
clkvq_attn_merge_serial(__global const float *partials, __global const int *perm_v,
                        __global const int *seq_len, __global float *out, int n_rows,
                        int n_q_heads, int n_slots, __global const float *mean_v, uint rot_seed)
{
    int sq = (int)get_global_id(0);
    if (sq >= n_rows * n_q_heads)
        return;
    int s = sq / n_q_heads / NQ, kh = (sq % n_q_heads) / QPK;
    __global const float *p = partials + (size_t)sq * n_slots * PARTIAL_STRIDE;
    /* empty partials (l = 0, attention.cl's convention) are skipped */
    float m = M_EMPTY, l = 0.0f;
    for (int c = 0; c < n_slots; c++)
        m = p[(size_t)c * PARTIAL_STRIDE + 1] > 0.0f ? fmax(m, p[(size_t)c * PARTIAL_STRIDE]) : m;
    floatv acc[HEAD_DIM / VW];
    for (int dv = 0; dv < HEAD_DIM / VW; dv++)
        acc[dv] = (floatv)0.0f;
    if (seq_len[s] > 0)
        for (int c = 0; c < n_slots; c++) {
            __global const float *pc = p + (size_t)c * PARTIAL_STRIDE;
            if (!(pc[1] > 0.0f))
                continue;
            float w = exp(pc[0] - m);
            l += pc[1] * w;
            for (int dv = 0; dv < HEAD_DIM / VW; dv++)
                acc[dv] += VLOAD(dv, pc + 2) * w;
        }
    float packed[HEAD_DIM], row[HEAD_DIM];
    for (int dv = 0; dv < HEAD_DIM / VW; dv++)
        VSTORE(l > 0.0f ? acc[dv] / l : (floatv)0.0f, dv, packed);
    for (int d = 0; d < HEAD_DIM; d++)
        row[perm_v ? perm_v[kh * HEAD_DIM + d] : d] = packed[d];
#if ROT
    kvq_unrotate(row, HEAD_DIM, rot_seed, kh);
#endif
    /* a query that sees no token gets zeros, not the mean */
    int with_mean = mean_v && l > 0.0f;
    for (int d = 0; d < HEAD_DIM; d++)
        out[(size_t)sq * HEAD_DIM + d] = with_mean ? row[d] + mean_v[kh * HEAD_DIM + d] : row[d];
}
