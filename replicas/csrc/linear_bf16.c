/* Dense bf16 projection for the rows of a decode step, x86 AVX512-BF16.
 *
 * out [M, N] = x [M, K] . w [N, K]^T, fp32 sums rounded once to bf16, as oneDNN computes it
 * (only the order of the sums inside each dot product differs). oneDNN's fixed cost per call
 * dominates small models' decode (30-80 us for a [1, 256] x [256, 768] product whose arithmetic
 * takes a few microseconds). Two loops, by what bounds the product:
 * - few rows (<= STREAM_MAX_ROWS) of a weight too large for the cache: each weight row is read
 *   once per 4 rows of x, front to back, alone (simd.h's dot_weight_row: one sequential stream
 *   keeps the prefetcher ahead; 19 vs 10 GB/s for 8 rows side by side, one thread, cold);
 * - otherwise tiles of 4 rows x 4 output features: 16 fp32 accumulators, each weight and input
 *   chunk loaded once per tile, the 16 dot products summed across lanes together (reduce16).
 *   Measured on 2 cores (AMD Zen 4), one thread, us per call summed over the bundled model's 7
 *   projection shapes, tiles vs one row at a time vs oneDNN: 8 rows 214 / 502 / 361, 16 rows
 *   404 / 921 / 505, 32 rows 761 / 2191 / 730; two threads, 16 rows 224 / 591 / 470.
 * In both, a row's result does not depend on which other rows share the call. The output
 * features are split over OpenMP threads (the same libgomp as torch's) when the product is
 * large enough to repay the fork.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define FEATURES 32               /* output features per work item */
#define FORK_MACS 262144          /* below this many multiply-adds one thread does it all */
#define STREAM_MAX_ROWS 4         /* rows up to which a large weight is streamed row by row */
#define STREAM_MIN_BYTES (1 << 20) /* weights larger than this are not expected in cache */

/* 16 fp32 vectors -> one vector whose lane j is the sum of v[j]'s 16 lanes. The additions form
 * the same tree for every j. */
static inline __m512 reduce16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++) {
    const __m512d p = _mm512_castps_pd(a[2 * i]), q = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
  }
  for (int i = 0; i < 2; i++)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* sums[4 * r + f] = x[r] . w[f] for r < NR rows of x (ldx apart) and the 4 weight rows w[f],
 * over k values; a chunk past the last whole 32 values is read masked (zeros). */
static inline __attribute__((always_inline)) void tile(const uint16_t* x, int64_t ldx,
                                                       const int NR, const uint16_t* const w[4],
                                                       int k, float* sums) {
  __m512 c[16];
  for (int j = 0; j < 16; j++) c[j] = _mm512_setzero_ps();
  for (int i = 0; i < k; i += 32) {
    const __mmask32 m = k - i >= 32 ? ~(__mmask32)0 : (__mmask32)((1u << (k - i)) - 1);
    __m512bh wv[4];
    for (int f = 0; f < 4; f++) wv[f] = (__m512bh)_mm512_maskz_loadu_epi16(m, w[f] + i);
    for (int r = 0; r < NR; r++) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * ldx + i);
      for (int f = 0; f < 4; f++) c[4 * r + f] = _mm512_dpbf16_ps(c[4 * r + f], xv, wv[f]);
    }
  }
  _mm512_storeu_ps(sums, reduce16(c));
}

static void tiled_features(const uint16_t* x, int m, int k, int n, const uint16_t* w,
                           uint16_t* out, int f0, int f1) {
  for (int r = 0; r < m; r += 4) {
    const int nr = m - r < 4 ? m - r : 4;
    const uint16_t* xr = x + (int64_t)r * k;
    for (int f = f0; f < f1; f += 4) {
      const int nf = f1 - f < 4 ? f1 - f : 4;
      const uint16_t* rows[4];
      for (int q = 0; q < 4; q++) rows[q] = w + (int64_t)(f + (q < nf ? q : nf - 1)) * k;
      float sums[16];
      switch (nr) {
        case 1: tile(xr, k, 1, rows, k, sums); break;
        case 2: tile(xr, k, 2, rows, k, sums); break;
        case 3: tile(xr, k, 3, rows, k, sums); break;
        default: tile(xr, k, 4, rows, k, sums); break;
      }
      for (int q = 0; q < nr; q++)
        for (int g = 0; g < nf; g++) out[(int64_t)(r + q) * n + f + g] = f32_to_bf16(sums[4 * q + g]);
    }
  }
  (void)n;
}

static void streamed_features(const uint16_t* x, int m, int k, int n, const uint16_t* w,
                              uint16_t* out, int f0, int f1) {
  for (int r = 0; r < m; r += 4) {
    const int nr = m - r < 4 ? m - r : 4;
    float sums[4];
    for (int f = f0; f < f1; f++) {
      dot_weight_rows(x + (int64_t)r * k, k, nr, w + (int64_t)f * k, k, sums);
      for (int q = 0; q < nr; q++) out[(int64_t)(r + q) * n + f] = f32_to_bf16(sums[q]);
    }
  }
}

void linear_bf16(const uint16_t* x, int m, int k, int n, const uint16_t* w, uint16_t* out,
                 int num_threads) {
  const int items = (n + FEATURES - 1) / FEATURES;
  const int threads = (int64_t)m * k * n < FORK_MACS ? 1 : num_threads;
  const int stream = m <= STREAM_MAX_ROWS && (int64_t)n * k * 2 > STREAM_MIN_BYTES;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; item++) {
    const int f0 = item * FEATURES, f1 = f0 + FEATURES < n ? f0 + FEATURES : n;
    if (stream)
      streamed_features(x, m, k, n, w, out, f0, f1);
    else
      tiled_features(x, m, k, n, w, out, f0, f1);
  }
}
