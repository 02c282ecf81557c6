/*
 * clkvq: low-bit KV-cache quantization kernels for OpenCL.
 *
 * This header is the whole public API. Every call returns a clkvq_status;
 * clkvq_status_string() names it and clkvq_last_error() carries the detail
 * (the OpenCL build log, the bad argument and why) for the context it was
 * called on. Nothing is enqueued before the arguments have been validated.
 *
 * Tensor shapes follow the KV cache: [n_heads][n_tokens][head_dim], fp32,
 * row-major, channels innermost.
 */
#ifndef CLKVQ_H
#define CLKVQ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#include <CL/cl.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * CLKVQ_API marks every function of the public API, and nothing else: the
 * library is built with hidden visibility by default (-fvisibility=hidden),
 * so internal helpers, tables and test hooks are not exported
 * (scripts/check_exports.sh holds the build to that). On Windows, define
 * CLKVQ_DLL_EXPORT when building the DLL and CLKVQ_DLL_IMPORT when linking
 * it; a static library needs neither. A user may predefine CLKVQ_API.
 */
#ifndef CLKVQ_API
#if defined(__GNUC__) && __GNUC__ >= 4 && !defined(_WIN32)
#define CLKVQ_VISIBLE __attribute__((visibility("default")))
#else
#define CLKVQ_VISIBLE
#endif
#if defined(_WIN32) && defined(CLKVQ_DLL_EXPORT)
#define CLKVQ_API __declspec(dllexport) CLKVQ_VISIBLE
#elif defined(_WIN32) && defined(CLKVQ_DLL_IMPORT)
#define CLKVQ_API __declspec(dllimport) CLKVQ_VISIBLE
#else
#define CLKVQ_API CLKVQ_VISIBLE
#endif
#endif

#define CLKVQ_VERSION_MAJOR 0
#define CLKVQ_VERSION_MINOR 1
#define CLKVQ_VERSION_PATCH 0

/* ---------------------------------------------------------------- status */

typedef enum {
    CLKVQ_OK = 0,
    CLKVQ_ERR_INVALID_ARG,     /* a null handle, a bad shape or value */
    CLKVQ_ERR_UNSUPPORTED,     /* a format/option combination not in the table */
    CLKVQ_ERR_NO_DEVICE,       /* no OpenCL platform/device matches */
    CLKVQ_ERR_OPENCL,          /* an OpenCL call failed (code in the message) */
    CLKVQ_ERR_BUILD,           /* kernel build failed (log in the message) */
    CLKVQ_ERR_OUT_OF_MEMORY,   /* host or device allocation failed */
    CLKVQ_ERR_NONFINITE,       /* NaN/Inf or |x| > 65504 in the input */
    CLKVQ_ERR_BUFFER_TOO_SMALL,/* a caller buffer is smaller than required */
    CLKVQ_ERR_IO,              /* a file could not be read or written */
    CLKVQ_ERR_CORRUPT,         /* a file is malformed; it was not trusted */
    CLKVQ_ERR_DEVICE_LIMIT,    /* exceeds a device limit (work-group, memory) */
    CLKVQ_ERR_OUT_OF_BLOCKS    /* the cache's page pool has too few free pages */
} clkvq_status;

/* A static string naming the status ("CLKVQ_ERR_NONFINITE: ..."). */
CLKVQ_API const char *clkvq_status_string(clkvq_status status);

/* ---------------------------------------------------------------- context */

typedef struct clkvq_context clkvq_context;

/*
 * Picks a device itself. device_spec: NULL or "" reads $CLKVQ_DEVICE; a
 * decimal number is an index into the list of all devices of all platforms
 * (as clkvq_list_devices prints them), anything else a case-insensitive
 * substring of "<platform> <device name>". Default: the first GPU, else the
 * first device. The queue has profiling enabled.
 */
CLKVQ_API clkvq_status clkvq_context_create(clkvq_context **out, const char *device_spec);

/*
 * Wraps a runtime's own OpenCL objects; they are retained, not copied, and
 * released again by clkvq_context_release. Profiling on the queue is
 * optional (only the autotuner and benchmarks need it).
 */
CLKVQ_API clkvq_status clkvq_context_wrap(clkvq_context **out, cl_context cl_ctx,
                                          cl_device_id device, cl_command_queue queue);

CLKVQ_API void clkvq_context_release(clkvq_context *ctx);

/* The detail of the last failing call on ctx ("" if none). ctx may be NULL:
 * then the message of the last failure of a call given a NULL context on
 * this thread is returned. */
CLKVQ_API const char *clkvq_last_error(const clkvq_context *ctx);

CLKVQ_API cl_context clkvq_context_cl_context(const clkvq_context *ctx);
CLKVQ_API cl_device_id clkvq_context_cl_device(const clkvq_context *ctx);
CLKVQ_API cl_command_queue clkvq_context_cl_queue(const clkvq_context *ctx);

typedef struct {
    char platform[128];
    char vendor[128];
    char name[256];
    char driver_version[128];
    char device_version[128];
    int is_gpu;
    int compute_units;
    size_t max_work_group_size;
    uint64_t local_mem_bytes;
    uint64_t global_mem_bytes;
    uint64_t max_alloc_bytes;
    /* vendor_name_driver_cu, sanitized for a file name */
    char device_key[384];
} clkvq_device_info;

CLKVQ_API clkvq_status clkvq_context_device_info(const clkvq_context *ctx, clkvq_device_info *out);

/* Device time in milliseconds (from OpenCL profiling events) of the kernels
 * the last call on ctx enqueued; -1 when the queue has no profiling. After
 * an asynchronous call (clkvq_cache_decode) it waits for those kernels. */
CLKVQ_API double clkvq_last_device_ms(const clkvq_context *ctx);

/*
 * Measures copy bandwidth (GB/s, bytes read + bytes written per second) of
 * a plain device copy kernel over a buffer of `bytes`, median of `reps`
 * runs after a warm-up: the roof that benchmarks quote ratios against.
 */
CLKVQ_API clkvq_status clkvq_copy_bandwidth(clkvq_context *ctx, size_t bytes, int reps,
                                            double *gbps);

/* Prints one line per OpenCL device: "<index>: <platform> / <device> (<type>)". */
CLKVQ_API clkvq_status clkvq_list_devices(FILE *out);

/* ---------------------------------------------------------------- formats */

typedef enum {
    CLKVQ_FMT_Q8 = 0,  /* 8-bit codes, 4 per 32-bit word */
    CLKVQ_FMT_Q4,      /* 4-bit codes, 8 per word */
    CLKVQ_FMT_Q3,      /* 3-bit codes, 32 per 3 words (a bit stream) */
    CLKVQ_FMT_Q2,      /* 2-bit codes, 16 per word */
    CLKVQ_FMT_T15,     /* "1.5-bit": three levels, 5 trits per byte (1.6 bits) */
    CLKVQ_FMT_COUNT
} clkvq_format;

/* How a format packs, one row of the format table. */
typedef struct {
    clkvq_format format;
    const char *name;       /* "q8", "q4", "q3", "q2", "t1.5" */
    const char *bits_name;  /* "8", "4", "3", "2", "1.5" (as configs write it) */
    int levels;             /* 256, 16, 8, 4, 3 */
    int codes_per_block;    /* 4, 8, 32, 16, 5 */
    int bytes_per_block;    /* 4, 4, 12, 4, 1 */
    double code_bits;       /* storage bits per code: 8, 4, 3, 2, 1.6 */
} clkvq_format_info;

