/*
 * clkvq-bench serve: continuous batching on the real kernels, one layer.
 *
 * A fixed set of slots (the cache's sequences) serves a stream of seeded
 * random requests, as a serving runtime's scheduler does:
 *
 *   admit   an idle slot takes the next request: with probability --share
 *           it starts with the shared system prompt (--prefix tokens),
 *           taken by clkvq_cache_fork from a live sequence that holds it
 *           and truncated to the prefix, so its pages are shared (when no
 *           live sequence holds it, the request prefills it itself); then
 *           its own prompt is appended as one prefill chunk;
 *   append  every live sequence appends the token it decoded last step;
 *   decode  one clkvq_cache_decode over all slots (idle ones are empty);
 *   finish  a request that has generated its tokens is freed (truncate 0).
 *
 * An admission or append the page pool cannot serve (CLKVQ_ERR_OUT_OF_BLOCKS,
 * only with a small --pool-blocks) defers the request or preempts the
 * sequence (freed, counted), as vLLM's scheduler would.
 *
 * Measured: wall time per phase (every call but decode blocks until its
 * kernels are done; the decode phase waits for its output with clFinish),
 * generated tokens per second, pages in use per step
 * (clkvq_cache_pool_stats), and from them the peak device bytes of the
 * paged cache (pages in use x page bytes + the fp16 rings and block
 * table, which do not depend on use) against the contiguous cache the
 * same slots need for the same capacity (clkvq_cache_plan, block_size 0).
 * K/V values are synthetic (clkvq_synth_kv) and do not change the work.
 */
#include "bench_util.h"

#include "clkvq.h"

#include <cjson/cJSON.h>
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WARM_TOKENS 4 /* untimed append + decode that builds the kernels first */
#define TOKEN_RING 64 /* distinct single-token K/V buffers the decode appends cycle through */

static const char *const g_prog = "clkvq-bench serve";

typedef struct {
    const char *name;
    int n_q_heads, n_kv_heads, head_dim;
} serve_shape;

/* bench_attention's shapes */
static const serve_shape g_shapes[] = {
    {"llama3-8b", 32, 8, 128},
    {"qwen2.5-7b", 28, 4, 128},
    {"phi3-mini", 32, 32, 96},
};
#define N_SHAPES ((int)(sizeof g_shapes / sizeof g_shapes[0]))

typedef struct {
    const char *name;
    clkvq_format k, v;
} serve_format;

static const serve_format g_formats[] = {
    {"k8v8", CLKVQ_FMT_Q8, CLKVQ_FMT_Q8},   {"k4v4", CLKVQ_FMT_Q4, CLKVQ_FMT_Q4},
    {"k4v2", CLKVQ_FMT_Q4, CLKVQ_FMT_Q2},   {"k2v2", CLKVQ_FMT_Q2, CLKVQ_FMT_Q2},
    {"k2v1.5", CLKVQ_FMT_Q2, CLKVQ_FMT_T15},
};
#define N_FORMATS ((int)(sizeof g_formats / sizeof g_formats[0]))

typedef struct {
    uint64_t seed;
    int steps;
    int shape, format;
    clkvq_scheme scheme;
    int group;
    int block_size, slots, capacity, prefix, share_pct;
    int prompt_min, prompt_max, gen_min, gen_max;
    int pool_blocks;
    int json;
    const char *device;
} serve_options;

/* One slot's request. */
typedef struct {
    int live;
    int has_prefix; /* starts with the shared prefix */
    int length;     /* tokens in the cache */
    int to_generate, generated;
} slot;

typedef struct {
    double admit_s, append_s, decode_s, finish_s, wall_s;
    long tokens;            /* generated (decoded) tokens */
    long prefill_tokens;    /* appended by admissions */
    long requests_done, admitted, forks, prefix_prefills, deferred, preempted;
    long live_sum;          /* live slots summed over steps (mean batch) */
    int peak_used;          /* pages in use, most at once */
    long used_sum, shared_sum;
    int peak_shared;
    long peak_tokens;       /* tokens the sequences hold, summed, most at once */
    double decode_device_ms;
} serve_stats;

typedef struct {
    clkvq_context *ctx;
    clkvq_device_info info;
    clkvq_cache *cache;
    const serve_options *opt;
    const serve_shape *shape;
    slot *slots;
    uint64_t rng;
    float *prefill_k, *prefill_v; /* [n_kv][max_prefill][d] synthetic */
    float *stage_k, *stage_v;     /* one prefill chunk */
    int max_prefill;
    cl_mem tok_k[TOKEN_RING], tok_v[TOKEN_RING];
    cl_mem q, out;
    int ring_pos;
    clkvq_pool_stats pool;
    size_t fixed_bytes;           /* rings + tables: what is not pages */
    size_t contiguous_bytes, pool_bytes;
    clkvq_attn_tuning tuning;
    serve_stats st;
} serve;

/* ------------------------------------------------------------ options */

