"""Block-wise FP8 checkpoints: our loader against transformers' FP8 loading (dequantized on
CPU), partial edge blocks, the fused expert layout, the quantize command, broken checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import ExaoneMoeForCausalLM as HFModel
from transformers import FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from cluster.bundled.quantize import quantize_checkpoint
from cluster.commands.cli import main
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.experts.dispatch import ExpertDispatcher, InProcessTransport
from replicas.experts.expert_group import ExpertGroup
from replicas.experts.placement import ExpertPlacement
from replicas.model.layers import Linear
from replicas.model.loader import (
    CheckpointError,
    load_causal_lm,
    load_expert_stack,
    resident_bytes,
)
from replicas.model.moe import RoutedExperts, use_expert_kernels
from replicas.model.quantization import FP8_DTYPE, dequantize, quantize
from replicas.sampling_params import SamplingParams

# Block multiples (transformers' FP8 loading reads them right), and the tiny preset, whose every
# weight is one partial block (smaller than 128 both ways). bf16 weights, quantized on writing.
ALIGNED = dict(
    hidden_size=256,
    intermediate_size=256,
    moe_intermediate_size=128,
    head_dim=64,
    initializer_range=0.05,
    sliding_window=8,
)
CASES = {
    "aligned_blocks": ALIGNED,
    "single_partial_blocks": dict(initializer_range=0.05, sliding_window=8),
    # two dense leading layers, two shared experts, irregular layer types, GQA 4:1
    "dense2_shared2_irregular_layers": dict(
        ALIGNED,
        num_hidden_layers=5,
        first_k_dense_replace=2,
        num_shared_experts=2,
        num_key_value_heads=1,
        layer_types=[
            "sliding_attention",
            "full_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
    ),
}


def _ids(vocab: int, batch: int = 2, tokens: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))


def _dequantized_copy(fp8: Path, out: Path, block: tuple[int, int], dtype: torch.dtype) -> Path:
    """The FP8 checkpoint with every weight dequantized by transformers' own block arithmetic
    (``_dequantize_fp8_weight``: scales repeated over 128-row/column blocks, edges cropped) and
    no quantization_config: what any reader of the FP8 layout must compute."""
    shutil.copytree(fp8, out)
    raw = json.loads((out / "config.json").read_text())
    del raw["quantization_config"]
    (out / "config.json").write_text(json.dumps(raw))
    tensors = load_file(str(out / "model.safetensors"))
    for key in [k for k, t in tensors.items() if t.dtype == FP8_DTYPE]:
        scale = tensors.pop(key + "_scale_inv")
        tensors[key] = _dequantize_fp8_weight(tensors[key], scale, list(block), dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    return (got - want).abs().max().item(), (
        got.argmax(-1) == want.argmax(-1)
    ).float().mean().item()


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_logits_equal_transformers_fp8_loading(make_ckpt, case, report):
    ckpt = make_ckpt(dtype="bfloat16", quantize="fp8", **CASES[case])
    ours = load_causal_lm(ckpt, dtype=torch.bfloat16)
    ref = HFModel.from_pretrained(
        ckpt,
        dtype=torch.bfloat16,
        experts_implementation="grouped_mm",
        quantization_config=FineGrainedFP8Config(dequantize=True),  # on CPU: bf16 weights
    )
    ids = _ids(ours.cfg.vocab_size)
    got, want = _logits(ours, ids), _logits(ref, ids)
    diff, top1 = _compare(got, want)
    report(f"{case}: FP8 max |ours - transformers| {diff:.3g}, top-1 agreement {top1:.4f}")
    # The bar of the bf16 comparison (test_model_vs_hf); observed: 0 to 0.03, top-1 equal.
    assert top1 >= 0.99 and diff <= 0.1
    # The checkpoint really is FP8 where it should be, and not where it should not.
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        layer = ours.cfg.moe_layers[0]
        q = f.get_tensor(f"model.layers.{layer}.mlp.experts.0.gate_proj.weight")
        assert q.dtype == FP8_DTYPE
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16


def test_partial_edge_blocks_follow_the_block_grid(make_ckpt, tmp_path, report):
    """Sizes that are not multiples of the block (80, 112, 48, 160 over blocks of 32): the
    edge blocks are narrower and have scales of their own. transformers' from_pretrained
    dequantizer infers the block from the grid (rows // grid rows) and misreads such weights,
    so the reference here is transformers' block arithmetic itself applied to each weight
    (``_dequantize_fp8_weight``), loaded into transformers' model. In fp32: at these odd sizes
    bf16 matmuls alone already differ from transformers' (0.28, 98% top-1, no FP8 involved),
    while fp32 holds the 1e-4 bar of test_model_vs_hf."""
    block = (32, 32)
    bf16 = make_ckpt(
        dtype="bfloat16",
        hidden_size=80,
        intermediate_size=112,
        moe_intermediate_size=48,
        head_dim=40,
        initializer_range=0.05,
        sliding_window=8,
    )
    fp8 = quantize_checkpoint(bf16, tmp_path / "fp8", block)
    with safe_open(str(fp8 / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale_inv").shape == (4, 3)
    ours = load_causal_lm(fp8, dtype=torch.float32)
    reference = _dequantized_copy(fp8, tmp_path / "dequantized", block, torch.float32)
    ref = HFModel.from_pretrained(reference, dtype=torch.float32, experts_implementation="eager")
    ids = _ids(ours.cfg.vocab_size)
    diff, top1 = _compare(_logits(ours, ids), _logits(ref, ids))
    report(f"edge blocks: FP8 max |ours - transformers| {diff:.3g} (fp32), top-1 {top1:.4f}")
    assert diff <= 1e-4
    # Our FP8 load is that dequantization exactly: the same weights bit for bit, whether
    # done at load or, for the routed experts held in FP8, by the experts for a call.
    plain = load_causal_lm(reference, dtype=torch.float32)
    dequantized = load_causal_lm(fp8, dtype=torch.float32, keep_fp8=False)
    for name, tensor in dequantized.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name
    for held, whole in zip(_routed(ours), _routed(plain), strict=True):
        assert held.w13.dtype == FP8_DTYPE
        for got, want in zip(held.dense_weights(), (whole.w13, whole.w2), strict=True):
            assert torch.equal(got, want)
    ours = dequantized
    # And quantization changed them (a loader that ignored the scales would not get here).
    original = load_causal_lm(bf16, dtype=torch.float32).state_dict()
    q_proj = "model.layers.0.self_attn.qkv_proj.weight"
    assert not torch.equal(ours.state_dict()[q_proj], original[q_proj])
    assert (ours.state_dict()[q_proj].float() - original[q_proj].float()).abs().max() < 0.02


def test_fused_fp8_experts_load_like_per_expert_ones(make_ckpt, tmp_path):
    """transformers' fused layout (experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) in FP8,
    scales fused the same way; blocks of 16 divide I = 32, so the fused grid lines up."""
    block = (16, 16)
    per_expert = quantize_checkpoint(make_ckpt(dtype="bfloat16"), tmp_path / "per_expert", block)
    fused = fused_copy(per_expert, tmp_path / "fused")
    a = load_causal_lm(per_expert, dtype=torch.bfloat16).state_dict()
    b = load_causal_lm(fused, dtype=torch.bfloat16).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(bits(a[name]), bits(b[name])), name
    # An expert group reads its experts' rows (and their scales) of the fused tensors.
    stack = load_expert_stack(fused, [2, 5], dtype=torch.bfloat16)
    layer = stack.layer_ids()[0]
    for leaf in ("w13", "w2", "w13_scale", "w2_scale"):
        want = a[f"model.layers.{layer}.mlp.experts.{leaf}"][[2, 5]]
        assert torch.equal(bits(getattr(stack.experts(layer), leaf)), bits(want)), leaf


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor to compare exactly: FP8 ones as their bytes (torch.equal has no FP8 kernel)."""
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def fused_copy(per_expert: Path, out: Path, requantize: bool = False) -> Path:
    """A copy of a per-expert FP8 checkpoint in transformers' fused expert layout
    (experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]), scales fused the same way; with
    ``requantize`` the fused tensors are quantized whole instead (their own block grid, as a
    quantizer of the fused layout writes it, where a block may hold gate and up rows)."""
    fused = Path(shutil.copytree(per_expert, out))
    tensors = load_file(str(fused / "model.safetensors"))
    config = json.loads((fused / "config.json").read_text())
    num_experts = config["num_experts"]
    block = tuple(config["quantization_config"]["weight_block_size"])
    if requantize:
        for key in [k for k in tensors if ".experts." in k and k.endswith(".weight")]:
            scale = tensors.pop(key + "_scale_inv")
            tensors[key] = dequantize(tensors[key], scale, block, torch.float32)
    layers = sorted({int(k.split(".")[2]) for k in tensors if ".experts.0.gate_proj" in k})
    for i in layers:
        p = f"model.layers.{i}.mlp.experts"
        for suffix in ("", "_scale_inv"):
            gate_up = [
                torch.cat(
                    [
                        tensors.pop(f"{p}.{e}.gate_proj.weight{suffix}"),
                        tensors.pop(f"{p}.{e}.up_proj.weight{suffix}"),
                    ]
                )
                for e in range(num_experts)
            ]
            down = [tensors.pop(f"{p}.{e}.down_proj.weight{suffix}") for e in range(num_experts)]
            tensors[f"{p}.gate_up_proj{suffix}"] = torch.stack(gate_up)
            tensors[f"{p}.down_proj{suffix}"] = torch.stack(down)
            if requantize:
                for name in ("gate_up_proj", "down_proj"):
                    q, scale = quantize(tensors[f"{p}.{name}"], block)
                    tensors[f"{p}.{name}"], tensors[f"{p}.{name}_scale_inv"] = q, scale
                break
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    return fused


def test_quantize_command_writes_what_make_checkpoint_writes(make_ckpt, tmp_path, capsys):
    bf16 = make_ckpt(dtype="bfloat16", seed=3)
    assert main(["quantize", str(bf16), str(tmp_path / "q")]) == 0
    assert "FP8 e4m3, blocks 128x128" in capsys.readouterr().out
    assert main(["make-checkpoint", str(tmp_path / "m"), "--seed", "3", "--quantize", "fp8"]) == 0
    a = load_file(str(tmp_path / "q" / "model.safetensors"))
    b = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(
            a[key].view(torch.uint8), b[key].view(torch.uint8)
        ), key
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert (tmp_path / "q" / "tokenizer.json").exists()
    # A quantized checkpoint is not quantized again.
    assert main(["quantize", str(tmp_path / "q"), str(tmp_path / "qq")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(bf16), str(tmp_path / "x"), "--block", "0,128"]) == 2


def _break(ckpt: Path, edit_tensors=None, edit_config=None) -> None:
    if edit_tensors is not None:
        tensors = load_file(str(ckpt / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        raw = json.loads((ckpt / "config.json").read_text())
        edit_config(raw)
        (ckpt / "config.json").write_text(json.dumps(raw))


def test_broken_fp8_checkpoints_are_refused_by_name(make_ckpt, tmp_path):
    fp8 = make_ckpt(dtype="bfloat16", quantize="fp8")
    key = "model.layers.0.self_attn.q_proj.weight"

    no_scale = Path(shutil.copytree(fp8, tmp_path / "no_scale"))
    _break(no_scale, lambda t: t.pop(key + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"missing tensor.*\n.*{key}_scale_inv \(the scales"):
        load_causal_lm(no_scale)

    bad_grid = Path(shutil.copytree(fp8, tmp_path / "bad_grid"))
    _break(bad_grid, lambda t: t.update({key + "_scale_inv": torch.ones(2, 1)}))
    with pytest.raises(CheckpointError, match=rf"{key}_scale_inv: checkpoint \[2, 1\]"):
        load_causal_lm(bad_grid)

    awq = Path(shutil.copytree(fp8, tmp_path / "awq"))
    _break(awq, edit_config=lambda raw: raw.update(quantization_config={"quant_method": "awq"}))
    with pytest.raises(CheckpointError, match="'awq' is not supported"):
        load_causal_lm(awq)


def test_prefix_cache_fingerprint_tells_fp8_from_its_source(make_ckpt, tmp_path):
    """KV computed with FP8 weights must not be served to the bf16 model (or back): the
    fingerprint covers config.json (quantization_config) and the tensors' dtypes."""
    from replicas.prefix_cache.fingerprint import model_fingerprint

    bf16 = make_ckpt(dtype="bfloat16")
    fp8 = quantize_checkpoint(bf16, tmp_path / "fp8")
    assert model_fingerprint(fp8, "bfloat16") != model_fingerprint(bf16, "bfloat16")
    assert model_fingerprint(fp8, "bfloat16") == model_fingerprint(fp8, "bfloat16")


def test_model_info_names_the_quantization(make_ckpt):
    from cluster.config import ClusterConfig
    from cluster.deployments.router import model_info
    from replicas.model.config import ModelConfig
    from router.tokenizer import Tokenizer

    def info(path: Path):
        config = ClusterConfig(model_path=str(path))
        return model_info(config, ModelConfig.from_json_file(path), Tokenizer(path))

    fp8 = make_ckpt(dtype="bfloat16", quantize="fp8")
    assert info(fp8).quantization == "fp8 e4m3, blocks 128x128 (fp8)"
    assert info(fp8).dtype == "bfloat16"  # what the replicas compute in
    assert info(make_ckpt(dtype="bfloat16")).quantization == ""


# ---- routed experts held in FP8 ------------------------------------------------------------------
def _fp8_layouts(make_ckpt, tmp_path) -> dict[str, Path]:
    """FP8 checkpoints whose experts stay in FP8: blocks of 128 over aligned sizes; partial edge
    blocks (moe_intermediate 24 in blocks of 16 x 24: two grid rows, the second half full);
    transformers' fused layout (blocks of 16 divide I = 32)."""
    edge = make_ckpt(dtype="bfloat16", moe_intermediate_size=24, initializer_range=0.05)
    return {
        "aligned": make_ckpt(dtype="bfloat16", quantize="fp8", **ALIGNED),
        "edge_blocks": quantize_checkpoint(edge, tmp_path / "edge", (16, 24)),
        "fused": fused_copy(
            quantize_checkpoint(make_ckpt(dtype="bfloat16"), tmp_path / "q16", (16, 16)),
            tmp_path / "fused",
        ),
    }


def _routed(model) -> list[RoutedExperts]:
    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


def _greedy(model, prompts, **config) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = LLMEngine(model, EngineConfig(max_num_batched_tokens=64, block_size=4, **config))
    return engine.generate(prompts, params)


def test_fp8_experts_stay_fp8_and_compute_the_dequantized_results(make_ckpt, tmp_path, monkeypatch):
    """Held as the checkpoint's e4m3 bytes with their scales, the experts give what the same
    checkpoint dequantized at load gives, bit for bit: whole forwards of 1 to 2 x 40 tokens (the
    C FP8 kernel for few rows per expert, fused into one layer call up to 64 rows, dequantized
    GEMMs for many) and the engine's greedy steps (decode rows through the fused layer)."""
    from replicas.kernels import cpu as cpu_kernels

    calls = []
    if cpu_kernels.available():  # the C FP8 kernel must be what runs the few-row calls
        kernel = cpu_kernels.moe_experts_fp8
        monkeypatch.setattr(
            cpu_kernels, "moe_experts_fp8", lambda *a: calls.append(1) or kernel(*a)
        )
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 30)]
    for name, ckpt in _fp8_layouts(make_ckpt, tmp_path).items():
        held = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False)
        dense = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False, keep_fp8=False)
        for m in _routed(held):
            assert m.w13.dtype == FP8_DTYPE and m.w2.dtype == FP8_DTYPE, name
            assert m.fp8_scales() is not None
            m.fp8_scales().check(m.w13, m.w2)  # type: ignore[union-attr]
        assert all(m.w13.dtype == torch.bfloat16 for m in _routed(dense))
        ids = _ids(held.cfg.vocab_size, tokens=40)
        for tokens in (1, 4, 40):
            got, want = _logits(held, ids[:, :tokens]), _logits(dense, ids[:, :tokens])
            assert torch.equal(got, want), (name, tokens)
        assert _greedy(held, prompts) == _greedy(dense, prompts), name
    assert calls or not cpu_kernels.available()


