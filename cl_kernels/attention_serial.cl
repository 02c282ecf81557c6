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
 * fp16 tokens run lanes = channels (vload_half over a row).
 */

#if VW == 16
#define floatv float16
#define uintv uint16
#define intv int16
#define VLOAD vload16
#define VSTORE vstore16
#define VLOAD_HALF vload_half16
#define CONVERT_FLOATV convert_float16
#define LANE_IDS ((intv)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))
#elif VW == 8
#define floatv float8
#define uintv uint8
#define intv int8
#define VLOAD vload8
#define VSTORE vstore8
#define VLOAD_HALF vload_half8
#define CONVERT_FLOATV convert_float8
#define LANE_IDS ((intv)(0, 1, 2, 3, 4, 5, 6, 7))
#elif VW == 4
#define floatv float4
#define uintv uint4
#define intv int4
#define VLOAD vload4
#define VSTORE vstore4
#define VLOAD_HALF vload_half4
#define CONVERT_FLOATV convert_float4
#define LANE_IDS ((intv)(0, 1, 2, 3))
#else
#error "VW must be 4, 8 or 16"
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

/* (scale, zero) of VW consecutive parameter entries (entry e = 2 values). */
inline void params_lanes(__global const uchar *params, size_t entry0, floatv *scale,
                         floatv *zero)
{
#if PARAM_FP8
    for (int l = 0; l < VW; l++) {
        float2 sz = load_params(params, entry0 + l);
        ((float *)scale)[l] = sz.x;
        ((float *)zero)[l] = sz.y;
    }
#else
    __global const half *h = (__global const half *)params + 2 * entry0;
    floatv a = VLOAD_HALF(0, h), b = VLOAD_HALF(0, h + VW);
#if VW == 4
    *scale = (floatv)(a.even, b.even);
    *zero = (floatv)(a.odd, b.odd);
#else
    *scale = (floatv)(a.even, b.even);
    *zero = (floatv)(a.odd, b.odd);
#endif
#endif
}

/* Digit d of base-3 bytes without vector division (slow on CPUs): for
 * b < 256, b / 3^d == (b * ceil(2^16 / 3^d)) >> 16 and x % 3 == x - 3 *
 * ((x * 21846) >> 16), both checked for every byte. */
#define TRIT_MAGIC(d) ((d) == 0 ? 65536u : (d) == 1 ? 21846u : (d) == 2 ? 7282u : (d) == 3 ? 2428u : 810u)
inline uintv trit_lanes(uintv byte, int d)
{
    uintv q = (byte * TRIT_MAGIC(d)) >> 16;
    return q - 3u * ((q * 21846u) >> 16);
}

/* Code j of a packed group for VW tokens (words already loaded). */
#define LANE_CODE(wv, j, BITS_, TERNARY_)                                                   \
    (TERNARY_ ? trit_lanes(((wv)[(j) / 20] >> (uint)(8 * (((j) / 5) % 4))) & 0xffu, (j) % 5) \
              : ((((wv)[((j) * (BITS_)) >> 5] >> (uint)(((j) * (BITS_)) & 31)) |            \
                  ((((j) * (BITS_)) & 31) + (BITS_) > 32                                     \
                       ? (wv)[(((j) * (BITS_)) >> 5) + 1] << (uint)(32 - (((j) * (BITS_)) & 31)) \
                       : (uintv)0)) &                                                        \
                 (uintv)((1u << (BITS_)) - 1u)))

/* codes per register block in P.V: QPK x JB accumulators stay in registers */
#define JB (QPK <= 2 ? 8 : QPK <= 4 ? 4 : 2)

#ifdef K_TERNARY
#define K_IS_T 1
#define K_B 2
#else
#define K_IS_T 0
#define K_B K_BITS
#endif
#ifdef V_TERNARY
#define V_IS_T 1
#define V_B 2
#else
#define V_IS_T 0
#define V_B V_BITS
#endif

