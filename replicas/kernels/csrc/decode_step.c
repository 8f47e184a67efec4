/* A colocated bf16 model's step of up to 64 rows, layer after layer, in a few calls per layer.
 *
 * replicas/engine/decode_path.py runs a decode step as a chain of calls into this library's
 * kernels with small PyTorch operations between them, and the model's modules run any other
 * step that way; on a small model the Python and PyTorch dispatch around those calls cost more
 * than the kernels (bundled model, one sequence: about 1.7 ms of a 2.7 ms step). decode_layers
 * makes the same kernel calls, on the same inputs, in the same order, and does the operations
 * between them itself, each rounded where PyTorch rounds:
 *
 *   embedding    the rows of the table, copied
 *   residuals    h = bf16(h + y)                                  (fp32 sum, nearest even)
 *   MoE output   h = bf16(h + bf16(routed + shared))
 *   SwiGLU       act = bf16(silu(gate) * up): silu from a table of PyTorch's own silu of every
 *                bf16 value at that width (F.silu computes in fp32 with its own exp, so a table
 *                is the way to its bits), the product rounded as PyTorch's bf16 multiply
 *   KV writes    a decode step's keys and values copied to their cache rows (index_copy_)
 *
 * so its hidden states equal the Python paths' bit for bit. The router of each MoE layer keeps
 * its fp32 GEMM and sigmoid in PyTorch (their bits are PyTorch's alone): the call returns at a
 * MoE layer with the router's input in s->x32 and resumes with the scores; the rest of the
 * router (bias, top-k, normalising, scaling) runs here where it is PyTorch's to the bit (one
 * group; top-k of at most 2 when normalised; no tie among a row's top k + 1), else the caller
 * runs the whole router and calls again with the chosen experts and their weights. A decode-only step attends here (decode_attention_bf16); any
 * other step (prompt chunks, drafts to verify) returns at each layer's attention for the caller
 * to attend through its KV-cache backend.
 *
 * Projections: linear_bf16 up to s->stream_rows rows, linear_packed_bf16 on the packed weight
 * beyond, or linear_bf16_torch where a weight has no packed copy (the AVX2 build; the caller
 * checks that every weight has what its row count needs, as Linear chooses).
 */
#include <stdint.h>
#include <string.h>

#include "simd.h"

void rms_norm_bf16(const uint16_t* x, int rows, int dim, int64_t stride, const uint16_t* w,
                   float eps, uint16_t* out);
void qk_norm_rope_bf16(const uint16_t* qkv, int tokens, int64_t stride, int q_heads, int kv_heads,
                       int d, const uint16_t* q_w, const uint16_t* k_w, float eps,
                       const uint16_t* cos, const uint16_t* sin, uint16_t* q_out,
                       uint16_t* k_out);
void linear_bf16(const uint16_t* x, int m, int k, int n, const uint16_t* w, uint16_t* out,
                 int num_threads);
void linear_packed_bf16(const uint16_t* x, int m, int k, int n, const uint16_t* wp,
                        uint16_t* out, int num_threads);
#ifndef EXAONE_AVX512
void linear_bf16_torch(const uint16_t* x, int m, int k, int n, const uint16_t* w, uint16_t* out,
                       int num_threads);
#endif
void decode_attention_bf16(const uint16_t* q, const uint16_t* k_pool, const uint16_t* v_pool,
                           const int64_t* rows, int num_rows, const uint16_t* k_extra,
                           const uint16_t* v_extra, const uint8_t* valid, int batch, int heads,
                           int kv_heads, int dim, float scale, float* scores, uint16_t* out,
                           int num_threads);
int moe_layer_decode_bf16(const uint16_t* x, int n, int hidden, int inter, int k,
                          const int64_t* topk_ids, const float* topk_w,
                          const int64_t* local_index, int num_ids, int num_local,
                          int max_rows_per_expert, const uint16_t* w13, const uint16_t* w2,
                          int64_t* order, int64_t* offsets, uint16_t* h, uint16_t* act,
                          uint16_t* y, uint16_t* out, int num_threads);

typedef struct { /* a bf16 weight [out, in], and its pack_vnni_bf16 copy or NULL */
  const uint16_t* w;
  const uint16_t* packed;
  int in, out;
} Proj;