CLKVQ_API const clkvq_format_info *clkvq_format_get(clkvq_format format);
/* Accepts "q8"/"8", "q4"/"4", "q3"/"3", "q2"/"2", "t1.5"/"1.5". */
CLKVQ_API clkvq_status clkvq_format_parse(const char *text, clkvq_format *out);

typedef enum {
    CLKVQ_AXIS_TOKEN = 0, /* groups of group_size channels along head_dim */
    CLKVQ_AXIS_CHANNEL    /* groups of group_size tokens of one channel (KIVI keys) */
} clkvq_axis;

typedef enum {
    CLKVQ_PARAM_FP16 = 0, /* scale and zero as IEEE half */
    CLKVQ_PARAM_FP8_E4M3  /* scale and zero as fp8 e4m3 (max 448) */
} clkvq_param_type;

typedef enum {
    CLKVQ_ZERO_FLOAT = 0, /* x = code * scale + zero, zero = clipped min (SKVQ, KIVI) */
    CLKVQ_ZERO_INT        /* x = (code - zero) * scale, zero an integer code (KVTuner) */
} clkvq_zero_mode;

typedef struct {
    clkvq_format format;
    clkvq_axis axis;
    int group_size;          /* a multiple of 32 */
    float clip_alpha;        /* in (0, 1]; min and max are both scaled by it */
    clkvq_param_type param_type;
    clkvq_zero_mode zero_mode;
} clkvq_quant_params;

/* format Q4, token axis, group 32, alpha 1, fp16 params, float zero */
CLKVQ_API clkvq_quant_params clkvq_quant_params_default(void);

typedef struct {
    int n_heads;
    int n_tokens;
    int head_dim;
} clkvq_shape;

/* Sizes of the packed codes and the per-group parameters for a shape.
 * Codes: token axis [n_heads][n_tokens][head_dim/group codes groups];
 * channel axis [n_heads][ceil(n_tokens/group)][head_dim][group codes]. */
typedef struct {
    size_t group_bytes;   /* packed bytes of one group's codes */
    size_t param_bytes;   /* bytes of one group's (scale, zero) */
    size_t n_groups;      /* groups in the whole tensor */
    size_t code_bytes;    /* total */
    size_t params_bytes;  /* total */
    double bits_per_element; /* codes + params, per real element */
} clkvq_quant_layout;

CLKVQ_API clkvq_status clkvq_quant_layout_get(const clkvq_quant_params *qp,
                                              const clkvq_shape *shape, clkvq_quant_layout *out);

/* Checks qp against shape (and itself); fills a message on ctx (may be NULL). */
CLKVQ_API clkvq_status clkvq_quant_params_validate(clkvq_context *ctx, const clkvq_quant_params *qp,
                                                   const clkvq_shape *shape);

/* ------------------------------------------------------------ quantization */

/*
 * Quantizes x (fp32 [n_heads][n_tokens][head_dim]) into codes and params
 * on the device. perm (int32 [n_heads][head_dim], or NULL for identity)
 * gathers channels: output channel c of head h is input channel
 * perm[h*head_dim + c]; quantization groups run over the permuted channels,
 * so no reordered copy of x ever exists.
 * Input with NaN, Inf or |x| > 65504 is rejected with CLKVQ_ERR_NONFINITE and
 * nothing is written. Blocks until done.
 */
CLKVQ_API clkvq_status clkvq_quantize(clkvq_context *ctx, const clkvq_quant_params *qp,
                                      const clkvq_shape *shape, cl_mem x, cl_mem perm, cl_mem codes,
                                      cl_mem params);

/* Dequantizes to fp32 [n_heads][n_tokens][head_dim]. With perm, channels are
 * put back in their original order; without, they stay in packed order. */
CLKVQ_API clkvq_status clkvq_dequantize(clkvq_context *ctx, const clkvq_quant_params *qp,
                                        const clkvq_shape *shape, cl_mem codes, cl_mem params,
                                        cl_mem perm, cl_mem out);

/* Host-memory conveniences around the two calls above (copy in, run, copy
 * out). codes/params must hold clkvq_quant_layout_get's sizes. */
CLKVQ_API clkvq_status clkvq_quantize_host(clkvq_context *ctx, const clkvq_quant_params *qp,
                                           const clkvq_shape *shape, const float *x,
                                           const int32_t *perm, void *codes, size_t codes_size,
                                           void *params, size_t params_size);
CLKVQ_API clkvq_status clkvq_dequantize_host(clkvq_context *ctx, const clkvq_quant_params *qp,
                                             const clkvq_shape *shape, const void *codes,
                                             const void *params, const int32_t *perm, float *out);

/* ---------------------------------------------------------------- KV cache */

typedef enum {
    CLKVQ_SCHEME_FP16 = 0, /* no quantization: the baseline */
    CLKVQ_SCHEME_TOKEN,    /* per-token groups, every token quantized at once */
    CLKVQ_SCHEME_KIVI,     /* per-channel K in blocks of `residual` tokens, per-token V,
                              fp16 residual: K waits until R tokens gather, V keeps the
                              last R tokens */
    CLKVQ_SCHEME_SKVQ,     /* reordered channels, clipped per-token groups, fp16 window of
                              the last `window` tokens and the first `n_sink` tokens */
    CLKVQ_SCHEME_COUNT
} clkvq_scheme;

CLKVQ_API const char *clkvq_scheme_name(clkvq_scheme scheme); /* "fp16", "token", "kivi", "skvq" */
CLKVQ_API clkvq_status clkvq_scheme_parse(const char *text, clkvq_scheme *out);

/* Where the packed per-token groups of a (sequence, kv head) lie. Both keep
 * a group's bytes together; the autotuner picks per device. */
typedef enum {
    CLKVQ_LAYOUT_TOKEN_MAJOR = 0, /* [token][group]: a token's row is contiguous */
    CLKVQ_LAYOUT_GROUP_PLANAR,    /* [group][token]: one group of consecutive tokens is
                                     contiguous (vector/coalesced loads across tokens) */
    CLKVQ_LAYOUT_COUNT,
    CLKVQ_LAYOUT_AUTO = 100       /* at create: what tuning found fastest for layer 0 */
} clkvq_layout;