#if SCHEME != 0
/* Scalar code j of a group starting at word `base` (contiguous words). */
inline uint k_code_scalar(__global const uint *kc, size_t base, int j)
{
    const uint pow3[5] = {1, 3, 9, 27, 81};
#ifdef K_TERNARY
    uint w = kc[base + j / 20];
    return ((w >> (8 * ((j / 5) % 4))) & 0xffu) / pow3[j % 5] % 3u;
#else
    int bit = j * K_BITS, wi = bit >> 5, sh = bit & 31;
    uint v = kc[base + wi] >> sh;
    if (sh + K_BITS > 32)
        v |= kc[base + wi + 1] << (32 - sh);
    return v & ((1u << K_BITS) - 1u);
#endif
}

__kernel __attribute__((reqd_work_group_size(1, 1, 1))) void
clkvq_attn_packed_serial(__global const float *qs, __global const float *qsum,
                         __global const uint *kc, __global const uchar *kp,
                         __global const uint *vc, __global const uchar *vp,
                         __global const half *vfp, __global const int *seq_len,
                         __global float *partials, int n_q_heads, int n_kv_heads, int capacity,
                         int fp_slots, int ring, int n_sink, int window, int residual,
                         int n_slots)
{
    const uint pow3[5] = {1, 3, 9, 27, 81};
    int chunk = (int)get_global_id(0), kh = (int)get_global_id(1), s = (int)get_global_id(2);
    int n = seq_len[s];
    int t_begin = sink_end_of(n, n_sink) + chunk * CHUNK;
    int qk = q_end_k(n, n_sink, window, residual);
    if (t_begin >= qk) { /* a work-group of one: write_empty's lid == 0 holds */
        write_empty(partials, s, kh, chunk, n_q_heads, n_slots);
        return;
    }
    int n_valid = min(CHUNK, qk - t_begin);
    int n_blocks = (n_valid + VW - 1) / VW;
    size_t sh = (size_t)s * n_kv_heads + kh;

    float q[QPK * HEAD_DIM];
    float qg[QPK * NG];
    size_t qbase = ((size_t)s * n_q_heads + kh * QPK);
    for (int i = 0; i < QPK * HEAD_DIM; i++)
        q[i] = qs[qbase * HEAD_DIM + i];
    for (int i = 0; i < QPK * NG; i++)
        qg[i] = qsum[qbase * NG + i];

    /* scores, VW tokens at a time */
    float sc[QPK * CHUNK];
    for (int b = 0; b < n_blocks; b++) {
        int t0 = t_begin + b * VW;
        floatv acc[QPK];
        for (int h = 0; h < QPK; h++)
            acc[h] = (floatv)0.0f;
#if SCHEME == 2 /* KIVI keys: per-channel groups along tokens; t0 % VW == 0 */
        int n_kblocks = capacity / GROUP_SIZE;
        size_t entry0 = (sh * n_kblocks + t0 / GROUP_SIZE) * HEAD_DIM;
        int j0 = t0 % GROUP_SIZE;
        for (int c = 0; c < HEAD_DIM; c++) {
            uint lanes[VW];
            for (int l = 0; l < VW; l++)
                lanes[l] = k_code_scalar(kc, (entry0 + c) * K_GW, j0 + l);
            floatv code = CONVERT_FLOATV(VLOAD(0, lanes));
            float2 sz = load_params(kp, entry0 + c);
#if ZERO_INT
            floatv kv = (code - sz.y) * sz.x;
#else
            floatv kv = code * sz.x + sz.y;
#endif
            for (int h = 0; h < QPK; h++)
                acc[h] += q[h * HEAD_DIM + c] * kv;
        }
#else
        for (int g = 0; g < NG; g++) {
            uintv wv[K_GW];
            for (int w = 0; w < K_GW; w++)
                wv[w] = VLOAD(0, kc + (sh * K_RW + (size_t)g * K_GW + w) * capacity + t0);
            floatv dot[QPK];
            for (int h = 0; h < QPK; h++)
                dot[h] = (floatv)0.0f;
            for (int j = 0; j < GROUP_SIZE; j++) {
                floatv code = CONVERT_FLOATV(LANE_CODE(wv, j, K_B, K_IS_T));
                for (int h = 0; h < QPK; h++)
                    dot[h] += q[h * HEAD_DIM + g * GROUP_SIZE + j] * code;
            }
            floatv scale, zero;
            params_lanes(kp, (sh * NG + g) * capacity + t0, &scale, &zero);
            for (int h = 0; h < QPK; h++) {
#if ZERO_INT
                acc[h] += scale * (dot[h] - zero * qg[h * NG + g]);
#else
                acc[h] += scale * dot[h] + zero * qg[h * NG + g];
#endif
            }
        }
#endif
        intv valid = (t0 + LANE_IDS) < (intv)(t_begin + n_valid);
        for (int h = 0; h < QPK; h++)
            VSTORE(select((floatv)(-INFINITY), acc[h], valid), 0, sc + h * CHUNK + b * VW);
    }

    /* softmax over the chunk (masked lanes hold -inf: exp gives 0) */
    float m[QPK], l[QPK];
    for (int h = 0; h < QPK; h++) {
        floatv mv = (floatv)(-INFINITY);
        for (int b = 0; b < n_blocks; b++)
            mv = fmax(mv, VLOAD(0, sc + h * CHUNK + b * VW));
        m[h] = hmax(mv);
        floatv lv = (floatv)0.0f;
        for (int b = 0; b < n_blocks; b++) {
            floatv p = exp(VLOAD(0, sc + h * CHUNK + b * VW) - m[h]);
            VSTORE(p, 0, sc + h * CHUNK + b * VW);
            lv += p;
        }
        l[h] = hsum(lv);
    }

    /* P.V: tokens before q_end(V) are packed; KIVI keeps later ones fp16 */
    float out[QPK * HEAD_DIM];
    for (int i = 0; i < QPK * HEAD_DIM; i++)
        out[i] = 0.0f;
    int qv = q_end_v(n, n_sink, window, residual);
    int n_packed_v = clamp(qv - t_begin, 0, n_valid);
    int n_vblocks = (n_packed_v + VW - 1) / VW;
    /* Per group: p * scale for every token block once, then the codes in
     * blocks of JB so that QPK x JB accumulators stay in registers. */
    floatv ps[QPK * (CHUNK / VW)];
    for (int g = 0; g < NG; g++) {
        float zsum[QPK];
        for (int h = 0; h < QPK; h++) {
            floatv zacc = (floatv)0.0f;
            for (int b = 0; b < n_vblocks; b++) {
                int t0 = t_begin + b * VW;
                intv valid = (t0 + LANE_IDS) < (intv)(t_begin + n_packed_v);
                floatv scale, zero;
                params_lanes(vp, (sh * NG + g) * capacity + t0, &scale, &zero);
                /* lanes past the last token hold unwritten memory: mask after
                 * multiplying (0 * NaN would be NaN) */
                floatv p = VLOAD(0, sc + h * CHUNK + b * VW);
                ps[h * (CHUNK / VW) + b] = select((floatv)0.0f, p * scale, valid);
#if ZERO_INT
                zacc -= select((floatv)0.0f, p * scale * zero, valid);
#else
                zacc += select((floatv)0.0f, p * zero, valid);
#endif
            }
            zsum[h] = hsum(zacc);
        }
        __global const uint *gw = vc + (sh * V_RW + (size_t)g * V_GW) * capacity;
        for (int jb = 0; jb < GROUP_SIZE; jb += JB) {
            /* the (at most two) words holding codes jb .. jb + JB - 1 */
#ifdef V_TERNARY
            const int w0 = jb / 20;
#else
            const int w0 = (jb * V_BITS) >> 5;
#endif
            floatv acc[QPK * JB];
            for (int i = 0; i < QPK * JB; i++)
                acc[i] = (floatv)0.0f;
            for (int b = 0; b < n_vblocks; b++) {
                size_t t0 = (size_t)(t_begin + b * VW);
                uintv wv[2];
                wv[0] = VLOAD(0, gw + (size_t)w0 * capacity + t0);
                wv[1] = w0 + 1 < V_GW ? VLOAD(0, gw + (size_t)(w0 + 1) * capacity + t0)
                                      : (uintv)0;
                for (int jj = 0; jj < JB; jj++) {
                    int j = jb + jj;
#ifdef V_TERNARY
                    uintv raw = trit_lanes((wv[j / 20 - w0] >> (uint)(8 * ((j / 5) % 4))) & 0xffu,
                                           j % 5);
#else
                    int bit = j * V_BITS - w0 * 32, wi = bit >> 5, shft = bit & 31;
                    uintv raw = wv[wi] >> (uint)shft;
                    if (shft + V_BITS > 32)
                        raw |= wv[wi + 1] << (uint)(32 - shft);
                    raw &= (uintv)((1u << V_BITS) - 1u);
#endif
                    floatv code = CONVERT_FLOATV(raw);
                    for (int h = 0; h < QPK; h++)
                        acc[h * JB + jj] += ps[h * (CHUNK / VW) + b] * code;
                }
            }
            for (int h = 0; h < QPK; h++)
                for (int jj = 0; jj < JB; jj++)
                    out[h * HEAD_DIM + g * GROUP_SIZE + jb + jj] += hsum(acc[h * JB + jj]) + zsum[h];
        }
    }
#if SCHEME == 2
    for (int i = n_packed_v; i < n_valid; i++) {
        size_t row = fp_row(sh, t_begin + i, fp_slots, ring, n_sink);
        for (int d = 0; d < HEAD_DIM; d++) {
            float v = vload_half(row + d, vfp);
            for (int h = 0; h < QPK; h++)
                out[h * HEAD_DIM + d] += sc[h * CHUNK + i] * v;
        }
    }
#endif
    for (int h = 0; h < QPK; h++) {
        __global float *p = partial_of(partials, s, kh * QPK + h, chunk, n_q_heads, n_slots);
        p[0] = m[h];
        p[1] = l[h];
        for (int d = 0; d < HEAD_DIM; d++)
            p[2 + d] = out[h * HEAD_DIM + d];
    }
}
#endif

