"""vLLM's own serving benchmark client (``vllm bench serve``: vllm.benchmarks.serve, run from
vLLM's venv) pointed at an OpenAI-compatible server, ours or vLLM's, so both are measured by the
client vLLM publishes its figures with. bench/served.py runs it with --vllm-bench-client.

Its random dataset: --prompt-tokens random token ids decoded to text (range ratio 0: every
prompt that long), --new-tokens output tokens with ignore_eos, greedy, streamed /v1/completions,
C requests at once (--max-concurrency) over C x --requests-per-stream prompts (at least
--min-requests), the same seed for every server. It reports output tok/s, TTFT and TPOT."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

# `vllm bench serve` without the `vllm` console script (vLLM's CPU build installs no package
# metadata, which its CLI entry point reads first).
_RUN = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
KEYS = {
    "out_tok_s": "output_throughput",
    "ttft_p50_ms": "median_ttft_ms",
    "ttft_p99_ms": "p99_ttft_ms",
    "tpot_p50_ms": "median_tpot_ms",
    "tpot_p99_ms": "p99_tpot_ms",
}


def bench_command(python: Path, base_url: str, model: str, tokenizer: str, level: int, args):
    n = max(level * args.requests_per_stream, args.min_requests)
    return [
        str(python),
        "-c",
        _RUN,
        "--backend",
        "openai",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.prompt_tokens),
        "--random-output-len",
        str(args.new_tokens),
        "--random-range-ratio",
        "0",
        "--num-prompts",
        str(n),
        "--max-concurrency",
        str(level),
        "--num-warmups",
        str(level),
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        str(args.seed),
        "--percentile-metrics",
        "ttft,tpot,itl",
        "--metric-percentiles",
        "50,99",
        "--disable-tqdm",
    ]


def run_vllm_bench(base_url: str, model: str, tokenizer: str, levels: list[int], args, label: str):
    """-> {level: {out_tok_s, ttft/tpot p50/p99 ms, requests, failed}}: one client run per
    level, one after another."""
    rows = {}
    for level in levels:
        with tempfile.TemporaryDirectory(prefix="vllm-bench-") as out:
            cmd = bench_command(args.vllm_python, base_url, model, tokenizer, level, args)
            cmd += ["--save-result", "--result-dir", out, "--result-filename", "r.json"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            path = Path(out) / "r.json"
            if done.returncode != 0 or not path.exists():
                tail = (done.stdout + done.stderr).strip().splitlines()[-12:]
                raise RuntimeError("vLLM's benchmark client failed:\n" + "\n".join(tail))
            result = json.loads(path.read_text())
        row = {ours: round(result[theirs], 3) for ours, theirs in KEYS.items()}
        row["requests"], row["failed"] = result["completed"], result.get("failed", 0)
        rows[level] = row
        print(
            f"  {label} (vLLM's client) in flight {level}: {row['out_tok_s']:.1f} tok/s, TTFT "
            f"p50 {row['ttft_p50_ms']:.1f} ms, TPOT p50 {row['tpot_p50_ms']:.2f} ms "
            f"({row['requests']} requests, {row['failed']} failed)",
            flush=True,
        )
    return rows
