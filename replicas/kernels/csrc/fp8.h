/* Block-wise FP8 (e4m3) weights read by the CPU kernels (moe_bf16.c, linear_bf16.c): the rows a
 * work item reads, dequantized into a bf16 scratch with quantization.dequantize's values bit for
 * bit (the exceptions in moe_bf16.c's FP8 section). x86 AVX512-BF16 (which implies AVX512BW). */
#ifndef EXAONE_FP8_H
#define EXAONE_FP8_H

#include <immintrin.h>
#include <stdint.h>

/* fp16 bits of n <= 32 e4m3 codes (mask m: the first n), each value times 2^-8: e4m3's
 * exponent field (bias 7) read as fp16's (bias 15), its subnormals (exponent 0, m * 2^-9)
 * fp16 subnormals, so every code converts exactly; the sign moves from bit 7 to bit 15:
 * ((b & 0x80) + b) << 7. */
static inline __m512i fp8x32_to_f16(const uint8_t* p, __mmask64 m) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(_mm512_maskz_loadu_epi8(m, p)));
  const __m512i sign = _mm512_and_si512(b, _mm512_set1_epi16(0x80));
  return _mm512_slli_epi16(_mm512_add_epi16(b, sign), 7);
}

/* dst [nrows, cols] bf16 = rows row0.. of w [., cols] e4m3 times their scales (scale [., ld]),
 * block by block: the fp16 values times scale * 2^8 (exact, a power of two) in fp32 are the
 * single rounding of value * scale that quantization.dequantize's fp32 product makes, then
 * rounded to bf16, 32 at a time (masked at a block's end) */
static inline void dequant_rows(const uint8_t* w, const float* scale, int64_t ld, int br, int bc,
                         int row0, int nrows, int cols, uint16_t* dst) {
  for (int r = 0; r < nrows; r++) {
    const uint8_t* src = w + (int64_t)(row0 + r) * cols;
    const float* s = scale + (int64_t)((row0 + r) / br) * ld;
    uint16_t* d = dst + (int64_t)r * cols;
    for (int c0 = 0, blk = 0; c0 < cols; c0 += bc, blk++) {
      const int c1 = c0 + bc < cols ? c0 + bc : cols;
      const __m512 sc = _mm512_set1_ps(s[blk] * 256.0f);
      for (int c = c0; c < c1; c += 32) {
        const int n = c1 - c < 32 ? c1 - c : 32;
        const __mmask32 m = n == 32 ? 0xffffffffu : (1u << n) - 1;
        const __m512i h = fp8x32_to_f16(src + c, m);
        const __m512 lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), sc);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), sc);
        _mm512_mask_storeu_epi16(d + c, m, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  }
}

#endif
