/* Device selection, context lifetime and device description. */
#include "internal.h"
#include "program_cache.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

/* Every device of every platform, in the order clkvq_list_devices prints
 * them, so an index given by a user means the same thing everywhere. */
typedef struct {
    cl_platform_id platform;
    cl_device_id device;
} device_entry;

typedef struct {
    device_entry *items;
    int count;
} device_list;

static void device_list_free(device_list *list) {
    free(list->items);
    list->items = NULL;
    list->count = 0;
}

/* A platform without devices (CL_DEVICE_NOT_FOUND) is skipped, not an error:
 * machines with a leftover ICD must still find their real device. */
static clkvq_status device_list_get(clkvq_context *ctx, device_list *list) {
    list->items = NULL;
    list->count = 0;
    cl_uint n_platforms = 0;
    cl_int err = clGetPlatformIDs(0, NULL, &n_platforms);
    if (err != CL_SUCCESS || n_platforms == 0)
        return clkvq_fail(ctx, CLKVQ_ERR_NO_DEVICE,
                          "no OpenCL platform found (clGetPlatformIDs: %s (%d)); is an ICD "
                          "installed under /etc/OpenCL/vendors?",
                          clkvq_cl_error_name(err), (int)err);
    cl_platform_id *platforms = malloc(n_platforms * sizeof *platforms);
    if (!platforms)
        return clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "out of memory listing platforms");
    err = clGetPlatformIDs(n_platforms, platforms, NULL);
    if (err != CL_SUCCESS) {
        free(platforms);
        return clkvq_cl_fail(ctx, err, "clGetPlatformIDs");
    }
    clkvq_status st = CLKVQ_OK;
    for (cl_uint p = 0; p < n_platforms && st == CLKVQ_OK; p++) {
        cl_uint n_devices = 0;
        if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, 0, NULL, &n_devices) != CL_SUCCESS ||
            n_devices == 0)
            continue;
        cl_device_id *devices = malloc(n_devices * sizeof *devices);
        device_entry *grown = realloc(list->items, (list->count + n_devices) * sizeof *grown);
        if (!devices || !grown) {
            free(devices);
            if (grown) list->items = grown;
            st = clkvq_fail(ctx, CLKVQ_ERR_OUT_OF_MEMORY, "out of memory listing devices");
            break;
        }
        list->items = grown;
        if (clGetDeviceIDs(platforms[p], CL_DEVICE_TYPE_ALL, n_devices, devices, NULL) ==
            CL_SUCCESS) {
            for (cl_uint d = 0; d < n_devices; d++)
                list->items[list->count++] = (device_entry){platforms[p], devices[d]};
        }
        free(devices);
    }
    free(platforms);
    if (st == CLKVQ_OK && list->count == 0)
        st = clkvq_fail(ctx, CLKVQ_ERR_NO_DEVICE, "OpenCL platforms found, but no devices");
    if (st != CLKVQ_OK) device_list_free(list);
    return st;
}

/* Truncates instead of failing: a long driver string must not make a
 * device unusable, and the fixed-size fields are only descriptive. */
static void platform_string(cl_platform_id platform, cl_platform_info param, char *buf,
                            size_t size) {
    size_t need = 0;
    buf[0] = '\0';
    if (clGetPlatformInfo(platform, param, 0, NULL, &need) != CL_SUCCESS || need == 0) return;
    char *tmp = malloc(need);
    if (tmp && clGetPlatformInfo(platform, param, need, tmp, NULL) == CL_SUCCESS)
        snprintf(buf, size, "%s", tmp);
    free(tmp);
}

static void device_string(cl_device_id device, cl_device_info param, char *buf, size_t size) {
    size_t need = 0;
    buf[0] = '\0';
    if (clGetDeviceInfo(device, param, 0, NULL, &need) != CL_SUCCESS || need == 0) return;
    char *tmp = malloc(need);
    if (tmp && clGetDeviceInfo(device, param, need, tmp, NULL) == CL_SUCCESS)
        snprintf(buf, size, "%s", tmp);
    free(tmp);
}

static int device_is_gpu(cl_device_id device) {
    cl_device_type type = 0;
    clGetDeviceInfo(device, CL_DEVICE_TYPE, sizeof type, &type, NULL);
    return (type & CL_DEVICE_TYPE_GPU) != 0;
}

