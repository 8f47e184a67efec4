"""vLLM's OpenAI server as bench/served.py runs it: started from its own venv on a free loopback
port with the same engine limits as ours, driven over HTTP with streamed /v1/completions
(bench.loadgen.completions_sender, and vLLM's own client with --vllm-bench-client), stopped with
its process group."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import Workload, drive_http, free_port  # noqa: E402
from bench.vllm_bench_client import run_vllm_bench  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return json.loads(r.read() or b"{}")


def stop_process(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM the server (it stops its engine process), SIGKILL its process group if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # its own session (start_new_session): leftovers only
    proc.wait()


def run_vllm(config: ClusterConfig, work: Workload, args) -> dict:
    python = args.vllm_python
    e = config.engine
    port = free_port()
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        config.model_path,
        "--served-model-name",
        "bench",
        "--dtype",
        config.dtype,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(e.max_num_seqs),
        "--max-num-batched-tokens",
        str(e.max_num_batched_tokens),
        "--max-model-len",
        str(args.vllm_max_model_len),
        "--seed",
        str(args.seed),
    ]
    if not config.prefix_cache.enabled:
        cmd.append("--no-enable-prefix-caching")
    cmd += args.vllm_arg
    env = dict(
        os.environ,
        VLLM_HOST_IP="127.0.0.1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.vllm_threads_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_threads_bind
    log_path = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
    print(f"  vllm: starting on 127.0.0.1:{port} (log {log_path})", flush=True)
    start = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
                raise RuntimeError(f"vLLM server exited ({proc.returncode}):\n" + "\n".join(tail))
            with contextlib.suppress(OSError, ValueError):
                get_json(f"{base}/health")
                break
            if time.perf_counter() - start > args.vllm_start_timeout:
                raise TimeoutError(f"vLLM server not healthy after {args.vllm_start_timeout} s")
            time.sleep(1)
        info = {
            "start_s": round(time.perf_counter() - start, 1),
            "command": cmd,
            "log": str(log_path),
        }
        with contextlib.suppress(OSError, ValueError):
            info["version"] = get_json(f"{base}/version").get("version")
        print(f"  vllm {info.get('version', '?')}: healthy after {info['start_s']} s", flush=True)

        levels = asyncio.run(drive_http(base, "bench", work, "vllm"))
        if args.vllm_bench_client:
            info["vllm_client"] = run_vllm_bench(
                base, "bench", config.model_path, work.levels, args, "vllm"
            )
        return {**info, "levels": levels}
    finally:
        stop_process(proc)
