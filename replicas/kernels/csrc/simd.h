/* Vector helpers shared by our CPU kernels. The same kernel sources build twice
 * (replicas.kernels.cpu_build): for AVX512-BF16 (with -mavx512bf16), where the types below are
 * the registers themselves and each helper one or two instructions, and for AVX2 + FMA + F16C
 * (x86 CPUs without AVX512-BF16: AMD Zen 2 / Zen 3, Intel before Cooper Lake), where a vector
 * of 16 fp32 lanes is two 8-lane halves and the helpers do the same arithmetic with more
 * instructions:
 *
 *   vf16    16 fp32 lanes
 *   vbf32   32 bf16 values (16 pairs); on AVX2 already widened to fp32, each pair's even and
 *           odd value apart, since every use multiplies them in fp32
 *   vf_dpbf16(acc, a, b)  lane j += a[2j+1] b[2j+1], then += a[2j] b[2j], each step one fp32
 *           fused multiply-add rounded to nearest even: the order and roundings of AVX512-BF16's
 *           vdpbf16ps (Intel SDM), which the AVX2 build repeats with two FMAs (the products of
 *           two bf16 values are exact in fp32).
 *
 * Conversions to bf16 round to nearest even and keep NaNs quiet, as f32_to_bf16 below. Sums
 * across lanes take the same trees in both builds, so both compute the same bits but for
 * subnormals: AVX512-BF16's instructions (vdpbf16ps, vcvtneps2bf16) treat subnormal inputs as
 * zero, the AVX2 build does not. With 16 registers of 8 lanes, the AVX2 build's 4-row loops
 * spill accumulators; passes over half the lanes and 2 rows at a time, which do not, measured
 * slower (4 rows x 1,024 x 3,072, one thread: 1.02-1.13 against 0.91-0.93 ms). */
#ifndef EXAONE_SIMD_H
#define EXAONE_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

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

#if defined(__AVX512BF16__)
#define EXAONE_AVX512 1

typedef __m512 vf16;
typedef __m512bh vbf32;

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

static inline vf16 vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf16 vf_set1(float v) { return _mm512_set1_ps(v); }
static inline vf16 vf_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float* p, vf16 v) { _mm512_storeu_ps(p, v); }
static inline vf16 vf_add(vf16 a, vf16 b) { return _mm512_add_ps(a, b); }
static inline vf16 vf_sub(vf16 a, vf16 b) { return _mm512_sub_ps(a, b); }
static inline vf16 vf_mul(vf16 a, vf16 b) { return _mm512_mul_ps(a, b); }
static inline vf16 vf_div(vf16 a, vf16 b) { return _mm512_div_ps(a, b); }
static inline vf16 vf_fmadd(vf16 a, vf16 b, vf16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vf_reduce_add(vf16 v) { return _mm512_reduce_add_ps(v); }
static inline vf16 vf_exp(vf16 x) { return exp16(x); }

/* lanes whose flag byte (16 of them at flags) is zero set to 0 */
static inline vf16 vf_where(const uint8_t* flags, vf16 v) {
  const __m512i f = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)flags));
  return _mm512_maskz_mov_ps(_mm512_test_epi32_mask(f, f), v);
}

