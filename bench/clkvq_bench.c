/* clkvq-bench: benchmarks that print tables. A thin user of the public API
 * (include/clkvq.h): it never reaches into library internals. */
#include "bench_util.h"

#include "clkvq.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    const char *name;
    const char *summary;
    int (*main)(int argc, char **argv);
} bench_command;

static const bench_command commands[] = {
    {"quant", "quantize a synthetic Llama-3-8B layer KV per format: error, throughput",
     bench_quant_main},
    {"attention", "decode attention over a synthetic KV cache per shape, length, batch, format",
     bench_attention_main},
    {"append", "one-token cache append per layer next to one decode, per format",
     bench_append_main},
    {"decode", "one decode configuration spelled out (tunables, layouts); instruction counts",
     bench_decode_main},
    {"serve", "continuous batching over a paged cache: tokens/s, peak pages vs contiguous",
     bench_serve_main},
    {"heads", "per-head bits (two pairs over a layer's heads) vs the uniform layers",
     bench_heads_main},
};
#define N_COMMANDS ((int)(sizeof commands / sizeof commands[0]))

static void usage(FILE *out) {
    fprintf(out, "usage: clkvq-bench <command> [options]\n"
                 "       clkvq-bench --list-devices | --version | --help\n"
                 "\n"
                 "commands:\n");
    for (int i = 0; i < N_COMMANDS; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "\n"
                 "'clkvq-bench <command> --help' describes a command's options.\n"
                 "Device: --device SPEC on a command, else $CLKVQ_DEVICE, else the first GPU,\n"
                 "else the first device (an index from --list-devices or a name substring).\n"
                 "\n"
                 "exit codes: 0 ok, 1 runtime failure (OpenCL, device, kernel), 2 usage error\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return BENCH_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage(stdout);
        return BENCH_EXIT_OK;
    }
    if (!strcmp(cmd, "--version")) {
        printf("clkvq-bench %d.%d.%d\n", CLKVQ_VERSION_MAJOR, CLKVQ_VERSION_MINOR,
               CLKVQ_VERSION_PATCH);
        return BENCH_EXIT_OK;
    }
    if (!strcmp(cmd, "--list-devices")) {
        clkvq_status st = clkvq_list_devices(stdout);
        if (st != CLKVQ_OK) {
            fprintf(stderr, "clkvq-bench: %s: %s\n", clkvq_status_string(st),
                    clkvq_last_error(NULL));
            return BENCH_EXIT_FAILURE;
        }
        return BENCH_EXIT_OK;
    }
    for (int i = 0; i < N_COMMANDS; i++)
        if (!strcmp(cmd, commands[i].name)) return commands[i].main(argc - 1, argv + 1);
    fprintf(stderr, "clkvq-bench: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return BENCH_EXIT_USAGE;
}
