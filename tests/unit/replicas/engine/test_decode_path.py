"""replicas.engine.decode_path: a colocated bf16 decode step without module calls gives the module
path's hidden states bit for bit, and is taken only where it applies; so does its C version
(replicas.engine.decode_native, csrc/decode_step.c), with the routers in PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from replicas.engine import decode_native, decode_path
from replicas.engine import engine as engine_module
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.kernels import decode_step
from replicas.model.layers import FUSED_DECODE_MAX_ROWS, STREAM_LINEAR_MAX_ROWS
from replicas.model.loader import load_causal_lm
from replicas.model.moe import MoEGate, RoutedExperts
from replicas.sampling_params import SamplingParams
from tests.cpu_features import AVX512, CAN_BUILD, TORCH_ORDER

needs_kernel = pytest.mark.skipif(
    not CAN_BUILD, reason="needs AVX512-BF16 and AVX512-VBMI, or AVX2, and a C compiler"
)
# Steps decode_native runs: up to FUSED_DECODE_MAX_ROWS rows where every projection of the tiny
# preset has a kernel past STREAM_LINEAR_MAX_ROWS (the packed kernel in the AVX512 build,
# linear_bf16_torch in the AVX2 one where PyTorch runs AVX2), else up to that
FULL = AVX512 or TORCH_ORDER
NATIVE_MAX_ROWS = FUSED_DECODE_MAX_ROWS if FULL else STREAM_LINEAR_MAX_ROWS


def _step_hiddens(
    model, prompts, use_decode_path: bool, monkeypatch, native: bool = False
) -> tuple[list, list]:
    """Greedy generation -> (every step's hidden states, whether the decode path ran it: True,
    or "native" where decode_native ran it)."""
    monkeypatch.setattr(engine_module, "DECODE_PATH", use_decode_path)
    monkeypatch.setattr(decode_native, "NATIVE", native)
    engine = LLMEngine(
        model,
        EngineConfig(
            max_num_batched_tokens=256, max_num_seqs=32, block_size=16, kv_cache_bytes=16 << 20
        ),
    )
    hiddens, fast = [], []
    execute = engine._execute
    original = decode_path.decode_hidden

    def recording_decode(*args):
        fast[-1] = True
        return original(*args)

    def recording_execute(plan):
        fast.append(False)
        hiddens.append(execute(plan))
        return hiddens[-1]

    native_run = decode_native.NativeDecode.run

    def recording_native(self, *args):
        fast[-1] = "native"
        return native_run(self, *args)

    monkeypatch.setattr(decode_path, "decode_hidden", recording_decode)
    monkeypatch.setattr(decode_native.NativeDecode, "run", recording_native)
    monkeypatch.setattr(engine, "_execute", recording_execute)
    engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return hiddens, fast


def _prompts(batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [
        torch.randint(5, 1000, (int(n),), generator=g).tolist()
        for n in torch.randint(3, 30, (batch,), generator=g)
    ]


@needs_kernel
@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
@pytest.mark.parametrize("batch", [1, 6, 20])  # 20: past the rows the dense kernel takes
def test_decode_path_equals_the_module_path_bit_for_bit(make_ckpt, monkeypatch, batch, native):
    model = load_causal_lm(make_ckpt(dtype="bfloat16"), dtype=torch.bfloat16)
    prompts = _prompts(batch)
    fast_hiddens, fast = _step_hiddens(model, prompts, True, monkeypatch, native)
    slow_hiddens, slow = _step_hiddens(model, prompts, False, monkeypatch)
    assert not any(slow)
    assert sum(map(bool, fast)) >= 10
    if native:  # every step of up to NATIVE_MAX_ROWS rows
        rows = [h.shape[0] for h in fast_hiddens]
        assert [f == "native" for f in fast] == [n <= NATIVE_MAX_ROWS for n in rows]
        assert any(n > 1 for n in rows[: len(prompts)] if n <= NATIVE_MAX_ROWS)  # a prefill
    else:  # decode steps only; the prefill takes the module path
        assert fast[0] is False
    assert len(fast_hiddens) == len(slow_hiddens)
    for a, b in zip(fast_hiddens, slow_hiddens, strict=True):
        assert torch.equal(a, b)


def _staggered_hiddens(model, native: bool, monkeypatch) -> tuple[list, int]:
    """Requests arriving every third step (steps mixing prompt chunks with decode rows) ->
    (every step's hidden states, how many steps decode_native ran)."""
    monkeypatch.setattr(decode_native, "NATIVE", native)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=16, kv_cache_bytes=16 << 20))
    g = torch.Generator().manual_seed(3)
    hiddens, execute = [], engine._execute
    runs = []
    native_run = decode_native.NativeDecode.run
    monkeypatch.setattr(
        decode_native.NativeDecode, "run", lambda self, *a: runs.append(1) or native_run(self, *a)
    )
    monkeypatch.setattr(
        engine, "_execute", lambda plan: hiddens.append(execute(plan)) or hiddens[-1]
    )
    for step in range(90):
        if step % 3 == 0 and step < 60:
            prompt = torch.randint(
                5, 1000, (int(torch.randint(3, 40, (), generator=g)),), generator=g
            )
            params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
            engine.add_request(f"r{step}", prompt.tolist(), params)
        engine.step()
    return hiddens, len(runs)


