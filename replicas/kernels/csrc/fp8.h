/* Block-wise FP8 (e4m3) weights read by the CPU kernels (moe_bf16.c, linear_bf16.c),
 * dequantized to quantization.dequantize's bf16 values bit for bit (the exceptions in
 * moe_bf16.c's FP8 section), two ways:
 * - dequant_rows: the rows a work item reads, into a bf16 scratch (AVX512-BF16, or AVX2 with
 *   F16C: the same conversion 8 codes at a time);
 * - fp8_tables and dot_fp8_row: the same values looked up per block from the codes in
 *   registers, for the weight rows moe_experts_fp8 streams (below): AVX512-VBMI's byte lookups
 *   (with AVX512-BF16; EXAONE_FP8_LOOKUP), which the AVX2 build does without. */
#ifndef EXAONE_FP8_H
#define EXAONE_FP8_H

#include <immintrin.h>
#include <stdint.h>

#include "simd.h"

#ifdef EXAONE_AVX512
#define EXAONE_FP8_LOOKUP 1

/* fp16 bits of n <= 32 e4m3 codes (mask m: the first n), each value times 2^-8: e4m3's
 * exponent field (bias 7) read as fp16's (bias 15), its subnormals (exponent 0, m * 2^-9)
 * fp16 subnormals, so every code converts exactly; the sign moves from bit 7 to bit 15:
 * ((b & 0x80) + b) << 7. */
static inline __m512i fp8x32_to_f16(const uint8_t* p, __mmask64 m) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(_mm512_maskz_loadu_epi8(m, p)));
  const __m512i sign = _mm512_and_si512(b, _mm512_set1_epi16(0x80));
  return _mm512_slli_epi16(_mm512_add_epi16(b, sign), 7);
}

/* dequant_rows' step (below): the n <= FP8_CHUNK codes at p times their block's scale, sc = the
 * scale * 2^8 in every lane, into d: the fp16 values times sc (exact, a power of two) in fp32 are
 * the single rounding of value * scale that quantization.dequantize's fp32 product makes, then
 * rounded to bf16, 32 at a time (masked at a block's end) */
#define FP8_CHUNK 32
typedef __m512 fp8_scale;
static inline fp8_scale fp8_scale_of(float s) { return _mm512_set1_ps(s * 256.0f); }
static inline void dequant_chunk(const uint8_t* p, int n, fp8_scale sc, uint16_t* d) {
  const __mmask32 m = n == 32 ? 0xffffffffu : (1u << n) - 1;
  const __m512i h = fp8x32_to_f16(p, m);
  const __m512 lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), sc);
  const __m512 hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), sc);
  _mm512_mask_storeu_epi16(d, m, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

#else

/* dequant_rows' step, 8 codes at a time: fp16 bits of the codes as fp8x32_to_f16 forms them,
 * widened by F16C, times the block's scale * 2^8, rounded to bf16 */
#define FP8_CHUNK 8
typedef __m256 fp8_scale;
static inline fp8_scale fp8_scale_of(float s) { return _mm256_set1_ps(s * 256.0f); }
static inline void dequant_chunk(const uint8_t* p, int n, fp8_scale sc, uint16_t* d) {
  uint8_t codes[16] = {0};
  memcpy(codes, p, (size_t)n);
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)codes));
  const __m128i h = _mm_slli_epi16(_mm_add_epi16(b, _mm_and_si128(b, _mm_set1_epi16(0x80))), 7);
  const __m256i bits = bf16_bits8(_mm256_mul_ps(_mm256_cvtph_ps(h), sc));
  uint16_t out[8];
  _mm_storeu_si128((__m128i*)out, _mm_packus_epi32(_mm256_castsi256_si128(bits),
                                                   _mm256_extracti128_si256(bits, 1)));
  memcpy(d, out, sizeof(uint16_t) * (size_t)n);
}

#endif

/* dst [nrows, cols] bf16 = rows row0.. of w [., cols] e4m3 times their scales (scale [., ld]),
 * block by block, FP8_CHUNK codes at a time (dequant_chunk) */
static inline void dequant_rows(const uint8_t* w, const float* scale, int64_t ld, int br, int bc,
                                int row0, int nrows, int cols, uint16_t* dst) {
  for (int r = 0; r < nrows; r++) {
    const uint8_t* src = w + (int64_t)(row0 + r) * cols;
    const float* s = scale + (int64_t)((row0 + r) / br) * ld;
    uint16_t* d = dst + (int64_t)r * cols;
    for (int c0 = 0, blk = 0; c0 < cols; c0 += bc, blk++) {
      const int c1 = c0 + bc < cols ? c0 + bc : cols;
      const fp8_scale sc = fp8_scale_of(s[blk]);
      for (int c = c0; c < c1; c += FP8_CHUNK)
        dequant_chunk(src + c, c1 - c < FP8_CHUNK ? c1 - c : FP8_CHUNK, sc, d + c);
    }
  }
}

