/* AVX512 helpers shared by our CPU kernels. */
#ifndef EXAONE_SIMD_H
#define EXAONE_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m512 exp16(__m512 x) { /* e^x within ~1 ulp; 0 and inf past the float range */
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.f)), _mm512_set1_ps(-100.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* x - n ln2, two parts */
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720); /* Taylor to r^6 on |r| <= ln2/2 */
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, quiet NaN */
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline __m512 round_bf16x16(__m512 v) { /* each value rounded to bf16 (nearest even) */
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline __m512 bf16x16_to_f32(const uint16_t* p) { /* 16 bf16 -> 16 fp32 */
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* sums[r] = x[r] . w for r < NR rows of x (lda apart), over n values: the weight row is read
 * once, front to back (one sequential stream is what keeps the hardware prefetcher ahead; two
 * interleaved weight rows measured half the bandwidth on AMD Zen 4), with 4 fp32 accumulators
 * per row over consecutive 32-value chunks, then a scalar tail. The order of the sums does not
 * depend on NR, so a row's result does not depend on which rows share the call. */
static inline __attribute__((always_inline)) void dot_weight_row(const uint16_t* x, int64_t lda,
                                                                 const int NR, const uint16_t* w,
                                                                 int n, float* sums) {
  __m512 c[4][4];
  for (int r = 0; r < NR; r++)
    for (int a = 0; a < 4; a++) c[r][a] = _mm512_setzero_ps();
  int i = 0;
  for (; i + 128 <= n; i += 128)
    for (int a = 0; a < 4; a++) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i + 32 * a);
      for (int r = 0; r < NR; r++)
        c[r][a] = _mm512_dpbf16_ps(c[r][a], (__m512bh)_mm512_loadu_si512(x + r * lda + i + 32 * a),
                                   wv);
    }
  for (int a = 0; i + 32 <= n; i += 32, a++) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i);
    for (int r = 0; r < NR; r++)
      c[r][a] = _mm512_dpbf16_ps(c[r][a], (__m512bh)_mm512_loadu_si512(x + r * lda + i), wv);
  }
  for (int r = 0; r < NR; r++) {
    float s = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(c[r][0], c[r][1]), _mm512_add_ps(c[r][2], c[r][3])));
    for (int q = i; q < n; q++) s += bf16_to_f32(x[r * lda + q]) * bf16_to_f32(w[q]);
    sums[r] = s;
  }
}

/* dot_weight_row for 1 <= nr <= 4 rows, each row count its own unrolled copy */
static inline void dot_weight_rows(const uint16_t* x, int64_t lda, int nr, const uint16_t* w,
                                   int n, float* sums) {
  switch (nr) {
    case 1: dot_weight_row(x, lda, 1, w, n, sums); break;
    case 2: dot_weight_row(x, lda, 2, w, n, sums); break;
    case 3: dot_weight_row(x, lda, 3, w, n, sums); break;
    default: dot_weight_row(x, lda, 4, w, n, sums); break;
  }
}

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
 * over k values; a chunk past the last whole 32 values is read masked (zeros). Each of the 16
 * dot products is summed in one order whatever NR is (lanes in k order, then reduce16), so a
 * row's result does not depend on the rows beside it. */
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

/* tile for 1 <= nr <= 4 rows, each row count its own unrolled copy */
static inline void tile_rows(const uint16_t* x, int64_t ldx, int nr, const uint16_t* const w[4],
                             int k, float* sums) {
  switch (nr) {
    case 1: tile(x, ldx, 1, w, k, sums); break;
    case 2: tile(x, ldx, 2, w, k, sums); break;
    case 3: tile(x, ldx, 3, w, k, sums); break;
    default: tile(x, ldx, 4, w, k, sums); break;
  }
}

/* rows[q] = w + (f + q) * ldw for the up to 4 features f.. < f_end, the last repeated past it */
static inline void feature_rows(const uint16_t* w, int64_t ldw, int f, int f_end,
                                const uint16_t* rows[4]) {
  const int nf = f_end - f < 4 ? f_end - f : 4;
  for (int q = 0; q < 4; q++) rows[q] = w + (int64_t)(f + (q < nf ? q : nf - 1)) * ldw;
}

/* out[q * ldo + f] = bf16(x[q] . w[f]) for q < nr <= 4 rows of x (ldx apart) and output
 * features f0 <= f < f1 of w [., k], in tiles of 4 rows x 4 features (tile) */
static inline void project_tiled(const uint16_t* x, int64_t ldx, int nr, const uint16_t* w, int k,
                                 int f0, int f1, uint16_t* out, int64_t ldo) {
  for (int f = f0; f < f1; f += 4) {
    const int nf = f1 - f < 4 ? f1 - f : 4;
    const uint16_t* rows[4];
    float sums[16];
    feature_rows(w, k, f, f1, rows);
    tile_rows(x, ldx, nr, rows, k, sums);
    for (int q = 0; q < nr; q++)
      for (int g = 0; g < nf; g++) out[q * ldo + f + g] = f32_to_bf16(sums[4 * q + g]);
  }
}

/* the same, each weight row read alone, front to back (dot_weight_rows) */
static inline void project_streamed(const uint16_t* x, int64_t ldx, int nr, const uint16_t* w,
                                    int k, int f0, int f1, uint16_t* out, int64_t ldo) {
  float sums[4];
  for (int f = f0; f < f1; f++) {
    dot_weight_rows(x, ldx, nr, w + (int64_t)f * k, k, sums);
    for (int q = 0; q < nr; q++) out[q * ldo + f] = f32_to_bf16(sums[q]);
  }
}

#endif
