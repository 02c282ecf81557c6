/* A plain float4 copy: the bandwidth roof benchmarks quote ratios against
 * (lib/bandwidth.c). The global size is padded to the work-group size, so
 * work-items past n4 do nothing. */
__kernel void clkvq_copy_f4(__global const float4 *restrict src, __global float4 *restrict dst,
                            uint n4) {
    uint i = (uint)get_global_id(0);
    if (i < n4) {
        dst[i] = src[i];
    }
}
