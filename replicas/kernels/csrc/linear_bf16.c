/* Dense bf16 projection for the rows of a decode step, x86 AVX512-BF16 or AVX2 (simd.h).
 *
 * out [M, N] = x [M, K] . w [N, K]^T, fp32 sums rounded once to bf16, as oneDNN computes it
 * (only the order of the sums inside each dot product differs). oneDNN's fixed cost per call
 * dominates small models' decode (30-80 us for a [1, 256] x [256, 768] product whose arithmetic
 * takes a few microseconds). Two loops, by what bounds the product:
 * - few rows (<= STREAM_MAX_ROWS): bound by reading the weight, which between a decode step's
 *   calls has left the core's caches. Each weight row is read once per 4 rows of x, front to
 *   back, alone (simd.h's dot_weight_row: one sequential stream keeps the prefetcher ahead;
 *   19 vs 10 GB/s for 8 rows side by side, one thread, cold). In the bundled model's decode
 *   step at one sequence, tiles were slower here though faster on weights kept in cache;
 * - otherwise tiles of 4 rows x 4 output features: 16 fp32 accumulators, each weight and input
 *   chunk loaded once per tile, the 16 dot products summed across lanes together (reduce16).
 *   Measured on 2 cores (AMD Zen 4), one thread, us per call summed over the bundled model's 7
 *   projection shapes, tiles vs one row at a time vs oneDNN: 8 rows 214 / 502 / 361, 16 rows
 *   404 / 921 / 505, 32 rows 761 / 2191 / 730; two threads, 16 rows 224 / 591 / 470.
 * In both, a row's result does not depend on which other rows share the call. The output
 * features are split over OpenMP threads (the same libgomp as torch's) when the product is
 * large enough to repay the fork.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fp8.h"
#include "simd.h"

#define FEATURES 32               /* output features per work item */
#define FORK_MACS 262144          /* below this many multiply-adds one thread does it all */
#define STREAM_MAX_ROWS 4 /* rows up to which each weight row is streamed alone */

void linear_bf16(const uint16_t* x, int m, int k, int n, const uint16_t* w, uint16_t* out,
                 int num_threads) {
  const int items = (n + FEATURES - 1) / FEATURES;
  const int threads = (int64_t)m * k * n < FORK_MACS ? 1 : num_threads;
  const int stream = m <= STREAM_MAX_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int item = 0; item < items; item++) {
    const int f0 = item * FEATURES, f1 = f0 + FEATURES < n ? f0 + FEATURES : n;
    for (int r = 0; r < m; r += 4) {
      const int nr = m - r < 4 ? m - r : 4;
      const uint16_t* xr = x + (int64_t)r * k;
      if (stream)
        project_streamed(xr, k, nr, w, k, f0, f1, out + (int64_t)r * n, n);
      else
        project_tiled(xr, k, nr, w, k, f0, f1, out + (int64_t)r * n, n);
    }
  }
}

/* ---- PyTorch's order on AVX2 -------------------------------------------------------------
 * On a CPU without AVX512-BF16 PyTorch's bf16 matmul is its own vectorized dot product per
 * output (no oneDNN), about 2.4 G multiply-adds a second on one core of our AVX2 machines, and
 * the packed kernel's sums are not its: linear_bf16_torch takes the rows the AVX512 build gives
 * the packed kernel, computing each output as PyTorch does (dot_bf16), so the results are
 * F.linear's bit for bit there (checked on 66,576 outputs of 16 shapes, one and two threads),
 * and a colocated step of up to 64 rows stays in C (decode_step.c). The AVX2 build's only. */
#ifndef EXAONE_AVX512
/* a . b over n bf16 values in PyTorch's own order for bf16 dot products on AVX2 CPUs (torch
 * 2.13's dot_with_fp32_arith, which its bf16 matmul runs there, F.linear's gemv and gemm alike):
 * 8 fp32 accumulators of 8 lanes over 64-value blocks (accumulator j takes values 8j .. 8j + 7 of
 * each block, one fused multiply-add each), summed 4 + 4, 2 + 2, 1 + 1 and across lanes
 * (vec_reduce_all's tree: halves, pairs of pairs, pairs), then 16-value chunks into one more
 * accumulator (low 8 values, then high 8), summed the same way and added, then one value at a
 * time. */