static void usage(FILE *out)
{
    fprintf(out,
            "usage: clkvq-bench serve [options]\n"
            "\n"
            "Continuous batching over one paged cache layer: requests arrive into --slots\n"
            "slots, prefill their prompt (sharing a system prompt by clkvq_cache_fork), then\n"
            "each step appends one token per live sequence and decodes the batch; finished\n"
            "requests are freed. Reports generated tokens per second, the time per phase,\n"
            "and the peak device bytes of the paged cache against the contiguous one.\n"
            "\n"
            "options:\n"
            "  --seed N          request stream seed (default 1)\n"
            "  --steps N         decode steps (default 2000)\n"
            "  --shape NAME      llama3-8b (32 q / 8 kv heads, head_dim 128; default),\n"
            "                    qwen2.5-7b (28/4/128), phi3-mini (32/32/96)\n"
            "  --scheme NAME     token (default), kivi, skvq, fp16\n"
            "  --format KxVy     k8v8, k4v4 (default), k4v2, k2v2, k2v1.5\n"
            "  --group N         quantization group (default 32)\n"
            "  --block-size N    tokens per page, a multiple of 16 (default 64); 0: the\n"
            "                    contiguous cache, to compare (forks copy whole sequences)\n"
            "  --slots N         concurrent sequences (default 16)\n"
            "  --capacity N      tokens per sequence at most (default 4096)\n"
            "  --prefix N        shared system prompt tokens, 0 for none (default 1024)\n"
            "  --share P         percent of requests that start with it (default 75)\n"
            "  --prompt MIN:MAX  own prompt tokens (default 64:1024)\n"
            "  --gen MIN:MAX     tokens to generate (default 32:512)\n"
            "  --pool-blocks N   pages in the pool; 0: every slot at capacity (default 0)\n"
            "  --device S        device index or name substring\n"
            "  --json            one JSON object instead of the tables\n"
            "  -h, --help        this text\n"
            "\n"
            "A request's prefix + prompt + generation is clamped to the capacity.\n"
            "exit codes: 0 ok, 1 runtime failure, 2 usage error\n");
}

static int bad(const char *flag, const char *text, const char *want)
{
    fprintf(stderr, "%s: %s wants %s, got '%s'\n", g_prog, flag, want, text);
    return BENCH_EXIT_USAGE;
}

static int parse_range(const char *text, long lo, long hi, int *a, int *b)
{
    char buf[64];
    const char *colon = strchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof buf) return -1;
    memcpy(buf, text, (size_t)(colon - text));
    buf[colon - text] = '\0';
    long x, y;
    if (bench_parse_int(buf, lo, hi, &x) || bench_parse_int(colon + 1, lo, hi, &y) || x > y)
        return -1;
    *a = (int)x;
    *b = (int)y;
    return 0;
}

