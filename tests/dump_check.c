/*
 * dump_check: the C side of tests/test_dump_interop.py, so the Python
 * safetensors package and our reader/writer can be compared value by value.
 * Needs no OpenCL device (the dump code is host-only; ctx is NULL).
 *
 *   dump_check read  DUMP RAW_OUT
 *       Opens DUMP with clkvq_dump_open, prints one line
 *       "info layers=L q_heads=H kv_heads=K tokens=T head_dim=D model=NAME"
 *       and writes every tensor, converted to fp32, to RAW_OUT as
 *       little-endian float32: layer 0 q, k, v, layer 1 q, k, v, ...
 *   dump_check write DUMP f32|f16 LAYERS Q_HEADS KV_HEADS TOKENS HEAD_DIM SEED MODEL RAW_OUT
 *       Writes a synthetic dump (K/V from clkvq_synth_kv, q Gaussian) with
 *       clkvq_dump_write, and the fp32 values it was given to RAW_OUT in
 *       the same order (before any fp16 rounding).
 *
 * Exit status 0 on success; 1 with "error STATUS: message" on stdout when
 * a clkvq call fails (the interop test checks corrupt files this way); 2 on
 * a usage error.
 */
#include "clkvq.h"
#include "cli_parse.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(clkvq_status st)
{
    printf("error %s: %s\n", clkvq_status_string(st), clkvq_last_error(NULL));
    return 1;
}

/* Little-endian whatever the host, as numpy's '<f4' reads it. */
static int write_f32(FILE *f, const float *x, size_t n)
{
    unsigned char buf[4096];
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        for (int b = 0; b < 4; b++) buf[used++] = (unsigned char)(u >> (8 * b));
        if (used == sizeof buf || i + 1 == n) {
            if (fwrite(buf, 1, used, f) != used) return -1;
            used = 0;
        }
    }
    return 0;
}

static int cmd_read(const char *dump_path, const char *raw_path)
{
    clkvq_kv_dump *d = NULL;
    clkvq_status st = clkvq_dump_open(NULL, dump_path, &d);
    if (st != CLKVQ_OK) return fail(st);
    clkvq_dump_info info;
    clkvq_dump_info_get(d, &info);
    printf("info layers=%d q_heads=%d kv_heads=%d tokens=%d head_dim=%d model=%s\n", info.n_layers,
           info.n_q_heads, info.n_kv_heads, info.n_tokens, info.head_dim, info.model);
    size_t per_head = (size_t)info.n_tokens * (size_t)info.head_dim;
    float *buf = malloc((size_t)info.n_q_heads * per_head * sizeof(float));
    FILE *f = fopen(raw_path, "wb");
    int rc = buf && f ? 0 : 1;
    if (rc) printf("error: cannot open %s or allocate\n", raw_path);
    for (int l = 0; l < info.n_layers && rc == 0; l++)
        for (int w = 0; w < 3 && rc == 0; w++) {
            st = clkvq_dump_read(d, l, "qkv"[w], buf);
            if (st != CLKVQ_OK) {
                rc = fail(st);
                break;
            }
            size_t n = (size_t)(w == 0 ? info.n_q_heads : info.n_kv_heads) * per_head;
            if (write_f32(f, buf, n) != 0) {
                printf("error: writing %s failed\n", raw_path);
                rc = 1;
            }
        }
    if (f && fclose(f) != 0 && rc == 0) {
        printf("error: closing %s failed\n", raw_path);
        rc = 1;
    }
    free(buf);
    clkvq_dump_close(d);
    return rc;
}

/* splitmix64 -> Box-Muller: a q with no structure, which is all a format
 * round trip needs; K/V come from the realistic generator. */