typedef struct {
    clkvq_scheme scheme;
    clkvq_format format_k, format_v;
    int group_size;            /* channels (or KIVI key tokens) per group */
    float clip_k, clip_v;      /* SKVQ clip ratios (1 = no clipping) */
    clkvq_param_type param_type;
    clkvq_zero_mode zero_mode;
    int window;                /* skvq: recent tokens kept in fp16 */
    int n_sink;                /* skvq: first tokens kept in fp16 */
    int residual;              /* kivi: R, a multiple of group_size */
    const int32_t *perm_k;     /* [n_kv_heads][head_dim] or NULL; copied at create */
    const int32_t *perm_v;
    /* skvq: CLKVQ_AXIS_CHANNEL packs keys as kivi does (per-channel groups
     * of group_size tokens) inside SKVQ's sinks and window: K and V leave
     * the window together, a block of group_size tokens at a time (the
     * first block after the sinks may be partial). CLKVQ_AXIS_TOKEN (0):
     * SKVQ's per-token key groups. kivi keys are always per channel. */
    clkvq_axis key_axis;
    /* Stored rows are y = P(R(x - mean)): centering by per-channel means,
     * then (rotate = 1) a randomized Walsh-Hadamard rotation R per kv head
     * (blocks of the largest power of two dividing head_dim, signs drawn
     * from rot_seed, the kv head and the channel), then the permutation.
     * The query is rotated (and permuted) once per step and the output
     * mapped back once, so attention is unchanged while outliers spread
     * over the block. A runtime may fold R and P into W_k / W_v instead. */
    int rotate;
    uint32_t rot_seed;
    const float *mean_k;       /* [n_kv_heads][head_dim] or NULL; copied at create */
    const float *mean_v;       /* subtracted at append, added back to the output */
    /* Per-kv-head bits (KVTuner's per-head configs): [n_kv_heads] formats,
     * or NULL for format_k / format_v on every head; copied at create. A
     * layer whose heads carry different (K, V) pairs is stored as one share
     * per distinct pair (in order of the pair's first head), each with its
     * own packed pages and program variant: an append writes every share,
     * a decode runs one launch per share over the heads that use it (their
     * queries gathered, outputs scattered back), with tuning looked up for
     * the share's pair and head count. Within a share, rotation signs are
     * drawn by a head's index in the share (attention and read-back do not
     * depend on them); rotation with perms on such a layer is refused,
     * since its perms were fitted to the model's head signs. */
    const clkvq_format *head_format_k;
    const clkvq_format *head_format_v;
} clkvq_layer_config;

/* Defaults per scheme: q4/q4, group 32 (skvq 128, window 128, 5 sinks,
 * clip 1), kivi residual 128, fp16 params, float zero, no permutation. */
CLKVQ_API clkvq_layer_config clkvq_layer_config_default(clkvq_scheme scheme);

/*
 * Storage: every layer keeps its packed tokens (and the fp16 scheme its
 * fp16 rows) in a pool of pages of block_size tokens; a sequence holds a
 * block table of the pages its tokens live in, as vLLM's paged attention
 * does. Sinks and recent tokens of skvq/kivi stay in small per-sequence
 * fp16 rings. block_size 0 is the contiguous cache: one page of the whole
 * capacity per sequence, owned from creation. With block_size > 0 pages
 * are taken from the pool as tokens arrive and returned on truncation, and
 * clkvq_cache_fork shares them between sequences (copy-on-write); with
 * runtime_tables the runtime brings its own block manager and passes its
 * block table to clkvq_cache_append_paged / clkvq_cache_decode_paged.
 */
typedef struct {
    int n_layers;
    int n_seqs;
    int capacity;              /* tokens per sequence, at most */
    int n_kv_heads;
    int n_q_heads;             /* a multiple of n_kv_heads (GQA) */
    int head_dim;
    clkvq_layout layout_k, layout_v;
    const clkvq_layer_config *layers; /* n_layers entries */
    int block_size;            /* tokens per page: 0 = contiguous, else a multiple of 16
                                  and of every KIVI layer's group size */
    int n_blocks;              /* pages in each layer's pool; 0: n_seqs * ceil(capacity /
                                  block_size), enough for every sequence at capacity */
    int runtime_tables;        /* 1: the runtime manages pages (needs block_size > 0) */
} clkvq_cache_config;

typedef struct {
    size_t device_bytes;       /* all buffers of the cache */
    size_t quantized_bytes;    /* codes + params */
    size_t fp16_bytes;         /* windows, sinks, residuals */
    double bits_per_element;   /* device_bytes over capacity * n_seqs * heads * dim * 2 */
} clkvq_cache_memory;

/* Validates cfg and computes what create would allocate (nothing is). */
CLKVQ_API clkvq_status clkvq_cache_plan(clkvq_context *ctx, const clkvq_cache_config *cfg,
                                        clkvq_cache_memory *out);

typedef struct clkvq_cache clkvq_cache;

CLKVQ_API clkvq_status clkvq_cache_create(clkvq_context *ctx, const clkvq_cache_config *cfg,
                                          clkvq_cache **out);
CLKVQ_API void clkvq_cache_release(clkvq_cache *cache);

/*
 * Appends n_tokens of K and V ([n_kv_heads][n_tokens][head_dim] fp32, channels
 * in the model's order) to sequence seq of one layer: a prefill chunk or one
 * decode token. Tokens that leave the fp16 window are quantized (KIVI keys
 * in whole blocks of R). On any error (capacity, shape, NaN/Inf, device
 * failure before the first write) the cache is exactly as it was.
 */
CLKVQ_API clkvq_status clkvq_cache_append(clkvq_cache *cache, int layer, int seq, int n_tokens,
                                          const float *k, const float *v);
/* The same from device buffers of the cache's context. */
CLKVQ_API clkvq_status clkvq_cache_append_mem(clkvq_cache *cache, int layer, int seq, int n_tokens,
                                              cl_mem k, cl_mem v);

/* Tokens stored for seq in layer. */
CLKVQ_API clkvq_status clkvq_cache_length(const clkvq_cache *cache, int layer, int seq,
                                          int *n_tokens);

/*
 * Keeps the first n_tokens of seq in every layer (0 clears it). Tokens that
 * the shorter sequence keeps in fp16 but that were quantized come back as
 * their dequantized values rounded to fp16.
 */
CLKVQ_API clkvq_status clkvq_cache_truncate(clkvq_cache *cache, int seq, int n_tokens);

/* Reads seq of layer back as fp32 [n_kv_heads][length][head_dim] in the
 * model's channel order: dequantized where quantized. k or v may be NULL. */
CLKVQ_API clkvq_status clkvq_cache_read(clkvq_cache *cache, int layer, int seq, float *k, float *v);

/*
 * Decode attention for one layer: one query per sequence, q fp32
 * [n_seqs][n_q_heads][head_dim] (model channel order) -> out, same shape.
 * softmax(scale * q.K^T) V over every token of each sequence; a sequence of
 * length 0 gets zeros. Scores come straight from the packed codes.
 *
 * Asynchronous: the kernels are enqueued on the context's queue and the
 * call returns without waiting for them (no host round trip per layer and
 * step; sequence lengths reach the device with non-blocking writes). out
 * is complete for every later command on that queue (an in-order queue:
 * a clEnqueueReadBuffer, the runtime's next kernel) and after clFinish;
 * q and out must not be changed or read by other means before that. The
 * _host variant and every other call that returns data block as before.
 * With profiling on the queue, clkvq_last_device_ms waits for the
 * kernels and returns their device time.
 */
CLKVQ_API clkvq_status clkvq_cache_decode(clkvq_cache *cache, int layer, cl_mem q, cl_mem out,
                                          float scale);
CLKVQ_API clkvq_status clkvq_cache_decode_host(clkvq_cache *cache, int layer, const float *q,
                                               float *out, float scale);

/*
 * Multi-query decode (speculative decoding verifies several draft tokens
 * per step): n_queries (1..16) queries per sequence in one call, q and out
 * fp32 [n_seqs][n_queries][n_q_heads][head_dim]. The drafts' K/V are
 * appended first; query i of a sequence of length n attends causally to
 * tokens 0 .. n - n_queries + i (a sequence shorter than that gives zeros
 * for the queries that see no token). The same split-K kernels serve every
 * query in one launch (the cooperative variant in blocks of up to 8 query
 * rows per work-group). Asynchronous, as clkvq_cache_decode.
 */
