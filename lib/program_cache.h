/*
 * Program building and the on-disk program binary cache.
 *
 * Programs are built from embedded cl_kernels/ sources (concatenated in the
 * order given) with -D options. Built programs are kept per context in
 * memory and on disk under <cache dir>/programs/.
 *
 * Key: FNV-1a 64 over (the concatenated source, the options, the platform
 * version, device name, device version and driver version). File:
 * programs/<16 hex digits of the key>.bin = a header (magic "CLKVQPB1",
 * the full key string length + key string, binary size, FNV-1a of the
 * binary) followed by the binary. An entry whose magic, key string, size or
 * checksum does not match, or that the driver refuses, is rebuilt from
 * source and rewritten, never trusted. So is anything at that path that is
 * not a regular file of at most CLKVQ_PROGRAM_FILE_MAX bytes (a directory
 * cannot be replaced, so it costs every process a build, nothing more).
 * Concurrency: a writer writes <name>.tmp.<pid>.<counter> and renames it
 * over <name>; rename is atomic, so a reader sees a whole old or a whole new
 * file, and two racing writers only lose one identical copy.
 */
#ifndef CLKVQ_PROGRAM_CACHE_H
#define CLKVQ_PROGRAM_CACHE_H

#include "internal.h"

/* The largest program file read or written. Our biggest programs compile to
 * well under 1 MiB on PoCL; drivers that store IR next to machine code for
 * several targets run bigger. 256 MiB leaves more than two orders of
 * magnitude of room while bounding what a stray file at an entry's path can
 * make us allocate (the tuning loader's bound is 16 MiB, for the same
 * reason). A program whose binary exceeds it is simply not cached. */
#define CLKVQ_PROGRAM_FILE_MAX ((uint64_t)256 << 20)

/* The embedded text of cl_kernels/<name> (e.g. "quantize.cl"), or NULL. */
const char *clkvq_kernel_source(const char *name);

/* A built program for sources + options (memory, then disk, then build).
 * The context owns it: do not release. */
clkvq_status clkvq_program_get(clkvq_context *ctx, const char *const *sources, int n_sources,
                               const char *options, cl_program *out);

/* A kernel of such a program, cached by (program, name); context-owned. */
clkvq_status clkvq_kernel_get(clkvq_context *ctx, const char *const *sources, int n_sources,
                              const char *options, const char *kernel_name, cl_kernel *out);

void clkvq_program_cache_free(clkvq_context *ctx);

typedef struct {
    int memory_hits;  /* served from this context's memory */
    int disk_hits;    /* loaded from a binary file */
    int builds;       /* compiled from source */
    int disk_rejects; /* files found but not trusted (corrupt/mismatched) */
    double build_seconds; /* wall time spent in clBuildProgram, all kinds */
} clkvq_program_stats;

void clkvq_program_stats_get(const clkvq_context *ctx, clkvq_program_stats *out);

/* The cache directory: $CLKVQ_CACHE_DIR, else $XDG_CACHE_HOME/clkvq, else
 * $HOME/.cache/clkvq; with sub ("programs", "tuning", ...) appended and
 * created (mkdir -p). */
clkvq_status clkvq_cache_dir(clkvq_context *ctx, const char *sub, char *buf, size_t buf_size);

/* Writes data to path atomically (temp file in the same folder + rename). */
clkvq_status clkvq_atomic_write(clkvq_context *ctx, const char *path, const void *data,
                                size_t size);

uint64_t clkvq_fnv1a64(uint64_t hash, const void *data, size_t size);
#define CLKVQ_FNV_OFFSET 0xcbf29ce484222325ULL

#endif
