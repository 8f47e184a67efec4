/* Routed experts of one MoE layer for few rows per expert (decode), bf16 on x86 AVX512-BF16.
 *
 * The GEMMs of a decode step have a handful of rows per expert, so they are bound by reading
 * the expert weights; oneDNN reaches 4-5 GB/s there on our 2-core machines. This kernel streams
 * each held expert's weights once, computes dot products with _mm512_dpbf16_ps (fp32
 * accumulation), 4 rows x 2 weight rows at a time, and parallelises over (expert, block of
 * output features) with OpenMP (the same libgomp as torch's).
 *
 * Numerics follow the PyTorch path: gate and up are rounded to bf16, silu(gate) is rounded to
 * bf16, their product is rounded to bf16; the down projection accumulates in fp32 and is
 * rounded once. Only the summation order inside each dot product differs from oneDNN's.
 *
 * Layout: x [R, H] rows grouped by expert, expert e owning rows offsets[e] .. offsets[e+1];
 * w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; act [R, I] scratch; out [R, H].
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define BLOCK 16 /* output features per work item */

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline __m512bh load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

/* o0[r] = a[r] . b0, o1[r] = a[r] . b1 for r < nrows <= 4 (a rows lda apart, length n) */
static void dot_rows(const uint16_t* a, int64_t lda, int nrows, const uint16_t* b0,
                     const uint16_t* b1, int n, float* o0, float* o1) {
  __m512 c0[4], c1[4];
  for (int r = 0; r < 4; r++) c0[r] = c1[r] = _mm512_setzero_ps();
  int i = 0;
  if (nrows == 4) {
    for (; i + 32 <= n; i += 32) {
      __m512bh w0 = load(b0 + i), w1 = load(b1 + i);
      __m512bh x0 = load(a + i), x1 = load(a + lda + i);
      __m512bh x2 = load(a + 2 * lda + i), x3 = load(a + 3 * lda + i);
      c0[0] = _mm512_dpbf16_ps(c0[0], x0, w0);
      c1[0] = _mm512_dpbf16_ps(c1[0], x0, w1);
      c0[1] = _mm512_dpbf16_ps(c0[1], x1, w0);
      c1[1] = _mm512_dpbf16_ps(c1[1], x1, w1);
      c0[2] = _mm512_dpbf16_ps(c0[2], x2, w0);
      c1[2] = _mm512_dpbf16_ps(c1[2], x2, w1);
      c0[3] = _mm512_dpbf16_ps(c0[3], x3, w0);
      c1[3] = _mm512_dpbf16_ps(c1[3], x3, w1);
    }
  } else {
    for (; i + 32 <= n; i += 32) {
      __m512bh w0 = load(b0 + i), w1 = load(b1 + i);
      for (int r = 0; r < nrows; r++) {
        __m512bh xr = load(a + r * lda + i);
        c0[r] = _mm512_dpbf16_ps(c0[r], xr, w0);
        c1[r] = _mm512_dpbf16_ps(c1[r], xr, w1);
      }
    }
  }
  for (int r = 0; r < nrows; r++) {
    float s0 = _mm512_reduce_add_ps(c0[r]), s1 = _mm512_reduce_add_ps(c1[r]);
    for (int j = i; j < n; j++) { /* tail when n is not a multiple of 32 */
      float xv = bf16_to_f32(a[r * lda + j]);
      s0 += xv * bf16_to_f32(b0[j]);
      s1 += xv * bf16_to_f32(b1[j]);
    }
    o0[r] = s0;
    o1[r] = s1;
  }
}

void moe_experts_bf16(const uint16_t* x, const int64_t* offsets, int num_experts, int hidden,
                      int inter, const uint16_t* w13, const uint16_t* w2, uint16_t* act,
                      uint16_t* out, int num_threads) {
  const int blocks_up = (inter + BLOCK - 1) / BLOCK, blocks_down = (hidden + BLOCK - 1) / BLOCK;
  const long items_up = (long)num_experts * blocks_up, items_down = (long)num_experts * blocks_down;

  /* act = bf16(silu(bf16(x W_gate^T))) * bf16(x W_up^T), rounded */
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
  for (long item = 0; item < items_up; item++) {
    const int e = (int)(item / blocks_up), first = (int)(item % blocks_up) * BLOCK;
    const int64_t r0 = offsets[e], r1 = offsets[e + 1];
    const int last = first + BLOCK < inter ? first + BLOCK : inter;
    const uint16_t* we = w13 + (int64_t)e * 2 * inter * hidden;
    float g[4], u[4];
    for (int64_t r = r0; r < r1; r += 4) {
      const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
      for (int f = first; f < last; f++) {
        dot_rows(x + r * hidden, hidden, nr, we + (int64_t)f * hidden,
                 we + (int64_t)(inter + f) * hidden, hidden, g, u);
        for (int k = 0; k < nr; k++) {
          const float gate = round_bf16(g[k]);
          const float silu = round_bf16(gate / (1.0f + expf(-gate)));
          act[(r + k) * inter + f] = f32_to_bf16(silu * round_bf16(u[k]));
        }
      }
    }
  }

  /* out = bf16(act W_down^T), two output features at a time */
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
  for (long item = 0; item < items_down; item++) {
    const int e = (int)(item / blocks_down), first = (int)(item % blocks_down) * BLOCK;
    const int64_t r0 = offsets[e], r1 = offsets[e + 1];
    const int last = first + BLOCK < hidden ? first + BLOCK : hidden;
    const uint16_t* we = w2 + (int64_t)e * hidden * inter;
    float y0[4], y1[4];
    for (int64_t r = r0; r < r1; r += 4) {
      const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
      for (int f = first; f < last; f += 2) {
        const int f1 = f + 1 < last ? f + 1 : f; /* odd tail: compute f twice, store once */
        dot_rows(act + r * inter, inter, nr, we + (int64_t)f * inter, we + (int64_t)f1 * inter,
                 inter, y0, y1);
        for (int k = 0; k < nr; k++) {
          out[(r + k) * hidden + f] = f32_to_bf16(y0[k]);
          out[(r + k) * hidden + f1] = f32_to_bf16(y1[k]);
        }
      }
    }
  }
}
