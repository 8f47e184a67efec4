/* Routed experts of one MoE layer in bf16 on x86 AMX (Intel Sapphire Rapids and later).
 *
 * One AMX instruction (TDPBF16PS) multiplies a 16x32 bf16 tile by a 32x16 one into 16x16 fp32.
 * The second operand must be pair-interleaved ("VNNI": row k2 holds (k=2*k2, 2*k2+1) pairs for
 * 16 columns). Our weights are nn.Linear [out, in] row-major, which is exactly the FIRST operand's
 * layout, so we compute the transpose: out^T [features, tokens] = W [features, in] . x^T, with the
 * weights read straight from memory as tiles and only the activations packed (16 tokens per
 * block, a cheap in-register 16x16 transpose). No second copy of the weights is kept.
 *
 *   1. pack: each expert's rows, 16 at a time (a "block", zero-padded), into tile-B layout.
 *   2. gate/up: per (expert, 16 intermediate features): C_gate, C_up += W tile . x block; then
 *      act = bf16(bf16(silu(bf16(gate))) * bf16(up)), written straight into tile-B layout for
 *      the down projection (features are the K dimension there).
 *   3. down: per (expert, 16 hidden features): C += W_down tile . act block; transposed back to
 *      rows in registers, rounded to bf16 and stored.
 * Rounding matches the PyTorch path (and moe_bf16.c); only the order of fp32 sums differs.
 *
 * Layout: x [N, H] bf16; tokens [S] int64 (row of x for each grouped row); expert e owns grouped
 * rows offsets[e] .. offsets[e+1]; blocks[e] .. blocks[e+1] are its 16-row blocks; w13 [E, 2I, H]
 * (gate rows, then up rows); w2 [E, H, I]; xpack [blocks, H/2, 16] and actpack [blocks, I/2, 16]
 * are uint32 scratch; out [S, H]. H and I must be multiples of 32.
 */
#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "simd.h"

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TM 16 /* rows (tokens) per block: the columns of every tile */

/* 0 when AMX-BF16 can be used by this process; negative when the CPU or the kernel refuses. */
int moe_amx_init(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return -1;
  if (!(d & (1u << 22)) || !(d & (1u << 24))) return -2; /* AMX-BF16, AMX-TILE */
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return -3;
  return 0;
}

