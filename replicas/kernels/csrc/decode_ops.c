/* The small per-token operations of a decode step, fused, in bf16 (x86 AVX512 or AVX2: simd.h).
 *
 * A decode step of a small model is a chain of tiny operations; PyTorch spends a few
 * microseconds of dispatch on each, and an RMSNorm alone is seven of them. These kernels do the
 * same arithmetic in one call, rounding where PyTorch rounds:
 *
 *   rms_norm:  y = w * bf16(x * 1/sqrt(mean(x^2) + eps))        (mean in fp32, as transformers)
 *   rope:      y = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin))   (NeoX, rotate-half)
 *
 * Only the order of the fp32 sum of squares differs from PyTorch's, so a result can differ in
 * the last bf16 bit now and then.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "simd.h"

static float sum_squares(const uint16_t* x, int n) {
  vf16 a0 = vf_zero(), a1 = vf_zero();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const vf16 v0 = vf_from_bf16(x + i), v1 = vf_from_bf16(x + i + 16);
    a0 = vf_add(a0, vf_mul(v0, v0));
    a1 = vf_add(a1, vf_mul(v1, v1));
  }
  float s = vf_reduce_add(vf_add(a0, a1));
  for (; i < n; i++) {
    const float v = bf16_to_f32(x[i]);
    s += v * v;
  }
  return s;
}

/* out[0 .. n) = w * bf16(x * rsqrt(mean(x^2) + eps)); out may be x. */
static void norm_row(const uint16_t* x, int n, const uint16_t* w, float eps, uint16_t* out) {
  const float r = 1.0f / sqrtf(sum_squares(x, n) / (float)n + eps);
  for (int i = 0; i < n; i++) {
    out[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(x[i]) * r));
  }
}

/* x [rows, dim] with row stride `stride` (elements) -> out [rows, dim] contiguous. */
void rms_norm_bf16(const uint16_t* x, int rows, int dim, int64_t stride, const uint16_t* w,
                   float eps, uint16_t* out) {
  for (int r = 0; r < rows; r++) norm_row(x + r * stride, dim, w, eps, out + (int64_t)r * dim);
}

/* In place on one head of d values (d even) with this token's cos/sin rows. */
static void rope_head(uint16_t* x, int d, const uint16_t* cos, const uint16_t* sin) {
  const int half = d / 2;
  for (int i = 0; i < half; i++) {
    const float a = bf16_to_f32(x[i]), b = bf16_to_f32(x[i + half]);
    const float lo = round_bf16(a * bf16_to_f32(cos[i])) + round_bf16(-b * bf16_to_f32(sin[i]));
    const float hi =
        round_bf16(b * bf16_to_f32(cos[i + half])) + round_bf16(a * bf16_to_f32(sin[i + half]));
    x[i] = f32_to_bf16(lo);
    x[i + half] = f32_to_bf16(hi);
  }
}

/* The query/key half of attention's input for `tokens` tokens: from qkv [tokens, stride]
 * (q heads, then k heads, then v heads, each d wide), per-head RMSNorm of q (q_w) and k (k_w),
 * then RoPE when cos/sin [tokens, d] are given -> q_out [tokens, q_heads, d] and
 * k_out [tokens, kv_heads, d]. */
void qk_norm_rope_bf16(const uint16_t* qkv, int tokens, int64_t stride, int q_heads, int kv_heads,
                       int d, const uint16_t* q_w, const uint16_t* k_w, float eps,
                       const uint16_t* cos, const uint16_t* sin, uint16_t* q_out,
                       uint16_t* k_out) {
  for (int t = 0; t < tokens; t++) {
    const uint16_t* row = qkv + t * stride;
    for (int h = 0; h < q_heads + kv_heads; h++) {
      const int is_q = h < q_heads;
      uint16_t* out = is_q ? q_out + ((int64_t)t * q_heads + h) * d
                           : k_out + ((int64_t)t * kv_heads + h - q_heads) * d;
      norm_row(row + (int64_t)h * d, d, is_q ? q_w : k_w, eps, out);
      if (cos) rope_head(out, d, cos + (int64_t)t * d, sin + (int64_t)t * d);
    }
  }
}