typedef struct { /* one decoder layer: fixed while the model serves */
  const uint16_t* in_norm;
  const uint16_t* post_norm;
  float eps;
  Proj qkv, o;
  const uint16_t* q_norm;
  const uint16_t* k_norm;
  float qk_eps;
  int rope;    /* RoPE on q and k */
  int sliding; /* keys in a sliding ring (else the global pool) */
  uint16_t* k_cache;
  uint16_t* v_cache;
  int moe;       /* a MoE layer (else a dense SwiGLU) */
  Proj gate_up;  /* the dense SwiGLU's, or the shared expert's: [2I, H] */
  Proj down;     /* [H, I] */
  const uint16_t* silu; /* [65536] PyTorch's silu of every bf16 value, as this width computes it */
  const uint16_t* w13; /* routed experts (MoE layers): [E, 2I', H], [E, H, I'] */
  const uint16_t* w2;
  const int64_t* local_index;
  int num_ids, num_local, expert_inter, max_rows;
  int c_router;         /* the router's tail (after PyTorch's sigmoid scores) runs here */
  const float* bias;    /* [E] the router's e_score_correction_bias */
  int num_experts, norm_topk;
  float scaling;        /* routed_scaling_factor */
} DecodeLayer;

typedef struct { /* one step: its rows, indices and scratch */
  int external_attention; /* the caller attends (any step); else decode_attention (decode only) */
  int n, hidden, q_heads, kv_heads, head_dim, top_k, stream_rows, threads;
  float scale;
  const int64_t* ids;     /* [n] token ids */
  const uint16_t* embed;  /* [V, H] */
  const uint16_t* cos;    /* [n, D] */
  const uint16_t* sin;
  uint16_t* h;            /* [n, H] the residual stream */
  uint16_t* x;            /* [n, H] a norm's output (the router's input at a MoE layer) */
  uint16_t* qkv;          /* [n, (Hq + 2 Hkv) D] */
  uint16_t* q;            /* [n, Hq D] */
  uint16_t* k;            /* [n, Hkv D] */
  uint16_t* v;            /* [n, Hkv D] */
  uint16_t* attn;         /* [n, Hq D] */
  uint16_t* proj;         /* [n, H] */
  uint16_t* gate_up;      /* [n, 2 I] (the widest SwiGLU's) */
  uint16_t* act;          /* [n, I] */
  uint16_t* routed;       /* [n, H] */
  float* x32;             /* [n, H] s->x in fp32 (the router's GEMM input) */
  int64_t* topk_ids;      /* [n, K] the router's choice, when its tail runs here */
  float* topk_w;          /* [n, K] */
  int64_t* order;         /* moe_layer_decode_bf16's scratch */
  int64_t* offsets;
  uint16_t* slot_h;
  uint16_t* slot_act;
  uint16_t* slot_y;
  float* scores;          /* decode_attention_bf16's scratch */
  const int64_t* write_rows;   /* global pool row of each sequence's new token */
  const int64_t* global_rows;  /* [n, global_keys] */
  const uint8_t* global_valid;
  int global_keys;
  const int64_t* ring_rows;    /* [n, ring_keys] rows of the flat ring */
  const uint8_t* ring_valid;   /* [n, ring_keys + 1] */
  const int64_t* ring_dst;     /* [n] ring row each new token goes to */
  int ring_keys;
  const uint16_t* final_norm;
  float final_eps;
  uint16_t* out;               /* [n, H] the final norm's output */
} DecodeStep;

static void project(const DecodeStep* s, const Proj* p, const uint16_t* x, uint16_t* out) {
  if (s->n <= s->stream_rows)
    linear_bf16(x, s->n, p->in, p->out, p->w, out, s->threads);
#ifndef EXAONE_AVX512
  else if (!p->packed) /* the AVX2 build's rows past stream_rows */
    linear_bf16_torch(x, s->n, p->in, p->out, p->w, out, s->threads);
#endif
  else
    linear_packed_bf16(x, s->n, p->in, p->out, p->packed, out, s->threads);
}

static void add_rows(uint16_t* h, const uint16_t* y, int64_t count) { /* h = bf16(h + y) */
  for (int64_t i = 0; i < count; i++) h[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(y[i]));
}

static void copy_rows(uint16_t* pool, const int64_t* rows, const uint16_t* src, int n,
                      int64_t width) {
  for (int b = 0; b < n; b++)
    memcpy(pool + rows[b] * width, src + (int64_t)b * width, sizeof(uint16_t) * width);
}