#ifdef EXAONE_FP8_LOOKUP
/* ---- dequantizing in registers, one lookup table per block ----------------------------------
 * A weight's dequantized bf16 value depends only on its code and its block's scale, and
 * rounding to nearest even is symmetric, so the 128 magnitudes' values (dequant_rows'
 * arithmetic, the same instructions) are worked out once per block into a table of 256 bytes
 * (high bytes, then low bytes), and 64 codes become their bf16 values in six instructions: a
 * byte shuffle into the order below, two 128-entry byte lookups (vpermi2b, AVX512-VBMI) on the
 * code's 7 magnitude bits, the code's sign flipped into the high byte, two byte interleaves.
 * Against dequant_rows into a scratch and dot_weight_row on it: the same bf16 weights summed in
 * the same order, so the same bits, with 6 instructions per 64 weights instead of about 30 and
 * no scratch written and read back. */
#define FP8_TABLE_BYTES 256

/* the tables of count blocks with scales scale[0..count) into tables[FP8_TABLE_BYTES * i] */
static inline void fp8_tables(const float* scale, int64_t count, uint8_t* tables) {
  static const uint16_t iota[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10,
                                    11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                    22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
  const __m512i first = _mm512_loadu_si512(iota);
  for (int64_t i = 0; i < count; i++) {
    const __m512 sc = _mm512_set1_ps(scale[i] * 256.0f);
    uint8_t* t = tables + FP8_TABLE_BYTES * i;
    for (int c = 0; c < 128; c += 32) {
      /* codes c .. c+31 (no sign bit): fp8x32_to_f16's bits are the code shifted left by 7 */
      const __m512i h = _mm512_slli_epi16(_mm512_add_epi16(first, _mm512_set1_epi16(c)), 7);
      const __m512 lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), sc);
      const __m512 hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), sc);
      const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      _mm256_storeu_si256((__m256i*)(t + c), _mm512_cvtepi16_epi8(_mm512_srli_epi16(v, 8)));
      _mm256_storeu_si256((__m256i*)(t + 128 + c), _mm512_cvtepi16_epi8(v));
    }
  }
}

/* after unpack{lo,hi}_epi8 (which interleave within 16-byte lanes), values 0-31 and 32-63 in
 * code order: lane L's bytes 0-7 take codes 8L .. 8L+7, its bytes 8-15 codes 32+8L .. 39+8L */
static inline __m512i fp8_order(void) {
  uint8_t order[64];
  for (int lane = 0; lane < 4; lane++)
    for (int j = 0; j < 8; j++) {
      order[16 * lane + j] = (uint8_t)(8 * lane + j);
      order[16 * lane + 8 + j] = (uint8_t)(32 + 8 * lane + j);
    }
  return _mm512_loadu_si512(order);
}

typedef struct {
  __m512i hi0, hi1, lo0, lo1;
} fp8_table;

static inline fp8_table fp8_table_load(const uint8_t* t) {
  fp8_table r;
  r.hi0 = _mm512_loadu_si512(t);
  r.hi1 = _mm512_loadu_si512(t + 64);
  r.lo0 = _mm512_loadu_si512(t + 128);
  r.lo1 = _mm512_loadu_si512(t + 192);
  return r;
}

/* the dequantized bf16 values of the 64 codes at p (mask m: those read; the rest as code 0):
 * codes 0-31 in *a, 32-63 in *b */
static inline void fp8x64_dequant(const uint8_t* p, __mmask64 m, const fp8_table* t,
                                  __m512i order, __m512i* a, __m512i* b) {
  const __m512i c = _mm512_permutexvar_epi8(order, _mm512_maskz_loadu_epi8(m, p));
  const __m512i lo = _mm512_permutex2var_epi8(t->lo0, c, t->lo1); /* index: c's low 7 bits */
  __m512i hi = _mm512_permutex2var_epi8(t->hi0, c, t->hi1);
  hi = _mm512_ternarylogic_epi32(hi, c, _mm512_set1_epi8((char)0x80), 0x78); /* hi ^ (c & 0x80) */
  *a = _mm512_unpacklo_epi8(lo, hi);
  *b = _mm512_unpackhi_epi8(lo, hi);
}

/* simd.h's dot_weight_row on a weight row of n e4m3 codes whose column blocks (bc columns
 * each, bc a multiple of 64, so no 32- or 64-code chunk straddles two) have the tables
 * tables[FP8_TABLE_BYTES * blk]: the same accumulators, order and tail, so the same sums, bit
 * for bit, as on the row dequant_rows gives. */
