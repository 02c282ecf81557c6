/*
 * Build options for kernel variants, written in one place (the role of
 * CLBlast's Database::GetDefines): a program variant is a list of -D
 * NAME=value pairs, and a format reaches the kernels as its properties
 * from the format table (<prefix>BITS, <prefix>TERNARY, <prefix>LEVELS),
 * never as its number, so adding a format needs no kernel switch.
 */
#ifndef CLKVQ_KERNEL_DEFINES_H
#define CLKVQ_KERNEL_DEFINES_H

#include "clkvq.h"

#include <stddef.h>

#define CLKVQ_DEFINES_MAX 1024

typedef struct {
    char text[CLKVQ_DEFINES_MAX];
    size_t used;
    int overflow; /* a define did not fit: the options are unusable */
} clkvq_defines;

void clkvq_defines_init(clkvq_defines *d);
void clkvq_defines_int(clkvq_defines *d, const char *name, long value);
/* <prefix>BITS (0 for base 3), <prefix>TERNARY (0|1), <prefix>LEVELS. */
void clkvq_defines_format(clkvq_defines *d, const char *prefix, clkvq_format format);
/* PARAM_FP8 and ZERO_INT: how a group's (scale, zero) are stored and used. */
void clkvq_defines_params(clkvq_defines *d, clkvq_param_type type, clkvq_zero_mode zero_mode);
/* A build option other than a define (e.g. -cl-opt-disable). */
void clkvq_defines_option(clkvq_defines *d, const char *option);
/* The options string, or NULL after an overflow (with a message on ctx). */
const char *clkvq_defines_get(clkvq_context *ctx, const clkvq_defines *d);

#endif
