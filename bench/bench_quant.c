/*
 * clkvq-bench quant: quantizes one layer's synthetic K and V (Llama-3-8B:
 * 8 kv heads x head_dim 128, --tokens tokens) with each format and prints,
 * per format, bits/element (codes + params), the relative reconstruction
 * error of K and V, and the quantize throughput against a plain device copy
 * kernel measured in the same run.
 *
 * One rep = quantize K, then V (both fp32 on the device already). Its time is
 * the sum of the two calls' device times (clkvq_last_device_ms: profiling
 * events of the call's kernels, the NaN/Inf check pass included); the table
 * shows the median of --reps reps after one warm-up.
 * GB/s = (fp32 bytes read + code bytes + param bytes written) / time.
 */
#include "bench_util.h"

#include "clkvq.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_KV_HEADS 8 /* Llama-3-8B */
#define HEAD_DIM 128
#define SYNTH_SEED 1

typedef struct {
    int tokens;
    int reps;
    int group_size;
    int json;
    const char *device;
} quant_options;

typedef struct {
    clkvq_format format;
    clkvq_axis k_axis; /* values always use per-token groups */
    int group_size;
} quant_row;

typedef struct {
    double bits_per_element;
    double k_rel_err, v_rel_err;
    double ms;
    double tokens_per_s;
    double gbps;
    double ratio_copy;
} quant_result;

/* Device and host buffers, shared by every row. */
typedef struct {
    clkvq_context *ctx;
    clkvq_shape shape;
    size_t n_elements;
    float *k, *v, *deq;
    unsigned char *codes_host, *params_host;
    size_t codes_cap, params_cap;
    cl_mem x_k, x_v, codes_k, params_k, codes_v, params_v;
} quant_bench;

static void usage(FILE *out) {
    fprintf(out,
            "usage: clkvq-bench quant [options]\n"
            "\n"
            "Quantizes a synthetic Llama-3-8B layer (8 kv heads x head_dim 128, fp32 K and V,\n"
            "seed %d) with every format (per-token groups) and q2 with KIVI-style per-channel\n"
            "key groups; prints bits/element, relative RMSE of K and V, and the throughput of\n"
            "quantizing K+V, also as a ratio to a float4 copy kernel timed in the same run.\n"
            "\n"
            "options:\n"
            "  -t, --tokens N   tokens per sequence (default 4096)\n"
            "  -r, --reps N     timed repetitions after one warm-up; median (default 10)\n"
            "  -g, --group N    group size of the per-token rows, a multiple of 32 (default 32)\n"
            "  -d, --device S   device index or name substring (default $CLKVQ_DEVICE, else\n"
            "                   the first GPU, else the first device)\n"
            "  -j, --json       print one JSON object instead of the table\n"
            "  -h, --help       this text\n"
            "\n"
            "exit codes: 0 ok, 1 runtime failure, 2 usage error\n",
            SYNTH_SEED);
}