def test_projections_stay_fp8_where_their_pieces_start_on_block_rows(
    make_ckpt, tmp_path, monkeypatch
):
    """The dense projections (attention, dense MLPs, shared experts) of an FP8 checkpoint stay
    in FP8 with their scales, giving the dequantized checkpoint's logits bit for bit (few rows
    through linear_fp8, many through the weight dequantized per call). A fused projection whose
    piece starts inside a block stays dequantized: one KV head of 64 puts v's rows at 320,
    inside the third block of 128 rows of qkv_proj. lm_head, not quantized, stays bf16. Where
    no kernel reads FP8 projections (fp32 here; GPUs, AMX CPUs) they are dequantized at load, as
    every call would otherwise dequantize the whole weight."""
    from replicas.kernels import cpu as cpu_kernels

    calls = []
    kernel = cpu_kernels.linear_fp8
    monkeypatch.setattr(cpu_kernels, "linear_fp8", lambda *a: calls.append(1) or kernel(*a))
    one_kv_head = make_ckpt(
        dtype="bfloat16", quantize="fp8", **CASES["dense2_shared2_irregular_layers"]
    )
    for ckpt, qkv_fp8 in (
        (make_ckpt(dtype="bfloat16", quantize="fp8", **ALIGNED), True),
        (one_kv_head, False),
    ):
        held = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False)
        dense = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False, keep_fp8=False)
        linears = {n: m for n, m in held.named_modules() if isinstance(m, Linear)}
        fp8 = {n for n, m in linears.items() if m.weight.dtype == FP8_DTYPE}
        want = ("o_proj", "gate_up_proj", "down_proj") + (("qkv_proj",) if qkv_fp8 else ())
        if not Linear.fp8_kernel_runs(torch.device("cpu"), torch.bfloat16):
            want = ()  # this CPU runs no linear_fp8: all dequantized at load
        assert fp8 == {n for n in linears if n.endswith(want)}, ckpt
        fp32 = load_causal_lm(ckpt, dtype=torch.float32, include_mtp=False)
        assert all(m.weight.dtype == torch.float32 for m in fp32.modules() if isinstance(m, Linear))
        assert not want or any(".shared_experts." in n or ".mlp.gate_up_proj" in n for n in fp8)
        for n in fp8:
            m = linears[n]
            assert m.weight_scale.dtype == torch.float32 and m.fp8_block == (128, 128)
        assert linears["lm_head"].weight.dtype == torch.bfloat16
        ids = _ids(held.cfg.vocab_size, tokens=40)
        for tokens in (1, 4, 40):
            got, want_logits = _logits(held, ids[:, :tokens]), _logits(dense, ids[:, :tokens])
            assert torch.equal(got, want_logits), (ckpt, tokens)
    assert calls or not cpu_kernels.available()