CLKVQ_API clkvq_status clkvq_cache_decode_multi(clkvq_cache *cache, int layer, int n_queries, cl_mem q,
                                      cl_mem out, float scale);

/* ---------------------------------------------------------------- pages */

/*
 * Starts seq_dst as a copy of seq_src in every layer (seq_dst must be
 * empty): the pages are shared (reference counts) and the fp16 rings are
 * copied; a later append to either sequence copies a shared page before
 * writing it (copy-on-write), so neither ever changes the other. In the
 * contiguous cache the page is copied; with runtime tables only the rings
 * and lengths are (the runtime shares its pages and copies them with
 * clkvq_cache_copy_blocks before writing).
 */
CLKVQ_API clkvq_status clkvq_cache_fork(clkvq_cache *cache, int seq_src, int seq_dst);

/* Runtime tables: copies the contents of pages src[i] to dst[i] in every
 * layer (K and V), the copy-on-write step of the runtime's manager. */
CLKVQ_API clkvq_status clkvq_cache_copy_blocks(clkvq_cache *cache, const int *src, const int *dst, int n);

typedef struct {
    int block_size;            /* tokens per page */
    int n_blocks;              /* pages in the pool */
    int used_blocks;           /* pages some sequence holds */
    int free_blocks;
    int shared_blocks;         /* pages held by more than one sequence */
    size_t block_bytes;        /* device bytes of one page (K and V) */
} clkvq_pool_stats;

/* The page pool of one layer (library-managed tables; with runtime tables
 * used/free/shared are unknown to the library and reported as -1). */
CLKVQ_API clkvq_status clkvq_cache_pool_stats(const clkvq_cache *cache, int layer, clkvq_pool_stats *out);

/*
 * The runtime's own block manager (runtime_tables): as clkvq_cache_append_mem
 * and clkvq_cache_decode_multi, with the pages named by block_table, an
 * int32 device buffer [n_seqs][max_blocks] of page ids (0 .. n_blocks - 1)
 * that covers every token of the sequences touched. Append checks the ids
 * it writes through (a bad one: CLKVQ_ERR_INVALID_ARG, nothing written);
 * decode masks tokens whose page id is outside the pool rather than read
 * out of bounds. Decode is asynchronous (clkvq_cache_decode): block_table,
 * like q, is read by the enqueued kernels.
 */
CLKVQ_API clkvq_status clkvq_cache_append_paged(clkvq_cache *cache, int layer, int seq, int n_tokens,
                                      cl_mem k, cl_mem v, cl_mem block_table, int max_blocks);
CLKVQ_API clkvq_status clkvq_cache_decode_paged(clkvq_cache *cache, int layer, int n_queries, cl_mem q,
                                      cl_mem out, float scale, cl_mem block_table,
                                      int max_blocks);

/* Tunables of the fused decode kernels (compile-time defines). 0 in a
 * field means "the default for this device" (the tuning database for the
 * decode's batch and length, else built-in defaults). Each variant reads
 * its own fields and ignores the others'. */
typedef enum {
    CLKVQ_ATTN_DEFAULT = 0,   /* serial on CPUs, cooperative on GPUs */
    CLKVQ_ATTN_COOPERATIVE,   /* a work-group walks tiles of wgs x tpl tokens with an online
                                 softmax: lanes over tokens for K, over (V words, token
                                 slices) for V; split-K sized to the device (any layout) */
    CLKVQ_ATTN_SERIAL         /* one work-item per chunk, explicit vectors with VW tokens
                                 per lane group (needs GROUP_PLANAR packed layouts) */
} clkvq_attn_variant;

typedef struct {
    clkvq_attn_variant variant;
    int wgs;   /* cooperative: work-items per work-group, a power of 2, >= 16 */
    int chunk; /* serial: tokens per split-K chunk, a multiple of vw */
    int vw;    /* serial: vector width, 4, 8 or 16 */
    int tpl;   /* cooperative: tokens per work-item in a tile (1, 2, 4) */
    int vwpl;  /* cooperative: V words per work-item (1, 2, 4; rounded down to what the
                  V format's groups allow); 0 where it is resolved: automatic, the most
                  that keep 64 accumulators per work-item */
    int waves; /* cooperative: work-groups per compute unit the split-K aims for (1..64):
                  no split when sequences x kv heads already fill that many */
} clkvq_attn_tuning;

/* Overrides the decode tunables of this cache (NULL: back to defaults), as
 * CLBlast's OverrideParameters does. Validated against device limits. */
CLKVQ_API clkvq_status clkvq_cache_set_tuning(clkvq_cache *cache, const clkvq_attn_tuning *tuning);
/* The tunables a decode of layer 0 uses now (defaults resolved; the tuned
 * entry nearest the batch and the longest sequence as they stand). */
CLKVQ_API clkvq_status clkvq_cache_get_tuning(const clkvq_cache *cache, clkvq_attn_tuning *out);

/*
 * Causal prefill attention for the last n_queries tokens of seq (already
 * appended): q fp32 [n_q_heads][n_queries][head_dim] -> out, same shape;
 * query i sits at position length - n_queries + i and attends to tokens
 * 0..that position. GEMM-shaped: CLBlast batched GEMMs over the cache
 * dequantized to scratch.
 */
CLKVQ_API clkvq_status clkvq_cache_prefill_host(clkvq_cache *cache, int layer, int seq,
                                                int n_queries, const float *q, float *out,
                                                float scale);

/*
 * The fp32 baseline: decode attention for one sequence through CLBlast
 * GEMVs (scores = K q, softmax, out = V^T p per query head). k and v are
 * fp32 [n_kv_heads][n_tokens][head_dim], q and out [n_q_heads][head_dim],
 * all device buffers. Blocks; clkvq_last_device_ms covers its kernels.
 */
CLKVQ_API clkvq_status clkvq_gemv_decode(clkvq_context *ctx, int n_q_heads, int n_kv_heads,
                                         int head_dim, int n_tokens, cl_mem k, cl_mem v, cl_mem q,
                                         cl_mem out, float scale);

/* ------------------------------------------------------------ autotuning */

/* The shape a tuning result is for. */
typedef struct {
    clkvq_scheme scheme;
    clkvq_format format_k, format_v;
    int group_size;
    int head_dim, n_q_heads, n_kv_heads;
    int tokens; /* context length the timing used */
    int batch;  /* sequences decoded per step */
} clkvq_tune_shape;

/* What a tuned decode uses: the kernel tunables and the cache layouts. */
typedef struct {
    clkvq_attn_tuning attn;
    clkvq_layout layout_k, layout_v;
} clkvq_tune_params;

typedef struct {
    char kernel[32];         /* "decode" */
    clkvq_tune_shape shape;
    clkvq_tune_params params;
    double default_ms;       /* built-in defaults, same run */
    double tuned_ms;
    int n_candidates;        /* timed */
    int n_rejected;          /* wrong output, discarded */
    int n_skipped;           /* beyond device limits or the budget */
} clkvq_tune_result;

