"""Weight loading: layouts, sharding, partial loads, resident memory and broken checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from replicas.model.config import ConfigError
from replicas.model.loader import (
    INDEX_FILE,
    CheckpointError,
    load_causal_lm,
    load_expert_stack,
    resident_bytes,
)
from tests.paths import ROOT


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(ckpt: Path, edit) -> None:
    """Load the single safetensors file, let ``edit`` change the dict, write it back."""
    file = ckpt / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _fuse_experts(tensors: dict[str, torch.Tensor], num_experts: int) -> None:
    """Per-expert layout -> transformers' fused layout, bias under the runtime name."""
    layers = sorted({int(k.split(".")[2]) for k in tensors if ".experts.0.gate_proj" in k})
    for i in layers:
        p = f"model.layers.{i}.mlp"
        gate_up, down = [], []
        for e in range(num_experts):
            g = tensors.pop(f"{p}.experts.{e}.gate_proj.weight")
            u = tensors.pop(f"{p}.experts.{e}.up_proj.weight")
            gate_up.append(torch.cat([g, u]))
            down.append(tensors.pop(f"{p}.experts.{e}.down_proj.weight"))
        tensors[f"{p}.experts.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{p}.experts.down_proj"] = torch.stack(down)
        tensors[f"{p}.gate.e_score_correction_bias"] = tensors.pop(f"{p}.e_score_correction_bias")


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_fused_layout_loads_identically(make_ckpt, tmp_path):
    ckpt = make_ckpt(dtype="float32")
    fused = _copy(ckpt, tmp_path / "fused")
    _rewrite(fused, lambda t: _fuse_experts(t, 8))
    a = load_causal_lm(ckpt, dtype=torch.float32)
    b = load_causal_lm(fused, dtype=torch.float32)
    _assert_same_state(a, b)
    # A fused subset reads only the requested rows of the stacked tensors.
    sub = load_causal_lm(fused, dtype=torch.float32, expert_ids=[2, 6])
    layer = sub.cfg.moe_layers[0]
    full_experts = a.model.layers[str(layer)].mlp.experts
    sub_experts = sub.model.layers[str(layer)].mlp.experts
    assert torch.equal(sub_experts.w13, full_experts.w13[[2, 6]])


def test_sharded_checkpoint_with_index(make_ckpt):
    single = make_ckpt(dtype="float32")
    sharded = make_ckpt(dtype="float32", shard_mb=0.25)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and (sharded / INDEX_FILE).exists()
    _assert_same_state(
        load_causal_lm(single, dtype=torch.float32),
        load_causal_lm(sharded, dtype=torch.float32),
    )


def test_expert_subset_equals_full_load(make_ckpt):
    ckpt = make_ckpt(dtype="bfloat16")
    full = load_causal_lm(ckpt, dtype=torch.bfloat16)
    subset = [1, 4, 7]
    part = load_causal_lm(ckpt, dtype=torch.bfloat16, expert_ids=subset)
    stack = load_expert_stack(ckpt, dtype=torch.bfloat16, expert_ids=subset)
    for layer in full.cfg.moe_layers:
        f = full.model.layers[str(layer)].mlp.experts
        for sub in (part.model.layers[str(layer)].mlp.experts, stack.experts(layer)):
            assert sub.expert_ids == tuple(subset)
            assert torch.equal(sub.w13, f.w13[subset]) and torch.equal(sub.w2, f.w2[subset])
    # Non-expert weights of the partial model equal the full load too.
    fs = full.state_dict()
    for k, v in part.state_dict().items():
        if ".experts." not in k:
            assert torch.equal(v, fs[k]), k
    # The MoE gate's bias stays fp32 in a bf16 model.
    assert full.model.layers["1"].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_partial_expert_model_refuses_full_forward(make_ckpt):
    part = load_causal_lm(make_ckpt(), dtype=torch.float32, expert_ids=[0])
    with pytest.raises(RuntimeError, match="partial model"):
        part(torch.zeros(1, 4, dtype=torch.long))