def test_fused_fp8_experts_whose_blocks_mix_gate_and_up_are_dequantized(make_ckpt, tmp_path):
    """Blocks of 24 rows over I = 32: the fused gate_up tensor's second block row holds gate and
    up rows, which the held layout (a grid each) cannot keep; those experts load dequantized."""
    per_expert = quantize_checkpoint(make_ckpt(dtype="bfloat16"), tmp_path / "q24", (24, 16))
    assert all(
        m.w13.dtype == FP8_DTYPE
        for m in _routed(load_causal_lm(per_expert, dtype=torch.bfloat16, include_mtp=False))
    )
    fused = fused_copy(per_expert, tmp_path / "fused24", requantize=True)
    model = load_causal_lm(fused, dtype=torch.bfloat16, include_mtp=False)
    assert all(m.w13.dtype == torch.bfloat16 and m.fp8_block is None for m in _routed(model))
    dequantized = load_causal_lm(fused, dtype=torch.bfloat16, include_mtp=False, keep_fp8=False)
    ids = _ids(model.cfg.vocab_size)
    assert torch.equal(_logits(model, ids), _logits(dequantized, ids))
    # The fused grid is the whole tensor's: 3 block rows over 2I = 64, one of them mixed.
    with safe_open(str(fused / "model.safetensors"), framework="pt") as f:
        key = f"model.layers.{model.cfg.moe_layers[0]}.mlp.experts.gate_up_proj_scale_inv"
        assert f.get_slice(key).get_shape()[1] == 3