static const char *device_type_name(cl_device_id device) {
    cl_device_type type = 0;
    clGetDeviceInfo(device, CL_DEVICE_TYPE, sizeof type, &type, NULL);
    if (type & CL_DEVICE_TYPE_GPU) return "GPU";
    if (type & CL_DEVICE_TYPE_CPU) return "CPU";
    if (type & CL_DEVICE_TYPE_ACCELERATOR) return "accelerator";
    return "other";
}

static int is_decimal(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (!isdigit((unsigned char)*s)) return 0;
    return 1;
}

static int contains_nocase(const char *haystack, const char *needle) {
    size_t n = strlen(needle);
    for (; *haystack; haystack++) {
        size_t i = 0;
        while (i < n && haystack[i] &&
               tolower((unsigned char)haystack[i]) == tolower((unsigned char)needle[i]))
            i++;
        if (i == n) return 1;
    }
    return n == 0;
}

static void entry_label(const device_entry *e, char *buf, size_t size) {
    char platform[256], name[256];
    platform_string(e->platform, CL_PLATFORM_NAME, platform, sizeof platform);
    device_string(e->device, CL_DEVICE_NAME, name, sizeof name);
    snprintf(buf, size, "%s %s", platform, name);
}

static clkvq_status pick_device(const device_list *list, const char *spec, int *index) {
    if (!spec || !*spec) {
        for (int i = 0; i < list->count; i++)
            if (device_is_gpu(list->items[i].device)) {
                *index = i;
                return CLKVQ_OK;
            }
        *index = 0;
        return CLKVQ_OK;
    }
    if (is_decimal(spec)) {
        long i = strtol(spec, NULL, 10);
        if (i >= list->count || strlen(spec) > 9)
            return clkvq_fail(NULL, CLKVQ_ERR_NO_DEVICE,
                              "device index %s out of range: %d device(s) (clkvq_list_devices "
                              "prints them)",
                              spec, list->count);
        *index = (int)i;
        return CLKVQ_OK;
    }
    for (int i = 0; i < list->count; i++) {
        char label[600];
        entry_label(&list->items[i], label, sizeof label);
        if (contains_nocase(label, spec)) {
            *index = i;
            return CLKVQ_OK;
        }
    }
    return clkvq_fail(NULL, CLKVQ_ERR_NO_DEVICE,
                      "no OpenCL device matches \"%s\" (a device index, or a substring of "
                      "\"<platform> <device>\"; %d device(s) present)",
                      spec, list->count);
}

static void sanitize_key(char *key) {
    char *out = key;
    for (const char *in = key; *in; in++) {
        char c = *in;
        int ok = isalnum((unsigned char)c) || c == '.' || c == '_' || c == '-';
        if (!ok) c = '_';
        if (c == '_' && (out == key || out[-1] == '_'))
            continue; /* collapse runs, no leading '_' */
        *out++ = c;
    }
    while (out > key && out[-1] == '_') out--;
    *out = '\0';
}

static void fill_device_info(clkvq_context *ctx) {
    clkvq_device_info *info = &ctx->info;
    cl_device_id dev = ctx->device;
    cl_uint cu = 0;
    cl_ulong local_mem = 0, global_mem = 0, max_alloc = 0;
    memset(info, 0, sizeof *info);
    platform_string(ctx->platform, CL_PLATFORM_NAME, info->platform, sizeof info->platform);
    device_string(dev, CL_DEVICE_VENDOR, info->vendor, sizeof info->vendor);
    device_string(dev, CL_DEVICE_NAME, info->name, sizeof info->name);
    device_string(dev, CL_DRIVER_VERSION, info->driver_version, sizeof info->driver_version);
    device_string(dev, CL_DEVICE_VERSION, info->device_version, sizeof info->device_version);
    info->is_gpu = device_is_gpu(dev);
    clGetDeviceInfo(dev, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof cu, &cu, NULL);
    info->compute_units = (int)cu;
    clGetDeviceInfo(dev, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof info->max_work_group_size,
                    &info->max_work_group_size, NULL);
    clGetDeviceInfo(dev, CL_DEVICE_LOCAL_MEM_SIZE, sizeof local_mem, &local_mem, NULL);
    clGetDeviceInfo(dev, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof global_mem, &global_mem, NULL);
    clGetDeviceInfo(dev, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof max_alloc, &max_alloc, NULL);
    info->local_mem_bytes = local_mem;
    info->global_mem_bytes = global_mem;
    info->max_alloc_bytes = max_alloc;
    snprintf(info->device_key, sizeof info->device_key, "%.100s_%.200s_%.60s_%d", info->vendor,
             info->name, info->driver_version, info->compute_units);
    sanitize_key(info->device_key);
}

