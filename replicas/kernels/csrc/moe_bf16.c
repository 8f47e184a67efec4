/* Routed experts of one MoE layer for few rows per expert (decode), bf16 on x86 AVX512-BF16
 * or AVX2 (simd.h).
 *
 * The GEMMs of a decode step have a handful of rows per expert, so they are bound by reading
 * the expert weights; oneDNN reaches 4-5 GB/s there on our 2-core machines. This kernel reads
 * each held expert's weights once per 4 rows (in tiles of 4 rows x 4 output features for
 * experts that stay in cache, see TILED_MAX_EXPERT_BYTES), with simd.h's vf_dpbf16 and fp32
 * accumulation, and parallelises over (expert, block of output features) with OpenMP (the same
 * libgomp as torch's).
 *
 * Numerics follow the PyTorch path: gate and up are rounded to bf16, silu(gate) is rounded to
 * bf16, their product is rounded to bf16; the down projection accumulates in fp32 and is
 * rounded once. Only the summation order inside each dot product differs from oneDNN's.
 *
 * Layout: x [R, H] rows grouped by expert, expert e owning rows offsets[e] .. offsets[e+1];
 * w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; act [R, I] scratch; out [R, H].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fp8.h"
#include "simd.h"

#define BLOCK 16 /* output features per work item */

/* a = bf16(silu(bf16(g))) * bf16(u) for 16 values (rounded to bf16 by the caller), as
 * up_streamed computes it one value at a time, with simd.h's vf_exp for expf. */
static inline void silu_times_up16(const float* g, const float* u, float* a) {
  const vf16 gate = vf_round_bf16(vf_load(g));
  const vf16 e = vf_exp(vf_sub(vf_zero(), gate));
  const vf16 silu = vf_round_bf16(vf_div(gate, vf_add(vf_set1(1.0f), e)));
  vf_store(a, vf_mul(silu, vf_round_bf16(vf_load(u))));
}

/* act rows [nr, I], features first..last = bf16(silu(bf16(gate))) * bf16(up) from the gate
 * and up sums g, u [feature - first][row] */
static void silu_times_up_rows(float g[BLOCK][4], float u[BLOCK][4], int nr, int inter,
                               int first, int last, uint16_t* act) {
  for (int f = first; f < last; f++)
    for (int q = 0; q < nr; q++) {
      const float gate = round_bf16(g[f - first][q]);
      const float silu = round_bf16(gate / (1.0f + expf(-gate)));
      act[(int64_t)q * inter + f] = f32_to_bf16(silu * round_bf16(u[f - first][q]));
    }
}

/* act rows [nr, I], features first..last = bf16(silu(bf16(x W_gate^T))) * bf16(x W_up^T):
 * each weight row read alone, front to back (simd.h's dot_weight_rows) */
static void up_streamed(const uint16_t* x, int nr, int hidden, int inter, const uint16_t* gate_w,
                        const uint16_t* up_w, int first, int last, uint16_t* act) {
  float g[BLOCK][4], u[BLOCK][4];
  for (int f = first; f < last; f++)
    dot_weight_rows(x, hidden, nr, gate_w + (int64_t)f * hidden, hidden, g[f - first]);
  for (int f = first; f < last; f++)
    dot_weight_rows(x, hidden, nr, up_w + (int64_t)f * hidden, hidden, u[f - first]);
  silu_times_up_rows(g, u, nr, inter, first, last, act);
}

/* the same in tiles of 4 rows x 4 features (simd.h's tile) */
static void up_tiled(const uint16_t* x, int nr, int hidden, int inter, const uint16_t* gate_w,
                     const uint16_t* up_w, int first, int last, uint16_t* act) {
  for (int f = first; f < last; f += 4) {
    const int nf = last - f < 4 ? last - f : 4;
    const uint16_t* rows[4];
    float g[16], u[16], a[16];
    feature_rows(gate_w, hidden, f, last, rows);
    tile_rows(x, hidden, nr, rows, hidden, g);
    feature_rows(up_w, hidden, f, last, rows);
    tile_rows(x, hidden, nr, rows, hidden, u);
    silu_times_up16(g, u, a);
    for (int q = 0; q < nr; q++)
      for (int c = 0; c < nf; c++) act[(int64_t)q * inter + f + c] = f32_to_bf16(a[4 * q + c]);
  }
}