static inline __attribute__((always_inline)) void dot_fp8_row(const uint16_t* x, int64_t lda,
                                                              const int NR, const uint8_t* w,
                                                              int n, const uint8_t* tables,
                                                              int bc, __m512i order,
                                                              float* sums) {
  __m512 c[4][4];
  for (int r = 0; r < NR; r++)
    for (int a = 0; a < 4; a++) c[r][a] = _mm512_setzero_ps();
  int i = 0, end = bc; /* the current block's end: blocks advance without a division */
  const uint8_t* tb = tables;
  fp8_table t = fp8_table_load(tb);
  /* every accumulator index a constant, so that all of them stay in registers */
#define EXAONE_FP8_NEXT_BLOCK(at)    \
  if ((at) >= end) {                 \
    end += bc;                       \
    tb += FP8_TABLE_BYTES;           \
    t = fp8_table_load(tb);          \
  }
#define EXAONE_FP8_CHUNK(a, wv, at)                                                           \
  for (int r = 0; r < NR; r++)                                                              \
    c[r][a] = _mm512_dpbf16_ps(c[r][a], (__m512bh)_mm512_loadu_si512(x + r * lda + (at)), \
                               (__m512bh)(wv));
  for (; i + 128 <= n; i += 128) {
    __m512i w0, w1, w2, w3;
    EXAONE_FP8_NEXT_BLOCK(i)
    fp8x64_dequant(w + i, ~(__mmask64)0, &t, order, &w0, &w1);
    EXAONE_FP8_NEXT_BLOCK(i + 64)
    fp8x64_dequant(w + i + 64, ~(__mmask64)0, &t, order, &w2, &w3);
    EXAONE_FP8_CHUNK(0, w0, i)
    EXAONE_FP8_CHUNK(1, w1, i + 32)
    EXAONE_FP8_CHUNK(2, w2, i + 64)
    EXAONE_FP8_CHUNK(3, w3, i + 96)
  }
  /* dot_weight_row's tail: up to three more chunks of 32, into accumulators 0, 1, 2 */
  __m512i wv[3], unused;
  int chunks = 0;
  for (; chunks < 3 && i + 32 <= n; chunks++, i += 32) {
    EXAONE_FP8_NEXT_BLOCK(i)
    fp8x64_dequant(w + i, (__mmask64)0xffffffffu, &t, order, &wv[chunks], &unused);
  }
  if (chunks > 0) EXAONE_FP8_CHUNK(0, wv[0], i - 32 * chunks)
  if (chunks > 1) EXAONE_FP8_CHUNK(1, wv[1], i - 32 * chunks + 32)
  if (chunks > 2) EXAONE_FP8_CHUNK(2, wv[2], i - 32 * chunks + 64)
#undef EXAONE_FP8_CHUNK
#undef EXAONE_FP8_NEXT_BLOCK
  for (int r = 0; r < NR; r++) {
    float s = _mm512_reduce_add_ps(
        _mm512_add_ps(_mm512_add_ps(c[r][0], c[r][1]), _mm512_add_ps(c[r][2], c[r][3])));
    for (int q = i; q < n; q++) {
      const uint8_t* tq = tables + (int64_t)FP8_TABLE_BYTES * (q / bc);
      const int code = w[q] & 0x7f;
      const uint16_t v = (uint16_t)(((tq[code] << 8) | tq[128 + code]) ^ ((w[q] & 0x80) << 8));
      s += bf16_to_f32(x[r * lda + q]) * bf16_to_f32(v);
    }
    sums[r] = s;
  }
}

/* dot_fp8_row for 1 <= nr <= 4 rows, each row count its own unrolled copy */
static inline void dot_fp8_rows(const uint16_t* x, int64_t lda, int nr, const uint8_t* w, int n,
                                const uint8_t* tables, int bc, __m512i order, float* sums) {
  switch (nr) {
    case 1: dot_fp8_row(x, lda, 1, w, n, tables, bc, order, sums); break;
    case 2: dot_fp8_row(x, lda, 2, w, n, tables, bc, order, sums); break;
    case 3: dot_fp8_row(x, lda, 3, w, n, tables, bc, order, sums); break;
    default: dot_fp8_row(x, lda, 4, w, n, tables, bc, order, sums); break;
  }
}

/* out[q * ldo + f] = bf16(dot_fp8_rows) for q < nr <= 4 rows of x (ldx apart) and features
 * f0 <= f < f1 of w [., k], feature f's tables at tables + FP8_TABLE_BYTES * ld * (f / br):
 * simd.h's project_streamed on the dequantized weight */
static inline void project_fp8(const uint16_t* x, int64_t ldx, int nr, const uint8_t* w, int k,
                               const uint8_t* tables, int64_t ld, int br, int bc, __m512i order,
                               int f0, int f1, uint16_t* out, int64_t ldo) {
  float sums[4];
  for (int f = f0; f < f1; f++) {
    dot_fp8_rows(x, ldx, nr, w + (int64_t)f * k, k, tables + FP8_TABLE_BYTES * ld * (f / br), bc,
                 order, sums);
    for (int q = 0; q < nr; q++) out[q * ldo + f] = f32_to_bf16(sums[q]);
  }
}

#endif /* EXAONE_FP8_LOOKUP */

#endif
