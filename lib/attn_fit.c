/* Decode tunables against a shape and a device; see attn_fit.h. */
#include "attn_fit.h"

#include "quant_format.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

/* Query rows one cooperative work-group serves at most (the kernel's
 * per-row rounds and accumulators are unrolled up to this). */
#define MAX_RB 8
/* Accumulators per work-item the automatic V width keeps within: 64
 * floats, a quarter of a GPU lane's registers. */
#define AUTO_ACCUMULATORS 64
#define MERGE_WGS 64

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
static int ceil_div(int a, int b) { return (a + b - 1) / b; }

int clkvq_format_unit_words(clkvq_format format)
{
    int bits = clkvq_format_bits(format);
    return bits ? bits / (bits & -bits) : 1;
}

int clkvq_format_unit_codes(clkvq_format format, int words)
{
    int bits = clkvq_format_bits(format);
    return bits ? 32 * words / bits : 20 * words;
}

/* The decode kernel's local arrays (attention_coop.cl). */
static size_t coop_local_bytes(const clkvq_attn_coop_plan *p, int head_dim, int n_groups, int ns)
{
    size_t tile = (size_t)p->wgs * p->tpl, rb = (size_t)p->rb, hd = (size_t)head_dim;
    size_t p_floats = tile * rb;
    if ((size_t)ns * hd > p_floats)
        p_floats = (size_t)ns * hd;
    if (rb * hd > p_floats)
        p_floats = rb * hd;
    return sizeof(float) * (rb * hd + (size_t)n_groups * rb + p_floats + rb * p->wgs + rb) +
           2 * sizeof(int32_t) * (tile / 16);
}