static int parse_options(int argc, char **argv, serve_options *o)
{
    enum { O_SEED = 256, O_STEPS, O_SHAPE, O_SCHEME, O_FORMAT, O_GROUP, O_BLOCK, O_SLOTS,
           O_CAPACITY, O_PREFIX, O_SHARE, O_PROMPT, O_GEN, O_POOL, O_DEVICE, O_JSON };
    static const struct option longopts[] = {
        {"seed", required_argument, NULL, O_SEED},
        {"steps", required_argument, NULL, O_STEPS},
        {"shape", required_argument, NULL, O_SHAPE},
        {"scheme", required_argument, NULL, O_SCHEME},
        {"format", required_argument, NULL, O_FORMAT},
        {"group", required_argument, NULL, O_GROUP},
        {"block-size", required_argument, NULL, O_BLOCK},
        {"slots", required_argument, NULL, O_SLOTS},
        {"capacity", required_argument, NULL, O_CAPACITY},
        {"prefix", required_argument, NULL, O_PREFIX},
        {"share", required_argument, NULL, O_SHARE},
        {"prompt", required_argument, NULL, O_PROMPT},
        {"gen", required_argument, NULL, O_GEN},
        {"pool-blocks", required_argument, NULL, O_POOL},
        {"device", required_argument, NULL, O_DEVICE},
        {"json", no_argument, NULL, O_JSON},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    memset(o, 0, sizeof *o);
    o->seed = 1;
    o->steps = 2000;
    o->format = 1; /* k4v4 */
    o->scheme = CLKVQ_SCHEME_TOKEN;
    o->group = 32;
    o->block_size = 64;
    o->slots = 16;
    o->capacity = 4096;
    o->prefix = 1024;
    o->share_pct = 75;
    o->prompt_min = 64;
    o->prompt_max = 1024;
    o->gen_min = 32;
    o->gen_max = 512;
    long v;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case O_SEED:
            if (bench_parse_int(optarg, 0, 1L << 62, &v)) return bad("--seed", optarg, "0..2^62");
            o->seed = (uint64_t)v;
            break;
        case O_STEPS:
            if (bench_parse_int(optarg, 1, 10000000, &v))
                return bad("--steps", optarg, "1..10000000");
            o->steps = (int)v;
            break;
        case O_SHAPE: {
            int found = -1;
            for (int i = 0; i < N_SHAPES; i++)
                if (!strcmp(optarg, g_shapes[i].name)) found = i;
            if (found < 0) return bad("--shape", optarg, "llama3-8b, qwen2.5-7b or phi3-mini");
            o->shape = found;
            break;
        }
        case O_SCHEME:
            if (clkvq_scheme_parse(optarg, &o->scheme) != CLKVQ_OK)
                return bad("--scheme", optarg, "token, kivi, skvq or fp16");
            break;
        case O_FORMAT: {
            int found = -1;
            for (int i = 0; i < N_FORMATS; i++)
                if (!strcmp(optarg, g_formats[i].name)) found = i;
            if (found < 0) return bad("--format", optarg, "k8v8, k4v4, k4v2, k2v2 or k2v1.5");
            o->format = found;
            break;
        }
        case O_GROUP:
            if (bench_parse_int(optarg, 32, 256, &v) || v % 32)
                return bad("--group", optarg, "a multiple of 32 up to 256");
            o->group = (int)v;
            break;
        case O_BLOCK:
            if (bench_parse_int(optarg, 0, 1 << 20, &v) || v % 16)
                return bad("--block-size", optarg, "0 or a multiple of 16");
            o->block_size = (int)v;
            break;
        case O_SLOTS:
            if (bench_parse_int(optarg, 1, 4096, &v)) return bad("--slots", optarg, "1..4096");
            o->slots = (int)v;
            break;
        case O_CAPACITY:
            if (bench_parse_int(optarg, 16, 1 << 20, &v))
                return bad("--capacity", optarg, "16..1048576");
            o->capacity = (int)v;
            break;
        case O_PREFIX:
            if (bench_parse_int(optarg, 0, 1 << 20, &v))
                return bad("--prefix", optarg, "0..1048576");
            o->prefix = (int)v;
            break;
        case O_SHARE:
            if (bench_parse_int(optarg, 0, 100, &v)) return bad("--share", optarg, "0..100");
            o->share_pct = (int)v;
            break;
        case O_PROMPT:
            if (parse_range(optarg, 1, 1 << 20, &o->prompt_min, &o->prompt_max))
                return bad("--prompt", optarg, "MIN:MAX with 1 <= MIN <= MAX");
            break;
        case O_GEN:
            if (parse_range(optarg, 1, 1 << 20, &o->gen_min, &o->gen_max))
                return bad("--gen", optarg, "MIN:MAX with 1 <= MIN <= MAX");
            break;
        case O_POOL:
            if (bench_parse_int(optarg, 0, 1 << 28, &v))
                return bad("--pool-blocks", optarg, "0..2^28");
            o->pool_blocks = (int)v;
            break;
        case O_DEVICE:
            o->device = optarg;
            break;
        case O_JSON:
            o->json = 1;
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
        fprintf(stderr, "%s: unexpected argument '%s'\n", g_prog, argv[optind]);
        return BENCH_EXIT_USAGE;
    }
    if (o->block_size == 0 && o->pool_blocks) {
        fprintf(stderr, "%s: --pool-blocks needs pages (--block-size > 0)\n", g_prog);
        return BENCH_EXIT_USAGE;
    }
    if (o->prefix + 2 > o->capacity) {
        fprintf(stderr, "%s: --prefix %d leaves no room in --capacity %d\n", g_prog, o->prefix,
                o->capacity);
        return BENCH_EXIT_USAGE;
    }
    if (o->scheme != CLKVQ_SCHEME_FP16 && g_shapes[o->shape].head_dim % o->group) {
        fprintf(stderr, "%s: --group %d does not divide %s's head_dim %d\n", g_prog, o->group,
                g_shapes[o->shape].name, g_shapes[o->shape].head_dim);
        return BENCH_EXIT_USAGE;
    }
    return BENCH_EXIT_OK;
}

/* ------------------------------------------------------------ helpers */

static int report(const serve *sv, clkvq_status st, const char *what)
{
    fprintf(stderr, "%s: %s: %s: %s\n", g_prog, what, clkvq_status_string(st),
            clkvq_last_error(sv->ctx));
    return BENCH_EXIT_FAILURE;
}

