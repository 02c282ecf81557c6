/*
 * Model geometry: a table of common models and the explicit form
 * "q32:kv8:d128:l32" for any other.
 *
 * Every row is copied from the model's published Hugging Face config.json:
 *   n_layers   = num_hidden_layers
 *   n_q_heads  = num_attention_heads
 *   n_kv_heads = num_key_value_heads (absent in MHA models: = the q heads)
 *   head_dim   = head_dim where the config has the field, else
 *                hidden_size / num_attention_heads
 * The comment on each row gives the repository and the numbers it was read
 * from. Two rows need care: Gemma-2 sets head_dim (256) apart from
 * hidden_size / heads (2304 / 8 = 288 for 2B, 3584 / 16 = 224 for 9B); the
 * 27B sets 128. Phi-3-mini is MHA with 96-wide heads (3072 / 32).
 */
#include "internal.h"

#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounds of the explicit form: those of configs (config_fields.h). */
#define GEOM_MAX_LAYERS 4096
#define GEOM_MAX_HEADS 1024
#define GEOM_MAX_HEAD_DIM 65536

typedef struct {
    const char *name;    /* ours, lower case: the key of stored configs */
    const char *aliases; /* '|'-separated, in the normalized form (see normalize) */
    clkvq_model_geometry g; /* n_layers, n_q_heads, n_kv_heads, head_dim */
} model_row;

static const model_row g_models[] = {
    /* meta-llama/Meta-Llama-3-8B: layers 32, heads 32, kv 8, hidden 4096 */
    {"llama-3-8b", "meta-llama-3-8b|llama3-8b", {32, 32, 8, 128}},
    /* meta-llama/Meta-Llama-3-70B: layers 80, heads 64, kv 8, hidden 8192 */
    {"llama-3-70b", "meta-llama-3-70b|llama3-70b", {80, 64, 8, 128}},
    /* meta-llama/Llama-3.1-8B: layers 32, heads 32, kv 8, hidden 4096 */
    {"llama-3.1-8b", "meta-llama-3.1-8b|llama3.1-8b", {32, 32, 8, 128}},
    /* meta-llama/Llama-3.1-70B: layers 80, heads 64, kv 8, hidden 8192 */
    {"llama-3.1-70b", "meta-llama-3.1-70b|llama3.1-70b", {80, 64, 8, 128}},
    /* meta-llama/Llama-3.2-1B: layers 16, heads 32, kv 8, head_dim 64 (hidden 2048) */
    {"llama-3.2-1b", "llama3.2-1b", {16, 32, 8, 64}},
    /* meta-llama/Llama-3.2-3B: layers 28, heads 24, kv 8, head_dim 128 (hidden 3072) */
    {"llama-3.2-3b", "llama3.2-3b", {28, 24, 8, 128}},
    /* meta-llama/Llama-3.3-70B-Instruct: layers 80, heads 64, kv 8, hidden 8192 */
    {"llama-3.3-70b", "llama3.3-70b", {80, 64, 8, 128}},
    /* mistralai/Mistral-7B-v0.1: layers 32, heads 32, kv 8, hidden 4096; v0.2 and
     * v0.3 (head_dim 128 given) have the same attention shape. "mistral-7b" is
     * the latest, v0.3 (KVTuner's presets were searched on v0.3-Instruct). */
    {"mistral-7b-v0.1", "", {32, 32, 8, 128}},
    {"mistral-7b-v0.2", "", {32, 32, 8, 128}},
    {"mistral-7b-v0.3", "mistral-7b", {32, 32, 8, 128}},
    /* Qwen/Qwen2.5-0.5B: layers 24, heads 14, kv 2, hidden 896 */
    {"qwen2.5-0.5b", "", {24, 14, 2, 64}},
    /* Qwen/Qwen2.5-1.5B: layers 28, heads 12, kv 2, hidden 1536 */
    {"qwen2.5-1.5b", "", {28, 12, 2, 128}},
    /* Qwen/Qwen2.5-3B: layers 36, heads 16, kv 2, hidden 2048 */
    {"qwen2.5-3b", "", {36, 16, 2, 128}},
    /* Qwen/Qwen2.5-7B: layers 28, heads 28, kv 4, hidden 3584 */
    {"qwen2.5-7b", "", {28, 28, 4, 128}},
    /* Qwen/Qwen2.5-14B: layers 48, heads 40, kv 8, hidden 5120 */
    {"qwen2.5-14b", "", {48, 40, 8, 128}},
    /* Qwen/Qwen2.5-32B: layers 64, heads 40, kv 8, hidden 5120 */
    {"qwen2.5-32b", "", {64, 40, 8, 128}},
    /* Qwen/Qwen2.5-72B: layers 80, heads 64, kv 8, hidden 8192 */
    {"qwen2.5-72b", "", {80, 64, 8, 128}},
    /* microsoft/Phi-3-mini-4k-instruct (and -128k-): layers 32, heads 32, kv 32
     * (MHA), hidden 3072 -> head_dim 96 */
    {"phi-3-mini", "phi-3-mini-4k|phi-3-mini-128k|phi3-mini", {32, 32, 32, 96}},
    /* google/gemma-2-2b: layers 26, heads 8, kv 4, head_dim 256 (hidden 2304) */
    {"gemma-2-2b", "", {26, 8, 4, 256}},
    /* google/gemma-2-9b: layers 42, heads 16, kv 8, head_dim 256 (hidden 3584) */
    {"gemma-2-9b", "", {42, 16, 8, 256}},
    /* google/gemma-2-27b: layers 46, heads 32, kv 16, head_dim 128 (hidden 4608) */
    {"gemma-2-27b", "", {46, 32, 16, 128}},
    /* sentence-transformers/all-MiniLM-L6-v2 (BERT): layers 6, heads 12 (MHA),
     * hidden 384 -> head_dim 32 */
    {"all-minilm-l6-v2", "minilm-l6-v2", {6, 12, 12, 32}},
};

