"""A colocated bf16 step of up to 64 rows in csrc/decode_step.c, routers (and, but for decode
steps, attention) in PyTorch.

The model's modules, and ``decode_path.decode_hidden`` for decode steps, call our C kernels from
Python with small PyTorch operations between them; on the bundled model those calls and
operations, not the kernels, took most of a step (one decoding sequence: about 1.7 of 2.7 ms).
``NativeDecode`` hands the chain to ``decode_layers`` in C, which runs the same kernels on the
same inputs in the same order and does the operations between them itself (see
decode_step.c), so its hidden states are the module path's bit for bit. Python keeps what only
PyTorch computes to its own bits: the rotary tables, each MoE layer's router GEMM and sigmoid
(the rest of the router runs in C where it is PyTorch's to the bit: one group, top-k of at
most 2 when normalised, no ties; else the whole router runs in PyTorch), the routed experts
where the C kernel declines a layer's rows
(``weighted_sum`` over ``RoutedExperts``), and the attention of any step that is not
decode-only (the step's KV-cache backend, between two calls).

It runs a colocated bf16 model on CPU where every projection has a C kernel for the step's rows
(``linear_bf16`` up to STREAM_LINEAR_MAX_ROWS rows, the packed kernel past it for weights small
enough), up to FUSED_DECODE_MAX_ROWS rows (where the modules' norms are our fused kernels too),
with no FP8 weight and PyTorch's silu a function of the value alone at every SwiGLU width (see
``silu_table``; and rows x width within ELEMENTWISE_ONE_THREAD). The model's weights and the
cache's tensors must stay where they are while the engine runs (they do: a colocated engine
never reloads them); the layer table is built once per cache.
"""

from __future__ import annotations

import os
import weakref
from typing import cast

import torch
import torch.nn.functional as F

from replicas.engine.kv_cache import HybridKVCache, StepAttention
from replicas.kernels import cpu as cpu_kernels
from replicas.kernels.decode_step import (
    AFTER_ATTEND,
    AFTER_ROUTER,
    AFTER_SCORES,
    ATTEND,
    DONE,
    ROUTER,
    SCORES,
    WITH_ROUTED,
    DecodeLayer,
    DecodeStep,
    Proj,
    decode_layers,
)
from replicas.model.exaone_moe import DecoderLayer, ExaoneMoeForCausalLM
from replicas.model.layers import (
    FUSED_DECODE_MAX_ROWS,
    STREAM_LINEAR_MAX_ROWS,
    AttentionBackend,
    Linear,
    SwiGLU,
    packs_weights,
    rope_cos_sin,
)
from replicas.model.moe import (
    RoutedExperts,
    Routing,
    SparseMoE,
    weighted_sum,
)

_SILU: dict[int, torch.Tensor | None] = {}


def _bf16_of_bits(bits: torch.Tensor) -> torch.Tensor:
    """int32 values in [0, 65536) -> the bf16 values with those bits."""
    return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.bfloat16)


