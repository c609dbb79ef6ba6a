/* Cross-entropy over rows of logits, one pass each way, for contiguous fp32 and bf16 logits.

     forward:   lse[r] = log sum_j e^x[r, j]                                 x: (n, V), lse: (n,)
     backward:  dx[r, j] = (e^(x[r, j] - lse[r]) - [j == t[r]]) * w[r]        w: (n,) row weights

   Everything in fp32 (bf16 logits upcast on load, the gradient rounded once to bf16); the sums
   keep LANES partial results so that gcc -O3 vectorises them, e^x is fp.h's. Rows are shared
   among PyTorch's own OpenMP threads (built with -fopenmp, structlm/native.py). */
#include <math.h>

#include "fp.h"

#define LANES 16
#define PARALLEL_MIN 8 /* rows below which one thread is faster */

/* log-sum-exp of one row: max, then the sum of e^(x - max), LANES partials each */
#define LSE_ROW(T, SUF)                                                                  \
  static float lse_row_##SUF(const T *restrict x, int64_t V) {                           \
    float mx[LANES], sm[LANES];                                                          \
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY, sm[l] = 0.0f;                     \
    int64_t Vv = V / LANES * LANES;                                                      \
    for (int64_t j0 = 0; j0 < Vv; j0 += LANES)                                           \
      for (int l = 0; l < LANES; l++) {                                                  \
        float v = load_##SUF(x, j0 + l);                                                 \
        mx[l] = v > mx[l] ? v : mx[l];                                                   \
      }                                                                                  \
    float m = -INFINITY;                                                                 \
    for (int l = 0; l < LANES; l++) m = mx[l] > m ? mx[l] : m;                           \
    for (int64_t j = Vv; j < V; j++) m = load_##SUF(x, j) > m ? load_##SUF(x, j) : m;    \
    if (m == -INFINITY || m == INFINITY || m != m) return m; /* all -inf, inf or NaN */ \
    for (int64_t j0 = 0; j0 < Vv; j0 += LANES)                                           \
      for (int l = 0; l < LANES; l++) sm[l] += exp_(load_##SUF(x, j0 + l) - m);          \
    float total = 0.0f;                                                                  \
    for (int l = 0; l < LANES; l++) total += sm[l];                                      \
    for (int64_t j = Vv; j < V; j++) total += exp_(load_##SUF(x, j) - m);                \
    return m + logf(total);                                                              \
  }

/* e^z for z = x - lse <= 0: exactly 0 below e^-87 (masked, -inf logits included) */
static inline float prob(float z) { return z < -87.0f ? 0.0f : exp_(z); }

#define XENT(T, SUF)                                                                      \
  LSE_ROW(T, SUF)                                                                         \
  void xent_lse_##SUF(const T *restrict x, float *restrict lse, int64_t n, int64_t V) {   \
    _Pragma("omp parallel for schedule(static) if (n > PARALLEL_MIN)")                    \
    for (int64_t r = 0; r < n; r++) lse[r] = lse_row_##SUF(x + r * V, V);                 \
  }                                                                                       \
  void xent_grad_##SUF(const T *restrict x, const float *restrict lse,                    \
                       const int64_t *restrict t, const float *restrict w, T *restrict dx, \
                       int64_t n, int64_t V) {                                            \
    _Pragma("omp parallel for schedule(static) if (n > PARALLEL_MIN)")                    \
    for (int64_t r = 0; r < n; r++) {                                                     \
      const T *restrict xr = x + r * V;                                                   \
      T *restrict dr = dx + r * V;                                                        \
      const float l = lse[r], wr = w[r];                                                  \
      for (int64_t j = 0; j < V; j++) store_##SUF(dr, j, prob(load_##SUF(xr, j) - l) * wr); \
      store_##SUF(dr, t[r], (prob(load_##SUF(xr, t[r]) - l) - 1.0f) * wr);               \
    }                                                                                     \
  }

XENT(float, f32)
XENT(uint16_t, bf16)