/* Whole groups of 4 rows of an expert up to this size take tiles of 4 rows x 4 features (the
 * sums across lanes shared by 16 outputs); other groups, and larger experts, read each weight
 * row alone, front to back. Measured on 2 cores (Zen 4), one thread, one layer's experts, tiles
 * vs rows alone: bundled model (96 KiB experts), weights in cache, 64 rows 166-264 vs 220-353
 * us, 128 rows 377-475 vs 665-672; weights from memory, 64 rows 390 vs 456 us, but 2 rows 41 vs
 * 33 and 16 rows 205 vs 185; small preset (1.5 MiB, from memory), 4 rows per expert, 7.1-7.5
 * vs 3.1-3.2 ms. So a row's result depends on whether its group of 4 is whole. */
#define TILED_MAX_EXPERT_BYTES (256 << 10)

void moe_experts_bf16(const uint16_t* x, const int64_t* offsets, int num_experts, int hidden,
                      int inter, const uint16_t* w13, const uint16_t* w2, uint16_t* act,
                      uint16_t* out, int num_threads) {
  const int blocks_up = (inter + BLOCK - 1) / BLOCK, blocks_down = (hidden + BLOCK - 1) / BLOCK;
  const long items_up = (long)num_experts * blocks_up, items_down = (long)num_experts * blocks_down;
  const int tiles = (int64_t)3 * inter * hidden * 2 <= TILED_MAX_EXPERT_BYTES;

#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
  for (long item = 0; item < items_up; item++) {
    const int e = (int)(item / blocks_up), first = (int)(item % blocks_up) * BLOCK;
    const int64_t r0 = offsets[e], r1 = offsets[e + 1];
    const int last = first + BLOCK < inter ? first + BLOCK : inter;
    const uint16_t* gate_w = w13 + (int64_t)e * 2 * inter * hidden;
    const uint16_t* up_w = gate_w + (int64_t)inter * hidden;
    for (int64_t r = r0; r < r1; r += 4) {
      const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
      if (tiles && nr == 4)
        up_tiled(x + r * hidden, nr, hidden, inter, gate_w, up_w, first, last, act + r * inter);
      else
        up_streamed(x + r * hidden, nr, hidden, inter, gate_w, up_w, first, last, act + r * inter);
    }
  }

#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads)
  for (long item = 0; item < items_down; item++) {
    const int e = (int)(item / blocks_down), first = (int)(item % blocks_down) * BLOCK;
    const int64_t r0 = offsets[e], r1 = offsets[e + 1];
    const int last = first + BLOCK < hidden ? first + BLOCK : hidden;
    const uint16_t* down_w = w2 + (int64_t)e * hidden * inter;
    for (int64_t r = r0; r < r1; r += 4) {
      const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
      if (tiles && nr == 4) /* out = bf16(act W_down^T) */
        project_tiled(act + r * inter, inter, nr, down_w, inter, first, last, out + r * hidden,
                      hidden);
      else
        project_streamed(act + r * inter, inter, nr, down_w, inter, first, last,
                         out + r * hidden, hidden);
    }
  }
}

/* A whole routed-expert layer for the few tokens of a decode step, when this process holds
 * every expert the tokens chose: group the N x K slots by expert (slot order within an expert,
 * as RoutedExperts.compute_rows), run the experts on them (moe_experts_bf16, or moe_experts_fp8
 * below), and combine each token's K outputs as model.weighted_sum does (fp32 products, summed
 * in slot order, rounded once), so the result is bit for bit the unfused path's.
 *
 * topk_ids [N, K] global expert ids, topk_w [N, K] fp32, local_index [num_ids] (local slot
 * of each global id, -1 if not held); scratch: order [N K] int64, offsets [num_local + 1] int64,
 * h [N K, H], act [N K, I], y [N K, H]; out [N, H]. */

/* The grouping: offsets of each held expert's rows, order[s] = the row of slot s, h = x's row
 * of each slot. Returns 0; 1 without doing anything when a slot's expert is not held here or
 * the slots average more than max_rows_per_expert rows per used expert (the caller then takes
 * the general path); 2 when an id is outside [0, num_ids), maps past the held experts, or
 * k < 1. */
