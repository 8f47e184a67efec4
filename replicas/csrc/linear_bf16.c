/* Dense bf16 projection for few rows (decode steps), x86 AVX512-BF16.
 *
 * out [M, N] = x [M, K] . w [N, K]^T, fp32 sums rounded once to bf16, as oneDNN computes it
 * (only the order of the sums inside each dot product differs). For the few rows of a decode
 * step oneDNN's fixed cost per call dominates small models (measured on 2 cores, 30-80 us for a
 * [1, 256] x [256, 768] product whose arithmetic takes a few microseconds), and a large one is
 * bound by reading the weight. This kernel reads each weight row once per 4 rows of x, front to
 * back (simd.h's dot_weight_row: 19 vs 10 GB/s for reading 8 rows side by side, one thread,
 * weights not in cache), and splits the output features over OpenMP threads (the same libgomp
 * as torch's); it forks only when the product is large enough to repay it.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define FEATURES 32      /* output features per work item */
#define FORK_MACS 262144 /* below this many multiply-adds one thread does it all */

void linear_bf16(const uint16_t* x, int m, int k, int n, const uint16_t* w, uint16_t* out,
                 int num_threads) {
  const int items = (n + FEATURES - 1) / FEATURES;
  const int threads = (int64_t)m * k * n < FORK_MACS ? 1 : num_threads;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; item++) {
    const int f0 = item * FEATURES, f1 = f0 + FEATURES < n ? f0 + FEATURES : n;
    for (int r = 0; r < m; r += 4) {
      const int nr = m - r < 4 ? m - r : 4;
      float sums[4];
      for (int f = f0; f < f1; f++) {
        dot_weight_rows(x + (int64_t)r * k, k, nr, w + (int64_t)f * k, k, sums);
        for (int q = 0; q < nr; q++) out[(int64_t)(r + q) * n + f] = f32_to_bf16(sums[q]);
      }
    }
  }
}