/* Whether the space-separated list names ext exactly (not as a prefix of
 * a longer name). */
static int has_word(const char *list, const char *ext) {
    size_t n = strlen(ext);
    for (const char *p = list; (p = strstr(p, ext)) != NULL; p += n)
        if ((p == list || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0')) return 1;
    return 0;
}

static unsigned device_features(cl_device_id dev) {
    size_t size = 0;
    if (clGetDeviceInfo(dev, CL_DEVICE_EXTENSIONS, 0, NULL, &size) != CL_SUCCESS || size == 0)
        return 0;
    char *list = malloc(size + 1);
    if (!list) return 0;
    unsigned f = 0;
    if (clGetDeviceInfo(dev, CL_DEVICE_EXTENSIONS, size, list, NULL) == CL_SUCCESS) {
        list[size] = '\0';
        if (has_word(list, "cl_khr_subgroups") || has_word(list, "cl_intel_subgroups"))
            f |= CLKVQ_FEATURE_SUBGROUPS;
        if (has_word(list, "cl_khr_fp16")) f |= CLKVQ_FEATURE_FP16;
        if (has_word(list, "cl_khr_integer_dot_product")) f |= CLKVQ_FEATURE_INT_DOT;
    }
    free(list);
    return f;
}

/* Shared tail of create and wrap: what every later call reads from ctx. */
static void context_describe(clkvq_context *ctx) {
    cl_bool little = CL_TRUE;
    cl_device_fp_config fp = 0;
    cl_command_queue_properties props = 0;
    clGetDeviceInfo(ctx->device, CL_DEVICE_ENDIAN_LITTLE, sizeof little, &little, NULL);
    clGetDeviceInfo(ctx->device, CL_DEVICE_SINGLE_FP_CONFIG, sizeof fp, &fp, NULL);
    clGetCommandQueueInfo(ctx->queue, CL_QUEUE_PROPERTIES, sizeof props, &props, NULL);
    ctx->little_endian = little == CL_TRUE;
    ctx->has_correct_div = (fp & CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT) != 0;
    ctx->profiling = (props & CL_QUEUE_PROFILING_ENABLE) != 0;
    ctx->features = device_features(ctx->device);
    ctx->last_device_ms = -1.0;
    fill_device_info(ctx);
}

static clkvq_status open_device(clkvq_context *ctx, const device_entry *e) {
    cl_int err;
    cl_context_properties props[] = {CL_CONTEXT_PLATFORM, (cl_context_properties)e->platform, 0};
    ctx->platform = e->platform;
    ctx->device = e->device;
    ctx->cl_ctx = clCreateContext(props, 1, &e->device, NULL, NULL, &err);
    if (err != CL_SUCCESS) return clkvq_cl_fail(NULL, err, "clCreateContext");
    ctx->queue = clCreateCommandQueue(ctx->cl_ctx, e->device, CL_QUEUE_PROFILING_ENABLE, &err);
    if (err != CL_SUCCESS)
        return clkvq_cl_fail(NULL, err, "clCreateCommandQueue (profiling enabled)");
    return CLKVQ_OK;
}

clkvq_status clkvq_context_create(clkvq_context **out, const char *device_spec) {
    clkvq_clear_error(NULL);
    if (!out) return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_context_create: out is NULL");
    *out = NULL;
    if (!device_spec || !*device_spec) device_spec = getenv("CLKVQ_DEVICE");

    device_list list;
    clkvq_status st = device_list_get(NULL, &list);
    if (st != CLKVQ_OK) return st;
    int index = 0;
    st = pick_device(&list, device_spec, &index);
    if (st != CLKVQ_OK) {
        device_list_free(&list);
        return st;
    }
    clkvq_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        device_list_free(&list);
        return clkvq_fail(NULL, CLKVQ_ERR_OUT_OF_MEMORY, "out of memory for the context");
    }
    st = open_device(ctx, &list.items[index]);
    device_list_free(&list);
    if (st != CLKVQ_OK) {
        clkvq_context_release(ctx);
        return st;
    }
    context_describe(ctx);
    *out = ctx;
    return CLKVQ_OK;
}

/* A queue of another context or device would fail later with an opaque
 * OpenCL error on the first enqueue; catch it where the caller can see why. */
static clkvq_status check_wrap_args(cl_context cl_ctx, cl_device_id device,
                                    cl_command_queue queue) {
    cl_context queue_ctx = NULL;
    cl_device_id queue_dev = NULL;
    cl_int err = clGetCommandQueueInfo(queue, CL_QUEUE_CONTEXT, sizeof queue_ctx, &queue_ctx, NULL);
    if (err == CL_SUCCESS)
        err = clGetCommandQueueInfo(queue, CL_QUEUE_DEVICE, sizeof queue_dev, &queue_dev, NULL);
    if (err != CL_SUCCESS)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_context_wrap: queue is not a valid command queue: %s (%d)",
                          clkvq_cl_error_name(err), (int)err);
    if (queue_ctx != cl_ctx || queue_dev != device)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_context_wrap: the queue belongs to another %s",
                          queue_ctx != cl_ctx ? "cl_context" : "device");
    return CLKVQ_OK;
}