typedef struct {
    double budget_s;         /* 0: full search; else random sampling + local search */
    int quick;               /* a small space (CI, demo) */
    int reps;                /* timed runs per candidate (median), 0: 5 */
    uint64_t seed;           /* for sampling */
    /* called after each candidate (may be NULL) */
    void (*progress)(void *user, int done, int total, const char *what);
    void *user;
    /* NULL: the scheme's defaults (clkvq_layer_config_default). Else the layer
     * settings to time with (residual, window, sinks, parameter storage, zero
     * mode): those of the config's layers the result is for. Its scheme,
     * formats and group size must be the shape's (a per-head layer's share:
     * format_k/format_v set to the share's pair); perms, means and head
     * formats are not used (timing does not depend on their values). */
    const clkvq_layer_config *layer;
} clkvq_tune_options;

/*
 * Tunes fused decode attention for one shape on ctx's device: builds every
 * candidate (variant, work-group size, chunk, vector width, layouts) that
 * the device limits allow, checks its output against double-precision
 * attention over the cache's read-back (a wrong candidate is counted in
 * n_rejected, never kept), times it with profiling events (median after a
 * warm-up) and keeps the fastest. Nothing is written to disk.
 */
CLKVQ_API clkvq_status clkvq_tune_decode(clkvq_context *ctx, const clkvq_tune_shape *shape,
                                         const clkvq_tune_options *options, clkvq_tune_result *out);

/* Merges results into <cache dir>/tuning/<device key>.json (locked, atomic).
 * path_out (may be NULL) gets the file's path. */
CLKVQ_API clkvq_status clkvq_tuning_store(clkvq_context *ctx, const clkvq_tune_result *results,
                                          int n, char *path_out, size_t path_size);

typedef enum {
    CLKVQ_TUNED_EXACT = 0, /* this device, this shape */
    CLKVQ_TUNED_NEAREST,   /* this device, the nearest tuned shape */
    CLKVQ_TUNED_VENDOR,    /* shipped results for this vendor and device type */
    CLKVQ_TUNED_BUILTIN,   /* nothing tuned: built-in defaults */
    CLKVQ_TUNED_CALLER     /* clkvq_cache_set_tuning overrides (some of) the tunables */
} clkvq_tuning_source;

/* The lookup chain the library uses: never fails for lack of tuning. */
CLKVQ_API clkvq_status clkvq_tuning_lookup(clkvq_context *ctx, const clkvq_tune_shape *shape,
                                           clkvq_tune_params *out, clkvq_tuning_source *source);

/* Prints what is cached for ctx's device (and any problem with the file). */
CLKVQ_API clkvq_status clkvq_tuning_show(clkvq_context *ctx, FILE *out);

/* "exact", "nearest", "vendor", "builtin", "caller" */
CLKVQ_API const char *clkvq_tuning_source_name(clkvq_tuning_source source);

/*
 * Where the decode tunables of one layer of a cache come from, as the cache
 * uses them: the lookup chain's level for the layer's shape (scheme,
 * formats, group, head_dim, heads, capacity as tokens, n_seqs as batch),
 * CLKVQ_TUNED_BUILTIN when the cache's layouts cannot take what was found
 * (the serial variant needs group-planar layouts), CLKVQ_TUNED_CALLER under
 * clkvq_cache_set_tuning. A layer with per-head bits looks up each share
 * (its pair on its head count) and reports the least exact of them. A
 * cache keeps what its lookup gave at creation, so a later retuning
 * changes neither its parameters nor this answer.
 */
CLKVQ_API clkvq_status clkvq_cache_tuning_source(const clkvq_cache *cache, int layer,
                                                 clkvq_tuning_source *out);

/* ------------------------------------------------------------ models */

/*
 * The shape of a model's KV cache: what a cache, a tuning shape and a
 * precision config must agree on.
 */
typedef struct {
    int n_layers;
    int n_q_heads;
    int n_kv_heads; /* n_q_heads is a multiple of it (GQA; MHA when equal) */
    int head_dim;
} clkvq_model_geometry;

/*
 * A table of common models (Llama-3.x, Mistral-7B, Qwen2.5, Phi-3-mini,
 * Gemma-2, all-MiniLM-L6-v2), from their published config.json files.
 * Names are matched without case, without an organisation prefix
 * ("meta-llama/"), and with "-Instruct" / "-it" / "-chat" dropped, so a
 * Hugging Face id ("meta-llama/Llama-3.1-8B-Instruct") and KVTuner's file
 * names ("Meta-Llama-3.1-8B-Instruct") find their row. An unknown name is
 * CLKVQ_ERR_INVALID_ARG, and the message (clkvq_last_error(NULL)) lists the
 * known names.
 */
CLKVQ_API clkvq_status clkvq_model_lookup(const char *name, clkvq_model_geometry *out);
/* The table's own name for name ("llama-3.1-8b"), or NULL if unknown. */
CLKVQ_API const char *clkvq_model_canonical(const char *name);
/* The table's rows, in order: count, and the name of row i (NULL outside). */
CLKVQ_API int clkvq_model_count(void);
CLKVQ_API const char *clkvq_model_name(int index);
/* Any other model, written out: "q32:kv8:d128:l32" (query heads, kv heads,
 * head_dim, layers; every part once, in any order). Errors name the part. */
CLKVQ_API clkvq_status clkvq_model_parse(const char *text, clkvq_model_geometry *out);
/* The same text for g, snprintf's way (the length it needs). */
CLKVQ_API int clkvq_model_format(const clkvq_model_geometry *g, char *buf, size_t size);

/* ------------------------------------------------------ precision configs */

/*
 * A layer precision config (KVTuner): per layer (and optionally per kv
 * head) the key and value formats, plus the scheme parameters of
 * clkvq_layer_config. Stored as YAML: a mapping whose integer keys are
 * layers, each a mapping with `nbits_key` and `nbits_value` (8, 4, 3, 2 or
 * 1.5) - exactly KVTuner's published files, which load as they are - and
 * our optional fields: scheme, group_size, clip_k, clip_v, window, n_sink,
 * residual, param_type (fp16|fp8), zero_mode (float|int), key_axis
 * (token|channel), rot (true|false), rot_seed, perm_k and perm_v (one
 * sequence of head_dim ints per kv head), mean_k and mean_v (one sequence
 * of head_dim floats per kv head). A per-head file nests head ->
 * {nbits_key, nbits_value} under each layer. Optional top-level string
 * keys: `model`; the model's geometry, `n_q_heads`, `n_kv_heads` and
 * `head_dim` (all three or none; the layer count is the file's), checked
 * against the layers (per-head counts, perms, group sizes) at load; and
 * any layer field as a default for all layers, except
 * that a top-level rot_seed is a base: a layer without its own gets the
 * base (else the caller's default) plus its layer index, so layers draw
 * different rotations.
 */
typedef struct clkvq_precision_config clkvq_precision_config;

/*
 * Loads a YAML config (through libyaml). defaults (may be NULL: the token
 * scheme defaults) give every field the file leaves out, e.g. the scheme a
 * KVTuner preset was searched for. Errors name the file, line and field:
 * CLKVQ_ERR_IO (unreadable), CLKVQ_ERR_CORRUPT (not YAML, duplicate layer
 * key, missing layers, bits not in the format table, ...).
 */
CLKVQ_API clkvq_status clkvq_config_load(clkvq_context *ctx, const char *path,
                                         const clkvq_layer_config *defaults,
                                         clkvq_precision_config **out);
