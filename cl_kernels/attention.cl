/*
 * Fused decode attention over the packed cache (OpenCL C 1.2).
 *
 * One step = prepare_q (permute + scale q, per-group sums) -> chunk kernels
 * (packed tokens; fp16 tokens) writing per-chunk partial results (running
 * max m, sum l, unnormalized output) -> merge (log-sum-exp over chunks, then
 * un-permute with perm_v). No dequantized K or V is written anywhere:
 * score = sum over groups of s * (q . codes) + z * sum(q) (float zero) or
 * s * (q . codes - z * sum(q)) (integer zero).
 *
 * Build options (all compile-time so loops unroll and shifts fold):
 *   HEAD_DIM, GROUP_SIZE, QPK (query heads per kv head), CHUNK (tokens per
 *   work-group), WGS (work-group size; CHUNK % WGS == 0), SCHEME (0 fp16,
 *   1 token, 2 kivi, 3 skvq), K_FMT / V_FMT (0..4 as quant_common.cl),
 *   K_GW / V_GW (words per packed group), PARAM_FP8, ZERO_INT, LAYOUT_K /
 *   LAYOUT_V (0 token-major, 1 group-planar; kv_cache.h has the formulas).
 * The fp16 chunk kernel and the merge use only HEAD_DIM, QPK, CHUNK, WGS.
 */
#pragma OPENCL FP_CONTRACT OFF

#define NG (HEAD_DIM / GROUP_SIZE)
#define K_RW (NG * K_GW)
#define V_RW (NG * V_GW)
#define PARTIAL_STRIDE (HEAD_DIM + 2)

#if K_FMT == 0
#define K_BITS 8
#elif K_FMT == 1
#define K_BITS 4
#elif K_FMT == 2
#define K_BITS 3
#elif K_FMT == 3
#define K_BITS 2
#else
#define K_TERNARY 1
#endif
#if V_FMT == 0
#define V_BITS 8
#elif V_FMT == 1
#define V_BITS 4
#elif V_FMT == 2
#define V_BITS 3
#elif V_FMT == 3
#define V_BITS 2
#else
#define V_TERNARY 1
#endif

#if PARAM_FP8
float e4m3_to_f32(uchar v)
{
    int exp = (v >> 3) & 0xf, mant = v & 7;
    float out = exp == 0 ? ldexp((float)mant, -9) : ldexp(1.0f + (float)mant / 8.0f, exp - 7);
    return (v & 0x80) ? -out : out;
}
inline float2 load_params(__global const uchar *params, size_t entry)
{
    return (float2)(e4m3_to_f32(params[2 * entry]), e4m3_to_f32(params[2 * entry + 1]));
}
#else
inline float2 load_params(__global const uchar *params, size_t entry)
{
    return vload_half2(entry, (__global const half *)params);
}
#endif

/* code j of a group held in private words w */
#define TRIT(w, j) ((((w)[(j) / 20] >> (8 * (((j) / 5) % 4))) & 0xffu) / pow3[(j) % 5] % 3u)
inline uint bits_code(const uint *w, int j, int bits)
{
    int bit = j * bits, wi = bit >> 5, sh = bit & 31;
    uint v = w[wi] >> sh;
    if (sh + bits > 32)
        v |= w[wi + 1] << (32 - sh);
    return v & ((1u << bits) - 1u);
}

/* Region bounds (kv_cache.h): first packed token of K and of V. */
inline int sink_end_of(int n, int n_sink) { return min(n, n_sink); }
inline int q_end_k(int n, int n_sink, int window, int residual)
{
#if SCHEME == 0
    return sink_end_of(n, n_sink);
#elif SCHEME == 1
    return n;
#elif SCHEME == 2
    return n / residual * residual;
#else
    return max(sink_end_of(n, n_sink), n - window);
#endif
}
inline int q_end_v(int n, int n_sink, int window, int residual)
{
#if SCHEME == 2
    return max(0, n - residual);
#else
    return q_end_k(n, n_sink, window, residual);
#endif
}

