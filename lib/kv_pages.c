/* Page pools, block tables and copy-on-write; see kv_pages.h. */
#include "kv_pages.h"

#include <stdlib.h>
#include <string.h>

static int *table_of(clkvq_cache *cache, clkvq_page_pool *pool, int seq)
{
    return pool->table + (size_t)seq * cache->max_blocks;
}

clkvq_status clkvq_pages_init(clkvq_cache *cache, int l)
{
    clkvq_context *ctx = cache->ctx;
    clkvq_page_pool *pool = &cache->layers[l].pages;
    memset(pool, 0, sizeof *pool);
    if (cache->cfg.runtime_tables)
        return CLKVQ_OK;
    size_t n_entries = (size_t)cache->cfg.n_seqs * cache->max_blocks;
    pool->table = malloc(n_entries * sizeof(int));
    pool->refs = calloc((size_t)cache->n_pages, sizeof(int));
    pool->free_ids = malloc((size_t)cache->n_pages * sizeof(int));
    if (!pool->table || !pool->refs || !pool->free_ids)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating the page tables of layer %d",
                          l);
    for (size_t i = 0; i < n_entries; i++)
        pool->table[i] = -1;
    if (cache->paged) {
        /* popped from the end: page 0 is taken first */
        for (int i = 0; i < cache->n_pages; i++)
            pool->free_ids[i] = cache->n_pages - 1 - i;
        pool->n_free = cache->n_pages;
    } else {
        for (int s = 0; s < cache->cfg.n_seqs; s++) {
            pool->table[(size_t)s * cache->max_blocks] = s;
            pool->refs[s] = 1;
        }
    }
    cl_int err;
    pool->table_mem = clCreateBuffer(ctx->cl_ctx, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                                     n_entries * sizeof(cl_int), pool->table, &err);
    if (err != CL_SUCCESS) {
        pool->table_mem = NULL;
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating the block table: %s",
                          clkvq_cl_error_name(err));
    }
    return CLKVQ_OK;
}

void clkvq_pages_release(clkvq_page_pool *pool)
{
    if (pool->table_mem)
        clReleaseMemObject(pool->table_mem);
    free(pool->table);
    free(pool->refs);
    free(pool->free_ids);
    memset(pool, 0, sizeof *pool);
}

clkvq_status clkvq_cache_table(clkvq_cache *cache, int l, cl_mem *table, int *max_blocks)
{
    if (cache->cfg.runtime_tables) {
        if (!cache->rt_table)
            return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG,
                              "this cache's pages belong to the runtime, and no block table "
                              "was given yet (clkvq_cache_append_paged)");
        *table = cache->rt_table;
        *max_blocks = cache->rt_max_blocks;
        return CLKVQ_OK;
    }
    clkvq_page_pool *pool = &cache->layers[l].pages;
    if (pool->dirty) {
        /* blocking: the host table may change again right after */
        size_t bytes = (size_t)cache->cfg.n_seqs * cache->max_blocks * sizeof(cl_int);
        cl_int err = clEnqueueWriteBuffer(cache->ctx->queue, pool->table_mem, CL_TRUE, 0, bytes,
                                          pool->table, 0, NULL, NULL);
        if (err != CL_SUCCESS)
            return clkvq_cl_fail(cache->ctx, err, "uploading the block table");
        pool->dirty = 0;
    }
    *table = pool->table_mem;
    *max_blocks = cache->max_blocks;
    return CLKVQ_OK;
}

static clkvq_status copy_range(clkvq_context *ctx, cl_mem buf, size_t page_bytes, int src,
                               int dst)
{
    if (!buf || !page_bytes)
        return CLKVQ_OK;
    cl_int err = clEnqueueCopyBuffer(ctx->queue, buf, buf, (size_t)src * page_bytes,
                                     (size_t)dst * page_bytes, page_bytes, 0, NULL, NULL);
    return err == CL_SUCCESS ? CLKVQ_OK : clkvq_cl_fail(ctx, err, "copying a page");
}

clkvq_status clkvq_pages_copy(clkvq_cache *cache, int l, int src, int dst)
{
    clkvq_cache_layer *layer = &cache->layers[l];
    clkvq_status st = CLKVQ_OK;
    for (int i = 0; i < 2 && st == CLKVQ_OK; i++) {
        clkvq_tensor_store *ts = i ? &layer->v : &layer->k;
        if ((st = copy_range(cache->ctx, ts->codes, ts->page_codes, src, dst)) == CLKVQ_OK &&
            (st = copy_range(cache->ctx, ts->params, ts->page_params, src, dst)) == CLKVQ_OK)
            st = copy_range(cache->ctx, ts->fp, ts->page_fp, src, dst);
    }
    return st;
}

static void unref(clkvq_page_pool *pool, int page)
{
    if (--pool->refs[page] == 0)
        pool->free_ids[pool->n_free++] = page;
}

void clkvq_pages_undo_free(clkvq_page_undo *undo)
{
    free(undo->block);
    free(undo->old_page);
    free(undo->new_page);
    memset(undo, 0, sizeof *undo);
}