/* Parses YAML text already in memory (what fuzzers and tests feed). */
CLKVQ_API clkvq_status clkvq_config_parse(clkvq_context *ctx, const char *text, size_t size,
                                          const clkvq_layer_config *defaults,
                                          clkvq_precision_config **out);
/* Writes it back (atomic: temp file + rename); load(save(c)) == c. */
CLKVQ_API clkvq_status clkvq_config_save(clkvq_context *ctx, const clkvq_precision_config *cfg,
                                         const char *path);
/* Builds one from layer configs (perms and means, [n_kv_heads][head_dim],
 * and head formats, [n_kv_heads], copied). model may be NULL; n_kv_heads
 * matters only when perms, means or head formats are given, head_dim only
 * for perms and means. */
CLKVQ_API clkvq_status clkvq_config_create(clkvq_context *ctx, const char *model, int n_layers,
                                           const clkvq_layer_config *layers, int n_kv_heads,
                                           int head_dim, clkvq_precision_config **out);
CLKVQ_API void clkvq_config_free(clkvq_precision_config *cfg);

CLKVQ_API int clkvq_config_n_layers(const clkvq_precision_config *cfg);
CLKVQ_API const char *clkvq_config_model(const clkvq_precision_config *cfg); /* "" if none */
/* Layer l's settings; perm, mean and head format pointers stay owned by
 * cfg. For a per-head layer, head_format_k/head_format_v hold its heads'
 * formats and format_k/format_v are the widest of them. */
CLKVQ_API clkvq_status clkvq_config_layer(const clkvq_precision_config *cfg, int layer,
                                          clkvq_layer_config *out);
/* Heads with their own bits in layer l (0 when the layer has one pair). */
CLKVQ_API int clkvq_config_n_heads(const clkvq_precision_config *cfg, int layer);
CLKVQ_API clkvq_status clkvq_config_head(const clkvq_precision_config *cfg, int layer, int head,
                                         clkvq_format *format_k, clkvq_format *format_v);
/* KVTuner's average: sum over layers of (bits_k + bits_v) / (2 n_layers),
 * with 1.5 for ternary and scales/zeros not counted (per-head files
 * average over heads too). */
CLKVQ_API double clkvq_config_average_bits(const clkvq_precision_config *cfg);
/* CLKVQ_ERR_INVALID_ARG unless the config has exactly n_layers layers. */
CLKVQ_API clkvq_status clkvq_config_check_model(clkvq_context *ctx,
                                                const clkvq_precision_config *cfg, int n_layers);

/* A cache whose layers follow cfg (n_layers from cfg; a per-head layer's
 * shares as clkvq_layer_config describes). A config that carries its
 * geometry refuses other heads or head_dim (INVALID_ARG), as does a
 * per-head layer with another head count. */
CLKVQ_API clkvq_status clkvq_cache_create_from_config(clkvq_context *ctx,
                                                      const clkvq_precision_config *cfg, int n_seqs,
                                                      int capacity, int n_kv_heads, int n_q_heads,
                                                      int head_dim, clkvq_layout layout_k,
                                                      clkvq_layout layout_v, clkvq_cache **out);

/* 1 and *out filled when cfg carries its model's geometry (from its file or
 * clkvq_config_set_geometry; n_layers is the config's), else 0. */
CLKVQ_API int clkvq_config_geometry(const clkvq_precision_config *cfg, clkvq_model_geometry *out);
/*
 * CLKVQ_OK when cfg fits a model of geometry g, else CLKVQ_ERR_INVALID_ARG
 * naming the first mismatch: the layer count, the geometry cfg carries
 * (heads, head_dim), a per-head layer's head count, the perms' shape, a
 * group size that does not divide head_dim.
 */
CLKVQ_API clkvq_status clkvq_config_check_geometry(clkvq_context *ctx,
                                                   const clkvq_precision_config *cfg,
                                                   const clkvq_model_geometry *g);
/* Checks (as above), then records g in cfg: saved with it from now on. */
CLKVQ_API clkvq_status clkvq_config_set_geometry(clkvq_context *ctx, clkvq_precision_config *cfg,
                                                 const clkvq_model_geometry *g);

/*
 * The distinct decode shapes of cfg's layers on a model of geometry g, for
 * a cache of `tokens` capacity and `batch` sequences: exactly the shapes a
 * cache created from cfg looks up, one per distinct (scheme, formats, group
 * size, kv heads); a per-head layer whose heads differ has one per share
 * of its heads (that pair on the share's head count, clkvq_layer_config).
 * n_out gets their count (CLKVQ_ERR_BUFFER_TOO_SMALL when above max, with
 * n_out set); head_shape (may be NULL, n_layers x g->n_kv_heads entries)
 * the index of each layer's and kv head's shape; first_layer (may be NULL,
 * max entries) the first layer that uses each.
 */
CLKVQ_API clkvq_status clkvq_config_tune_shapes(clkvq_context *ctx,
                                                const clkvq_precision_config *cfg,
                                                const clkvq_model_geometry *g, int tokens,
                                                int batch, clkvq_tune_shape *out, int max,
                                                int *n_out, int *head_shape, int *first_layer);

/* -------------------------------------------- configs per model, presets */

/*
 * Loads a config file to run on one model. Geometry: g, else the file's own,
 * else its `model` field's, else (KVTuner preset names) the model named in
 * the file name, from the model table; none of these: CLKVQ_ERR_INVALID_ARG.
 * KVTuner's presets, <model>_<kivi|pertoken>_KVTuner<bits>_<i>.yaml, load
 * with the settings they were searched under unless defaults are given:
 * kivi keys per channel in groups of 32 with a residual of 32 recent tokens
 * (scheme kivi, group_size 32, residual 32), pertoken one group per head
 * (scheme token, group_size head_dim); other files with defaults (NULL:
 * the token scheme's). The geometry is checked (clkvq_config_check_geometry)
 * and recorded, and the model's table name when the file names none.
 */
CLKVQ_API clkvq_status clkvq_config_load_for_model(clkvq_context *ctx, const char *path,
                                                   const clkvq_layer_config *defaults,
                                                   const clkvq_model_geometry *g,
                                                   clkvq_precision_config **out);

/*
 * Stores cfg as model's config, <cache dir>/configs/<model>.yaml, beside the
 * tuning results (<cache dir>/tuning/). <model> is the model table's name
 * when model is in it, else model lower-cased with anything but letters,
 * digits, '.', '-' and '_' made '-' (an organisation prefix dropped).
 * model NULL: cfg's own. cfg must carry its geometry or name a model of the
 * table (whose geometry is then checked and recorded in the file); the file
 * names model. path_out (may be NULL) gets the path.
 */
CLKVQ_API clkvq_status clkvq_config_store(clkvq_context *ctx, const clkvq_precision_config *cfg,
                                          const char *model, char *path_out, size_t path_size);

/*
 * model's config: the stored one (clkvq_config_store), else the shipped
 * KVTuner preset that is its default (docs: kivi mode, 4-bit limit, the
 * front point with more average bits), with its geometry recorded.
 * origin (may be NULL) gets the stored file's path or "shipped:<preset
 * file name>". Unknown model with nothing stored: CLKVQ_ERR_INVALID_ARG
 * listing the known models; known but nothing stored or shipped:
 * CLKVQ_ERR_IO naming where it was looked for.
 */
