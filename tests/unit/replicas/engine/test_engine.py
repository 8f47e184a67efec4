"""The engine against transformers and against itself (cache vs recompute, batching, preemption)."""

from __future__ import annotations

import pytest
import torch
from transformers import ExaoneMoeForCausalLM as HFModel

from cluster.bundled.presets import PRESETS
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.engine.kv_cache import HybridKVCache, kv_footprint
from replicas.engine.request import FinishReason
from replicas.kernels import cpu as cpu_kernels
from replicas.kernels.attention_batch import SeqChunk
from replicas.model.config import ModelConfig
from replicas.model.exaone_moe import ExaoneMoeForCausalLM
from replicas.model.loader import load_causal_lm
from replicas.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1], (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (s,), generator=g).tolist() for s in sizes]


def test_greedy_batch_equals_transformers_generate(tiny_ckpt, tiny_model):
    path, model = tiny_ckpt, tiny_model
    window = model.cfg.sliding_window
    prompts = _prompts(16, (1, 5 * window), model.cfg.vocab_size)
    assert sum(len(p) > window for p in prompts) >= 4
    budget = 24  # prompts longer than this are prefilled in chunks, mixed with decodes
    assert sum(len(p) > budget for p in prompts) >= 2
    engine = LLMEngine(model, EngineConfig(max_num_batched_tokens=budget, block_size=4))
    ours = engine.generate(prompts, GREEDY)
    ref_model = HFModel.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    for prompt, got in zip(prompts, ours, strict=True):
        want = ref_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert got == want, f"prompt of {len(prompt)} tokens"
    assert engine.num_blocks_in_use == 0


RECOMPUTE_SEQS = (40, 33)  # positions of the two sequences below


def _cached_vs_recompute(
    model: ExaoneMoeForCausalLM, dtype: torch.dtype, reference: ExaoneMoeForCausalLM | None = None
) -> float:
    """Chunked prefill then decode through the cache; each step's logits against a full
    forward of the whole prefix (by ``reference``, default the model itself), across several
    window boundaries (window 8, 40 positions) -> max |diff|."""
    reference = reference or model
    cache = HybridKVCache(model.cfg, num_blocks=32, block_size=4, max_seqs=2, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(2, 1024, (n,), generator=g) for n in RECOMPUTE_SEQS]
    blocks = [cache.blocks.allocate(10), cache.blocks.allocate(10)]
    slots = cache.slots.allocate(2)
    done, worst = [0, 0], 0.0
    plan = [(5, 11), (7, 3), (1, 9)] + [(1, 1)] * 27  # uneven chunks, then one token a step
    with torch.inference_mode():
        for sizes in plan:
            chunks, ids, pos = [], [], []
            for b, n in enumerate(sizes):
                n = min(n, len(seqs[b]) - done[b])
                if n:
                    chunks.append((b, SeqChunk(done[b], n, blocks[b], slots[b])))
                    ids.append(seqs[b][done[b] : done[b] + n])
                    pos.append(torch.arange(done[b], done[b] + n))
            hidden = model.step_hidden(
                torch.cat(ids), torch.cat(pos), cache.step([c for _, c in chunks])
            )
            logits, offset = model.lm_head(hidden).float(), 0
            for b, c in chunks:
                full = reference(seqs[b][None, : c.num_computed + c.num_new])[0, c.num_computed :]
                diff = (logits[offset : offset + c.num_new] - full.float()).abs().max().item()
                worst = max(worst, diff)
                offset += c.num_new
                done[b] += c.num_new
    assert done == list(RECOMPUTE_SEQS)
    return worst


def test_cached_decode_equals_full_recompute_every_step(tiny_model, report):
    worst = _cached_vs_recompute(tiny_model, torch.float32)
    report(f"cached step vs full recompute: max |diff| {worst:.3g} (fp32, window 8)")
    assert worst <= 1e-4


