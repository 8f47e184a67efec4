"""The served path side by side: our server (gRPC, as `exaone-cluster serve` runs it) against
vLLM's OpenAI server on the same checkpoint, prompts and dtype, plus our engine in-process
(AsyncEngine over LLMEngine, no Ray, no gRPC) on the same requests as the ceiling. Asserts
nothing (benchmarks print, tests assert).

    .venv/bin/python bench/served.py                                   # bundled + small, bf16
    .venv/bin/python bench/served.py --checkpoints bundled --concurrency 1,8 --systems engine,vllm
    .venv/bin/python bench/served.py --checkpoints small --requests-per-stream 2 --json out.json
    .venv/bin/python bench/served.py --systems ours-http,vllm --concurrency 1,8,32 \
        --vllm-bench-client
    .venv/bin/python bench/served.py --checkpoints /path/to/checkpoint --dtype float32
    .venv/bin/python bench/served.py --checkpoints small --systems ours,engine --concurrency 1 \
        --min-requests 48 --rounds 4          # the served path's cost per token, drift shared

Workload (the same for every system, one system running at a time): each request is a prompt of
--prompt-tokens random token ids (seeded; drawn above the tokenizer's added/special tokens),
--new-tokens new tokens, greedy, ignore_eos, streamed. At each in-flight level C (--concurrency)
C closed-loop streams send max(C * --requests-per-stream, --min-requests) requests; every system
first gets a short warm-up (C requests of --warmup-tokens at each level, other prompts).
With --rounds R the systems take turns R times (each server started afresh, one at a time as
always), each round sending its share of every level's requests; each system's rounds are then
merged (tok/s over their summed tokens and time, percentiles over all their requests). On a
shared machine whose speed drifts by 10-20% over minutes, that drift then falls on every system
alike instead of on whichever ran during a slow minute.

Systems (--systems):
  ours    our server, started in this process with cluster.commands.local.start_local; driven over
          grpc.aio with exaone.v1 Generation.Generate (server-streaming, token_ids input)
  ours-http  the same server (started once for both), driven over its OpenAI-compatible HTTP
          API exactly as vLLM's server is (bench.loadgen.completions_sender)
  vllm    vLLM's OpenAI server (python -m vllm.entrypoints.openai.api_server in its own venv,
          ../shared/peers/setup_vllm_venv.sh; --vllm-python) as a subprocess; driven over HTTP
          with /v1/completions, stream: true, prompt = token ids; skipped with a message when
          its venv is missing
  engine  replicas.engine.async_engine.AsyncEngine over replicas.engine.engine.LLMEngine in
          this process
  engine-beside  the same in-process engine with our server started beside it and left idle
          (Ray, Serve's controller, the replicas, the engine process, Redis): on a machine the
          engine's threads fill, what the cluster costs it by being there, apart from what the
          requests' path through it costs (the row "in-process beside idle server - in-process")

Ours and the in-process engine are built from one ClusterConfig (engine options, torch threads,
KV capacity sized to admit max(64, C) sequences of prompt + new tokens); vLLM gets the same
max_num_seqs and max_num_batched_tokens, VLLM_CPU_KVCACHE_SPACE=2 (GiB) and its own default
thread binding (it reserves one core for its scheduler: one compute thread on a 2-core machine;
--vllm-threads-bind to change it). Prefix caching is off in all three unless --prefix-cache (the
random prompts share no prefix anyway). vLLM's start (50-350 s: compilation) is not measured.

Columns of the table printed per checkpoint:
  system      which server (or the in-process engine)
  in flight   requests in flight at once (C)
  out tok/s   output tokens of all requests / wall time of the level
  TTFT p50/99 time to first token (ms): request sent -> first message carrying token ids
  TPOT p50/99 time per output token (ms) of a request: (last token - first token) / (tokens - 1)
then ratio rows: ours / vLLM and ours / in-process output tok/s at each level, and ours minus
in-process TPOT p50 at in-flight 1 (what the served path adds per token; with engine-beside,
also the idle server's part of it: in-process beside it minus in-process). With
--vllm-bench-client, a second table: vLLM's own serving benchmark client
(bench/vllm_bench_client.py) against our HTTP server and vLLM's, same dataset settings.
--json FILE writes every number (and the settings) as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.forward import checkpoint  # noqa: E402
from bench.loadgen import (  # noqa: E402
    Stream,
    Workload,
    drive_http,
    free_port,
    merge,
    run_levels,
)
from bench.vllm_bench_client import run_vllm_bench  # noqa: E402
from bench.vllm_server import run_vllm  # noqa: E402
from cluster.config import (  # noqa: E402
    AttentionOptions,
    ClusterConfig,
    EngineOptions,
    PrefixCacheOptions,
)
from replicas.model.loader import load_causal_lm  # noqa: E402

BUNDLED = ROOT / "cluster" / "bundled_model"
DEFAULT_VLLM_PYTHON = Path.home() / ".cache" / "exaone-peers" / "vllm-venv" / "bin" / "python"
SYSTEMS = ("ours", "ours-http", "vllm", "engine", "engine-beside")
LABELS = {
    "ours": "ours (gRPC)",
    "ours-http": "ours (OpenAI HTTP)",
    "vllm": "vLLM (OpenAI HTTP)",
    "engine": "in-process engine",
    "engine-beside": "in-process beside idle server",
}
# servers one at a time; the ceiling first
RUN_ORDER = ("engine", "engine-beside", "ours", "vllm")


# ---- workload and settings ----------------------------------------------------------------------
def token_range(path: Path) -> tuple[int, int]:
    """[lo, hi) of prompt ids: above every added (special/control) token of the tokenizer and
    below both the model's and the tokenizer's vocabulary size."""
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    lo, hi = 0, vocab
    tok = path / "tokenizer.json"
    if tok.exists():
        data = json.loads(tok.read_text())
        added = [t["id"] for t in data.get("added_tokens", [])]
        lo = max(added, default=-1) + 1
        size = len(data.get("model", {}).get("vocab", {})) or vocab
        hi = min(vocab, max(size, lo + 1, *(a + 1 for a in added)))
    if hi - lo < 2:
        lo, hi = 0, vocab
    return lo, hi


def make_workload(path: Path, args) -> Workload:
    lo, hi = token_range(path)

    def prompts(rng: random.Random, n: int) -> list[list[int]]:
        return [[rng.randrange(lo, hi) for _ in range(args.prompt_tokens)] for _ in range(n)]

    timed, warm = random.Random(args.seed), random.Random(args.seed + 1)
    levels = args.levels
    n = {c: max(c * args.requests_per_stream, args.min_requests) for c in levels}
    return Workload(
        levels,
        {c: prompts(timed, n[c]) for c in levels},
        {c: prompts(warm, c) for c in levels},
        args.new_tokens,
        args.warmup_tokens,
    )


def cluster_config(path: Path, args) -> ClusterConfig:
    """One ClusterConfig for our server and, through engine_config(), the in-process engine."""
    import torch

    from replicas.engine.kv_cache import kv_footprint
    from replicas.model.config import ModelConfig
    from replicas.model.loader import DTYPES

    seqs = max(64, *args.levels)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    per_token = kv_footprint(cfg, torch.finfo(DTYPES[args.dtype]).bits // 8).global_bytes_per_token
    block = 16
    blocks = seqs * math.ceil((args.prompt_tokens + args.new_tokens) / block)
    kv_bytes = args.kv_cache_mib << 20 or max(64 << 20, 2 * blocks * block * per_token)
    engine = EngineOptions(
        max_num_seqs=seqs,
        max_num_batched_tokens=args.max_batched_tokens,
        block_size=block,
        kv_cache_bytes=kv_bytes,
        max_waiting_requests=max(256, 2 * seqs),
    )
    return ClusterConfig(
        model_path=str(path),
        dtype=args.dtype,
        engine=engine,
        attention=AttentionOptions(
            num_threads=args.threads or None, engine_process=args.engine_process
        ),
        prefix_cache=PrefixCacheOptions(enabled=args.prefix_cache),
    )


def engine_config(config: ClusterConfig):
    """The EngineConfig our attention replica builds from ``config`` (colocated experts)."""
    from replicas.engine.engine import EngineConfig
    from replicas.prefix_cache.fingerprint import model_fingerprint
    from replicas.prefix_cache.manager import PrefixCacheConfig

    e, pc = config.engine, config.prefix_cache
    prefix = None
    if pc.enabled:
        fingerprint = model_fingerprint(config.model_path, config.dtype, pc.revision)
        prefix = PrefixCacheConfig(
            fingerprint, pc.snapshot_interval_tokens, pc.local_snapshot_bytes, pc.redis_queue_bytes
        )
    return EngineConfig(
        max_num_batched_tokens=e.max_num_batched_tokens,
        max_num_seqs=e.max_num_seqs,
        block_size=e.block_size,
        kv_cache_bytes=e.kv_cache_bytes,
        max_model_len=e.max_model_len,
        num_microbatches=config.attention.num_microbatches,
        prefix_cache=prefix,
        kernels=config.kernels,
    )


# ---- systems ------------------------------------------------------------------------------------
def start_ours(config: ClusterConfig):
    """Our server as `exaone-cluster serve --no-dashboard` runs it, started in this process."""
    from cluster.commands.local import start_local

    return start_local(config, grpc_port=free_port(), openai_port=free_port(), dashboard_port=None)


def run_engine(config: ClusterConfig, work: Workload, label: str = "engine") -> dict:
    from replicas.engine.async_engine import AsyncEngine
    from replicas.engine.engine import LLMEngine
    from replicas.model.loader import DTYPES
    from replicas.sampling_params import SamplingParams

    def make_engine() -> LLMEngine:  # on the thread a replica makes it on (AsyncEngine.build)
        model = load_causal_lm(
            config.model_path, dtype=DTYPES[config.dtype], include_mtp=False, progress=False
        )
        return LLMEngine(model, engine_config(config))

    start = time.perf_counter()
    front = AsyncEngine.build(make_engine, config.engine_threads())
    engine = front.engine
    blocks, seqs = engine.cache.blocks.num_total, config.engine.max_num_seqs
    need = math.ceil(
        (len(work.prompts[work.levels[0]][0]) + work.new_tokens) / config.engine.block_size
    )
    tokens = need * config.engine.block_size
    print(
        f"  in-process engine: {blocks} KV blocks = {blocks // need} sequences of {tokens} "
        f"tokens (max_num_seqs {seqs})",
        flush=True,
    )
    info = {"start_s": round(time.perf_counter() - start, 1), "kv_blocks": blocks}
    ids = iter(range(1 << 62))

    async def main(front: AsyncEngine) -> dict[int, dict]:
        async def send(prompt: list[int], new_tokens: int) -> Stream:
            params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
            s = Stream()
            async for out in front.generate(f"bench-{next(ids)}", prompt, params):
                s.got(len(out.new_token_ids))
            return s

        try:
            return await run_levels(send, work, label)
        finally:
            await front.close()

    try:
        return {**info, "levels": asyncio.run(main(front))}
    finally:
        del engine, front
        gc.collect()


def run_engine_beside(config: ClusterConfig, work: Workload) -> dict:
    """The in-process engine on ``work`` while our server runs beside it, idle."""
    cluster = start_ours(config)
    print(f"  ours: serving at {cluster.grpc_address}, idle", flush=True)
    try:
        return run_engine(config, work, "engine-beside")
    finally:
        cluster.stop()


def run_ours(config: ClusterConfig, work: Workload, args, protocols: list[str]) -> dict:
    """Our server, started once, driven over each of ``protocols`` in turn ("ours": gRPC,
    "ours-http": OpenAI HTTP) -> {protocol: result}; with --vllm-bench-client, vLLM's client
    too, over HTTP."""
    import grpc

    from protos.exaone.v1 import generation_pb2 as pb
    from protos.exaone.v1 import generation_pb2_grpc as pb_grpc

    start = time.perf_counter()
    cluster = start_ours(config)
    assert cluster.openai_url is not None
    http = cluster.openai_url.removesuffix("/v1")
    info = {"start_s": round(time.perf_counter() - start, 1), "address": cluster.grpc_address}
    print(f"  ours: serving at {cluster.grpc_address} and {http} after {info['start_s']} s")

    async def over_grpc():
        async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
            stub = pb_grpc.GenerationStub(channel)

            async def send(prompt: list[int], new_tokens: int) -> Stream:
                request = pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=prompt),
                    sampling=pb.SamplingParameters(temperature=0.0),
                    stopping=pb.StoppingParameters(max_tokens=new_tokens, ignore_eos=True),
                )
                s = Stream()
                async for r in stub.Generate(request, timeout=600):
                    if r.HasField("delta"):
                        s.got(len(r.delta.token_ids))
                return s

            return await run_levels(send, work, "ours")

    out: dict[str, dict] = {}
    try:
        for protocol in protocols:
            if protocol == "ours":
                levels = asyncio.run(over_grpc())
            else:
                levels = asyncio.run(drive_http(http, config.name, work, "ours-http"))
            out[protocol] = {**info, "levels": levels}
        if args.vllm_bench_client:
            out.setdefault("ours-http", dict(info))["vllm_client"] = run_vllm_bench(
                http, config.name, config.model_path, work.levels, args, "ours-http"
            )
        return out
    finally:
        cluster.stop()


# ---- report -------------------------------------------------------------------------------------
def merge_rounds(runs: list[dict]) -> dict:
    """One system's result over its rounds: the first round's details, each level merged
    (bench.loadgen.merge); an error in any round is the result."""
    failed = [run for run in runs if run.get("error")]
    if failed:
        return failed[0]
    levels = {c: merge([run["levels"][c] for run in runs]) for c in runs[0].get("levels", {})}
    return {**runs[0], "rounds": len(runs), "levels": levels}


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _row(label: str, level: int, r: dict) -> str:
    cells = [
        label,
        level,
        fmt(r["out_tok_s"], ".1f"),
        fmt(r["ttft_p50_ms"], ".1f"),
        fmt(r["ttft_p99_ms"], ".1f"),
        fmt(r["tpot_p50_ms"], ".2f"),
        fmt(r["tpot_p99_ms"], ".2f"),
    ]
    return "| " + " | ".join(map(str, cells)) + " |"


def table(results: dict[str, dict], levels: list[int]) -> tuple[str, dict]:
    """The markdown table of one checkpoint and its ratio rows (also returned as numbers)."""
    lines = [
        "| system | in flight | out tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
        "| TPOT p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = {s: r.get("levels", {}) for s, r in results.items()}
    for c in levels:
        for system in SYSTEMS:
            if r := rows.get(system, {}).get(c):
                lines.append(_row(LABELS[system], c, r))
    ratios: dict = {}
    for mine in ("ours", "ours-http"):
        ours = rows.get(mine, {})
        for other in ("vllm", "engine"):
            for c in levels:
                a, b = ours.get(c), rows.get(other, {}).get(c)
                if a and b and b["out_tok_s"]:
                    ratio = a["out_tok_s"] / b["out_tok_s"]
                    ratios.setdefault(str(c), {})[f"{mine}/{other}_tok_s"] = round(ratio, 3)
                    lines.append(f"| {LABELS[mine]} / {LABELS[other]} | {c} | {ratio:.2f}x |||||")
        a, b = ours.get(1), rows.get("engine", {}).get(1)
        if a and b and a["tpot_p50_ms"] is not None and b["tpot_p50_ms"] is not None:
            diff = a["tpot_p50_ms"] - b["tpot_p50_ms"]
            ratios.setdefault("1", {})[f"tpot_p50_ms_{mine}_minus_engine"] = round(diff, 3)
            lines.append(f"| {LABELS[mine]} - in-process | 1 | | | | {diff:+.2f} | |")
    a, b = rows.get("engine-beside", {}).get(1), rows.get("engine", {}).get(1)
    if a and b and a["tpot_p50_ms"] is not None and b["tpot_p50_ms"] is not None:
        diff = a["tpot_p50_ms"] - b["tpot_p50_ms"]
        ratios.setdefault("1", {})["tpot_p50_ms_engine_beside_minus_engine"] = round(diff, 3)
        lines.append(f"| {LABELS['engine-beside']} - in-process | 1 | | | | {diff:+.2f} | |")
    client = {s: r["vllm_client"] for s, r in results.items() if r.get("vllm_client")}
    if client:
        lines += [
            "",
            "vLLM's benchmark client (vllm.benchmarks.serve, random dataset, the same settings):",
            "",
            "| server | in flight | out tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) "
            "| TPOT p99 (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in levels:
            for system, by_level in client.items():
                if r := by_level.get(c):
                    lines.append(_row(LABELS[system], c, r))
        for c in levels:
            a, b = client.get("ours-http", {}).get(c), client.get("vllm", {}).get(c)
            if a and b and b["out_tok_s"]:
                ratio = a["out_tok_s"] / b["out_tok_s"]
                ratios.setdefault(str(c), {})["vllm_client:ours/vllm_tok_s"] = round(ratio, 3)
                lines.append(f"| ours / vLLM (vLLM's client) | {c} | {ratio:.2f}x |||||")
    notes = [f"- {LABELS[s]}: {r['error']}" for s, r in results.items() if r.get("error")]
    return "\n".join(lines + ([""] + notes if notes else [])), ratios


# ---- main ---------------------------------------------------------------------------------------
def resolve_checkpoint(name: str, dtype: str) -> Path:
    if name == "bundled":
        return BUNDLED
    if Path(name).is_dir():
        return Path(name).resolve()
    return checkpoint(name, dtype)  # a preset (tiny, small): built once into the cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--checkpoints",
        default="bundled,small",
        help="'bundled', a preset (tiny, small) or a checkpoint directory",
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument(
        "--systems",
        default="ours,ours-http,vllm,engine",
        help="ours (gRPC), ours-http (OpenAI HTTP, the same server), vllm, engine, "
        "engine-beside (in-process with our server idle beside it)",
    )
    ap.add_argument(
        "--vllm-bench-client",
        action="store_true",
        help="also drive ours (HTTP) and vLLM's server with vLLM's own benchmark client "
        "(bench/vllm_bench_client.py; from --vllm-python's venv)",
    )
    ap.add_argument("--concurrency", default="1,8,32,64", help="in-flight levels")
    ap.add_argument(
        "--requests-per-stream",
        type=int,
        default=4,
        help="rounds: a level C sends C * this many requests ...",
    )
    ap.add_argument("--min-requests", type=int, default=16, help="... and at least this many")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the systems in turn this many times, each round with its share of every "
        "level's requests, and merge each system's rounds (slow drift of the machine's speed "
        "then falls on every system alike)",
    )
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warmup-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of ours and in-process (0: the attention "
        "replicas' default: cluster.config.default_engine_threads)",
    )
    ap.add_argument(
        "--max-batched-tokens",
        type=int,
        default=512,
        help="tokens per engine step at most (all three systems)",
    )
    ap.add_argument(
        "--kv-cache-mib",
        type=int,
        default=0,
        help="our KV cache (0: twice what max(64, C) sequences need)",
    )
    ap.add_argument("--prefix-cache", action="store_true", help="prefix caching on (all three)")
    ap.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=AttentionOptions().engine_process,
        help="ours: the engine in a process of its own (attention.engine_process; default: the"
        " config's default)",
    )
    ap.add_argument(
        "--vllm-python", type=Path, default=Path(os.environ.get("VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
    )
    ap.add_argument("--vllm-max-model-len", type=int, default=2048)
    ap.add_argument("--vllm-start-timeout", type=float, default=600)
    ap.add_argument(
        "--vllm-threads-bind",
        default="",
        help="VLLM_CPU_OMP_THREADS_BIND (default: vLLM's own, 'auto')",
    )
    ap.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        help="more vLLM server args (--vllm-arg=--enforce-eager)",
    )
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",") if c]
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"--systems: unknown {', '.join(sorted(unknown))} (choose from {SYSTEMS})")
    if "vllm" in systems and not args.vllm_python.exists():
        print(
            f"vLLM skipped: no venv at {args.vllm_python} (set it up with "
            "../shared/peers/setup_vllm_venv.sh, or pass --vllm-python)",
            flush=True,
        )
        systems.remove("vllm")

    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "checkpoints": {},
    }
    tables = []
    for name in [n for n in args.checkpoints.split(",") if n]:
        path = resolve_checkpoint(name, args.dtype)
        config = cluster_config(path, args)
        work = make_workload(path, args)
        e = config.engine
        title = f"{name} ({path}), {args.dtype}"
        header = (
            f"{args.prompt_tokens}-token random prompts, {args.new_tokens} new tokens, "
            f"greedy, ignore_eos, streamed; max_num_seqs {e.max_num_seqs}, "
            f"max_num_batched_tokens {e.max_num_batched_tokens}, "
            f"KV {e.kv_cache_bytes >> 20} MiB, "
            f"{config.engine_threads()} torch threads, prefix cache "
            f"{'on' if args.prefix_cache else 'off'}"
        )
        print(f"\n== {title}\n{header}", flush=True)
        rounds: dict[str, list[dict]] = {}
        ours = [p for p in ("ours", "ours-http") if p in systems]
        for r, part in enumerate(work.rounds(args.rounds)):
            for system in RUN_ORDER:
                if system == "ours" and not ours or system != "ours" and system not in systems:
                    continue
                names = ", ".join(LABELS[p] for p in ours) if system == "ours" else LABELS[system]
                which = f", round {r + 1} of {args.rounds}" if args.rounds > 1 else ""
                print(f"- {names}{which}", flush=True)
                try:
                    if system == "engine":
                        got = {system: run_engine(config, part)}
                    elif system == "engine-beside":
                        got = {system: run_engine_beside(config, part)}
                    elif system == "ours":
                        got = run_ours(config, part, args, ours)
                    else:
                        got = {system: run_vllm(config, part, args)}
                except Exception as err:  # noqa: BLE001 - report it, go on with the next system
                    text = f"{type(err).__name__}: {err}"
                    print(f"  {system} failed: {text}", flush=True)
                    got = {p: {"error": text} for p in (ours if system == "ours" else [system])}
                for p, result in got.items():
                    rounds.setdefault(p, []).append(result)
        results = {system: merge_rounds(runs) for system, runs in rounds.items()}
        text, ratios = table(results, args.levels)
        tables.append(f"### {title}\n\n{header}\n\n{text}")
        report["checkpoints"][name] = {
            "path": str(path),
            "settings": header,
            "systems": results,
            "ratios": ratios,
        }
        print("\n" + tables[-1], flush=True)
        if args.json:  # after every checkpoint, so a later failure keeps these
            args.json.write_text(json.dumps(report, indent=1, default=str))

    if len(tables) > 1:
        print("\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
