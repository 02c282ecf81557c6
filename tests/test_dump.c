/*
 * Calibration dumps (lib/kv_dump.c): write -> read identity for F32 and
 * F16, BF16/F16/F32 from hand-built bytes (unaligned too), and every kind
 * of malformed file -> CLKVQ_ERR_CORRUPT with a message, never a crash.
 * None of this needs an OpenCL device: most calls pass a NULL context and
 * read the thread's NULL-context message; one test checks a real context
 * gets the message instead.
 */
#include "test_util.h"
#include "quant_format.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------ helpers */

static char g_dir[256];

/* A private temporary folder per process, removed at exit. */
static const char *tmp_path(const char *name, char *buf, size_t size)
{
    if (!g_dir[0]) {
        const char *base = getenv("TMPDIR");
        snprintf(g_dir, sizeof g_dir, "%s/clkvq-test-dump-XXXXXX", base && *base ? base : "/tmp");
        ck_assert_ptr_nonnull(mkdtemp(g_dir));
    }
    snprintf(buf, size, "%s/%s", g_dir, name);
    return buf;
}

static void remove_tmp_dir(void)
{
    if (!g_dir[0]) return;
    static const char *const names[] = {"f32.safetensors", "f16.safetensors", "trunc.safetensors",
                                        "empty.safetensors", "base.safetensors"};
    char path[512];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", g_dir, names[i]);
        unlink(path);
    }
    rmdir(g_dir);
}