def test_cached_bf16_decode_is_as_close_to_fp32_as_a_bf16_forward(make_ckpt, monkeypatch, report):
    """bf16, where decode runs our CPU kernels (decode attention reading the cache in place,
    AMX projections and experts) when this CPU has them. Each step's logits are compared with
    the fp32 forward of the same weights; they must be no further from it than bf16's own
    full-sequence forward is (observed: 0.045 both, with or without the kernels)."""
    path = make_ckpt(dtype="bfloat16")
    model = load_causal_lm(path, dtype=torch.bfloat16, include_mtp=False)
    fp32 = load_causal_lm(path, dtype=torch.float32, include_mtp=False)
    calls = []
    kernel = cpu_kernels.decode_attention_bf16
    monkeypatch.setattr(
        cpu_kernels, "decode_attention_bf16", lambda *a: calls.append(1) or kernel(*a)
    )
    worst = _cached_vs_recompute(model, torch.bfloat16, reference=fp32)
    g = torch.Generator().manual_seed(1)  # the same sequences as the helper's
    seqs = [torch.randint(2, 1024, (n,), generator=g) for n in RECOMPUTE_SEQS]
    with torch.inference_mode():
        bar = max((model(s[None]).float() - fp32(s[None])).abs().max().item() for s in seqs)
    report(
        f"bf16 vs fp32 logits: cached steps {worst:.3g}, bf16 full forward {bar:.3g} "
        f"({len(calls)} kernel attention calls)"
    )
    assert worst <= 1.5 * bar
    # Every step with a decode row uses the kernel in every layer where it can run: the 27
    # decode steps and the (1, 9) step, whose decode row attends apart from the 9-token chunk.
    assert len(calls) == (28 * model.cfg.num_hidden_layers if cpu_kernels.available() else 0)


def test_seeded_request_same_alone_and_in_batch_of_16(tiny_model):
    model = tiny_model
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=2024, max_tokens=10)
    prompts = _prompts(16, (3, 30), model.cfg.vocab_size, seed=5)
    alone = LLMEngine(model, EngineConfig(block_size=4)).generate([prompts[7]], seeded)[0]
    mates = [SamplingParams(temperature=1.0, max_tokens=10 + i % 5) for i in range(16)]
    mates[7] = seeded
    crowd = LLMEngine(model, EngineConfig(max_num_batched_tokens=40, block_size=4))
    assert crowd.generate(prompts, mates)[7] == alone
    other = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=10)
    assert LLMEngine(model, EngineConfig(block_size=4)).generate([prompts[7]], other)[0] != alone