clkvq_status clkvq_context_wrap(clkvq_context **out, cl_context cl_ctx, cl_device_id device,
                                cl_command_queue queue) {
    clkvq_clear_error(NULL);
    if (!out || !cl_ctx || !device || !queue)
        return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_context_wrap: %s is NULL",
                          !out      ? "out"
                          : !cl_ctx ? "cl_ctx"
                          : !device ? "device"
                                    : "queue");
    *out = NULL;
    clkvq_status st = check_wrap_args(cl_ctx, device, queue);
    if (st != CLKVQ_OK) return st;
    cl_platform_id platform = NULL;
    cl_int err = clGetDeviceInfo(device, CL_DEVICE_PLATFORM, sizeof platform, &platform, NULL);
    if (err != CL_SUCCESS) return clkvq_cl_fail(NULL, err, "clGetDeviceInfo(CL_DEVICE_PLATFORM)");
    clkvq_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return clkvq_fail(NULL, CLKVQ_ERR_OUT_OF_MEMORY, "out of memory for the context");
    clRetainContext(cl_ctx);
    clRetainDevice(device);
    clRetainCommandQueue(queue);
    ctx->platform = platform;
    ctx->cl_ctx = cl_ctx;
    ctx->device = device;
    ctx->queue = queue;
    context_describe(ctx);
    *out = ctx;
    return CLKVQ_OK;
}

void clkvq_context_release(clkvq_context *ctx) {
    if (!ctx) return;
    clkvq_timing_reset(ctx);
    clkvq_blas_context_release(ctx);
    clkvq_program_cache_free(ctx);
    if (ctx->queue) clReleaseCommandQueue(ctx->queue);
    if (ctx->cl_ctx) clReleaseContext(ctx->cl_ctx);
    if (ctx->device) clReleaseDevice(ctx->device);
    free(ctx);
}

cl_context clkvq_context_cl_context(const clkvq_context *ctx) {
    return ctx ? ctx->cl_ctx : NULL;
}

cl_device_id clkvq_context_cl_device(const clkvq_context *ctx) {
    return ctx ? ctx->device : NULL;
}

cl_command_queue clkvq_context_cl_queue(const clkvq_context *ctx) {
    return ctx ? ctx->queue : NULL;
}

clkvq_status clkvq_context_device_info(const clkvq_context *ctx, clkvq_device_info *out) {
    if (!ctx || !out)
        return clkvq_fail((clkvq_context *)ctx, CLKVQ_ERR_INVALID_ARG,
                          "clkvq_context_device_info: %s is NULL", !ctx ? "ctx" : "out");
    clkvq_clear_error((clkvq_context *)ctx);
    *out = ctx->info;
    return CLKVQ_OK;
}