static inline vf16 vf_round_bf16(vf16 v) { /* each value rounded to bf16 (nearest even) */
  const __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

static inline vf16 vf_from_bf16(const uint16_t* p) { /* 16 bf16 -> 16 fp32 */
  const __m256i h = _mm256_loadu_si256((const __m256i*)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void vf_store_bf16(uint16_t* p, vf16 v) { /* 16 values rounded to bf16 */
  _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
}

static inline vbf32 vbf_load(const uint16_t* p) { return (vbf32)_mm512_loadu_si512(p); }
static inline vbf32 vbf_load_first(const uint16_t* p, int n) { /* p[0..n), zeros past n < 32 */
  return (vbf32)_mm512_maskz_loadu_epi16((__mmask32)((1u << n) - 1), p);
}
static inline vbf32 vbf_set1_pair(int32_t pair) { /* (lo, hi) bf16 bits in every pair */
  return (vbf32)_mm512_set1_epi32(pair);
}
static inline vf16 vf_dpbf16(vf16 acc, vbf32 a, vbf32 b) { return _mm512_dpbf16_ps(acc, a, b); }

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

typedef struct {
  __m256 lo, hi; /* lanes 0-7, 8-15 */
} vf16;
typedef struct {
  __m256 even_lo, odd_lo, even_hi, odd_hi; /* pairs 0-7, 8-15 */
} vbf32;

static inline vf16 vf_pair(__m256 lo, __m256 hi) {
  vf16 r = {lo, hi};
  return r;
}
static inline vf16 vf_zero(void) { return vf_pair(_mm256_setzero_ps(), _mm256_setzero_ps()); }
static inline vf16 vf_set1(float v) { return vf_pair(_mm256_set1_ps(v), _mm256_set1_ps(v)); }
static inline vf16 vf_load(const float* p) {
  return vf_pair(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8));
}
static inline void vf_store(float* p, vf16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
static inline vf16 vf_add(vf16 a, vf16 b) {
  return vf_pair(_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi));
}
static inline vf16 vf_sub(vf16 a, vf16 b) {
  return vf_pair(_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi));
}
static inline vf16 vf_mul(vf16 a, vf16 b) {
  return vf_pair(_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi));
}
static inline vf16 vf_div(vf16 a, vf16 b) {
  return vf_pair(_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi));
}
static inline vf16 vf_fmadd(vf16 a, vf16 b, vf16 c) {
  return vf_pair(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
static inline float vf_reduce_add(vf16 v) {
  const __m256 s = _mm256_add_ps(v.lo, v.hi);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

static inline __m256 exp8(__m256 x) { /* exp16's arithmetic on 8 lanes */
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(100.f)), _mm256_set1_ps(-100.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  /* p * 2^n as two exact scalings by 2^(n/2) and 2^(n - n/2), each a normal float for
   * |n| <= 145: one rounding where the result is subnormal, as vscalefps */
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}
static inline vf16 vf_exp(vf16 x) { return vf_pair(exp8(x.lo), exp8(x.hi)); }

static inline __m256 where8(const uint8_t* flags, __m256 v) {
  const __m256i f = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)flags));
  return _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(f, _mm256_setzero_si256())), v);
}
static inline vf16 vf_where(const uint8_t* flags, vf16 v) {
  return vf_pair(where8(flags, v.lo), where8(flags + 8, v.hi));
}

/* bf16 bits of 8 fp32 values in the low half of each 32-bit lane: f32_to_bf16 on each */
static inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}
static inline vf16 vf_round_bf16(vf16 v) {
  return vf_pair(_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v.lo), 16)),
                 _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v.hi), 16)));
}

