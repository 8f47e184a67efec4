"""Prefill throughput of our model against transformers' ExaoneMoeForCausalLM.

Same checkpoint, same inputs, same process, alternating runs; prints medians and the ratio.
Asserts nothing.

    .venv/bin/python bench/forward.py                       # small preset, fp32, 2 x 512 tokens
    .venv/bin/python bench/forward.py --preset tiny --batch 8 --tokens 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.bundled.checkpoint import write_checkpoint  # noqa: E402
from replicas.model.exaone_moe import count_parameters  # noqa: E402
from replicas.model.loader import (
    DTYPES,  # noqa: E402
    load_causal_lm,
)


def cache_dir() -> Path:
    return Path(os.environ.get("EXAONE_CLUSTER_CACHE", Path.home() / ".cache" / "exaone-cluster"))


def checkpoint(preset: str, dtype: str) -> Path:
    path = cache_dir() / "checkpoints" / f"{preset}-{dtype}-seed0"
    if not (path / "config.json").exists() or not list(path.glob("*.safetensors")):
        print(f"building {preset} checkpoint at {path} ...", flush=True)
        write_checkpoint(path, preset=preset, dtype=dtype, seed=0)
    return path


def timed(fn, ids) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn(ids)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--hf-experts",
        default="grouped_mm",
        choices=["grouped_mm", "eager"],
        help="transformers' experts_implementation",
    )
    args = ap.parse_args()

    from transformers import ExaoneMoeForCausalLM as HFModel

    path = checkpoint(args.preset, args.dtype)
    dtype = DTYPES[args.dtype]
    ours = load_causal_lm(path, dtype=dtype, include_mtp=False)
    ref = HFModel.from_pretrained(path, dtype=dtype, experts_implementation=args.hf_experts)
    counts = count_parameters(ours.cfg)
    ids = torch.randint(
        0,
        ours.cfg.vocab_size,
        (args.batch, args.tokens),
        generator=torch.Generator().manual_seed(0),
    )
    runners = {"ours": ours, f"transformers ({args.hf_experts})": lambda x: ref(x).logits}
    for fn in runners.values():  # warm-up
        timed(fn, ids)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(timed(fn, ids))

    n = args.batch * args.tokens
    print(
        f"\nprefill, preset={args.preset} ({counts['main'] / 1e6:.0f}M params, "
        f"{counts['active'] / 1e6:.0f}M active), dtype={args.dtype}, batch={args.batch} x "
        f"{args.tokens} tokens, {args.repeats} runs, threads={torch.get_num_threads()}"
    )
    medians = {}
    for name, ts in times.items():
        medians[name] = statistics.median(ts)
        print(
            f"  {name:<28} median {medians[name] * 1e3:8.1f} ms  {n / medians[name]:9.1f} tok/s"
            f"  (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f} ms)"
        )
    ref_name = next(k for k in medians if k != "ours")
    print(f"  ratio ours / transformers (tok/s): {medians[ref_name] / medians['ours']:.2f}x")


if __name__ == "__main__":
    main()
