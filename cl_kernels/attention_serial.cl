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

/* codes per register block in P.V: ROWS x JB accumulators stay in registers */
#define JB (ROWS <= 2 ? 8 : ROWS <= 4 ? 4 : 2)

#if SCHEME != KVQ_SCHEME_FP16
/* The serial variant reads packed tokens as vectors of VW consecutive
 * tokens: group-planar placement (clkvq_packing.h). */
#define PLANAR KVQ_LAYOUT_GROUP_PLANAR
#define NB (CHUNK / VW) /* vectors of tokens per chunk */

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

    float q[ROWS * HEAD_DIM];
    float qg[ROWS * NG];
    int lim[ROWS];
    for (int r = 0; r < ROWS; r++) {
        size_t row = row_index(s, kh, r, n_q_heads);
        for (int c = 0; c < HEAD_DIM; c++)
            q[r * HEAD_DIM + c] = qs[row * HEAD_DIM + c];
        for (int g = 0; g < NG; g++)
            qg[r * NG + g] = qsum[row * NG + g];
        lim[r] = min(t_hi, row_limit(n, r));
    }

    /* scores, VW tokens at a time; hbs[b]: page row of vector b, -1 masked */
    float sc[ROWS * CHUNK];
    long hbs[NB];
    for (int b = 0; b < n_blocks; b++) {
        int t0 = base + b * VW;
        long hb = t0 + VW > t_lo ? page_row(PAGES, kh, t0) : -1;
        hbs[b] = hb;
        if (hb < 0) {
            for (int r = 0; r < ROWS; r++)
                VSTORE((floatv)(-INFINITY), 0, sc + r * CHUNK + b * VW);
            continue;
        }
        int o0 = t0 % block_size;
        floatv acc[ROWS];
        for (int r = 0; r < ROWS; r++)
            acc[r] = (floatv)0.0f;
#if K_CHANNEL /* keys: per-channel groups along tokens; t0 % VW == 0 */
        int j0 = o0 % GROUP_SIZE;
        for (int c = 0; c < HEAD_DIM; c++) {
            __global const uint *w =
                kc + kvq_channel_group_word(hb, o0, c, block_size, GROUP_SIZE, HEAD_DIM, K_GW);
            uint lanes[VW];
            for (int l = 0; l < VW; l++) {
                int j = j0 + l, wi = KVQ_WORD_OF(j, K_BITS);
                lanes[l] = KVQ_CODE(w[wi], KVQ_STRADDLES(j, K_BITS) ? w[wi + 1] : 0u, j, K_BITS);
            }
            floatv code = CONVERT_FLOATV(VLOAD(0, lanes));
            float2 sz =
                load_params(kp, kvq_channel_param(hb, o0, c, block_size, GROUP_SIZE, HEAD_DIM));
#if ZERO_INT
            floatv kv = (code - sz.y) * sz.x;
#else
            floatv kv = code * sz.x + sz.y;
#endif
            for (int r = 0; r < ROWS; r++)
                acc[r] += q[r * HEAD_DIM + c] * kv;
        }
#else
        for (int g = 0; g < NG; g++) {
            __global const uint *gw =
                kc + kvq_token_group_word(PLANAR, hb, o0, g, block_size, NG, K_GW);
            uintv wv[K_GW];
            for (int w = 0; w < K_GW; w++)
                wv[w] = VLOAD(0, gw + (size_t)w * block_size);
            floatv dot[ROWS];
            for (int r = 0; r < ROWS; r++)
                dot[r] = (floatv)0.0f;
            for (int j = 0; j < GROUP_SIZE; j++) {
                floatv code = CONVERT_FLOATV(WORDS_CODE(wv, j, K_BITS));
                for (int r = 0; r < ROWS; r++)
                    dot[r] += q[r * HEAD_DIM + g * GROUP_SIZE + j] * code;
            }
            floatv scale, zero;
            params_lanes(kp, kvq_token_param(PLANAR, hb, o0, g, block_size, NG), &scale, &zero);
            for (int r = 0; r < ROWS; r++) {
#if ZERO_INT
                acc[r] += scale * (dot[r] - zero * qg[r * NG + g]);
#else
                acc[r] += scale * dot[r] + zero * qg[r * NG + g];
#endif
            }
        }
#endif
        intv t = t0 + LANE_IDS;
        for (int r = 0; r < ROWS; r++) {
            intv valid = t >= (intv)t_lo && t < (intv)lim[r];
            VSTORE(select((floatv)(-INFINITY), acc[r], valid), 0, sc + r * CHUNK + b * VW);
        }
    }

    /* softmax over the chunk (masked lanes hold -inf: exp gives 0; a row
     * with no token keeps m = -inf and zero weights) */
    float m[ROWS], l[ROWS];
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

    /* P.V: tokens before q_end(V) are packed; KIVI keeps later ones fp16 */
    float out[ROWS * HEAD_DIM];
    for (int i = 0; i < ROWS * HEAD_DIM; i++)
        out[i] = 0.0f;
    int qv = q_end_v(n, n_sink, window, residual);
    int v_hi = min(qv, t_hi);
    int n_vblocks = v_hi > base ? (v_hi - base + VW - 1) / VW : 0;
    /* Per group: p * scale for every token vector once, then the codes in
     * blocks of JB so that ROWS x JB accumulators stay in registers. */
    floatv ps[ROWS * NB];
    for (int g = 0; g < NG; g++) {
        float zsum[ROWS];
        for (int r = 0; r < ROWS; r++) {
            floatv zacc = (floatv)0.0f;
            for (int b = 0; b < n_vblocks; b++) {
                int t0 = base + b * VW;
                intv t = t0 + LANE_IDS;
                intv valid = t >= (intv)t_lo && t < (intv)v_hi;
                floatv p = (floatv)0.0f, scale = (floatv)0.0f, zero = (floatv)0.0f;
                if (hbs[b] >= 0) {
                    params_lanes(vp, kvq_token_param(PLANAR, hbs[b], t0 % block_size, g,
                                                     block_size, NG),
                                 &scale, &zero);
                    p = VLOAD(0, sc + r * CHUNK + b * VW);
                }
                /* lanes past the last token hold unwritten memory: mask after
                 * multiplying (0 * NaN would be NaN) */
                ps[r * NB + b] = select((floatv)0.0f, p * scale, valid);
#if ZERO_INT
                zacc -= select((floatv)0.0f, p * scale * zero, valid);
#else
                zacc += select((floatv)0.0f, p * zero, valid);
#endif
            }
            zsum[r] = hsum(zacc);
        }
        for (int jb = 0; jb < GROUP_SIZE; jb += JB) {
            /* the words holding codes jb .. jb + JB - 1 (at most three for
             * widths up to 8 bits) */
            const int w0 = KVQ_WORD_OF(jb, V_BITS);
            const int w_last = KVQ_WORD_OF(jb + JB - 1, V_BITS) +
                               (KVQ_STRADDLES(jb + JB - 1, V_BITS) ? 1 : 0);
            floatv acc[ROWS * JB];
            for (int i = 0; i < ROWS * JB; i++)
                acc[i] = (floatv)0.0f;
            for (int b = 0; b < n_vblocks; b++) {
                if (hbs[b] < 0)
                    continue;
                __global const uint *gw =
                    vc + kvq_token_group_word(PLANAR, hbs[b], (base + b * VW) % block_size, g,
                                              block_size, NG, V_GW);
                uintv wv[3];
                for (int i = 0; i < 3; i++)
                    wv[i] = w0 + i <= w_last ? VLOAD(0, gw + (size_t)(w0 + i) * block_size)
                                             : (uintv)0;
                for (int jj = 0; jj < JB; jj++) {
                    int j = jb + jj, wi = KVQ_WORD_OF(j, V_BITS) - w0;
                    uintv raw = KVQ_CODE(wv[wi], KVQ_STRADDLES(j, V_BITS) ? wv[wi + 1] : (uintv)0,
                                         j, V_BITS);
                    floatv code = CONVERT_FLOATV(raw);
                    for (int r = 0; r < ROWS; r++)
                        acc[r * JB + jj] += ps[r * NB + b] * code;
                }
            }
            for (int r = 0; r < ROWS; r++)
                for (int jj = 0; jj < JB; jj++)
                    out[r * HEAD_DIM + g * GROUP_SIZE + jb + jj] += hsum(acc[r * JB + jj]) + zsum[r];
        }
    }