def _silu_by_value(inter: int, shift: int, rows: int | None = None) -> torch.Tensor:
    """PyTorch's F.silu as a SwiGLU of width ``inter`` calls it (on the gate half of a [rows,
    2 * inter] projection), over bf16 values laid out from bit pattern ``shift`` on -> [65536]
    int16, the result for each bit pattern (the first ``rows * inter`` patterns only, when
    ``rows`` is given)."""
    size = 65536
    count = -(-size // inter) if rows is None else rows
    bits = (torch.arange(count * inter, dtype=torch.int32) + shift) % size
    gate_up = torch.zeros(count, 2 * inter, dtype=torch.bfloat16)
    gate_up[:, :inter] = _bf16_of_bits(bits).view(count, inter)
    out = F.silu(gate_up.split(inter, dim=-1)[0]).reshape(-1).view(torch.int16)
    table = torch.zeros(size, dtype=torch.int16)
    table[bits.long()] = out
    return table


def silu_table(inter: int) -> torch.Tensor | None:
    """[65536] bf16: PyTorch's silu of each bf16 value (indexed by its bits) as a SwiGLU of
    width ``inter`` computes it, or None where that depends on more than the value.

    F.silu computes in fp32 with its own vectorized exp, and a scalar loop with libm's for what
    a row leaves over, so a value's result can depend on its column (on this machine, a width of
    32 gives other bits than 64). The table is built from the same layout and kept only if the
    results do not move when every value moves to other columns, or to a one-row call."""
    if inter not in _SILU:
        table = _silu_by_value(inter, 0)
        same = all(
            torch.equal(table, _silu_by_value(inter, shift)) for shift in (1, inter // 2 + 1)
        )
        one_row = _silu_by_value(inter, 0, rows=1)[:inter]
        same = same and torch.equal(one_row, table[:inter])
        _SILU[inter] = table.view(torch.bfloat16) if same else None
    return _SILU[inter]


class _Unsupported(Exception):
    """The model has a part decode_layers does not run."""


def _proj(linear: Linear, keep: list) -> tuple[Proj, int]:
    """A projection's weight (and packed copy) -> (Proj, rows its C kernels take: 0 = none)."""
    plan = linear._kernel_rows()
    w = linear.weight
    if (
        plan is None
        or linear.fp8_block is not None
        or linear.bias is not None
        or w.dtype is not torch.bfloat16
        or not w.is_contiguous()
    ):
        raise _Unsupported("a projection without our bf16 kernels")
    amx, stream, packed_rows = plan
    if amx or stream != STREAM_LINEAR_MAX_ROWS:
        raise _Unsupported("a projection on other kernels (AMX)")
    # past stream rows: the packed copy (AVX512 build), or C's linear_bf16_torch on the weight
    packed = linear._packed_weight() if packed_rows and packs_weights() else None
    keep.extend(t for t in (w, packed) if t is not None)
    ptr = packed.data_ptr() if packed is not None else None
    return Proj(w.data_ptr(), ptr, w.shape[1], w.shape[0]), max(stream, packed_rows)


ELEMENTWISE_ONE_THREAD = 32768
"""PyTorch's grain size: an elementwise operation on at most this many values runs on one
thread, over whole rows. Past it the threads split the values where they fall, a row's columns
can start a vectorized block elsewhere, and silu_table would no longer be the module path's."""


def _swiglu(mlp: SwiGLU, keep: list) -> tuple[Proj, Proj, torch.Tensor, int]:
    """A SwiGLU's projections, its silu table and the rows this layout takes (their C kernels',
    and as many as PyTorch's silu computes on one thread)."""
    silu = silu_table(mlp.inter)
    if silu is None:
        raise _Unsupported(f"PyTorch's silu at width {mlp.inter} depends on more than the value")
    gate_up, rows_a = _proj(mlp.gate_up_proj, keep)
    down, rows_b = _proj(mlp.down_proj, keep)
    keep.append(silu)
    return gate_up, down, silu, min(rows_a, rows_b, ELEMENTWISE_ONE_THREAD // mlp.inter)


class NativeDecode:
    """The layer table of one model over one KV cache, and the step scratch (rows up to
    FUSED_DECODE_MAX_ROWS)."""

    def __init__(self, model: ExaoneMoeForCausalLM, cache: HybridKVCache):
        cfg = model.cfg
        self.model = model
        keep: list[torch.Tensor] = []  # every tensor the table points into
        layers = []
        self.max_rows = FUSED_DECODE_MAX_ROWS
        self.gates: dict[int, SparseMoE] = {}
        self.router_weights: dict[int, torch.Tensor] = {}  # fp32, where C runs the router's tail
        widest = 0
        top_k = cfg.num_experts_per_tok
        for index, (name, module) in enumerate(model.model.layers.items()):
            layer = cast(DecoderLayer, module)
            i = int(name)
            if i != index:
                raise _Unsupported("a partial layer range")
            attn = layer.self_attn
            qkv, rows_qkv = _proj(attn.qkv_proj, keep)
            o, rows_o = _proj(attn.o_proj, keep)
            sliding = i in cache.sliding_k
            k_cache = (cache.sliding_k if sliding else cache.global_k)[i]
            v_cache = (cache.sliding_v if sliding else cache.global_v)[i]
            norms = (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm)
            keep += [n.weight for n in norms] + [attn.k_norm.weight, k_cache, v_cache]
            mlp = layer.mlp
            moe = isinstance(mlp, SparseMoE)
            dense = mlp.shared_experts if isinstance(mlp, SparseMoE) else mlp
            gate_up, down, silu, rows_mlp = _swiglu(cast(SwiGLU, dense), keep)
            widest = max(widest, gate_up.out_features // 2)
            entry = DecodeLayer(
                in_norm=layer.input_layernorm.weight.data_ptr(),
                post_norm=layer.post_attention_layernorm.weight.data_ptr(),
                eps=layer.input_layernorm.eps,
                qkv=qkv,
                o=o,
                q_norm=attn.q_norm.weight.data_ptr(),
                k_norm=attn.k_norm.weight.data_ptr(),
                qk_eps=attn.q_norm.eps,
                rope=int(attn.use_rope),
                sliding=int(sliding),
                k_cache=k_cache.data_ptr(),
                v_cache=v_cache.data_ptr(),
                moe=int(moe),
                gate_up=gate_up,
                down=down,
                silu=silu.data_ptr(),
            )
            if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
                raise _Unsupported("norms of one layer with different eps")
            if attn.k_norm.eps != attn.q_norm.eps:
                raise _Unsupported("q and k norms with different eps")
            if isinstance(mlp, SparseMoE):
                experts = mlp.experts
                if (
                    experts is None
                    or len(experts.expert_ids) != mlp.gate.num_experts
                    or experts.kernels != "torch"
                    or experts.fp8_block is not None
                    or experts.w13.dtype is not torch.bfloat16
                    or not (experts.w13.is_contiguous() and experts.w2.is_contiguous())
                ):
                    raise _Unsupported("routed experts the C kernel does not take")
                keep += [experts.w13, experts.w2, experts.local_index]
                entry.w13, entry.w2 = experts.w13.data_ptr(), experts.w2.data_ptr()
                entry.local_index = experts.local_index.data_ptr()
                entry.num_ids = experts.local_index.numel()
                entry.num_local = len(experts.expert_ids)
                entry.expert_inter = experts.inter
                entry.max_rows = experts.decode_max_rows()
                self.gates[i] = mlp
                gate = mlp.gate
                if gate.n_group == 1 and (top_k <= 2 or not gate.norm_topk_prob):
                    bias = gate.e_score_correction_bias.float().contiguous()
                    self.router_weights[i] = gate._weight32()
                    keep += [bias, self.router_weights[i]]
                    entry.c_router, entry.bias = 1, bias.data_ptr()
                    entry.num_experts, entry.norm_topk = gate.num_experts, int(gate.norm_topk_prob)
                    entry.scaling = gate.scaling
            self.max_rows = min(self.max_rows, rows_qkv, rows_o, rows_mlp)
            layers.append(entry)
        self.layers = (DecodeLayer * len(layers))(*layers)
        self.num_layers = len(layers)
        self._keep = keep
        # scratch for up to max_rows rows
        r, hidden = FUSED_DECODE_MAX_ROWS, cfg.hidden_size
        q_size, kv_size = cfg.q_size, cfg.kv_size
        slots = r * top_k
        inter = max(cfg.moe_intermediate_size, 1)
        bf16 = torch.bfloat16

        def buf(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype)

        self.h, self.x = buf(r, hidden), buf(r, hidden)
        scratch = {
            "qkv": buf(r, q_size + 2 * kv_size),
            "q": buf(r, q_size),
            "k": buf(r, kv_size),
            "v": buf(r, kv_size),
            "attn": buf(r, q_size),
            "proj": buf(r, hidden),
            "gate_up": buf(r, 2 * widest),
            "act": buf(r, widest),
            "routed": buf(r, hidden),
            "x32": buf(r, hidden, dtype=torch.float32),
            "topk_ids": buf(r, top_k, dtype=torch.int64),
            "topk_w": buf(r, top_k, dtype=torch.float32),
            "order": buf(slots, dtype=torch.int64),
            "offsets": buf(cfg.num_experts + 1, dtype=torch.int64),
            "slot_h": buf(slots, hidden),
            "slot_act": buf(slots, inter),
            "slot_y": buf(slots, hidden),
        }
        self._scratch = scratch
        norm = model.model.norm
        self.step = DecodeStep(
            hidden=hidden,
            q_heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            top_k=top_k,
            stream_rows=STREAM_LINEAR_MAX_ROWS,
            scale=cfg.head_dim**-0.5,
            embed=model.model.embed_tokens.weight.data_ptr(),
            h=self.h.data_ptr(),
            x=self.x.data_ptr(),
            final_norm=norm.weight.data_ptr(),
            final_eps=norm.eps,
            **{name: t.data_ptr() for name, t in scratch.items()},
        )
        keep += [model.model.embed_tokens.weight, norm.weight]
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self.rope = (cfg.head_dim, cfg.rope_theta)
        self.head_dim, self.v_start = cfg.head_dim, q_size + kv_size
        self.q, self.k, self.qkv = scratch["q"], scratch["k"], scratch["qkv"]
        self.x32 = scratch["x32"]
        self.topk_ids, self.topk_w = scratch["topk_ids"], scratch["topk_w"]

    def takes(self, num_rows: int) -> bool:
        return 0 < num_rows <= self.max_rows

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        """input_ids, positions [N] -> [N, H] final-normed hidden states, the module path's
        (``step_hidden``). A decode-only step with the C decode kernel attends in C too; any
        other step attends through ``backend`` between two calls."""
        n = input_ids.shape[0]
        s = self.step
        ids = input_ids.to(torch.int64).contiguous()
        cos, sin = rope_cos_sin(positions, *self.rope, torch.bfloat16)  # [N, D]
        out = torch.empty(n, s.hidden, dtype=torch.bfloat16)
        s.n, s.threads = n, torch.get_num_threads()
        s.ids, s.cos, s.sin, s.out = ids.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr()
        scratch = None  # the C decode attention's, held through the calls
        if isinstance(backend, StepAttention) and backend.use_kernel:  # a decode-only step
            scratch = self._decode_indices(backend)
        s.external_attention = scratch is None
        x = self.x[:n]
        routing, routing_layer = None, -1  # the last router PyTorch ran, and its layer
        layer, next_ = decode_layers(self.layers, s, 0)
        while next_ != DONE:
            if next_ == ATTEND:  # attention through the backend, as the module path calls it
                q = self.q[:n].view(n, -1, self.head_dim)  # [N, Hq, D]
                k = self.k[:n].view(n, -1, self.head_dim)  # [N, Hkv, D]
                v = self.qkv[:n, self.v_start :].unflatten(-1, (-1, self.head_dim))
                attn = backend.attend_fn(layer)(q, k, v).flatten(1).contiguous()  # [N, Hq D]
                layer, next_ = decode_layers(
                    self.layers, s, layer, AFTER_ATTEND, attn=attn.data_ptr()
                )
            elif next_ == SCORES:  # the router's GEMM and sigmoid, PyTorch's; its tail in C
                scores = F.linear(self.x32[:n], self.router_weights[layer]).sigmoid()
                layer, next_ = decode_layers(
                    self.layers, s, layer, AFTER_SCORES, scores=scores.data_ptr()
                )
            elif next_ == ROUTER:  # a MoE layer's router, in PyTorch
                routing, routing_layer = self.gates[layer].gate.forward(x), layer
                ids_k = routing.topk_ids.contiguous()
                weights = routing.topk_weights.contiguous()
                layer, next_ = decode_layers(
                    self.layers, s, layer, AFTER_ROUTER, ids_k.data_ptr(), weights.data_ptr()
                )
            else:  # ROUTED: the C kernel declined this layer's experts; the module path's
                if layer in self.router_weights and routing_layer != layer:  # C chose them
                    routing = Routing(self.topk_ids[:n].clone(), self.topk_w[:n].clone())
                assert routing is not None  # this layer's, from the call before
                experts = cast(RoutedExperts, self.gates[layer].experts)
                routed = weighted_sum(experts(x, routing), routing.topk_weights).contiguous()
                layer, next_ = decode_layers(
                    self.layers, s, layer, WITH_ROUTED, routed=routed.data_ptr()
                )
        del scratch
        return out

    def _decode_indices(self, backend: StepAttention) -> torch.Tensor:
        """Point the step at a decode step's cache indices; -> the attention's scratch."""
        s = self.step
        keys = backend.global_rows.shape[1]
        ring = getattr(backend, "ring_rows", None)
        ring_keys = 0 if ring is None else ring.shape[1]
        scores = torch.empty(
            s.threads * self.group * (max(keys, ring_keys) + 1), dtype=torch.float32
        )
        s.scores = scores.data_ptr()
        s.write_rows = backend.write_rows.data_ptr()
        s.global_rows, s.global_keys = backend.global_rows.data_ptr(), keys
        s.global_valid = backend.global_valid.data_ptr()
        if ring is not None:
            s.ring_rows, s.ring_keys = ring.data_ptr(), ring_keys
            s.ring_valid = backend.sliding_valid.data_ptr()
            s.ring_dst = backend.ring_dst.data_ptr()
        return scores


_TABLES: weakref.WeakKeyDictionary[HybridKVCache, NativeDecode | None] = weakref.WeakKeyDictionary()


def native_for(model: ExaoneMoeForCausalLM, cache: HybridKVCache) -> NativeDecode | None:
    """The NativeDecode of this model over this cache (built on first use), or None where the
    model has a part decode_layers does not run."""
    if cache in _TABLES:
        table = _TABLES[cache]
        if table is None or table.model is model:
            return table
    try:
        table = NativeDecode(model, cache)
    except _Unsupported:
        table = None
    _TABLES[cache] = table
    return table


NATIVE = os.environ.get("EXAONE_DECODE_NATIVE", "1") != "0"
"""Run the steps a NativeDecode takes in C; 0 keeps them on the Python paths, for comparisons."""


def step_hidden(
    model: ExaoneMoeForCausalLM,
    cache: HybridKVCache,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    backend: AttentionBackend,
) -> torch.Tensor | None:
    """A colocated step's [N, H] final-normed hidden states from C (the module path's bits), or
    None where it does not apply: a model it does not run, rows past what every projection's C
    kernel (and the fused norms, FUSED_DECODE_MAX_ROWS) takes, or NATIVE off."""
    if not NATIVE or not cpu_kernels.available():
        return None
    embed = model.model.embed_tokens.weight
    if embed.dtype is not torch.bfloat16 or embed.device.type != "cpu" or not model.is_complete:
        return None
    native = native_for(model, cache)
    if native is None or not native.takes(input_ids.shape[0]):
        return None
    return native.run(input_ids, positions, backend)
