/*
 * clkvq-bench decode: one decode configuration, spelled out (scheme,
 * formats, layouts, every tunable), run a given number of times. With
 * --calls 1 it is the program docs/gpu-decode.md counts instructions with
 * (oclgrind --inst-counts: one decode call, nothing else timed or
 * repeated); with more calls it prints the median device time.
 *
 * The cache: one layer, --batch sequences of --tokens tokens of synthetic
 * K/V (clkvq_synth_kv, seed 7 + sequence), appended in one piece; the
 * query: the first key rows scaled (deterministic, no extra generator).
 */
#include "bench_util.h"

#include "clkvq.h"

#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const g_prog = "clkvq-bench decode";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: clkvq-bench decode [options]\n"
            "\n"
            "One fused decode configuration over a synthetic one-layer cache; prints a\n"
            "checksum of the output and the device time (median over --calls).\n"
            "\n"
            "options:\n"
            "  --tokens N         tokens per sequence (default 512)\n"
            "  --batch N          sequences (default 1)\n"
            "  --heads Q/KV/D     query heads, kv heads, head_dim (default 32/8/128)\n"
            "  --scheme S         fp16, token, kivi, skvq (default token)\n"
            "  --k F, --v F       formats 8, 4, 3, 2, 1.5 (default 4, 4)\n"
            "  --group N          group size (default: the scheme's)\n"
            "  --layouts KV       tt, tp, pt, pp: K and V token-major (t) or group-planar (p)\n"
            "                     (default pt: the GPU default)\n"
            "  --variant V        coop or serial (default coop)\n"
            "  --wgs N --tpl N --vwpl N --waves N   cooperative tunables (0: default)\n"
            "  --chunk N --vw N   serial tunables (0: default)\n"
            "  --calls N          decode calls (default 1)\n"
            "  -d, --device S     device index or name substring\n"
            "  -h, --help         this text\n"
            "\n"
            "exit codes: 0 ok, 1 runtime failure, 2 usage error\n");
}

#define CHECK(call)                                                                           \
    do {                                                                                      \
        clkvq_status st_ = (call);                                                            \
        if (st_ != CLKVQ_OK) {                                                                \
            fprintf(stderr, "%s: %s: %s\n", g_prog, clkvq_status_string(st_),                 \
                    clkvq_last_error(ctx));                                                   \
            rc = BENCH_EXIT_FAILURE;                                                          \
            goto done;                                                                        \
        }                                                                                     \
    } while (0)

static int bad_arg(const char *flag, const char *text)
{
    fprintf(stderr, "%s: %s '%s' is not valid (see --help)\n", g_prog, flag, text);
    return BENCH_EXIT_USAGE;
}

