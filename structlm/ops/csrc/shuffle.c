/* BlockShuffle's within-row shuffles for a small block count B, for 2- and 4-byte elements.

   Every row of n = rows * B * s elements is an (a, b) matrix transposed to (b, a):
     interleave_B:    a = B, b = s   y[i*B + j] = x[j*s + i]   (B streams of s into one)
     deinterleave_B:  a = s, b = B   y[j*s + i] = x[i*B + j]   (one stream into B of s)
   With B a compile-time constant gcc -O3 vectorises the inner loops with register permutes,
   so each row is read and written once, in order; PyTorch's strided copy of the same permute
   takes ~3x longer (bf16, B = 4). Bits are copied, so the element type is only its width.
   Built with -fopenmp (structlm/native.py), rows are shared among PyTorch's own OpenMP threads. */
#include <stdint.h>

#define PARALLEL_MIN 32768 /* elements below which one thread is faster */

/* one row at a time, rows shared among OpenMP threads: yr[DST] = xr[SRC] over i < s, j < B */
#define SHUFFLE(NAME, T, B, DST, SRC)                                                     \
  void NAME##_##B##_##T(const T *restrict x, T *restrict y, int64_t n, int64_t s) {       \
    const int64_t rows = n / ((int64_t)B * s);                                            \
    _Pragma("omp parallel for schedule(static) if (n > PARALLEL_MIN)")                     \
    for (int64_t row = 0; row < rows; row++) {                                            \
      const T *restrict xr = x + row * B * s;                                             \
      T *restrict yr = y + row * B * s;                                                   \
      for (int64_t i = 0; i < s; i++)                                                     \
        for (int j = 0; j < B; j++) yr[DST] = xr[SRC];                                    \
    }                                                                                     \
  }

#define BOTH(T, B)                                 \
  SHUFFLE(interleave, T, B, i * B + j, j * s + i) \
  SHUFFLE(deinterleave, T, B, j * s + i, i * B + j)

BOTH(uint16_t, 2)
BOTH(uint16_t, 4)
BOTH(uint16_t, 8)
BOTH(uint16_t, 16)
BOTH(uint32_t, 2)
BOTH(uint32_t, 4)
BOTH(uint32_t, 8)
BOTH(uint32_t, 16)
