/*
 * libFuzzer target for the precision-config loader: any bytes go through
 * clkvq_config_parse (no OpenCL device: ctx NULL). A rejected input must
 * leave *out NULL and a message naming "<memory>"; an accepted one must
 * answer every query in range, and save -> load -> save must give the same
 * bytes (the round-trip promise of clkvq_config_save). Any violation aborts,
 * which libFuzzer reports as a crash with the input.
 */
#include "clkvq.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_path[2][256];

static void make_paths(void)
{
    if (g_path[0][0])
        return;
    const char *dir = getenv("TMPDIR");
    for (int i = 0; i < 2; i++)
        snprintf(g_path[i], sizeof g_path[i], "%s/clkvq_fuzz_%ld_%d.yaml", dir ? dir : "/tmp",
                 (long)getpid(), i);
}

static char *slurp(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = malloc(1 << 22);
    *size = buf ? fread(buf, 1, 1 << 22, f) : 0;
    fclose(f);
    return buf;
}

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_config: %s: %s\n", what, clkvq_last_error(NULL));
        abort();
    }
}

/* Every query of an accepted config stays in range. */
static void check_queries(const clkvq_precision_config *cfg)
{
    int n = clkvq_config_n_layers(cfg);
    check(n > 0, "accepted config without layers");
    double bits = clkvq_config_average_bits(cfg);
    check(bits >= 1.5 && bits <= 8.0, "average bits out of range");
    for (int l = 0; l < n; l++) {
        clkvq_layer_config lc;
        check(clkvq_config_layer(cfg, l, &lc) == CLKVQ_OK, "layer query failed");
        check(lc.format_k < CLKVQ_FMT_COUNT && lc.format_v < CLKVQ_FMT_COUNT, "bad format");
        for (int h = 0; h < clkvq_config_n_heads(cfg, l); h++) {
            clkvq_format k, v;
            check(clkvq_config_head(cfg, l, h, &k, &v) == CLKVQ_OK, "head query failed");
        }
    }
}

/* save -> load -> save gives the same bytes. */
static void check_round_trip(const clkvq_precision_config *cfg)
{
    make_paths();
    clkvq_precision_config *back = NULL;
    check(clkvq_config_save(NULL, cfg, g_path[0]) == CLKVQ_OK, "save failed");
    check(clkvq_config_load(NULL, g_path[0], NULL, &back) == CLKVQ_OK, "reload failed");
    check(clkvq_config_save(NULL, back, g_path[1]) == CLKVQ_OK, "second save failed");
    size_t n0 = 0, n1 = 0;
    char *a = slurp(g_path[0], &n0), *b = slurp(g_path[1], &n1);
    check(a && b && n0 == n1 && !memcmp(a, b, n0), "save(load(save(c))) != save(c)");
    free(a);
    free(b);
    clkvq_config_free(back);
    unlink(g_path[0]);
    unlink(g_path[1]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    clkvq_precision_config *cfg = (clkvq_precision_config *)&cfg; /* must come back NULL */
    clkvq_status st = clkvq_config_parse(NULL, (const char *)data, size, NULL, &cfg);
    if (st != CLKVQ_OK) {
        check(cfg == NULL, "failed parse left *out set");
        check(strstr(clkvq_last_error(NULL), "<memory>") != NULL ||
                  st == CLKVQ_ERR_OUT_OF_MEMORY,
              "error message does not name the input");
        return 0;
    }
    check_queries(cfg);
    check_round_trip(cfg);
    clkvq_config_free(cfg);
    return 0;
}
