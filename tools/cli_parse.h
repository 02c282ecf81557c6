/*
 * Numeric command-line arguments for the programs (clkvq-tune, clkvq-eval,
 * clkvq-synth-dump, clkvq-bench, the tests' dump_check); not part of the
 * library.
 *
 * atoi/atof read "abc" as 0 and "nan" as a number that passes every `< 0`
 * check, so a typo silently meant "the whole search space". Here the whole
 * string must be the number (no leading space or sign tricks, no trailing
 * text), it must fit, a real must be finite, and it must lie in [lo, hi].
 * The cli_parse_* forms print "<prog>: <flag> '<text>' is not ..." on stderr
 * and return -1; callers then exit with status 2 (usage error).
 */
#ifndef CLKVQ_CLI_PARSE_H
#define CLKVQ_CLI_PARSE_H

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* The number must start right away: strto* would skip spaces. */
static inline int cli_starts_number(const char *text, int allow_minus)
{
    if (!text || !*text)
        return 0;
    if (*text == '-')
        return allow_minus && isdigit((unsigned char)text[1]);
    return isdigit((unsigned char)*text) || (*text == '.' && isdigit((unsigned char)text[1]));
}

/* Quiet forms: 0 and *out set, or -1. */
static inline int cli_long(const char *text, long lo, long hi, long *out)
{
    if (!cli_starts_number(text, lo < 0))
        return -1;
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || *end || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

static inline int cli_u64(const char *text, uint64_t *out)
{
    if (!cli_starts_number(text, 0))
        return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10); /* 64 bits on every target */
    if (errno || *end)
        return -1;
    *out = (uint64_t)v;
    return 0;
}

static inline int cli_double(const char *text, double lo, double hi, double *out)
{
    if (!cli_starts_number(text, lo < 0))
        return -1; /* also refuses "nan", "inf", "+1" */
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || *end || !isfinite(v) || v < lo || v > hi)
        return -1;
    *out = v;
    return 0;
}

/* Reporting forms: flag names what the user typed ("--budget", "LAYERS"). */
static inline int cli_parse_long(const char *prog, const char *flag, const char *text, long lo,
                                 long hi, long *out)
{
    if (cli_long(text, lo, hi, out) == 0)
        return 0;
    fprintf(stderr, "%s: %s '%s' is not an integer in [%ld, %ld]\n", prog, flag,
            text ? text : "", lo, hi);
    return -1;
}

static inline int cli_parse_int(const char *prog, const char *flag, const char *text, int lo,
                                int hi, int *out)
{
    long v;
    if (cli_parse_long(prog, flag, text, lo, hi, &v))
        return -1;
    *out = (int)v;
    return 0;
}

static inline int cli_parse_u64(const char *prog, const char *flag, const char *text,
                                uint64_t *out)
{
    if (cli_u64(text, out) == 0)
        return 0;
    fprintf(stderr, "%s: %s '%s' is not an integer in [0, %llu]\n", prog, flag, text ? text : "",
            (unsigned long long)UINT64_MAX);
    return -1;
}

static inline int cli_parse_double(const char *prog, const char *flag, const char *text,
                                   double lo, double hi, double *out)
{
    if (cli_double(text, lo, hi, out) == 0)
        return 0;
    fprintf(stderr, "%s: %s '%s' is not a number in [%g, %g]\n", prog, flag, text ? text : "",
            lo, hi);
    return -1;
}

#endif