static inline float hsum8(__m256 v) {
  v = _mm256_add_ps(v, _mm256_permute2f128_ps(v, v, 1));
  v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
  v = _mm256_add_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
  return _mm256_cvtss_f32(v);
}
/* the 8 accumulators of dot_bf16's 64-value blocks summed as it sums them */
static inline float sum_blocks(__m256 acc[8]) {
  for (int i = 0; i < 4; i++) acc[i] = _mm256_add_ps(acc[i], acc[i + 4]);
  for (int i = 0; i < 2; i++) acc[i] = _mm256_add_ps(acc[i], acc[i + 2]);
  return hsum8(_mm256_add_ps(acc[0], acc[1]));
}
/* sum (the blocks' total) plus a . b over the n values past the last whole block, as dot_bf16
 * adds them: 16-value chunks into one accumulator, then one value at a time */
static inline float add_tail(float sum, const uint16_t* a, const uint16_t* b, int n) {
  const int chunks = n & ~15;
  __m256 tail = _mm256_setzero_ps();
  for (int j = 0; j < chunks; j += 16) {
    const vf16 av = vf_from_bf16(a + j), bv = vf_from_bf16(b + j);
    tail = _mm256_fmadd_ps(av.hi, bv.hi, _mm256_fmadd_ps(av.lo, bv.lo, tail));
  }
  sum = sum + hsum8(tail);
  for (int j = chunks; j < n; j++) sum = sum + bf16_to_f32(a[j]) * bf16_to_f32(b[j]);
  return sum;
}
static inline float dot_bf16(const uint16_t* a, const uint16_t* b, int n) {
  __m256 acc[8];
  for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
  const int blocks = n & ~63;
  for (int j = 0; j < blocks; j += 64)
    for (int q = 0; q < 4; q++) {
      const vf16 av = vf_from_bf16(a + j + 16 * q), bv = vf_from_bf16(b + j + 16 * q);
      acc[2 * q] = _mm256_fmadd_ps(av.lo, bv.lo, acc[2 * q]);
      acc[2 * q + 1] = _mm256_fmadd_ps(av.hi, bv.hi, acc[2 * q + 1]);
    }
  return add_tail(sum_blocks(acc), a + blocks, b + blocks, n - blocks);
}

/* out [m, ldo] features f0 .. f1 = x [m, k] . w[f]^T, dot_bf16 per output */
static void torch_order_dots(const uint16_t* x, int m, int k, const uint16_t* w, int f0, int f1,
                             uint16_t* out, int64_t ldo) {
  for (int f = f0; f < f1; f++)
    for (int r = 0; r < m; r++)
      out[(int64_t)r * ldo + f] = f32_to_bf16(dot_bf16(x + (int64_t)r * k, w + (int64_t)f * k, k));
}

/* Many rows: the same sums, tiled. Each of dot_bf16's 64 fp32 lanes (accumulator j, lane l)
 * sums the values 64b + 8j + l of every block b in block order, independently of the others,
 * so a tile of TILE_ROWS rows x TILE_FEATURES features takes one accumulator j at a time for
 * all its outputs (12 registers), over all blocks, then sums the 8 per output as dot_bf16
 * does: the same fused multiply-adds in the same order, only interleaved differently. Rows and
 * weight rows are widened to fp32 first, accumulator-major ([j][block][8 lanes]: the loads
 * of one pass are sequential), a row tile and the weight rows of a work item at a time. */
#define TILE_ROWS 4
#define TILE_FEATURES 3
#define TILE_MIN_ROWS 4 /* rows from which the tiled loops run (fewer: dot_bf16 per output) */