inline size_t fp_row(size_t sh, int t, int fp_slots, int ring, int n_sink)
{
    int slot = t < n_sink ? ring + t : t % ring;
    return (sh * fp_slots + slot) * HEAD_DIM;
}

/* q: [seq][q head][HEAD_DIM] model order -> qs: packed order (perm_k of the
 * kv head), times scale; qsum: [seq][q head][NG] sums of qs per group. */
__kernel void clkvq_attn_prepare_q(__global const float *q, __global const int *perm_k,
                                   __global float *qs, __global float *qsum, int n_seqs,
                                   int n_q_heads, float scale)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_seqs * n_q_heads * NG)
        return;
    int g = gid % NG, sq = gid / NG, qh = sq % n_q_heads;
    int kh = qh / QPK;
    float sum = 0.0f;
    for (int j = 0; j < GROUP_SIZE; j++) {
        int c = g * GROUP_SIZE + j;
        int src = perm_k ? perm_k[kh * HEAD_DIM + c] : c;
        float v = q[(size_t)sq * HEAD_DIM + src] * scale;
        qs[(size_t)sq * HEAD_DIM + c] = v;
        sum += v;
    }
    qsum[(size_t)sq * NG + g] = sum;
}

/* Loads the QPK queries of kv head kh of sequence s into local memory. */
inline void load_queries(__global const float *qs, __global const float *qsum, int s, int kh,
                         int n_q_heads, __local float *q_loc, __local float *qsum_loc)
{
    int lid = (int)get_local_id(0);
    size_t base = ((size_t)s * n_q_heads + kh * QPK) * HEAD_DIM;
    for (int i = lid; i < QPK * HEAD_DIM; i += WGS)
        q_loc[i] = qs[base + i];
    size_t sbase = ((size_t)s * n_q_heads + kh * QPK) * NG;
    for (int i = lid; i < QPK * NG; i += WGS)
        qsum_loc[i] = qsum[sbase + i];
}

/* Softmax over the chunk's scores in s_loc (in place: exp(score - max)),
 * leaving each head's max and sum in m_out/l_out. Barriers only in
 * uniform control flow (every work-item runs every loop the same times). */