static unsigned char *read_all(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    ck_assert(fread(buf, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    *size = (size_t)n;
    return buf;
}

static void write_all(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert(fwrite(data, 1, size, f) == size);
    fclose(f);
}

static void put_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* The 8-byte length, the header text as given (no padding: odd lengths
 * leave the data block unaligned on purpose), then data. */
static unsigned char *assemble(const char *header, const void *data, size_t data_size, size_t *size)
{
    size_t n = strlen(header);
    *size = 8 + n + data_size;
    unsigned char *buf = malloc(*size ? *size : 1);
    put_le64(buf, n);
    memcpy(buf + 8, header, n);
    if (data_size) memcpy(buf + 8 + n, data, data_size);
    return buf;
}

/* Per-layer arrays of a synthetic model: K/V from clkvq_synth_kv, q noise. */
typedef struct {
    clkvq_dump_info info;
    float **q, **k, **v;
} model_data;

static void model_make(model_data *m, int L, int hq, int hkv, int T, int D, uint64_t seed)
{
    memset(m, 0, sizeof *m);
    m->info.n_layers = L;
    m->info.n_q_heads = hq;
    m->info.n_kv_heads = hkv;
    m->info.n_tokens = T;
    m->info.head_dim = D;
    snprintf(m->info.model, sizeof m->info.model, "synthetic-%dL", L);
    m->q = calloc((size_t)L, sizeof *m->q);
    m->k = calloc((size_t)L, sizeof *m->k);
    m->v = calloc((size_t)L, sizeof *m->v);
    size_t nq = (size_t)hq * T * D, nkv = (size_t)hkv * T * D;
    for (int l = 0; l < L; l++) {
        m->q[l] = malloc(nq * sizeof(float));
        m->k[l] = malloc(nkv * sizeof(float));
        m->v[l] = malloc(nkv * sizeof(float));
        test_fill_normal(seed * 1000 + (uint64_t)l, m->q[l], nq, 2.0f);
        clkvq_shape shape = {hkv, T, D};
        ck_assert_int_eq(clkvq_synth_kv(seed + (uint64_t)l, &shape, m->k[l], m->v[l]), CLKVQ_OK);
    }
}

static void model_free(model_data *m)
{
    for (int l = 0; l < m->info.n_layers; l++) {
        free(m->q[l]);
        free(m->k[l]);
        free(m->v[l]);
    }
    free(m->q);
    free(m->k);
    free(m->v);
}

static clkvq_status model_write(const model_data *m, const char *path, int as_f16)
{
    return clkvq_dump_write(NULL, path, &m->info, (const float *const *)m->q,
                            (const float *const *)m->k, (const float *const *)m->v, as_f16);
}

/* Counts elements of every tensor whose read differs (bitwise) from the
 * expected value: x itself (F32) or x through fp16 (F16). */
static size_t count_mismatches(const clkvq_kv_dump *d, const model_data *m, int as_f16)
{
    const clkvq_dump_info *in = &m->info;
    size_t nq = (size_t)in->n_q_heads * in->n_tokens * in->head_dim;
    size_t nkv = (size_t)in->n_kv_heads * in->n_tokens * in->head_dim;
    float *buf = malloc(nq * sizeof(float));
    size_t bad = 0;
    for (int l = 0; l < in->n_layers; l++)
        for (int w = 0; w < 3; w++) {
            const float *x = w == 0 ? m->q[l] : w == 1 ? m->k[l] : m->v[l];
            size_t n = w == 0 ? nq : nkv;
            if (clkvq_dump_read(d, l, "qkv"[w], buf) != CLKVQ_OK) {
                bad += n;
                continue;
            }
            for (size_t i = 0; i < n; i++) {
                float want = as_f16 ? clkvq_f16_to_f32(clkvq_f32_to_f16(x[i])) : x[i];
                bad += memcmp(&want, &buf[i], sizeof(float)) != 0;
            }
        }
    free(buf);
    return bad;
}

static int info_equal(const clkvq_dump_info *a, const clkvq_dump_info *b)
{
    return a->n_layers == b->n_layers && a->n_q_heads == b->n_q_heads &&
           a->n_kv_heads == b->n_kv_heads && a->n_tokens == b->n_tokens &&
           a->head_dim == b->head_dim && strcmp(a->model, b->model) == 0;
}

/* ------------------------------------------------------------ round trips */

static void roundtrip(int as_f16)
{
    char path[512];
    tmp_path(as_f16 ? "f16.safetensors" : "f32.safetensors", path, sizeof path);
    model_data m;
    model_make(&m, 3, 8, 2, 37, 64, as_f16 ? 11 : 7);
    ck_assert_msg(model_write(&m, path, as_f16) == CLKVQ_OK, "%s", clkvq_last_error(NULL));

    clkvq_kv_dump *d = NULL;
    ck_assert_msg(clkvq_dump_open(NULL, path, &d) == CLKVQ_OK, "%s", clkvq_last_error(NULL));
    clkvq_dump_info info;
    ck_assert_int_eq(clkvq_dump_info_get(d, &info), CLKVQ_OK);
    ck_assert_msg(info_equal(&info, &m.info), "info: %d layers %d/%d heads %d tokens %d dim '%s'",
                  info.n_layers, info.n_q_heads, info.n_kv_heads, info.n_tokens, info.head_dim,
                  info.model);
    size_t bad = count_mismatches(d, &m, as_f16);
    ck_assert_msg(bad == 0, "%zu elements differ after the file round trip", bad);
    clkvq_dump_close(d);

    /* The same bytes through the memory reader. */
    size_t size;
    unsigned char *bytes = read_all(path, &size);
    ck_assert_int_eq(clkvq_dump_open_memory(NULL, bytes, size, &d), CLKVQ_OK);
    bad = count_mismatches(d, &m, as_f16);
    ck_assert_msg(bad == 0, "%zu elements differ after the memory round trip", bad);
    clkvq_dump_close(d);
    free(bytes);
    model_free(&m);
}

START_TEST(test_roundtrip_f32)
{
    roundtrip(0);
}
END_TEST

START_TEST(test_roundtrip_f16)
{
    roundtrip(1);
}
END_TEST

/* What the writer puts on disk: the safetensors layout byte for byte. */
START_TEST(test_written_layout)
{
    char path[512];
    tmp_path("f16.safetensors", path, sizeof path);
    model_data m;
    model_make(&m, 2, 4, 4, 5, 32, 3);
    ck_assert_int_eq(model_write(&m, path, 1), CLKVQ_OK);
    size_t size;
    unsigned char *b = read_all(path, &size);
    uint64_t n = 0;
    for (int i = 0; i < 8; i++) n |= (uint64_t)b[i] << (8 * i);
    ck_assert_msg(n % 8 == 0 && n + 8 <= size, "header length %llu", (unsigned long long)n);
    ck_assert(b[8] == '{' && b[8 + n - 1] != '\0');
    cJSON *root = cJSON_ParseWithLength((const char *)b + 8, (size_t)n);
    ck_assert_ptr_nonnull(root);
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(root, "__metadata__");
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(meta, "format");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(meta, "model");
    ck_assert(cJSON_IsString(fmt) && strcmp(fmt->valuestring, "clkvq-kv-dump") == 0);
    ck_assert(cJSON_IsString(model) && strcmp(model->valuestring, "synthetic-2L") == 0);
    const cJSON *v1 = cJSON_GetObjectItemCaseSensitive(root, "layers.1.v");
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(v1, "dtype");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(v1, "data_offsets");
    ck_assert(cJSON_IsString(dt) && strcmp(dt->valuestring, "F16") == 0);
    /* the last tensor ends exactly at the end of the file */
    ck_assert(cJSON_GetArraySize(off) == 2 &&
              (uint64_t)cJSON_GetArrayItem(off, 1)->valuedouble == size - 8 - n);
    cJSON_Delete(root);
    /* padding is spaces */
    uint64_t last = 8 + n - 1;
    while (last > 8 && b[last] == ' ') last--;
    ck_assert_msg(b[last] == '}' && 8 + n - 1 - last < 8, "header does not end in '}' + padding");
    free(b);
    model_free(&m);
}
END_TEST

/* A real context gets the message (not the NULL-context slot). */
START_TEST(test_message_on_context)
{
    clkvq_context *ctx = test_ctx();
    clkvq_kv_dump *d = (clkvq_kv_dump *)&d; /* must be reset to NULL on failure */
    ck_assert_int_eq(clkvq_dump_open_memory(ctx, "abc", 3, &d), CLKVQ_ERR_CORRUPT);
    ck_assert_ptr_null(d);
    ck_assert(strstr(clkvq_last_error(ctx), "8-byte header length") != NULL);
    char path[512];
    ck_assert_int_eq(clkvq_dump_open(ctx, tmp_path("does-not-exist", path, sizeof path), &d),
                     CLKVQ_ERR_IO);
    ck_assert(strstr(clkvq_last_error(ctx), "does-not-exist") != NULL);
}
END_TEST

/* ------------------------------------------------------------ hand-built */

/* F16 and BF16 bit patterns (normals, subnormals, signed zero, extremes)
 * read back as the exact fp32 value, from tensors at odd offsets: the
 * header length is odd, and an F16 tensor of odd element count sits in
 * front of an F32 one. */
START_TEST(test_hand_built_dtypes)
{
    /* 1 layer, 1 head, 3 tokens, 1 channel: 3 elements per tensor. */
    static const uint16_t f16[3] = {0x3c00 /* 1 */, 0x8001 /* -min subnormal */, 0x7bff /* max */};
    static const uint16_t bf16[3] = {0xc049 /* -3.140625 */, 0x0001 /* subnormal */,
                                     0x7f7f /* ~3.39e38 */};
    static const float f32[3] = {-0.0f, 1.0e-40f /* subnormal */, 123.456f};
    unsigned char data[6 + 12 + 6];
    for (int i = 0; i < 3; i++) { /* little-endian on disk */
        data[2 * i] = (unsigned char)f16[i];
        data[2 * i + 1] = (unsigned char)(f16[i] >> 8);
        uint32_t u;
        memcpy(&u, &f32[i], 4);
        for (int b = 0; b < 4; b++) data[6 + 4 * i + b] = (unsigned char)(u >> (8 * b));
        data[18 + 2 * i] = (unsigned char)bf16[i];
        data[18 + 2 * i + 1] = (unsigned char)(bf16[i] >> 8);
    }
    const char *header =
        "{\"layers.0.q\":{\"dtype\":\"F16\",\"shape\":[1,3,1],\"data_offsets\":[0,6]},"
        "\"layers.0.k\":{\"dtype\":\"F32\",\"shape\":[1,3,1],\"data_offsets\":[6,18]},"
        "\"layers.0.v\":{\"dtype\":\"BF16\",\"shape\":[1,3,1],\"data_offsets\":[18,24]},"
        "\"__metadata__\":{\"model\":\"hand\",\"notes\":\"odd\"}}";
    ck_assert(strlen(header) % 2 == 1);
    size_t size;
    unsigned char *file = assemble(header, data, sizeof data, &size);
    clkvq_kv_dump *d = NULL;
    ck_assert_msg(clkvq_dump_open_memory(NULL, file, size, &d) == CLKVQ_OK, "%s",
                  clkvq_last_error(NULL));
    clkvq_dump_info info;
    ck_assert_int_eq(clkvq_dump_info_get(d, &info), CLKVQ_OK);
    ck_assert(info.n_layers == 1 && info.n_tokens == 3 && info.head_dim == 1 &&
              strcmp(info.model, "hand") == 0);
    float q[3], k[3], v[3];
    ck_assert_int_eq(clkvq_dump_read(d, 0, 'q', q), CLKVQ_OK);
    ck_assert_int_eq(clkvq_dump_read(d, 0, 'k', k), CLKVQ_OK);
    ck_assert_int_eq(clkvq_dump_read(d, 0, 'v', v), CLKVQ_OK);
    int bad = 0;
    for (int i = 0; i < 3; i++) {
        float want_q = clkvq_f16_to_f32(f16[i]);
        uint32_t u = (uint32_t)bf16[i] << 16;
        float want_v;
        memcpy(&want_v, &u, 4);
        bad += memcmp(&q[i], &want_q, 4) != 0;
        bad += memcmp(&k[i], &f32[i], 4) != 0;
        bad += memcmp(&v[i], &want_v, 4) != 0;
    }
    ck_assert_msg(bad == 0, "%d values differ; v = %a %a %a", bad, (double)v[0], (double)v[1],
                  (double)v[2]);
    ck_assert(v[0] == -3.140625f && q[2] == 65504.0f);
    clkvq_dump_close(d);
    free(file);
}
END_TEST

/* A NaN stored in a dump is reported by the read, with its position. */
START_TEST(test_nonfinite_in_file)
{
    float data[3 * 4] = {0};
    data[4 + 2] = NAN; /* k, token 2 */
    const char *header =
        "{\"layers.0.q\":{\"dtype\":\"F32\",\"shape\":[1,4,1],\"data_offsets\":[0,16]},"
        "\"layers.0.k\":{\"dtype\":\"F32\",\"shape\":[1,4,1],\"data_offsets\":[16,32]},"
        "\"layers.0.v\":{\"dtype\":\"F32\",\"shape\":[1,4,1],\"data_offsets\":[32,48]}}";
    size_t size;
    unsigned char *file = assemble(header, data, sizeof data, &size);
    clkvq_kv_dump *d = NULL;
    ck_assert_int_eq(clkvq_dump_open_memory(NULL, file, size, &d), CLKVQ_OK);
    float out[4];
    ck_assert_int_eq(clkvq_dump_read(d, 0, 'q', out), CLKVQ_OK);
    ck_assert_int_eq(clkvq_dump_read(d, 0, 'k', out), CLKVQ_ERR_NONFINITE);
    ck_assert_msg(strstr(clkvq_last_error(NULL), "layers.0.k[head 0][token 2]") != NULL, "%s",
                  clkvq_last_error(NULL));
    clkvq_dump_close(d);
    free(file);
}
END_TEST

/* Gaps between tensors and trailing bytes are legal (they can't make a
 * read go out of bounds); the model name is cut on a UTF-8 boundary. */
START_TEST(test_gaps_and_long_model)
{
    float data[64] = {0};
    char header[2048];
    char model[401] = {0};
    for (int i = 0; i < 200; i++) memcpy(model + 2 * i, "\xc3\xa9", 2); /* 200 x U+00E9 */
    snprintf(header, sizeof header,
             "{\"__metadata__\":{\"model\":\"%s\"},"
             "\"layers.0.v\":{\"dtype\":\"F32\",\"shape\":[2,2,2],\"data_offsets\":[200,232]},"
             "\"layers.0.q\":{\"dtype\":\"F32\",\"shape\":[4,2,2],\"data_offsets\":[8,72]},"
             "\"layers.0.k\":{\"dtype\":\"F32\",\"shape\":[2,2,2],\"data_offsets\":[100,132]}}",
             model);
    size_t size;
    unsigned char *file = assemble(header, data, sizeof data, &size);
    clkvq_kv_dump *d = NULL;
    ck_assert_msg(clkvq_dump_open_memory(NULL, file, size, &d) == CLKVQ_OK, "%s",
                  clkvq_last_error(NULL));
    clkvq_dump_info info;
    clkvq_dump_info_get(d, &info);
    size_t len = strlen(info.model);
    ck_assert_msg(len == 126 && memcmp(info.model, model, len) == 0, "model length %zu", len);
    ck_assert(info.n_q_heads == 4 && info.n_kv_heads == 2);
    clkvq_dump_close(d);
    free(file);
}
END_TEST

/* ------------------------------------------------------------ malformed */

/* The base of the header mutations: a valid 3-layer F32 dump. */
typedef struct {
    unsigned char *file;
    size_t size;
    uint64_t header_len;
} base_dump;

static base_dump make_base(void)
{
    char path[512];
    tmp_path("base.safetensors", path, sizeof path);
    model_data m;
    model_make(&m, 3, 4, 2, 8, 16, 5);
    ck_assert_int_eq(model_write(&m, path, 0), CLKVQ_OK);
    model_free(&m);
    base_dump b;
    b.file = read_all(path, &b.size);
    b.header_len = 0;
    for (int i = 0; i < 8; i++) b.header_len |= (uint64_t)b.file[i] << (8 * i);
    return b;
}

/* Expects CLKVQ_ERR_CORRUPT with a message holding `want`; 0 if so,
 * else prints why and returns 1 (assertions are counted by the caller). */
static int expect_corrupt(const char *what, const void *bytes, size_t size, const char *want)
{
    clkvq_kv_dump *d = NULL;
    clkvq_status st = clkvq_dump_open_memory(NULL, bytes, size, &d);
    const char *msg = clkvq_last_error(NULL);
    if (getenv("DUMP_VERBOSE")) /* to read every message by eye */
        fprintf(stderr, "%-28s %s\n", what, msg);
    if (st == CLKVQ_ERR_CORRUPT && d == NULL && msg[0] && (!want || strstr(msg, want))) return 0;
    fprintf(stderr, "case %s: status %s, message \"%s\" (wanted \"%s\")\n", what,
            clkvq_status_string(st), msg, want ? want : "");
    clkvq_dump_close(d);
    return 1;
}

static cJSON *tensor(cJSON *root, const char *name)
{
    return cJSON_GetObjectItemCaseSensitive(root, name);
}

static void set_field(cJSON *root, const char *name, const char *field, cJSON *value)
{
    cJSON *t = tensor(root, name);
    if (cJSON_GetObjectItemCaseSensitive(t, field))
        cJSON_ReplaceItemInObjectCaseSensitive(t, field, value);
    else
        cJSON_AddItemToObject(t, field, value);
}

static cJSON *nums(int n, const double *v)
{
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(v[i]));
    return a;
}

static double offset_of(cJSON *root, const char *name, int which)
{
    return cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(tensor(root, name), "data_offsets"),
                              which)
        ->valuedouble;
}