static int group_slots(const uint16_t* x, int n, int hidden, int k, const int64_t* topk_ids,
                       const int64_t* local_index, int num_ids, int num_local,
                       int max_rows_per_expert, int64_t* order, int64_t* offsets, uint16_t* h) {
  const int slots = n * k;
  if (k < 1) return 2;
  memset(offsets, 0, sizeof(int64_t) * (num_local + 1));
  for (int s = 0; s < slots; s++)
    if (topk_ids[s] < 0 || topk_ids[s] >= num_ids || local_index[topk_ids[s]] >= num_local)
      return 2;
  for (int s = 0; s < slots; s++) {
    const int64_t e = local_index[topk_ids[s]];
    if (e < 0) return 1;
    offsets[e + 1]++;
  }
  int used = 0;
  for (int e = 0; e < num_local; e++) used += offsets[e + 1] > 0;
  if (slots > (int64_t)max_rows_per_expert * used) return 1;
  for (int e = 0; e < num_local; e++) offsets[e + 1] += offsets[e];
  int64_t fill[num_local]; /* the next row of each expert */
  for (int e = 0; e < num_local; e++) fill[e] = offsets[e];
  for (int s = 0; s < slots; s++) { /* stable: slot order within each expert */
    const int64_t row = fill[local_index[topk_ids[s]]]++;
    order[s] = row;
    memcpy(h + row * hidden, x + (int64_t)(s / k) * hidden, sizeof(uint16_t) * hidden);
  }
  return 0;
}

/* The combine: out[t] = bf16(sum over j < k of fp32(y[order[t k + j]]) * topk_w[t k + j]) */
static void combine_slots(const uint16_t* y, int n, int hidden, int k, const float* topk_w,
                          const int64_t* order, uint16_t* out) {
  for (int t = 0; t < n; t++) {
    uint16_t* o = out + (int64_t)t * hidden;
    for (int i = 0; i < hidden; i++) {
      float acc = bf16_to_f32(y[order[t * k] * hidden + i]) * topk_w[t * k];
      for (int j = 1; j < k; j++) {
        const float p = bf16_to_f32(y[order[t * k + j] * hidden + i]) * topk_w[t * k + j];
        acc = acc + p;
      }
      o[i] = f32_to_bf16(acc);
    }
  }
}

/* bf16 experts (w13, w2 as moe_experts_bf16's for the num_local held experts): returns
 * group_slots' code */
int moe_layer_decode_bf16(const uint16_t* x, int n, int hidden, int inter, int k,
                          const int64_t* topk_ids, const float* topk_w,
                          const int64_t* local_index, int num_ids, int num_local,
                          int max_rows_per_expert,
                          const uint16_t* w13, const uint16_t* w2, int64_t* order,
                          int64_t* offsets, uint16_t* h, uint16_t* act, uint16_t* y,
                          uint16_t* out, int num_threads) {
  const int code = group_slots(x, n, hidden, k, topk_ids, local_index, num_ids, num_local,
                               max_rows_per_expert, order, offsets, h);
  if (code) return code;
  moe_experts_bf16(h, offsets, num_local, hidden, inter, w13, w2, act, y, num_threads);
  combine_slots(y, n, hidden, k, topk_w, order, out);
  return 0;
}

/* ---- FP8 weights -------------------------------------------------------------------------
 * Block-wise e4m3 weights (replicas/model/quantization.py): byte weights, one fp32 scale per
 * block of br rows x bc columns, partial blocks at the edges. Each work item dequantizes the
 * weight rows it reads (its 16 output features) into a bf16 scratch of its thread, the fp32
 * product rounded to nearest even as quantization.dequantize does, and runs the bf16 routines
 * above on it: the results are moe_experts_bf16's on the dequantized weights, bit for bit,
 * while the weights read from memory are half as many bytes. (Products below FLT_MIN, which
 * the vector rounding flushes to zero, scales of 2^120 and more, and the NaN codes 0x7f / 0xff,
 * read as +-480, are the exceptions; none occurs in a quantized checkpoint's weights.)
 * Measured on 2 cores (Xeon with AVX512-FP16, no AMX), one thread, weights in cache: the
 * conversion through fp16 below makes 7.1-7.8 G weights/s, against 2.9-3.4 for the earlier
 * bit-by-bit one through fp32 with a blend for subnormals and a division per 16 weights. From
 * memory at K-EXAONE's expert size that scratch path reads 7-10 GB/s of FP8 against ~17-20 of
 * bf16: decoding, not memory, bounds it, hence the lookup path below for streamed experts. */

