/*
 * Fused decode attention over the paged cache (OpenCL C 1.2): what both
 * decode variants share. The cooperative variant (attention_coop.cl) and
 * the serial one (attention_serial.cl) are each built after this file.
 *
 * A decode splits the tokens of each (sequence, kv head) into chunks or
 * splits that write partial results (running max m, sum l, unnormalized
 * output), which a merge combines by log-sum-exp; a variant may write the
 * finished output directly when there is only one split. No dequantized K
 * or V is written anywhere: score = sum over groups of s * (q . codes) +
 * z * sum(q) (float zero) or s * (q . codes - z * sum(q)) (integer zero).
 *
 * Empty partials, one convention for every decode kernel: l = 0 marks a
 * partial with no token; it carries m = M_EMPTY (-FLT_MAX, finite, so that
 * exp(M_EMPTY - m) is 0 and M_EMPTY - M_EMPTY is 0: never NaN) where a
 * kernel writes it as empty, and merges key on l > 0 and read neither m
 * nor the output of such a partial.
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
 *   sequence), SCHEME (KVQ_SCHEME_*), K_BITS / K_TERNARY / K_LEVELS and
 *   V_... (the formats' rows of the table), K_GW / V_GW (words per packed
 *   group), PARAM_FP8, ZERO_INT, LAYOUT_K / LAYOUT_V (KVQ_LAYOUT_*),
 *   K_CHANNEL (keys in per-channel groups), QBLOCK (skvq's region
 *   alignment, kvq_q_end), ROT (stored rows rotated: the query is rotated
 *   and the output unrotated), and each variant's tunables.
 */
#pragma OPENCL FP_CONTRACT OFF

#define NG (HEAD_DIM / GROUP_SIZE)
#define ROWS (QPK * NQ)
#define PARTIAL_STRIDE (HEAD_DIM + 2)
#define M_EMPTY (-FLT_MAX)

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

/* A chunk with no token for any row (see the convention above). lid comes
 * from the caller: PoCL 3.1 miscompiles the work-group loop (a following
 * loop loses its exit) when get_local_id() is called inside such an
 * inlined helper after a barrier region. */
inline void write_empty(__global float *partials, int s, int kh, int slot, int n_q_heads,
                        int n_slots, int lid)
{
    if (lid == 0)
        for (int r = 0; r < ROWS; r++) {
            __global float *p = partial_of(partials, s, kh, r, slot, n_q_heads, n_slots);
            p[0] = M_EMPTY;
            p[1] = 0.0f;
        }
}
