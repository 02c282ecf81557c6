/* Shared by the test suites: one context per process, seeded data. */
#ifndef CLKVQ_TEST_UTIL_H
#define CLKVQ_TEST_UTIL_H

#include "clkvq.h"
#include "reference_cache.h"

#include <check.h>
#include <stdint.h>

/* The process-wide context on the default device (created once; the
 * suites run with CK_FORK=no semantics for it; test_run_suite releases
 * it). */
clkvq_context *test_ctx(void);

/* xorshift64* in [0,1) and a standard normal, for reproducible data. */
double test_uniform(uint64_t *state);
double test_normal(uint64_t *state);
void test_fill_normal(uint64_t seed, float *x, size_t n, float sigma);

/* A seeded random permutation of 0..head_dim-1 per head (malloc'd,
 * [n_heads][head_dim]). */
int32_t *test_random_perm(uint64_t seed, int n_heads, int head_dim);

/* softmax(scale q.K^T) V in double for one sequence: q [n_q][d], k and v
 * [n_q / qpk][n][d] (query head h reads kv head h / qpk), out [n_q][d];
 * zeros when n is 0. */
void test_attention_reference(const float *q, const float *k, const float *v, int n, int n_q,
                              int qpk, int d, float scale, double *out);

/* Worst relative error over (sequence, query, query head) of out, a decode
 * of q ([n_seqs][nq][n_kv * qpk][d]) over layer 0 of cache, against causal
 * fp64 attention (clkvq_ref_attention) over the cache's read-back of
 * sequences of lengths[s] tokens; a row that sees no token: absolute error. */
double test_decode_error(clkvq_cache *cache, int n_seqs, const int *lengths, int n_kv, int qpk,
                         int d, int nq, const float *q, const float *out, float scale);

/* Layer 0 of every sequence of cache reads back as its plain-C model
 * (heads x dim per token), bit for bit: the length, then every value. */
void test_expect_model(clkvq_cache *cache, clkvq_ref_cache **model, int n_seqs, int heads,
                       int dim, const char *label);

/* Runs a suite without forking (one OpenCL context per process), releases
 * the context and returns the process exit code. */
int test_run_suite(Suite *suite);

#endif