@needs_kernel
def test_native_steps_mixing_prompts_and_decodes_equal_the_module_path(make_ckpt, monkeypatch):
    """Steps with prompt chunks beside decode rows attend through the step's backend between two
    C calls: the module path's bits."""
    model = load_causal_lm(make_ckpt(dtype="bfloat16"), dtype=torch.bfloat16)
    fast, runs = _staggered_hiddens(model, True, monkeypatch)
    slow, none = _staggered_hiddens(model, False, monkeypatch)
    assert none == 0 and len(fast) == len(slow) >= 60
    assert runs == sum(h.shape[0] <= NATIVE_MAX_ROWS for h in fast)
    if FULL:  # every step (none has more than 64 rows)
        assert runs == len(fast)
    mixed = [h.shape[0] for h in fast if 1 < h.shape[0] <= NATIVE_MAX_ROWS]
    assert len(mixed) >= 15  # prompt rows in a third of the steps, run by the C step
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b)


@needs_kernel
def test_native_decode_hands_declined_experts_to_the_module_path(make_ckpt, monkeypatch):
    """Where the C expert kernel declines a layer's rows (more rows per expert than it takes),
    decode_layers returns and the caller computes them as the module path does: the same bits."""
    model = load_causal_lm(make_ckpt(dtype="bfloat16"), dtype=torch.bfloat16)
    monkeypatch.setattr(RoutedExperts, "decode_max_rows", lambda self: 1)
    declined = []
    original = decode_native.weighted_sum
    monkeypatch.setattr(
        decode_native, "weighted_sum", lambda *a: declined.append(1) or original(*a)
    )
    prompts = _prompts(12)
    fast_hiddens, fast = _step_hiddens(model, prompts, True, monkeypatch, True)
    slow_hiddens, _ = _step_hiddens(model, prompts, False, monkeypatch)
    assert "native" in fast and len(declined) >= 10
    for a, b in zip(fast_hiddens, slow_hiddens, strict=True):
        assert torch.equal(a, b)


