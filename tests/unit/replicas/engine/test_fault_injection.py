"""replicas.engine.fault_injection: refused unless the process enables it; an armed fault fires
once, at the engine's next step, and the engine then serves as before."""

from __future__ import annotations

import pytest

from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.fault_injection import ENV, EngineThreadKilled, InjectedFault, arm
from replicas.sampling_params import SamplingParams

PROMPT = [5, 9, 13, 21, 34]
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _engine(model):
    return LLMEngine(model, EngineConfig(block_size=4, num_speculative_tokens=2))


def test_refused_unless_the_process_enables_it(tiny_model, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(PermissionError, match=ENV):
        arm(_engine(tiny_model), "step")
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(ValueError, match="fault='nope'"):
        arm(_engine(tiny_model), "nope")


@pytest.mark.parametrize(
    "fault, error",
    [("step", InjectedFault), ("draft", InjectedFault), ("engine_thread", EngineThreadKilled)],
)
def test_an_armed_fault_fires_once_then_the_engine_serves(tiny_model, monkeypatch, fault, error):
    monkeypatch.setenv(ENV, "1")
    want = _engine(tiny_model).generate([PROMPT], PARAMS)
    engine = _engine(tiny_model)
    engine.add_request("a", PROMPT, PARAMS)
    arm(engine, fault)
    with pytest.raises(error, match="injected fault"):
        engine.step()
    engine.abort("a")
    assert engine.generate([PROMPT], PARAMS) == want