static void mut_dtype_f64(cJSON *r)
{
    set_field(r, "layers.1.k", "dtype", cJSON_CreateString("F64"));
}
static void mut_dtype_num(cJSON *r)
{
    set_field(r, "layers.0.q", "dtype", cJSON_CreateNumber(3));
}
static void mut_dtype_missing(cJSON *r)
{
    cJSON_DeleteItemFromObject(tensor(r, "layers.2.v"), "dtype");
}
static void mut_dtype_f16(cJSON *r)
{
    set_field(r, "layers.0.v", "dtype", cJSON_CreateString("F16"));
}
static void mut_shape_rank2(cJSON *r)
{
    set_field(r, "layers.0.k", "shape", nums(2, (double[]){2, 128}));
}
static void mut_shape_rank4(cJSON *r)
{
    set_field(r, "layers.0.k", "shape", nums(4, (double[]){2, 8, 16, 1}));
}
static void mut_shape_zero(cJSON *r)
{
    set_field(r, "layers.0.k", "shape", nums(3, (double[]){2, 0, 16}));
}
static void mut_shape_neg(cJSON *r)
{
    set_field(r, "layers.0.k", "shape", nums(3, (double[]){-2, 8, -16}));
}
static void mut_shape_frac(cJSON *r)
{
    set_field(r, "layers.0.k", "shape", nums(3, (double[]){2, 8.5, 16}));
}
static void mut_shape_big(cJSON *r)
{
    set_field(r, "layers.0.k", "shape", nums(3, (double[]){2, 4294967296.0, 16}));
}
static void mut_shape_overflow(cJSON *r)
{
    set_field(r, "layers.0.k", "shape", nums(3, (double[]){2147483647, 2147483647, 2147483647}));
}
static void mut_shape_str(cJSON *r)
{
    set_field(r, "layers.0.k", "shape", cJSON_CreateString("2,8,16"));
}
static void mut_shape_elem_str(cJSON *r)
{
    cJSON *a = cJSON_CreateArray();
    cJSON_AddItemToArray(a, cJSON_CreateNumber(2));
    cJSON_AddItemToArray(a, cJSON_CreateString("8"));
    cJSON_AddItemToArray(a, cJSON_CreateNumber(16));
    set_field(r, "layers.0.k", "shape", a);
}
static void mut_shape_wrong(cJSON *r)
{
    set_field(r, "layers.1.q", "shape", nums(3, (double[]){4, 16, 8}));
}
static void mut_off_past_end(cJSON *r)
{
    double b = offset_of(r, "layers.2.v", 0), e = offset_of(r, "layers.2.v", 1);
    set_field(r, "layers.2.v", "data_offsets", nums(2, (double[]){b + 4, e + 4}));
}
static void mut_off_reversed(cJSON *r)
{
    double b = offset_of(r, "layers.0.k", 0), e = offset_of(r, "layers.0.k", 1);
    set_field(r, "layers.0.k", "data_offsets", nums(2, (double[]){e, b}));
}
static void mut_off_short(cJSON *r)
{
    double b = offset_of(r, "layers.0.k", 0), e = offset_of(r, "layers.0.k", 1);
    set_field(r, "layers.0.k", "data_offsets", nums(2, (double[]){b, e - 4}));
}
static void mut_off_neg(cJSON *r)
{
    set_field(r, "layers.0.q", "data_offsets", nums(2, (double[]){-2048, 0}));
}
static void mut_off_three(cJSON *r)
{
    set_field(r, "layers.0.q", "data_offsets", nums(3, (double[]){0, 2048, 4096}));
}
static void mut_off_one(cJSON *r)
{
    set_field(r, "layers.0.q", "data_offsets", nums(1, (double[]){0}));
}
static void mut_off_huge(cJSON *r)
{
    set_field(r, "layers.0.q", "data_offsets", nums(2, (double[]){1e300, 1e300 + 2048}));
}
static void mut_off_2p64(cJSON *r)
{
    /* 2^64 + 2048 would wrap to 2048 in a careless uint64 cast */
    set_field(r, "layers.0.q", "data_offsets",
              nums(2, (double[]){18446744073709551616.0, 18446744073709553664.0}));
}
static void mut_off_missing(cJSON *r)
{
    cJSON_DeleteItemFromObject(tensor(r, "layers.1.v"), "data_offsets");
}
static void mut_overlap_same(cJSON *r)
{
    double b = offset_of(r, "layers.0.k", 0), e = offset_of(r, "layers.0.k", 1);
    set_field(r, "layers.0.v", "data_offsets", nums(2, (double[]){b, e}));
}
static void mut_overlap_partial(cJSON *r)
{
    double b = offset_of(r, "layers.1.k", 0), e = offset_of(r, "layers.1.k", 1);
    set_field(r, "layers.1.k", "data_offsets", nums(2, (double[]){b + 8, e + 8}));
}
static void mut_missing_layer(cJSON *r)
{
    cJSON_DeleteItemFromObject(r, "layers.1.q");
    cJSON_DeleteItemFromObject(r, "layers.1.k");
    cJSON_DeleteItemFromObject(r, "layers.1.v");
}
static void mut_missing_k(cJSON *r)
{
    cJSON_DeleteItemFromObject(r, "layers.1.k");
}
static void mut_missing_last_v(cJSON *r)
{
    cJSON_DeleteItemFromObject(r, "layers.2.v");
}
static void mut_missing_layer0(cJSON *r)
{
    cJSON_DeleteItemFromObject(r, "layers.0.q");
    cJSON_DeleteItemFromObject(r, "layers.0.k");
    cJSON_DeleteItemFromObject(r, "layers.0.v");
}
static void mut_no_tensors(cJSON *r)
{
    for (int l = 0; l < 3; l++)
        for (int w = 0; w < 3; w++) {
            char name[32];
            snprintf(name, sizeof name, "layers.%d.%c", l, "qkv"[w]);
            cJSON_DeleteItemFromObject(r, name);
        }
}
static void rename_tensor(cJSON *r, const char *from, const char *to)
{
    cJSON *t = cJSON_DetachItemFromObjectCaseSensitive(r, from);
    cJSON_AddItemToObject(r, to, t);
}
static void mut_far_layer(cJSON *r)
{
    rename_tensor(r, "layers.2.v", "layers.999999999.v");
}
static void mut_name_o(cJSON *r)
{
    rename_tensor(r, "layers.0.v", "layers.0.o");
}
static void mut_name_lead0(cJSON *r)
{
    rename_tensor(r, "layers.1.q", "layers.01.q");
}
static void mut_name_neg(cJSON *r)
{
    rename_tensor(r, "layers.1.q", "layers.-1.q");
}
static void mut_name_tail(cJSON *r)
{
    rename_tensor(r, "layers.1.q", "layers.1.q.weight");
}
static void mut_name_empty_idx(cJSON *r)
{
    rename_tensor(r, "layers.1.q", "layers..q");
}
static void mut_name_overflow(cJSON *r)
{
    rename_tensor(r, "layers.1.q", "layers.99999999999999999999.q");
}
static void mut_name_other(cJSON *r)
{
    cJSON *t = cJSON_Duplicate(tensor(r, "layers.0.q"), 1);
    cJSON_AddItemToObject(r, "model.embed_tokens.weight", t);
}
static void mut_duplicate(cJSON *r)
{
    /* cJSON keeps both members of a repeated key, as a real file can hold */
    cJSON *t = cJSON_Duplicate(tensor(r, "layers.1.v"), 1);
    cJSON_AddItemToObject(r, "layers.1.v", t);
}
static void mut_meta_array(cJSON *r)
{
    cJSON_ReplaceItemInObjectCaseSensitive(r, "__metadata__", cJSON_CreateArray());
}
static void mut_meta_value(cJSON *r)
{
    cJSON_AddNumberToObject(cJSON_GetObjectItemCaseSensitive(r, "__metadata__"), "tokens", 8);
}
static void mut_meta_twice(cJSON *r)
{
    cJSON_AddItemToObject(r, "__metadata__", cJSON_CreateObject());
}
static void mut_entry_not_obj(cJSON *r)
{
    cJSON_ReplaceItemInObjectCaseSensitive(r, "layers.1.q", cJSON_CreateString("F32"));
}

