"""Output tokens/s of our engine vs transformers' generate (and vLLM when its venv exists).

Same checkpoint, prompts (64 random tokens each), dtype (bf16 unless --dtype) and greedy decoding
with 128 new tokens (ignore_eos); prints medians and ratios. Asserts nothing.

    .venv/bin/python bench/throughput.py                          # tiny and small, batch 1/16/64
    .venv/bin/python bench/throughput.py --presets tiny --batch-sizes 1,16
    .venv/bin/python bench/throughput.py --presets small --quantize fp8 --no-hf

--quantize fp8 adds the preset's checkpoint quantized to block-wise FP8 (blocks of 128 x 128,
written once next to it by cluster.bundled.quantize): ours with its routed experts held in FP8
(the other weights dequantized at load), run interleaved with ours on the bf16 checkpoint, and
vLLM on it too (its CPU build may not run FP8; then the row says why).

vLLM runs through ../shared/peers/bench_vllm.py in its own venv (set up with
../shared/peers/setup_vllm_venv.sh; --vllm-python overrides where it is).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.forward import DTYPES, checkpoint  # noqa: E402
from cluster.bundled.quantize import quantize_checkpoint  # noqa: E402
from replicas.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from replicas.model.loader import load_causal_lm  # noqa: E402
from replicas.sampling_params import SamplingParams  # noqa: E402

PEER_SCRIPT = ROOT.parent / "shared" / "peers" / "bench_vllm.py"
DEFAULT_VLLM_PYTHON = Path.home() / ".cache" / "exaone-peers" / "vllm-venv" / "bin" / "python"


def prompts_for(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (batch, length), generator=g).tolist()


def run_ours(model, prompts, new_tokens: int) -> float:
    return run_engine(model, prompts, new_tokens)[0]


def run_engine(
    model, prompts, new_tokens, experts=None, microbatches=1, **config
) -> tuple[float, float]:
    """Greedy generation of every prompt at once -> (output tokens/s, wall seconds).
    ``experts``: an ExpertDispatcher when ``model`` holds no routed experts; ``config``:
    more EngineConfig fields."""
    return run_engine_stats(model, prompts, new_tokens, experts, microbatches, **config)[:2]


def run_engine_stats(model, prompts, new_tokens, experts=None, microbatches=1, **config):
    """``run_engine`` that also returns the engine (its acceptance counts, say)."""
    engine = LLMEngine(
        model,
        EngineConfig(
            max_num_batched_tokens=2048,
            max_num_seqs=max(64, len(prompts)),
            block_size=16,
            kv_cache_bytes=2 << 30,
            num_microbatches=microbatches,
            **config,
        ),
        experts=experts,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o) == new_tokens for o in outs)
    return sum(map(len, outs)) / elapsed, elapsed, engine


def run_hf(model, prompts, new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / elapsed


def run_vllm(
    python: Path, path: Path, dtype: str, batches: list[int], prompt_len: int, new_tokens: int
) -> dict[int, float] | str:
    if not python.exists() or not PEER_SCRIPT.exists():
        return "not installed (../shared/peers/setup_vllm_venv.sh)"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        cmd = [
            str(python),
            str(PEER_SCRIPT),
            "--model",
            str(path),
            "--dtype",
            dtype,
            "--batch-sizes",
            ",".join(map(str, batches)),
            "--new-tokens",
            str(new_tokens),
            "--prompt-tokens",
            str(prompt_len),
            "--repeats",
            "2",
            "--json",
            str(out),
        ]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            return "failed: " + (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]
        runs = json.loads(out.read_text())["runs"]
        return {int(b): r["out_tok_s"] for b, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(DTYPES),
        help="the checkpoints' own dtype by default, as vLLM serves them",
    )
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument(
        "--quantize",
        choices=["fp8"],
        help="also the preset quantized to block-wise FP8 (ours and vLLM), see above",
    )
    ap.add_argument(
        "--vllm-python", type=Path, default=Path(os.environ.get("VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
    )
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]

    from transformers import ExaoneMoeForCausalLM as HFModel

    rows = []
    for preset in args.presets.split(","):
        path = checkpoint(preset, args.dtype)
        dtype = DTYPES[args.dtype]
        ours = load_causal_lm(path, dtype=dtype, include_mtp=False)
        fp8_path = fp8_checkpoint(path) if args.quantize else None
        ours8 = (
            None if fp8_path is None else load_causal_lm(fp8_path, dtype=dtype, include_mtp=False)
        )
        hf = None if args.no_hf else HFModel.from_pretrained(path, dtype=dtype)
        vocab = ours.cfg.vocab_size
        warm = prompts_for(2, args.prompt_tokens, vocab, seed=99)
        run_ours(ours, warm, 4)
        if ours8 is not None:
            run_ours(ours8, warm, 4)
        if hf is not None:
            run_hf(hf, warm, 4)
        for b in batches:
            prompts = prompts_for(b, args.prompt_tokens, vocab, seed=b)
            ours_runs, fp8_runs, hf_runs = [], [], []
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all
                ours_runs.append(run_ours(ours, prompts, args.new_tokens))
                if ours8 is not None:
                    fp8_runs.append(run_ours(ours8, prompts, args.new_tokens))
                if hf is not None:
                    hf_runs.append(run_hf(hf, prompts, args.new_tokens))
            ours_tps = statistics.median(ours_runs)
            fp8_tps = statistics.median(fp8_runs) if fp8_runs else None
            hf_tps = statistics.median(hf_runs) if hf_runs else None
            rows.append([preset, b, ours_tps, fp8_tps, hf_tps])
            fp8_text = "" if fp8_tps is None else f", ours FP8 experts {fp8_tps:.1f} tok/s"
            hf_text = "" if hf_tps is None else f", transformers {hf_tps:.1f} tok/s"
            print(f"{preset} batch {b}: ours {ours_tps:.1f} tok/s{fp8_text}{hf_text}", flush=True)
        del ours, ours8, hf
        for ckpt in (path, fp8_path):
            if ckpt is None:
                continue
            vllm = run_vllm(
                args.vllm_python, ckpt, args.dtype, batches, args.prompt_tokens, args.new_tokens
            )
            for row in rows:
                if row[0] == preset:
                    row.append(vllm.get(row[1]) if isinstance(vllm, dict) else None)
            if isinstance(vllm, str):
                print(f"{preset}: vLLM on {ckpt.name}: {vllm}")

    print(
        f"\noutput tokens/s, greedy, {args.prompt_tokens}-token prompts, {args.new_tokens} new "
        f"tokens, {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    fmt = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    ratio = lambda a, c: "-" if a is None or c is None else f"{a / c:.2f}x"  # noqa: E731
    head = f"{'preset':<7}{'batch':>6}{'ours':>10}{'transformers':>14}{'vLLM':>10}"
    if args.quantize:
        head += f"{'ours FP8':>10}{'vLLM FP8':>10}{'FP8/bf16':>10}{'FP8/vLLM-bf16':>15}"
    print(head + f"{'ours/HF':>10}{'ours/vLLM':>11}")
    for preset, b, o, o8, h, v, *v8 in rows:
        line = f"{preset:<7}{b:>6}{fmt(o):>10}{fmt(h):>14}{fmt(v):>10}"
        if args.quantize:
            vq = v8[0] if v8 else None
            line += f"{fmt(o8):>10}{fmt(vq):>10}{ratio(o8, o):>10}{ratio(o8, v):>15}"
        print(line + f"{ratio(o, h):>10}{ratio(o, v):>11}")


def fp8_checkpoint(path: Path) -> Path:
    """``path`` quantized to block-wise FP8 (blocks of 128 x 128), written once beside it."""
    out = path.with_name(path.name + "-fp8")
    if not out.exists():
        print(f"quantizing {path.name} to {out} ...", flush=True)
        partial = out.with_name(out.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        quantize_checkpoint(path, partial).rename(out)  # whole, or not there
    return out


if __name__ == "__main__":
    main()