/* xorshift64* */
static double uniform(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return (double)((x * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
}

static int uniform_int(uint64_t *s, int lo, int hi)
{
    return lo + (int)(uniform(s) * (hi - lo + 1));
}

static clkvq_layer_config layer_config(const serve_options *o)
{
    clkvq_layer_config lc = clkvq_layer_config_default(o->scheme);
    if (o->scheme != CLKVQ_SCHEME_FP16) {
        lc.format_k = g_formats[o->format].k;
        lc.format_v = g_formats[o->format].v;
        lc.group_size = o->group;
    }
    return lc;
}

static clkvq_cache_config cache_config(const serve_options *o, const clkvq_layer_config *lc,
                                       int block_size, int n_blocks)
{
    const serve_shape *s = &g_shapes[o->shape];
    clkvq_cache_config cfg = {
        .n_layers = 1,
        .n_seqs = o->slots,
        .capacity = o->capacity,
        .n_kv_heads = s->n_kv_heads,
        .n_q_heads = s->n_q_heads,
        .head_dim = s->head_dim,
        /* the CPU's serial decode kernel reads group-planar codes only */
        .layout_k = CLKVQ_LAYOUT_GROUP_PLANAR,
        .layout_v = CLKVQ_LAYOUT_GROUP_PLANAR,
        .layers = lc,
        .block_size = block_size,
        .n_blocks = n_blocks,
    };
    return cfg;
}

/* Copies the first n tokens of every head of the synthetic prefill data
 * into the staging chunk ([n_kv][n][d]). */
static void stage(serve *sv, int n)
{
    size_t d = (size_t)sv->shape->head_dim;
    for (int h = 0; h < sv->shape->n_kv_heads; h++) {
        memcpy(sv->stage_k + (size_t)h * n * d, sv->prefill_k + (size_t)h * sv->max_prefill * d,
               (size_t)n * d * sizeof(float));
        memcpy(sv->stage_v + (size_t)h * n * d, sv->prefill_v + (size_t)h * sv->max_prefill * d,
               (size_t)n * d * sizeof(float));
    }
}

static int setup(serve *sv)
{
    const serve_options *o = sv->opt;
    const serve_shape *s = sv->shape;
    clkvq_layer_config lc = layer_config(o);
    clkvq_cache_config paged = cache_config(o, &lc, o->block_size, o->pool_blocks);
    clkvq_cache_config contiguous = cache_config(o, &lc, 0, 0);
    clkvq_cache_memory mem_paged, mem_contiguous;
    clkvq_status st = clkvq_cache_plan(sv->ctx, &contiguous, &mem_contiguous);
    if (st != CLKVQ_OK) return report(sv, st, "contiguous cache plan");
    if ((st = clkvq_cache_plan(sv->ctx, &paged, &mem_paged)) != CLKVQ_OK)
        return report(sv, st, "paged cache plan");
    sv->contiguous_bytes = mem_contiguous.device_bytes;
    sv->pool_bytes = mem_paged.device_bytes;
    if ((st = clkvq_cache_create(sv->ctx, &paged, &sv->cache)) != CLKVQ_OK)
        return report(sv, st, "cache create");
    if ((st = clkvq_cache_pool_stats(sv->cache, 0, &sv->pool)) != CLKVQ_OK)
        return report(sv, st, "pool stats");
    sv->fixed_bytes = mem_paged.device_bytes - (size_t)sv->pool.n_blocks * sv->pool.block_bytes;
    if ((st = clkvq_cache_get_tuning(sv->cache, &sv->tuning)) != CLKVQ_OK)
        return report(sv, st, "get tuning");

    sv->slots = calloc((size_t)o->slots, sizeof *sv->slots);
    sv->max_prefill = o->prefix > o->prompt_max ? o->prefix : o->prompt_max;
    if (sv->max_prefill > o->capacity) sv->max_prefill = o->capacity;
    size_t d = (size_t)s->head_dim, kv = (size_t)s->n_kv_heads * sv->max_prefill * d;
    sv->prefill_k = malloc(kv * sizeof(float));
    sv->prefill_v = malloc(kv * sizeof(float));
    sv->stage_k = malloc(kv * sizeof(float));
    sv->stage_v = malloc(kv * sizeof(float));
    if (!sv->slots || !sv->prefill_k || !sv->prefill_v || !sv->stage_k || !sv->stage_v) {
        fprintf(stderr, "%s: out of host memory\n", g_prog);
        return BENCH_EXIT_FAILURE;
    }
    clkvq_shape sh = {s->n_kv_heads, sv->max_prefill, s->head_dim};
    if ((st = clkvq_synth_kv(sv->opt->seed, &sh, sv->prefill_k, sv->prefill_v)) != CLKVQ_OK)
        return report(sv, st, "synthetic K/V");
    /* single tokens for the decode appends: token i of the synthetic data,
     * each in its own buffer ([n_kv][1][d]) */
    cl_context clc = clkvq_context_cl_context(sv->ctx);
    float *tk = malloc((size_t)s->n_kv_heads * d * sizeof(float));
    float *tv = malloc((size_t)s->n_kv_heads * d * sizeof(float));
    cl_int err = tk && tv ? CL_SUCCESS : CL_OUT_OF_HOST_MEMORY;
    for (int i = 0; i < TOKEN_RING && err == CL_SUCCESS; i++) {
        int t = i % sv->max_prefill;
        for (int h = 0; h < s->n_kv_heads; h++) {
            memcpy(tk + h * d, sv->prefill_k + ((size_t)h * sv->max_prefill + t) * d,
                   d * sizeof(float));
            memcpy(tv + h * d, sv->prefill_v + ((size_t)h * sv->max_prefill + t) * d,
                   d * sizeof(float));
        }
        sv->tok_k[i] = clCreateBuffer(clc, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                                      s->n_kv_heads * d * sizeof(float), tk, &err);
        if (err == CL_SUCCESS)
            sv->tok_v[i] = clCreateBuffer(clc, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR,
                                          s->n_kv_heads * d * sizeof(float), tv, &err);
    }
    free(tk);
    free(tv);
    size_t qn = (size_t)o->slots * s->n_q_heads * d;
    float *q = err == CL_SUCCESS ? malloc(qn * sizeof(float)) : NULL;
    if (q) {
        uint64_t r = sv->opt->seed + 99;
        for (size_t i = 0; i < qn; i++) q[i] = (float)(2.0 * uniform(&r) - 1.0);
        sv->q = clCreateBuffer(clc, CL_MEM_READ_ONLY | CL_MEM_COPY_HOST_PTR, qn * sizeof(float),
                               q, &err);
        if (err == CL_SUCCESS)
            sv->out = clCreateBuffer(clc, CL_MEM_READ_WRITE, qn * sizeof(float), NULL, &err);
        free(q);
    } else if (err == CL_SUCCESS) {
        err = CL_OUT_OF_HOST_MEMORY;
    }
    if (err != CL_SUCCESS) {
        fprintf(stderr, "%s: device buffers: OpenCL error %d\n", g_prog, (int)err);
        return BENCH_EXIT_FAILURE;
    }
    sv->rng = o->seed * 0x9E3779B97F4A7C15ULL + 1;
    return BENCH_EXIT_OK;
}

static void teardown(serve *sv)
{
    for (int i = 0; i < TOKEN_RING; i++) {
        if (sv->tok_k[i]) clReleaseMemObject(sv->tok_k[i]);
        if (sv->tok_v[i]) clReleaseMemObject(sv->tok_v[i]);
    }
    if (sv->q) clReleaseMemObject(sv->q);
    if (sv->out) clReleaseMemObject(sv->out);
    clkvq_cache_release(sv->cache);
    free(sv->slots);
    free(sv->prefill_k);
    free(sv->prefill_v);
    free(sv->stage_k);
    free(sv->stage_v);
}

static float scale_of(const serve *sv) { return 1.0f / sqrtf((float)sv->shape->head_dim); }

/* ------------------------------------------------------------ phases */

static clkvq_status free_slot(serve *sv, int i)
{
    slot *sl = &sv->slots[i];
    memset(sl, 0, sizeof *sl);
    return clkvq_cache_truncate(sv->cache, i, 0);
}

/* Appends n tokens of prefill (n <= max_prefill). */
static clkvq_status prefill(serve *sv, int i, int n)
{
    stage(sv, n);
    clkvq_status st = clkvq_cache_append(sv->cache, 0, i, n, sv->stage_k, sv->stage_v);
    if (st == CLKVQ_OK) {
        sv->slots[i].length += n;
        sv->st.prefill_tokens += n;
    }
    return st;
}

/* The next request into idle slot i; OUT_OF_BLOCKS defers it. */
static int admit(serve *sv, int i)
{
    const serve_options *o = sv->opt;
    slot *sl = &sv->slots[i];
    int shared = o->prefix > 0 && uniform(&sv->rng) * 100.0 < o->share_pct;
    int prompt = uniform_int(&sv->rng, o->prompt_min, o->prompt_max);
    int gen = uniform_int(&sv->rng, o->gen_min, o->gen_max);
    int head = shared ? o->prefix : 0;
    if (prompt > sv->max_prefill) prompt = sv->max_prefill;
    if (head + prompt + gen > o->capacity) { /* keep the request inside the capacity */
        int room = o->capacity - head;
        prompt = prompt < room - 1 ? prompt : room - 1;
        gen = room - prompt;
    }
    clkvq_status st = CLKVQ_OK;
    if (shared) {
        int src = -1;
        for (int j = 0; j < o->slots && src < 0; j++)
            if (j != i && sv->slots[j].live && sv->slots[j].has_prefix &&
                sv->slots[j].length >= o->prefix)
                src = j;
        if (src >= 0) {
            st = clkvq_cache_fork(sv->cache, src, i);
            if (st == CLKVQ_OK) st = clkvq_cache_truncate(sv->cache, i, o->prefix);
            if (st == CLKVQ_OK) {
                sl->length = o->prefix;
                sv->st.forks++;
            }
        } else {
            st = prefill(sv, i, o->prefix);
            if (st == CLKVQ_OK) sv->st.prefix_prefills++;
        }
    }
    if (st == CLKVQ_OK) st = prefill(sv, i, prompt);
    if (st == CLKVQ_OK) {
        sl->live = 1;
        sl->has_prefix = shared;
        sl->to_generate = gen;
        sl->generated = 0;
        sv->st.admitted++;
        return BENCH_EXIT_OK;
    }
    if (st != CLKVQ_ERR_OUT_OF_BLOCKS) return report(sv, st, "admission");
    sv->st.deferred++;
    st = free_slot(sv, i);
    return st == CLKVQ_OK ? BENCH_EXIT_OK : report(sv, st, "free a deferred slot");
}

static int sample_pool(serve *sv)
{
    clkvq_status st = clkvq_cache_pool_stats(sv->cache, 0, &sv->pool);
    if (st != CLKVQ_OK) return report(sv, st, "pool stats");
    serve_stats *s = &sv->st;
    if (sv->pool.used_blocks > s->peak_used) s->peak_used = sv->pool.used_blocks;
    if (sv->pool.shared_blocks > s->peak_shared) s->peak_shared = sv->pool.shared_blocks;
    s->used_sum += sv->pool.used_blocks;
    s->shared_sum += sv->pool.shared_blocks;
    long tokens = 0;
    for (int i = 0; i < sv->opt->slots; i++) tokens += sv->slots[i].length;
    if (tokens > s->peak_tokens) s->peak_tokens = tokens;
    return BENCH_EXIT_OK;
}

static int run_step(serve *sv)
{
    const serve_options *o = sv->opt;
    serve_stats *s = &sv->st;
    double t0 = bench_now_s();
    for (int i = 0; i < o->slots; i++)
        if (!sv->slots[i].live && admit(sv, i) != BENCH_EXIT_OK) return BENCH_EXIT_FAILURE;
    double t1 = bench_now_s();
    int live = 0;
    for (int i = 0; i < o->slots; i++) {
        slot *sl = &sv->slots[i];
        if (!sl->live) continue;
        int r = sv->ring_pos++ % TOKEN_RING;
        clkvq_status st = clkvq_cache_append_mem(sv->cache, 0, i, 1, sv->tok_k[r], sv->tok_v[r]);
        if (st == CLKVQ_ERR_OUT_OF_BLOCKS) { /* preempted: freed, its request dropped */
            s->preempted++;
            if ((st = free_slot(sv, i)) != CLKVQ_OK) return report(sv, st, "preempt");
            continue;
        }
        if (st != CLKVQ_OK) return report(sv, st, "append");
        sl->length++;
        live++;
    }
    double t2 = bench_now_s();
    if (sample_pool(sv) != BENCH_EXIT_OK) return BENCH_EXIT_FAILURE;
    double t3 = bench_now_s();
    clkvq_status st = clkvq_cache_decode(sv->cache, 0, sv->q, sv->out, scale_of(sv));
    if (st != CLKVQ_OK) return report(sv, st, "decode");
    /* a decode only enqueues: the step's decode ends when its output is there */
    if (clFinish(clkvq_context_cl_queue(sv->ctx)) != CL_SUCCESS)
        return report(sv, CLKVQ_ERR_OPENCL, "finishing the decode");
    double t4 = bench_now_s();
    double ms = clkvq_last_device_ms(sv->ctx);
    if (ms > 0.0) s->decode_device_ms += ms;
    s->tokens += live;
    s->live_sum += live;
    for (int i = 0; i < o->slots; i++) {
        slot *sl = &sv->slots[i];
        if (sl->live && ++sl->generated >= sl->to_generate) {
            s->requests_done++;
            if ((st = free_slot(sv, i)) != CLKVQ_OK) return report(sv, st, "finish");
        }
    }
    double t5 = bench_now_s();
    s->admit_s += t1 - t0;
    s->append_s += t2 - t1;
    s->decode_s += t4 - t3;
    s->finish_s += t5 - t4;
    return BENCH_EXIT_OK;
}

/* Builds every kernel the run uses (appends of both kinds, decode), untimed. */
static int warm_up(serve *sv)
{
    clkvq_status st = prefill(sv, 0, WARM_TOKENS);
    if (st == CLKVQ_OK) st = clkvq_cache_append_mem(sv->cache, 0, 0, 1, sv->tok_k[0], sv->tok_v[0]);
    if (st == CLKVQ_OK) st = clkvq_cache_decode(sv->cache, 0, sv->q, sv->out, scale_of(sv));
    if (st == CLKVQ_OK && sv->opt->slots > 1) st = clkvq_cache_fork(sv->cache, 0, 1);
    if (st == CLKVQ_OK && sv->opt->slots > 1) st = clkvq_cache_truncate(sv->cache, 1, 1);
    if (st == CLKVQ_OK && sv->opt->slots > 1) st = free_slot(sv, 1);
    if (st == CLKVQ_OK) st = free_slot(sv, 0);
    if (st != CLKVQ_OK) return report(sv, st, "warm-up");
    sv->st.prefill_tokens = 0;
    return BENCH_EXIT_OK;
}

/* ------------------------------------------------------------ output */

static size_t paged_peak_bytes(const serve *sv)
{
    return (size_t)sv->st.peak_used * sv->pool.block_bytes + sv->fixed_bytes;
}

static void print_tables(const serve *sv)
{
    const serve_options *o = sv->opt;
    const serve_stats *s = &sv->st;
    const serve_shape *sh = sv->shape;
    clkvq_layer_config lc = layer_config(o);
    printf("clkvq-bench serve\n");
    printf("device:   %s / %s (driver %s, %d CUs)\n", sv->info.platform, sv->info.name,
           sv->info.driver_version, sv->info.compute_units);
    printf("cache:    1 layer (a model's cache is n_layers of these), %s (%d q / %d kv heads, "
           "head_dim %d), scheme %s",
           sh->name, sh->n_q_heads, sh->n_kv_heads, sh->head_dim, clkvq_scheme_name(o->scheme));
    if (o->scheme != CLKVQ_SCHEME_FP16)
        printf(" %s group %d", g_formats[o->format].name, lc.group_size);
    printf(", group-planar K/V\n");
    printf("pages:    %d tokens, %zu bytes each (K+V); pool of %d pages; decode tunables: "
           "variant %s, chunk %d, vw %d, wgs %d\n",
           sv->pool.block_size, sv->pool.block_bytes, sv->pool.n_blocks,
           bench_variant_name(sv->tuning.variant),
           sv->tuning.chunk, sv->tuning.vw, sv->tuning.wgs);
    printf("workload: %d slots, capacity %d, %d steps, seed %llu; %d%% of requests start with "
           "a shared %d-token prefix; prompt %d..%d, generate %d..%d tokens\n\n",
           o->slots, o->capacity, o->steps, (unsigned long long)o->seed, o->share_pct, o->prefix,
           o->prompt_min, o->prompt_max, o->gen_min, o->gen_max);

    static const char *const h1[] = {"steps", "requests done", "tokens decoded", "mean batch",
                                     "wall s", "tokens/s", "decode-only tokens/s"};
    bench_table *t = bench_table_new(7, h1, "rrrrrrr");
    if (t && bench_table_add_row(t) >= 0) {
        bench_table_cell(t, 0, "%d", o->steps);
        bench_table_cell(t, 1, "%ld", s->requests_done);
        bench_table_cell(t, 2, "%ld", s->tokens);
        bench_table_cell(t, 3, "%.1f", (double)s->live_sum / o->steps);
        bench_table_cell(t, 4, "%.2f", s->wall_s);
        bench_table_cell(t, 5, "%.1f", s->tokens / s->wall_s);
        bench_table_cell(t, 6, "%.1f", s->decode_s > 0 ? s->tokens / s->decode_s : 0.0);
        bench_table_print(t, stdout);
    }
    bench_table_free(t);
    printf("\n");

    static const char *const h2[] = {"phase", "s", "share", "what"};
    t = bench_table_new(4, h2, "lrrl");
    double total = s->admit_s + s->append_s + s->decode_s + s->finish_s;
    const struct {
        const char *name;
        double sec;
        const char *what;
    } phases[] = {
        {"admit", s->admit_s, "prefill chunks, prefix forks + truncations"},
        {"append", s->append_s, "one token per live sequence"},
        {"decode", s->decode_s, "clkvq_cache_decode over all slots"},
        {"finish", s->finish_s, "freeing finished requests"},
    };
    for (int i = 0; t && i < 4; i++) {
        if (bench_table_add_row(t) < 0) break;
        bench_table_cell(t, 0, "%s", phases[i].name);
        bench_table_cell(t, 1, "%.2f", phases[i].sec);
        bench_table_cell(t, 2, "%.1f%%", total > 0 ? 100.0 * phases[i].sec / total : 0.0);
        bench_table_cell(t, 3, "%s", phases[i].what);
    }
    if (t) bench_table_print(t, stdout);
    bench_table_free(t);
    printf("\ndecode device time (profiling events): %.2f s of the %.2f s decode wall time\n\n",
           s->decode_device_ms * 1e-3, s->decode_s);

    static const char *const h3[] = {"device memory", "MB", "x contiguous"};
    t = bench_table_new(3, h3, "lrr");
    const struct {
        const char *name;
        size_t bytes;
    } mem[] = {
        {"contiguous cache (block_size 0) at this capacity", sv->contiguous_bytes},
        {"paged: peak in use (pages in use x page bytes + rings, tables)",
         paged_peak_bytes(sv)},
        {"paged: pool as allocated (--pool-blocks)", sv->pool_bytes},
    };
    for (int i = 0; t && i < 3; i++) {
        if (bench_table_add_row(t) < 0) break;
        bench_table_cell(t, 0, "%s", mem[i].name);
        bench_table_cell(t, 1, "%.2f", mem[i].bytes / 1e6);
        bench_table_cell(t, 2, "%.3f", (double)mem[i].bytes / (double)sv->contiguous_bytes);
    }
    if (t) bench_table_print(t, stdout);
    bench_table_free(t);
    printf("\n");

    static const char *const h4[] = {"pages", "peak", "mean"};
    t = bench_table_new(3, h4, "lrr");
    if (t && bench_table_add_row(t) >= 0) {
        bench_table_cell(t, 0, "in use");
        bench_table_cell(t, 1, "%d", s->peak_used);
        bench_table_cell(t, 2, "%.1f", (double)s->used_sum / o->steps);
    }
    if (t && bench_table_add_row(t) >= 0) {
        bench_table_cell(t, 0, "shared by forks (held by 2+ sequences)");
        bench_table_cell(t, 1, "%d", s->peak_shared);
        bench_table_cell(t, 2, "%.1f", (double)s->shared_sum / o->steps);
    }
    if (t) bench_table_print(t, stdout);
    bench_table_free(t);
    printf("\nrequests: %ld admitted, %ld done; prefix taken by fork %ld times, prefilled %ld "
           "times (no live holder); %ld deferred and %ld preempted for want of pages; %ld "
           "prefill tokens; most tokens held at once %ld (%ld with shared pages counted once: "
           "%d pages x %d)\n",
           s->admitted, s->requests_done, s->forks, s->prefix_prefills, s->deferred,
           s->preempted, s->prefill_tokens, s->peak_tokens,
           (long)s->peak_used * sv->pool.block_size, s->peak_used, sv->pool.block_size);
}

static int print_json(const serve *sv)
{
    const serve_options *o = sv->opt;
    const serve_stats *s = &sv->st;
    cJSON *root = cJSON_CreateObject();
    if (!root) return BENCH_EXIT_FAILURE;
    char device[400];
    snprintf(device, sizeof device, "%s / %s", sv->info.platform, sv->info.name);
    cJSON_AddStringToObject(root, "device", device);
    cJSON_AddStringToObject(root, "shape", sv->shape->name);
    cJSON_AddNumberToObject(root, "n_layers", 1);
    cJSON_AddStringToObject(root, "scheme", clkvq_scheme_name(o->scheme));
    cJSON_AddStringToObject(root, "format",
                            o->scheme == CLKVQ_SCHEME_FP16 ? "fp16" : g_formats[o->format].name);
    cJSON_AddNumberToObject(root, "group_size", o->group);
    cJSON_AddNumberToObject(root, "block_size", sv->pool.block_size);
    cJSON_AddNumberToObject(root, "block_bytes", (double)sv->pool.block_bytes);
    cJSON_AddNumberToObject(root, "pool_blocks", sv->pool.n_blocks);
    cJSON_AddNumberToObject(root, "slots", o->slots);
    cJSON_AddNumberToObject(root, "capacity", o->capacity);
    cJSON_AddNumberToObject(root, "prefix", o->prefix);
    cJSON_AddNumberToObject(root, "share_pct", o->share_pct);
    cJSON_AddNumberToObject(root, "prompt_min", o->prompt_min);
    cJSON_AddNumberToObject(root, "prompt_max", o->prompt_max);
    cJSON_AddNumberToObject(root, "gen_min", o->gen_min);
    cJSON_AddNumberToObject(root, "gen_max", o->gen_max);
    cJSON_AddNumberToObject(root, "seed", (double)o->seed);
    cJSON_AddNumberToObject(root, "steps", o->steps);
    cJSON_AddNumberToObject(root, "requests_done", (double)s->requests_done);
    cJSON_AddNumberToObject(root, "tokens_decoded", (double)s->tokens);
    cJSON_AddNumberToObject(root, "mean_batch", (double)s->live_sum / o->steps);
    cJSON_AddNumberToObject(root, "wall_s", s->wall_s);
    cJSON_AddNumberToObject(root, "tokens_per_s", s->tokens / s->wall_s);
    cJSON_AddNumberToObject(root, "decode_tokens_per_s",
                            s->decode_s > 0 ? s->tokens / s->decode_s : 0.0);
    cJSON *share = cJSON_AddObjectToObject(root, "time_s");
    if (share) {
        cJSON_AddNumberToObject(share, "admit", s->admit_s);
        cJSON_AddNumberToObject(share, "append", s->append_s);
        cJSON_AddNumberToObject(share, "decode", s->decode_s);
        cJSON_AddNumberToObject(share, "finish", s->finish_s);
        cJSON_AddNumberToObject(share, "decode_device", s->decode_device_ms * 1e-3);
    }
    cJSON_AddNumberToObject(root, "paged_peak_bytes", (double)paged_peak_bytes(sv));
    cJSON_AddNumberToObject(root, "contiguous_bytes", (double)sv->contiguous_bytes);
    cJSON_AddNumberToObject(root, "pool_bytes", (double)sv->pool_bytes);
    cJSON_AddNumberToObject(root, "fixed_bytes", (double)sv->fixed_bytes);
    cJSON_AddNumberToObject(root, "peak_used_blocks", s->peak_used);
    cJSON_AddNumberToObject(root, "mean_used_blocks", (double)s->used_sum / o->steps);
    cJSON_AddNumberToObject(root, "shared_blocks", s->peak_shared);
    cJSON_AddNumberToObject(root, "mean_shared_blocks", (double)s->shared_sum / o->steps);
    cJSON_AddNumberToObject(root, "peak_tokens", (double)s->peak_tokens);
    cJSON_AddNumberToObject(root, "forks", (double)s->forks);
    cJSON_AddNumberToObject(root, "prefix_prefills", (double)s->prefix_prefills);
    cJSON_AddNumberToObject(root, "prefill_tokens", (double)s->prefill_tokens);
    cJSON_AddNumberToObject(root, "deferred", (double)s->deferred);
    cJSON_AddNumberToObject(root, "preempted", (double)s->preempted);
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text) return BENCH_EXIT_FAILURE;
    puts(text);
    cJSON_free(text);
    return BENCH_EXIT_OK;
}

/* ------------------------------------------------------------ main */

int bench_serve_main(int argc, char **argv)
{
    serve_options opt;
    int rc = parse_options(argc, argv, &opt);
    if (rc < 0) return BENCH_EXIT_OK; /* --help */
    if (rc != BENCH_EXIT_OK) return rc;
    serve sv;
    memset(&sv, 0, sizeof sv);
    sv.opt = &opt;
    sv.shape = &g_shapes[opt.shape];
    clkvq_status st = clkvq_context_create(&sv.ctx, opt.device);
    if (st != CLKVQ_OK) {
        fprintf(stderr, "%s: open device: %s: %s\n", g_prog, clkvq_status_string(st),
                clkvq_last_error(NULL));
        return BENCH_EXIT_FAILURE;
    }
    if ((st = clkvq_context_device_info(sv.ctx, &sv.info)) != CLKVQ_OK)
        rc = report(&sv, st, "device info");
    if (rc == BENCH_EXIT_OK) rc = setup(&sv);
    if (rc == BENCH_EXIT_OK) rc = warm_up(&sv);
    double t0 = bench_now_s();
    for (int step = 0; step < opt.steps && rc == BENCH_EXIT_OK; step++) {
        rc = run_step(&sv);
        if ((step + 1) % 250 == 0)
            fprintf(stderr, "%s: step %d, %ld requests done, %d pages in use, %.1f s\n", g_prog,
                    step + 1, sv.st.requests_done, sv.pool.used_blocks, bench_now_s() - t0);
    }
    sv.st.wall_s = bench_now_s() - t0;
    if (rc == BENCH_EXIT_OK) {
        if (opt.json)
            rc = print_json(&sv);
        else
            print_tables(&sv);
    }
    teardown(&sv);
    clkvq_context_release(sv.ctx);
    return rc;
}
