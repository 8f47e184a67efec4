/* Dense bf16 projection on a weight packed once for AVX512-BF16, for a step's many rows.
 *
 * out [M, N] = x [M, K] . w [N, K]^T, fp32 sums rounded once to bf16 (round to nearest even).
 * linear_bf16.c's kernels take the weight as it is stored ([N, K]): each output is a dot product
 * along K, summed across lanes at the end. Past a few rows a GEMM is the better shape: here the
 * weight is packed once (pack_vnni_bf16) into blocks of 64 output features, k-pairs outermost:
 *
 *     wp [ceil(N / 64)][ceil(K / 2)][64][2]   (zero past N and K)
 *
 * so one 64-byte load holds the k-pair of 16 features, and vdpbf16ps multiplies it by a pair of
 * an input row broadcast to every lane: 16 outputs accumulate in the lanes, no sums across lanes.
 * A tile is 4 rows x 64 features (16 fp32 accumulators); per k-pair 4 weight loads and 4
 * broadcasts feed 16 vdpbf16ps. Each output sums its k-pairs in order from zero, so a row's result
 * does not depend on which rows share the call; for K <= 512 that is also oneDNN's order (its
 * bf16 brgemm on AVX512-BF16, torch 2.13): the results are oneDNN's bit for bit (checked on 1,980
 * shapes, 17..128 rows, one and two threads; past 512 oneDNN splits K into blocks it sums
 * apart). Blocks of features are split over OpenMP threads (the same libgomp as torch's) when
 * the product is large enough to repay the fork.
 */
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define BLOCK 64              /* output features per packed block */
#define FORK_MACS 262144      /* below this many multiply-adds one thread does it all */

void pack_vnni_bf16(const uint16_t* w, int n, int k, uint16_t* wp) {
  const int blocks = (n + BLOCK - 1) / BLOCK, pairs = (k + 1) / 2;
  memset(wp, 0, (size_t)blocks * pairs * BLOCK * 2 * sizeof(uint16_t));
  for (int f = 0; f < n; f++) {
    uint16_t* dst = wp + ((int64_t)(f / BLOCK) * pairs * BLOCK + f % BLOCK) * 2;
    const uint16_t* src = w + (int64_t)f * k;
    for (int i = 0; i < k; i++) dst[(int64_t)(i / 2) * BLOCK * 2 + i % 2] = src[i];
  }
}

static inline int32_t pair_at(const uint16_t* row, int p) { /* (row[2p], row[2p+1]) */
  int32_t v;
  memcpy(&v, row + 2 * p, 4);
  return v;
}

/* rows [0, NR) of x (lda apart) times one packed block -> out (ldo apart), its first `cols`
 * features. */
static inline __attribute__((always_inline)) void packed_tile(const uint16_t* x, int64_t lda,
                                                              const int NR, int k,
                                                              const uint16_t* block, uint16_t* out,
                                                              int64_t ldo, int cols) {
  vf16 c[4][4];
  for (int r = 0; r < NR; r++)
    for (int j = 0; j < 4; j++) c[r][j] = vf_zero();
  /* k-pair p: its 64 features' weights, times each row's pair broadcast to every lane */
#define STEP(p, PAIR)                                                        \
  do {                                                                       \
    const uint16_t* b = block + (int64_t)(p) * BLOCK * 2;                    \
    const vbf32 b0 = vbf_load(b), b1 = vbf_load(b + 32);                    \
    const vbf32 b2 = vbf_load(b + 64), b3 = vbf_load(b + 96);               \
    for (int r = 0; r < NR; r++) {                                           \
      const vbf32 a = vbf_set1_pair(PAIR);                                   \
      c[r][0] = vf_dpbf16(c[r][0], a, b0);                                   \
      c[r][1] = vf_dpbf16(c[r][1], a, b1);                                   \
      c[r][2] = vf_dpbf16(c[r][2], a, b2);                                   \
      c[r][3] = vf_dpbf16(c[r][3], a, b3);                                   \
    }                                                                        \
  } while (0)
  for (int p = 0; p < k / 2; p++) STEP(p, pair_at(x + r * lda, p));
  if (k % 2) STEP(k / 2, (int32_t)x[r * lda + k - 1]); /* the last value, paired with 0 */
#undef STEP
  for (int r = 0; r < NR; r++)
    for (int j = 0; j < 4; j++) {
      const int left = cols - 16 * j;
      if (left <= 0) break;
      uint16_t* dst = out + r * ldo + 16 * j;
      if (left >= 16)
        vf_store_bf16(dst, c[r][j]);
      else { /* the last block's valid features only */
        uint16_t tail[16];
        vf_store_bf16(tail, c[r][j]);
        memcpy(dst, tail, (size_t)left * sizeof(uint16_t));
      }
    }
}

void linear_packed_bf16(const uint16_t* x, int m, int k, int n, const uint16_t* wp,
                        uint16_t* out, int num_threads) {
  const int blocks = (n + BLOCK - 1) / BLOCK, pairs = (k + 1) / 2;
  const int threads = (int64_t)m * k * n < FORK_MACS ? 1 : num_threads;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int nb = 0; nb < blocks; nb++) {
    const uint16_t* block = wp + (int64_t)nb * pairs * BLOCK * 2;
    const int f0 = nb * BLOCK, cols = n - f0 < BLOCK ? n - f0 : BLOCK;
    for (int r = 0; r < m; r += 4) {
      const uint16_t* xr = x + (int64_t)r * k;
      uint16_t* o = out + (int64_t)r * n + f0;
      switch (m - r < 4 ? m - r : 4) {
        case 4: packed_tile(xr, k, 4, k, block, o, n, cols); break;
        case 3: packed_tile(xr, k, 3, k, block, o, n, cols); break;
        case 2: packed_tile(xr, k, 2, k, block, o, n, cols); break;
        default: packed_tile(xr, k, 1, k, block, o, n, cols); break;
      }
    }
  }
}
