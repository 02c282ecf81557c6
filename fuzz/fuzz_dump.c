/*
 * libFuzzer target for the calibration dump reader (lib/kv_dump.c).
 *
 * Feeds the input to clkvq_dump_open_memory and, when it opens, reads every
 * tensor of every layer: the open must reject every malformed header with
 * CLKVQ_ERR_CORRUPT, and whatever it accepts must then read entirely inside
 * the input (ASan catches any byte past it: libFuzzer hands us a buffer of
 * exactly `size` bytes). No OpenCL device is involved: ctx is NULL.
 *
 * Build (clang): clang -fsanitize=fuzzer,address,undefined fuzz/fuzz_dump.c
 * lib/kv_dump.c + the rest of the library (CMake: -DCLKVQ_BUILD_FUZZ=ON).
 * Run: ./fuzz_dump -max_total_time=60 -dict=dump.dict CORPUS_DIR SEED_DIR
 * with seeds from `dump_check write` (tests/dump_check.c). Useful dict
 * entries: "layers." ".q" ".k" ".v" "dtype" "shape" "data_offsets" "F32"
 * "F16" "BF16" "__metadata__" "model".
 */
#include "clkvq.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    clkvq_kv_dump *dump = NULL;
    if (clkvq_dump_open_memory(NULL, data, size, &dump) != CLKVQ_OK) return 0;
    clkvq_dump_info info;
    if (clkvq_dump_info_get(dump, &info) != CLKVQ_OK) abort(); /* an opened dump always has info */
    /* Every tensor lies inside the input and holds at least 2 bytes per
     * element, so this buffer is at most 2x the input. */
    size_t n = (size_t)info.n_q_heads * (size_t)info.n_tokens * (size_t)info.head_dim;
    float *buf = malloc(n * sizeof(float));
    if (buf) {
        for (int l = 0; l < info.n_layers; l++)
            for (int w = 0; w < 3; w++) {
                clkvq_status st = clkvq_dump_read(dump, l, "qkv"[w], buf);
                if (st != CLKVQ_OK && st != CLKVQ_ERR_NONFINITE)
                    abort(); /* validated at open: reads must not fail otherwise */
            }
        free(buf);
    }
    clkvq_dump_close(dump);
    return 0;
}
