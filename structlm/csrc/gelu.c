/* The tanh-approximated GELU, forward and backward, for contiguous fp32 and bf16 arrays.

   gelu(x) = x/2 (1 + tanh(c (x + a x^3))) = x sigmoid(z),  z = x (K1 + K3 x^2),  K1 = 2c, K3 = 2ca
   gelu'(x) = s + x s (1 - s) (K1 + 3 K3 x^2),  s = sigmoid(z)

   Every loop is written so that gcc -O3 vectorises it (exp_ included): fp32 arithmetic, bf16
   rounded to nearest even once at the end. structlm/native.py compiles this file on first use
   with -march=native -fopenmp; the loops are shared among PyTorch's own OpenMP threads. */
#include "fp.h"

#define K1 1.5957691216057308f
#define K3 0.0713548162726009f
#define FLAT 20.0f  /* above x = 20, gelu(x) = x and gelu'(x) = 1 in fp32 */
#define PARALLEL_MIN 32768 /* elements below which one thread is faster */
#define UNDER -87.0f /* below z = -87 (x < -10.05), |gelu(x)| < 2e-37 and gelu'(x) < 1e-35: 0 */

static inline float gelu(float x) {
  float z = x * (K1 + K3 * x * x);
  float y = x / (1.0f + exp_(-z));
  y = z < UNDER ? -0.0f : y;
  return x > FLAT ? x : y;
}

static inline float gelu_grad(float x, float g) {
  float xx = x * x;
  float z = x * (K1 + K3 * xx);
  float s = 1.0f / (1.0f + exp_(-z));
  float d = g * s * (1.0f + x * (1.0f - s) * (K1 + 3.0f * K3 * xx));
  d = z < UNDER ? 0.0f : d;
  return x > FLAT ? g : d;
}

void gelu_fwd_f32(const float *restrict x, float *restrict y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t i = 0; i < n; i++) y[i] = gelu(x[i]);
}

void gelu_fwd_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t i = 0; i < n; i++) y[i] = f32_to_bf16(gelu(bf16_to_f32(x[i])));
}

void gelu_bwd_f32(const float *restrict x, const float *restrict g, float *restrict dx, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t i = 0; i < n; i++) dx[i] = gelu_grad(x[i], g[i]);
}

void gelu_bwd_bf16(const uint16_t *restrict x, const uint16_t *restrict g, uint16_t *restrict dx,
                   int64_t n) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t i = 0; i < n; i++)
    dx[i] = f32_to_bf16(gelu_grad(bf16_to_f32(x[i]), bf16_to_f32(g[i])));
}
