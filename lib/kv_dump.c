/*
 * Calibration dumps: per layer q, k, v in a safetensors file.
 *
 * safetensors layout: 8 bytes little-endian N, N bytes of JSON header,
 * then the data block. The header maps each tensor name to {"dtype",
 * "shape", "data_offsets": [begin, end]} with offsets relative to the data
 * block, plus an optional "__metadata__" object of string -> string.
 *
 * The reader trusts nothing in the file: a dump comes from a user's script
 * (tools/dump_kv.py) or from another machine, and the precision search reads
 * every byte of it. So before any tensor byte is touched, the header length,
 * the JSON, every dtype, shape and offset range, the absence of overlaps,
 * the layer set and the shapes across layers are all checked, and any
 * violation is CLKVQ_ERR_CORRUPT with a message naming the tensor and the
 * field. After that, clkvq_dump_read only copies within ranges already
 * proven to lie inside the data block.
 *
 * Where we are stricter than the safetensors spec, it is because the
 * precision search needs it: shapes must be rank 3 with positive dims (a
 * zero-token dump is useless), the only names are layers.<i>.{q,k,v}, and
 * the only dtypes F32/F16/BF16. Where we are looser: gaps between tensors
 * (or bytes after the last one) are accepted - they cannot make a read go
 * out of bounds, and some writers align tensors.
 */
#include "internal.h"
#include "program_cache.h"
#include "quant_format.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The safetensors library refuses headers over 100 MB (MAX_HEADER_SIZE);
 * anything larger is garbage in the length field, not a real header, and
 * would make us allocate it. */
#define DUMP_MAX_HEADER 100000000ULL
/* JSON numbers are doubles in cJSON: integers above 2^53 are not exact, and
 * no file has offsets that large, so such a number is corrupt. */
#define DUMP_MAX_EXACT_INT 9007199254740992.0
#define DUMP_FORMAT_NAME "clkvq-kv-dump"

typedef enum { DT_F32 = 0, DT_F16, DT_BF16 } dump_dtype;

static const char *const k_dtype_names[] = {"F32", "F16", "BF16"};
static const size_t k_dtype_size[] = {4, 2, 2};
static const char k_which[3] = {'q', 'k', 'v'};

typedef struct {
    int present;
    dump_dtype dtype;
    int64_t shape[3];
    uint64_t begin, end; /* within the data block */
} dump_tensor;

struct clkvq_kv_dump {
    clkvq_context *ctx; /* where read errors go (may be NULL) */
    void *map;          /* mmap'd file, NULL for memory dumps */
    size_t map_size;
    const unsigned char *data; /* data block */
    size_t data_size;
    clkvq_dump_info info;
    dump_tensor *tensors; /* [n_layers][3]: q, k, v */
};

/* ------------------------------------------------------------ helpers */

static uint64_t get_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void put_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* An exact non-negative integer from a JSON number, or -1. */
static int json_uint(const cJSON *item, uint64_t *out)
{
    if (!cJSON_IsNumber(item)) return -1;
    double d = item->valuedouble;
    if (!isfinite(d) || d < 0 || d > DUMP_MAX_EXACT_INT || d != floor(d)) return -1;
    *out = (uint64_t)d;
    return 0;
}

/* "layers.<i>.<q|k|v>" with i a plain decimal (no sign, no leading zeros,
 * fits an int), so each tensor has exactly one spelling and duplicates
 * can't hide as "layers.01.q". */
static int parse_name(const char *name, int *layer, int *which)
{
    static const char prefix[] = "layers.";
    if (strncmp(name, prefix, sizeof prefix - 1) != 0) return -1;
    const char *p = name + sizeof prefix - 1;
    if (*p < '0' || *p > '9' || (p[0] == '0' && p[1] >= '0' && p[1] <= '9')) return -1;
    long long v = 0;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        if (v > 1000000000LL) return -1;
        p++;
    }
    if (p[0] != '.' || !p[1] || p[2]) return -1;
    const char *w = memchr(k_which, p[1], sizeof k_which);
    if (!w) return -1;
    *layer = (int)v;
    *which = (int)(w - k_which);
    return 0;
}