typedef struct {
    const char *name;
    void (*mutate)(cJSON *root);
    const char *want; /* a substring of the message */
} mutation;

static const mutation k_mutations[] = {
    {"dtype F64", mut_dtype_f64, "dtype \"F64\""},
    {"dtype number", mut_dtype_num, "layers.0.q: \"dtype\""},
    {"dtype missing", mut_dtype_missing, "layers.2.v: \"dtype\" missing"},
    {"dtype F16 size", mut_dtype_f16, "layers.0.v: data_offsets span"},
    {"shape rank 2", mut_shape_rank2, "rank 2"},
    {"shape rank 4", mut_shape_rank4, "rank 4"},
    {"shape zero", mut_shape_zero, "shape[1]"},
    {"shape negative", mut_shape_neg, "shape[0]"},
    {"shape fraction", mut_shape_frac, "shape[1]"},
    {"shape 2^32", mut_shape_big, "shape[1]"},
    {"shape overflow", mut_shape_overflow, "larger than"},
    {"shape string", mut_shape_str, "\"shape\""},
    {"shape element string", mut_shape_elem_str, "shape[1]"},
    {"shape across layers", mut_shape_wrong, "layers.1.q has shape [4, 16, 8]"},
    {"offsets past end", mut_off_past_end, "outside"},
    {"offsets reversed", mut_off_reversed, "end before"},
    {"offsets short", mut_off_short, "span"},
    {"offsets negative", mut_off_neg, "non-negative"},
    {"offsets three", mut_off_three, "data_offsets"},
    {"offsets one", mut_off_one, "data_offsets"},
    {"offsets 1e300", mut_off_huge, "data_offsets"},
    {"offsets 2^64", mut_off_2p64, "data_offsets"},
    {"offsets missing", mut_off_missing, "layers.1.v: \"data_offsets\""},
    {"overlap same range", mut_overlap_same, "overlap"},
    {"overlap partial", mut_overlap_partial, "overlap"},
    {"missing layer 1", mut_missing_layer, "layers.1.q is missing"},
    {"missing layers.1.k", mut_missing_k, "layers.1.k is missing"},
    {"missing layers.2.v", mut_missing_last_v, "layers.2.v is missing"},
    {"missing layer 0", mut_missing_layer0, "layers.0.q is missing"},
    {"no tensors", mut_no_tensors, "no tensors"},
    {"layer 999999999", mut_far_layer, "cannot all"},
    {"name .o", mut_name_o, "unknown tensor \"layers.0.o\""},
    {"name leading zero", mut_name_lead0, "unknown tensor"},
    {"name negative", mut_name_neg, "unknown tensor"},
    {"name suffix", mut_name_tail, "unknown tensor"},
    {"name empty index", mut_name_empty_idx, "unknown tensor"},
    {"name index overflow", mut_name_overflow, "unknown tensor"},
    {"name other", mut_name_other, "unknown tensor \"model.embed_tokens.weight\""},
    {"duplicate tensor", mut_duplicate, "layers.1.v appears twice"},
    {"metadata array", mut_meta_array, "__metadata__ is not"},
    {"metadata number", mut_meta_value, "\"tokens\" is not a string"},
    {"metadata twice", mut_meta_twice, "__metadata__ appears 2 times"},
    {"entry not object", mut_entry_not_obj, "layers.1.q: entry"},
};

