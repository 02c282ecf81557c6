/* Build options for kernel variants; see kernel_defines.h. */
#include "kernel_defines.h"

#include "internal.h"
#include "quant_format.h"

#include <stdio.h>
#include <string.h>

void clkvq_defines_init(clkvq_defines *d)
{
    d->text[0] = '\0';
    d->used = 0;
    d->overflow = 0;
}

void clkvq_defines_int(clkvq_defines *d, const char *name, long value)
{
    if (d->overflow)
        return;
    size_t room = sizeof d->text - d->used;
    int n = snprintf(d->text + d->used, room, "%s-D %s=%ld", d->used ? " " : "", name, value);
    if (n < 0 || (size_t)n >= room) {
        d->overflow = 1;
        return;
    }
    d->used += (size_t)n;
}

void clkvq_defines_option(clkvq_defines *d, const char *option)
{
    if (d->overflow)
        return;
    size_t room = sizeof d->text - d->used;
    int n = snprintf(d->text + d->used, room, "%s%s", d->used ? " " : "", option);
    if (n < 0 || (size_t)n >= room) {
        d->overflow = 1;
        return;
    }
    d->used += (size_t)n;
}

void clkvq_defines_format(clkvq_defines *d, const char *prefix, clkvq_format format)
{
    char name[64];
    int bits = clkvq_format_bits(format);
    snprintf(name, sizeof name, "%sBITS", prefix);
    clkvq_defines_int(d, name, bits);
    snprintf(name, sizeof name, "%sTERNARY", prefix);
    clkvq_defines_int(d, name, bits == 0);
    snprintf(name, sizeof name, "%sLEVELS", prefix);
    clkvq_defines_int(d, name, clkvq_format_get(format)->levels);
}

void clkvq_defines_params(clkvq_defines *d, clkvq_param_type type, clkvq_zero_mode zero_mode)
{
    clkvq_defines_int(d, "PARAM_FP8", type == CLKVQ_PARAM_FP8_E4M3);
    clkvq_defines_int(d, "ZERO_INT", zero_mode == CLKVQ_ZERO_INT);
}

const char *clkvq_defines_get(clkvq_context *ctx, const clkvq_defines *d)
{
    if (d->overflow) {
        clkvq_fail(ctx, CLKVQ_ERR_BUILD, "kernel build options exceed %d bytes",
                   CLKVQ_DEFINES_MAX);
        return NULL;
    }
    return d->text;
}