def test_layer_range_load(make_ckpt):
    ckpt = make_ckpt(dtype="float32")
    full = load_causal_lm(ckpt, dtype=torch.float32)
    part = load_causal_lm(ckpt, dtype=torch.float32, layers=range(1, 3))
    assert sorted(part.model.layers.keys()) == ["1", "2"]
    fs = full.state_dict()
    for k, v in part.state_dict().items():
        assert torch.equal(v, fs[k]), k
    assert part.bytes_read < full.bytes_read


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from replicas.model.loader import load_expert_stack, resident_bytes

    def rss_anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    ckpt, n = sys.argv[1], int(sys.argv[2])
    # Warm-up load (lazy imports, allocator arenas, thread pools) so only the weights are measured.
    warm = load_expert_stack(ckpt, dtype=torch.float32, expert_ids=[0])
    del warm
    before = rss_anon()
    stack = load_expert_stack(ckpt, dtype=torch.float32, expert_ids=range(n))
    print(json.dumps({"rss": rss_anon() - before, "held": resident_bytes(stack),
                      "read": stack.bytes_read}))
    """
)


@pytest.mark.slow
def test_expert_subset_memory_is_proportional(make_ckpt, report):
    """Resident memory (RssAnon growth of a fresh process) of an expert group's load scales with
    the number of experts it holds."""
    ckpt = make_ckpt(
        dtype="bfloat16",
        hidden_size=256,
        moe_intermediate_size=256,
        num_experts=32,
        num_hidden_layers=5,
    )
    results = {}
    for n in (32, 8):
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(ckpt), str(n)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        results[n] = json.loads(out.stdout.strip().splitlines()[-1])
    full, quarter = results[32], results[8]
    report(
        f"expert weights held: 32 experts {full['held'] / 2**20:.1f} MiB "
        f"(RSS +{full['rss'] / 2**20:.1f} MiB, read {full['read'] / 2**20:.1f} MiB); "
        f"8 experts {quarter['held'] / 2**20:.1f} MiB (RSS +{quarter['rss'] / 2**20:.1f} MiB, "
        f"read {quarter['read'] / 2**20:.1f} MiB)"
    )
    assert quarter["held"] * 4 == full["held"]
    assert quarter["read"] * 4 == full["read"]
    assert full["rss"] >= 0.9 * full["held"]  # the weights are really resident
    assert 0.18 <= quarter["rss"] / full["rss"] <= 0.35


# ---- broken checkpoints ------------------------------------------------------------------------
def test_missing_tensors_are_all_named(make_ckpt, tmp_path):
    ckpt = _copy(make_ckpt(), tmp_path / "c")
    gone = ["model.norm.weight", "model.layers.1.mlp.experts.3.up_proj.weight", "mtp.fc.weight"]

    def drop(t):
        for k in gone:
            del t[k]

    _rewrite(ckpt, drop)
    with pytest.raises(CheckpointError) as err:
        load_causal_lm(ckpt)
    for k in gone:
        assert k in str(err.value)
    assert "3 missing" in str(err.value)


def test_wrong_shape_is_named_with_both_shapes(make_ckpt, tmp_path):
    ckpt = _copy(make_ckpt(), tmp_path / "c")
    key = "model.layers.0.self_attn.q_proj.weight"
    _rewrite(ckpt, lambda t: t.__setitem__(key, torch.zeros(7, 64)))
    with pytest.raises(
        CheckpointError, match=r"q_proj\.weight: checkpoint \[7, 64\], model expects \[128, 64\]"
    ):
        load_causal_lm(ckpt)


def test_unexpected_tensor_is_named(make_ckpt, tmp_path):
    ckpt = _copy(make_ckpt(), tmp_path / "c")
    key = "model.layers.0.self_attn.rotary.inv_freq"
    _rewrite(ckpt, lambda t: t.__setitem__(key, torch.zeros(3)))
    with pytest.raises(CheckpointError, match="1 unexpected tensor.*\n.*rotary.inv_freq"):
        load_causal_lm(ckpt)


def _edit_config(ckpt: Path, edit) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture(make_ckpt, tmp_path):
    ckpt = _copy(make_ckpt(), tmp_path / "c")
    _edit_config(ckpt, lambda c: c.update(architectures=["LlamaForCausalLM"]))
    with pytest.raises(ConfigError, match="unknown architecture 'LlamaForCausalLM'"):
        load_causal_lm(ckpt)


@pytest.mark.parametrize("field", ["num_experts", "hidden_size", "moe_intermediate_size"])
def test_missing_config_field(make_ckpt, tmp_path, field):
    ckpt = _copy(make_ckpt(), tmp_path / "c")
    _edit_config(ckpt, lambda c: c.pop(field))
    with pytest.raises(ConfigError, match=f"missing required field.*'{field}'"):
        load_causal_lm(ckpt)


def test_truncated_safetensors_file(make_ckpt, tmp_path):
    ckpt = _copy(make_ckpt(), tmp_path / "c")
    (ckpt / "model.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="model.safetensors is not a safetensors file"):
        load_causal_lm(ckpt)


def test_index_naming_a_missing_file(make_ckpt, tmp_path):
    ckpt = _copy(make_ckpt(shard_mb=0.25), tmp_path / "c")
    victim = sorted(ckpt.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_causal_lm(ckpt)


def test_mtp_optional_when_absent(make_ckpt, tmp_path):
    """transformers' save_pretrained drops mtp.*: such a checkpoint loads without MTP."""
    ckpt = _copy(make_ckpt(), tmp_path / "c")
    _rewrite(ckpt, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("mtp.")]])
    model = load_causal_lm(ckpt)
    assert model.mtp is None
    with pytest.raises(CheckpointError, match="mtp.fc.weight"):
        load_causal_lm(ckpt, include_mtp=True)


def test_resident_bytes_counts_dtype(make_ckpt):
    ckpt = make_ckpt()
    a = resident_bytes(load_causal_lm(ckpt, dtype=torch.float32))
    b = resident_bytes(load_causal_lm(ckpt, dtype=torch.bfloat16))
    assert 1.9 < a / b < 2.0  # router biases stay fp32