/* Rebuilds the file around a mutated header (same data block). */
static unsigned char *with_header(const base_dump *b, const char *header, size_t *size)
{
    return assemble(header, b->file + 8 + b->header_len, b->size - 8 - b->header_len, size);
}

START_TEST(test_corrupt_headers)
{
    base_dump b = make_base();
    /* the unmutated rebuild must open, or every case below proves nothing */
    char *text = malloc(b.header_len + 1);
    memcpy(text, b.file + 8, b.header_len);
    text[b.header_len] = '\0';
    size_t size;
    unsigned char *file = with_header(&b, text, &size);
    clkvq_kv_dump *d = NULL;
    ck_assert_int_eq(clkvq_dump_open_memory(NULL, file, size, &d), CLKVQ_OK);
    clkvq_dump_close(d);
    free(file);

    int failed = 0;
    for (size_t i = 0; i < sizeof k_mutations / sizeof k_mutations[0]; i++) {
        cJSON *root = cJSON_Parse(text);
        k_mutations[i].mutate(root);
        char *json = cJSON_PrintUnformatted(root);
        cJSON_Delete(root);
        file = with_header(&b, json, &size);
        failed += expect_corrupt(k_mutations[i].name, file, size, k_mutations[i].want);
        free(file);
        free(json);
    }
    ck_assert_msg(failed == 0, "%d header mutations not reported as corrupt", failed);
    free(text);
    free(b.file);
}
END_TEST