clkvq_status clkvq_attn_coop_plan_get(const clkvq_attn_tuning *t, const clkvq_attn_fit_shape *s,
                                      const clkvq_device_info *dev, clkvq_attn_coop_plan *plan,
                                      char *why, size_t why_size)
{
    const clkvq_status bad = CLKVQ_ERR_INVALID_ARG;
    if (!is_pow2(t->wgs) || t->wgs < 16 || t->wgs > 65536)
        return why_not(bad, why, why_size, "wgs %d must be a power of two in 16..65536", t->wgs);
    if (t->tpl != 1 && t->tpl != 2 && t->tpl != 4)
        return why_not(bad, why, why_size, "tpl %d must be 1, 2 or 4", t->tpl);
    if (t->vwpl != 0 && t->vwpl != 1 && t->vwpl != 2 && t->vwpl != 4)
        return why_not(bad, why, why_size, "vwpl %d must be 1, 2 or 4 (0: automatic)", t->vwpl);
    if (t->waves < 1 || t->waves > 64)
        return why_not(bad, why, why_size, "waves %d must be in 1..64", t->waves);
    int nq = s->n_queries > 0 ? s->n_queries : 1;
    int rows = s->qpk * nq;
    if (s->qpk < 1 || s->qpk > MAX_RB || s->head_dim <= 0 || s->group_size <= 0 ||
        s->head_dim % s->group_size != 0)
        return why_not(bad, why, why_size, "shape: %d query heads per kv head (1..%d), head_dim "
                       "%d, group %d", s->qpk, MAX_RB, s->head_dim, s->group_size);
    plan->wgs = t->wgs;
    plan->tpl = t->tpl;
    plan->waves = t->waves;
    /* rows in balanced blocks of at most MAX_RB (one query: its heads) */
    plan->n_rb = ceil_div(rows, MAX_RB);
    plan->rb = ceil_div(rows, plan->n_rb);

    /* V: units of whole words per lane, within the format's groups */
    int gw = clkvq_group_words(s->format_v, s->group_size);
    int unit = clkvq_format_unit_words(s->format_v);
    int n_groups = s->head_dim / s->group_size;
    int k = 1;
    for (int c = 4; c >= 1; c /= 2) {
        int fits = gw % (c * unit) == 0 &&
                   (t->vwpl ? c <= t->vwpl
                            : clkvq_format_unit_codes(s->format_v, c * unit) * plan->rb <=
                                  AUTO_ACCUMULATORS);
        if (fits) {
            k = c;
            break;
        }
    }
    plan->vu = k * unit;
    /* a token row's lanes must fit the work-group: wider units if not */
    while (n_groups * (gw / plan->vu) > plan->wgs && plan->vu < gw) {
        int next = plan->vu + unit;
        while (gw % next)
            next += unit;
        plan->vu = next;
    }
    if (n_groups * (gw / plan->vu) > plan->wgs)
        return why_not(bad, why, why_size, "wgs %d is less than the %d lanes a V row needs",
                       plan->wgs, n_groups * (gw / plan->vu));
    plan->mwgs = MERGE_WGS;
    if (dev && (size_t)plan->mwgs > dev->max_work_group_size) {
        plan->mwgs = 1;
        while ((size_t)plan->mwgs * 2 <= dev->max_work_group_size)
            plan->mwgs *= 2;
    }
    int lpr = n_groups * (gw / plan->vu);
    plan->local_bytes = coop_local_bytes(plan, s->head_dim, n_groups, plan->wgs / lpr);
    if (!dev)
        return CLKVQ_OK;
    /* wide units leave few lanes per token row, so many token slices whose
     * sums the split's end reduces in local memory: the automatic width
     * narrows until they fit */
    while (!t->vwpl && plan->local_bytes > dev->local_mem_bytes && plan->vu > unit) {
        int next = plan->vu - unit;
        while (gw % next)
            next -= unit;
        if (n_groups * (gw / next) > plan->wgs)
            break;
        plan->vu = next;
        lpr = n_groups * (gw / plan->vu);
        plan->local_bytes = coop_local_bytes(plan, s->head_dim, n_groups, plan->wgs / lpr);
    }
    /* several queries multiply the rows a tile keeps: a smaller tile */
    while (nq > 1 && plan->local_bytes > dev->local_mem_bytes) {
        if (plan->tpl > 1)
            plan->tpl /= 2;
        else if (plan->wgs / 2 >= 16 && lpr <= plan->wgs / 2)
            plan->wgs /= 2;
        else
            break;
        plan->local_bytes = coop_local_bytes(plan, s->head_dim, n_groups, plan->wgs / lpr);
    }
    if ((size_t)plan->wgs > dev->max_work_group_size)
        return why_not(CLKVQ_ERR_DEVICE_LIMIT, why, why_size, "wgs %d exceeds the device's %zu",
                       plan->wgs, dev->max_work_group_size);
    if (plan->local_bytes > dev->local_mem_bytes)
        return why_not(CLKVQ_ERR_DEVICE_LIMIT, why, why_size,
                       "a tile of %d x %d tokens for %d query rows needs %zu bytes of local "
                       "memory, the device has %llu",
                       plan->wgs, plan->tpl, plan->rb, plan->local_bytes,
                       (unsigned long long)dev->local_mem_bytes);
    return CLKVQ_OK;
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
    if (t->variant == CLKVQ_ATTN_COOPERATIVE) {
        clkvq_attn_coop_plan plan;
        return clkvq_attn_coop_plan_get(t, s, dev, &plan, why, why_size);
    }
    if (t->vw != 4 && t->vw != 8 && t->vw != 16)
        return why_not(bad, why, why_size, "vw %d must be 4, 8 or 16", t->vw);
    if (t->chunk <= 0 || t->chunk > (1 << 24) || t->chunk % t->vw != 0)
        return why_not(bad, why, why_size, "chunk %d must be a positive multiple of vw %d",
                       t->chunk, t->vw);
    if (s->packed && (s->layout_k != CLKVQ_LAYOUT_GROUP_PLANAR ||
                      s->layout_v != CLKVQ_LAYOUT_GROUP_PLANAR))
        return why_not(CLKVQ_ERR_UNSUPPORTED, why, why_size,
                       "the serial variant reads group-planar packed layouts; these are "
                       "token-major");
    return CLKVQ_OK;
}