#define N_MODELS ((int)(sizeof g_models / sizeof g_models[0]))

/* The matching form of a name into out: lower case, the part after the
 * last '/', every "-instruct" part and a trailing "-it" / "-chat" dropped.
 * 0 when it does not fit. */
static int normalize(const char *name, char *out, size_t size)
{
    const char *slash = strrchr(name, '/');
    if (slash)
        name = slash + 1;
    size_t n = strlen(name);
    if (n == 0 || n >= size)
        return 0;
    for (size_t i = 0; i <= n; i++)
        out[i] = (char)tolower((unsigned char)name[i]);
    static const char instruct[] = "-instruct";
    const size_t li = sizeof instruct - 1;
    for (char *p = strstr(out, instruct); p; p = strstr(p, instruct)) {
        if (p[li] == '\0' || p[li] == '-')
            memmove(p, p + li, strlen(p + li) + 1);
        else
            p += li;
    }
    static const char *const suffixes[] = {"-it", "-chat"};
    for (size_t s = 0; s < sizeof suffixes / sizeof suffixes[0]; s++) {
        size_t len = strlen(out), ls = strlen(suffixes[s]);
        if (len > ls && !strcmp(out + len - ls, suffixes[s]))
            out[len - ls] = '\0';
    }
    return 1;
}

/* Is word one of the '|'-separated items of list? */
static int in_list(const char *list, const char *word)
{
    size_t n = strlen(word);
    for (const char *p = list; *p;) {
        const char *end = strchr(p, '|');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && !strncmp(p, word, n))
            return 1;
        if (!end)
            break;
        p = end + 1;
    }
    return 0;
}

static const model_row *find(const char *name)
{
    char key[256];
    if (!name || !normalize(name, key, sizeof key))
        return NULL;
    for (int i = 0; i < N_MODELS; i++)
        if (!strcmp(key, g_models[i].name) || in_list(g_models[i].aliases, key))
            return &g_models[i];
    return NULL;
}

int clkvq_model_count(void) { return N_MODELS; }

const char *clkvq_model_name(int index)
{
    return index >= 0 && index < N_MODELS ? g_models[index].name : NULL;
}