typedef struct {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

/* Tiles: 0 C gate (or C down), 1 C up, 2 A gate (or A down), 3 A up, 4 B; all 16 x 64 bytes. */
static void configure_tiles(void) {
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 5; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

/* r[16] rows of 16 dwords -> their transpose, in registers. */
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) { /* pairs of rows, interleaved per 128-bit lane */
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) { /* r[4i+j], lane L: column 4L+j of rows 4i..4i+3 */
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; j++) { /* gather lane L of r[j], r[4+j], r[8+j], r[12+j] */
    const __m512i v0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i w0 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i w1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    t[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    t[4 + j] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    t[8 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    t[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
  for (int i = 0; i < 16; i++) r[i] = t[i];
}

static inline __m512 round16(__m512 v) { /* to bf16 (nearest even) and back */
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* bf16(bf16(silu(bf16(gate))) * bf16(up)) for 16 values */
static inline __m512i act16(const float* gate, const float* up) {
  const __m512 g = round16(_mm512_loadu_ps(gate));
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  const __m512 silu = round16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
  const __m256i a = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, round16(_mm512_loadu_ps(up))));
  return _mm512_cvtepu16_epi32(a); /* one bf16 per dword, low half */
}

/* Rows x[rows[first + m]] (x[first + m] when rows is NULL), m < n <= 16, length k -> tile-B
 * blocks: dst[kb][k2][m] holds the pair at columns kb*32 + 2*k2 .. +1; zero for m >= n. */
static void pack_rows(const uint16_t* x, const int64_t* rows, int64_t first, int n, int k,
                      uint32_t* dst) {
  __m512i r[16];
  for (int kb = 0; kb < k / 32; kb++) {
    for (int m = 0; m < 16; m++) {
      if (m >= n) {
        r[m] = _mm512_setzero_si512();
        continue;
      }
      const int64_t row = rows ? rows[first + m] : first + m;
      r[m] = _mm512_loadu_si512(x + row * k + kb * 32);
    }
    transpose16(r);
    for (int i = 0; i < 16; i++) _mm512_storeu_si512(dst + ((int64_t)kb * 16 + i) * TM, r[i]);
  }
}

static inline int block_rows(const int64_t* offsets, const int64_t* blocks, int e, int64_t b,
                             int64_t* first) {
  *first = offsets[e] + (b - blocks[e]) * TM;
  const int64_t left = offsets[e + 1] - *first;
  return left < TM ? (int)left : TM;
}

/* Pack every 16-row block of every expert (x rows via tokens, or in order when NULL). */
static void pack_phase(const uint16_t* x, const int64_t* tokens, const int64_t* offsets,
                       const int64_t* blocks, int num_experts, int k, uint32_t* xpack) {
#pragma omp for schedule(dynamic, 1)
  for (int64_t b = 0; b < blocks[num_experts]; b++) {
    int e = 0;
    while (blocks[e + 1] <= b) e++;
    int64_t first;
    const int n = block_rows(offsets, blocks, e, b, &first);
    pack_rows(x, tokens, first, n, k, xpack + b * ((int64_t)k / 2 * TM));
  }
}

/* out[row] = packed row . w[e]^T for each expert's rows: w [E, n_out, k], out [rows, n_out].
 * Work items are (expert, 16 output features); tiles 0 (C), 2 (A), 4 (B). */
static void project_phase(const uint32_t* packed, const int64_t* offsets, const int64_t* blocks,
                          int num_experts, int k, int n_out, const uint16_t* w, uint16_t* out) {
  const int64_t block = (int64_t)k / 2 * TM; /* dwords per packed block */
#pragma omp for schedule(dynamic, 4)
  for (int item = 0; item < num_experts * (n_out / 16); item++) {
    const int e = item / (n_out / 16), f0 = item % (n_out / 16) * 16;
    const uint16_t* we = w + ((int64_t)e * n_out + f0) * k; /* 16 weight rows */
    float y[16][16];                                         /* [feature][token] */
    for (int64_t b = blocks[e]; b < blocks[e + 1]; b++) {
      const uint32_t* pb = packed + b * block;
      _tile_zero(0);
      for (int kb = 0; kb < k / 32; kb++) {
        _tile_loadd(2, we + kb * 32, k * 2);
        _tile_loadd(4, pb + (int64_t)kb * 16 * TM, 64);
        _tile_dpbf16ps(0, 2, 4);
      }
      _tile_stored(0, y, 64);
      __m512i rows[16];
      for (int i = 0; i < 16; i++) rows[i] = _mm512_loadu_si512(y[i]);
      transpose16(rows); /* -> [token][feature] */
      int64_t first;
      const int n = block_rows(offsets, blocks, e, b, &first);
      for (int m = 0; m < n; m++) {
        const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(rows[m]));
        _mm256_storeu_si256((__m256i*)(out + (first + m) * n_out + f0), v);
      }
    }
  }
}

/* act = bf16(silu(gate(x))) * up(x) per expert row, written in tile-B layout for the down
 * projection (intermediate features are its K). Items: (expert, 16 features); tiles 0-4. */
static void gate_up_phase(const uint32_t* xpack, const int64_t* blocks, int num_experts,
                          int hidden, int inter, const uint16_t* w13, uint32_t* actpack) {
  const int64_t xblock = (int64_t)hidden / 2 * TM, ablock = (int64_t)inter / 2 * TM; /* dwords */
#pragma omp for schedule(dynamic, 2)
  for (int item = 0; item < num_experts * (inter / 16); item++) {
    const int e = item / (inter / 16), f0 = item % (inter / 16) * 16;
    const uint16_t* wg = w13 + ((int64_t)e * 2 * inter + f0) * hidden; /* 16 gate rows */
    const uint16_t* wu = wg + (int64_t)inter * hidden;                  /* 16 up rows */
    float gate[16][16], up[16][16];                                      /* [feature][token] */
    for (int64_t b = blocks[e]; b < blocks[e + 1]; b++) {
      const uint32_t* xb = xpack + b * xblock;
      _tile_zero(0);
      _tile_zero(1);
      for (int kb = 0; kb < hidden / 32; kb++) {
        _tile_loadd(2, wg + kb * 32, hidden * 2);
        _tile_loadd(3, wu + kb * 32, hidden * 2);
        _tile_loadd(4, xb + (int64_t)kb * 16 * TM, 64);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 3, 4);
      }
      _tile_stored(0, gate, 64);
      _tile_stored(1, up, 64);
      /* features f0+i, f0+i+1 are one pair of the down projection's K dimension */
      uint32_t* ab = actpack + b * ablock + (int64_t)(f0 / 32) * 16 * TM + (f0 % 32) / 2 * TM;
      for (int i = 0; i < 16; i += 2) {
        const __m512i even = act16(gate[i], up[i]), odd = act16(gate[i + 1], up[i + 1]);
        _mm512_storeu_si512(ab + i / 2 * TM, _mm512_or_si512(even, _mm512_slli_epi32(odd, 16)));
      }
    }
  }
}

void moe_experts_amx(const uint16_t* x, const int64_t* tokens, const int64_t* offsets,
                     const int64_t* blocks, int num_experts, int hidden, int inter,
                     const uint16_t* w13, const uint16_t* w2, uint32_t* xpack, uint32_t* actpack,
                     uint16_t* out, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    configure_tiles(); /* per thread: tile state is per thread */
    pack_phase(x, tokens, offsets, blocks, num_experts, hidden, xpack);
    gate_up_phase(xpack, blocks, num_experts, hidden, inter, w13, actpack);
    project_phase(actpack, offsets, blocks, num_experts, inter, hidden, w2, out);
    _tile_release();
  }
}

/* out [m, n_out] = x [m, k] . w [n_out, k]^T in bf16 (fp32 sums), one 16-row block at a time;
 * xpack: ceil(m / 16) * k / 2 * 16 uint32 of scratch. */
void linear_amx(const uint16_t* x, int64_t m, int k, int n_out, const uint16_t* w,
                uint32_t* xpack, uint16_t* out, int num_threads) {
  const int64_t offsets[2] = {0, m}, blocks[2] = {0, (m + TM - 1) / TM};
#pragma omp parallel num_threads(num_threads)
  {
    configure_tiles();
    pack_phase(x, NULL, offsets, blocks, 1, k, xpack);
    project_phase(xpack, offsets, blocks, 1, k, n_out, w, out);
    _tile_release();
  }
}