static int parse_options(int argc, char **argv, quant_options *opt) {
    static const struct option longopts[] = {{"tokens", required_argument, NULL, 't'},
                                             {"reps", required_argument, NULL, 'r'},
                                             {"group", required_argument, NULL, 'g'},
                                             {"device", required_argument, NULL, 'd'},
                                             {"json", no_argument, NULL, 'j'},
                                             {"help", no_argument, NULL, 'h'},
                                             {NULL, 0, NULL, 0}};
    *opt = (quant_options){.tokens = 4096, .reps = 10, .group_size = 32};
    optind = 1;
    int c;
    long value;
    while ((c = getopt_long(argc, argv, "t:r:g:d:jh", longopts, NULL)) != -1) {
        switch (c) {
        case 't':
            if (bench_parse_int(optarg, 1, 1 << 20, &value)) {
                fprintf(stderr, "clkvq-bench quant: --tokens wants 1..%d, got '%s'\n", 1 << 20,
                        optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->tokens = (int)value;
            break;
        case 'r':
            if (bench_parse_int(optarg, 1, 100000, &value)) {
                fprintf(stderr, "clkvq-bench quant: --reps wants 1..100000, got '%s'\n", optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->reps = (int)value;
            break;
        case 'g':
            if (bench_parse_int(optarg, 32, HEAD_DIM, &value) || value % 32 || HEAD_DIM % value) {
                fprintf(stderr,
                        "clkvq-bench quant: --group wants a multiple of 32 dividing %d, got "
                        "'%s'\n",
                        HEAD_DIM, optarg);
                return BENCH_EXIT_USAGE;
            }
            opt->group_size = (int)value;
            break;
        case 'd':
            opt->device = optarg;
            break;
        case 'j':
            opt->json = 1;
            break;
        case 'h':
            usage(stdout);
            return -1;
        default:
            usage(stderr);
            return BENCH_EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "clkvq-bench quant: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return BENCH_EXIT_USAGE;
    }
    return BENCH_EXIT_OK;
}

static int report(const quant_bench *b, clkvq_status st, const char *what) {
    fprintf(stderr, "clkvq-bench quant: %s: %s", what, clkvq_status_string(st));
    const char *detail = clkvq_last_error(b->ctx);
    if (detail && *detail) fprintf(stderr, ": %s", detail);
    fputc('\n', stderr);
    return BENCH_EXIT_FAILURE;
}

static int report_cl(cl_int err, const char *what) {
    fprintf(stderr, "clkvq-bench quant: %s: OpenCL error %d\n", what, (int)err);
    return BENCH_EXIT_FAILURE;
}

static const char *axis_name(clkvq_axis axis) {
    return axis == CLKVQ_AXIS_CHANNEL ? "channel" : "token";
}

static clkvq_quant_params row_params(const quant_row *row, int is_key) {
    clkvq_quant_params qp = clkvq_quant_params_default();
    qp.format = row->format;
    qp.axis = is_key ? row->k_axis : CLKVQ_AXIS_TOKEN;
    qp.group_size = row->group_size;
    qp.clip_alpha = 1.0f;
    return qp;
}

/* ||x - y|| / ||x|| over n elements. */
static double rel_err(const float *x, const float *y, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)x[i] - (double)y[i];
        num += d * d;
        den += (double)x[i] * (double)x[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

static cl_mem make_buffer(cl_context cl_ctx, cl_mem_flags flags, size_t size, cl_int *err) {
    return clCreateBuffer(cl_ctx, flags, size, NULL, err);
}

static int setup(quant_bench *b, const quant_options *opt, const quant_row *rows, int n_rows) {
    b->shape = (clkvq_shape){N_KV_HEADS, opt->tokens, HEAD_DIM};
    b->n_elements = (size_t)N_KV_HEADS * (size_t)opt->tokens * HEAD_DIM;
    for (int r = 0; r < n_rows; r++) {
        for (int is_key = 0; is_key < 2; is_key++) {
            clkvq_quant_params qp = row_params(&rows[r], is_key);
            clkvq_quant_layout lay;
            if (clkvq_quant_layout_get(&qp, &b->shape, &lay) != CLKVQ_OK) continue;
            if (lay.code_bytes > b->codes_cap) b->codes_cap = lay.code_bytes;
            if (lay.params_bytes > b->params_cap) b->params_cap = lay.params_bytes;
        }
    }
    if (!b->codes_cap || !b->params_cap) {
        fprintf(stderr, "clkvq-bench quant: no format has a layout for this shape\n");
        return BENCH_EXIT_FAILURE;
    }
    size_t x_bytes = b->n_elements * sizeof(float);
    b->k = malloc(x_bytes);
    b->v = malloc(x_bytes);
    b->deq = malloc(x_bytes);
    b->codes_host = malloc(b->codes_cap);
    b->params_host = malloc(b->params_cap);
    if (!b->k || !b->v || !b->deq || !b->codes_host || !b->params_host) {
        fprintf(stderr, "clkvq-bench quant: out of host memory (%zu bytes per tensor)\n", x_bytes);
        return BENCH_EXIT_FAILURE;
    }
    clkvq_status st = clkvq_synth_kv(SYNTH_SEED, &b->shape, b->k, b->v);
    if (st != CLKVQ_OK) return report(b, st, "synthetic K/V");

    cl_context cl_ctx = clkvq_context_cl_context(b->ctx);
    cl_command_queue queue = clkvq_context_cl_queue(b->ctx);
    cl_int err = CL_SUCCESS;
    b->x_k = make_buffer(cl_ctx, CL_MEM_READ_ONLY, x_bytes, &err);
    if (err == CL_SUCCESS) b->x_v = make_buffer(cl_ctx, CL_MEM_READ_ONLY, x_bytes, &err);
    if (err == CL_SUCCESS) b->codes_k = make_buffer(cl_ctx, CL_MEM_READ_WRITE, b->codes_cap, &err);
    if (err == CL_SUCCESS) b->codes_v = make_buffer(cl_ctx, CL_MEM_READ_WRITE, b->codes_cap, &err);
    if (err == CL_SUCCESS)
        b->params_k = make_buffer(cl_ctx, CL_MEM_READ_WRITE, b->params_cap, &err);
    if (err == CL_SUCCESS)
        b->params_v = make_buffer(cl_ctx, CL_MEM_READ_WRITE, b->params_cap, &err);
    if (err != CL_SUCCESS) return report_cl(err, "create device buffers");
    err = clEnqueueWriteBuffer(queue, b->x_k, CL_TRUE, 0, x_bytes, b->k, 0, NULL, NULL);
    if (err == CL_SUCCESS)
        err = clEnqueueWriteBuffer(queue, b->x_v, CL_TRUE, 0, x_bytes, b->v, 0, NULL, NULL);
    if (err != CL_SUCCESS) return report_cl(err, "upload K/V");
    return BENCH_EXIT_OK;
}

static void teardown(quant_bench *b) {
    cl_mem *mems[] = {&b->x_k, &b->x_v, &b->codes_k, &b->params_k, &b->codes_v, &b->params_v};
    for (size_t i = 0; i < sizeof mems / sizeof mems[0]; i++)
        if (*mems[i]) clReleaseMemObject(*mems[i]);
    free(b->k);
    free(b->v);
    free(b->deq);
    free(b->codes_host);
    free(b->params_host);
    clkvq_context_release(b->ctx);
}

/* Reads one tensor's codes and params back, dequantizes on the host and
 * returns its relative error against x. */
static int measure_error(quant_bench *b, const clkvq_quant_params *qp,
                         const clkvq_quant_layout *lay, cl_mem codes, cl_mem params, const float *x,
                         double *err_out) {
    cl_command_queue queue = clkvq_context_cl_queue(b->ctx);
    cl_int err = clEnqueueReadBuffer(queue, codes, CL_TRUE, 0, lay->code_bytes, b->codes_host, 0,
                                     NULL, NULL);
    if (err == CL_SUCCESS)
        err = clEnqueueReadBuffer(queue, params, CL_TRUE, 0, lay->params_bytes, b->params_host, 0,
                                  NULL, NULL);
    if (err != CL_SUCCESS) return report_cl(err, "read back codes");
    clkvq_status st =
        clkvq_dequantize_host(b->ctx, qp, &b->shape, b->codes_host, b->params_host, NULL, b->deq);
    if (st != CLKVQ_OK) return report(b, st, "dequantize");
    *err_out = rel_err(x, b->deq, b->n_elements);
    return BENCH_EXIT_OK;
}

/* One quantize call; *ms = its device time. */
static int quantize_timed(quant_bench *b, const clkvq_quant_params *qp, cl_mem x, cl_mem codes,
                          cl_mem params, double *ms) {
    clkvq_status st = clkvq_quantize(b->ctx, qp, &b->shape, x, NULL, codes, params);
    if (st != CLKVQ_OK) return report(b, st, "quantize");
    *ms = clkvq_last_device_ms(b->ctx);
    if (*ms < 0.0) {
        fprintf(stderr, "clkvq-bench quant: the queue reports no device time (no profiling)\n");
        return BENCH_EXIT_FAILURE;
    }
    return BENCH_EXIT_OK;
}

static int run_row(quant_bench *b, const quant_options *opt, const quant_row *row, double copy_gbps,
                   quant_result *res) {
    clkvq_quant_params qk = row_params(row, 1), qv = row_params(row, 0);
    clkvq_quant_layout lk, lv;
    clkvq_status st = clkvq_quant_layout_get(&qk, &b->shape, &lk);
    if (st == CLKVQ_OK) st = clkvq_quant_layout_get(&qv, &b->shape, &lv);
    if (st != CLKVQ_OK) return report(b, st, "layout");

    double *times = malloc((size_t)opt->reps * sizeof *times);
    if (!times) return BENCH_EXIT_FAILURE;
    int rc = BENCH_EXIT_OK;
    double ms_k = 0.0, ms_v = 0.0;
    for (int r = -1; r < opt->reps && rc == BENCH_EXIT_OK; r++) { /* r = -1: warm-up */
        rc = quantize_timed(b, &qk, b->x_k, b->codes_k, b->params_k, &ms_k);
        if (rc == BENCH_EXIT_OK)
            rc = quantize_timed(b, &qv, b->x_v, b->codes_v, b->params_v, &ms_v);
        if (r >= 0) times[r] = ms_k + ms_v;
    }
    if (rc == BENCH_EXIT_OK) res->ms = bench_median(times, opt->reps);
    free(times);
    if (rc != BENCH_EXIT_OK) return rc;

    rc = measure_error(b, &qk, &lk, b->codes_k, b->params_k, b->k, &res->k_rel_err);
    if (rc == BENCH_EXIT_OK)
        rc = measure_error(b, &qv, &lv, b->codes_v, b->params_v, b->v, &res->v_rel_err);
    if (rc != BENCH_EXIT_OK) return rc;

    double x_bytes = 2.0 * (double)b->n_elements * sizeof(float);
    double out_bytes = (double)(lk.code_bytes + lk.params_bytes + lv.code_bytes + lv.params_bytes);
    double seconds = res->ms * 1e-3;
    res->bits_per_element = out_bytes * 8.0 / (2.0 * (double)b->n_elements);
    res->tokens_per_s = seconds > 0.0 ? opt->tokens / seconds : 0.0;
    res->gbps = seconds > 0.0 ? (x_bytes + out_bytes) / seconds / 1e9 : 0.0;
    res->ratio_copy = copy_gbps > 0.0 ? res->gbps / copy_gbps : 0.0;
    return BENCH_EXIT_OK;
}

static void print_table(const clkvq_device_info *info, const quant_options *opt, double copy_gbps,
                        size_t copy_bytes, const quant_row *rows, const quant_result *res,
                        const int *done, int n_rows) {
    printf("clkvq-bench quant\n");
    printf("device:  %s / %s (driver %s, %d CUs)\n", info->platform, info->name,
           info->driver_version, info->compute_units);
    printf("shape:   %d kv heads x %d tokens x head_dim %d (Llama-3-8B, one layer), "
           "fp32 K and V, synthetic seed %d\n",
           N_KV_HEADS, opt->tokens, HEAD_DIM, SYNTH_SEED);
    printf("timing:  device time of quantize(K) + quantize(V), median of %d reps after "
           "1 warm-up\n",
           opt->reps);
    printf("params:  fp16 scale + float zero per group, clip alpha 1.0, no reorder\n");
    printf("copy:    %.1f GB/s (float4 copy of %.1f MiB, read + write)\n\n", copy_gbps,
           (double)copy_bytes / (1024.0 * 1024.0));

    static const char *const headers[] = {"format",    "axis K/V",  "group", "bits/elem",
                                          "K rel err", "V rel err", "ms",    "Mtok/s",
                                          "GB/s",      "x copy"};
    bench_table *t = bench_table_new(10, headers, "llrrrrrrrr");
    if (!t) return;
    for (int r = 0; r < n_rows; r++) {
        if (!done[r] || bench_table_add_row(t) < 0) continue;
        const quant_result *q = &res[r];
        bench_table_cell(t, 0, "%s", clkvq_format_get(rows[r].format)->name);
        bench_table_cell(t, 1, "%s/token", axis_name(rows[r].k_axis));
        bench_table_cell(t, 2, "%d", rows[r].group_size);
        bench_table_cell(t, 3, "%.3f", q->bits_per_element);
        bench_table_cell(t, 4, "%.4f", q->k_rel_err);
        bench_table_cell(t, 5, "%.4f", q->v_rel_err);
        bench_table_cell(t, 6, "%.3f", q->ms);
        bench_table_cell(t, 7, "%.2f", q->tokens_per_s / 1e6);
        bench_table_cell(t, 8, "%.1f", q->gbps);
        bench_table_cell(t, 9, "%.2f", q->ratio_copy);
    }
    bench_table_print(t, stdout);
    bench_table_free(t);
}

static int print_json(const clkvq_device_info *info, const quant_options *opt, double copy_gbps,
                      const quant_row *rows, const quant_result *res, const int *done, int n_rows) {
    cJSON *root = cJSON_CreateObject();
    if (!root) return BENCH_EXIT_FAILURE;
    char device[400];
    snprintf(device, sizeof device, "%s / %s", info->platform, info->name);
    cJSON_AddStringToObject(root, "device", device);
    cJSON_AddStringToObject(root, "device_key", info->device_key);
    cJSON_AddStringToObject(root, "driver_version", info->driver_version);
    cJSON_AddNumberToObject(root, "n_kv_heads", N_KV_HEADS);
    cJSON_AddNumberToObject(root, "tokens", opt->tokens);
    cJSON_AddNumberToObject(root, "head_dim", HEAD_DIM);
    cJSON_AddNumberToObject(root, "seed", SYNTH_SEED);
    cJSON_AddNumberToObject(root, "reps", opt->reps);
    cJSON_AddNumberToObject(root, "copy_gbps", copy_gbps);
    cJSON *list = cJSON_AddArrayToObject(root, "results");
    for (int r = 0; list && r < n_rows; r++) {
        if (!done[r]) continue;
        cJSON *e = cJSON_CreateObject();
        if (!e) break;
        cJSON_AddItemToArray(list, e);
        const quant_result *q = &res[r];
        cJSON_AddStringToObject(e, "format", clkvq_format_get(rows[r].format)->name);
        cJSON_AddStringToObject(e, "axis", axis_name(rows[r].k_axis));
        cJSON_AddStringToObject(e, "k_axis", axis_name(rows[r].k_axis));
        cJSON_AddStringToObject(e, "v_axis", axis_name(CLKVQ_AXIS_TOKEN));
        cJSON_AddNumberToObject(e, "group_size", rows[r].group_size);
        cJSON_AddNumberToObject(e, "bits_per_element", q->bits_per_element);
        cJSON_AddNumberToObject(e, "k_rel_err", q->k_rel_err);
        cJSON_AddNumberToObject(e, "v_rel_err", q->v_rel_err);
        cJSON_AddNumberToObject(e, "ms", q->ms);
        cJSON_AddNumberToObject(e, "tokens_per_s", q->tokens_per_s);
        cJSON_AddNumberToObject(e, "gbps", q->gbps);
        cJSON_AddNumberToObject(e, "ratio_copy", q->ratio_copy);
    }
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return BENCH_EXIT_FAILURE;
    puts(text);
    cJSON_free(text);
    return BENCH_EXIT_OK;
}

int bench_quant_main(int argc, char **argv) {
    quant_options opt;
    int rc = parse_options(argc, argv, &opt);
    if (rc < 0) return BENCH_EXIT_OK; /* --help */
    if (rc != BENCH_EXIT_OK) return rc;

    quant_row rows[CLKVQ_FMT_COUNT + 1];
    int n_rows = 0;
    for (int f = 0; f < CLKVQ_FMT_COUNT; f++)
        rows[n_rows++] = (quant_row){(clkvq_format)f, CLKVQ_AXIS_TOKEN, opt.group_size};
    rows[n_rows++] = (quant_row){CLKVQ_FMT_Q2, CLKVQ_AXIS_CHANNEL, 32}; /* KIVI keys */

    quant_bench b = {0};
    clkvq_status st = clkvq_context_create(&b.ctx, opt.device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "clkvq-bench quant: open device: %s: %s\n", clkvq_status_string(st),
                clkvq_last_error(NULL));
        return BENCH_EXIT_FAILURE;
    }
    clkvq_device_info info;
    st = clkvq_context_device_info(b.ctx, &info);
    if (st != CLKVQ_OK) {
        rc = report(&b, st, "device info");
        goto out;
    }
    rc = setup(&b, &opt, rows, n_rows);
    if (rc != BENCH_EXIT_OK) goto out;

    size_t copy_bytes = b.n_elements * sizeof(float) * 2; /* K + V, what one rep reads */
    double copy_gbps = 0.0;
    st = clkvq_copy_bandwidth(b.ctx, copy_bytes, opt.reps, &copy_gbps);
    if (st != CLKVQ_OK) {
        rc = report(&b, st, "copy bandwidth");
        goto out;
    }

    quant_result res[CLKVQ_FMT_COUNT + 1];
    int done[CLKVQ_FMT_COUNT + 1] = {0};
    for (int r = 0; r < n_rows; r++) {
        clkvq_quant_params qk = row_params(&rows[r], 1), qv = row_params(&rows[r], 0);
        if (clkvq_quant_params_validate(b.ctx, &qk, &b.shape) != CLKVQ_OK ||
            clkvq_quant_params_validate(b.ctx, &qv, &b.shape) != CLKVQ_OK) {
            fprintf(stderr, "clkvq-bench quant: skipping %s %s group %d: %s\n",
                    clkvq_format_get(rows[r].format)->name, axis_name(rows[r].k_axis),
                    rows[r].group_size, clkvq_last_error(b.ctx));
            continue;
        }
        rc = run_row(&b, &opt, &rows[r], copy_gbps, &res[r]);
        if (rc != BENCH_EXIT_OK) goto out;
        done[r] = 1;
    }
    if (opt.json)
        rc = print_json(&info, &opt, copy_gbps, rows, res, done, n_rows);
    else
        print_table(&info, &opt, copy_gbps, copy_bytes, rows, res, done, n_rows);
out:
    teardown(&b);
    return rc;
}
