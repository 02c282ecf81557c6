/*
 * Fused decode attention over the paged cache (OpenCL C 1.2).
 *
 * One step = prepare_q (permute + scale q, per-group sums) -> chunk kernels
 * (packed tokens; fp16 tokens) writing per-chunk partial results (running
 * max m, sum l, unnormalized output) -> merge (log-sum-exp over chunks, then
 * un-permute with perm_v). No dequantized K or V is written anywhere:
 * score = sum over groups of s * (q . codes) + z * sum(q) (float zero) or
 * s * (q . codes - z * sum(q)) (integer zero).
 *
 * Rows: a work-group serves one kv head of one sequence and ROWS = QPK x NQ
 * query rows, row r being query r / QPK (of NQ per sequence: speculative
 * decoding verifies several) of q head kh * QPK + r % QPK. Query i of a
 * sequence of length n attends causally to tokens t < n - NQ + 1 + i.
 *
 * Pages (clkvq_packing.h): token t of sequence s is in page table[s *
 * max_blocks + t / block_size]; a page id outside 0..n_pages-1 (a runtime's
 * bad table) masks its tokens instead of reading out of bounds. Packed
 * chunks sit at absolute positions c * CHUNK, so aligned vectors of tokens
 * never straddle pages.
 *
 * Build options (all compile-time so loops unroll and shifts fold):
 *   HEAD_DIM, GROUP_SIZE, QPK (query heads per kv head), NQ (queries per
 *   sequence), CHUNK (tokens per work-group), WGS (work-group size; CHUNK %
 *   WGS == 0), SCHEME (KVQ_SCHEME_*), K_BITS / K_TERNARY / K_LEVELS and
 *   V_... (the formats' rows of the table), K_GW / V_GW (words per packed
 *   group), PARAM_FP8, ZERO_INT, LAYOUT_K / LAYOUT_V (KVQ_LAYOUT_*),
 *   K_CHANNEL (keys in per-channel groups), QBLOCK (skvq's region
 *   alignment, kvq_q_end), ROT (stored rows rotated: q is rotated here and
 *   the output unrotated by the row merge).
 */
#pragma OPENCL FP_CONTRACT OFF

#define NG (HEAD_DIM / GROUP_SIZE)
#define ROWS (QPK * NQ)
#define PARTIAL_STRIDE (HEAD_DIM + 2)

#if PARAM_FP8
inline float2 load_params(__global const uchar *params, size_t entry)
{
    return (float2)(kvq_e4m3_to_f32(params[2 * entry]), kvq_e4m3_to_f32(params[2 * entry + 1]));
}
#else
inline float2 load_params(__global const uchar *params, size_t entry)
{
    return vload_half2(entry, (__global const half *)params);
}
#endif

/* Code j of a group whose words are in the private array w (scalars or
 * vectors of uint); the next word is read only when the code straddles. */
#define WORDS_CODE(w, j, BITS_)                                                          \
    KVQ_CODE((w)[KVQ_WORD_OF(j, BITS_)],                                                 \
             KVQ_STRADDLES(j, BITS_) ? (w)[KVQ_WORD_OF(j, BITS_) + 1] : (w)[0] ^ (w)[0], \
             j, BITS_)

/* Region bounds (clkvq_packing.h): first packed token of K and of V. */
inline int q_end_k(int n, int n_sink, int window, int residual)
{
    return kvq_q_end(SCHEME, 0, n, n_sink, window, residual, QBLOCK);
}
inline int q_end_v(int n, int n_sink, int window, int residual)
{
    return kvq_q_end(SCHEME, 1, n, n_sink, window, residual, QBLOCK);
}

/* The page geometry every chunk kernel gets, as one argument list (a
 * struct holding the table pointer miscompiles on PoCL's work-group
 * vectorizer, so it travels as plain values). */
#define PAGE_ARGS                                                                          \
    __global const int *table, int s, int max_blocks, int block_size, int n_pages,         \
        int n_kv_heads
#define PAGES table, s, max_blocks, block_size, n_pages, n_kv_heads

/* Row hb = page * n_kv_heads + kh of token t's page, or -1 for a page id
 * outside the pool. */
inline long page_row(PAGE_ARGS, int kh, int t)
{
    int page = kvq_page_of(table, s, max_blocks, t, block_size);
    return page >= 0 && page < n_pages ? (long)page * n_kv_heads + kh : -1;
}

/* Offset (halves) of the fp16 row of token t, or -1 if its page is bad:
 * the fp16 scheme keeps every token in pages, the others keep sinks and
 * recent tokens in the sequence's ring. */
