/* Dense bf16 projection for few rows (decode steps), x86 AVX512-BF16.
 *
 * out [M, N] = x [M, K] . w [N, K]^T, fp32 sums rounded once to bf16, as oneDNN computes it
 * (only the order of the sums inside each dot product differs). For the few rows of a decode
 * step oneDNN's fixed cost per call dominates small models: measured on 2 cores, 30-80 us for a
 * [1, 256] x [256, 768] product whose arithmetic takes a few microseconds. This kernel streams
 * the weight once per 4 rows and splits the output features over OpenMP threads (the same
 * libgomp as torch's); it forks only when the product is large enough to repay it.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define FEATURES 32      /* output features per work item */
#define FORK_MACS 262144 /* below this many multiply-adds one thread does it all */

/* out[r, f .. f+NF] for rows r < NR, NR * NF <= 16 accumulators: NF weight rows are loaded once
 * per 32 inputs and used for every row, and the NR * NF independent sums hide the latency of the
 * dot-product instruction. Constant NR/NF: the compiler unrolls each variant. */
static inline __attribute__((always_inline)) void tile(const uint16_t* x, int k, const int NR,
                                                       const uint16_t* w, int f, const int NF,
                                                       uint16_t* out, int n) {
  __m512 c[16];
  for (int t = 0; t < NR * NF; t++) c[t] = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= k; i += 32) {
    __m512bh wv[8];
    for (int j = 0; j < NF; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + (int64_t)(f + j) * k + i);
    for (int r = 0; r < NR; r++) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (int64_t)r * k + i);
      for (int j = 0; j < NF; j++) c[r * NF + j] = _mm512_dpbf16_ps(c[r * NF + j], xv, wv[j]);
    }
  }
  for (int r = 0; r < NR; r++)
    for (int j = 0; j < NF; j++) {
      float s = _mm512_reduce_add_ps(c[r * NF + j]);
      for (int q = i; q < k; q++) /* tail when k is not a multiple of 32 */
        s += bf16_to_f32(x[(int64_t)r * k + q]) * bf16_to_f32(w[(int64_t)(f + j) * k + q]);
      out[(int64_t)r * n + f + j] = f32_to_bf16(s);
    }
}

/* rows r0 .. r0+nr (nr <= 4) at features f0 .. f1 */
static void block(const uint16_t* x, int k, int nr, const uint16_t* w, int f0, int f1,
                  uint16_t* out, int n) {
  int f = f0;
  if (nr == 4)
    for (; f + 4 <= f1; f += 4) tile(x, k, 4, w, f, 4, out, n);
  else if (nr >= 2)
    for (; f + 4 <= f1; f += 4) {
      tile(x, k, 2, w, f, 4, out, n);
      if (nr == 3) tile(x + 2 * (int64_t)k, k, 1, w, f, 4, out + 2 * (int64_t)n, n);
    }
  else
    for (; f + 8 <= f1; f += 8) tile(x, k, 1, w, f, 8, out, n);
  for (; f < f1; f++) /* features left over */
    for (int r = 0; r < nr; r++) tile(x + (int64_t)r * k, k, 1, w, f, 1, out + (int64_t)r * n, n);
}

void linear_bf16(const uint16_t* x, int m, int k, int n, const uint16_t* w, uint16_t* out,
                 int num_threads) {
  const int items = (n + FEATURES - 1) / FEATURES;
  const int threads = (int64_t)m * k * n < FORK_MACS ? 1 : num_threads;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; item++) {
    const int f0 = item * FEATURES, f1 = f0 + FEATURES < n ? f0 + FEATURES : n;
    for (int r = 0; r < m; r += 4)
      block(x + (int64_t)r * k, k, m - r < 4 ? m - r : 4, w, f0, f1, out + (int64_t)r * n, n);
  }
}
