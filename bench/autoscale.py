"""Expert autoscaling and balancing under a skewed load ramp: replica counts, imbalance and p99
time per output token over time, with the balancer off and on (one local cluster each run).

The checkpoint's router bias sends most tokens to experts 0 and 1 (``make-checkpoint
--hot-experts``), both in ExpertGroup-0. Concurrent gRPC streams ramp up (``--ramp``, one stage
every ``--stage-s`` seconds), then stop for ``--cooldown-s``. Every second the bench reads each
expert replica's load window; every stage it prints replica counts per group, the imbalance of
the slots the groups served (busiest over mean, summed over layers), output tokens/s and the
p99 of each request's mean time per output token. Asserts nothing.

    unshare -n bash -c 'ip link set lo up && .venv/bin/python bench/autoscale.py'
    ... bench/autoscale.py --ramp 1,4,16 --stage-s 20 --balancer on   # one run only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
from ray import serve  # noqa: E402

from cluster.bundled.checkpoint import write_checkpoint  # noqa: E402
from cluster.commands.local import APP_NAME, start_local  # noqa: E402
from cluster.commands.redis_server import free_port  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from cluster.deployments.expert_group import expert_group_name  # noqa: E402
from cluster.deployments.expert_transport import WORKER_NAMESPACE, worker_prefix  # noqa: E402
from cluster.ops.balancer import busiest_over_mean  # noqa: E402
from router.client import GenerationClient  # noqa: E402


class Load:
    """``streams`` client threads (changeable) sending random prompts; per-request TPOT."""

    def __init__(self, address: str, vocab: int, new_tokens: int):
        self.address, self.vocab, self.new_tokens = address, vocab, new_tokens
        self.samples: list[tuple[float, float, int]] = []  # (finish time, tpot s, tokens)
        self.errors = 0
        self._threads: list[tuple[threading.Thread, threading.Event]] = []
        self._lock = threading.Lock()

    def set_streams(self, n: int) -> None:
        while len(self._threads) > n:
            _, stop = self._threads.pop()
            stop.set()
        while len(self._threads) < n:
            stop = threading.Event()
            t = threading.Thread(target=self._run, args=(len(self._threads), stop), daemon=True)
            self._threads.append((t, stop))
            t.start()

    def _run(self, seed: int, stop: threading.Event) -> None:
        import random

        rng = random.Random(seed)
        with GenerationClient(self.address, timeout_s=300) as client:
            while not stop.is_set():
                prompt = [rng.randrange(3, self.vocab) for _ in range(rng.randint(8, 64))]
                try:
                    r = client.generate(
                        token_ids=prompt,
                        max_tokens=self.new_tokens,
                        temperature=0.0,
                        ignore_eos=True,
                    )
                except Exception:  # noqa: BLE001 - counted, the bench goes on
                    with self._lock:
                        self.errors += 1
                    continue
                n = len(r.token_ids)
                ttft, total = r.timings["time_to_first_token_ms"], r.timings["total_ms"]
                if n > 1:
                    with self._lock:
                        self.samples.append((time.monotonic(), (total - ttft) / 1e3 / (n - 1), n))


def expert_state(num_groups: int) -> tuple[list[int], float]:
    """-> (running replicas per group, imbalance of the slots served over the windows)."""
    status = serve.status().applications[APP_NAME].deployments
    replicas = [
        status[expert_group_name(g)].replica_states.get("RUNNING", 0) for g in range(num_groups)
    ]
    named = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == WORKER_NAMESPACE
    ]
    per_layer: dict[int, list[float]] = {}
    for g in range(num_groups):
        for name in (n for n in named if n.startswith(worker_prefix(APP_NAME, g))):
            try:
                s = ray.get(ray.get_actor(name, WORKER_NAMESPACE).stats.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a replica going away
                continue
            for layer, row in zip(s.layers, s.window_counts, strict=True):
                per_layer.setdefault(layer, [0.0] * num_groups)[g] += sum(row)
    return replicas, busiest_over_mean(per_layer.values())


def run(ckpt: Path, args, balancer: bool) -> list[dict]:
    scaling = {
        "enabled": True,
        "min_replicas": 1,
        "max_replicas": args.max_replicas,
        "upscale_delay_s": 3.0,
        "downscale_delay_s": 10.0,
        "metrics_interval_s": 1.0,
        "look_back_period_s": 4.0,
        "target_tokens_per_s": args.target_tokens_per_s,
    }
    config = ClusterConfig(
        model_path=str(ckpt),
        dtype=args.dtype,
        prefix_cache={"enabled": False},
        engine={"max_num_seqs": 64, "max_num_batched_tokens": 256, "kv_cache_bytes": 256 << 20},
        attention={"num_cpus": 0.5},
        experts={
            "num_groups": args.groups,
            "num_cpus": 0.25,
            "load_window_s": 5.0,
            "autoscaling": scaling,
            "balancer": {"enabled": balancer, "min_interval_s": 20.0, "min_tokens": 256},
        },
    )
    local = start_local(
        config,
        grpc_port=free_port(),
        dashboard_port=None,
        num_cpus=16,
        ready_timeout_s=600,
    )
    rows = []
    try:
        vocab = 1000
        load = Load(local.grpc_address, vocab, args.new_tokens)
        stages = [int(s) for s in args.ramp.split(",")] + [0]
        for streams in stages:
            load.set_streams(streams)
            stage_s = args.cooldown_s if streams == 0 else args.stage_s
            start = time.monotonic()
            imbalances, replicas = [], []
            while time.monotonic() - start < stage_s:
                time.sleep(1.0)
                r, imb = expert_state(args.groups)
                replicas, imbalances = r, [*imbalances, imb]
            done = [s for s in load.samples if s[0] >= start]
            tpot = sorted(s[1] for s in done)
            row = {
                "t_s": round(time.monotonic() - start, 0),
                "streams": streams,
                "replicas": replicas,
                "imbalance_median": statistics.median(imbalances),
                "imbalance_last": imbalances[-1],
                "p99_tpot_ms": 1e3 * tpot[int(0.99 * (len(tpot) - 1))] if tpot else None,
                "tok_s": sum(s[2] for s in done) / stage_s,
                "errors": load.errors,
            }
            rows.append(row)
            p99 = "-" if row["p99_tpot_ms"] is None else f"{row['p99_tpot_ms']:.1f}"
            print(
                f"balancer {'on ' if balancer else 'off'} streams {streams:>3}: replicas "
                f"{row['replicas']}, imbalance {row['imbalance_median']:.2f} (last "
                f"{row['imbalance_last']:.2f}), p99 TPOT {p99} ms, {row['tok_s']:.1f} tok/s, "
                f"errors {row['errors']}",
                flush=True,
            )
        load.set_streams(0)
    finally:
        local.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--target-tokens-per-s", type=float, default=60.0)
    ap.add_argument("--ramp", default="1,4,16", help="concurrent streams per stage")
    ap.add_argument("--stage-s", type=float, default=30.0)
    ap.add_argument("--cooldown-s", type=float, default=30.0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--balancer", default="off,on", help="runs: off, on or both")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(
            Path(tmp) / "skewed", preset=args.preset, dtype=args.dtype, hot_experts=(0, 1)
        )
        results = {mode: run(ckpt, args, mode == "on") for mode in args.balancer.split(",")}
    print(
        f"\n{args.preset}, {args.groups} groups, hot experts 0 and 1 (group 0), ramp "
        f"{args.ramp} streams x {args.stage_s:g} s, then {args.cooldown_s:g} s idle"
    )
    print(
        f"{'balancer':>8}{'streams':>8}  {'replicas':<12}{'imbalance':>10}{'p99 TPOT ms':>13}"
        f"{'tok/s':>8}"
    )
    for mode, rows in results.items():
        for r in rows:
            p99 = f"{r['p99_tpot_ms']:.1f}" if r["p99_tpot_ms"] is not None else "-"
            print(
                f"{mode:>8}{r['streams']:>8}  {str(r['replicas']):<12}"
                f"{r['imbalance_median']:>10.2f}{p99:>13}{r['tok_s']:>8.1f}"
            )


if __name__ == "__main__":
    main()
