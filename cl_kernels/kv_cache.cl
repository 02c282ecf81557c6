/*
 * KV cache maintenance: quantizing tokens that leave the fp16 window into
 * their pages, fp16 stores, read-back and truncation. Built after
 * quant_common.cl; clkvq_packing.h defines pages, placement and regions.
 *
 * Extra build options:
 *   -D AXIS_CHANNEL=0|1  per-channel groups along tokens (KIVI keys)
 *   -D LAYOUT=0|1        KVQ_LAYOUT_TOKEN_MAJOR or _GROUP_PLANAR (token axis)
 *   -D FP_PAGED=0|1      fp16 rows in pages (the fp16 scheme) or in the
 *                        per-sequence rings of sinks and recent tokens
 * Every kernel takes the block table and the store geometry (GEOM_ARGS) as
 * run-time arguments.
 */

#define GEOM_ARGS                                                                          \
    __global const int *table, int n_heads, int head_dim, int block_size, int group_size,  \
        int group_words, int n_groups, int fp_slots, int ring, int n_sink, int seq,        \
        int max_blocks
#define GEOM()                                                                             \
    geom_make(table, n_heads, head_dim, block_size, group_size, group_words, n_groups,     \
              fp_slots, ring, n_sink, seq, max_blocks)

typedef struct {
    __global const int *table; /* [n_seqs][max_blocks] page ids */
    int n_heads, head_dim, block_size, group_size, group_words, n_groups;
    int fp_slots, ring, n_sink, seq, max_blocks;
} cache_geom;

inline cache_geom geom_make(__global const int *table, int n_heads, int head_dim,
                            int block_size, int group_size, int group_words, int n_groups,
                            int fp_slots, int ring, int n_sink, int seq, int max_blocks)
{
    cache_geom g = {table,    n_heads, head_dim, block_size, group_size, group_words,
                    n_groups, fp_slots, ring,    n_sink,     seq,        max_blocks};
    return g;
}

typedef struct {
    size_t base;   /* word index of word 0 of the group */
    size_t stride; /* words between consecutive words of the group */
} group_ref;

/* Row hb = page * n_heads + h of token t's page (clkvq_packing.h). */
inline size_t page_row(cache_geom g, int h, int t)
{
    return (size_t)kvq_page_of(g.table, g.seq, g.max_blocks, t, g.block_size) * g.n_heads + h;
}

/* The packed group holding channel c of token t (packed channel order). */
inline group_ref locate_group(cache_geom g, int h, int t, int c, int *j)
{
    size_t hb = page_row(g, h, t);
    int o = t % g.block_size;
    group_ref ref;
#if AXIS_CHANNEL
    ref.base = kvq_channel_group_word(hb, o, c, g.block_size, g.group_size, g.head_dim,
                                      g.group_words);
    ref.stride = 1;
    *j = o % g.group_size;
#else
    ref.base = kvq_token_group_word(LAYOUT, hb, o, c / g.group_size, g.block_size, g.n_groups,
                                    g.group_words);
    ref.stride = kvq_token_word_step(LAYOUT, g.block_size);
    *j = c % g.group_size;
#endif
    return ref;
}

/* Index of the parameter entry of the group holding (t, c). */
inline size_t locate_param(cache_geom g, int h, int t, int c)
{
    size_t hb = page_row(g, h, t);
    int o = t % g.block_size;
#if AXIS_CHANNEL
    return kvq_channel_param(hb, o, c, g.block_size, g.group_size, g.head_dim);
#else
    return kvq_token_param(LAYOUT, hb, o, c / g.group_size, g.block_size, g.n_groups);
#endif
}

/* fp16 row of token t: in its page (fp16 scheme) or its ring slot. */
inline size_t fp_row(cache_geom g, int h, int t)
{
#if FP_PAGED
    return (page_row(g, h, t) * g.block_size + t % g.block_size) * g.head_dim;
#else
    return (((size_t)g.seq * g.n_heads + h) * g.fp_slots + kvq_fp_slot(t, g.ring, g.n_sink)) *
           g.head_dim;
#endif
}

/* Code j of a packed group (words may be strided). */
uint group_code(__global const uint *codes, group_ref ref, int j)
{
    size_t w = ref.base + (size_t)KVQ_WORD_OF(j, BITS) * ref.stride;
    uint hi = KVQ_STRADDLES(j, BITS) ? codes[w + ref.stride] : 0u;
    return KVQ_CODE(codes[w], hi, j, BITS);
}

