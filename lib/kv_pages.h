/*
 * The page pools of the KV cache: block tables, reference counts, the free
 * list, copy-on-write and forks. kv_cache.c calls these around its kernels;
 * the placement of tokens inside a page is clkvq_packing.h's.
 *
 * Ownership: in a paged cache (block_size given) a layer's pages are taken
 * from its pool when an append first writes a token into them and returned
 * when truncation leaves no packed token in them. A page held by several
 * sequences (after clkvq_cache_fork) is copied before a write (copy on
 * write). The contiguous cache owns one page per sequence from creation.
 * With runtime tables nothing here allocates: the runtime's table is used.
 *
 * Failure: reserving pages either succeeds for every page or changes
 * nothing (CLKVQ_ERR_OUT_OF_BLOCKS); a reservation is undone with
 * clkvq_pages_rollback when a later step of the same call fails.
 */
#ifndef CLKVQ_KV_PAGES_H
#define CLKVQ_KV_PAGES_H

#include "kv_cache.h"

/* Allocates layer l's pool bookkeeping and table buffer (the contiguous
 * cache: page s for sequence s). */
clkvq_status clkvq_pages_init(clkvq_cache *cache, int l);
void clkvq_pages_release(clkvq_page_pool *pool);

/* What a reservation changed, to undo it. */
typedef struct {
    int layer, seq;
    int n;
    int *block;     /* logical block of the sequence */
    int *old_page;  /* -1 if the block had no page */
    int *new_page;
} clkvq_page_undo;

/*
 * Makes the pages of tokens [t0, t1) of seq in layer l writable: allocates
 * missing pages and copies shared ones (enqueued page copies). Nothing to
 * do for the contiguous cache or runtime tables.
 */
clkvq_status clkvq_pages_reserve(clkvq_cache *cache, int l, int seq, int t0, int t1,
                                 clkvq_page_undo *undo);
void clkvq_pages_rollback(clkvq_cache *cache, clkvq_page_undo *undo);
void clkvq_pages_undo_free(clkvq_page_undo *undo);

/* Returns the pages of seq whose tokens all lie at or after t_keep. */
void clkvq_pages_drop_from(clkvq_cache *cache, int l, int seq, int t_keep);

/* Shares seq_src's pages with the empty seq_dst (reference counts). */
void clkvq_pages_share(clkvq_cache *cache, int l, int seq_src, int seq_dst);

/* Enqueues copies of page src to page dst of every pool of layer l. */
clkvq_status clkvq_pages_copy(clkvq_cache *cache, int l, int src, int dst);

#endif