/* s->x = norm(h); q, k (and v, contiguous) of the step's rows */
static void attention_inputs(const DecodeLayer* L, const DecodeStep* s) {
  const int n = s->n, hd = s->head_dim;
  const int64_t q_size = (int64_t)s->q_heads * hd, kv_size = (int64_t)s->kv_heads * hd;
  const int64_t width = q_size + 2 * kv_size;
  rms_norm_bf16(s->h, n, s->hidden, s->hidden, L->in_norm, L->eps, s->x);
  project(s, &L->qkv, s->x, s->qkv);
  qk_norm_rope_bf16(s->qkv, n, width, s->q_heads, s->kv_heads, hd, L->q_norm, L->k_norm,
                    L->qk_eps, L->rope ? s->cos : 0, L->rope ? s->sin : 0, s->q, s->k);
  for (int b = 0; b < n; b++)
    memcpy(s->v + b * kv_size, s->qkv + b * width + q_size + kv_size, sizeof(uint16_t) * kv_size);
}

/* s->attn = attention of a decode-only step (one new token per sequence), with its KV writes */
static void decode_attention(const DecodeLayer* L, const DecodeStep* s) {
  const int n = s->n, hd = s->head_dim;
  const int64_t kv_size = (int64_t)s->kv_heads * hd;
  if (L->sliding) { /* keys: the ring, then the token itself; the ring takes it after */
    decode_attention_bf16(s->q, L->k_cache, L->v_cache, s->ring_rows, s->ring_keys, s->k, s->v,
                          s->ring_valid, n, s->q_heads, s->kv_heads, hd, s->scale, s->scores,
                          s->attn, s->threads);
    copy_rows(L->k_cache, s->ring_dst, s->k, n, kv_size);
    copy_rows(L->v_cache, s->ring_dst, s->v, n, kv_size);
  } else {
    copy_rows(L->k_cache, s->write_rows, s->k, n, kv_size);
    copy_rows(L->v_cache, s->write_rows, s->v, n, kv_size);
    decode_attention_bf16(s->q, L->k_cache, L->v_cache, s->global_rows, s->global_keys, 0, 0,
                          s->global_valid, n, s->q_heads, s->kv_heads, hd, s->scale, s->scores,
                          s->attn, s->threads);
  }
}

/* h += o_proj(attn); then s->x = post_attention_norm(h) */
static void attention_output(const DecodeLayer* L, const DecodeStep* s, const uint16_t* attn) {
  project(s, &L->o, attn, s->proj);
  add_rows(s->h, s->proj, (int64_t)s->n * s->hidden);
  rms_norm_bf16(s->h, s->n, s->hidden, s->hidden, L->post_norm, L->eps, s->x);
}

/* s->proj = down(bf16(silu(gate(x)) * up(x))), gate_up's rows gate then up */
static void swiglu(const DecodeLayer* L, const DecodeStep* s) {
  const int inter = L->gate_up.out / 2;
  project(s, &L->gate_up, s->x, s->gate_up);
  for (int b = 0; b < s->n; b++) {
    const uint16_t* g = s->gate_up + (int64_t)b * 2 * inter;
    uint16_t* a = s->act + (int64_t)b * inter;
    for (int j = 0; j < inter; j++)
      a[j] = f32_to_bf16(bf16_to_f32(L->silu[g[j]]) * bf16_to_f32(g[inter + j]));
  }
  project(s, &L->down, s->act, s->proj);
}

/* The router after its scores (PyTorch's sigmoid of the fp32 GEMM, [n, E]), as MoEGate does
 * it for one group: choice = scores + bias, the top k of choice (largest first), their scores,
 * normalised (k <= 2: the sum's order is the only one) and scaled, each an fp32 operation as
 * PyTorch's. Returns 1 without a choice where a row has a NaN or two equal values among its top
 * k + 1 (PyTorch's topk breaks such ties its own way): the caller runs the router in PyTorch. */
static int router_tail(const DecodeLayer* L, const DecodeStep* s, const float* scores) {
  const int k = s->top_k, e = L->num_experts;
  for (int t = 0; t < s->n; t++) {
    const float* sc = scores + (int64_t)t * e;
    int64_t* ids = s->topk_ids + (int64_t)t * k;
    float best[k + 1];
    int bi[k + 1];
    int have = 0; /* best[0 .. have): the largest k + 1 values so far, largest first */
    for (int j = 0; j < e; j++) {
      const float c = sc[j] + L->bias[j];
      if (c != c) return 1; /* NaN */
      int pos = 0;
      while (pos < have && best[pos] > c) pos++;
      if (pos > k) continue; /* below the k + 1 largest */
      if (pos < have && best[pos] == c) return 1;
      for (int q = have < k + 1 ? have : k; q > pos; q--) best[q] = best[q - 1], bi[q] = bi[q - 1];
      best[pos] = c, bi[pos] = j;
      if (have < k + 1) have++;
    }
    float* w = s->topk_w + (int64_t)t * k;
    for (int q = 0; q < k; q++) ids[q] = bi[q], w[q] = sc[bi[q]];
    if (L->norm_topk) {
      float sum = w[0];
      for (int q = 1; q < k; q++) sum = sum + w[q];
      const float denom = sum + 1e-20f;
      for (int q = 0; q < k; q++) w[q] = w[q] / denom;
    }
    for (int q = 0; q < k; q++) w[q] = w[q] * L->scaling;
  }
  return 0;
}

