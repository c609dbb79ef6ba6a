/* Scalar helpers shared by structlm's CPU kernels, written so that gcc -O3 vectorises the loops
   that call them: bf16 <-> fp32 (round to nearest even, NaN kept), e^x in fp32, and loads and
   stores by type suffix. */
#ifndef STRUCTLM_FP_H
#define STRUCTLM_FP_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  int nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return nan ? (uint16_t)((u >> 16) | 0x40u) : (uint16_t)rounded;
}

/* e^x for x in [-87, 88] (clamped): 2^n e^r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial
   (relative error < 2e-7); ln2 split in two so that r is exact. */
static inline float exp_(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = (x * 1.4426950408889634f + 12582912.0f) - 12582912.0f; /* round to nearest */
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, 4);
  return p * scale;
}

/* element access by type suffix, for kernels written once for fp32 and bf16 (macros) */
static inline float load_f32(const float *x, int64_t j) { return x[j]; }
static inline float load_bf16(const uint16_t *x, int64_t j) { return bf16_to_f32(x[j]); }
static inline void store_f32(float *y, int64_t j, float v) { y[j] = v; }
static inline void store_bf16(uint16_t *y, int64_t j, float v) { y[j] = f32_to_bf16(v); }

#endif