/* Copies at most size-1 bytes of s, never cutting a UTF-8 sequence. */
static void copy_utf8(char *dst, size_t size, const char *s)
{
    size_t n = strlen(s);
    if (n >= size) {
        n = size - 1;
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80) n--; /* s[n] continues a char */
    }
    memcpy(dst, s, n);
    dst[n] = '\0';
}

/* ------------------------------------------------------------ header parse */

typedef struct {
    clkvq_context *ctx;
    const char *src; /* file path or "<memory>", for messages */
} parse_env;

#define CORRUPT(env, ...) corrupt_msg((env), __VA_ARGS__)

static clkvq_status corrupt_msg(const parse_env *env, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static clkvq_status corrupt_msg(const parse_env *env, const char *fmt, ...)
{
    char why[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    return clkvq_fail(env->ctx, CLKVQ_ERR_CORRUPT, "calibration dump %s: %s", env->src, why);
}

/* Checks one tensor entry's dtype, shape and offsets against the data
 * block size; fills t. */
static clkvq_status parse_tensor(const parse_env *env, const char *name, const cJSON *entry,
                                 uint64_t data_size, dump_tensor *t)
{
    if (!cJSON_IsObject(entry)) return CORRUPT(env, "tensor %s: entry is not a JSON object", name);

    const cJSON *dtype = cJSON_GetObjectItemCaseSensitive(entry, "dtype");
    if (!cJSON_IsString(dtype))
        return CORRUPT(env, "tensor %s: \"dtype\" missing or not a string", name);
    int dt = -1;
    for (int i = 0; i < 3; i++)
        if (strcmp(dtype->valuestring, k_dtype_names[i]) == 0) dt = i;
    if (dt < 0)
        return CORRUPT(env, "tensor %s: dtype \"%.32s\" is not F32, F16 or BF16", name,
                       dtype->valuestring);
    t->dtype = (dump_dtype)dt;

    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(entry, "shape");
    if (!cJSON_IsArray(shape))
        return CORRUPT(env, "tensor %s: \"shape\" missing or not an array", name);
    int rank = cJSON_GetArraySize(shape);
    if (rank != 3)
        return CORRUPT(env, "tensor %s: shape has rank %d, expected 3 ([heads, tokens, head_dim])",
                       name, rank);
    /* Each dim fits an int (clkvq_dump_info holds ints). Three of them
     * multiply past 2^64, so the product is checked step by step against
     * what the data block could hold, before it is ever formed. */
    uint64_t elements = 1;
    int d = 0;
    for (const cJSON *dim = shape->child; dim; dim = dim->next, d++) {
        uint64_t v;
        if (json_uint(dim, &v) != 0 || v == 0 || v > INT32_MAX)
            return CORRUPT(env, "tensor %s: shape[%d] is not an integer in [1, %d]", name, d,
                           INT32_MAX);
        t->shape[d] = (int64_t)v;
        if (elements > data_size / v)
            return CORRUPT(env, "tensor %s: shape is larger than the %llu-byte data block", name,
                           (unsigned long long)data_size);
        elements *= v;
    }
    if (elements > data_size / k_dtype_size[dt])
        return CORRUPT(env, "tensor %s: shape is larger than the %llu-byte data block", name,
                       (unsigned long long)data_size);
    const uint64_t nbytes = elements * k_dtype_size[dt]; /* <= data_size: no overflow */

    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2)
        return CORRUPT(env, "tensor %s: \"data_offsets\" missing or not [begin, end]", name);
    uint64_t begin, end;
    if (json_uint(offs->child, &begin) != 0 || json_uint(offs->child->next, &end) != 0)
        return CORRUPT(env, "tensor %s: data_offsets are not non-negative integers", name);
    if (begin > end)
        return CORRUPT(env, "tensor %s: data_offsets [%llu, %llu] end before they begin", name,
                       (unsigned long long)begin, (unsigned long long)end);
    if (end > data_size)
        return CORRUPT(env, "tensor %s: data_offsets [%llu, %llu] outside the %llu-byte data block",
                       name, (unsigned long long)begin, (unsigned long long)end,
                       (unsigned long long)data_size);
    if (end - begin != nbytes)
        return CORRUPT(env,
                       "tensor %s: data_offsets span %llu bytes but shape [%lld, %lld, %lld] of "
                       "%s needs %llu",
                       name, (unsigned long long)(end - begin), (long long)t->shape[0],
                       (long long)t->shape[1], (long long)t->shape[2], k_dtype_names[dt],
                       (unsigned long long)nbytes);
    t->begin = begin;
    t->end = end;
    t->present = 1;
    return CLKVQ_OK;
}

typedef struct {
    uint64_t begin;
    int slot; /* layer * 3 + which */
} tensor_pos;

/* Total order (begin, then slot), so the overlap message is the same on
 * every libc although qsort is not stable. */
static int by_begin(const void *a, const void *b)
{
    const tensor_pos *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return (x->slot > y->slot) - (x->slot < y->slot);
}

/* safetensors forbids tensors sharing bytes; for us an overlap would mean
 * a writer bug (one tensor silently aliasing another). Sorted by begin,
 * each tensor must start at or after the previous one's end. Dims are
 * positive, so no tensor is empty and the test is exact. */
static clkvq_status check_overlaps(const parse_env *env, const dump_tensor *t, int n)
{
    tensor_pos *pos = malloc((size_t)n * sizeof *pos);
    if (!pos)
        return clkvq_fail(env->ctx, CLKVQ_ERR_OUT_OF_MEMORY, "calibration dump %s: no memory",
                          env->src);
    for (int i = 0; i < n; i++) pos[i] = (tensor_pos){t[i].begin, i};
    qsort(pos, (size_t)n, sizeof *pos, by_begin);
    clkvq_status st = CLKVQ_OK;
    for (int i = 1; i < n && st == CLKVQ_OK; i++) {
        const dump_tensor *a = &t[pos[i - 1].slot], *b = &t[pos[i].slot];
        if (b->begin < a->end)
            st = CORRUPT(
                env, "tensors layers.%d.%c [%llu, %llu] and layers.%d.%c [%llu, %llu] overlap",
                pos[i - 1].slot / 3, k_which[pos[i - 1].slot % 3], (unsigned long long)a->begin,
                (unsigned long long)a->end, pos[i].slot / 3, k_which[pos[i].slot % 3],
                (unsigned long long)b->begin, (unsigned long long)b->end);
    }
    free(pos);
    return st;
}

/* __metadata__: safetensors defines it as string -> string; anything else
 * would be refused by the reference reader, so it is corrupt here too. */
static clkvq_status parse_metadata(const parse_env *env, const cJSON *meta, clkvq_dump_info *info)
{
    if (!cJSON_IsObject(meta)) return CORRUPT(env, "__metadata__ is not a JSON object");
    for (const cJSON *m = meta->child; m; m = m->next)
        if (!cJSON_IsString(m))
            return CORRUPT(env, "__metadata__ value \"%.64s\" is not a string",
                           m->string ? m->string : "");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(meta, "model");
    if (model) copy_utf8(info->model, sizeof info->model, model->valuestring);
    return CLKVQ_OK;
}

/* Every tensor of every layer has the shape of layer 0's q (queries) or k
 * (keys and values): the search compares layers token by token, so a dump
 * whose layers disagree cannot have come from one forward pass. */
static clkvq_status check_shapes(const parse_env *env, const dump_tensor *t, int n_layers,
                                 clkvq_dump_info *info)
{
    const int64_t hq = t[0].shape[0], hkv = t[1].shape[0];
    const int64_t tokens = t[0].shape[1], dim = t[0].shape[2];
    for (int l = 0; l < n_layers; l++)
        for (int w = 0; w < 3; w++) {
            const dump_tensor *x = &t[l * 3 + w];
            int64_t heads = w == 0 ? hq : hkv;
            if (x->shape[0] != heads || x->shape[1] != tokens || x->shape[2] != dim)
                return CORRUPT(env,
                               "tensor layers.%d.%c has shape [%lld, %lld, %lld], expected "
                               "[%lld, %lld, %lld] as layers.0.%c",
                               l, k_which[w], (long long)x->shape[0], (long long)x->shape[1],
                               (long long)x->shape[2], (long long)heads, (long long)tokens,
                               (long long)dim, w == 0 ? 'q' : 'k');
        }
    if (hq % hkv != 0)
        return CORRUPT(env, "%lld query heads is not a multiple of %lld kv heads (GQA)",
                       (long long)hq, (long long)hkv);
    info->n_layers = n_layers;
    info->n_q_heads = (int)hq;
    info->n_kv_heads = (int)hkv;
    info->n_tokens = (int)tokens;
    info->head_dim = (int)dim;
    return CLKVQ_OK;
}

/* Walks the tensors of the parsed header: names, duplicates, the layer set,
 * then each entry's fields. */
static clkvq_status parse_tensors(const parse_env *env, const cJSON *root, uint64_t data_size,
                                  clkvq_kv_dump *dump)
{
    int n_tensors = 0, max_layer = -1, n_meta = 0;
    const cJSON *meta = NULL;
    for (const cJSON *e = root->child; e; e = e->next) {
        const char *name = e->string ? e->string : "";
        if (strcmp(name, "__metadata__") == 0) {
            meta = e;
            n_meta++;
            continue;
        }
        int layer, which;
        if (parse_name(name, &layer, &which) != 0)
            return CORRUPT(env, "unknown tensor \"%.64s\" (a dump holds layers.<i>.q, .k, .v)",
                           name);
        if (layer > max_layer) max_layer = layer;
        if (n_tensors == INT32_MAX / 4) return CORRUPT(env, "too many tensors");
        n_tensors++;
    }
    if (n_meta > 1) return CORRUPT(env, "__metadata__ appears %d times", n_meta);
    if (meta) {
        clkvq_status st = parse_metadata(env, meta, &dump->info);
        if (st != CLKVQ_OK) return st;
    }
    if (n_tensors == 0) return CORRUPT(env, "no tensors (expected layers.<i>.q, .k, .v)");
    /* The slot array is sized by the largest layer index; bounding that by
     * the tensor count first (at most 3 slots per header entry) keeps a
     * name like layers.999999999.q from allocating gigabytes, while a
     * merely incomplete dump still gets told which tensor is missing. */
    const int n_layers = max_layer + 1;
    if (n_layers > n_tensors)
        return CORRUPT(env,
                       "layers.%d present but only %d tensors: layers 0..%d cannot all have q, k "
                       "and v",
                       max_layer, n_tensors, max_layer);
    dump->tensors = calloc((size_t)n_layers * 3, sizeof *dump->tensors);
    if (!dump->tensors)
        return clkvq_fail(env->ctx, CLKVQ_ERR_OUT_OF_MEMORY,
                          "calibration dump %s: no memory for %d layers", env->src, n_layers);
    for (const cJSON *e = root->child; e; e = e->next) {
        const char *name = e->string ? e->string : "";
        if (strcmp(name, "__metadata__") == 0) continue;
        int layer = 0, which = 0;
        (void)parse_name(name, &layer, &which); /* checked in the first pass */
        dump_tensor *t = &dump->tensors[layer * 3 + which];
        if (t->present) return CORRUPT(env, "tensor %s appears twice in the header", name);
        clkvq_status st = parse_tensor(env, name, e, data_size, t);
        if (st != CLKVQ_OK) return st;
    }
    for (int i = 0; i < n_layers * 3; i++)
        if (!dump->tensors[i].present)
            return CORRUPT(env, "tensor layers.%d.%c is missing (layers 0..%d need q, k and v)",
                           i / 3, k_which[i % 3], max_layer);
    clkvq_status st = check_overlaps(env, dump->tensors, n_layers * 3);
    if (st != CLKVQ_OK) return st;
    return check_shapes(env, dump->tensors, n_layers, &dump->info);
}

static clkvq_status parse_dump(const parse_env *env, const unsigned char *bytes, size_t size,
                               clkvq_kv_dump *dump)
{
    if (size < 8)
        return CORRUPT(env, "%zu bytes, shorter than the 8-byte header length field", size);
    const uint64_t n = get_le64(bytes);
    if (n > DUMP_MAX_HEADER)
        return CORRUPT(env, "header length %llu exceeds the %llu-byte limit", (unsigned long long)n,
                       DUMP_MAX_HEADER);
    if (n > size - 8)
        return CORRUPT(env,
                       "header length %llu exceeds the %zu bytes after the length field "
                       "(truncated file?)",
                       (unsigned long long)n, size - 8);
    if (n == 0) return CORRUPT(env, "header length is 0 (no JSON header)");
    /* JSON text never holds a raw NUL; one here would also cut cJSON's C
     * strings short and hide the rest of a name. */
    const unsigned char *nul = memchr(bytes + 8, 0, (size_t)n);
    if (nul) return CORRUPT(env, "NUL byte in the header at byte %zu", (size_t)(nul - bytes - 8));

    /* cJSON is given an explicit length, but a NUL-terminated private copy
     * keeps any parser slip inside our own buffer rather than past the end
     * of a mapping. Headers are small next to the data. */
    char *text = malloc((size_t)n + 1);
    if (!text)
        return clkvq_fail(env->ctx, CLKVQ_ERR_OUT_OF_MEMORY,
                          "calibration dump %s: no memory for a %llu-byte header", env->src,
                          (unsigned long long)n);
    memcpy(text, bytes + 8, (size_t)n);
    text[n] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, (size_t)n, &end, 0);
    clkvq_status st = CLKVQ_OK;
    if (!root) {
        st = CORRUPT(env, "header is not valid JSON (error near header byte %zu)",
                     end && end >= text ? (size_t)(end - text) : (size_t)0);
    } else {
        /* safetensors pads the header with spaces to a multiple of 8; any
         * other trailing byte means two documents or a bad length. */
        for (const char *p = end; p < text + n && st == CLKVQ_OK; p++)
            if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
                st = CORRUPT(env, "bytes after the JSON header object at header byte %zu",
                             (size_t)(p - text));
        if (st == CLKVQ_OK && !cJSON_IsObject(root))
            st = CORRUPT(env, "header is JSON but not an object");
        if (st == CLKVQ_OK) st = parse_tensors(env, root, size - 8 - n, dump);
    }
    cJSON_Delete(root);
    free(text);
    if (st != CLKVQ_OK) return st;
    dump->data = bytes + 8 + n;
    dump->data_size = (size_t)(size - 8 - n);
    return CLKVQ_OK;
}