def test_preemption_keeps_greedy_outputs(tiny_model):
    model = tiny_model
    prompts = _prompts(12, (10, 30), model.cfg.vocab_size, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = LLMEngine(model, EngineConfig(block_size=4, num_blocks=512)).generate(prompts, params)
    # 14 blocks of 4 = 56 positions: one sequence fits (<= 54), a dozen do not.
    tight = LLMEngine(model, EngineConfig(block_size=4, num_blocks=14, max_num_batched_tokens=64))
    preemptions = 0
    original = tight.scheduler._preempt

    def counting(request):
        nonlocal preemptions
        preemptions += 1
        original(request)

    tight.scheduler._preempt = counting
    assert tight.generate(prompts, params) == roomy
    assert preemptions > 0
    assert tight.num_blocks_in_use == 0


def test_abort_mid_stream_returns_every_block(tiny_model):
    model = tiny_model
    engine = LLMEngine(model, EngineConfig(block_size=4, max_num_batched_tokens=16))
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(_prompts(4, (20, 40), model.cfg.vocab_size)):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(6):
        engine.step()
    assert engine.num_blocks_in_use > 0
    assert engine.abort("r1") and engine.abort("r3") and not engine.abort("r3")
    for _ in range(3):
        outputs = engine.step()
        assert {o.request_id for o in outputs} <= {"r0", "r2"}
    assert engine.abort("r0") and engine.abort("r2")
    assert engine.num_blocks_in_use == 0 and engine.cache.slots.num_used == 0
    assert not engine.has_unfinished_requests()


def test_stop_token_and_length_finish_reasons(tiny_model):
    model = tiny_model
    engine = LLMEngine(model, EngineConfig(block_size=4))
    prompt = _prompts(1, (5, 6), model.cfg.vocab_size)[0]
    free_run = engine.generate([prompt], GREEDY)[0]
    stop_at = free_run[3]
    engine.add_request(
        "s", prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop_at,))
    )
    engine.add_request("l", prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = (out.finish_reason, out.num_output_tokens)
    assert finals["s"] == (FinishReason.STOP, free_run.index(stop_at) + 1)
    assert finals["l"] == (FinishReason.LENGTH, 2)


@pytest.mark.parametrize("rows", [64, 3])  # 3: each 8-token chunk's log-softmax in 3 pieces
def test_logprobs_and_prompt_logprobs_match_full_forward(tiny_model, rows, monkeypatch):
    monkeypatch.setattr("replicas.engine.prompt_logprobs.PROMPT_LOGPROB_ROWS", rows)
    model = tiny_model
    prompt = _prompts(1, (30, 31), model.cfg.vocab_size, seed=3)[0]
    engine = LLMEngine(model, EngineConfig(block_size=4, max_num_batched_tokens=8))
    params = SamplingParams(
        temperature=0, max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=1
    )
    engine.add_request("q", prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    tokens = [t for o in outs for t in o.new_token_ids]
    with torch.inference_mode():
        ref = model(torch.tensor([prompt + tokens]))[0].float().log_softmax(-1)
    prompt_lp = next(o.prompt_logprobs for o in outs if o.prompt_logprobs is not None)
    assert [e.token_id for e in prompt_lp] == prompt[1:]
    for p, entry in enumerate(prompt_lp):
        assert abs(entry.logprob - ref[p, prompt[p + 1]].item()) < 1e-4
        assert entry.top[0][0] == ref[p].argmax().item()
    gen_lp = [e for o in outs for e in o.logprobs]
    for j, entry in enumerate(gen_lp):
        row = ref[len(prompt) - 1 + j]
        assert entry.token_id == tokens[j] and abs(entry.logprob - row[tokens[j]].item()) < 1e-4
        assert len(entry.top) == 2 and entry.top[0][0] == row.argmax().item()


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], GREEDY, "prompt is empty"),
        ([5, 99999], GREEDY, "outside the vocabulary"),
        ([5] * 5000, GREEDY, "context limit"),
        ([5], SamplingParams(max_tokens=5000), "max_tokens"),
        ([5], SamplingParams(top_p=0), "top_p"),
    ],
)
def test_bad_requests_are_rejected_with_the_field(tiny_model, prompt, params, message):
    engine = LLMEngine(tiny_model, EngineConfig(block_size=4))
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


def test_kv_footprint_k_exaone(report):
    cfg = ModelConfig.from_hf(PRESETS["k-exaone"])
    fp = kv_footprint(cfg)  # bf16
    assert fp.global_bytes_per_token == 48 * 1024
    assert 17.5 * 2**20 <= fp.sliding_bytes_per_sequence <= 18 * 2**20
    with_mtp = kv_footprint(cfg, include_mtp=True)
    assert with_mtp.sliding_bytes_per_sequence - fp.sliding_bytes_per_sequence == 127 * 4096
    all_layers = 48 * 2 * 8 * 128 * 2  # what an all-global layout would need per token
    report(
        f"K-EXAONE bf16 KV: {fp.global_bytes_per_token // 1024} KiB/token (global layers) + "
        f"{fp.sliding_bytes_per_sequence / 2**20:.2f} MiB/sequence (sliding, 127 rows); "
        f"all-global layout: {all_layers // 1024} KiB/token; 32k-token sequence "
        f"{fp.sequence_bytes(32768, 16) / 2**30:.2f} GiB vs {all_layers * 32768 / 2**30:.2f} GiB"
    )