static inline __m256 widen8(const uint16_t* p) { /* 8 bf16 -> 8 fp32 */
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
static inline vf16 vf_from_bf16(const uint16_t* p) { return vf_pair(widen8(p), widen8(p + 8)); }

static inline void vf_store_bf16(uint16_t* p, vf16 v) {
  /* packus interleaves the halves by 64 bits (lo 0-3, hi 0-3, lo 4-7, hi 4-7): reordered */
  const __m256i packed = _mm256_packus_epi32(bf16_bits8(v.lo), bf16_bits8(v.hi));
  _mm256_storeu_si256((__m256i*)p, _mm256_permute4x64_epi64(packed, 0xD8));
}

static inline void split16(__m256i v, __m256* even, __m256* odd) { /* 16 bf16 -> 8 pairs */
  *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline vbf32 vbf_load(const uint16_t* p) {
  vbf32 r;
  split16(_mm256_loadu_si256((const __m256i*)p), &r.even_lo, &r.odd_lo);
  split16(_mm256_loadu_si256((const __m256i*)(p + 16)), &r.even_hi, &r.odd_hi);
  return r;
}
static inline vbf32 vbf_load_first(const uint16_t* p, int n) {
  uint16_t buf[32] = {0};
  memcpy(buf, p, sizeof(uint16_t) * n);
  return vbf_load(buf);
}
static inline vbf32 vbf_set1_pair(int32_t pair) {
  vbf32 r;
  split16(_mm256_set1_epi32(pair), &r.even_lo, &r.odd_lo);
  r.even_hi = r.even_lo, r.odd_hi = r.odd_lo;
  return r;
}
static inline vf16 vf_dpbf16(vf16 acc, vbf32 a, vbf32 b) {
  const __m256 lo = _mm256_fmadd_ps(a.odd_lo, b.odd_lo, acc.lo);
  const __m256 hi = _mm256_fmadd_ps(a.odd_hi, b.odd_hi, acc.hi);
  return vf_pair(_mm256_fmadd_ps(a.even_lo, b.even_lo, lo),
                 _mm256_fmadd_ps(a.even_hi, b.even_hi, hi));
}

#else
#error "our CPU kernels need AVX512-BF16, or AVX2 with FMA and F16C"
#endif

/* sums[r] = x[r] . w for r < NR rows of x (lda apart), over n values: the weight row is read
 * once, front to back (one sequential stream is what keeps the hardware prefetcher ahead; two
 * interleaved weight rows measured half the bandwidth on AMD Zen 4), with 4 fp32 accumulators
 * per row over consecutive 32-value chunks, then a scalar tail. The order of the sums does not
 * depend on NR, so a row's result does not depend on which rows share the call. */
static inline __attribute__((always_inline)) void dot_weight_row(const uint16_t* x, int64_t lda,
                                                                 const int NR, const uint16_t* w,
                                                                 int n, float* sums) {
  vf16 c[4][4];
  for (int r = 0; r < NR; r++)
    for (int a = 0; a < 4; a++) c[r][a] = vf_zero();
  int i = 0;
  for (; i + 128 <= n; i += 128)
    for (int a = 0; a < 4; a++) {
      const vbf32 wv = vbf_load(w + i + 32 * a);
      for (int r = 0; r < NR; r++)
        c[r][a] = vf_dpbf16(c[r][a], vbf_load(x + r * lda + i + 32 * a), wv);
    }
  for (int a = 0; i + 32 <= n; i += 32, a++) {
    const vbf32 wv = vbf_load(w + i);
    for (int r = 0; r < NR; r++) c[r][a] = vf_dpbf16(c[r][a], vbf_load(x + r * lda + i), wv);
  }
  for (int r = 0; r < NR; r++) {
    float s = vf_reduce_add(vf_add(vf_add(c[r][0], c[r][1]), vf_add(c[r][2], c[r][3])));
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

/* out[j] = the sum of v[j]'s 16 lanes, for j < 16. The additions form the same tree for
 * every j. */
static inline void reduce16(const vf16 v[16], float* out) {
#ifdef EXAONE_AVX512
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
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                                      _mm512_shuffle_f32x4(c[0], c[1], 0xDD)));
#else /* the same tree: in each block of 4 lanes (x0 + x2) + (x1 + x3), then the blocks' sums
         S as (S0 + S2) + (S1 + S3) */
  for (int j = 0; j < 16; j++) {
    float x[16], s[4];
    vf_store(x, v[j]);
    for (int b = 0; b < 4; b++) s[b] = (x[4 * b] + x[4 * b + 2]) + (x[4 * b + 1] + x[4 * b + 3]);
    out[j] = (s[0] + s[2]) + (s[1] + s[3]);
  }
#endif
}

/* sums[4 * r + f] = x[r] . w[f] for r < NR rows of x (ldx apart) and the 4 weight rows w[f],
 * over k values; a chunk past the last whole 32 values is read as zeros past k. Each of the 16
 * dot products is summed in one order whatever NR is (lanes in k order, then reduce16), so a
 * row's result does not depend on the rows beside it. */
static inline __attribute__((always_inline)) void tile(const uint16_t* x, int64_t ldx,
                                                       const int NR, const uint16_t* const w[4],
                                                       int k, float* sums) {
  vf16 c[16];
  for (int j = 0; j < 16; j++) c[j] = vf_zero();
  for (int i = 0; i < k; i += 32) {
    const int whole = k - i >= 32;
    vbf32 wv[4];
    for (int f = 0; f < 4; f++) wv[f] = whole ? vbf_load(w[f] + i) : vbf_load_first(w[f] + i, k - i);
    for (int r = 0; r < NR; r++) {
      const vbf32 xv = whole ? vbf_load(x + r * ldx + i) : vbf_load_first(x + r * ldx + i, k - i);
      for (int f = 0; f < 4; f++) c[4 * r + f] = vf_dpbf16(c[4 * r + f], xv, wv[f]);
    }
  }
  reduce16(c, sums);
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
