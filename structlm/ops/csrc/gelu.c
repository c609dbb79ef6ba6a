/* The tanh-approximated GELU, forward and backward, for contiguous fp32 and bf16 arrays.

   gelu(x) = x/2 (1 + tanh(c (x + a x^3))) = x sigmoid(z),  z = x (K1 + K3 x^2),  K1 = 2c, K3 = 2ca
   gelu'(x) = s + x s (1 - s) (K1 + 3 K3 x^2),  s = sigmoid(z)

   Every loop is written so that gcc -O3 vectorises it (exp_ included): fp32 arithmetic, bf16
   rounded to nearest even once at the end. Where the compiler targets AVX512-BF16, the bf16
   kernels are written out in AVX512 intrinsics instead, with the same operations in the same
   order (bitwise the same results) and the hardware's rounding to bf16 (vcvtneps2bf16), which
   gcc does not emit from scalar code: the portable rounding was a quarter of the kernel's time.
   structlm/native.py compiles this file on first use with -march=native -fopenmp; the loops are
   shared among PyTorch's own OpenMP threads. */
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


void gelu_bwd_f32(const float *restrict x, const float *restrict g, float *restrict dx, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t i = 0; i < n; i++) dx[i] = gelu_grad(x[i], g[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define VEC 16 /* fp32 lanes */
#define SET(c) _mm512_set1_ps(c)

static inline __m512 exp16(__m512 x) { /* exp_, lane by lane */
  x = _mm512_min_ps(_mm512_max_ps(x, SET(-87.0f)), SET(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, SET(1.4426950408889634f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, SET(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, SET(1.428606765330187e-06f), r);
  __m512 p = SET(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, SET(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, SET(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, SET(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, SET(0.5f));
  p = _mm512_fmadd_ps(p, r, SET(1.0f));
  p = _mm512_fmadd_ps(p, r, SET(1.0f));
  __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}

static inline __m512 gelu16(__m512 x) { /* gelu */
  __m512 z = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(SET(K3), x), x, SET(K1)));
  __m512 y = _mm512_div_ps(x, _mm512_add_ps(SET(1.0f), exp16(_mm512_sub_ps(SET(0.0f), z))));
  y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(z, SET(UNDER), _CMP_LT_OQ), SET(-0.0f));
  return _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask(x, SET(FLAT), _CMP_GT_OQ), x);
}

static inline __m512 gelu_grad16(__m512 x, __m512 g) { /* gelu_grad */
  __m512 one = SET(1.0f), xx = _mm512_mul_ps(x, x);
  __m512 z = _mm512_mul_ps(x, _mm512_fmadd_ps(SET(K3), xx, SET(K1)));
  __m512 s = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(SET(0.0f), z))));
  __m512 q = _mm512_fmadd_ps(SET(3.0f * K3), xx, SET(K1));
  __m512 t = _mm512_mul_ps(x, _mm512_sub_ps(one, s));
  __m512 d = _mm512_mul_ps(_mm512_mul_ps(g, s), _mm512_fmadd_ps(t, q, one));
  d = _mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(z, SET(UNDER), _CMP_LT_OQ), SET(0.0f));
  return _mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(x, SET(FLAT), _CMP_GT_OQ), g);
}

static inline __m512 load16(const uint16_t *p) { /* 16 bf16 -> fp32 (exact) */
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

static inline void store16(uint16_t *p, __m512 v) { /* fp32 -> bf16, to nearest even */
  __mmask16 sub = _mm512_cmp_ps_mask(_mm512_abs_ps(v), SET(1.17549435e-38f), _CMP_LT_OQ) &
                  _mm512_cmp_ps_mask(v, SET(0.0f), _CMP_NEQ_OQ);
  if (sub) { /* vcvtneps2bf16 flushes subnormals to zero; f32_to_bf16 keeps them (rare: |v| <
                2^-126) */
    float t[VEC];
    _mm512_storeu_ps(t, v);
    for (int j = 0; j < VEC; j++) p[j] = f32_to_bf16(t[j]);
    return;
  }
  _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

void gelu_fwd_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t n) {
  int64_t nv = n / VEC;
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t v = 0; v < nv; v++) store16(y + VEC * v, gelu16(load16(x + VEC * v)));
  for (int64_t i = VEC * nv; i < n; i++) y[i] = f32_to_bf16(gelu(bf16_to_f32(x[i])));
}

void gelu_bwd_bf16(const uint16_t *restrict x, const uint16_t *restrict g, uint16_t *restrict dx,
                   int64_t n) {
  int64_t nv = n / VEC;
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t v = 0; v < nv; v++)
    store16(dx + VEC * v, gelu_grad16(load16(x + VEC * v), load16(g + VEC * v)));
  for (int64_t i = VEC * nv; i < n; i++)
    dx[i] = f32_to_bf16(gelu_grad(bf16_to_f32(x[i]), bf16_to_f32(g[i])));
}
#else
void gelu_fwd_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t i = 0; i < n; i++) y[i] = f32_to_bf16(gelu(bf16_to_f32(x[i])));
}

void gelu_bwd_bf16(const uint16_t *restrict x, const uint16_t *restrict g, uint16_t *restrict dx,
                   int64_t n) {
#pragma omp parallel for schedule(static) if (n > PARALLEL_MIN)
  for (int64_t i = 0; i < n; i++)
    dx[i] = f32_to_bf16(gelu_grad(bf16_to_f32(x[i]), bf16_to_f32(g[i])));
}
#endif
