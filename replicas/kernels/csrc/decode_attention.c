/* Decode attention in bf16 (AVX512-BF16 or AVX2: simd.h): one query token per sequence over keys read in
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
        vf16 acc = vf_zero();
        for (int d = 0; d < dim; d += 32)
          acc = vf_dpbf16(acc, vbf_load(qg + h * dim + d), vbf_load(kj + d));
        const float v = vf_reduce_add(acc) * scale;
        s[h * keys + j] = v;
        if (v > best[h]) best[h] = v;
      }
    }
    /* softmax weights, then out[h] = sum_j p[h][j] v[j] / sum_j p[h][j] */
    for (int h = 0; h < group; h++) {
      float* sh = s + h * keys;
      vf16 total = vf_zero();
      const vf16 top = vf_set1(best[h]);
      int j = 0;
      for (; j + 16 <= keys; j += 16) {
        const vf16 p = vf_where(ok + j, vf_exp(vf_sub(vf_load(sh + j), top)));
        vf_store(sh + j, p);
        total = vf_add(total, p);
      }
      float sum = vf_reduce_add(total);
      for (; j < keys; j++) {
        sh[j] = ok[j] ? expf(sh[j] - best[h]) : 0.f;
        sum += sh[j];
      }
      vf16 acc[8]; /* dim <= 128 per pass of 8 x 16 lanes */
      for (int d0 = 0; d0 < dim; d0 += 128) {
        const int width = dim - d0 < 128 ? (dim - d0) / 16 : 8;
        for (int i = 0; i < width; i++) acc[i] = vf_zero();
        for (int jj = 0; jj < keys; jj++) {
          if (!ok[jj]) continue;
          const uint16_t* vj = jj < num_rows
                                   ? v_pool + rows[(int64_t)b * num_rows + jj] * row_len + g * dim
                                   : v_extra + ((int64_t)b * kv_heads + g) * dim;
          const vf16 p = vf_set1(sh[jj]);
          for (int i = 0; i < width; i++)
            acc[i] = vf_fmadd(p, vf_from_bf16(vj + d0 + 16 * i), acc[i]);
        }
        const vf16 inv = vf_set1(1.f / sum);
        uint16_t* o = out + ((int64_t)b * heads + (int64_t)g * group + h) * dim + d0;
        for (int i = 0; i < width; i++) vf_store_bf16(o + 16 * i, vf_mul(acc[i], inv));
      }
    }
  }
}