float packed_value(__global const uint *codes, __global const uchar *params, cache_geom g, int h,
                   int t, int c)
{
    int j;
    group_ref ref = locate_group(g, h, t, c, &j);
    __global const uchar *param = params + locate_param(g, h, t, c) * PARAM_BYTES;
    float2 sz = (float2)(get_param(param, 0), get_param(param, 1));
    return value_of(group_code(codes, ref, j), sz);
}

/* ------------------------------------------------------------ append: quantize
 * Tokens t_first + r (r < n_stage) are quantized straight from where they
 * are: the fp16 store for t < n_old (old rows leaving the window), else the
 * new input row t - n_old (model channel order, gathered through perm into
 * packed order). The in-order queue runs this before the fp16 store of the
 * new tokens, which may overwrite those old rows. */

typedef struct {
    __global const half *fp; /* fp16 row, or 0 */
    __global const float *x; /* input row when fp is 0 */
    __global const int *pr;  /* its permutation row, or 0 */
} row_src;

__attribute__((always_inline)) row_src stage_row(__global const half *fp, __global const float *in,
                                                 __global const int *perm, cache_geom g, int h,
                                                 int t, int n_old, int n_in)
{
    int head_dim = g.head_dim;
    row_src r;
    if (t < n_old) {
        r.fp = fp + fp_row(g, h, t);
        r.x = (__global const float *)0;
        r.pr = (__global const int *)0;
    } else {
        r.fp = (__global const half *)0;
        r.x = in + ((size_t)h * n_in + (t - n_old)) * head_dim;
        r.pr = perm ? perm + (size_t)h * head_dim : (__global const int *)0;
    }
    return r;
}

/* Packed channels c..c+15 of a staged row. */
__attribute__((always_inline)) float16 row_load16(row_src r, int c)
{
    if (r.fp)
        return f16_bits_to_f32_16(convert_uint16(vload16(0, (__global const ushort *)r.fp + c)));
    if (!r.pr)
        return vload16(0, r.x + c);
    int16 i = vload16(0, r.pr + c);
    return (float16)(r.x[i.s0], r.x[i.s1], r.x[i.s2], r.x[i.s3], r.x[i.s4], r.x[i.s5], r.x[i.s6], r.x[i.s7], r.x[i.s8], r.x[i.s9], r.x[i.sa], r.x[i.sb], r.x[i.sc], r.x[i.sd], r.x[i.se], r.x[i.sf]);
}

inline float row_load1(row_src r, int c)
{
    if (r.fp)
        return vload_half(c, r.fp);
    return r.x[r.pr ? r.pr[c] : c];
}

/* min/max of channels [c0, c0 + n) of a row (n a multiple of 16); a zero
 * extreme is the first zero of the group, as the reference's scan keeps it. */
__attribute__((always_inline)) float2 row_range(row_src r, int c0, int n)
{
    float16 lo16 = (float16)INFINITY, hi16 = (float16)(-INFINITY);
    for (int k = 0; k < n; k += 16) {
        float16 v = row_load16(r, c0 + k);
        lo16 = VMIN(lo16, v);
        hi16 = VMAX(hi16, v);
    }
    float lo = hmin16(lo16), hi = hmax16(hi16);
    if (lo == 0.0f || hi == 0.0f) {
        int lo_done = lo != 0.0f, hi_done = hi != 0.0f;
        for (int j = 0; j < n && !(lo_done && hi_done); j++) {
            float e = row_load1(r, c0 + j);
            if (!lo_done && e == lo) {
                lo = e;
                lo_done = 1;
            }
            if (!hi_done && e == hi) {
                hi = e;
                hi_done = 1;
            }
        }
    }
    return (float2)(lo, hi);
}

