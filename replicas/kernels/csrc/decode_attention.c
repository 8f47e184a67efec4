/* Decode attention in bf16 on AVX512-BF16: one query token per sequence over keys read in
 * place from the KV cache (paged pool rows or sliding ring rows), with no gathered copy.
 *
 * PyTorch's path gathers each sequence's keys and values into padded [B, K, Hkv, D] tensors
 * and calls SDPA, whose CPU kernel is built for long query blocks; at decode that gather, the
 * concatenation and the masks cost more than the arithmetic. Here each (sequence, kv head) work
 * item reads its keys once: scores for the group's G = Hq / Hkv query heads (bf16 products,
 * fp32 sums), a fp32 softmax, and fp32 sums of probability x value, rounded to bf16 once.
 *
 * Layout: q [B, Hq, D]; k_pool, v_pool [rows, Hkv, D]; rows [B, R] pool rows of each sequence's
 * keys; k_extra, v_extra [B, Hkv, D] or NULL: one more key per sequence after its R rows (the
 * token being decoded, for sliding layers whose ring does not hold it yet); valid [B, R + extra]
 * bytes, nonzero where the key is attended; scores [threads, G, R + 1] fp32 scratch;
 * out [B, Hq, D]. D must be a multiple of 32.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "simd.h"

void decode_attention_bf16(const uint16_t* q, const uint16_t* k_pool, const uint16_t* v_pool,
                           const int64_t* rows, int num_rows, const uint16_t* k_extra,
                           const uint16_t* v_extra, const uint8_t* valid, int batch, int heads,
                           int kv_heads, int dim, float scale, float* scores, uint16_t* out,
                           int num_threads) {
  const int group = heads / kv_heads, keys = num_rows + (k_extra != 0);
  const int64_t row_len = (int64_t)kv_heads * dim; /* elements per pool row */
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int item = 0; item < batch * kv_heads; item++) {
    const int b = item / kv_heads, g = item % kv_heads;
    float* s = scores + (int64_t)omp_get_thread_num() * group * (num_rows + 1);
    const uint8_t* ok = valid + (int64_t)b * keys;
    const uint16_t* qg = q + ((int64_t)b * heads + (int64_t)g * group) * dim; /* [G, D] */
    /* scores s[h][j] = scale * q[h] . k[j] */
    float best[64]; /* group <= 64, checked by the caller */
    for (int h = 0; h < group; h++) best[h] = -INFINITY;
    for (int j = 0; j < keys; j++) {
      if (!ok[j]) continue;
      const uint16_t* kj = j < num_rows ? k_pool + rows[(int64_t)b * num_rows + j] * row_len + g * dim
                                        : k_extra + ((int64_t)b * kv_heads + g) * dim;
      for (int h = 0; h < group; h++) {
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < dim; d += 32)
          acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qg + h * dim + d),
                                 (__m512bh)_mm512_loadu_si512(kj + d));
        const float v = _mm512_reduce_add_ps(acc) * scale;
        s[h * keys + j] = v;
        if (v > best[h]) best[h] = v;
      }
    }
    /* softmax weights, then out[h] = sum_j p[h][j] v[j] / sum_j p[h][j] */
    for (int h = 0; h < group; h++) {
      float* sh = s + h * keys;
      __m512 total = _mm512_setzero_ps();
      const __m512 top = _mm512_set1_ps(best[h]);
      int j = 0;
      for (; j + 16 <= keys; j += 16) {
        const __m512i flags = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(ok + j)));
        const __mmask16 m = _mm512_test_epi32_mask(flags, flags);
        const __m512 p = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_loadu_ps(sh + j), top)));
        _mm512_storeu_ps(sh + j, p);
        total = _mm512_add_ps(total, p);
      }
      float sum = _mm512_reduce_add_ps(total);
      for (; j < keys; j++) {
        sh[j] = ok[j] ? expf(sh[j] - best[h]) : 0.f;
        sum += sh[j];
      }
      __m512 acc[8]; /* dim <= 128 per pass of 8 x 16 lanes */
      for (int d0 = 0; d0 < dim; d0 += 128) {
        const int width = dim - d0 < 128 ? (dim - d0) / 16 : 8;
        for (int i = 0; i < width; i++) acc[i] = _mm512_setzero_ps();
        for (int jj = 0; jj < keys; jj++) {
          if (!ok[jj]) continue;
          const uint16_t* vj = jj < num_rows
                                   ? v_pool + rows[(int64_t)b * num_rows + jj] * row_len + g * dim
                                   : v_extra + ((int64_t)b * kv_heads + g) * dim;
          const __m512 p = _mm512_set1_ps(sh[jj]);
          for (int i = 0; i < width; i++)
            acc[i] = _mm512_fmadd_ps(p, bf16x16_to_f32(vj + d0 + 16 * i), acc[i]);
        }
        const __m512 inv = _mm512_set1_ps(1.f / sum);
        uint16_t* o = out + ((int64_t)b * heads + (int64_t)g * group + h) * dim + d0;
        for (int i = 0; i < width; i++)
          _mm256_storeu_si256((__m256i*)(o + 16 * i),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i], inv)));
      }
    }
  }
}