#ifdef EXAONE_FP8_LOOKUP
/* moe_experts_fp8 for streamed experts (larger than TILED_MAX_EXPERT_BYTES) with blocks of a
 * multiple of 64 columns: every block's table (fp8.h) worked out first, for the experts that got
 * rows, then each weight row dequantized in registers as it is read (dot_fp8_row). Measured on
 * 2 cores (AMD Zen 4), one thread, the small preset's experts read from memory, one token: 0.15-
 * 0.16 ms against 0.28-0.31 through the scratch and 0.20-0.21 on bf16 weights. Returns 1 when
 * the tables cannot be had. */
static int moe_experts_fp8_lookup(const uint16_t* x, const int64_t* offsets, int num_experts,
                                  int hidden, int inter, const uint8_t* w13, const float* s13,
                                  const uint8_t* w2, const float* s2, int br, int bc,
                                  uint16_t* act, uint16_t* out, int num_threads) {
  const int blocks_up = (inter + BLOCK - 1) / BLOCK, blocks_down = (hidden + BLOCK - 1) / BLOCK;
  const long items_up = (long)num_experts * blocks_up, items_down = (long)num_experts * blocks_down;
  const int gi = (inter + br - 1) / br, gh = (hidden + bc - 1) / bc; /* w13 halves' grids */
  const int gh2 = (hidden + br - 1) / br, gi2 = (inter + bc - 1) / bc; /* w2's grid */
  const int64_t per13 = (int64_t)2 * gi * gh, per_expert = per13 + (int64_t)gh2 * gi2;
  int64_t* slot = malloc(sizeof(int64_t) * (num_experts + 1));
  if (slot == NULL) return 1;
  int used = 0;
  for (int e = 0; e < num_experts; e++) slot[e] = offsets[e + 1] > offsets[e] ? used++ : -1;
  uint8_t* tables = malloc((size_t)FP8_TABLE_BYTES * per_expert * (used > 0 ? used : 1));
  if (tables == NULL) {
    free(slot);
    return 1;
  }
  const __m512i order = fp8_order();

#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static)
    for (int e = 0; e < num_experts; e++)
      if (slot[e] >= 0) {
        uint8_t* t = tables + (int64_t)FP8_TABLE_BYTES * per_expert * slot[e];
        fp8_tables(s13 + (int64_t)e * per13, per13, t);
        fp8_tables(s2 + (int64_t)e * gh2 * gi2, (int64_t)gh2 * gi2,
                   t + (int64_t)FP8_TABLE_BYTES * per13);
      }

#pragma omp for schedule(dynamic, 4)
    for (long item = 0; item < items_up; item++) {
      const int e = (int)(item / blocks_up), first = (int)(item % blocks_up) * BLOCK;
      const int64_t r0 = offsets[e], r1 = offsets[e + 1];
      if (r0 == r1) continue;
      const int last = first + BLOCK < inter ? first + BLOCK : inter;
      const uint8_t* gate_w = w13 + (int64_t)e * 2 * inter * hidden;
      const uint8_t* up_w = gate_w + (int64_t)inter * hidden;
      const uint8_t* gate_t = tables + (int64_t)FP8_TABLE_BYTES * per_expert * slot[e];
      const uint8_t* up_t = gate_t + (int64_t)FP8_TABLE_BYTES * gi * gh;
      for (int64_t r = r0; r < r1; r += 4) {
        const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
        const uint16_t* xr = x + r * hidden;
        float g[BLOCK][4], u[BLOCK][4];
        for (int f = first; f < last; f++)
          dot_fp8_rows(xr, hidden, nr, gate_w + (int64_t)f * hidden, hidden,
                       gate_t + (int64_t)FP8_TABLE_BYTES * (f / br) * gh, bc, order,
                       g[f - first]);
        for (int f = first; f < last; f++)
          dot_fp8_rows(xr, hidden, nr, up_w + (int64_t)f * hidden, hidden,
                       up_t + (int64_t)FP8_TABLE_BYTES * (f / br) * gh, bc, order, u[f - first]);
        silu_times_up_rows(g, u, nr, inter, first, last, act + r * inter);
      }
    }

#pragma omp for schedule(dynamic, 4)
    for (long item = 0; item < items_down; item++) {
      const int e = (int)(item / blocks_down), first = (int)(item % blocks_down) * BLOCK;
      const int64_t r0 = offsets[e], r1 = offsets[e + 1];
      if (r0 == r1) continue;
      const int last = first + BLOCK < hidden ? first + BLOCK : hidden;
      const uint8_t* down_w = w2 + (int64_t)e * hidden * inter;
      const uint8_t* down_t =
          tables + (int64_t)FP8_TABLE_BYTES * (per_expert * slot[e] + per13);
      for (int64_t r = r0; r < r1; r += 4) {
        const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
        project_fp8(act + r * inter, inter, nr, down_w, inter, down_t, gi2, br, bc, order, first,
                    last, out + r * hidden, hidden);
      }
    }
  }
  free(tables);
  free(slot);
  return 0;
}
#endif