/* Codes of group [c0, c0 + group_size) of a row into the words of ref. */
__attribute__((always_inline)) void row_pack(row_src r, int c0, int group_size,
                                             int group_words, float2 sz,
                                             __global uint *codes, group_ref ref)
{
#if !TERNARY
    for (int k = 0; k < group_size; k += 32) {
        uint16 a = codes_of16(row_load16(r, c0 + k), sz);
        uint16 b = codes_of16(row_load16(r, c0 + k + 16), sz);
        store_words32(codes + ref.base + (size_t)(k / 32) * BITS * ref.stride, ref.stride, a, b);
    }
#else
    /* 80 codes = 16 trit bytes = 4 words; the last word may be partial */
    for (int k = 0; k < group_size; k += 80) {
        uint16 c[5];
        for (int q = 0; q < 5; q++)
            c[q] = k + 16 * q < group_size ? codes_of16(row_load16(r, c0 + k + 16 * q), sz)
                                           : (uint16)0;
        uint4 w = as_uint4(convert_uchar16(trit_bytes80(c[0], c[1], c[2], c[3], c[4])));
        uint wa[4];
        vstore4(w, 0, wa);
        int w0 = k / 20, nw = min(4, group_words - w0);
        for (int i = 0; i < nw; i++)
            codes[ref.base + (size_t)(w0 + i) * ref.stride] = wa[i];
    }
#endif
}

/* One work-item per 16 consecutive (head, staged token, channel group)
 * groups: their min/max, parameters as 16 lanes, then codes 16 at a time. */
__kernel void clkvq_cache_quantize_token(__global const half *fp, __global const float *in,
                                         __global const int *perm, __global uint *codes,
                                         __global uchar *params, GEOM_ARGS, float alpha,
                                         int t_first, int n_stage, int n_old, int n_in)
{
    cache_geom g = GEOM();
    int n_all = n_heads * n_stage * n_groups;
    int g0 = (int)get_global_id(0) * 16;
    if (g0 >= n_all)
        return;
    int count = min(16, n_all - g0);
    int row0 = g0 / n_groups, gr0 = g0 % n_groups;
    int h0 = row0 / n_stage, r0 = row0 % n_stage;

    float lo[16], hi[16];
    int h = h0, r = r0, gr = gr0;
    for (int i = 0; i < count; i++) {
        row_src src = stage_row(fp, in, perm, g, h, t_first + r, n_old, n_in);
        float2 lh = row_range(src, gr * group_size, group_size);
        lo[i] = lh.x;
        hi[i] = lh.y;
        if (++gr == n_groups) {
            gr = 0;
            if (++r == n_stage) {
                r = 0;
                h++;
            }
        }
    }
    for (int i = count; i < 16; i++)
        lo[i] = hi[i] = 0.0f;
    float16 s16, z16;
    uint16 entry16;
    group_params16(vload16(0, lo), vload16(0, hi), alpha, &entry16, &s16, &z16);
    float s[16], z[16];
    uint entry[16];
    vstore16(s16, 0, s);
    vstore16(z16, 0, z);
    vstore16(entry16, 0, entry);

    h = h0;
    r = r0;
    gr = gr0;
    for (int i = 0; i < count; i++) {
        int t = t_first + r, c0 = gr * group_size;
        size_t pidx = locate_param(g, h, t, c0);
#if PARAM_FP8
        ((__global ushort *)params)[pidx] = (ushort)entry[i];
#else
        ((__global uint *)params)[pidx] = entry[i];
#endif
        int j0;
        group_ref ref = locate_group(g, h, t, c0, &j0);
        row_src src = stage_row(fp, in, perm, g, h, t, n_old, n_in);
        row_pack(src, c0, group_size, group_words, (float2)(s[i], z[i]), codes, ref);
        if (++gr == n_groups) {
            gr = 0;
            if (++r == n_stage) {
                r = 0;
                h++;
            }
        }
    }
}

/* One work-item per (head, block of group_size tokens touching the staged
 * range): rows are read in order, 16 channels per vector, each lane the
 * reference's sequential scan of its channel's group (head_dim <= 256, a
 * multiple of 32). Blocks sit at multiples of group_size; the staged range
 * ends on a block edge and starts on one, except for a first block that
 * begins after the sinks (skvq): only its tokens from t_first are grouped,
 * and the slots before them hold code 0. */
