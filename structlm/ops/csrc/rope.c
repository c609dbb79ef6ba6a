/* The fused QKV projection's output split into heads, with RoPE on the queries and keys, in one
   pass each way, for contiguous fp32 and bf16 tensors (halves layout).

     forward:   qkv (B, T, (nq + 2 nkv) hs)  ->  q (B, nq, T, hs), k (B, nkv, T, hs), v (same)
                q, k rotated by the angles of their position:  [x1 c - x2 s | x2 c + x1 s]
     backward:  dq, dk, dv  ->  dqkv, the inverse rotation (angle -θ) on dq and dk

   c, s are the first halves of cos, sin (T, hs), fp32. The products and sums are fp32, one rounding
   at the end, as structlm/model.py's _rotate_halves. Rows (b, t) are shared among PyTorch's own
   OpenMP threads (built with -fopenmp, structlm/native.py). */
#include <stdint.h>

#include "fp.h"

/* y[0..hs) = x rotated by (c, s[i] * sign); x, y may be strided differently but are rows */
#define ROTATE(T, SUF)                                                                       \
  static inline void rotate_##SUF(const T *restrict x, T *restrict y, const float *restrict c, \
                                  const float *restrict s, float sign, int64_t hs) {          \
    const int64_t h = hs / 2;                                                               \
    for (int64_t i = 0; i < h; i++) {                                                       \
      float x1 = load_##SUF(x, i), x2 = load_##SUF(x, i + h), si = sign * s[i];            \
      store_##SUF(y, i, x1 * c[i] - x2 * si);                                               \
      store_##SUF(y, i + h, x2 * c[i] + x1 * si);                                           \
    }                                                                                       \
  }

/* one direction: qkv row (b, t) <-> heads; FWD 1 reads qkv and writes q, k, v */
#define QKV(T, SUF, NAME, FWD, SIGN)                                                         \
  void NAME##_##SUF(T *restrict qkv, T *restrict q, T *restrict k, T *restrict v,           \
                    const float *restrict cos, const float *restrict sin, int64_t B,         \
                    int64_t L, int64_t nq, int64_t nkv, int64_t hs) {                       \
    const int64_t width = (nq + 2 * nkv) * hs;                                              \
    _Pragma("omp parallel for schedule(static) if (B * L > 16)")                            \
    for (int64_t bt = 0; bt < B * L; bt++) {                                                 \
      const int64_t b = bt / L, t = bt % L;                                                 \
      T *restrict row = qkv + bt * width;                                                   \
      const float *c = cos + t * hs, *s = sin + t * hs;                                     \
      for (int64_t h = 0; h < nq + 2 * nkv; h++) {                                          \
        T *part = h < nq ? q + ((b * nq + h) * L + t) * hs                                  \
                : h < nq + nkv ? k + ((b * nkv + h - nq) * L + t) * hs                      \
                : v + ((b * nkv + h - nq - nkv) * L + t) * hs;                              \
        T *src = FWD ? row + h * hs : part, *dst = FWD ? part : row + h * hs;               \
        if (h < nq + nkv)                                                                   \
          rotate_##SUF(src, dst, c, s, SIGN, hs);                                           \
        else                                                                                \
          for (int64_t i = 0; i < hs; i++) dst[i] = src[i];                                 \
      }                                                                                     \
    }                                                                                       \
  }

#define BOTH(T, SUF)                         \
  ROTATE(T, SUF)                             \
  QKV(T, SUF, qkv_rope_fwd, 1, 1.0f)         \
  QKV(T, SUF, qkv_rope_bwd, 0, -1.0f)

BOTH(float, f32)
BOTH(uint16_t, bf16)