def test_an_expert_replica_holds_about_half_the_bytes(make_ckpt, tmp_path):
    """An expert group's resident bytes (what `status` prints): FP8 weights plus fp32 scales
    against the bf16 checkpoint's, the same experts."""
    bf16 = make_ckpt(dtype="bfloat16", **ALIGNED)
    fp8 = make_ckpt(dtype="bfloat16", quantize="fp8", **ALIGNED)
    ids = [1, 4, 6]
    ratio = resident_bytes(load_expert_stack(fp8, ids)) / resident_bytes(
        load_expert_stack(bf16, ids)
    )
    assert 0.5 < ratio <= 0.55
    stats = ExpertGroup(fp8, 0, ids, dtype="bfloat16").stats()
    assert stats.weight_dtype == "float8_e4m3fn"
    assert stats.resident_bytes == resident_bytes(load_expert_stack(fp8, ids))


def test_fp8_expert_groups_and_their_rebalancing_give_colocated_greedy(make_ckpt, tmp_path):
    """Two expert groups on the FP8 checkpoint give the colocated model's greedy tokens; a group
    that gathers experts from another load (what it does when the balancer moves experts) keeps
    them in FP8 with their scales."""
    ckpt = _fp8_layouts(make_ckpt, tmp_path)["edge_blocks"]
    colocated = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False)
    attention = load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False, expert_ids=())
    placement = ExpertPlacement.contiguous(colocated.cfg.num_experts, 2)
    groups = [ExpertGroup(ckpt, g, ids, dtype="bfloat16") for g, ids in enumerate(placement.groups)]
    dispatcher = ExpertDispatcher(InProcessTransport(placement, groups))
    prompts = [list(range(7, 7 + n)) for n in (2, 9, 21, 33)]
    want = _greedy(colocated, prompts)
    engine = LLMEngine(
        attention,
        EngineConfig(max_num_batched_tokens=64, block_size=4),
        experts=dispatcher,
    )
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert engine.generate(prompts, params) == want
    layer = colocated.cfg.moe_layers[0]
    mine = groups[0].stack.experts(layer)
    merged = RoutedExperts.gather(
        colocated.cfg, (0, 1, 6, 7), [mine, groups[1].stack.experts(layer)]
    )
    assert merged.w13.dtype == FP8_DTYPE and merged.fp8_block == mine.fp8_block
    x = torch.randn(5, colocated.cfg.hidden_size).bfloat16()
    topk = torch.tensor([[0, 6], [1, 7], [6, 0], [7, 1], [0, 1]])
    whole = colocated.model.layers[str(layer)].mlp.experts
    assert torch.equal(merged.compute(x, topk)[1], whole.compute(x, topk)[1])


