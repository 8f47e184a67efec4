"""replicas.engine.decode_path: a colocated bf16 decode step without module calls gives the module
path's hidden states bit for bit, and is taken only where it applies."""

from __future__ import annotations

import pytest
import torch

from replicas.engine import decode_path
from replicas.engine import engine as engine_module
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.loader import load_causal_lm
from replicas.sampling_params import SamplingParams
from tests.cpu_features import CAN_BUILD

needs_kernel = pytest.mark.skipif(
    not CAN_BUILD, reason="needs AVX512-BF16, AVX512-VBMI and a C compiler"
)


def _step_hiddens(model, prompts, use_decode_path: bool, monkeypatch) -> tuple[list, list]:
    """Greedy generation -> (every step's hidden states, whether the decode path ran it)."""
    monkeypatch.setattr(engine_module, "DECODE_PATH", use_decode_path)
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

    monkeypatch.setattr(decode_path, "decode_hidden", recording_decode)
    monkeypatch.setattr(engine, "_execute", recording_execute)
    engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    return hiddens, fast


@needs_kernel
@pytest.mark.parametrize("batch", [1, 6, 20])  # 20: past the rows the dense kernel takes
def test_decode_path_equals_the_module_path_bit_for_bit(make_ckpt, monkeypatch, batch):
    model = load_causal_lm(make_ckpt(dtype="bfloat16"), dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(batch)
    prompts = [
        torch.randint(5, 1000, (int(n),), generator=g).tolist()
        for n in torch.randint(3, 30, (batch,), generator=g)
    ]
    fast_hiddens, fast = _step_hiddens(model, prompts, True, monkeypatch)
    slow_hiddens, slow = _step_hiddens(model, prompts, False, monkeypatch)
    assert not any(slow)
    assert fast[0] is False and sum(fast) >= 10  # prefill steps take the module path
    assert len(fast_hiddens) == len(slow_hiddens)
    for a, b in zip(fast_hiddens, slow_hiddens, strict=True):
        assert torch.equal(a, b)


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
