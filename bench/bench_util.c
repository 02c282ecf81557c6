#include "bench_util.h"
#include "cli_parse.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CELL_MAX 64

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bench_median(double *values, int n) {
    qsort(values, (size_t)n, sizeof *values, cmp_double);
    return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

int bench_parse_int(const char *text, long lo, long hi, long *out) {
    return cli_long(text, lo, hi, out);
}

struct bench_table {
    int n_cols;
    int n_rows;
    int cap_rows;
    const char *const *headers;
    char align[32];
    char (*cells)[CELL_MAX]; /* [n_rows * n_cols] */
};

bench_table *bench_table_new(int n_cols, const char *const *headers, const char *align) {
    if (n_cols <= 0 || n_cols >= (int)sizeof(((bench_table *)0)->align)) return NULL;
    bench_table *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->n_cols = n_cols;
    t->headers = headers;
    for (int c = 0; c < n_cols; c++) t->align[c] = (align && align[c] == 'l') ? 'l' : 'r';
    return t;
}

int bench_table_add_row(bench_table *t) {
    if (t->n_rows == t->cap_rows) {
        int cap = t->cap_rows ? 2 * t->cap_rows : 16;
        void *p = realloc(t->cells, (size_t)cap * (size_t)t->n_cols * CELL_MAX);
        if (!p) return -1;
        t->cells = p;
        t->cap_rows = cap;
    }
    memset(t->cells[(size_t)t->n_rows * (size_t)t->n_cols], 0, (size_t)t->n_cols * CELL_MAX);
    return t->n_rows++;
}

void bench_table_cell(bench_table *t, int col, const char *fmt, ...) {
    if (t->n_rows == 0 || col < 0 || col >= t->n_cols) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->cells[(size_t)(t->n_rows - 1) * (size_t)t->n_cols + (size_t)col], CELL_MAX, fmt,
              ap);
    va_end(ap);
}

static void print_cell(FILE *out, const char *text, int width, char align) {
    if (align == 'l')
        fprintf(out, " %-*s |", width, text);
    else
        fprintf(out, " %*s |", width, text);
}

void bench_table_print(const bench_table *t, FILE *out) {
    int width[32];
    for (int c = 0; c < t->n_cols; c++) {
        width[c] = (int)strlen(t->headers[c]);
        for (int r = 0; r < t->n_rows; r++) {
            int w = (int)strlen(t->cells[(size_t)r * (size_t)t->n_cols + (size_t)c]);
            if (w > width[c]) width[c] = w;
        }
    }
    fputc('|', out);
    for (int c = 0; c < t->n_cols; c++) print_cell(out, t->headers[c], width[c], t->align[c]);
    fputs("\n|", out);
    for (int c = 0; c < t->n_cols; c++) {
        /* Markdown alignment row: ":---" left, "---:" right. */
        fputc(t->align[c] == 'l' ? ':' : '-', out);
        for (int i = 0; i < width[c]; i++) fputc('-', out);
        fputs(t->align[c] == 'r' ? ":|" : "-|", out);
    }
    fputc('\n', out);
    for (int r = 0; r < t->n_rows; r++) {
        fputc('|', out);
        for (int c = 0; c < t->n_cols; c++)
            print_cell(out, t->cells[(size_t)r * (size_t)t->n_cols + (size_t)c], width[c],
                       t->align[c]);
        fputc('\n', out);
    }
}

void bench_table_free(bench_table *t) {
    if (!t) return;
    free(t->cells);
    free(t);
}

const char *bench_variant_name(clkvq_attn_variant v)
{
    switch (v) {
    case CLKVQ_ATTN_SERIAL: return "serial";
    case CLKVQ_ATTN_COOPERATIVE: return "cooperative";
    default: return "default";
    }
}

double bench_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void bench_fill_random(float *x, size_t n, uint32_t seed) {
    uint32_t s = seed ? seed : 1u;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        x[i] = (float)((double)s / 2147483648.0 - 1.0);
    }
}