#if SCHEME == KVQ_SCHEME_KIVI
    for (int t = max(qv, t_lo); t < t_hi; t++) {
        size_t row = (size_t)fp_row(PAGES, kh, t, fp_slots, ring, n_sink);
        int i = t - base;
        for (int d = 0; d < HEAD_DIM; d++) {
            float v = vload_half(row + d, vfp);
            for (int r = 0; r < ROWS; r++)
                out[r * HEAD_DIM + d] += sc[r * CHUNK + i] * v;
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
    floatv q[ROWS * (HEAD_DIM / VW)];
    int lim[ROWS];
    for (int r = 0; r < ROWS; r++) {
        size_t row = row_index(s, kh, r, n_q_heads) * HEAD_DIM;
        for (int dv = 0; dv < HEAD_DIM / VW; dv++)
            q[r * (HEAD_DIM / VW) + dv] = VLOAD(dv, qs + row);
        lim[r] = row_limit(n, r);
    }

    float sc[ROWS * CHUNK];
    long rows[CHUNK];
    float m[ROWS], l[ROWS];
    for (int r = 0; r < ROWS; r++)
        m[r] = -INFINITY;
    for (int i = 0; i < n_valid; i++) {
        int u = u_begin + i;
        int t = u < sink_end ? u : qk + (u - sink_end);
        long row = fp_row(PAGES, kh, t, fp_slots, ring, n_sink);
        rows[i] = row;
        if (row < 0) {
            for (int r = 0; r < ROWS; r++)
                sc[r * CHUNK + i] = -INFINITY;
            continue;
        }
        __global const half *krow = kfp + row;
        floatv acc[ROWS];
        for (int r = 0; r < ROWS; r++)
            acc[r] = (floatv)0.0f;
        for (int dv = 0; dv < HEAD_DIM / VW; dv++) {
            floatv k = VLOAD_HALF(dv, krow);
            for (int r = 0; r < ROWS; r++)
                acc[r] += q[r * (HEAD_DIM / VW) + dv] * k;
        }
        for (int r = 0; r < ROWS; r++) {
            float score = t < lim[r] ? hsum(acc[r]) : -INFINITY;
            sc[r * CHUNK + i] = score;
            m[r] = fmax(m[r], score);
        }
    }
    for (int r = 0; r < ROWS; r++) {
        float sum = 0.0f;
        for (int i = 0; i < n_valid; i++) {
            float p = m[r] == -INFINITY ? 0.0f : exp(sc[r * CHUNK + i] - m[r]);
            sc[r * CHUNK + i] = p;
            sum += p;
        }
        l[r] = sum;
    }
    floatv out[ROWS * (HEAD_DIM / VW)];
    for (int i = 0; i < ROWS * (HEAD_DIM / VW); i++)
        out[i] = (floatv)0.0f;
    for (int i = 0; i < n_valid; i++) {
        if (rows[i] < 0)
            continue;
        __global const half *vrow = vfp + rows[i];
        for (int dv = 0; dv < HEAD_DIM / VW; dv++) {
            floatv v = VLOAD_HALF(dv, vrow);
            for (int r = 0; r < ROWS; r++)
                out[r * (HEAD_DIM / VW) + dv] += sc[r * CHUNK + i] * v;
        }
    }
    for (int r = 0; r < ROWS; r++) {
        __global float *p = partial_of(partials, s, kh, r, slot0 + chunk, n_q_heads, n_slots);
        p[0] = m[r];
        p[1] = l[r];
        for (int dv = 0; dv < HEAD_DIM / VW; dv++)
            VSTORE(out[r * (HEAD_DIM / VW) + dv], dv, p + 2);
    }
}

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