/* Parses bytes into a new dump; on failure nothing is left allocated. */
static clkvq_status open_common(clkvq_context *ctx, const char *src, const unsigned char *bytes,
                                size_t size, clkvq_kv_dump **out)
{
    clkvq_kv_dump *dump = calloc(1, sizeof *dump);
    if (!dump)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "calibration dump %s: no memory", src);
    dump->ctx = ctx;
    parse_env env = {ctx, src};
    clkvq_status st = parse_dump(&env, bytes, size, dump);
    if (st != CLKVQ_OK) {
        free(dump->tensors);
        free(dump);
        return st;
    }
    *out = dump;
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ public: read */

clkvq_status clkvq_dump_open_memory(clkvq_context *ctx, const void *data, size_t size,
                                    clkvq_kv_dump **out)
{
    clkvq_clear_error(ctx);
    if (!out) return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_dump_open_memory: out is NULL");
    *out = NULL;
    if (!data && size > 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_dump_open_memory: data is NULL");
    return open_common(ctx, "<memory>", data ? data : (const void *)"", size, out);
}

/*
 * The file is mapped, not read: a calibration dump of a real model is
 * gigabytes and the search reads one layer at a time. The header checks
 * make every access land inside the mapping as it was at open. (A file
 * truncated by another process while mapped raises SIGBUS on access, as
 * with any mmap reader; dumps are written atomically, so a writer replaces
 * the file instead of shrinking it.)
 */
clkvq_status clkvq_dump_open(clkvq_context *ctx, const char *path, clkvq_kv_dump **out)
{
    clkvq_clear_error(ctx);
    if (!path || !out)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_dump_open: %s is NULL",
                          !path ? "path" : "out");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return clkvq_fail(ctx, CLKVQ_ERR_IO, "calibration dump %s: cannot open: %s", path,
                          strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        return clkvq_fail(ctx, CLKVQ_ERR_IO, "calibration dump %s: fstat: %s", path, strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) { /* a FIFO or device has no size to map */
        close(fd);
        return clkvq_fail(ctx, CLKVQ_ERR_IO, "calibration dump %s: not a regular file", path);
    }
    if ((uint64_t)sb.st_size > SIZE_MAX) {
        close(fd);
        return clkvq_fail(ctx, CLKVQ_ERR_IO, "calibration dump %s: too large to map", path);
    }
    size_t size = (size_t)sb.st_size;
    void *map = NULL;
    if (size > 0) { /* mmap of 0 bytes is EINVAL; an empty file is just corrupt */
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int err = errno;
            close(fd);
            return clkvq_fail(ctx, CLKVQ_ERR_IO, "calibration dump %s: mmap: %s", path,
                              strerror(err));
        }
    }
    close(fd); /* the mapping keeps the file alive */
    clkvq_status st = open_common(ctx, path, map ? map : (const void *)"", size, out);
    if (st != CLKVQ_OK) {
        if (map) munmap(map, size);
        return st;
    }
    (*out)->map = map;
    (*out)->map_size = size;
    return CLKVQ_OK;
}

