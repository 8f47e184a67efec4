"""EXAONE-MoE (K-EXAONE-236B-A23B and any ``exaone_moe`` checkpoint) in plain PyTorch.

The math follows ``shared/docs/model-spec.md`` and is checked logit-for-logit against transformers'
``ExaoneMoeForCausalLM`` (tests/unit/replicas/model/test_model_vs_hf.py).

Glossary
    sliding layer   attends to itself and the previous ``W - 1`` tokens, with RoPE.
    global layer    attends to the whole causal prefix, no positional encoding (NoPE).
    routed expert   one of ``E`` SwiGLU MLPs; each token uses ``k`` of them, picked by the router.
    shared expert   a SwiGLU MLP every token of a MoE layer goes through, unweighted.
    slot            one (token, j) pair, j < k: the j-th expert chosen for a token. Expert outputs
                    are kept per slot and summed in fp32 in slot order, so the result does not
                    depend on which process computed which expert.
    MTP             multi-token prediction layer: drafts token t+2 from (hidden_t, token_{t+1}).

Dimensions (used in shape comments)
    B batch, T tokens per sequence, N = B*T flattened tokens, H hidden_size,
    Hq / Hkv query / key-value heads, D head_dim, E experts (held by this module: E_local),
    K experts per token, I intermediate width, V vocab, S = N*K slots.

Internal parameter names equal the checkpoint names except where several checkpoint tensors are
fused into one (q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``, per-expert tensors ->
``experts.w13`` / ``experts.w2``); ``replicas.model.checkpoint_names`` is the one place that maps
the two. The building blocks are in ``layers`` and the mixture of experts in ``moe`` (this
package).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from replicas.model.config import DENSE, ModelConfig
from replicas.model.layers import (
    Attend,
    Attention,
    AttentionBackend,
    Linear,
    RMSNorm,
    SwiGLU,
    rope_cos_sin,
)
from replicas.model.moe import ExpertCall, ExpertRows, RoutedExperts, SparseMoE, weighted_sum


class DecoderLayer(nn.Module):
    """Pre-norm: h += attn(norm(h)); h += ffn(norm(h)). FFN is SwiGLU (dense) or SparseMoE."""

    def __init__(
        self, cfg: ModelConfig, layer_type: str, mlp_type: str, use_rope: bool, expert_ids
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_type, use_rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            SwiGLU(cfg.hidden_size, cfg.intermediate_size)
            if mlp_type == DENSE
            else SparseMoE(cfg, expert_ids)
        )

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend | None = None
    ) -> torch.Tensor:  # [B, T, H], or [N, H] with a KV-cache backend
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class MTP(nn.Module):
    """One MTP block: u = fc([norm_e(embed(x_{t+1})), norm_h(h_t)]) -> decoder layer -> norm.

    Uses the main model's embedding and lm_head. Attention type and RoPE follow vLLM (the type of
    layer 0, RoPE always on), see ModelConfig.mtp_layer_type.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(h, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, cfg.rms_norm_eps)
        self.fc = Linear(2 * h, h, bias=False)
        layer = DecoderLayer(cfg, cfg.mtp_layer_type, DENSE, use_rope=True, expert_ids=())
        self.layers = nn.ModuleList([layer])
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(
        self,
        next_embeds: torch.Tensor,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend | None = None,
    ) -> torch.Tensor:
        """next_embeds [B, T, H] (embedding of token t+1), hidden [B, T, H] (final-normed h_t)
        -> [B, T, H]. With ``attend`` (a KV-cache backend), [N, H] flat rows, as the decoder
        layers take them."""
        u = self.fc(
            torch.cat(
                [self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], -1
            )
        )  # [B, T, H]
        return self.norm(self.layers[0](u, cos, sin, attend))  # [B, T, H]