def test_fp8_experts_with_mtp_and_triton_kernels_keep_greedy(make_ckpt, tmp_path):
    """MTP drafts verified on FP8 experts, and the Triton kernel reading FP8 tiles (Triton's
    interpreter on CPU), give the greedy tokens of the checkpoint dequantized at load."""
    ckpt = _fp8_layouts(make_ckpt, tmp_path)["edge_blocks"]
    prompts = [list(range(9, 9 + n)) for n in (4, 19)]
    dense = load_causal_lm(ckpt, dtype=torch.bfloat16, keep_fp8=False)
    want = _greedy(dense, prompts)
    held = load_causal_lm(ckpt, dtype=torch.bfloat16)
    assert held.mtp is not None
    assert _greedy(held, prompts, num_speculative_tokens=2) == want
    use_expert_kernels(held, "triton")
    use_expert_kernels(dense, "triton")
    ids = _ids(held.cfg.vocab_size, tokens=12)
    assert torch.equal(_logits(held, ids), _logits(dense, ids))


def _grouped_reference(x, tokens, offsets, w13, w2):
    """The kernels' contract (replicas.kernels.triton_moe.moe_experts) in PyTorch operations."""
    h, bounds = x.index_select(0, tokens), offsets.tolist()
    y = torch.empty_like(h)
    for e in range(w13.shape[0]):
        rows = slice(bounds[e], bounds[e + 1])
        gate, up = torch.nn.functional.linear(h[rows], w13[e]).chunk(2, dim=-1)
        y[rows] = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e])
    return y