/* Raw header text that is not a well-formed dump header. */
START_TEST(test_bad_json)
{
    static const struct {
        const char *header, *want;
    } cases[] = {
        {"{", "not valid JSON"},
        {"{\"layers.0.q\": {\"dtype\": \"F32\", ", "not valid JSON"},
        {"not json at all", "not valid JSON"},
        {"{\"a\":1,}", "not valid JSON"},
        {"{\"layers.0.q\":{\"dtype\":\"F3\\u0000\"}}", NULL},
        {"[1, 2, 3]", "not an object"},
        {"\"layers.0.q\"", "not an object"},
        {"42", "not an object"},
        {"null", "not an object"},
        {"{}", "no tensors"},
        {"{} {}", "after the JSON"},
        {"{}x", "after the JSON"},
        {"     ", "not valid JSON"},
        {"{\"__metadata__\":{}}", "no tensors"},
    };
    int failed = 0;
    unsigned char data[16] = {0};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t size;
        unsigned char *file = assemble(cases[i].header, data, sizeof data, &size);
        failed += expect_corrupt(cases[i].header, file, size, cases[i].want);
        free(file);
    }
    /* deep nesting must be refused, not recurse without end */
    size_t depth = 100000;
    char *deep = malloc(2 * depth + 1);
    memset(deep, '[', depth);
    memset(deep + depth, ']', depth);
    deep[2 * depth] = '\0';
    size_t size;
    unsigned char *file = assemble(deep, data, sizeof data, &size);
    failed += expect_corrupt("deep nesting", file, size, "JSON");
    free(file);
    free(deep);
    /* a NUL byte inside the header */
    file = assemble("{\"__metadata__\":{}}      ", data, sizeof data, &size);
    file[8 + 20] = '\0';
    failed += expect_corrupt("NUL in header", file, size, "NUL byte");
    free(file);
    ck_assert_msg(failed == 0, "%d malformed headers not reported as corrupt", failed);
}
END_TEST

