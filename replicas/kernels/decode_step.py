"""The ctypes side of csrc/decode_step.c: its structures and its one call.

``decode_layers`` runs a colocated bf16 model's decode step from one MoE router to the next
(replicas.engine.decode_native fills the structures from the model and the KV cache). The
fields mirror the C structures one for one; see decode_step.c for what each holds.
"""

from __future__ import annotations

import ctypes

from replicas.kernels.cpu_build import BF16_LIBRARY

P, I32, F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class Proj(ctypes.Structure):
    _fields_ = [("w", P), ("packed", P), ("in_features", I32), ("out_features", I32)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [
        ("in_norm", P),
        ("post_norm", P),
        ("eps", F32),
        ("qkv", Proj),
        ("o", Proj),
        ("q_norm", P),
        ("k_norm", P),
        ("qk_eps", F32),
        ("rope", I32),
        ("sliding", I32),
        ("k_cache", P),
        ("v_cache", P),
        ("moe", I32),
        ("gate_up", Proj),
        ("down", Proj),
        ("silu", P),
        ("w13", P),
        ("w2", P),
        ("local_index", P),
        ("num_ids", I32),
        ("num_local", I32),
        ("expert_inter", I32),
        ("max_rows", I32),
        ("c_router", I32),
        ("bias", P),
        ("num_experts", I32),
        ("norm_topk", I32),
        ("scaling", F32),
    ]


class DecodeStep(ctypes.Structure):
    _fields_ = [
        ("external_attention", I32),
        ("n", I32),
        ("hidden", I32),
        ("q_heads", I32),
        ("kv_heads", I32),
        ("head_dim", I32),
        ("top_k", I32),
        ("stream_rows", I32),
        ("threads", I32),
        ("scale", F32),
        ("ids", P),
        ("embed", P),
        ("cos", P),
        ("sin", P),
        ("h", P),
        ("x", P),
        ("qkv", P),
        ("q", P),
        ("k", P),
        ("v", P),
        ("attn", P),
        ("proj", P),
        ("gate_up", P),
        ("act", P),
        ("routed", P),
        ("x32", P),
        ("topk_ids", P),
        ("topk_w", P),
        ("order", P),
        ("offsets", P),
        ("slot_h", P),
        ("slot_act", P),
        ("slot_y", P),
        ("scores", P),
        ("write_rows", P),
        ("global_rows", P),
        ("global_valid", P),
        ("global_keys", I32),
        ("ring_rows", P),
        ("ring_valid", P),
        ("ring_dst", P),
        ("ring_keys", I32),
        ("final_norm", P),
        ("final_eps", F32),
        ("out", P),
    ]


# what the caller does next (decode_layers' second result)
DONE, ROUTER, ROUTED, ATTEND, SCORES = 0, 1, 2, 3, 4
# where a call resumes
BEGIN, AFTER_ATTEND, AFTER_ROUTER, WITH_ROUTED, AFTER_SCORES = 0, 1, 2, 3, 4


def decode_layers(
    layers: ctypes.Array,
    step: DecodeStep,
    start: int,
    phase: int = BEGIN,
    topk_ids: int | None = None,
    topk_weights: int | None = None,
    routed: int | None = None,
    attn: int | None = None,
    scores: int | None = None,
) -> tuple[int, int]:
    """One call of csrc/decode_step.c's decode_layers (pointers as ints), resuming at layer
    ``start`` as ``phase`` says -> (layer, what the caller does next: DONE, ROUTER, ROUTED,
    ATTEND or SCORES)."""
    lib = BF16_LIBRARY.require()
    code = lib.decode_layers(
        layers,
        len(layers),
        ctypes.byref(step),
        start,
        phase,
        topk_ids,
        topk_weights,
        routed,
        attn,
        scores,
    )
    if code < 0:
        raise ValueError("decode_layers: router chose expert ids outside the held experts")
    return divmod(code, 8)
