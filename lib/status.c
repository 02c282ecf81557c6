/* Status names and the per-context last-error message. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

/* Calls given a NULL context still leave their detail somewhere readable. */
static _Thread_local char g_null_ctx_error[CLKVQ_MSG_MAX];

const char *clkvq_status_string(clkvq_status status)
{
    switch (status) {
    case CLKVQ_OK: return "CLKVQ_OK: success";
    case CLKVQ_ERR_INVALID_ARG: return "CLKVQ_ERR_INVALID_ARG: invalid argument";
    case CLKVQ_ERR_UNSUPPORTED: return "CLKVQ_ERR_UNSUPPORTED: unsupported format or option";
    case CLKVQ_ERR_NO_DEVICE: return "CLKVQ_ERR_NO_DEVICE: no matching OpenCL device";
    case CLKVQ_ERR_OPENCL: return "CLKVQ_ERR_OPENCL: an OpenCL call failed";
    case CLKVQ_ERR_BUILD: return "CLKVQ_ERR_BUILD: kernel build failed";
    case CLKVQ_ERR_OUT_OF_MEMORY: return "CLKVQ_ERR_OUT_OF_MEMORY: allocation failed";
    case CLKVQ_ERR_NONFINITE: return "CLKVQ_ERR_NONFINITE: NaN, Inf or out-of-range input";
    case CLKVQ_ERR_BUFFER_TOO_SMALL: return "CLKVQ_ERR_BUFFER_TOO_SMALL: buffer too small";
    case CLKVQ_ERR_IO: return "CLKVQ_ERR_IO: file read/write failed";
    case CLKVQ_ERR_CORRUPT: return "CLKVQ_ERR_CORRUPT: malformed file";
    case CLKVQ_ERR_DEVICE_LIMIT: return "CLKVQ_ERR_DEVICE_LIMIT: exceeds a device limit";
    case CLKVQ_ERR_OUT_OF_BLOCKS: return "CLKVQ_ERR_OUT_OF_BLOCKS: no free page in the pool";
    }
    return "CLKVQ_ERR_?: unknown status";
}

static char *msg_slot(const clkvq_context *ctx)
{
    return ctx ? (char *)ctx->last_error : g_null_ctx_error;
}

clkvq_status clkvq_fail(clkvq_context *ctx, clkvq_status status, const char *fmt, ...)
{
    char *slot = msg_slot(ctx);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(slot, CLKVQ_MSG_MAX, fmt, ap);
    va_end(ap);
    return status;
}

void clkvq_clear_error(clkvq_context *ctx) { msg_slot(ctx)[0] = '\0'; }

const char *clkvq_last_error(const clkvq_context *ctx) { return msg_slot(ctx); }

const char *clkvq_cl_error_name(cl_int err)
{
    switch (err) {
#define CASE(x) case x: return #x
    CASE(CL_SUCCESS);
    CASE(CL_DEVICE_NOT_FOUND);
    CASE(CL_DEVICE_NOT_AVAILABLE);
    CASE(CL_COMPILER_NOT_AVAILABLE);
    CASE(CL_MEM_OBJECT_ALLOCATION_FAILURE);
    CASE(CL_OUT_OF_RESOURCES);
    CASE(CL_OUT_OF_HOST_MEMORY);
    CASE(CL_PROFILING_INFO_NOT_AVAILABLE);
    CASE(CL_BUILD_PROGRAM_FAILURE);
    CASE(CL_INVALID_VALUE);
    CASE(CL_INVALID_DEVICE);
    CASE(CL_INVALID_CONTEXT);
    CASE(CL_INVALID_COMMAND_QUEUE);
    CASE(CL_INVALID_MEM_OBJECT);
    CASE(CL_INVALID_BINARY);
    CASE(CL_INVALID_BUILD_OPTIONS);
    CASE(CL_INVALID_PROGRAM);
    CASE(CL_INVALID_PROGRAM_EXECUTABLE);
    CASE(CL_INVALID_KERNEL_NAME);
    CASE(CL_INVALID_KERNEL);
    CASE(CL_INVALID_ARG_INDEX);
    CASE(CL_INVALID_ARG_VALUE);
    CASE(CL_INVALID_ARG_SIZE);
    CASE(CL_INVALID_KERNEL_ARGS);
    CASE(CL_INVALID_WORK_DIMENSION);
    CASE(CL_INVALID_WORK_GROUP_SIZE);
    CASE(CL_INVALID_WORK_ITEM_SIZE);
    CASE(CL_INVALID_GLOBAL_OFFSET);
    CASE(CL_INVALID_EVENT_WAIT_LIST);
    CASE(CL_INVALID_EVENT);
    CASE(CL_INVALID_OPERATION);
    CASE(CL_INVALID_BUFFER_SIZE);
    CASE(CL_INVALID_GLOBAL_WORK_SIZE);
    CASE(CL_MISALIGNED_SUB_BUFFER_OFFSET);
    CASE(CL_INVALID_PLATFORM);
    CASE(CL_INVALID_DEVICE_TYPE);
    CASE(CL_INVALID_QUEUE_PROPERTIES);
    CASE(CL_INVALID_HOST_PTR);
#undef CASE
    }
    return "CL_UNKNOWN_ERROR";
}

clkvq_status clkvq_cl_fail(clkvq_context *ctx, cl_int err, const char *what)
{
    return clkvq_fail(ctx, CLKVQ_ERR_OPENCL, "%s failed: %s (%d)", what, clkvq_cl_error_name(err),
                      (int)err);
}