/* The length field: zero, past the end of the file, past the 100 MB cap,
 * 2^64-1 (where size + 8 would wrap). */
START_TEST(test_bad_header_length)
{
    base_dump b = make_base();
    static const uint64_t lengths[] = {
        0, 1, 7, UINT64_MAX, UINT64_MAX - 7, 1ULL << 63, 100000001ULL, 200000000ULL};
    int failed = 0;
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
        put_le64(b.file, lengths[i]);
        char what[64];
        snprintf(what, sizeof what, "header length %llu", (unsigned long long)lengths[i]);
        failed += expect_corrupt(what, b.file, b.size, "header");
    }
    /* one past what the file holds, and the whole file */
    put_le64(b.file, b.size - 7);
    failed += expect_corrupt("length size-7", b.file, b.size, "truncated");
    put_le64(b.file, b.header_len + 1); /* header now swallows a data byte */
    failed += expect_corrupt("length +1", b.file, b.size, NULL);
    ck_assert_msg(failed == 0, "%d bad header lengths not reported as corrupt", failed);
    free(b.file);
}
END_TEST

/* Every prefix of a valid file is corrupt (the header or the last tensor
 * is cut), through the memory reader and, for a sample, the file reader. */
START_TEST(test_truncated)
{
    base_dump b = make_base();
    int failed = 0;
    size_t tried = 0;
    for (size_t cut = 0; cut < b.size; cut += cut < b.header_len + 64 ? 1 : 97) {
        /* a copy of exactly cut bytes, so ASan sees any read past it */
        unsigned char *prefix = malloc(cut ? cut : 1);
        memcpy(prefix, b.file, cut);
        char what[64];
        snprintf(what, sizeof what, "truncated at %zu of %zu", cut, b.size);
        failed += expect_corrupt(what, prefix, cut, NULL);
        free(prefix);
        tried++;
    }
    failed += expect_corrupt("truncated at size-1", b.file, b.size - 1, NULL);
    ck_assert_msg(failed == 0, "%d of %zu truncations not reported as corrupt", failed, tried);

    char path[512];
    static const size_t cuts[] = {0, 5, 8, 100};
    for (size_t i = 0; i < 5; i++) {
        size_t cut = i < 4 ? cuts[i] : b.size - 1;
        write_all(tmp_path("trunc.safetensors", path, sizeof path), b.file, cut);
        clkvq_kv_dump *d = NULL;
        clkvq_status st = clkvq_dump_open(NULL, path, &d);
        failed += st != CLKVQ_ERR_CORRUPT || d != NULL ||
                  strstr(clkvq_last_error(NULL), "trunc.safetensors") == NULL;
    }
    ck_assert_msg(failed == 0, "%d truncated files not reported as corrupt", failed);
    free(b.file);
}
END_TEST

/* Every single-byte change of the header opens or is corrupt, and what
 * opens reads without trouble: the fuzzer's job in small, run every time. */
START_TEST(test_header_byte_flips)
{
    base_dump b = make_base();
    float *buf = malloc(4 * 8 * 16 * sizeof(float));
    int failed = 0, opened = 0;
    static const unsigned char subst[] = {0x00, '0', '9', '"', '}', ',', 0xff};
    for (uint64_t i = 0; i < 8 + b.header_len; i++) {
        const unsigned char orig = b.file[i];
        for (size_t s = 0; s < sizeof subst; s++) {
            if (subst[s] == orig) continue;
            b.file[i] = subst[s];
            clkvq_kv_dump *d = NULL;
            clkvq_status st = clkvq_dump_open_memory(NULL, b.file, b.size, &d);
            if (st == CLKVQ_OK) {
                opened++;
                clkvq_dump_info info;
                clkvq_dump_info_get(d, &info);
                for (int l = 0; l < info.n_layers; l++)
                    for (int w = 0; w < 3; w++) {
                        clkvq_status rs = clkvq_dump_read(d, l, "qkv"[w], buf);
                        failed += rs != CLKVQ_OK && rs != CLKVQ_ERR_NONFINITE;
                    }
                clkvq_dump_close(d);
            } else {
                failed += st != CLKVQ_ERR_CORRUPT || clkvq_last_error(NULL)[0] == '\0';
            }
        }
        b.file[i] = orig;
    }
    ck_assert_msg(failed == 0, "%d byte flips gave an unexpected status (%d opened)", failed,
                  opened);
    free(buf);
    free(b.file);
}
END_TEST