/* moe_experts_bf16 on FP8 weights: w13 [E, 2I, H] e4m3 with s13 [E, 2, ceil(I/br), ceil(H/bc)]
 * (gate's scale grid, then up's: the checkpoint's two tensors), w2 [E, H, I] with
 * s2 [E, ceil(H/br), ceil(I/bc)]. Returns 0, or 1 when a thread's scratch cannot be had. */
int moe_experts_fp8(const uint16_t* x, const int64_t* offsets, int num_experts, int hidden,
                    int inter, const uint8_t* w13, const float* s13, const uint8_t* w2,
                    const float* s2, int br, int bc, uint16_t* act, uint16_t* out,
                    int num_threads) {
  const int blocks_up = (inter + BLOCK - 1) / BLOCK, blocks_down = (hidden + BLOCK - 1) / BLOCK;
  const long items_up = (long)num_experts * blocks_up, items_down = (long)num_experts * blocks_down;
  const int tiles = (int64_t)3 * inter * hidden * 2 <= TILED_MAX_EXPERT_BYTES;
  const int gi = (inter + br - 1) / br, gh = (hidden + bc - 1) / bc; /* w13 halves' grids */
  const int gh2 = (hidden + br - 1) / br, gi2 = (inter + bc - 1) / bc; /* w2's grid */
  const int widest = hidden > inter ? hidden : inter;
  int failed = 0;
#ifdef EXAONE_FP8_LOOKUP
  if (!tiles && bc % 64 == 0)
    return moe_experts_fp8_lookup(x, offsets, num_experts, hidden, inter, w13, s13, w2, s2, br,
                                  bc, act, out, num_threads);
#endif

#pragma omp parallel num_threads(num_threads)
  {
    uint16_t* scratch = malloc(sizeof(uint16_t) * 2 * BLOCK * (size_t)widest);
    if (scratch == NULL) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp barrier
    if (!failed) {
      uint16_t* gate_rows = scratch;
      uint16_t* up_rows = scratch + (size_t)BLOCK * widest;
#pragma omp for schedule(dynamic, 4)
      for (long item = 0; item < items_up; item++) {
        const int e = (int)(item / blocks_up), first = (int)(item % blocks_up) * BLOCK;
        const int64_t r0 = offsets[e], r1 = offsets[e + 1];
        if (r0 == r1) continue;
        const int last = first + BLOCK < inter ? first + BLOCK : inter;
        const uint8_t* gate_w = w13 + (int64_t)e * 2 * inter * hidden;
        const float* gate_s = s13 + (int64_t)e * 2 * gi * gh;
        /* 4 features at a time (tile's groups of 4), so the dequantized rows stay in L1 */
        for (int f = first; f < last; f += 4) {
          const int nf = last - f < 4 ? last - f : 4;
          dequant_rows(gate_w, gate_s, gh, br, bc, f, nf, hidden, gate_rows);
          dequant_rows(gate_w + (int64_t)inter * hidden, gate_s + (int64_t)gi * gh, gh, br, bc,
                       f, nf, hidden, up_rows);
          for (int64_t r = r0; r < r1; r += 4) {
            const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
            uint16_t* a = act + r * inter + f;
            if (tiles && nr == 4)
              up_tiled(x + r * hidden, nr, hidden, inter, gate_rows, up_rows, 0, nf, a);
            else
              up_streamed(x + r * hidden, nr, hidden, inter, gate_rows, up_rows, 0, nf, a);
          }
        }
      }
#pragma omp for schedule(dynamic, 4)
      for (long item = 0; item < items_down; item++) {
        const int e = (int)(item / blocks_down), first = (int)(item % blocks_down) * BLOCK;
        const int64_t r0 = offsets[e], r1 = offsets[e + 1];
        if (r0 == r1) continue;
        const int last = first + BLOCK < hidden ? first + BLOCK : hidden;
        for (int f = first; f < last; f += 4) {
          const int nf = last - f < 4 ? last - f : 4;
          dequant_rows(w2 + (int64_t)e * hidden * inter, s2 + (int64_t)e * gh2 * gi2, gi2, br,
                       bc, f, nf, inter, gate_rows);
          for (int64_t r = r0; r < r1; r += 4) {
            const int nr = r1 - r < 4 ? (int)(r1 - r) : 4;
            if (tiles && nr == 4)
              project_tiled(act + r * inter, inter, nr, gate_rows, inter, 0, nf,
                            out + r * hidden + f, hidden);
            else
              project_streamed(act + r * inter, inter, nr, gate_rows, inter, 0, nf,
                               out + r * hidden + f, hidden);
          }
        }
      }
    }
    free(scratch);
  }
  return failed;
}