void clkvq_dump_close(clkvq_kv_dump *dump)
{
    if (!dump) return;
    if (dump->map) munmap(dump->map, dump->map_size);
    free(dump->tensors);
    free(dump);
}

clkvq_status clkvq_dump_info_get(const clkvq_kv_dump *dump, clkvq_dump_info *out)
{
    if (!dump || !out)
        return clkvq_fail(dump ? dump->ctx : NULL, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_dump_info_get: %s is NULL", !dump ? "dump" : "out");
    clkvq_clear_error(dump->ctx);
    *out = dump->info;
    return CLKVQ_OK;
}

/* Little-endian bytes to host values one element at a time: the data may
 * sit at any alignment (a header length that is not a multiple of 8, or
 * F16 tensors before an F32 one) and the host may be big-endian. */
clkvq_status clkvq_dump_read(const clkvq_kv_dump *dump, int layer, char which, float *out)
{
    if (!dump) return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_dump_read: dump is NULL");
    clkvq_context *ctx = dump->ctx;
    clkvq_clear_error(ctx);
    if (!out) return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_dump_read: out is NULL");
    if (layer < 0 || layer >= dump->info.n_layers)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_dump_read: layer %d outside [0, %d)",
                          layer, dump->info.n_layers);
    const char *w = which ? memchr(k_which, which, sizeof k_which) : NULL;
    if (!w)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_dump_read: which is '%c' (0x%02x), expected 'q', 'k' or 'v'",
                          which >= 32 && which < 127 ? which : '?', (unsigned char)which);
    const dump_tensor *t = &dump->tensors[layer * 3 + (w - k_which)];
    const unsigned char *p = dump->data + t->begin;
    const size_t n = (size_t)t->shape[0] * (size_t)t->shape[1] * (size_t)t->shape[2];
    switch (t->dtype) {
    case DT_F32:
        for (size_t i = 0; i < n; i++, p += 4) {
            uint32_t u =
                (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
            memcpy(&out[i], &u, 4);
        }
        break;
    case DT_F16:
        for (size_t i = 0; i < n; i++, p += 2)
            out[i] = clkvq_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
        break;
    case DT_BF16: /* bfloat16 is the upper half of an IEEE single */
        for (size_t i = 0; i < n; i++, p += 2) {
            uint32_t u = ((uint32_t)p[0] | (uint32_t)p[1] << 8) << 16;
            memcpy(&out[i], &u, 4);
        }
        break;
    }
    /* A NaN or Inf in calibration data would turn every error the search
     * measures for this layer into NaN; say where it is instead. */
    for (size_t i = 0; i < n; i++)
        if (!isfinite(out[i])) {
            size_t dim = (size_t)t->shape[2], tokens = (size_t)t->shape[1];
            return clkvq_fail(ctx, CLKVQ_ERR_NONFINITE,
                              "calibration dump: layers.%d.%c[head %zu][token %zu][channel %zu] "
                              "is %g",
                              layer, *w, i / dim / tokens, i / dim % tokens, i % dim,
                              (double)out[i]);
        }
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ public: write */

static int add_number(cJSON *array, double v)
{
    cJSON *n = cJSON_CreateNumber(v);
    if (!n || !cJSON_AddItemToArray(array, n)) {
        cJSON_Delete(n);
        return -1;
    }
    return 0;
}

/* One tensor's header entry; -1 on allocation failure (entry freed). */
static int add_entry(cJSON *root, const char *name, const char *dtype, int heads, int tokens,
                     int dim, uint64_t begin, uint64_t end)
{
    cJSON *entry = cJSON_CreateObject();
    cJSON *shape = cJSON_CreateArray(), *offs = cJSON_CreateArray();
    int ok = entry && shape && offs && cJSON_AddStringToObject(entry, "dtype", dtype) &&
             add_number(shape, heads) == 0 && add_number(shape, tokens) == 0 &&
             add_number(shape, dim) == 0 && add_number(offs, (double)begin) == 0 &&
             add_number(offs, (double)end) == 0;
    if (ok && cJSON_AddItemToObject(entry, "shape", shape))
        shape = NULL;
    else
        ok = 0;
    if (ok && cJSON_AddItemToObject(entry, "data_offsets", offs))
        offs = NULL;
    else
        ok = 0;
    if (ok && cJSON_AddItemToObject(root, name, entry))
        entry = NULL;
    else
        ok = 0;
    cJSON_Delete(shape);
    cJSON_Delete(offs);
    cJSON_Delete(entry);
    return ok ? 0 : -1;
}

/* Rejects what a dump must not store (DESIGN: NaN/Inf never stored
 * silently); with F16, values past its range would become Inf. */
static clkvq_status check_finite(clkvq_context *ctx, const float *x, size_t n, int layer,
                                 char which, int tokens, int dim, int as_f16)
{
    for (size_t i = 0; i < n; i++) {
        if (isfinite(x[i]) && (!as_f16 || fabsf(x[i]) <= CLKVQ_INPUT_MAX)) continue;
        return clkvq_fail(ctx, CLKVQ_ERR_NONFINITE,
                          "clkvq_dump_write: %c of layer %d [head %zu][token %zu][channel %zu] "
                          "= %g is %s",
                          which, layer, i / (size_t)dim / (size_t)tokens,
                          i / (size_t)dim % (size_t)tokens, i % (size_t)dim, (double)x[i],
                          isfinite(x[i]) ? "beyond fp16 range (|x| > 65504)" : "not finite");
    }
    return CLKVQ_OK;
}

clkvq_status clkvq_dump_write(clkvq_context *ctx, const char *path, const clkvq_dump_info *info,
                              const float *const *q, const float *const *k, const float *const *v,
                              int as_f16)
{
    clkvq_clear_error(ctx);
    if (!path || !info || !q || !k || !v)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_dump_write: %s is NULL",
                          !path   ? "path"
                          : !info ? "info"
                          : !q    ? "q"
                          : !k    ? "k"
                                  : "v");
    const int L = info->n_layers, hq = info->n_q_heads, hkv = info->n_kv_heads;
    const int tokens = info->n_tokens, dim = info->head_dim;
    if (L <= 0 || hq <= 0 || hkv <= 0 || tokens <= 0 || dim <= 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_dump_write: %d layers, %d q heads, %d kv heads, %d tokens, "
                          "head_dim %d: all must be positive",
                          L, hq, hkv, tokens, dim);
    if (hq % hkv != 0)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_dump_write: %d q heads is not a multiple of %d kv heads", hq, hkv);
    if (memchr(info->model, '\0', sizeof info->model) == NULL)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_dump_write: info->model is not NUL-terminated");
    for (int l = 0; l < L; l++)
        if (!q[l] || !k[l] || !v[l])
            return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "clkvq_dump_write: %c[%d] is NULL",
                              !q[l]   ? 'q'
                              : !k[l] ? 'k'
                                      : 'v',
                              l);

    /* Sized in doubles first: offsets go through JSON numbers, exact only
     * up to 2^53, and the whole file is built in memory (size_t). */
    const size_t es = as_f16 ? 2 : 4;
    const double eq = (double)hq * tokens * dim, ekv = (double)hkv * tokens * dim;
    const double data_bytes = (eq + 2 * ekv) * (double)es * L;
    if (data_bytes > DUMP_MAX_EXACT_INT || data_bytes > (double)(SIZE_MAX / 4))
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_dump_write: %.0f bytes of tensors is too large for one dump",
                          data_bytes);
    const size_t nq = (size_t)eq, nkv = (size_t)ekv;
    for (int l = 0; l < L; l++) {
        clkvq_status st = check_finite(ctx, q[l], nq, l, 'q', tokens, dim, as_f16);
        if (st == CLKVQ_OK) st = check_finite(ctx, k[l], nkv, l, 'k', tokens, dim, as_f16);
        if (st == CLKVQ_OK) st = check_finite(ctx, v[l], nkv, l, 'v', tokens, dim, as_f16);
        if (st != CLKVQ_OK) return st;
    }

    /* Header: __metadata__ first, as the safetensors library writes it,
     * then the tensors in file order. */
    const char *dtype = as_f16 ? "F16" : "F32";
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_CreateObject();
    int ok = root && meta && cJSON_AddStringToObject(meta, "format", DUMP_FORMAT_NAME) &&
             (info->model[0] == '\0' || cJSON_AddStringToObject(meta, "model", info->model));
    if (ok && cJSON_AddItemToObject(root, "__metadata__", meta))
        meta = NULL;
    else
        ok = 0;
    cJSON_Delete(meta);
    uint64_t off = 0;
    for (int l = 0; l < L && ok; l++)
        for (int w = 0; w < 3 && ok; w++) {
            char name[32];
            snprintf(name, sizeof name, "layers.%d.%c", l, k_which[w]);
            int heads = w == 0 ? hq : hkv;
            uint64_t bytes = (uint64_t)(w == 0 ? nq : nkv) * es;
            ok = add_entry(root, name, dtype, heads, tokens, dim, off, off + bytes) == 0;
            off += bytes;
        }
    char *json = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!json)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY,
                          "clkvq_dump_write: no memory for the header");

    /* Spaces pad the header to a multiple of 8 (as the safetensors library
     * does) so the data block starts 8-byte aligned in the file. */
    const size_t hlen = strlen(json), padded = clkvq_round_up(hlen, 8);
    const size_t total = 8 + padded + (size_t)off;
    unsigned char *buf = malloc(total);
    if (!buf) {
        free(json);
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY,
                          "clkvq_dump_write: no memory for a %zu-byte dump", total);
    }
    put_le64(buf, padded);
    memcpy(buf + 8, json, hlen);
    memset(buf + 8 + hlen, ' ', padded - hlen);
    free(json);
    unsigned char *p = buf + 8 + padded;
    for (int l = 0; l < L; l++)
        for (int w = 0; w < 3; w++) {
            const float *x = w == 0 ? q[l] : w == 1 ? k[l] : v[l];
            size_t n = w == 0 ? nq : nkv;
            if (as_f16) {
                for (size_t i = 0; i < n; i++, p += 2) {
                    uint16_t h = clkvq_f32_to_f16(x[i]);
                    p[0] = (unsigned char)h;
                    p[1] = (unsigned char)(h >> 8);
                }
            } else {
                for (size_t i = 0; i < n; i++, p += 4) {
                    uint32_t u;
                    memcpy(&u, &x[i], 4);
                    for (int b = 0; b < 4; b++) p[b] = (unsigned char)(u >> (8 * b));
                }
            }
        }
    clkvq_status st = clkvq_atomic_write(ctx, path, buf, total);
    free(buf);
    return st;
}