enum { DONE = 0, ROUTER = 1, ROUTED = 2, ATTEND = 3, SCORES = 4 }; /* what the caller does next */
enum { BEGIN = 0, AFTER_ATTEND = 1, AFTER_ROUTER = 2, WITH_ROUTED = 3, AFTER_SCORES = 4 };

/* Runs the step from layer `start`, resuming as `phase` says: BEGIN at that layer's attention
 * (at 0 with the embedding); AFTER_ATTEND with `attn` [n, Hq D], the attention output the caller
 * computed from s->q, s->k, s->v (and wrote to the cache); AFTER_ROUTER with `topk_ids` /
 * `topk_w`, the router's choice from s->x; WITH_ROUTED with `routed` [n, H], that layer's
 * routed-expert output the caller computed.
 * AFTER_SCORES with `scores` [n, E], the router's sigmoid scores the caller computed from s->x32
 * (layers with c_router; the rest of the router runs here).
 * Returns layer * 8 + what the caller does next: DONE (layer = num_layers; s->out holds the
 * final norm's rows), ROUTER (run layer's router on s->x), ROUTED (compute layer's routed
 * experts: the C kernel declined them, with an expert not held or too many rows per expert),
 * ATTEND (only with s->external_attention: attend layer's q, k, v), SCORES (a c_router layer:
 * the router's sigmoid scores from s->x32); -1 on bad expert ids. */
int decode_layers(const DecodeLayer* layers, int num_layers, const DecodeStep* s, int start,
                  int phase, const int64_t* topk_ids, const float* topk_w,
                  const uint16_t* routed, const uint16_t* attn, const float* scores) {
  const int64_t count = (int64_t)s->n * s->hidden;
  if (phase == BEGIN && start == 0)
    for (int b = 0; b < s->n; b++)
      memcpy(s->h + (int64_t)b * s->hidden, s->embed + s->ids[b] * s->hidden,
             sizeof(uint16_t) * s->hidden);
  for (int i = start; i < num_layers; i++, phase = BEGIN) {
    const DecodeLayer* L = layers + i;
    if (phase == BEGIN) {
      attention_inputs(L, s);
      if (s->external_attention) return i * 8 + ATTEND;
      decode_attention(L, s);
      attn = s->attn;
      phase = AFTER_ATTEND;
    }
    if (phase == AFTER_ATTEND) {
      attention_output(L, s, attn);
      if (L->moe && L->c_router) {
        for (int64_t j = 0; j < count; j++) s->x32[j] = bf16_to_f32(s->x[j]);
        return i * 8 + SCORES;
      }
      if (L->moe) return i * 8 + ROUTER;
    }
    if (phase == AFTER_SCORES) {
      if (router_tail(L, s, scores)) return i * 8 + ROUTER;
      topk_ids = s->topk_ids, topk_w = s->topk_w;
    }
    if (!L->moe) {
      swiglu(L, s);
      add_rows(s->h, s->proj, count);
      continue;
    }
    const uint16_t* r = routed;
    if (phase != WITH_ROUTED) {
      const int code = moe_layer_decode_bf16(
          s->x, s->n, s->hidden, L->expert_inter, s->top_k, topk_ids, topk_w, L->local_index,
          L->num_ids, L->num_local, L->max_rows, L->w13, L->w2, s->order, s->offsets, s->slot_h,
          s->slot_act, s->slot_y, s->routed, s->threads);
      if (code == 1) return i * 8 + ROUTED;
      if (code) return -1;
      r = s->routed;
    }
    swiglu(L, s); /* the shared expert */
    for (int64_t j = 0; j < count; j++) {
      const float both = round_bf16(bf16_to_f32(r[j]) + bf16_to_f32(s->proj[j]));
      s->h[j] = f32_to_bf16(bf16_to_f32(s->h[j]) + both);
    }
  }
  rms_norm_bf16(s->h, s->n, s->hidden, s->hidden, s->final_norm, s->final_eps, s->out);
  return num_layers * 8 + DONE;
}