/* dst [nr][8 j][nb][8] = src rows [nr, ld] bf16, values 64b + 8j + l of each row's nb blocks */
static void widen_blocks(const uint16_t* src, int64_t ld, int nr, int nb, float* dst) {
  const int64_t row = (int64_t)nb * 64, lane_group = (int64_t)nb * 8;
  for (int r = 0; r < nr; r++)
    for (int b = 0; b < nb; b++)
      for (int q = 0; q < 4; q++) {
        const vf16 v = vf_from_bf16(src + r * ld + 64 * b + 16 * q);
        _mm256_storeu_ps(dst + r * row + 2 * q * lane_group + 8 * b, v.lo);
        _mm256_storeu_ps(dst + r * row + (2 * q + 1) * lane_group + 8 * b, v.hi);
      }
}

/* part [nr][TILE_FEATURES][8 j][8] = accumulator j of each output of the tile, xs / ws
 * widen_blocks' rows (nr and nf constants once inlined: the accumulators stay in registers) */
static inline __attribute__((always_inline)) void block_sums(const float* xs, int nr,
                                                               const float* ws, int nf, int nb,
                                                               float* part) {
  const int64_t row = (int64_t)nb * 64;
  for (int j = 0; j < 8; j++) {
    __m256 acc[TILE_ROWS][TILE_FEATURES];
    for (int r = 0; r < nr; r++)
      for (int f = 0; f < nf; f++) acc[r][f] = _mm256_setzero_ps();
    const float* xj = xs + (int64_t)j * nb * 8;
    const float* wj = ws + (int64_t)j * nb * 8;
    for (int b = 0; b < nb; b++) {
      __m256 wv[TILE_FEATURES];
      for (int f = 0; f < nf; f++) wv[f] = _mm256_loadu_ps(wj + f * row + 8 * b);
      for (int r = 0; r < nr; r++) {
        const __m256 xv = _mm256_loadu_ps(xj + r * row + 8 * b);
        for (int f = 0; f < nf; f++) acc[r][f] = _mm256_fmadd_ps(xv, wv[f], acc[r][f]);
      }
    }
    for (int r = 0; r < nr; r++)
      for (int f = 0; f < nf; f++)
        _mm256_storeu_ps(part + ((r * TILE_FEATURES + f) * 8 + j) * 8, acc[r][f]);
  }
}

#define BLOCK_SUMS_CASE(R, F) \
  case (R) * 4 + (F):         \
    block_sums(xs, R, ws, F, nb, part); \
    break;
static void block_sums_any(const float* xs, int nr, const float* ws, int nf, int nb,
                           float* part) {
  switch (nr * 4 + nf) {
    BLOCK_SUMS_CASE(1, 1) BLOCK_SUMS_CASE(1, 2) BLOCK_SUMS_CASE(1, 3)
    BLOCK_SUMS_CASE(2, 1) BLOCK_SUMS_CASE(2, 2) BLOCK_SUMS_CASE(2, 3)
    BLOCK_SUMS_CASE(3, 1) BLOCK_SUMS_CASE(3, 2) BLOCK_SUMS_CASE(3, 3)
    BLOCK_SUMS_CASE(4, 1) BLOCK_SUMS_CASE(4, 2) BLOCK_SUMS_CASE(4, 3)
  }
}

/* out [m, ldo] features f0 .. f1 = x [m, k] . w[f]^T in dot_bf16's order, tiled; xs / ws the
 * caller's scratch for TILE_ROWS widened rows and f1 - f0 widened weight rows */