@needs_kernel
def test_router_ties_go_to_pytorchs_router(make_ckpt, monkeypatch):
    """The router's tail runs in C (top-k of scores + bias, normalised, scaled) unless a row has
    two equal values among its top k + 1, whose order is PyTorch's topk's to choose: two experts
    with the same router row and bias tie on every token, and those layers' routers run in
    PyTorch. Either way the module path's bits."""
    model = load_causal_lm(make_ckpt(dtype="bfloat16"), dtype=torch.bfloat16)
    for module in model.modules():
        if isinstance(module, MoEGate):
            with torch.no_grad():
                module.weight[1] = module.weight[0]
                module.e_score_correction_bias[1] = module.e_score_correction_bias[0] + 5.0
                module.e_score_correction_bias[0] += 5.0  # and both always among the chosen
    kinds = []
    original = decode_native.decode_layers

    def recording(*args, **kwargs):
        layer, kind = original(*args, **kwargs)
        kinds.append(kind)
        return layer, kind

    monkeypatch.setattr(decode_native, "decode_layers", recording)
    prompts = _prompts(6)
    fast_hiddens, fast = _step_hiddens(model, prompts, True, monkeypatch, True)
    slow_hiddens, _ = _step_hiddens(model, prompts, False, monkeypatch)
    assert "native" in fast
    assert kinds.count(decode_step.ROUTER) == kinds.count(decode_step.SCORES) > 0  # each tied
    for a, b in zip(fast_hiddens, slow_hiddens, strict=True):
        assert torch.equal(a, b)


def _silu_as_swiglu(inter: int, values: torch.Tensor) -> torch.Tensor:
    """F.silu of bf16 ``values`` (a multiple of ``inter`` of them) as a SwiGLU of width ``inter``
    calls it: on the gate half of a [rows, 2 * inter] projection."""
    gate_up = torch.zeros(values.numel() // inter, 2 * inter, dtype=torch.bfloat16)
    gate_up[:, :inter] = values.view(-1, inter)
    return F.silu(gate_up.split(inter, dim=-1)[0]).reshape(-1)


@pytest.mark.parametrize("inter", [32, 64, 96, 256])
def test_silu_table_is_pytorchs_silu_of_every_bf16_value(inter):
    """Every bf16 bit pattern through F.silu as a SwiGLU of width I calls it, on as many rows as
    it takes and one row at a time for some: the table of width I holds the same bits. Where
    there is no table, a value's result really does depend on its column."""
    bits = torch.arange(65536, dtype=torch.int32)
    values = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.bfloat16)
    padded = torch.cat([values, values[: -65536 % inter]])
    got = _silu_as_swiglu(inter, padded)[:65536].view(torch.int16)
    table = decode_native.silu_table(inter)
    if table is None:
        moved = torch.cat([padded[1:], padded[:1]])  # every value one column to the left
        again = _silu_as_swiglu(inter, moved).view(torch.int16)
        assert not torch.equal(got[1:], again[:65535])  # value v + 1 at column v
        return
    assert torch.equal(got, table.view(torch.int16))
    for start in (0, 12345, 65536 - inter):
        one = _silu_as_swiglu(inter, values[start : start + inter])
        assert torch.equal(one.view(torch.int16), table[start : start + inter].view(torch.int16))


@needs_kernel
def test_native_decode_declines_fp8_models(make_ckpt):
    """FP8 weights (their own kernels) keep the Python decode path."""
    model = load_causal_lm(make_ckpt(dtype="bfloat16", quantize="fp8"), dtype=torch.bfloat16)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=4, kv_cache_bytes=4 << 20))
    assert decode_native.native_for(model, engine.cache) is None


def test_decode_path_declines_fp32_models(make_ckpt):
    """An fp32 model (and any step that is not a decode-only bf16 CPU step) keeps the module
    path."""
    model = load_causal_lm(make_ckpt(dtype="float32"), dtype=torch.float32)
    engine = LLMEngine(
        model,
        EngineConfig(
            max_num_batched_tokens=256, max_num_seqs=4, block_size=16, kv_cache_bytes=4 << 20
        ),
    )
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3))
    engine.step()  # the prompt
    plan = engine.scheduler.schedule()
    ids, _, backend = engine._inputs(plan.chunks)
    assert not decode_path.applies(model, ids.shape[0], backend)