inline long fp_row(PAGE_ARGS, int kh, int t, int fp_slots, int ring, int n_sink)
{
#if SCHEME == KVQ_SCHEME_FP16
    long hb = page_row(PAGES, kh, t);
    return hb < 0 ? -1 : (hb * block_size + t % block_size) * HEAD_DIM;
#else
    return (((long)s * n_kv_heads + kh) * fp_slots + kvq_fp_slot(t, ring, n_sink)) * HEAD_DIM;
#endif
}

/* Tokens query row r may attend to: t < row_limit. */
inline int row_limit(int n, int r) { return n - NQ + 1 + r / QPK; }

/* q: [seq][query][q head][HEAD_DIM] model order -> qs: the stored space
 * of the kv head's keys (rotated when ROT, then permuted by perm_k), times
 * scale; qsum: [seq][query][q head][NG] sums of qs per group. One
 * work-item per query row; n_rows = n_seqs * NQ. */
__kernel void clkvq_attn_prepare_q(__global const float *q, __global const int *perm_k,
                                   __global float *qs, __global float *qsum, int n_rows,
                                   int n_q_heads, float scale, uint rot_seed)
{
    int sq = (int)get_global_id(0);
    if (sq >= n_rows * n_q_heads)
        return;
    int kh = sq % n_q_heads / QPK;
    float row[HEAD_DIM];
    for (int c = 0; c < HEAD_DIM; c++)
        row[c] = q[(size_t)sq * HEAD_DIM + c];
#if ROT
    kvq_rotate(row, HEAD_DIM, rot_seed, kh);
#endif
    for (int g = 0; g < NG; g++) {
        float sum = 0.0f;
        for (int j = 0; j < GROUP_SIZE; j++) {
            int c = g * GROUP_SIZE + j;
            float v = row[perm_k ? perm_k[kh * HEAD_DIM + c] : c] * scale;
            qs[(size_t)sq * HEAD_DIM + c] = v;
            sum += v;
        }
        qsum[(size_t)sq * NG + g] = sum;
    }
}

/* Index (in units of one q head's row) of row r of kv head kh, seq s. */
inline size_t row_index(int s, int kh, int r, int n_q_heads)
{
    return ((size_t)s * NQ + r / QPK) * n_q_heads + kh * QPK + r % QPK;
}

inline __global float *partial_of(__global float *partials, int s, int kh, int r, int slot,
                                  int n_q_heads, int n_slots)
{
    return partials + (row_index(s, kh, r, n_q_heads) * n_slots + slot) * PARTIAL_STRIDE;
}

/* A chunk with no token for any row: the merge skips m = -inf. lid as in
 * write_partials. */
inline void write_empty(__global float *partials, int s, int kh, int slot, int n_q_heads,
                        int n_slots, int lid)
{
    if (lid == 0)
        for (int r = 0; r < ROWS; r++) {
            __global float *p = partial_of(partials, s, kh, r, slot, n_q_heads, n_slots);
            p[0] = -INFINITY;
            p[1] = 0.0f;
        }
}

/* Loads the ROWS queries of kv head kh of sequence s into local memory. */
inline void load_queries(__global const float *qs, __global const float *qsum, int s, int kh,
                         int n_q_heads, __local float *q_loc, __local float *qsum_loc)
{
    int lid = (int)get_local_id(0);
    for (int i = lid; i < ROWS * HEAD_DIM; i += WGS)
        q_loc[i] = qs[row_index(s, kh, i / HEAD_DIM, n_q_heads) * HEAD_DIM + i % HEAD_DIM];
    for (int i = lid; i < ROWS * NG; i += WGS)
        qsum_loc[i] = qsum[row_index(s, kh, i / NG, n_q_heads) * NG + i % NG];
}

/* Softmax over the chunk's scores in s_loc (in place: exp(score - max)),
 * leaving each row's max and sum in m_out/l_out. A row with no token in
 * the chunk keeps m = -inf, l = 0 and zero weights. Barriers only in
 * uniform control flow (every work-item runs every loop the same times). */