@pytest.mark.parametrize("kernel", ["amx", "vllm"])
def test_kernels_without_an_fp8_path_get_the_used_experts_dequantized(
    make_ckpt, monkeypatch, kernel
):
    """The AMX kernel and vLLM's take weights as they compute: FP8 experts hand them the
    experts a call uses, dequantized (AMX: those alone, with offsets over them; vLLM: among
    zeros for the others, so it sees the expert count its tuned tiling is chosen by); the
    answer is the one the kernel gives on the checkpoint dequantized at load. (Neither runs on
    this machine: both stand in as the contract in PyTorch operations.)"""
    from replicas.kernels import backend as kernel_backend
    from replicas.kernels import cpu as cpu_kernels

    seen = []

    def fake(x, tokens, offsets, w13, w2):
        seen.append((w13.dtype, w13.shape[0], offsets.numel()))
        return _grouped_reference(x, tokens, offsets, w13, w2)

    if kernel == "amx":
        monkeypatch.setattr(cpu_kernels, "amx_available", lambda: True)
        monkeypatch.setattr(cpu_kernels, "moe_experts_amx", fake)
    else:
        monkeypatch.setattr(kernel_backend, "moe_experts", lambda name: fake)
    ckpt = make_ckpt(dtype="bfloat16", quantize="fp8", **ALIGNED)
    held = _routed(load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False))[0]
    dense = _routed(load_causal_lm(ckpt, dtype=torch.bfloat16, include_mtp=False, keep_fp8=False))[
        0
    ]
    for m in (held, dense):
        m.kernels = "torch" if kernel == "amx" else kernel
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, held.w13.shape[-1], generator=g).bfloat16()
    topk = torch.randint(0, 3, (40, 2), generator=g)  # experts 0-2 of 8: five unused
    topk[:, 1] = (topk[:, 0] + 1) % 3
    got, want = held.compute(x, topk), dense.compute(x, topk)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # AMX: the 3 used experts (each computed alone); vLLM (tiling chosen by the expert count):
    # all 8, the unused ones zero; the dequantized model: all 8
    held_shape = (3, 4) if kernel == "amx" else (8, 9)
    assert seen == [(torch.bfloat16, *held_shape), (torch.bfloat16, 8, 9)]