int bench_decode_main(int argc, char **argv)
{
    enum { O_TOKENS = 256, O_BATCH, O_HEADS, O_SCHEME, O_K, O_V, O_GROUP, O_LAYOUTS, O_VARIANT,
           O_WGS, O_TPL, O_VWPL, O_WAVES, O_CHUNK, O_VW, O_CALLS };
    static const struct option longopts[] = {
        {"tokens", required_argument, NULL, O_TOKENS}, {"batch", required_argument, NULL, O_BATCH},
        {"heads", required_argument, NULL, O_HEADS},   {"scheme", required_argument, NULL, O_SCHEME},
        {"k", required_argument, NULL, O_K},           {"v", required_argument, NULL, O_V},
        {"group", required_argument, NULL, O_GROUP},   {"layouts", required_argument, NULL, O_LAYOUTS},
        {"variant", required_argument, NULL, O_VARIANT}, {"wgs", required_argument, NULL, O_WGS},
        {"tpl", required_argument, NULL, O_TPL},       {"vwpl", required_argument, NULL, O_VWPL},
        {"waves", required_argument, NULL, O_WAVES},   {"chunk", required_argument, NULL, O_CHUNK},
        {"vw", required_argument, NULL, O_VW},         {"calls", required_argument, NULL, O_CALLS},
        {"device", required_argument, NULL, 'd'},      {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    long tokens = 512, batch = 1, group = 0, calls = 1;
    int n_q = 32, n_kv = 8, head_dim = 128;
    clkvq_scheme scheme = CLKVQ_SCHEME_TOKEN;
    clkvq_format fk = CLKVQ_FMT_Q4, fv = CLKVQ_FMT_Q4;
    clkvq_layout lk = CLKVQ_LAYOUT_GROUP_PLANAR, lv = CLKVQ_LAYOUT_TOKEN_MAJOR;
    clkvq_attn_tuning t = {CLKVQ_ATTN_COOPERATIVE, 0, 0, 0, 0, 0, 0};
    const char *device = NULL;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "d:h", longopts, NULL)) != -1) {
        long v = 0;
        switch (c) {
        case O_TOKENS:
            if (bench_parse_int(optarg, 1, 1 << 24, &tokens)) return bad_arg("--tokens", optarg);
            break;
        case O_BATCH:
            if (bench_parse_int(optarg, 1, 4096, &batch)) return bad_arg("--batch", optarg);
            break;
        case O_HEADS:
        {
            int used = 0;
            if (sscanf(optarg, "%d/%d/%d%n", &n_q, &n_kv, &head_dim, &used) != 3 ||
                optarg[used] != '\0' || n_q <= 0 || n_kv <= 0 || head_dim <= 0)
                return bad_arg("--heads", optarg);
        }
            break;
        case O_SCHEME:
            if (clkvq_scheme_parse(optarg, &scheme) != CLKVQ_OK) return bad_arg("--scheme", optarg);
            break;
        case O_K:
            if (clkvq_format_parse(optarg, &fk) != CLKVQ_OK) return bad_arg("--k", optarg);
            break;
        case O_V:
            if (clkvq_format_parse(optarg, &fv) != CLKVQ_OK) return bad_arg("--v", optarg);
            break;
        case O_GROUP:
            if (bench_parse_int(optarg, 32, 4096, &group)) return bad_arg("--group", optarg);
            break;
        case O_LAYOUTS:
            if (strlen(optarg) != 2 || !strchr("tp", optarg[0]) || !strchr("tp", optarg[1]))
                return bad_arg("--layouts", optarg);
            lk = optarg[0] == 'p' ? CLKVQ_LAYOUT_GROUP_PLANAR : CLKVQ_LAYOUT_TOKEN_MAJOR;
            lv = optarg[1] == 'p' ? CLKVQ_LAYOUT_GROUP_PLANAR : CLKVQ_LAYOUT_TOKEN_MAJOR;
            break;
        case O_VARIANT:
            if (!strcmp(optarg, "coop"))
                t.variant = CLKVQ_ATTN_COOPERATIVE;
            else if (!strcmp(optarg, "serial"))
                t.variant = CLKVQ_ATTN_SERIAL;
            else
                return bad_arg("--variant", optarg);
            break;
        case O_WGS: case O_TPL: case O_VWPL: case O_WAVES: case O_CHUNK: case O_VW:
            if (bench_parse_int(optarg, 0, 1 << 24, &v)) {
                char flag[32];
                snprintf(flag, sizeof flag, "--%s", longopts[c - O_TOKENS].name);
                return bad_arg(flag, optarg);
            }
            *(c == O_WGS    ? &t.wgs
              : c == O_TPL  ? &t.tpl
              : c == O_VWPL ? &t.vwpl
              : c == O_WAVES ? &t.waves
              : c == O_CHUNK ? &t.chunk
                             : &t.vw) = (int)v;
            break;
        case O_CALLS:
            if (bench_parse_int(optarg, 1, 100000, &calls)) return bad_arg("--calls", optarg);
            break;
        case 'd':
            device = optarg;
            break;
        case 'h':
            usage(stdout);
            return BENCH_EXIT_OK;
        default:
            usage(stderr);
            return BENCH_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        usage(stderr);
        return BENCH_EXIT_USAGE;
    }

    int rc = BENCH_EXIT_OK;
    clkvq_context *ctx = NULL;
    clkvq_cache *cache = NULL;
    float *k = NULL, *v = NULL, *q = NULL, *out = NULL;
    double *ms = NULL;
    cl_mem q_mem = NULL, out_mem = NULL;
    CHECK(clkvq_context_create(&ctx, device));
    clkvq_layer_config lc = clkvq_layer_config_default(scheme);
    lc.format_k = fk;
    lc.format_v = fv;
    if (group)
        lc.group_size = (int)group;
    clkvq_cache_config cfg = {.n_layers = 1, .n_seqs = (int)batch, .capacity = (int)tokens,
                              .n_kv_heads = n_kv, .n_q_heads = n_q, .head_dim = head_dim,
                              .layout_k = lk, .layout_v = lv, .layers = &lc};
    CHECK(clkvq_cache_create(ctx, &cfg, &cache));
    CHECK(clkvq_cache_set_tuning(cache, &t));
    size_t kv_n = (size_t)n_kv * tokens * head_dim, q_n = (size_t)batch * n_q * head_dim;
    k = malloc(kv_n * sizeof(float));
    v = malloc(kv_n * sizeof(float));
    q = malloc(q_n * sizeof(float));
    out = malloc(q_n * sizeof(float));
    ms = malloc((size_t)calls * sizeof(double));
    if (!k || !v || !q || !out || !ms) {
        fprintf(stderr, "%s: out of host memory\n", g_prog);
        rc = BENCH_EXIT_FAILURE;
        goto done;
    }
    clkvq_shape shape = {n_kv, (int)tokens, head_dim};
    for (int s = 0; s < batch; s++) {
        CHECK(clkvq_synth_kv(7 + (uint64_t)s, &shape, k, v));
        CHECK(clkvq_cache_append(cache, 0, s, (int)tokens, k, v));
    }
    for (size_t i = 0; i < q_n; i++)
        q[i] = k[i % kv_n] * 0.9f + 0.05f;
    cl_int err;
    q_mem = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                           q_n * sizeof(float), q, &err);
    if (err == CL_SUCCESS)
        out_mem = clCreateBuffer(clkvq_context_cl_context(ctx), CL_MEM_WRITE_ONLY,
                                 q_n * sizeof(float), NULL, &err);
    if (err != CL_SUCCESS) {
        fprintf(stderr, "%s: buffers: OpenCL error %d\n", g_prog, (int)err);
        rc = BENCH_EXIT_FAILURE;
        goto done;
    }
    float scale = 1.0f / sqrtf((float)head_dim);
    for (int i = 0; i < calls; i++) {
        CHECK(clkvq_cache_decode(cache, 0, q_mem, out_mem, scale));
        ms[i] = clkvq_last_device_ms(ctx);
    }
    if (clEnqueueReadBuffer(clkvq_context_cl_queue(ctx), out_mem, CL_TRUE, 0,
                            q_n * sizeof(float), out, 0, NULL, NULL) != CL_SUCCESS) {
        fprintf(stderr, "%s: reading the output failed\n", g_prog);
        rc = BENCH_EXIT_FAILURE;
        goto done;
    }
    double sum = 0.0;
    for (size_t i = 0; i < q_n; i++)
        sum += out[i];
    clkvq_attn_tuning used;
    clkvq_cache_get_tuning(cache, &used);
    printf("checksum %.9g, %ld call%s, median device time %.4f ms (%s wgs %d tpl %d vwpl %d "
           "waves %d chunk %d vw %d)\n",
           sum, calls, calls == 1 ? "" : "s", bench_median(ms, (int)calls),
           used.variant == CLKVQ_ATTN_SERIAL ? "serial" : "cooperative", used.wgs, used.tpl,
           used.vwpl, used.waves, used.chunk, used.vw);
done:
    if (q_mem)
        clReleaseMemObject(q_mem);
    if (out_mem)
        clReleaseMemObject(out_mem);
    clkvq_cache_release(cache);
    clkvq_context_release(ctx);
    free(k);
    free(v);
    free(q);
    free(out);
    free(ms);
    return rc;
}