const char *clkvq_model_canonical(const char *name)
{
    const model_row *row = find(name);
    return row ? row->name : NULL;
}

clkvq_status clkvq_model_lookup(const char *name, clkvq_model_geometry *out)
{
    clkvq_clear_error(NULL);
    if (!name || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_model_lookup: %s is NULL",
                          !name ? "name" : "out");
    const model_row *row = find(name);
    if (row) {
        *out = row->g;
        return CLKVQ_OK;
    }
    char known[2048] = "";
    for (int i = 0; i < N_MODELS; i++) {
        size_t used = strlen(known);
        snprintf(known + used, sizeof known - used, "%s%s", i ? ", " : "", g_models[i].name);
    }
    return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                      "unknown model '%.200s'; known models: %s; for any other, give its "
                      "geometry as q<heads>:kv<kv heads>:d<head_dim>:l<layers>, e.g. "
                      "q32:kv8:d128:l32",
                      name, known);
}

/* ------------------------------------------------------------ the explicit form */

/* A decimal in 1..hi, digits only; 0 if not. */
static int parse_count(const char *text, size_t len, long hi, int *out)
{
    if (len == 0 || len > 9)
        return 0;
    long v = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] < '0' || text[i] > '9')
            return 0;
        v = v * 10 + (text[i] - '0');
    }
    if (v < 1 || v > hi)
        return 0;
    *out = (int)v;
    return 1;
}

clkvq_status clkvq_model_parse(const char *text, clkvq_model_geometry *out)
{
    clkvq_clear_error(NULL);
    if (!text || !out)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_model_parse: %s is NULL",
                          !text ? "text" : "out");
    static const struct {
        const char *prefix, *what;
        long hi;
    } parts[4] = {{"q", "query heads", GEOM_MAX_HEADS},
                  {"kv", "kv heads", GEOM_MAX_HEADS},
                  {"d", "head_dim", GEOM_MAX_HEAD_DIM},
                  {"l", "layers", GEOM_MAX_LAYERS}};
    int value[4] = {0, 0, 0, 0};
    const char *form = "q<heads>:kv<kv heads>:d<head_dim>:l<layers>, e.g. q32:kv8:d128:l32";
    for (const char *p = text;;) {
        const char *end = strchr(p, ':');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        int which = -1; /* no prefix starts another */
        size_t lp = 0;
        for (int i = 0; i < 4 && which < 0; i++) {
            lp = strlen(parts[i].prefix);
            if (len >= lp && !strncmp(p, parts[i].prefix, lp))
                which = i;
        }
        if (which < 0)
            return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                              "geometry '%.200s': part '%.*s' is not q<n>, kv<n>, d<n> or l<n> "
                              "(%s)",
                              text, (int)(len < 64 ? len : 64), p, form);
        if (value[which])
            return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                              "geometry '%.200s': %s given twice", text, parts[which].what);
        if (!parse_count(p + lp, len - lp, parts[which].hi, &value[which]))
            return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                              "geometry '%.200s': %s '%.*s' is not an integer in 1..%ld", text,
                              parts[which].what, (int)(len - lp < 64 ? len - lp : 64), p + lp,
                              parts[which].hi);
        if (!end)
            break;
        p = end + 1;
    }
    for (int i = 0; i < 4; i++)
        if (!value[i])
            return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "geometry '%.200s': %s missing (%s)",
                              text, parts[i].what, form);
    if (value[0] % value[1])
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                          "geometry '%.200s': %d query heads are not a multiple of %d kv heads",
                          text, value[0], value[1]);
    out->n_q_heads = value[0];
    out->n_kv_heads = value[1];
    out->head_dim = value[2];
    out->n_layers = value[3];
    return CLKVQ_OK;
}

int clkvq_model_format(const clkvq_model_geometry *g, char *buf, size_t size)
{
    if (!g)
        return snprintf(buf, size, "?");
    return snprintf(buf, size, "q%d:kv%d:d%d:l%d", g->n_q_heads, g->n_kv_heads, g->head_dim,
                    g->n_layers);
}