/* fp16 tokens (sinks + recent window; all tokens for the fp16 scheme), one
 * work-item per chunk, lanes over channels. */
__kernel __attribute__((reqd_work_group_size(1, 1, 1))) void
clkvq_attn_fp16_serial(__global const float *qs, __global const half *kfp,
                       __global const half *vfp, __global const int *seq_len,
                       __global float *partials, int n_q_heads, int n_kv_heads, int fp_slots,
                       int ring, int n_sink, int window, int residual, int slot0, int n_slots)
{
    int chunk = (int)get_global_id(0), kh = (int)get_global_id(1), s = (int)get_global_id(2);
    int n = seq_len[s];
    int sink_end = sink_end_of(n, n_sink), qk = q_end_k(n, n_sink, window, residual);
    int n_fp = sink_end + (n - qk);
    int u_begin = chunk * CHUNK;
    if (u_begin >= n_fp) {
        write_empty(partials, s, kh, slot0 + chunk, n_q_heads, n_slots);
        return;
    }
    int n_valid = min(CHUNK, n_fp - u_begin);
    size_t sh = (size_t)s * n_kv_heads + kh;
    floatv q[QPK * (HEAD_DIM / VW)];
    size_t qbase = ((size_t)s * n_q_heads + kh * QPK) * HEAD_DIM;
    for (int i = 0; i < QPK * (HEAD_DIM / VW); i++)
        q[i] = VLOAD(i, qs + qbase);

    float sc[QPK * CHUNK];
    float m[QPK], l[QPK];
    for (int h = 0; h < QPK; h++)
        m[h] = -INFINITY;
    for (int i = 0; i < n_valid; i++) {
        int u = u_begin + i;
        int t = u < sink_end ? u : qk + (u - sink_end);
        __global const half *row = kfp + fp_row(sh, t, fp_slots, ring, n_sink);
        floatv acc[QPK];
        for (int h = 0; h < QPK; h++)
            acc[h] = (floatv)0.0f;
        for (int dv = 0; dv < HEAD_DIM / VW; dv++) {
            floatv k = VLOAD_HALF(dv, row);
            for (int h = 0; h < QPK; h++)
                acc[h] += q[h * (HEAD_DIM / VW) + dv] * k;
        }
        for (int h = 0; h < QPK; h++) {
            float score = hsum(acc[h]);
            sc[h * CHUNK + i] = score;
            m[h] = fmax(m[h], score);
        }
    }
    for (int h = 0; h < QPK; h++) {
        float sum = 0.0f;
        for (int i = 0; i < n_valid; i++) {
            float p = exp(sc[h * CHUNK + i] - m[h]);
            sc[h * CHUNK + i] = p;
            sum += p;
        }
        l[h] = sum;
    }
    floatv out[QPK * (HEAD_DIM / VW)];
    for (int i = 0; i < QPK * (HEAD_DIM / VW); i++)
        out[i] = (floatv)0.0f;
    for (int i = 0; i < n_valid; i++) {
        int u = u_begin + i;
        int t = u < sink_end ? u : qk + (u - sink_end);
        __global const half *row = vfp + fp_row(sh, t, fp_slots, ring, n_sink);
        for (int dv = 0; dv < HEAD_DIM / VW; dv++) {
            floatv v = VLOAD_HALF(dv, row);
            for (int h = 0; h < QPK; h++)
                out[h * (HEAD_DIM / VW) + dv] += sc[h * CHUNK + i] * v;
        }
    }
    for (int h = 0; h < QPK; h++) {
        __global float *p = partial_of(partials, s, kh * QPK + h, slot0 + chunk, n_q_heads, n_slots);
        p[0] = m[h];
        p[1] = l[h];
        for (int dv = 0; dv < HEAD_DIM / VW; dv++)
            VSTORE(out[h * (HEAD_DIM / VW) + dv], dv, p + 2);
    }
}