inline void chunk_softmax(__local float *s_loc, __local float *red, float *m_out, float *l_out)
{
    int lid = (int)get_local_id(0);
    for (int r = 0; r < ROWS; r++) {
        float m = -INFINITY;
        for (int i = lid; i < CHUNK; i += WGS)
            m = fmax(m, s_loc[r * CHUNK + i]);
        red[r * WGS + lid] = m;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WGS / 2; stride > 0; stride /= 2) {
        if (lid < stride)
            for (int r = 0; r < ROWS; r++)
                red[r * WGS + lid] = fmax(red[r * WGS + lid], red[r * WGS + lid + stride]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int r = 0; r < ROWS; r++)
        m_out[r] = red[r * WGS];
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int r = 0; r < ROWS; r++) {
        float l = 0.0f;
        for (int i = lid; i < CHUNK; i += WGS) {
            /* masked scores are -inf: exp gives 0 (an empty row subtracts 0,
             * not -inf, which would make NaN) */
            float p = exp(s_loc[r * CHUNK + i] - (m_out[r] == -INFINITY ? 0.0f : m_out[r]));
            s_loc[r * CHUNK + i] = p;
            l += p;
        }
        red[r * WGS + lid] = l;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = WGS / 2; stride > 0; stride /= 2) {
        if (lid < stride)
            for (int r = 0; r < ROWS; r++)
                red[r * WGS + lid] += red[r * WGS + lid + stride];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int r = 0; r < ROWS; r++)
        l_out[r] = red[r * WGS];
    barrier(CLK_LOCAL_MEM_FENCE);
}

/* Each row's (m, l), written by work-item 0. lid comes from the caller:
 * PoCL 3.1 miscompiles the work-group loop (a following loop loses its
 * exit) when get_local_id() is called inside such an inlined helper. */
inline void write_partials(__global float *partials, int s, int kh, int slot, int n_q_heads,
                           int n_slots, const float *m, const float *l, int lid)
{
    if (lid == 0)
        for (int r = 0; r < ROWS; r++) {
            __global float *p = partial_of(partials, s, kh, r, slot, n_q_heads, n_slots);
            p[0] = m[r];
            p[1] = l[r];
        }
}

#if SCHEME != KVQ_SCHEME_FP16
/* Scores of token t (at offset o of page row hb) against the ROWS queries
 * from packed K. */
inline void packed_scores(__global const uint *kc, __global const uchar *kp, size_t hb, int o,
                          int block_size, __local const float *q_loc,
                          __local const float *qsum_loc, float *score)
{
    for (int r = 0; r < ROWS; r++)
        score[r] = 0.0f;
#if K_CHANNEL /* keys: per-channel groups of GROUP_SIZE tokens (kivi, skvq's kc) */
    int j = o % GROUP_SIZE;
    for (int c = 0; c < HEAD_DIM; c++) {
        size_t base = kvq_channel_group_word(hb, o, c, block_size, GROUP_SIZE, HEAD_DIM, K_GW);
        uint w[K_GW];
        for (int i = 0; i < K_GW; i++)
            w[i] = kc[base + i];
        float code = (float)WORDS_CODE(w, j, K_BITS);
        float2 sz = load_params(kp, kvq_channel_param(hb, o, c, block_size, GROUP_SIZE, HEAD_DIM));
#if ZERO_INT
        float k = (code - sz.y) * sz.x;
#else
        float k = code * sz.x + sz.y;
#endif
        for (int r = 0; r < ROWS; r++)
            score[r] += q_loc[r * HEAD_DIM + c] * k;
    }
#else
    size_t step = kvq_token_word_step(LAYOUT_K, block_size);
    for (int g = 0; g < NG; g++) {
        size_t base = kvq_token_group_word(LAYOUT_K, hb, o, g, block_size, NG, K_GW);
        uint w[K_GW];
        for (int i = 0; i < K_GW; i++)
            w[i] = kc[base + i * step];
        float dot[ROWS];
        for (int r = 0; r < ROWS; r++)
            dot[r] = 0.0f;
        for (int j = 0; j < GROUP_SIZE; j++) {
            float code = (float)WORDS_CODE(w, j, K_BITS);
            for (int r = 0; r < ROWS; r++)
                dot[r] += q_loc[r * HEAD_DIM + g * GROUP_SIZE + j] * code;
        }
        float2 sz = load_params(kp, kvq_token_param(LAYOUT_K, hb, o, g, block_size, NG));
        for (int r = 0; r < ROWS; r++) {
#if ZERO_INT
            score[r] += sz.x * (dot[r] - sz.y * qsum_loc[r * NG + g]);
#else
            score[r] += sz.x * dot[r] + sz.y * qsum_loc[r * NG + g];
#endif
        }
    }
#endif
}

/* Value of channel d of the token at offset o of page row hb (packed V,
 * token-axis groups). */