clkvq_status clkvq_pages_reserve(clkvq_cache *cache, int l, int seq, int t0, int t1,
                                 clkvq_page_undo *undo)
{
    memset(undo, 0, sizeof *undo);
    undo->layer = l;
    undo->seq = seq;
    if (!cache->paged || cache->cfg.runtime_tables || t1 <= t0)
        return CLKVQ_OK;
    clkvq_page_pool *pool = &cache->layers[l].pages;
    int *table = table_of(cache, pool, seq);
    int b0 = t0 / cache->block_size, b1 = (t1 - 1) / cache->block_size;
    int need = 0;
    for (int b = b0; b <= b1; b++)
        need += table[b] < 0 || pool->refs[table[b]] > 1;
    if (need == 0)
        return CLKVQ_OK;
    if (need > pool->n_free)
        return clkvq_fail(cache->ctx, CLKVQ_ERR_OUT_OF_BLOCKS,
                          "layer %d: sequence %d needs %d more page(s) of %d tokens, the pool has "
                          "%d free of %d; nothing was appended",
                          l, seq, need, cache->block_size, pool->n_free, cache->n_pages);
    undo->block = malloc((size_t)need * sizeof(int));
    undo->old_page = malloc((size_t)need * sizeof(int));
    undo->new_page = malloc((size_t)need * sizeof(int));
    if (!undo->block || !undo->old_page || !undo->new_page) {
        clkvq_pages_undo_free(undo);
        return clkvq_fail(cache->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "allocating a page reservation");
    }
    clkvq_status st = CLKVQ_OK;
    for (int b = b0; b <= b1 && st == CLKVQ_OK; b++) {
        int old = table[b];
        if (old >= 0 && pool->refs[old] == 1)
            continue;
        int page = pool->free_ids[--pool->n_free];
        pool->refs[page] = 1;
        undo->block[undo->n] = b;
        undo->old_page[undo->n] = old;
        undo->new_page[undo->n] = page;
        undo->n++;
        if (old >= 0) { /* shared: this sequence gets its own copy */
            st = clkvq_pages_copy(cache, l, old, page);
            pool->refs[old]--;
        }
        table[b] = page;
        pool->dirty = 1;
    }
    if (st != CLKVQ_OK) {
        clkvq_pages_rollback(cache, undo);
        clkvq_pages_undo_free(undo);
    }
    return st;
}

void clkvq_pages_rollback(clkvq_cache *cache, clkvq_page_undo *undo)
{
    if (!undo->n)
        return;
    clkvq_page_pool *pool = &cache->layers[undo->layer].pages;
    int *table = table_of(cache, pool, undo->seq);
    for (int i = undo->n - 1; i >= 0; i--) {
        table[undo->block[i]] = undo->old_page[i];
        if (undo->old_page[i] >= 0)
            pool->refs[undo->old_page[i]]++;
        unref(pool, undo->new_page[i]);
    }
    pool->dirty = 1;
    undo->n = 0;
}

void clkvq_pages_drop_from(clkvq_cache *cache, int l, int seq, int t_keep)
{
    if (!cache->paged || cache->cfg.runtime_tables)
        return;
    clkvq_page_pool *pool = &cache->layers[l].pages;
    int *table = table_of(cache, pool, seq);
    int b0 = (t_keep + cache->block_size - 1) / cache->block_size;
    for (int b = b0; b < cache->max_blocks; b++) {
        if (table[b] < 0)
            continue;
        unref(pool, table[b]);
        table[b] = -1;
        pool->dirty = 1;
    }
}

void clkvq_pages_share(clkvq_cache *cache, int l, int seq_src, int seq_dst)
{
    clkvq_page_pool *pool = &cache->layers[l].pages;
    int *src = table_of(cache, pool, seq_src), *dst = table_of(cache, pool, seq_dst);
    for (int b = 0; b < cache->max_blocks; b++) {
        dst[b] = src[b];
        if (src[b] >= 0)
            pool->refs[src[b]]++;
    }
    pool->dirty = 1;
}

clkvq_status clkvq_cache_pool_stats(const clkvq_cache *cache, int l, clkvq_pool_stats *out)
{
    if (!cache || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_cache_pool_stats: NULL argument");
    if (l < 0 || l >= cache->cfg.n_layers)
        return clkvq_fail(cache->ctx, CLKVQ_ERR_INVALID_ARG, "layer %d is outside 0..%d", l,
                          cache->cfg.n_layers - 1);
    /* a split layer's shares hold the same page ids (one per token block
     * across all of them): bytes add up, counts are the first share's */
    const clkvq_cache_layer *layer = clkvq_cache_share(cache, l, 0);
    memset(out, 0, sizeof *out);
    out->block_size = cache->block_size;
    out->n_blocks = cache->n_pages;
    for (int s = 0; s < clkvq_cache_n_shares(cache, l); s++)
        for (int i = 0; i < 2; i++) {
            const clkvq_cache_layer *share = clkvq_cache_share(cache, l, s);
            const clkvq_tensor_store *ts = i ? &share->v : &share->k;
            out->block_bytes += ts->page_codes + ts->page_params + ts->page_fp;
        }
    if (cache->cfg.runtime_tables) {
        out->used_blocks = out->free_blocks = out->shared_blocks = -1;
        return CLKVQ_OK;
    }
    for (int p = 0; p < cache->n_pages; p++) {
        out->used_blocks += layer->pages.refs[p] > 0;
        out->shared_blocks += layer->pages.refs[p] > 1;
    }
    out->free_blocks = cache->n_pages - out->used_blocks;
    return CLKVQ_OK;
}
