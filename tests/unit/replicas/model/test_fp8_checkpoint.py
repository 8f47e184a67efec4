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
from replicas.model.loader import CheckpointError, load_causal_lm, load_expert_stack
from replicas.model.quantization import FP8_DTYPE

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
    # Our FP8 load is that dequantization exactly: the same weights bit for bit.
    plain = load_causal_lm(reference, dtype=torch.float32)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, plain.state_dict()[name]), name
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
    fused = Path(shutil.copytree(per_expert, tmp_path / "fused"))
    tensors = load_file(str(fused / "model.safetensors"))
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
                for e in range(8)
            ]
            down = [tensors.pop(f"{p}.{e}.down_proj.weight{suffix}") for e in range(8)]
            tensors[f"{p}.gate_up_proj{suffix}"] = torch.stack(gate_up)
            tensors[f"{p}.down_proj{suffix}"] = torch.stack(down)
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    a = load_causal_lm(per_expert, dtype=torch.bfloat16).state_dict()
    b = load_causal_lm(fused, dtype=torch.bfloat16).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # An expert group reads its experts' rows (and their scales) of the fused tensors.
    stack = load_expert_stack(fused, [2, 5], dtype=torch.bfloat16)
    layer = stack.layer_ids()[0]
    assert torch.equal(stack.experts(layer).w13, a[f"model.layers.{layer}.mlp.experts.w13"][[2, 5]])


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