inline float packed_value(__global const uint *vc, __global const uchar *vp, size_t hb, int o,
                          int d, int block_size)
{
    int g = d / GROUP_SIZE, j = d % GROUP_SIZE;
    size_t step = kvq_token_word_step(LAYOUT_V, block_size);
    size_t w = kvq_token_group_word(LAYOUT_V, hb, o, g, block_size, NG, V_GW) +
               (size_t)KVQ_WORD_OF(j, V_BITS) * step;
    uint hi = KVQ_STRADDLES(j, V_BITS) ? vc[w + step] : 0u;
    float code = (float)KVQ_CODE(vc[w], hi, j, V_BITS);
    float2 sz = load_params(vp, kvq_token_param(LAYOUT_V, hb, o, g, block_size, NG));
#if ZERO_INT
    return (code - sz.y) * sz.x;
#else
    return code * sz.x + sz.y;
#endif
}

/* One work-group per (chunk of packed tokens, kv head, sequence); chunk c
 * covers [c0 * CHUNK, c0 * CHUNK + CHUNK) with c0 = c + sink_end / CHUNK,
 * clipped to the packed region [sink_end, q_end_k). */
__kernel __attribute__((reqd_work_group_size(WGS, 1, 1))) void
clkvq_attn_packed_chunk(__global const float *qs, __global const float *qsum,
                        __global const uint *kc, __global const uchar *kp,
                        __global const uint *vc, __global const uchar *vp,
                        __global const half *vfp, __global const int *seq_len,
                        __global const int *table, __global float *partials, int n_q_heads,
                        int n_kv_heads, int block_size, int max_blocks, int n_pages,
                        int fp_slots, int ring, int n_sink, int window, int residual,
                        int n_slots)
{
    __local float q_loc[ROWS * HEAD_DIM];
    __local float qsum_loc[ROWS * NG];
    __local float s_loc[ROWS * CHUNK];
    __local float red[ROWS * WGS];
    __local long hb_loc[CHUNK]; /* page row of each token, -1: masked */
    int chunk = (int)get_group_id(0), kh = (int)get_group_id(1), s = (int)get_group_id(2);
    int lid = (int)get_local_id(0);
    int n = seq_len[s];
    int sink_end = kvq_sink_end(n, n_sink);
    int qk = q_end_k(n, n_sink, window, residual), qv = q_end_v(n, n_sink, window, residual);
    int base = (chunk + sink_end / CHUNK) * CHUNK;
    int t_lo = max(base, sink_end), t_hi = min(base + CHUNK, qk);
    if (t_lo >= t_hi) { /* uniform across the work-group: no barrier is skipped by some */
        write_empty(partials, s, kh, chunk, n_q_heads, n_slots, lid);
        return;
    }
    load_queries(qs, qsum, s, kh, n_q_heads, q_loc, qsum_loc);
    barrier(CLK_LOCAL_MEM_FENCE);

    for (int i = lid; i < CHUNK; i += WGS) {
        int t = base + i;
        long hb = t >= t_lo && t < t_hi ? page_row(PAGES, kh, t) : -1;
        hb_loc[i] = hb;
        float score[ROWS];
        if (hb >= 0) {
            packed_scores(kc, kp, (size_t)hb, t % block_size, block_size, q_loc, qsum_loc,
                          score);
            for (int r = 0; r < ROWS; r++)
                if (t >= row_limit(n, r))
                    score[r] = -INFINITY;
        } else {
            for (int r = 0; r < ROWS; r++)
                score[r] = -INFINITY;
        }
        for (int r = 0; r < ROWS; r++)
            s_loc[r * CHUNK + i] = score[r];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    float m[ROWS], l[ROWS];
    chunk_softmax(s_loc, red, m, l);

    const int i_lo = t_lo - base, i_hi = t_hi - base;
    for (int d = lid; d < HEAD_DIM; d += WGS) {
        float acc[ROWS];
        for (int r = 0; r < ROWS; r++)
            acc[r] = 0.0f;
        for (int i = i_lo; i < i_hi; i++) {
            long hb = hb_loc[i];
            int t = base + i;
            float v = 0.0f;
#if SCHEME == KVQ_SCHEME_KIVI /* V keeps its last `residual` tokens in fp16 */
            if (t >= qv)
                v = vload_half(fp_row(PAGES, kh, t, fp_slots, ring, n_sink) + d, vfp);
            else
#endif
                if (hb >= 0)
                v = packed_value(vc, vp, (size_t)hb, t % block_size, d, block_size);
            for (int r = 0; r < ROWS; r++)
                acc[r] += s_loc[r * CHUNK + i] * v;
        }
        for (int r = 0; r < ROWS; r++)
            partial_of(partials, s, kh, r, chunk, n_q_heads, n_slots)[2 + d] = acc[r];
    }
    write_partials(partials, s, kh, chunk, n_q_heads, n_slots, m, l, lid);
}
#endif

/* One work-group per (chunk of fp16 tokens, kv head, sequence): the sinks
 * and the recent window (all tokens for the fp16 scheme). Virtual index u
 * runs over sinks first, then [q_end_k, n). */
__kernel __attribute__((reqd_work_group_size(WGS, 1, 1))) void
clkvq_attn_fp16_chunk(__global const float *qs, __global const half *kfp,
                      __global const half *vfp, __global const int *seq_len,
                      __global const int *table, __global float *partials, int n_q_heads,
                      int n_kv_heads, int block_size, int max_blocks, int n_pages,
                      int fp_slots, int ring, int n_sink, int window, int residual, int slot0,
                      int n_slots)
{
    __local float q_loc[ROWS * HEAD_DIM];
    __local float s_loc[ROWS * CHUNK];
    __local float red[ROWS * WGS];
    __local long row_loc[CHUNK]; /* fp16 row of each token, -1: masked */
    int chunk = (int)get_group_id(0), kh = (int)get_group_id(1), s = (int)get_group_id(2);
    int lid = (int)get_local_id(0);
    int n = seq_len[s];
    int sink_end = kvq_sink_end(n, n_sink), qk = q_end_k(n, n_sink, window, residual);
    int n_fp = sink_end + (n - qk);
    int u_begin = chunk * CHUNK;
    if (u_begin >= n_fp) {
        write_empty(partials, s, kh, slot0 + chunk, n_q_heads, n_slots, lid);
        return;
    }
    int n_valid = min(CHUNK, n_fp - u_begin);
    for (int i = lid; i < ROWS * HEAD_DIM; i += WGS)
        q_loc[i] = qs[row_index(s, kh, i / HEAD_DIM, n_q_heads) * HEAD_DIM + i % HEAD_DIM];
    barrier(CLK_LOCAL_MEM_FENCE);

    for (int i = lid; i < CHUNK; i += WGS) {
        float score[ROWS];
        for (int r = 0; r < ROWS; r++)
            score[r] = -INFINITY;
        long row = -1;
        int u = u_begin + i;
        int t = u < sink_end ? u : qk + (u - sink_end);
        if (i < n_valid)
            row = fp_row(PAGES, kh, t, fp_slots, ring, n_sink);
        if (row >= 0) {
            for (int r = 0; r < ROWS; r++)
                score[r] = 0.0f;
            for (int d = 0; d < HEAD_DIM; d += 4) {
                float4 k = vload_half4(0, kfp + row + d);
                for (int r = 0; r < ROWS; r++) {
                    __local const float *qr = q_loc + r * HEAD_DIM + d;
                    score[r] += qr[0] * k.x + qr[1] * k.y + qr[2] * k.z + qr[3] * k.w;
                }
            }
            for (int r = 0; r < ROWS; r++)
                if (t >= row_limit(n, r))
                    score[r] = -INFINITY;
        }
        row_loc[i] = row;
        for (int r = 0; r < ROWS; r++)
            s_loc[r * CHUNK + i] = score[r];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    float m[ROWS], l[ROWS];
    chunk_softmax(s_loc, red, m, l);

    for (int d = lid; d < HEAD_DIM; d += WGS) {
        float acc[ROWS];
        for (int r = 0; r < ROWS; r++)
            acc[r] = 0.0f;
        for (int i = 0; i < n_valid; i++) {
            long row = row_loc[i];
            if (row < 0)
                continue;
            float v = vload_half(row + d, vfp);
            for (int r = 0; r < ROWS; r++)
                acc[r] += s_loc[r * CHUNK + i] * v;
        }
        for (int r = 0; r < ROWS; r++)
            partial_of(partials, s, kh, r, slot0 + chunk, n_q_heads, n_slots)[2 + d] = acc[r];
    }
    write_partials(partials, s, kh, slot0 + chunk, n_q_heads, n_slots, m, l, lid);
}

/* One work-item per output channel of each (sequence, query, q head):
 * log-sum-exp merge of the chunks, normalization, un-permutation with
 * perm_v. n_rows = n_seqs * NQ. */
__kernel void clkvq_attn_merge(__global const float *partials, __global const int *perm_v,
                               __global const int *seq_len, __global float *out, int n_rows,
                               int n_q_heads, int n_slots)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_rows * n_q_heads * HEAD_DIM)
        return;
    int d = gid % HEAD_DIM, sq = gid / HEAD_DIM, s = sq / n_q_heads / NQ, qh = sq % n_q_heads;
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