double clkvq_last_device_ms(const clkvq_context *ctx) {
    if (!ctx) return -1.0;
    if (ctx->n_timed > 0) {
        /* the events of an asynchronous call: waited for once, then the
         * value is kept (a cache behind the const of the public API) */
        clkvq_context *c = (clkvq_context *)ctx;
        double ms = clWaitForEvents((cl_uint)c->n_timed, c->timed) == CL_SUCCESS
                        ? clkvq_events_ms(c->timed, c->n_timed)
                        : -1.0;
        ms = ms >= 0.0 && c->timed_ms >= 0.0 ? ms + c->timed_ms : -1.0;
        clkvq_timing_reset(c);
        c->last_device_ms = ms;
    }
    return ctx->last_device_ms;
}

void clkvq_timing_reset(clkvq_context *ctx) {
    for (int i = 0; i < ctx->n_timed; i++) clReleaseEvent(ctx->timed[i]);
    ctx->n_timed = 0;
    ctx->timed_ms = 0.0;
    ctx->last_device_ms = -1.0;
}

void clkvq_timing_defer(clkvq_context *ctx, const cl_event *events, int n) {
    const int cap = (int)(sizeof ctx->timed / sizeof ctx->timed[0]);
    for (int i = 0; i < n; i++) {
        if (ctx->n_timed == cap) {
            /* full (a layer of many shares): wait for what is held */
            double ms = clWaitForEvents((cl_uint)cap, ctx->timed) == CL_SUCCESS
                            ? clkvq_events_ms(ctx->timed, cap)
                            : -1.0;
            ctx->timed_ms = ms >= 0.0 && ctx->timed_ms >= 0.0 ? ctx->timed_ms + ms : -1.0;
            for (int j = 0; j < cap; j++) clReleaseEvent(ctx->timed[j]);
            ctx->n_timed = 0;
        }
        ctx->timed[ctx->n_timed++] = events[i];
    }
}

clkvq_status clkvq_list_devices(FILE *out) {
    clkvq_clear_error(NULL);
    if (!out) return clkvq_fail(NULL, CLKVQ_ERR_INVALID_ARG, "clkvq_list_devices: out is NULL");
    device_list list;
    clkvq_status st = device_list_get(NULL, &list);
    if (st != CLKVQ_OK) return st;
    for (int i = 0; i < list.count; i++) {
        char platform[256], name[256];
        platform_string(list.items[i].platform, CL_PLATFORM_NAME, platform, sizeof platform);
        device_string(list.items[i].device, CL_DEVICE_NAME, name, sizeof name);
        fprintf(out, "%d: %s / %s (%s)\n", i, platform, name,
                device_type_name(list.items[i].device));
    }
    device_list_free(&list);
    return CLKVQ_OK;
}

/* ------------------------------------------------------------ buffers, timing */

clkvq_status clkvq_check_buffer(clkvq_context *ctx, cl_mem buf, const char *what, size_t need)
{
    if (!buf)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s buffer is NULL", what);
    size_t have = 0;
    cl_context owner = NULL;
    cl_int err = clGetMemObjectInfo(buf, CL_MEM_SIZE, sizeof have, &have, NULL);
    if (err == CL_SUCCESS)
        err = clGetMemObjectInfo(buf, CL_MEM_CONTEXT, sizeof owner, &owner, NULL);
    if (err != CL_SUCCESS)
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG, "%s is not a valid buffer (%s)", what,
                          clkvq_cl_error_name(err));
    if (owner != ctx->cl_ctx) /* would fail later, inside an enqueue, with less to go on */
        return clkvq_fail(ctx, CLKVQ_ERR_INVALID_ARG,
                          "%s buffer belongs to another OpenCL context", what);
    if (have < need)
        return clkvq_fail(ctx, CLKVQ_ERR_BUFFER_TOO_SMALL,
                          "%s buffer holds %zu bytes, %zu needed", what, have, need);
    return CLKVQ_OK;
}

double clkvq_events_ms(const cl_event *events, int n)
{
    double ms = 0.0;
    for (int i = 0; i < n; i++) {
        cl_ulong start = 0, end = 0;
        if (clGetEventProfilingInfo(events[i], CL_PROFILING_COMMAND_START, sizeof start, &start,
                                    NULL) != CL_SUCCESS ||
            clGetEventProfilingInfo(events[i], CL_PROFILING_COMMAND_END, sizeof end, &end,
                                    NULL) != CL_SUCCESS)
            return -1.0;
        ms += (double)(end - start) * 1e-6;
    }
    return ms;
}