inline void chunk_softmax(__local float *s_loc, __local float *red, float *m_out, float *l_out)
{
    int lid = (int)get_local_id(0);
    for (int h = 0; h < QPK; h++) {
        float m = -INFINITY;
        for (int i = lid; i < CHUNK; i += WGS)
            m = fmax(m, s_loc[h * CHUNK + i]);
        red[h * WGS + lid] = m;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WGS / 2; stride > 0; stride /= 2) {
        if (lid < stride)
            for (int h = 0; h < QPK; h++)
                red[h * WGS + lid] = fmax(red[h * WGS + lid], red[h * WGS + lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int h = 0; h < QPK; h++)
        m_out[h] = red[h * WGS];
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int h = 0; h < QPK; h++) {
        float l = 0.0f;
        for (int i = lid; i < CHUNK; i += WGS) {
            float p = exp(s_loc[h * CHUNK + i] - m_out[h]); /* masked: exp(-inf) = 0 */
            s_loc[h * CHUNK + i] = p;
            l += p;
        }
        red[h * WGS + lid] = l;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WGS / 2; stride > 0; stride /= 2) {
        if (lid < stride)
            for (int h = 0; h < QPK; h++)
                red[h * WGS + lid] += red[h * WGS + lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int h = 0; h < QPK; h++)
        l_out[h] = red[h * WGS];
    barrier(CLK_LOCAL_MEM_FENCE);
}

inline __global float *partial_of(__global float *partials, int s, int qh, int slot,
                                  int n_q_heads, int n_slots)
{
    return partials + (((size_t)s * n_q_heads + qh) * n_slots + slot) * PARTIAL_STRIDE;
}

inline void write_empty(__global float *partials, int s, int kh, int slot, int n_q_heads,
                        int n_slots)
{
    int lid = (int)get_local_id(0);
    for (int h = 0; h < QPK; h++) {
        __global float *p = partial_of(partials, s, kh * QPK + h, slot, n_q_heads, n_slots);
        if (lid == 0) {
            p[0] = -INFINITY;
            p[1] = 0.0f;
        }
    }
}

#if SCHEME != 0
/* Scores of token t against the QPK queries from packed K. */
inline void packed_scores(__global const uint *kc, __global const uchar *kp, size_t sh, int t,
                          int capacity, __local const float *q_loc,
                          __local const float *qsum_loc, float *score)
{
    const uint pow3[5] = {1, 3, 9, 27, 81};
    for (int h = 0; h < QPK; h++)
        score[h] = 0.0f;
#if SCHEME == 2 /* KIVI keys: per-channel groups of GROUP_SIZE tokens */
    int n_blocks = capacity / GROUP_SIZE, j = t % GROUP_SIZE;
    size_t entry0 = (sh * n_blocks + t / GROUP_SIZE) * HEAD_DIM;
    for (int c = 0; c < HEAD_DIM; c++) {
        uint w[K_GW];
        for (int i = 0; i < K_GW; i++)
            w[i] = kc[(entry0 + c) * K_GW + i];
#ifdef K_TERNARY
        float code = (float)TRIT(w, j);
#else
        float code = (float)bits_code(w, j, K_BITS);
#endif
        float2 sz = load_params(kp, entry0 + c);
#if ZERO_INT
        float k = (code - sz.y) * sz.x;
#else
        float k = code * sz.x + sz.y;
#endif
        for (int h = 0; h < QPK; h++)
            score[h] += q_loc[h * HEAD_DIM + c] * k;
    }
#else
    for (int g = 0; g < NG; g++) {
        uint w[K_GW];
#if LAYOUT_K == 0
        size_t base = (sh * capacity + t) * K_RW + (size_t)g * K_GW, stride = 1;
        size_t entry = (sh * capacity + t) * NG + g;
#else
        size_t base = (sh * K_RW + (size_t)g * K_GW) * capacity + t, stride = capacity;
        size_t entry = (sh * NG + g) * capacity + t;
#endif
        for (int i = 0; i < K_GW; i++)
            w[i] = kc[base + i * stride];
        float dot[QPK];
        for (int h = 0; h < QPK; h++)
            dot[h] = 0.0f;
        for (int j = 0; j < GROUP_SIZE; j++) {
#ifdef K_TERNARY
            float code = (float)TRIT(w, j);
#else
            float code = (float)bits_code(w, j, K_BITS);
#endif
            for (int h = 0; h < QPK; h++)
                dot[h] += q_loc[h * HEAD_DIM + g * GROUP_SIZE + j] * code;
        }
        float2 sz = load_params(kp, entry);
        for (int h = 0; h < QPK; h++) {
#if ZERO_INT
            score[h] += sz.x * (dot[h] - sz.y * qsum_loc[h * NG + g]);
#else
            score[h] += sz.x * dot[h] + sz.y * qsum_loc[h * NG + g];
#endif
        }
    }
#endif
}

/* Value of channel d of token t from packed V (token-axis groups). */
inline float packed_value(__global const uint *vc, __global const uchar *vp, size_t sh, int t,
                          int d, int capacity)
{
    const uint pow3[5] = {1, 3, 9, 27, 81};
    int g = d / GROUP_SIZE, j = d % GROUP_SIZE;
#if LAYOUT_V == 0
    size_t base = (sh * capacity + t) * V_RW + (size_t)g * V_GW, stride = 1;
    size_t entry = (sh * capacity + t) * NG + g;
#else
    size_t base = (sh * V_RW + (size_t)g * V_GW) * capacity + t, stride = capacity;
    size_t entry = (sh * NG + g) * capacity + t;
#endif
#ifdef V_TERNARY
    uint w[1];
    w[0] = vc[base + (size_t)(j / 20) * stride];
    float code = (float)((((w[0] >> (8 * ((j / 5) % 4))) & 0xffu) / pow3[j % 5]) % 3u);
#else
    int bit = j * V_BITS, wi = bit >> 5, shift = bit & 31;
    uint v = vc[base + (size_t)wi * stride] >> shift;
    if (shift + V_BITS > 32)
        v |= vc[base + (size_t)(wi + 1) * stride] << (32 - shift);
    float code = (float)(v & ((1u << V_BITS) - 1u));
#endif
    float2 sz = load_params(vp, entry);
#if ZERO_INT
    return (code - sz.y) * sz.x;
#else
    return code * sz.x + sz.y;
#endif
}

/* One work-group per (chunk of packed tokens, kv head, sequence). */
__kernel __attribute__((reqd_work_group_size(WGS, 1, 1))) void
clkvq_attn_packed_chunk(__global const float *qs, __global const float *qsum,
                        __global const uint *kc, __global const uchar *kp,
                        __global const uint *vc, __global const uchar *vp,
                        __global const half *vfp, __global const int *seq_len,
                        __global float *partials, int n_q_heads, int n_kv_heads, int capacity,
                        int fp_slots, int ring, int n_sink, int window, int residual,
                        int n_slots)
{
    __local float q_loc[QPK * HEAD_DIM];
    __local float qsum_loc[QPK * NG];
    __local float s_loc[QPK * CHUNK];
    __local float red[QPK * WGS];
    int chunk = (int)get_group_id(0), kh = (int)get_group_id(1), s = (int)get_group_id(2);
    int lid = (int)get_local_id(0);
    int n = seq_len[s];
    int t_begin = sink_end_of(n, n_sink) + chunk * CHUNK;
    int qk = q_end_k(n, n_sink, window, residual), qv = q_end_v(n, n_sink, window, residual);
    if (t_begin >= qk) { /* uniform across the work-group: no barrier is skipped by some */
        write_empty(partials, s, kh, chunk, n_q_heads, n_slots);
        return;
    }
    int n_valid = min(CHUNK, qk - t_begin);
    size_t sh = (size_t)s * n_kv_heads + kh;
    load_queries(qs, qsum, s, kh, n_q_heads, q_loc, qsum_loc);
    barrier(CLK_LOCAL_MEM_FENCE);

    for (int i = lid; i < CHUNK; i += WGS) {
        float score[QPK];
        if (i < n_valid) {
            packed_scores(kc, kp, sh, t_begin + i, capacity, q_loc, qsum_loc, score);
        } else {
            for (int h = 0; h < QPK; h++)
                score[h] = -INFINITY;
        }
        for (int h = 0; h < QPK; h++)
            s_loc[h * CHUNK + i] = score[h];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    float m[QPK], l[QPK];
    chunk_softmax(s_loc, red, m, l);

    for (int d = lid; d < HEAD_DIM; d += WGS) {
        float acc[QPK];
        for (int h = 0; h < QPK; h++)
            acc[h] = 0.0f;
        for (int i = 0; i < n_valid; i++) {
            int t = t_begin + i;
            float v;
#if SCHEME == 2 /* KIVI: V keeps its last `residual` tokens in fp16 */
            if (t >= qv)
                v = vload_half(fp_row(sh, t, fp_slots, ring, n_sink) + d, vfp);
            else
#endif
                v = packed_value(vc, vp, sh, t, d, capacity);
            for (int h = 0; h < QPK; h++)
                acc[h] += s_loc[h * CHUNK + i] * v;
        }
        for (int h = 0; h < QPK; h++)
            partial_of(partials, s, kh * QPK + h, chunk, n_q_heads, n_slots)[2 + d] = acc[h];
    }
    if (lid == 0)
        for (int h = 0; h < QPK; h++) {
            __global float *p = partial_of(partials, s, kh * QPK + h, chunk, n_q_heads, n_slots);
            p[0] = m[h];
            p[1] = l[h];
        }
}
#endif

/* One work-group per (chunk of fp16 tokens, kv head, sequence): the sinks
 * and the recent window (all tokens for the fp16 scheme). Virtual index u
 * runs over sinks first, then [q_end_k, n). */
__kernel __attribute__((reqd_work_group_size(WGS, 1, 1))) void
clkvq_attn_fp16_chunk(__global const float *qs, __global const half *kfp,
                      __global const half *vfp, __global const int *seq_len,
                      __global float *partials, int n_q_heads, int n_kv_heads, int fp_slots,
                      int ring, int n_sink, int window, int residual, int slot0, int n_slots)
{
    __local float q_loc[QPK * HEAD_DIM];
    __local float s_loc[QPK * CHUNK];
    __local float red[QPK * WGS];
    int chunk = (int)get_group_id(0), kh = (int)get_group_id(1), s = (int)get_group_id(2);
    int lid = (int)get_local_id(0);
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
    size_t qbase = ((size_t)s * n_q_heads + kh * QPK) * HEAD_DIM;
    for (int i = lid; i < QPK * HEAD_DIM; i += WGS)
        q_loc[i] = qs[qbase + i];
    barrier(CLK_LOCAL_MEM_FENCE);

    for (int i = lid; i < CHUNK; i += WGS) {
        float score[QPK];
        for (int h = 0; h < QPK; h++)
            score[h] = i < n_valid ? 0.0f : -INFINITY;
        if (i < n_valid) {
            int u = u_begin + i;
            int t = u < sink_end ? u : qk + (u - sink_end);
            size_t row = fp_row(sh, t, fp_slots, ring, n_sink);
            for (int d = 0; d < HEAD_DIM; d += 4) {
                float4 k = vload_half4(0, kfp + row + d);
                for (int h = 0; h < QPK; h++) {
                    __local const float *qh = q_loc + h * HEAD_DIM + d;
                    score[h] += qh[0] * k.x + qh[1] * k.y + qh[2] * k.z + qh[3] * k.w;
                }
            }
        }
        for (int h = 0; h < QPK; h++)
            s_loc[h * CHUNK + i] = score[h];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    float m[QPK], l[QPK];
    chunk_softmax(s_loc, red, m, l);

    for (int d = lid; d < HEAD_DIM; d += WGS) {
        float acc[QPK];
        for (int h = 0; h < QPK; h++)
            acc[h] = 0.0f;
        for (int i = 0; i < n_valid; i++) {
            int u = u_begin + i;
            int t = u < sink_end ? u : qk + (u - sink_end);
            float v = vload_half(fp_row(sh, t, fp_slots, ring, n_sink) + d, vfp);
            for (int h = 0; h < QPK; h++)
                acc[h] += s_loc[h * CHUNK + i] * v;
        }
        for (int h = 0; h < QPK; h++)
            partial_of(partials, s, kh * QPK + h, slot0 + chunk, n_q_heads, n_slots)[2 + d] =
                acc[h];
    }
    if (lid == 0)
        for (int h = 0; h < QPK; h++) {
            __global float *p =
                partial_of(partials, s, kh * QPK + h, slot0 + chunk, n_q_heads, n_slots);
            p[0] = m[h];
            p[1] = l[h];
        }
}

/* One work-item per output channel of each (sequence, q head): log-sum-exp
 * merge of the chunks, normalization, un-permutation with perm_v. */
__kernel void clkvq_attn_merge(__global const float *partials, __global const int *perm_v,
                               __global const int *seq_len, __global float *out, int n_seqs,
                               int n_q_heads, int n_slots)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_seqs * n_q_heads * HEAD_DIM)
        return;
    int d = gid % HEAD_DIM, sq = gid / HEAD_DIM, s = sq / n_q_heads, qh = sq % n_q_heads;
    int kh = qh / QPK;
    __global const float *p = partials + (size_t)sq * n_slots * PARTIAL_STRIDE;
    float m = -INFINITY;
    for (int c = 0; c < n_slots; c++)
        m = fmax(m, p[(size_t)c * PARTIAL_STRIDE]);
    float l = 0.0f, acc = 0.0f;
    if (seq_len[s] > 0)
        for (int c = 0; c < n_slots; c++) {
            float mc = p[(size_t)c * PARTIAL_STRIDE];
            if (mc == -INFINITY)
                continue;
            float w = exp(mc - m);
            l += p[(size_t)c * PARTIAL_STRIDE + 1] * w;
            acc += p[(size_t)c * PARTIAL_STRIDE + 2 + d] * w;
        }
    int dst = perm_v ? perm_v[kh * HEAD_DIM + d] : d;
    out[(size_t)sq * HEAD_DIM + dst] = l > 0.0f ? acc / l : 0.0f;
}
