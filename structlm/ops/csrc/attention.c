/* Causal attention's probabilities from bf16 queries and keys, scores in fp32: the first half of
   the forward of structlm/attention.py, fused.

     p[b, i, j] = softmax_j(scale q[b, i] . k[b, j]) for j <= i,  0 for j > i

   q, k: (nb, T, hs) bf16, p: (nb, T, T) bf16. Each score is a sum of exact products of bf16
   values in fp32 (what an fp32 GEMM of the upcast operands computes), then scaled; its softmax
   in fp32, one rounding to bf16 at the end; only the causal half is computed. Per head, the keys are upcast
   and transposed once to (hs, Tp), so that every score block of LANES keys is LANES independent
   fp32 multiply-adds per head dimension, which gcc -O3 vectorises; the reductions of the
   softmax keep LANES partial results for the same reason. Where the compiler targets AVX512-BF16
   (-march=native on such a CPU) and hs is even, the keys stay bf16, in pairs along the head
   dimension, and vdpbf16ps does two exact products and their fp32 sums per lane: half the
   instructions, 2x faster (BENCHMARKS.md). Heads are shared among OpenMP threads:
   built with -fopenmp, this runs on PyTorch's own OpenMP runtime and threads (structlm/native.py). */
#include <math.h>
#include <stdlib.h>

#include "fp.h"

#define LANES 16
#define ROWS 4   /* query rows per block: each key vector loaded is used ROWS times */
#define KEYS 32  /* keys per block: ROWS * KEYS / LANES independent accumulators */

/* s[r * Tp + j] = q4[r] . kt[:, j] for ROWS query rows q4 (ROWS, hs; upcast) and keys
   j < n rounded up to KEYS; kt (hs, Tp) is zero past the last key */
static void scores(const float *restrict q4, const float *restrict kt, float *restrict s,
                   int64_t n, int64_t hs, int64_t Tp) {
  for (int64_t j0 = 0; j0 < n; j0 += KEYS) {
    float acc[ROWS][KEYS] = {{0}};
    for (int64_t d = 0; d < hs; d++) {
      const float *restrict kr = kt + d * Tp + j0;
      for (int r = 0; r < ROWS; r++) {
        const float a = q4[r * hs + d];
        for (int l = 0; l < KEYS; l++) acc[r][l] += a * kr[l];
      }
    }
    for (int r = 0; r < ROWS; r++)
      for (int l = 0; l < KEYS; l++) s[r * Tp + j0 + l] = acc[r][l];
  }
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define PAIRS 1 /* AVX512-BF16: vdpbf16ps multiplies two bf16 pairs exactly and adds in fp32 */

/* scores() from bf16 pairs along the head dimension: qp (ROWS, h2), kp (h2, Tp), each uint32 the
   two bf16 values (2t, 2t + 1); half the multiply-add instructions of the fp32 form */
static void scores_pairs(const uint32_t *restrict qp, const uint32_t *restrict kp,
                         float *restrict s, int64_t n, int64_t h2, int64_t Tp) {
  for (int64_t j0 = 0; j0 < n; j0 += KEYS) {
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t t = 0; t < h2; t++) {
      const uint32_t *kr = kp + t * Tp + j0;
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kr);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kr + LANES);
      for (int r = 0; r < ROWS; r++) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qp[r * h2 + t]);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, k0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, k1);
      }
    }
    for (int r = 0; r < ROWS; r++) {
      _mm512_storeu_ps(s + r * Tp + j0, acc[r][0]);
      _mm512_storeu_ps(s + r * Tp + j0 + LANES, acc[r][1]);
    }
  }
}
#else
#define PAIRS 0
#endif

/* the scores of query rows i0 .. i0 + rows - 1 of one head against keys 0 .. i0 + rows - 1 into
   s (ROWS, Tp); kt holds the head's keys as prepared by prepare_keys, q4 is scratch */