/* Files that are not files, and the public functions' argument checks. */
START_TEST(test_arguments)
{
    clkvq_kv_dump *d = NULL;
    char path[512];
    ck_assert_int_eq(clkvq_dump_open(NULL, NULL, &d), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_open(NULL, "x", NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_open_memory(NULL, NULL, 8, &d), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_open_memory(NULL, NULL, 0, &d), CLKVQ_ERR_CORRUPT);
    ck_assert_int_eq(clkvq_dump_open(NULL, tmp_path("nope", path, sizeof path), &d), CLKVQ_ERR_IO);
    ck_assert_int_eq(clkvq_dump_open(NULL, g_dir, &d), CLKVQ_ERR_IO);
    write_all(tmp_path("empty.safetensors", path, sizeof path), "", 0);
    ck_assert_int_eq(clkvq_dump_open(NULL, path, &d), CLKVQ_ERR_CORRUPT);
    ck_assert_ptr_null(d);

    model_data m;
    model_make(&m, 2, 4, 2, 8, 16, 9);
    tmp_path("f32.safetensors", path, sizeof path);
    ck_assert_int_eq(model_write(&m, path, 0), CLKVQ_OK);
    ck_assert_int_eq(clkvq_dump_open(NULL, path, &d), CLKVQ_OK);
    float out[4 * 8 * 16];
    ck_assert_int_eq(clkvq_dump_read(d, 2, 'q', out), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_read(d, -1, 'q', out), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_read(d, 0, 'x', out), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_read(d, 0, '\0', out), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_read(d, 0, 'q', NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_read(NULL, 0, 'q', out), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_info_get(d, NULL), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_info_get(NULL, NULL), CLKVQ_ERR_INVALID_ARG);
    clkvq_dump_close(d);
    clkvq_dump_close(NULL);

    /* the writer refuses what it could not store faithfully */
    const float *const *q = (const float *const *)m.q, *const *k = (const float *const *)m.k,
                       *const *v = (const float *const *)m.v;
    clkvq_dump_info info = m.info;
    ck_assert_int_eq(clkvq_dump_write(NULL, NULL, &info, q, k, v, 0), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_write(NULL, path, NULL, q, k, v, 0), CLKVQ_ERR_INVALID_ARG);
    ck_assert_int_eq(clkvq_dump_write(NULL, path, &info, q, NULL, v, 0), CLKVQ_ERR_INVALID_ARG);
    info.n_kv_heads = 3;
    ck_assert_int_eq(clkvq_dump_write(NULL, path, &info, q, k, v, 0), CLKVQ_ERR_INVALID_ARG);
    info = m.info;
    info.n_tokens = 0;
    ck_assert_int_eq(clkvq_dump_write(NULL, path, &info, q, k, v, 0), CLKVQ_ERR_INVALID_ARG);
    info = m.info;
    memset(info.model, 'a', sizeof info.model);
    ck_assert_int_eq(clkvq_dump_write(NULL, path, &info, q, k, v, 0), CLKVQ_ERR_INVALID_ARG);
    info = m.info;
    m.v[1][77] = NAN;
    ck_assert_int_eq(clkvq_dump_write(NULL, path, &info, q, k, v, 0), CLKVQ_ERR_NONFINITE);
    ck_assert(strstr(clkvq_last_error(NULL), "v of layer 1") != NULL);
    m.v[1][77] = 70000.0f; /* fine in F32, Inf in F16 */
    ck_assert_int_eq(clkvq_dump_write(NULL, path, &info, q, k, v, 1), CLKVQ_ERR_NONFINITE);
    ck_assert_int_eq(clkvq_dump_write(NULL, path, &info, q, k, v, 0), CLKVQ_OK);
    /* an unwritable place */
    ck_assert_int_eq(clkvq_dump_write(NULL, "/nonexistent-dir/x.safetensors", &info, q, k, v, 0),
                     CLKVQ_ERR_IO);
    /* no model name: no "model" key, and reading gives "" */
    info.model[0] = '\0';
    ck_assert_int_eq(clkvq_dump_write(NULL, path, &info, q, k, v, 0), CLKVQ_OK);
    ck_assert_int_eq(clkvq_dump_open(NULL, path, &d), CLKVQ_OK);
    clkvq_dump_info got;
    clkvq_dump_info_get(d, &got);
    ck_assert(got.model[0] == '\0' && got.n_layers == 2);
    clkvq_dump_close(d);
    model_free(&m);
}
END_TEST

int main(void)
{
    atexit(remove_tmp_dir);
    Suite *s = suite_create("dump");
    TCase *tc = tcase_create("dump");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_roundtrip_f32);
    tcase_add_test(tc, test_roundtrip_f16);
    tcase_add_test(tc, test_written_layout);
    tcase_add_test(tc, test_message_on_context);
    tcase_add_test(tc, test_hand_built_dtypes);
    tcase_add_test(tc, test_nonfinite_in_file);
    tcase_add_test(tc, test_gaps_and_long_model);
    tcase_add_test(tc, test_corrupt_headers);
    tcase_add_test(tc, test_bad_json);
    tcase_add_test(tc, test_bad_header_length);
    tcase_add_test(tc, test_truncated);
    tcase_add_test(tc, test_header_byte_flips);
    tcase_add_test(tc, test_arguments);
    suite_add_tcase(s, tc);
    return test_run_suite(s);
}
