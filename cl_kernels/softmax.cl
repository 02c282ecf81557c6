/*
 * Row softmax for the CLBlast attention paths (lib/prefill.c), in place.
 *
 * One work-group per row; the local size is a power of two (the host picks
 * 64 or the largest power of two the device/kernel allows) and `red` holds
 * one float per work-item. Each work-item walks the row in strides of the
 * local size; the walk has no barriers in it, and its trip count is
 * computed from the row length alone, so it is the same for every
 * work-item of the group. The barriers sit only in the tree reductions,
 * whose trip count (log2 of the local size) is uniform too: PoCL
 * miscompiles barriers in loops whose trip count differs between
 * work-items.
 *
 * Numerics: the row maximum is subtracted before exp (no overflow); a row
 * whose valid scores are all -INFINITY gets max 0 instead of -INF so that
 * exp(-inf - m) is 0 rather than NaN, and then (sum 0) comes out as zeros.
 * Entries past the row's valid length (masked by causality) are written as
 * exact zeros, so the P.V product that follows ignores them.
 */

/* Tree reduction over the work-group; every work-item gets the result.
 * Leaves a barrier after the read so `red` can be reused at once. */
float group_max(__local float *red, float x)
{
    const int lid = (int)get_local_id(0);
    const int lsz = (int)get_local_size(0);
    red[lid] = x;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = lsz / 2; s > 0; s >>= 1) {
        if (lid < s)
            red[lid] = fmax(red[lid], red[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float r = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}

float group_sum(__local float *red, float x)
{
    const int lid = (int)get_local_id(0);
    const int lsz = (int)get_local_size(0);
    red[lid] = x;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = lsz / 2; s > 0; s >>= 1) {
        if (lid < s)
            red[lid] += red[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float r = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return r;
}

/* softmax over row[0, n_valid), zeros over row[n_valid, n_cols). */
void row_softmax(__global float *row, int n_valid, int n_cols, __local float *red)
{
    const int lid = (int)get_local_id(0);
    const int lsz = (int)get_local_size(0);
    /* same trip count for every work-item: from the row length only */
    const int n_steps = (n_cols + lsz - 1) / lsz;

    float m = -INFINITY;
    for (int step = 0; step < n_steps; step++) {
        int j = step * lsz + lid;
        if (j < n_valid)
            m = fmax(m, row[j]);
    }
    m = group_max(red, m);
    if (m == -INFINITY)
        m = 0.0f;

    float sum = 0.0f;
    for (int step = 0; step < n_steps; step++) {
        int j = step * lsz + lid;
        if (j < n_valid) {
            float e = exp(row[j] - m);
            row[j] = e; /* each work-item rereads only its own entries below */
            sum += e;
        }
    }
    sum = group_sum(red, sum);

    for (int step = 0; step < n_steps; step++) {
        int j = step * lsz + lid;
        if (j < n_valid)
            row[j] = sum > 0.0f ? row[j] / sum : 0.0f;
        else if (j < n_cols)
            row[j] = 0.0f;
    }
}

/* Plain rows: s is [n_rows][n_cols] (the GEMV decode path's scores). The
 * global size is n_rows work-groups exactly. */
__kernel void clkvq_softmax_rows(__global float *s, int n_cols, __local float *red)
{
    const int row = (int)get_group_id(0);
    row_softmax(s + (size_t)row * (size_t)n_cols, n_cols, n_cols, red);
}

/*
 * Causal rows of a prefill score block: s is [n_heads][n_queries][n_cols]
 * (row r = head * n_queries + i); query i sits at token position pos0 + i
 * and attends to tokens 0..pos0 + i, i.e. the first pos0 + i + 1 columns.
 */
__kernel void clkvq_softmax_causal(__global float *s, int n_cols, int n_queries, int pos0,
                                   __local float *red)
{
    const int row = (int)get_group_id(0);
    const int i = row % n_queries;
    const int n_valid = min(pos0 + i + 1, n_cols);
    row_softmax(s + (size_t)row * (size_t)n_cols, n_valid, n_cols, red);
}