static void block_scores(const uint16_t *restrict qb, const float *restrict kt,
                         float *restrict q4, float *restrict s, int64_t i0, int64_t rows,
                         int64_t hs, int64_t Tp, int pairs) {
  if (pairs) { /* q4 as uint32 pairs (ROWS, hs / 2), straight from the bf16 rows */
#if PAIRS
    uint32_t *qp = (uint32_t *)q4;
    for (int64_t x = 0; x < ROWS * hs / 2; x++) {
      uint32_t v = 0;
      if (x < rows * hs / 2) memcpy(&v, qb + i0 * hs + 2 * x, 4);
      qp[x] = v;
    }
    scores_pairs(qp, (const uint32_t *)kt, s, i0 + rows, hs / 2, Tp);
#endif
    return;
  }
  for (int64_t x = 0; x < ROWS * hs; x++)
    q4[x] = x < rows * hs ? bf16_to_f32(qb[i0 * hs + x]) : 0.0f;
  scores(q4, kt, s, i0 + rows, hs, Tp);
}

/* one head's keys kb (T, hs) into kt: fp32 (hs, Tp), or uint32 bf16 pairs (hs / 2, Tp); zero
   past the last key */
static void prepare_keys(const uint16_t *restrict kb, float *restrict kt, int64_t T, int64_t hs,
                         int64_t Tp, int pairs) {
  if (pairs) {
    uint32_t *kp = (uint32_t *)kt;
    for (int64_t t = 0; t < hs / 2; t++)
      for (int64_t j = 0; j < Tp; j++) {
        uint32_t v = 0;
        if (j < T) memcpy(&v, kb + j * hs + 2 * t, 4);
        kp[t * Tp + j] = v;
      }
    return;
  }
  for (int64_t d = 0; d < hs; d++)
    for (int64_t j = 0; j < Tp; j++) kt[d * Tp + j] = j < T ? bf16_to_f32(kb[j * hs + d]) : 0;
}

/* row[0..T) = bf16(softmax(scale s[0..n))) followed by zeros; s is overwritten */
static void softmax_row(float *restrict s, uint16_t *restrict row, int64_t n, int64_t T,
                        float scale) {
  int64_t nv = (n + LANES - 1) / LANES * LANES;
  for (int64_t j = 0; j < n; j++) s[j] *= scale;
  for (int64_t j = n; j < nv; j++) s[j] = -INFINITY;
  float mx[LANES], sm[LANES];
  for (int l = 0; l < LANES; l++) mx[l] = -INFINITY, sm[l] = 0.0f;
  for (int64_t j0 = 0; j0 < nv; j0 += LANES)
    for (int l = 0; l < LANES; l++) mx[l] = s[j0 + l] > mx[l] ? s[j0 + l] : mx[l];
  float m = mx[0];
  for (int l = 1; l < LANES; l++) m = mx[l] > m ? mx[l] : m;
  for (int64_t j0 = 0; j0 < nv; j0 += LANES)
    for (int l = 0; l < LANES; l++) {
      float e = s[j0 + l] - m < -87.0f ? 0.0f : exp_(s[j0 + l] - m);
      s[j0 + l] = e;
      sm[l] += e;
    }
  float total = 0.0f;
  for (int l = 0; l < LANES; l++) total += sm[l];
  const float inv = 1.0f / total;
  for (int64_t j = 0; j < n; j++) row[j] = f32_to_bf16(s[j] * inv);
  for (int64_t j = n; j < T; j++) row[j] = 0;
}

void causal_probs_bf16(const uint16_t *restrict q, const uint16_t *restrict k,
                       uint16_t *restrict p, int64_t nb, int64_t T, int64_t hs, double scale) {
  const int64_t Tp = (T + KEYS - 1) / KEYS * KEYS;
  const int pairs = PAIRS && hs % 2 == 0;
#pragma omp parallel
  {
    float *kt = malloc(sizeof(float) * hs * Tp);    /* one head's keys (prepare_keys) */
    float *s = malloc(sizeof(float) * ROWS * Tp);   /* (ROWS, Tp) scores */
    float *q4 = malloc(sizeof(float) * ROWS * hs);  /* (ROWS, hs) queries */
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nb; b++) {
      const uint16_t *qb = q + b * T * hs;
      prepare_keys(k + b * T * hs, kt, T, hs, Tp, pairs);
      for (int64_t i0 = 0; i0 < T; i0 += ROWS) {
        const int64_t rows = T - i0 < ROWS ? T - i0 : ROWS;
        block_scores(qb, kt, q4, s, i0, rows, hs, Tp, pairs);
        for (int64_t r = 0; r < rows; r++)
          softmax_row(s + r * Tp, p + (b * T + i0 + r) * T, i0 + r + 1, T, (float)scale);
      }
    }
    free(kt);
    free(s);
    free(q4);
  }
}