/* moe_layer_decode_bf16 on FP8 experts (w13, s13, w2, s2, br, bc as moe_experts_fp8's):
 * group_slots' code, or 3 when moe_experts_fp8 found no memory for its scratch or tables */
int moe_layer_decode_fp8(const uint16_t* x, int n, int hidden, int inter, int k,
                         const int64_t* topk_ids, const float* topk_w, const int64_t* local_index,
                         int num_ids, int num_local, int max_rows_per_expert, const uint8_t* w13,
                         const float* s13, const uint8_t* w2, const float* s2, int br, int bc,
                         int64_t* order, int64_t* offsets, uint16_t* h, uint16_t* act,
                         uint16_t* y, uint16_t* out, int num_threads) {
  const int code = group_slots(x, n, hidden, k, topk_ids, local_index, num_ids, num_local,
                               max_rows_per_expert, order, offsets, h);
  if (code) return code;
  if (moe_experts_fp8(h, offsets, num_local, hidden, inter, w13, s13, w2, s2, br, bc, act, y,
                      num_threads))
    return 3;
  combine_slots(y, n, hidden, k, topk_w, order, out);
  return 0;
}

/* w [mats, rows, cols] e4m3 with scale [mats, ceil(rows / br), ceil(cols / bc)] -> dst [mats,
 * rows, cols] bf16, the values quantization.dequantize gives (dequant_rows; the exceptions
 * above), block rows of every matrix split over OpenMP threads: for the paths that take the
 * weights as they compute (many rows per expert), instead of PyTorch's expand-multiply-cast. */
void dequantize_fp8_bf16(const uint8_t* w, const float* scale, int mats, int rows, int cols,
                         int br, int bc, uint16_t* dst, int num_threads) {
  const int gr = (rows + br - 1) / br, gc = (cols + bc - 1) / bc;
  const long items = (long)mats * gr;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (long item = 0; item < items; item++) {
    const int m = (int)(item / gr), r0 = (int)(item % gr) * br;
    const int nr = rows - r0 < br ? rows - r0 : br;
    dequant_rows(w + (int64_t)m * rows * cols, scale + (int64_t)m * gr * gc, gc, br, bc, r0, nr,
                 cols, dst + ((int64_t)m * rows + r0) * cols);
  }
}