class ExaoneMoeModel(nn.Module):
    """Embedding, the decoder layers in ``layer_ids``, and the final norm (module ``model.*``)."""

    def __init__(
        self, cfg: ModelConfig, layer_ids: Sequence[int], expert_ids: Sequence[int] | None
    ):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        all_experts = range(cfg.num_experts) if expert_ids is None else sorted(set(expert_ids))
        self.layers = nn.ModuleDict(
            {
                str(i): DecoderLayer(
                    cfg,
                    cfg.layer_types[i],
                    cfg.mlp_layer_types[i],
                    cfg.uses_rope(cfg.layer_types[i]),
                    all_experts,
                )
                for i in layer_ids
            }
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class ExaoneMoeForCausalLM(nn.Module):
    """EXAONE-MoE with the transformers-style API:

    >>> model = replicas.model.loader.load_causal_lm(path, dtype=torch.float32)
    >>> logits = model(input_ids)  # [B, T] LongTensor -> [B, T, V]

    ``layers`` / ``expert_ids`` build a partial model (a layer range, a subset of routed experts);
    ``include_mtp`` adds the MTP block. Only a complete model can run ``forward``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layers: Iterable[int] | None = None,
        expert_ids: Iterable[int] | None = None,
        include_mtp: bool | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = tuple(range(cfg.num_hidden_layers) if layers is None else layers)
        self.expert_ids = None if expert_ids is None else tuple(sorted(set(expert_ids)))
        for i in self.layer_ids:
            if not 0 <= i < cfg.num_hidden_layers:
                raise ValueError(f"layer {i} out of range [0, {cfg.num_hidden_layers})")
        for e in self.expert_ids or ():
            if not 0 <= e < cfg.num_experts:
                raise ValueError(f"expert id {e} out of range [0, {cfg.num_experts})")
        self.model = ExaoneMoeModel(cfg, self.layer_ids, self.expert_ids)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if include_mtp is None:
            include_mtp = cfg.num_nextn_predict_layers > 0
        self.mtp = MTP(cfg) if include_mtp else None

    @property
    def is_complete(self) -> bool:
        full_experts = self.expert_ids is None or len(self.expert_ids) == self.cfg.num_experts
        return self.layer_ids == tuple(range(self.cfg.num_hidden_layers)) and full_experts

    # ---- forward (whole sequences, no cache) ----------------------------------------------------
    def rope(self, num_tokens: int, device: torch.device, dtype: torch.dtype):
        positions = torch.arange(num_tokens, device=device)
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, H] final-normed hidden states (what lm_head and MTP read)."""
        if not self.is_complete:
            raise RuntimeError("partial model (layer range or expert subset): no full forward")
        h = self.model.embed_tokens(input_ids)  # [B, T, H]
        cos, sin = self.rope(input_ids.shape[1], h.device, h.dtype)  # [T, D]
        for layer in self.model.layers.values():
            h = layer(h, cos, sin)
        return self.model.norm(h)

    # ---- one engine step over flattened tokens, with a KV cache ---------------------------------
    @property
    def experts_remote(self) -> bool:
        """True when this model holds no routed experts (they live in expert groups)."""
        return self.expert_ids is not None and not self.expert_ids

    def step_layers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> Generator[ExpertCall, ExpertRows, torch.Tensor]:
        """One engine step as a generator. input_ids, positions [N] (the new tokens of every
        scheduled sequence, concatenated); ``backend.attend_fn(layer)`` returns each layer's
        attention callable (see replicas.engine.kv_cache). Returns [N, H] final-normed hidden
        states.

        When the routed experts live elsewhere (``experts_remote``) it yields an ExpertCall at
        every MoE layer and expects the experts' ExpertRows back (``send``); the shared
        expert runs before yielding, so its work overlaps the experts'. Otherwise it yields
        nothing."""
        if self.layer_ids != tuple(range(self.cfg.num_hidden_layers)):
            raise RuntimeError("partial model (a layer range): no forward")
        if not (self.experts_remote or self.is_complete):
            raise RuntimeError("this model holds a subset of the experts: no forward")
        h = self.model.embed_tokens(input_ids)  # [N, H]
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        for i, module in self.model.layers.items():
            layer = cast(DecoderLayer, module)
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, backend.attend_fn(int(i)))
            x = layer.post_attention_layernorm(h)  # [N, H]
            moe = layer.mlp
            if isinstance(moe, SparseMoE) and moe.experts is None:
                routing = moe.gate(x)
                shared = moe.shared_experts(x)  # [N, H]
                rows = yield ExpertCall(int(i), x, routing)  # ExpertRows
                h = h + (weighted_sum(rows, routing.topk_weights) + shared)
            else:
                h = h + moe(x)
        return self.model.norm(h)

    def step_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        """``step_layers`` run to the end with every expert held here -> [N, H]."""
        stages = self.step_layers(input_ids, positions, backend)
        try:
            call = next(stages)
        except StopIteration as done:
            return done.value
        stages.close()
        raise RuntimeError(
            f"layer {call.layer}: routed experts are remote, use an ExpertDispatcher"
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] LongTensor -> [B, T, V] logits (activation dtype)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return self.lm_head(self.hidden_states(input_ids))

    def mtp_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Draft logits of the MTP block over whole sequences (no cache).

        input_ids [B, T] -> [B, T-1, V]: row t predicts token t+2 from (h_t, token t+1).
        """
        if self.mtp is None:
            raise RuntimeError("this model was built without its MTP block")
        hidden = self.hidden_states(input_ids)[:, :-1]  # [B, T-1, H]
        next_embeds = self.model.embed_tokens(input_ids[:, 1:])  # [B, T-1, H]
        cos, sin = self.rope(hidden.shape[1], hidden.device, hidden.dtype)
        return self.lm_head(self.mtp(next_embeds, hidden, cos, sin))

    def mtp_step(
        self,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        layer: int,
    ) -> torch.Tensor:
        """One MTP pass through a KV cache. Row i is position ``positions[i]``: ``hidden[i]``
        is that position's final-normed hidden state (the main model's, or the MTP's own output
        when drafting further ahead) and ``next_ids[i]`` the token after it. ``layer`` is the
        MTP layer's id in the cache. -> d [N, H] (after mtp.norm); ``lm_head(d[i])`` drafts the
        token after ``next_ids[i]``, and d[i] is the hidden input of the next draft."""
        if self.mtp is None:
            raise RuntimeError("this model was built without its MTP block")
        embeds = self.model.embed_tokens(next_ids)  # [N, H]
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        return self.mtp(embeds, hidden, cos, sin, backend.attend_fn(layer))


class ExpertStack(nn.Module):
    """Only the routed experts ``expert_ids`` of every MoE layer (or, given a mapping, those of
    each listed layer): what an expert group holds.

    Parameter names match the full model (``model.layers.{i}.mlp.experts.*``), so the same loader
    fills it and reads only those experts' bytes from the checkpoint.
    """

    def __init__(
        self, cfg: ModelConfig, expert_ids: Iterable[int] | Mapping[int, Iterable[int]], layers=None
    ):
        super().__init__()
        self.cfg = cfg
        chosen = cfg.moe_layers if layers is None else [i for i in layers if i in cfg.moe_layers]
        if isinstance(expert_ids, Mapping):
            per_layer = {i: tuple(ids) for i, ids in expert_ids.items()}
            chosen = [i for i in chosen if i in per_layer]
        else:
            shared = tuple(expert_ids)
            per_layer = {i: shared for i in chosen}
        self.model = _ExpertLayers()
        for i in chosen:
            self.model.layers[str(i)] = _ExpertsOnlyLayer(
                RoutedExperts(cfg, tuple(sorted(set(per_layer[i]))))
            )

    def layer_ids(self) -> list[int]:
        return [int(i) for i in self.model.layers]

    def holdings(self) -> dict[int, tuple[int, ...]]:
        """-> {MoE layer: the expert ids held there}."""
        return {i: self.experts(i).expert_ids for i in self.layer_ids()}

    def replace_experts(self, layer: int, experts: RoutedExperts) -> None:
        cast(_ExpertsOnlyLayer, self.model.layers[str(layer)]).mlp.experts = experts

    def experts(self, layer: int) -> RoutedExperts:
        return cast(_ExpertsOnlyLayer, self.model.layers[str(layer)]).mlp.experts


class _ExpertLayers(nn.Module):
    """``model.layers``: the MoE layers an ExpertStack holds, by layer index."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict()


class _ExpertsOnlyMlp(nn.Module):
    def __init__(self, experts: RoutedExperts):
        super().__init__()
        self.experts = experts


class _ExpertsOnlyLayer(nn.Module):
    """One MoE layer's ``mlp.experts`` and nothing else."""

    def __init__(self, experts: RoutedExperts):
        super().__init__()
        self.mlp = _ExpertsOnlyMlp(experts)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token active parameters of the full model and its MTP block (meta device)."""
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(cfg, include_mtp=cfg.num_nextn_predict_layers > 0)
    state = model.state_dict()  # parameters and persistent buffers (the correction biases)
    main = sum(t.numel() for n, t in state.items() if not n.startswith("mtp."))
    mtp = sum(t.numel() for n, t in state.items() if n.startswith("mtp."))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    inactive = len(cfg.moe_layers) * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    return {"main": main, "mtp": mtp, "total": main + mtp, "active": main - inactive}