CLKVQ_API clkvq_status clkvq_config_for_model(clkvq_context *ctx, const char *model,
                                              clkvq_precision_config **out, char *origin,
                                              size_t origin_size);

/*
 * A model's cache in one call: the config of clkvq_config_for_model, its
 * geometry, and tuned parameters per layer from this device's tuning
 * results (with the usual fallbacks; clkvq_cache_tuning_source tells which).
 */
CLKVQ_API clkvq_status clkvq_cache_create_for_model(clkvq_context *ctx, const char *model,
                                                    int n_seqs, int capacity,
                                                    clkvq_layout layout_k, clkvq_layout layout_v,
                                                    clkvq_cache **out);

/* Prints the stored configs and, per config, its layer settings, the
 * layers using each, and at which (tokens, batch) each is tuned on ctx's
 * device; then the shipped default per model. */
CLKVQ_API clkvq_status clkvq_config_show(clkvq_context *ctx, FILE *out);

/* ------------------------------------------------------ calibration dumps */

/*
 * A calibration dump: safetensors with `layers.<i>.q` [n_q_heads][n_tokens]
 * [head_dim] and `layers.<i>.k`, `layers.<i>.v` [n_kv_heads][n_tokens]
 * [head_dim], dtype F32, F16 or BF16, keys post-RoPE as the runtime caches
 * them; optional __metadata__ (model, notes). Read over mmap with every
 * header length, offset, dtype size and shape checked: a malformed file is
 * CLKVQ_ERR_CORRUPT, never a crash.
 */
typedef struct clkvq_kv_dump clkvq_kv_dump;

CLKVQ_API clkvq_status clkvq_dump_open(clkvq_context *ctx, const char *path, clkvq_kv_dump **out);
/* The same over bytes in memory (not copied: keep them alive). */
CLKVQ_API clkvq_status clkvq_dump_open_memory(clkvq_context *ctx, const void *data, size_t size,
                                              clkvq_kv_dump **out);
CLKVQ_API void clkvq_dump_close(clkvq_kv_dump *dump);

typedef struct {
    int n_layers;
    int n_q_heads, n_kv_heads, n_tokens, head_dim;
    char model[128]; /* from __metadata__, "" if none */
} clkvq_dump_info;

CLKVQ_API clkvq_status clkvq_dump_info_get(const clkvq_kv_dump *dump, clkvq_dump_info *out);
/* One tensor of a layer as fp32 (converted from F16/BF16): which = 'q',
 * 'k' or 'v'; out holds heads * n_tokens * head_dim floats. A tensor with
 * NaN/Inf is CLKVQ_ERR_NONFINITE naming the position (out is still filled). */
CLKVQ_API clkvq_status clkvq_dump_read(const clkvq_kv_dump *dump, int layer, char which,
                                       float *out);

/* Writes a dump (F32, or F16 when as_f16) atomically. q, k, v point to
 * n_layers arrays each; info->model "" means none. NaN/Inf (and, for F16,
 * |x| > 65504) are refused with CLKVQ_ERR_NONFINITE. */
CLKVQ_API clkvq_status clkvq_dump_write(clkvq_context *ctx, const char *path,
                                        const clkvq_dump_info *info, const float *const *q,
                                        const float *const *k, const float *const *v, int as_f16);

/* ------------------------------------------------------ accuracy evaluation */

typedef struct {
    double bits_per_element; /* K and V averaged: packed codes + params + fp16 tokens */
    double rel_err;          /* ||o - o_ref|| / ||o_ref|| over heads and queries */
    double cosine;           /* mean cosine(o, o_ref) over heads and queries */
    double k_rel_err;        /* ||K - K_cache|| / ||K|| (read-back) */
    double v_rel_err;
    int n_queries;
    /* The sums behind the ratios (rel_err = sqrt(err_sq / ref_sq), and so
     * on), so results pool exactly over layers: a model's error is
     * sqrt(sum err_sq / sum ref_sq), each layer counting by its share of
     * the signal. */
    double err_sq, ref_sq;   /* sums over heads and queries of |o - o_ref|^2, |o_ref|^2 */
    double k_err_sq, k_ref_sq, v_err_sq, v_ref_sq;
    /* Bits per element as the context grows without bound: packed codes +
     * params of one group, K and V averaged; fp16 sinks, windows and
     * residuals vanish (16 for the fp16 scheme). */
    double bits_long;
} clkvq_eval_result;

/* Evaluated positions per layer when a caller gives none: clkvq-eval and
 * the precision search default to the same number, so what the search
 * predicts is what clkvq-eval reports for the config it writes. */
#define CLKVQ_DEFAULT_QUERIES 128

/*
 * Accuracy of one layer under one layer config, through the library's own
 * kernels: K/V ([n_kv_heads][n_tokens][head_dim]) are appended to a cache
 * up to the first evaluated position, then for each of the last n_queries
 * positions p the token is appended and query p (q: [n_q_heads][n_tokens]
 * [head_dim]) is decoded over the cache as it stands, against fp64
 * attention over the original K/V[0..p] (scale 1/sqrt(head_dim)).
 */
CLKVQ_API clkvq_status clkvq_eval_layer(clkvq_context *ctx, const clkvq_layer_config *cfg,
                                        int n_q_heads, int n_kv_heads, int n_tokens, int head_dim,
                                        const float *q, const float *k, const float *v,
                                        int n_queries, clkvq_eval_result *out);

/* ------------------------------------------------- layer precision search */

typedef struct {
    clkvq_format format_k, format_v;
} clkvq_bit_pair;

/* What the search's budget counts (clkvq_search_options.weight). */
typedef enum {
    CLKVQ_SEARCH_WEIGHT_KVTUNER = 0, /* KVTuner's average bits: (bits_k + bits_v) / 2,
                                        parameters and fp16 tokens not counted */
    CLKVQ_SEARCH_WEIGHT_BITS_LONG    /* bits_long (clkvq_eval_result): codes + params per
                                        element as the context grows, K and V averaged */
} clkvq_search_weight;

typedef struct {
    /* every layer's scheme settings (scheme, group, window, key_axis,
     * rotate, rot_seed (layer l uses rot_seed + l), ...; formats are the
     * pairs'; perms and means are ignored: fit them); NULL: the token
     * scheme defaults */
    const clkvq_layer_config *defaults;
    const clkvq_bit_pair *pairs; /* candidates, e.g. K8V8 .. K2V1.5 */
    int n_pairs;
    int n_queries;   /* last positions of the dump evaluated per layer
                        (0: CLKVQ_DEFAULT_QUERIES, as clkvq-eval) */
    int n_clusters;  /* KVTuner's inter-layer clustering: layers in a cluster share a
                        pair; 0 = one cluster per layer (exact) */
    int calibrate;   /* fit per layer (and pair: clips) on the dump, clkvq_calibrate_layer */
    void (*progress)(void *user, int done, int total, const char *what);
    void *user;
    unsigned fit;    /* with calibrate: CLKVQ_FIT_* fitted; 0 = skvq's permutation and clip
                        (other schemes: nothing), as before this field */
    clkvq_search_weight weight; /* what avg budgets count */
} clkvq_search_options;

