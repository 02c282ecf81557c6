/* Decode tunables against a shape and a device; see attn_fit.h. */
#include "attn_fit.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

static clkvq_status why_not(clkvq_status st, char *why, size_t why_size, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static clkvq_status why_not(clkvq_status st, char *why, size_t why_size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, why_size, fmt, ap);
    va_end(ap);
    return st;
}

static int is_pow2(int x) { return x > 0 && (x & (x - 1)) == 0; }

size_t clkvq_attn_local_bytes(const clkvq_attn_tuning *t, int rows, int head_dim)
{
    /* queries and their group sums, the chunk's scores, the reduction per
     * row; a page row per token */
    return sizeof(float) * (size_t)rows *
               ((size_t)head_dim * 2 + (size_t)t->chunk + (size_t)t->wgs) +
           sizeof(int64_t) * (size_t)t->chunk;
}

clkvq_status clkvq_attn_tuning_check(const clkvq_attn_tuning *t, const clkvq_attn_fit_shape *s,
                                     const clkvq_device_info *dev, char *why, size_t why_size)
{
    const clkvq_status bad = CLKVQ_ERR_INVALID_ARG;
    if (t->variant != CLKVQ_ATTN_COOPERATIVE && t->variant != CLKVQ_ATTN_SERIAL)
        return why_not(bad, why, why_size, "attention variant %d is neither cooperative nor serial",
                       (int)t->variant);
    for (int i = 0; i < 2; i++) {
        clkvq_layout layout = i ? s->layout_v : s->layout_k;
        if (layout != CLKVQ_LAYOUT_TOKEN_MAJOR && layout != CLKVQ_LAYOUT_GROUP_PLANAR)
            return why_not(bad, why, why_size, "layout_%c %d is neither token-major nor planar",
                           i ? 'v' : 'k', (int)layout);
    }
    /* both variants are compiled into one program: every field must build */
    if (t->vw != 4 && t->vw != 8 && t->vw != 16)
        return why_not(bad, why, why_size, "vw %d must be 4, 8 or 16", t->vw);
    if (!is_pow2(t->wgs) || t->wgs > 65536)
        return why_not(bad, why, why_size, "wgs %d must be a power of two up to 65536", t->wgs);
    int step = t->variant == CLKVQ_ATTN_SERIAL ? t->vw : t->wgs;
    if (t->chunk <= 0 || t->chunk > (1 << 24) || t->chunk % step != 0)
        return why_not(bad, why, why_size, "chunk %d must be a positive multiple of %s %d",
                       t->chunk, t->variant == CLKVQ_ATTN_SERIAL ? "vw" : "wgs", step);
    if (t->variant == CLKVQ_ATTN_SERIAL) {
        if (s->packed && (s->layout_k != CLKVQ_LAYOUT_GROUP_PLANAR ||
                          s->layout_v != CLKVQ_LAYOUT_GROUP_PLANAR))
            return why_not(CLKVQ_ERR_UNSUPPORTED, why, why_size,
                           "the serial variant reads group-planar packed layouts; these are "
                           "token-major");
        return CLKVQ_OK;
    }
    if (!dev)
        return CLKVQ_OK;
    if ((size_t)t->wgs > dev->max_work_group_size)
        return why_not(CLKVQ_ERR_DEVICE_LIMIT, why, why_size, "wgs %d exceeds the device's %zu",
                       t->wgs, dev->max_work_group_size);
    int rows = s->qpk * (s->n_queries > 0 ? s->n_queries : 1);
    size_t local = clkvq_attn_local_bytes(t, rows, s->head_dim);
    if (local > dev->local_mem_bytes)
        return why_not(CLKVQ_ERR_DEVICE_LIMIT, why, why_size,
                       "chunk %d x %d query rows needs %zu bytes of local memory, the device "
                       "has %llu",
                       t->chunk, rows, local, (unsigned long long)dev->local_mem_bytes);
    return CLKVQ_OK;
}