__kernel void clkvq_cache_quantize_channel(__global const half *fp, __global const float *in,
                                           __global const int *perm, __global uint *codes,
                                           __global uchar *params, GEOM_ARGS, float alpha,
                                           int t_first, int n_stage, int n_old, int n_in)
{
    cache_geom g = GEOM();
    int gid = (int)get_global_id(0);
    int b_first = t_first / group_size;
    int n_stage_blocks = (t_first + n_stage + group_size - 1) / group_size - b_first;
    if (gid >= n_heads * n_stage_blocks)
        return;
    int bb = gid % n_stage_blocks, h = gid / n_stage_blocks;
    int t0 = (b_first + bb) * group_size;
    int j_lo = max(t_first - t0, 0); /* the first valid token of the block */
    int n_chunks = head_dim / 16;

    float16 lo[16], hi[16], s[16], z[16];
    for (int cc = 0; cc < n_chunks; cc++) {
        lo[cc] = (float16)INFINITY;
        hi[cc] = (float16)(-INFINITY);
    }
    for (int j = j_lo; j < group_size; j++) {
        row_src src = stage_row(fp, in, perm, g, h, t0 + j, n_old, n_in);
        for (int cc = 0; cc < n_chunks; cc++) {
            float16 v = row_load16(src, cc * 16);
            lo[cc] = VMIN(lo[cc], v);
            hi[cc] = VMAX(hi[cc], v);
        }
    }
    size_t p0 = locate_param(g, h, t0, 0);
    for (int cc = 0; cc < n_chunks; cc++) {
        uint16 entry;
        group_params16(lo[cc], hi[cc], alpha, &entry, &s[cc], &z[cc]);
        store_params16(params + (p0 + cc * 16) * PARAM_BYTES, entry, 16);
    }
    int j0;
    group_ref ref0 = locate_group(g, h, t0, 0, &j0);
    __global uint *words0 = codes + ref0.base; /* channel c's words at c * group_words */

    uint16 acc[16];
    for (int cc = 0; cc < n_chunks; cc++)
        acc[cc] = (uint16)0;
#if !TERNARY
    int n_bits = 0, w = 0;
#endif
    for (int j = 0; j < group_size; j++) {
        row_src src = stage_row(fp, in, perm, g, h, t0 + max(j, j_lo), n_old, n_in);
#if !TERNARY
        int full = n_bits + BITS >= 32;
#else
        int full = j % 20 == 19 || j == group_size - 1;
        uint weight = KVQ_POW3(j % 5) << (8 * ((j / 5) % 4));
#endif
        for (int cc = 0; cc < n_chunks; cc++) {
            uint16 code = j < j_lo ? (uint16)0u
                                   : codes_of16v(row_load16(src, cc * 16), s[cc], z[cc]);
#if !TERNARY
            uint16 a = acc[cc] | (code << (uint)n_bits);
            if (full) {
                store_lanes(words0 + (size_t)cc * 16 * group_words, group_words, w, a);
                a = code >> (uint)(32 - n_bits);
            }
#else
            uint16 a = acc[cc] + code * weight;
            if (full) {
                store_lanes(words0 + (size_t)cc * 16 * group_words, group_words, j / 20, a);
                a = (uint16)0;
            }
#endif
            acc[cc] = a;
        }
#if !TERNARY
        n_bits += BITS;
        if (full) {
            n_bits -= 32;
            w++;
        }
#endif
    }
}

/* New tokens that stay in fp16 (sinks and the recent window; every token
 * of the fp16 scheme). */
__kernel void clkvq_cache_store_fp16(__global const float *in, __global const int *perm,
                                     __global half *fp, GEOM_ARGS, int n_old, int n_in,
                                     int q_end_new)
{
    /* one work-item per (head, new token) row, 16 channels at a time with the
     * exact integer fp16 conversion (PoCL's vstore_half is scalar and slow,
     * and an item per element paid its overhead head_dim times) */
    cache_geom g = GEOM();
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * n_in)
        return;
    int i = gid % n_in, h = gid / n_in;
    int t = n_old + i;
    if (t >= n_sink && t < q_end_new)
        return;
    __global const float *src = in + ((size_t)h * n_in + i) * head_dim;
    __global ushort *dst = (__global ushort *)fp + fp_row(g, h, t);
    __global const int *hperm = perm ? perm + h * head_dim : 0;
    for (int c0 = 0; c0 < head_dim; c0 += 16) {
        float16 x;
        if (hperm) {
            float lanes[16];
            for (int l = 0; l < 16; l++)
                lanes[l] = src[hperm[c0 + l]];
            x = vload16(0, lanes);
        } else {
            x = vload16(0, src + c0);
        }
        vstore16(convert_ushort16(f32_to_f16_bits16(x)), 0, dst + c0);
    }
}