typedef struct {
    double avg_bits;          /* KVTuner's: mean over layers of (bits_k + bits_v) / 2 */
    double bits_per_element;  /* ours: codes + params + fp16 tokens, layer mean */
    double total_error;       /* the pooled attention-output error clkvq-eval reports for
                                 this config: sqrt(sum_l err_sq_l / sum_l ref_sq_l) */
    double latency_us;        /* predicted decode time per token, all layers, from this
                                 device's tuning results; < 0 when none are tuned */
    const int *choice;        /* pair index per layer (owned by the result) */
    double bits_long;         /* bits_long, layer mean */
} clkvq_front_point;

typedef struct clkvq_search_result clkvq_search_result;

/*
 * KVTuner's offline search on a calibration dump: per layer and pair the
 * attention-output error with the dump's real queries (clkvq_eval_layer,
 * through the library's kernels, after the layer's fits when calibrate);
 * pairs dominated within a layer (more bits and more error) are dropped;
 * layers are clustered by their error profiles (k-means on log errors)
 * when n_clusters > 0; then an exact multiple-choice knapsack over the
 * clusters' choices gives the Pareto front of (average bits, error). The
 * error minimized is the one clkvq-eval reports for a config, pooled over
 * layers: sqrt(sum_l err_sq_l / sum_l ref_sq_l), a sum of per-layer costs
 * err_sq_l / sum ref_sq, each layer measured with the others unquantized
 * (clkvq-eval measures a config the same way, so the two agree exactly
 * when given the same dump, queries and fits).
 */
CLKVQ_API clkvq_status clkvq_precision_search(clkvq_context *ctx, const clkvq_kv_dump *dump,
                                              const clkvq_search_options *options,
                                              clkvq_search_result **out);
CLKVQ_API void clkvq_search_free(clkvq_search_result *res);
CLKVQ_API int clkvq_search_front_size(const clkvq_search_result *res);
/* Front points ordered by increasing bits (and so decreasing error). */
CLKVQ_API clkvq_status clkvq_search_front_point(const clkvq_search_result *res, int i,
                                                clkvq_front_point *out);
/* Layer l's measured error and bits/element for pair p (-1 if pruned). */
CLKVQ_API double clkvq_search_layer_error(const clkvq_search_result *res, int layer, int pair);
/* The index of the lowest-error front point whose average bits (KVTuner's,
 * or bits_long with CLKVQ_SEARCH_WEIGHT_BITS_LONG) stay within budget; -1
 * when none does. */
CLKVQ_API int clkvq_search_front_index(const clkvq_search_result *res, double budget_bits);
/* That point as a config (with the fitted clips, permutations and means,
 * and each layer's rot_seed). */
CLKVQ_API clkvq_status clkvq_search_config(clkvq_context *ctx, const clkvq_search_result *res,
                                           double budget_bits, clkvq_precision_config **out);

/* ------------------------------------------------------------ calibration */

/*
 * Channel permutation per head from calibration data x [n_heads][n_tokens]
 * [head_dim]: channels sorted by their (max - min) range over the tokens and
 * cut into fixed groups of group_size, so each group holds channels of
 * similar range. perm_out: int32 [n_heads][head_dim] (perm[h*hd + c] = the
 * input channel at packed position c). A runtime may fold it into its
 * W_k/W_v rows instead of passing it to the kernels.
 */
CLKVQ_API clkvq_status clkvq_calibrate_permutation(clkvq_context *ctx, const clkvq_shape *shape,
                                                   const float *x, int group_size,
                                                   int32_t *perm_out);

/*
 * Grid search of the clip ratio alpha in [alpha_lo, alpha_hi] (step
 * alpha_step) minimizing the mean squared reconstruction error of x under
 * qp (qp->clip_alpha is ignored) and perm (NULL: identity). Host only.
 */
CLKVQ_API clkvq_status clkvq_calibrate_clip(clkvq_context *ctx, const clkvq_quant_params *qp,
                                            const clkvq_shape *shape, const float *x,
                                            const int32_t *perm, float alpha_lo, float alpha_hi,
                                            float alpha_step, float *best_alpha, double *best_mse);

/* What clkvq_calibrate_layer fits (or-ed flags). */
enum {
    CLKVQ_FIT_CLIP_K = 1u << 0, /* clip_k: least reconstruction MSE over a grid */
    CLKVQ_FIT_CLIP_V = 1u << 1, /* clip_v */
    CLKVQ_FIT_MEAN_K = 1u << 2, /* mean_k: per (kv head, channel) means, for centering */
    CLKVQ_FIT_MEAN_V = 1u << 3, /* mean_v */
    CLKVQ_FIT_PERM_K = 1u << 4, /* perm_k: clkvq_calibrate_permutation (not for keys
                                   grouped per channel, where it changes nothing) */
    CLKVQ_FIT_PERM_V = 1u << 5, /* perm_v */
    CLKVQ_FIT_CLIP = CLKVQ_FIT_CLIP_K | CLKVQ_FIT_CLIP_V,
    CLKVQ_FIT_MEAN = CLKVQ_FIT_MEAN_K | CLKVQ_FIT_MEAN_V,
    CLKVQ_FIT_PERM = CLKVQ_FIT_PERM_K | CLKVQ_FIT_PERM_V
};

/* The clip grid clkvq_calibrate_layer searches by default: at 2 bits and
 * below the reconstruction optimum lies under 0.80. */
#define CLKVQ_CLIP_GRID_LO 0.40f
#define CLKVQ_CLIP_GRID_HI 1.00f
#define CLKVQ_CLIP_GRID_STEP 0.02f

typedef struct {
    unsigned fit;                      /* CLKVQ_FIT_* */
    float clip_lo, clip_hi, clip_step; /* the clip grid; all 0: CLKVQ_CLIP_GRID_* */
    /* Caller storage, [n_kv_heads][head_dim] each, for the fields fitted
     * (the others may be NULL); out's pointers point into it. */
    float *mean_k, *mean_v;
    int32_t *perm_k, *perm_v;
} clkvq_calib_options;

/*
 * Fits a layer config on calibration K/V ([n_kv_heads][n_tokens][head_dim],
 * e.g. a dump's layer): out = *in with the fields of options->fit replaced.
 * Every fit sees the tokens the cache will quantize (after skvq's sinks)
 * as the cache stores them: means first, then the fields after them on
 * the centered (with in's or the fitted means) and, with in->rotate,
 * rotated rows; the permutation on those; each clip under the
 * permutation, with the layer's own format, axis, group and parameter
 * storage (per-channel keys in whole blocks of group_size tokens), the
 * smallest alpha winning ties. Host only. On failure out and the storage
 * are untouched.
 */
CLKVQ_API clkvq_status clkvq_calibrate_layer(clkvq_context *ctx, const clkvq_layer_config *in,
                                             int n_kv_heads, int n_tokens, int head_dim,
                                             const float *k, const float *v,
                                             const clkvq_calib_options *options,
                                             clkvq_layer_config *out);

/* ------------------------------------------------------ synthetic KV data */

/*
 * A seeded, realistic synthetic K/V for one layer: key outlier channels
 * 10-50x the rest, RoPE-like rotating channel pairs, a massive first-token
 * (sink) activation, per-token value scale variation. k and v are
 * [n_heads][n_tokens][head_dim]; either may be NULL.
 */
CLKVQ_API clkvq_status clkvq_synth_kv(uint64_t seed, const clkvq_shape *shape, float *k, float *v);

#ifdef __cplusplus
}
#endif
#endif /* CLKVQ_H */
