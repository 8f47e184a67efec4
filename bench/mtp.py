"""MTP self-speculative decoding: output tokens/s with drafting off and k = 1, 2, 3 drafts per
step, at batch 1, 8 and 32, with the acceptance rate per draft position; and the same with
vLLM's MTP on the same checkpoint and the same prompts when its venv exists (--vllm, one vLLM
launch per k, bench/vllm_mtp.py).

Greedy decoding of random prompts (64 tokens, 128 new, ignore_eos), one run per point, in one
process, so the ratios against k = 0 are side by side. Asserts nothing.

    .venv/bin/python bench/mtp.py --model CHECKPOINT_DIR
    .venv/bin/python bench/mtp.py --preset tiny --batch-sizes 1,8 --k 0,2   # a random model

A checkpoint with random weights accepts almost no drafts, so there the figures measure what
drafting costs when it fails; the trained bundled model is what shows the gain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.forward import DTYPES, checkpoint  # noqa: E402
from bench.throughput import DEFAULT_VLLM_PYTHON, prompts_for, run_engine_stats  # noqa: E402
from replicas.model.loader import load_causal_lm  # noqa: E402


def run_vllm_mtp(
    python: Path,
    path: Path,
    dtype: str,
    prompts: dict[int, list[list[int]]],
    k: int,
    new_tokens: int,
) -> dict | str:
    """vLLM on the same prompts for one k (bench/vllm_mtp.py in its venv) -> its figures per
    batch size and drafting counters, or why not."""
    if not python.exists():
        return "not installed (../shared/peers/setup_vllm_venv.sh)"
    with tempfile.TemporaryDirectory() as tmp:
        out, given = Path(tmp) / "vllm.json", Path(tmp) / "prompts.json"
        given.write_text(json.dumps({str(b): p for b, p in prompts.items()}))
        cmd = [
            str(python),
            str(ROOT / "bench" / "vllm_mtp.py"),
            "--model",
            str(path),
            "--dtype",
            dtype,
            "--prompts",
            str(given),
            "--new-tokens",
            str(new_tokens),
            "--mtp",
            str(k),
            "--json",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            return "failed: " + (proc.stderr or proc.stdout).strip().splitlines()[-1][:200]
        return json.loads(out.read_text())


def chat_prompts(path: Path, n: int) -> list[list[int]]:
    """n held-out chats (a seed training never uses), rendered up to the assistant's turn."""
    from cluster.bundled.chat_corpus import chats
    from router.tokenizer import Tokenizer

    tok = Tokenizer(path)
    held_out = chats(n, seed=10_000 + n)
    return [tok.encode(tok.render_chat(m[:-1], tools=t)) for m, t in held_out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: --preset's)")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--k", default="0,1,2,3", help="draft tokens per step (0: off)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument(
        "--chat-prompts",
        action="store_true",
        help="prompts: held-out chats (cluster.bundled.chat_corpus)",
    )
    ap.add_argument(
        "--vllm", action="store_true", help="also run vLLM's MTP (slow: a launch per k)"
    )
    ap.add_argument(
        "--vllm-python", type=Path, default=Path(os.environ.get("VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
    )
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ks = [int(k) for k in args.k.split(",")]
    path = args.model or checkpoint(args.preset, args.dtype)
    model = load_causal_lm(path, dtype=DTYPES[args.dtype])
    if model.mtp is None:
        raise SystemExit(f"{path}: this checkpoint has no MTP block")
    vocab = model.cfg.vocab_size
    run_engine_stats(model, prompts_for(2, args.prompt_tokens, vocab, seed=99), 4)  # warm-up

    rows, given = [], {}
    for b in batches:
        prompts = (
            chat_prompts(path, b)
            if args.chat_prompts
            else prompts_for(b, args.prompt_tokens, vocab, seed=b)
        )
        given[b] = prompts
        for k in ks:
            tps, _, engine = run_engine_stats(
                model, prompts, args.new_tokens, num_speculative_tokens=k
            )
            drafted, accepted = engine.acceptance.drafted, engine.acceptance.accepted
            rates = [a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)][:k]
            mean_accepted = sum(accepted) / max(drafted[0], 1) if k else 0.0
            rows.append((b, k, tps, rates, mean_accepted))
            print(
                f"batch {b} k {k}: {tps:.1f} tok/s, acceptance per position "
                f"{[round(r, 3) for r in rates]}, accepted per step {mean_accepted:.2f}",
                flush=True,
            )
    del model

    vllm = {}
    if args.vllm:
        for k in ks:
            vllm[k] = run_vllm_mtp(args.vllm_python, path, args.dtype, given, k, args.new_tokens)
            if isinstance(vllm[k], str):
                print(f"vLLM k {k}: {vllm[k]}")

    print(
        f"\n{path.name}: output tokens/s, greedy, {args.prompt_tokens}-token prompts, "
        f"{args.new_tokens} new tokens, {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"{'batch':>5}{'k':>3}{'ours':>9}{'vs k=0':>8}{'accepted/step':>15}  per position"
        f"{'':>6}{'vLLM':>9}{'vs k=0':>8}  vLLM per position"
    )
    base = {b: tps for b, k, tps, _, _ in rows if k == 0}
    for b, k, tps, rates, mean in rows:
        theirs, v0 = vllm_run(vllm.get(k), b), vllm_run(vllm.get(0), b)
        v, v0 = theirs.get("out_tok_s"), v0.get("out_tok_s")
        drafts = theirs.get("drafts") or 0
        v_rates = [round(a / drafts, 2) for a in theirs.get("accepted_per_position", [])][:k]
        ratio = f"{tps / base[b]:.2f}x" if b in base else "-"
        v_ratio = f"{v / v0:.2f}x" if v and v0 else "-"
        print(
            f"{b:>5}{k:>3}{tps:>9.1f}{ratio:>8}{mean:>15.2f}  "
            f"{str([round(r, 2) for r in rates]):<18}{(f'{v:.1f}' if v else '-'):>9}{v_ratio:>8}"
            f"  {v_rates if drafts else '-'}"
        )


def vllm_run(result: dict | str | None, batch: int) -> dict:
    """One batch size's figures from a vLLM result ({} when it did not run)."""
    return result["runs"].get(str(batch), {}) if isinstance(result, dict) else {}


if __name__ == "__main__":
    main()