static void torch_order_tiles(const uint16_t* x, int m, int k, const uint16_t* w, int f0, int f1,
                              uint16_t* out, int64_t ldo, float* xs, float* ws) {
  const int nb = k / 64, blocks = nb * 64;
  const int64_t row = (int64_t)nb * 64;
  float part[TILE_ROWS * TILE_FEATURES * 64];
  widen_blocks(w + (int64_t)f0 * k, k, f1 - f0, nb, ws);
  for (int r = 0; r < m; r += TILE_ROWS) {
    const int nr = m - r < TILE_ROWS ? m - r : TILE_ROWS;
    widen_blocks(x + (int64_t)r * k, k, nr, nb, xs);
    for (int f = f0; f < f1; f += TILE_FEATURES) {
      const int nf = f1 - f < TILE_FEATURES ? f1 - f : TILE_FEATURES;
      block_sums_any(xs, nr, ws + (f - f0) * row, nf, nb, part);
      for (int q = 0; q < nr; q++)
        for (int c = 0; c < nf; c++) {
          __m256 acc[8];
          for (int j = 0; j < 8; j++)
            acc[j] = _mm256_loadu_ps(part + ((q * TILE_FEATURES + c) * 8 + j) * 8);
          const uint16_t* xr = x + (int64_t)(r + q) * k + blocks;
          const uint16_t* wr = w + (int64_t)(f + c) * k + blocks;
          out[(int64_t)(r + q) * ldo + f + c] =
              f32_to_bf16(add_tail(sum_blocks(acc), xr, wr, k - blocks));
        }
    }
  }
}

/* one work item of either: tiles when there are rows enough and scratch, else dots */
static void torch_order_item(const uint16_t* x, int m, int k, const uint16_t* w, int f0, int f1,
                             uint16_t* out, int64_t ldo, float* xs, float* ws) {
  if (m >= TILE_MIN_ROWS && xs != NULL && ws != NULL)
    torch_order_tiles(x, m, k, w, f0, f1, out, ldo, xs, ws);
  else
    torch_order_dots(x, m, k, w, f0, f1, out, ldo);
}

static float* widened_rows(int rows, int k) { /* scratch for widen_blocks, or NULL */
  return malloc(sizeof(float) * (size_t)(k / 64) * 64 * rows + 64);
}

void linear_bf16_torch(const uint16_t* x, int m, int k, int n, const uint16_t* w, uint16_t* out,
                       int num_threads) {
  const int items = (n + FEATURES - 1) / FEATURES;
  const int threads = (int64_t)m * k * n < FORK_MACS ? 1 : num_threads;
#pragma omp parallel num_threads(threads)
  {
    float* xs = m >= TILE_MIN_ROWS ? widened_rows(TILE_ROWS, k) : NULL;
    float* ws = m >= TILE_MIN_ROWS ? widened_rows(FEATURES, k) : NULL;
#pragma omp for schedule(static)
    for (int item = 0; item < items; item++) {
      const int f0 = item * FEATURES, f1 = f0 + FEATURES < n ? f0 + FEATURES : n;
      torch_order_item(x, m, k, w, f0, f1, out, n, xs, ws);
    }
    free(xs);
    free(ws);
  }
}

/* linear_bf16_torch per expert: x [R, K] rows grouped by expert (expert e owns rows offsets[e]
 * .. offsets[e + 1]), w [E, N, K] -> out [R, N], each row by its expert's weight, every output
 * F.linear's on AVX2 bit for bit (so torch._grouped_mm's, which runs one such product per
 * expert). Work items are (expert, block of FEATURES outputs), handed out as threads free up
 * (experts' row counts differ). */
void grouped_linear_bf16_torch(const uint16_t* x, const int64_t* offsets, int e, int k, int n,
                               const uint16_t* w, uint16_t* out, int num_threads) {
  const int blocks = (n + FEATURES - 1) / FEATURES, items = e * blocks;
  const int threads = (offsets[e] - offsets[0]) * k * (int64_t)n < FORK_MACS ? 1 : num_threads;
#pragma omp parallel num_threads(threads)
  {
    float* xs = widened_rows(TILE_ROWS, k);
    float* ws = widened_rows(FEATURES, k);
#pragma omp for schedule(dynamic)
    for (int item = 0; item < items; item++) {
      const int ex = item / blocks, f0 = item % blocks * FEATURES;
      const int f1 = f0 + FEATURES < n ? f0 + FEATURES : n;
      const int64_t r0 = offsets[ex], rows = offsets[ex + 1] - r0;
      if (rows > 0)
        torch_order_item(x + r0 * k, (int)rows, k, w + (int64_t)ex * n * k, f0, f1,
                         out + r0 * n, n, xs, ws);
    }
    free(xs);
    free(ws);
  }
}
#endif

