/*
 * libFuzzer target for the tuning-file parser (lib/tuning_db.c): the text
 * of <cache dir>/tuning/<device key>.json, and of the shipped
 * results/tuning/<name>.json, goes through clkvq_tuning_parse (ctx NULL: no
 * OpenCL device). Aborts, which libFuzzer reports as a crash with the input,
 * when
 *   - a refused input leaves entries behind, a count, or no message;
 *   - an accepted entry breaks a rule the lookup relies on (kernel
 *     "decode", distance 0 to itself, a finite positive tuned time);
 *   - what was accepted cannot be written back, or the written text does
 *     not parse to the same device and entries bit for bit, or writing
 *     those again gives other bytes (the writer's promise: whatever it
 *     writes reads back, and a merge never changes an untouched entry).
 * ASan and UBSan catch memory errors, overflows and leaks.
 *
 * Seeds: the shipped results/tuning/ files. See fuzz/README.md.
 */
#include "tuning_db.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_tuning: %s (last error: %s)\n", what, clkvq_last_error(NULL));
        abort();
    }
}

static int same_device(const clkvq_device_info *a, const clkvq_device_info *b)
{
    return !strcmp(a->vendor, b->vendor) && !strcmp(a->name, b->name) &&
           !strcmp(a->driver_version, b->driver_version) &&
           a->compute_units == b->compute_units && a->is_gpu == b->is_gpu;
}

/* Field by field; the times bit for bit (the writer prints them exactly). */
static int same_entry(const clkvq_tune_result *a, const clkvq_tune_result *b)
{
    const clkvq_tune_shape *x = &a->shape, *y = &b->shape;
    return !strcmp(a->kernel, b->kernel) && x->scheme == y->scheme &&
           x->format_k == y->format_k && x->format_v == y->format_v &&
           x->group_size == y->group_size && x->head_dim == y->head_dim &&
           x->n_q_heads == y->n_q_heads && x->n_kv_heads == y->n_kv_heads &&
           x->tokens == y->tokens && x->batch == y->batch &&
           a->params.attn.variant == b->params.attn.variant &&
           a->params.attn.wgs == b->params.attn.wgs && a->params.attn.chunk == b->params.attn.chunk &&
           a->params.attn.vw == b->params.attn.vw && a->params.layout_k == b->params.layout_k &&
           a->params.layout_v == b->params.layout_v &&
           !memcmp(&a->default_ms, &b->default_ms, sizeof a->default_ms) &&
           !memcmp(&a->tuned_ms, &b->tuned_ms, sizeof a->tuned_ms);
}

static void check_accepted(const clkvq_device_info *dev, const clkvq_tune_result *e, int n)
{
    check(n >= 0 && (n == 0 || e), "accepted without entries");
    for (int i = 0; i < n; i++) {
        check(!strcmp(e[i].kernel, "decode"), "kept an entry of another kernel");
        check(clkvq_tuning_shape_distance(&e[i].shape, &e[i].shape) == 0.0,
              "an entry is not at distance 0 from itself");
        check(isfinite(e[i].tuned_ms) && e[i].tuned_ms > 0, "tuned_ms not finite and positive");
        for (int j = 0; j < i; j++)
            check(clkvq_tuning_shape_distance(&e[i].shape, &e[j].shape) > 0.0,
                  "two entries of one shape");
    }

    char *text = clkvq_tuning_serialize_device(dev, e, n);
    check(text != NULL, "an accepted file cannot be written back");
    clkvq_tune_result *back = NULL;
    int n_back = -1;
    clkvq_device_info dev_back;
    check(clkvq_tuning_parse(NULL, text, &back, &n_back, &dev_back) == CLKVQ_OK,
          "what the writer wrote does not parse");
    check(n_back == n && same_device(dev, &dev_back), "device or count changed on the way back");
    for (int i = 0; i < n; i++)
        check(same_entry(&e[i], &back[i]), "an entry changed on the way back");
    char *again = clkvq_tuning_serialize_device(&dev_back, back, n_back);
    check(again && !strcmp(text, again), "write(parse(write(x))) != write(x)");
    free(again);
    free(back);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1); /* the parser takes a C string */
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    clkvq_tune_result *entries = (clkvq_tune_result *)&text; /* must come back NULL on failure */
    int n = -1;
    clkvq_device_info dev;
    clkvq_status st = clkvq_tuning_parse(NULL, text, &entries, &n, &dev);
    if (st != CLKVQ_OK) {
        check(st == CLKVQ_ERR_CORRUPT || st == CLKVQ_ERR_OUT_OF_MEMORY, "unexpected status");
        check(entries == NULL && n == 0, "a refused file left entries behind");
        check(!strncmp(clkvq_last_error(NULL), "tuning file: ", 13) &&
                  strlen(clkvq_last_error(NULL)) > 13,
              "a refusal without a reason");
    } else {
        check_accepted(&dev, entries, n);
        free(entries);
    }
    free(text);
    return 0;
}
