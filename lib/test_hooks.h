/*
 * Test hooks: they exist only in the static test library (clkvq_static),
 * for which CMakeLists.txt compiles the files that carry them a second time
 * with -DCLKVQ_TESTING. The shared library has none of them, so a program
 * that reaches for one fails to link against libclkvq.so. None is
 * thread-safe: tests set them around single-threaded calls.
 */
#ifndef CLKVQ_TEST_HOOKS_H
#define CLKVQ_TEST_HOOKS_H

#include <stddef.h>

/* lib/autotune.c: when set, the tuner adds a copy of the default candidate
 * whose output it scales by 1.01 after reading it back and before verifying
 * it, so a wrong candidate is known to be among those it checks: the
 * verification must reject it (n_rejected), and it must never be timed. */
extern int clkvq_tune_perturb_for_tests;

/* lib/attention.c: when set, the cooperative decode programs are built
 * with CLKVQ_PLANTED_BUG, which skips the online softmax's rescale of the
 * accumulators: decode over more than one tile must then fail the tests'
 * tolerance (they can fail). Programs built while it is set are cached
 * under their own options. */
extern int clkvq_attn_planted_bug_for_tests;

/* lib/prefill.c: bytes of scores one prefill query chunk may hold (256 MiB
 * by default); tests lower it to exercise the chunking on small shapes. */
extern size_t clkvq_prefill_score_budget;

/* lib/tuning_db.c: replaces the embedded shipped tuning results with n
 * (name, text) pairs, so the VENDOR level of the lookup can be tested
 * without shipping a file for the test machine; n < 0 restores the
 * embedded table. The arrays must outlive their use. */
void clkvq_tuning_set_shipped(const char *const *names, const char *const *texts, int n);

#endif