#ifdef EXAONE_FP8_LOOKUP
/* linear_fp8's streamed rows when blocks span a multiple of 64 columns: every block's table
 * first (fp8.h), then each weight row dequantized in registers as it is read (dot_fp8_row), the
 * same sums as project_streamed on the dequantized weight. Returns 1 when the tables cannot be
 * had. */
static int linear_fp8_lookup(const uint16_t* x, int m, int k, int n, const uint8_t* w,
                             const float* scale, int br, int bc, uint16_t* out, int threads) {
  const int items = (n + FEATURES - 1) / FEATURES;
  const int64_t grid_rows = (n + br - 1) / br, grid_cols = (k + bc - 1) / bc;
  uint8_t* tables = malloc((size_t)FP8_TABLE_BYTES * grid_rows * grid_cols);
  if (tables == NULL) return 1;
  const __m512i order = fp8_order();
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < grid_rows; g++)
      fp8_tables(scale + g * grid_cols, grid_cols,
                 tables + (int64_t)FP8_TABLE_BYTES * grid_cols * g);
#pragma omp for schedule(static)
    for (int item = 0; item < items; item++) {
      const int f0 = item * FEATURES, f1 = f0 + FEATURES < n ? f0 + FEATURES : n;
      for (int r = 0; r < m; r += 4) {
        const int nr = m - r < 4 ? m - r : 4;
        project_fp8(x + (int64_t)r * k, k, nr, w, k, tables, grid_cols, br, bc, order, f0, f1,
                    out + (int64_t)r * n, n);
      }
    }
  }
  free(tables);
  return 0;
}
#endif

/* linear_bf16 on a block-wise FP8 weight w [N, K] e4m3 with scale [ceil(N / br), ceil(K / bc)]:
 * each group of 4 output features is dequantized into a bf16 scratch of its thread (fp8.h)
 * and run through the same loops, so the result is linear_bf16's on the dequantized weight,
 * bit for bit, reading half the weight bytes. Returns 0, or 1 when a thread's scratch cannot
 * be had. */
int linear_fp8(const uint16_t* x, int m, int k, int n, const uint8_t* w, const float* scale,
               int br, int bc, uint16_t* out, int num_threads) {
  const int items = (n + FEATURES - 1) / FEATURES;
  const int threads = (int64_t)m * k * n < FORK_MACS ? 1 : num_threads;
  const int stream = m <= STREAM_MAX_ROWS, grid_cols = (k + bc - 1) / bc;
  int failed = 0;
#ifdef EXAONE_FP8_LOOKUP
  if (stream && bc % 64 == 0)
    return linear_fp8_lookup(x, m, k, n, w, scale, br, bc, out, threads);
#endif
#pragma omp parallel num_threads(threads)
  {
    uint16_t* rows = malloc(sizeof(uint16_t) * 4 * (size_t)k);
    if (rows == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
#pragma omp for schedule(static)
      for (int item = 0; item < items; item++) {
        const int f1 = (item + 1) * FEATURES < n ? (item + 1) * FEATURES : n;
        for (int f = item * FEATURES; f < f1; f += 4) {
          const int nf = f1 - f < 4 ? f1 - f : 4;
          dequant_rows(w, scale, grid_cols, br, bc, f, nf, k, rows);
          for (int r = 0; r < m; r += 4) {
            const int nr = m - r < 4 ? m - r : 4;
            const uint16_t* xr = x + (int64_t)r * k;
            uint16_t* o = out + (int64_t)r * n + f;
            if (stream)
              project_streamed(xr, k, nr, rows, k, 0, nf, o, n);
            else
              project_tiled(xr, k, nr, rows, k, 0, nf, o, n);
          }
        }
      }
    }
    free(rows);
  }
  return failed;
}
