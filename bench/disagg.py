"""Disaggregated experts vs colocated: dispatch cost per hop and output tokens/s, one run.

Starts a local Ray cluster, deploys ExpertGroup-g Serve deployments for 2 and 4 groups, and runs
the engine in this process (it is what an attention replica runs) against them through each
transport (direct actor calls to the groups' workers, and Serve handles), with ping-pong (2
micro-batches) and without (1). Colocated = the same
engine holding every expert. Same checkpoint, prompts, dtype and greedy decoding (ignore_eos).
Prints medians, ratios and where the time of a disaggregated step goes. Asserts nothing.

    .venv/bin/python bench/disagg.py                       # small preset, batch 1/16/64
    .venv/bin/python bench/disagg.py --preset tiny --batch-sizes 1,16 --repeats 1

Run it under `unshare -n` as root (Serve's listeners), like the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.forward import DTYPES, checkpoint  # noqa: E402
from bench.throughput import prompts_for, run_engine  # noqa: E402
from replicas.experts.dispatch import ExpertDispatcher  # noqa: E402
from replicas.experts.expert_group import ExpertGroup  # noqa: E402
from replicas.model.config import ModelConfig  # noqa: E402
from replicas.model.loader import load_causal_lm  # noqa: E402


class TimedTransport:
    """Wraps a transport: time the attention side spends blocked on expert answers."""

    def __init__(self, inner):
        self.inner, self.placement = inner, inner.placement
        self.wait_s, self.num_calls = 0.0, 0

    def submit(self, group, layer, x, topk_ids):
        pending = self.inner.submit(group, layer, x, topk_ids)
        self.num_calls += 1
        outer = self

        class _Timed:
            def result(self):
                start = time.perf_counter()
                try:
                    return pending.result()
                finally:
                    outer.wait_s += time.perf_counter() - start

        return _Timed()


def deploy_groups(path: Path, dtype: str, num_groups: int, threads: int, transport: str):
    from ray import serve

    from cluster.app import expert_groups
    from cluster.config import ClusterConfig
    from cluster.deployments.expert_group import expert_group_name

    config = ClusterConfig(
        model_path=str(path),
        dtype=dtype,
        experts={
            "num_groups": num_groups,
            "num_cpus": 0.1,
            "num_threads": threads,
            "transport": transport,
        },
    )
    # Only the expert groups are deployed (the engine runs here, as in an attention replica),
    # each as its own application.
    from cluster.deployments.expert_transport import (
        ActorTransport,
        ServeHandleTransport,
        worker_prefix,
    )

    handles, prefixes = [], []
    for g, group in enumerate(expert_groups(config)):
        app = f"groups{num_groups}-{transport}-{g}"
        serve.run(group, name=app, route_prefix=None)
        handles.append(serve.get_deployment_handle(expert_group_name(g), app))
        prefixes.append(worker_prefix(app, g))
    placement = config.placement(ModelConfig.from_json_file(path / "config.json").num_experts)
    if transport == "serve":
        return ServeHandleTransport(placement, handles)
    out = ActorTransport(placement, prefixes)
    out.wait_ready()
    return out


def hop_overhead(transport, group: ExpertGroup, hidden: int, layer: int, repeats: int = 50):
    """Median ms of a one-token layer call through the transport, minus the group's own
    compute for the same input in this process. The token is in the groups' dtype, as the
    attention side's activations are (fp32 here once made bf16 groups fail in the GEMM)."""
    x = torch.randn(1, hidden, dtype=group.dtype)
    ids = torch.tensor([list(group.expert_ids[:1]) * 1])  # one slot, held by group 0
    times, local = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        transport.submit(0, layer, x, ids).result()
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        group.forward(layer, x, ids)
        local.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, statistics.median(local) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--groups", default="2,4")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per point (median)")
    ap.add_argument("--expert-threads", type=int, default=1, help="torch threads per group")
    ap.add_argument("--transports", default="actor,serve", help="actor and/or serve")
    args = ap.parse_args()
    kinds = args.transports.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    group_counts = [int(g) for g in args.groups.split(",")]

    from cluster.commands.local import LOCAL_ENV

    os.environ.update(LOCAL_ENV)
    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from cluster.commands.loopback import HOOK

    path = checkpoint(args.preset, args.dtype)
    dtype = DTYPES[args.dtype]
    colocated = load_causal_lm(path, dtype=dtype, include_mtp=False, progress=False)
    attention = load_causal_lm(path, dtype=dtype, include_mtp=False, expert_ids=(), progress=False)
    cfg = colocated.cfg
    ray.init(
        address="local",
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": HOOK},
    )
    logging = LoggingConfig(enable_access_log=False, log_level="WARNING")
    serve.start(logging_config=logging)
    try:
        transports = {}
        for g in group_counts:
            for t in kinds:
                transports[g, t] = deploy_groups(path, args.dtype, g, args.expert_threads, t)
        layer = cfg.moe_layers[0]
        first = transports[group_counts[0], kinds[0]]
        probe = ExpertGroup(path, 0, first.placement.groups[0], dtype=args.dtype)
        for t in kinds:
            hop_ms, local_ms = hop_overhead(
                transports[group_counts[0], t], probe, cfg.hidden_size, layer
            )
            over = hop_ms - local_ms
            print(
                f"{t} transport, one-token layer call: {hop_ms:.2f} ms round trip, "
                f"{local_ms:.2f} ms of it expert compute -> {over:.2f} ms dispatch overhead "
                f"per hop ({len(cfg.moe_layers)} MoE layers: {over * len(cfg.moe_layers):.0f} "
                "ms per step if nothing overlaps)",
                flush=True,
            )
        del probe

        configs = [("colocated", None, 1)]
        for g in group_counts:
            for t in kinds:
                configs += [
                    (f"{g} groups {t}", (g, t), 1),
                    (f"{g} groups {t} ping-pong", (g, t), 2),
                ]
        warm = prompts_for(2, args.prompt_tokens, cfg.vocab_size, seed=99)
        for _, g, mb in configs:
            run_engine(
                *((colocated, warm, 2) if g is None else (attention, warm, 2)),
                experts=None if g is None else ExpertDispatcher(transports[g]),
                microbatches=mb,
            )
        rows = []
        for b in batches:
            prompts = prompts_for(b, args.prompt_tokens, cfg.vocab_size, seed=b)
            runs = {name: [] for name, _, _ in configs}
            waits = {name: [] for name, _, _ in configs}
            for _ in range(args.repeats):  # interleaved, so drift hits every configuration
                for name, g, mb in configs:
                    if g is None:
                        tps, wall = run_engine(colocated, prompts, args.new_tokens)
                        waits[name].append(0.0)
                    else:
                        timed = TimedTransport(transports[g])
                        tps, wall = run_engine(
                            attention, prompts, args.new_tokens, ExpertDispatcher(timed), mb
                        )
                        waits[name].append(timed.wait_s / wall)
                    runs[name].append(tps)
            base = statistics.median(runs["colocated"])
            for name, _, _ in configs:
                tps = statistics.median(runs[name])
                rows.append((b, name, tps, base / tps, statistics.median(waits[name])))
                print(
                    f"batch {b:>3} {name:<20} {tps:8.1f} tok/s  colocated/this "
                    f"{base / tps:5.2f}x  waiting on experts {100 * rows[-1][4]:4.0f}% of wall",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()

    print(
        f"\n{args.preset}, {args.dtype}, {args.prompt_tokens}-token prompts, {args.new_tokens} "
        f"new tokens, greedy; engine threads {torch.get_num_threads()}, expert threads "
        f"{args.expert_threads}; medians of {args.repeats}"
    )
    print(f"{'batch':>5}  {'configuration':<22}{'tok/s':>9}{'slowdown':>10}{'wait':>7}")
    for b, name, tps, slow, wait in rows:
        print(f"{b:>5}  {name:<22}{tps:>9.1f}{slow:>9.2f}x{100 * wait:>6.0f}%")


if __name__ == "__main__":
    main()