/* One work-item per (sequence, q head), channels in vector lanes: the
 * log-sum-exp merge reads each partial once (the per-channel merge makes
 * every work-item rescan the chunk maxima). */
__kernel __attribute__((reqd_work_group_size(1, 1, 1))) void
clkvq_attn_merge_serial(__global const float *partials, __global const int *perm_v,
                        __global const int *seq_len, __global float *out, int n_seqs,
                        int n_q_heads, int n_slots)
{
    int sq = (int)get_global_id(0);
    if (sq >= n_seqs * n_q_heads)
        return;
    int s = sq / n_q_heads, kh = (sq % n_q_heads) / QPK;
    __global const float *p = partials + (size_t)sq * n_slots * PARTIAL_STRIDE;
    float m = -INFINITY, l = 0.0f;
    for (int c = 0; c < n_slots; c++)
        m = fmax(m, p[(size_t)c * PARTIAL_STRIDE]);
    floatv acc[HEAD_DIM / VW];
    for (int dv = 0; dv < HEAD_DIM / VW; dv++)
        acc[dv] = (floatv)0.0f;
    if (seq_len[s] > 0)
        for (int c = 0; c < n_slots; c++) {
            __global const float *pc = p + (size_t)c * PARTIAL_STRIDE;
            if (pc[0] == -INFINITY)
                continue;
            float w = exp(pc[0] - m);
            l += pc[1] * w;
            for (int dv = 0; dv < HEAD_DIM / VW; dv++)
                acc[dv] += VLOAD(dv, pc + 2) * w;
        }
    for (int dv = 0; dv < HEAD_DIM / VW; dv++) {
        float lanes[VW];
        VSTORE(l > 0.0f ? acc[dv] / l : (floatv)0.0f, 0, lanes);
        for (int i = 0; i < VW; i++) {
            int d = dv * VW + i;
            out[(size_t)sq * HEAD_DIM + (perm_v ? perm_v[kh * HEAD_DIM + d] : d)] = lanes[i];
        }
    }
}
