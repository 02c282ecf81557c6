/* Kernel arguments set in order; see kernel_args.h. */
#include "kernel_args.h"

static void set(clkvq_args *a, size_t size, const void *value)
{
    if (a->err != CL_SUCCESS)
        return;
    cl_int err = clSetKernelArg(a->kernel, a->next, size, value);
    if (err != CL_SUCCESS) {
        a->err = err;
        a->failed = a->next;
    }
    a->next++;
}

void clkvq_args_begin(clkvq_args *a, cl_kernel kernel, cl_uint first)
{
    a->kernel = kernel;
    a->next = first;
    a->err = CL_SUCCESS;
    a->failed = 0;
}

void clkvq_args_mem(clkvq_args *a, cl_mem m) { set(a, sizeof m, m ? (const void *)&m : NULL); }

void clkvq_args_int(clkvq_args *a, int v)
{
    cl_int x = v;
    set(a, sizeof x, &x);
}

void clkvq_args_float(clkvq_args *a, float v)
{
    cl_float x = v;
    set(a, sizeof x, &x);
}

void clkvq_args_local(clkvq_args *a, size_t bytes) { set(a, bytes, NULL); }

clkvq_status clkvq_args_end(clkvq_context *ctx, const clkvq_args *a, const char *what)
{
    if (a->err == CL_SUCCESS)
        return CLKVQ_OK;
    return clkvq_fail(ctx, CLKVQ_ERR_OPENCL, "setting argument %u of %s: %s (%d)", a->failed,
                      what, clkvq_cl_error_name(a->err), a->err);
}
