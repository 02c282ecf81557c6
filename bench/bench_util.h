/* Helpers shared by the clkvq-bench subcommands: statistics, option
 * parsing and aligned text tables. Nothing here touches OpenCL. */
#ifndef CLKVQ_BENCH_UTIL_H
#define CLKVQ_BENCH_UTIL_H

#include "clkvq.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Exit codes of clkvq-bench (documented in --help). */
enum { BENCH_EXIT_OK = 0, BENCH_EXIT_FAILURE = 1, BENCH_EXIT_USAGE = 2 };

/* Subcommands: each parses its own options (argv[0] is its name) and
 * returns an exit code. */
int bench_quant_main(int argc, char **argv);
int bench_attention_main(int argc, char **argv);
int bench_append_main(int argc, char **argv);
int bench_decode_main(int argc, char **argv);
int bench_serve_main(int argc, char **argv);
int bench_heads_main(int argc, char **argv);

/* "serial", "cooperative" or "default" (the device picks). */
const char *bench_variant_name(clkvq_attn_variant v);

/* Seconds on the monotonic clock. */
double bench_now_s(void);

/* xorshift32 in [-1, 1) (seed 0 taken as 1): queries and other inputs
 * whose values do not change the work, only need to be finite. */
void bench_fill_random(float *x, size_t n, uint32_t seed);

/* Median of values[0..n); sorts values in place. n must be > 0. */
double bench_median(double *values, int n);

/* Parses a decimal integer in [lo, hi]; 0 on success, -1 otherwise. */
int bench_parse_int(const char *text, long lo, long hi, long *out);

/* An aligned text table in Markdown pipe syntax, so a printed table can be
 * pasted into results/ as it is. */
typedef struct bench_table bench_table;

/* align: one character per column, 'l' or 'r'. NULL on allocation failure. */
bench_table *bench_table_new(int n_cols, const char *const *headers, const char *align);
/* Starts a new row (all cells empty); -1 on allocation failure. */
int bench_table_add_row(bench_table *table);
/* Sets cell col of the last row, printf-style (truncated to 63 chars). */
void bench_table_cell(bench_table *table, int col, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void bench_table_print(const bench_table *table, FILE *out);
void bench_table_free(bench_table *table);

#endif
