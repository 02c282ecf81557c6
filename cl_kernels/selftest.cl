/* A trivial kernel: lets tests exercise building and the program cache
 * without depending on the real kernels. */
__kernel void clkvq_selftest(__global int *x) { x[get_global_id(0)] += 1; }

#ifdef CLKVQ_SELFTEST_SYNTAX_ERROR
/* Turned on by a test to check that a failing build reports its log. */
__kernel void clkvq_selftest_broken(__global int *x) { x[0] = undeclared_name +; }
#endif
