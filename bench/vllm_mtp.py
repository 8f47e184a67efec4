"""vLLM's side of bench/mtp.py: run in vLLM's own venv, on the exact prompts bench/mtp.py gave
ours (token ids per batch size, from a JSON file), greedy, ignore_eos; MTP off or k drafts.

    VLLM_PYTHON bench/vllm_mtp.py --model DIR --prompts P.json --mtp 2 --json OUT.json

Writes {"vllm_version", "load_s", "runs": {batch: {"out_tok_s", "wall_s", "drafted",
"accepted", "accepted_per_position"}}}. Imports nothing from this repository (vLLM's venv
does not have it installed).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def counters(llm) -> dict:
    """vLLM's cumulative speculative-decoding counters (drafts, accepted, per position)."""
    out: dict = {"drafted": 0, "accepted": 0, "per_position": []}
    for m in llm.get_metrics():
        name = m.name.removesuffix("_total")
        if name == "vllm:spec_decode_num_draft_tokens":
            out["drafted"] += m.value
        elif name == "vllm:spec_decode_num_accepted_tokens":
            out["accepted"] += m.value
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            values = list(m.values)
            if len(out["per_position"]) < len(values):
                out["per_position"] += [0] * (len(values) - len(out["per_position"]))
            for i, v in enumerate(values):
                out["per_position"][i] += v
        elif name == "vllm:spec_decode_num_drafts":
            out["drafts"] = out.get("drafts", 0) + m.value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", required=True, help="JSON: {batch: [[token ids], ...]}")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--mtp", type=int, default=0, help="num_speculative_tokens (0: off)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    for key, value in (
        ("VLLM_HOST_IP", "127.0.0.1"),
        ("VLLM_NO_USAGE_STATS", "1"),
        ("DO_NOT_TRACK", "1"),
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("VLLM_CPU_KVCACHE_SPACE", "2"),
    ):
        os.environ.setdefault(key, value)
    import vllm
    from vllm import LLM, SamplingParams

    prompts = {int(b): p for b, p in json.loads(Path(args.prompts).read_text()).items()}
    kwargs = {
        "model": args.model,
        "dtype": args.dtype,
        "max_model_len": 2048,
        "seed": 0,
        "disable_log_stats": False,
        "enable_prefix_caching": False,
    }
    if args.mtp:
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": args.mtp}
    start = time.perf_counter()
    llm = LLM(**kwargs)
    result = {
        "vllm_version": vllm.__version__,
        "load_s": round(time.perf_counter() - start, 1),
        "runs": {},
    }
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    warm = [{"prompt_token_ids": ids} for ids in next(iter(prompts.values()))[:2]]
    llm.generate(
        warm, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    for batch, ids in sorted(prompts.items()):
        before = counters(llm) if args.mtp else {}
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        run = {"out_tok_s": round(tokens / wall, 2), "wall_s": round(wall, 3)}
        if args.mtp:
            after = counters(llm)
            run["drafted"] = after["drafted"] - before["drafted"]
            run["accepted"] = after["accepted"] - before["accepted"]
            run["accepted_per_position"] = [
                a - (before["per_position"][i] if i < len(before["per_position"]) else 0)
                for i, a in enumerate(after["per_position"])
            ]
            run["drafts"] = after.get("drafts", 0) - before.get("drafts", 0)
        result["runs"][str(batch)] = run
        print(f"[batch {batch}] {json.dumps(run)}", flush=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