/* out[h][r][c'] for tokens t_from + r, c' the model channel (unpermuted). */
__kernel void clkvq_cache_read(__global const uint *codes, __global const uchar *params,
                               __global const half *fp, __global const int *perm,
                               __global float *out, GEOM_ARGS, int n_tokens, int q_end,
                               int t_from, int t_count)
{
    cache_geom g = GEOM();
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * t_count * head_dim)
        return;
    int c = gid % head_dim, r = (gid / head_dim) % t_count, h = gid / (head_dim * t_count);
    int t = t_from + r;
    float value;
    if (t < kvq_sink_end(n_tokens, n_sink) || t >= q_end)
        value = vload_half(fp_row(g, h, t) + c, fp);
    else
        value = packed_value(codes, params, g, h, t, c);
    int dst = perm ? perm[h * head_dim + c] : c;
    out[((size_t)h * t_count + r) * head_dim + dst] = value;
}

/* Truncation: packed tokens that fall back into the window get fp16 rows. */
__kernel void clkvq_cache_refill_fp16(__global const uint *codes, __global const uchar *params,
                                      __global half *fp, GEOM_ARGS, int t_from, int t_count)
{
    cache_geom g = GEOM();
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * t_count * head_dim)
        return;
    int c = gid % head_dim, r = (gid / head_dim) % t_count, h = gid / (head_dim * t_count);
    int t = t_from + r;
    float value = packed_value(codes, params, g, h, t, c);
    vstore_half_rte(value, fp_row(g, h, t) + c, fp);
}

/* ------------------------------------------------------------ transforms
 * Rows of a layer that centers or rotates (clkvq_packing.h): the appended
 * rows go through the transform once, into a scratch buffer in packed
 * order that the kernels above then read without a permutation; read-back
 * maps stored rows back to the model's space. Rows of at most 256. */

/* out[h][i] = P(R(in[h][i] - mean[h])), one work-item per row. */
__kernel void clkvq_cache_transform(__global const float *in, __global const int *perm,
                                    __global const float *mean, __global float *out,
                                    int n_heads, int n_in, int head_dim, int rotate,
                                    uint rot_seed)
{
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * n_in)
        return;
    int h = gid / n_in;
    float row[256];
    __global const float *src = in + (size_t)gid * head_dim;
    for (int c = 0; c < head_dim; c++)
        row[c] = mean ? src[c] - mean[h * head_dim + c] : src[c];
    if (rotate)
        kvq_rotate(row, head_dim, rot_seed, h);
    __global float *dst = out + (size_t)gid * head_dim;
    for (int c = 0; c < head_dim; c++)
        dst[c] = row[perm ? perm[h * head_dim + c] : c];
}

/* clkvq_cache_read for transformed layers: one work-item per (head, token)
 * row, stored values unpermuted, unrotated and the mean added back. */
__kernel void clkvq_cache_read_rows(__global const uint *codes, __global const uchar *params,
                                    __global const half *fp, __global const int *perm,
                                    __global float *out, GEOM_ARGS, int n_tokens, int q_end,
                                    int t_from, int t_count, __global const float *mean,
                                    int rotate, uint rot_seed)
{
    cache_geom g = GEOM();
    int gid = (int)get_global_id(0);
    if (gid >= n_heads * t_count)
        return;
    int r = gid % t_count, h = gid / t_count;
    int t = t_from + r;
    int fp16 = t < kvq_sink_end(n_tokens, n_sink) || t >= q_end;
    float row[256];
    for (int c = 0; c < head_dim; c++) {
        float value = fp16 ? vload_half(fp_row(g, h, t) + c, fp)
                           : packed_value(codes, params, g, h, t, c);
        row[perm ? perm[h * head_dim + c] : c] = value;
    }
    if (rotate)
        kvq_unrotate(row, head_dim, rot_seed, h);
    __global float *dst = out + ((size_t)h * t_count + r) * head_dim;
    for (int c = 0; c < head_dim; c++)
        dst[c] = mean ? row[c] + mean[h * head_dim + c] : row[c];
}