def test_a_layer_is_held_in_fp8_only_when_all_its_experts_are(make_ckpt, tmp_path):
    """Decided per layer over all of its experts, not over those a group holds: every group
    of a layer holds it alike (a group gathering from another's layout would fail), here a layer
    where one expert's weight was left unquantized."""
    fp8 = quantize_checkpoint(make_ckpt(dtype="bfloat16"), tmp_path / "q", (16, 16))
    mixed = Path(shutil.copytree(fp8, tmp_path / "mixed"))
    tensors = load_file(str(mixed / "model.safetensors"))
    first = json.loads((mixed / "config.json").read_text())["mlp_layer_types"].index("sparse")
    key = f"model.layers.{first}.mlp.experts.0.gate_proj.weight"
    scale = tensors.pop(key + "_scale_inv")
    tensors[key] = dequantize(tensors[key], scale, (16, 16), torch.bfloat16)
    save_file(tensors, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    stack = load_expert_stack(mixed, [3, 4], dtype=torch.bfloat16)  # quantized experts only
    second = next(i for i in stack.layer_ids() if i != first)
    assert stack.experts(first).w13.dtype == torch.bfloat16
    assert stack.experts(second).w13.dtype == FP8_DTYPE
    whole = load_causal_lm(mixed, dtype=torch.bfloat16, include_mtp=False)
    ids = _ids(whole.cfg.vocab_size)
    plain = load_causal_lm(mixed, dtype=torch.bfloat16, include_mtp=False, keep_fp8=False)
    assert torch.equal(_logits(whole, ids), _logits(plain, ids))