static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double normal(uint64_t *s)
{
    double u1 = ((double)(splitmix(s) >> 11) + 1.0) / 9007199254740993.0; /* (0, 1] */
    double u2 = (double)(splitmix(s) >> 11) / 9007199254740992.0;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static int cmd_write(char **argv)
{
    const char *dump_path = argv[0], *dtype = argv[1];
    clkvq_dump_info info;
    memset(&info, 0, sizeof info);
    uint64_t seed;
    /* sizes only need to be positive here: the writer checks the rest */
    if (cli_parse_int("dump_check", "LAYERS", argv[2], 1, 1 << 16, &info.n_layers) ||
        cli_parse_int("dump_check", "Q_HEADS", argv[3], 1, 1 << 16, &info.n_q_heads) ||
        cli_parse_int("dump_check", "KV_HEADS", argv[4], 1, 1 << 16, &info.n_kv_heads) ||
        cli_parse_int("dump_check", "TOKENS", argv[5], 1, 1 << 24, &info.n_tokens) ||
        cli_parse_int("dump_check", "HEAD_DIM", argv[6], 1, 1 << 16, &info.head_dim) ||
        cli_parse_u64("dump_check", "SEED", argv[7], &seed))
        return 2;
    snprintf(info.model, sizeof info.model, "%s", argv[8]);
    const char *raw_path = argv[9];
    int as_f16 = strcmp(dtype, "f16") == 0;
    if (!as_f16 && strcmp(dtype, "f32") != 0) {
        fprintf(stderr, "dump_check: dtype '%s' is not f32 or f16\n", dtype);
        return 2;
    }
    size_t L = (size_t)info.n_layers, per_head = (size_t)info.n_tokens * info.head_dim;
    size_t nq = (size_t)info.n_q_heads * per_head, nkv = (size_t)info.n_kv_heads * per_head;
    float **q = calloc(L, sizeof *q), **k = calloc(L, sizeof *k), **v = calloc(L, sizeof *v);
    int rc = q && k && v ? 0 : 1;
    uint64_t s = seed;
    for (size_t l = 0; l < L && rc == 0; l++) {
        q[l] = malloc(nq * sizeof(float));
        k[l] = malloc(nkv * sizeof(float));
        v[l] = malloc(nkv * sizeof(float));
        if (!q[l] || !k[l] || !v[l]) {
            rc = 1;
            break;
        }
        for (size_t i = 0; i < nq; i++) q[l][i] = (float)(2.0 * normal(&s));
        clkvq_shape shape = {info.n_kv_heads, info.n_tokens, info.head_dim};
        clkvq_status st = clkvq_synth_kv(seed * 131 + l, &shape, k[l], v[l]);
        if (st != CLKVQ_OK) rc = fail(st);
    }
    if (rc == 0) {
        clkvq_status st =
            clkvq_dump_write(NULL, dump_path, &info, (const float *const *)q,
                             (const float *const *)k, (const float *const *)v, as_f16);
        if (st != CLKVQ_OK) rc = fail(st);
    }
    if (rc == 0) {
        FILE *f = fopen(raw_path, "wb");
        for (size_t l = 0; l < L && f && rc == 0; l++)
            if (write_f32(f, q[l], nq) || write_f32(f, k[l], nkv) || write_f32(f, v[l], nkv))
                rc = 1;
        if (!f || fclose(f) != 0 || rc) {
            printf("error: writing %s failed\n", raw_path);
            rc = 1;
        }
    }
    for (size_t l = 0; l < L; l++) {
        if (q) free(q[l]);
        if (k) free(k[l]);
        if (v) free(v[l]);
    }
    free(q);
    free(k);
    free(v);
    if (rc == 0) printf("wrote %s\n", dump_path);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "read") == 0) return cmd_read(argv[2], argv[3]);
    if (argc == 12 && strcmp(argv[1], "write") == 0) return cmd_write(argv + 2);
    fprintf(stderr,
            "usage: %s read DUMP RAW_OUT\n"
            "       %s write DUMP f32|f16 LAYERS Q_HEADS KV_HEADS TOKENS HEAD_DIM SEED MODEL "
            "RAW_OUT\n",
            argv[0], argv[0]);
    return 2;
}
