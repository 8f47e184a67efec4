"""The ``exaone-cluster`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _make_checkpoint(args: argparse.Namespace) -> int:
    from cluster.bundled.checkpoint import parse_overrides, write_checkpoint
    from replicas.model.config import ModelConfig
    from replicas.model.exaone_moe import count_parameters

    try:
        overrides = parse_overrides(args.set or [])
        out = write_checkpoint(
            args.output,
            preset=args.preset,
            overrides=overrides,
            seed=args.seed,
            dtype=args.dtype,
            max_shard_bytes=int(args.max_shard_mb * (1 << 20)),
            weights=False if args.no_weights else None,
            hot_experts=[int(expert) for expert in args.hot_experts.split(",")]
            if args.hot_experts
            else (),
            quantize=args.quantize,
        )
    except ValueError as e:  # ConfigError and bad --set values
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = count_parameters(ModelConfig.from_json_file(out))
    print(
        f"wrote {args.preset} checkpoint to {out}: {counts['main'] / 1e6:,.1f}M parameters "
        f"(+{counts['mtp'] / 1e6:,.1f}M MTP), {counts['active'] / 1e6:,.1f}M active per token"
    )
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from cluster.bundled.quantize import quantize_checkpoint

    try:
        rows, cols = (int(v) for v in args.block.split(","))
        if rows <= 0 or cols <= 0:
            raise ValueError
    except ValueError:
        print(
            f"error: --block {args.block!r}: expected ROWS,COLS (positive integers)",
            file=sys.stderr,
        )
        return 2
    try:
        out = quantize_checkpoint(args.source, args.output, (rows, cols))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: projections in FP8 e4m3, blocks {rows}x{cols}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exaone-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mk = sub.add_parser(
        "make-checkpoint",
        help="write a random-weight EXAONE-MoE checkpoint (HF layout) for tests and benchmarks",
    )
    mk.add_argument("output", help="directory to write (created if missing)")
    mk.add_argument("--preset", default="tiny", choices=["tiny", "small", "k-exaone"])
    mk.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config.json field (JSON value), e.g. --set num_experts=16",
    )
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    mk.add_argument(
        "--max-shard-mb",
        type=float,
        default=2048,
        help="split weights into files of at most this size, with an index",
    )
    mk.add_argument("--no-weights", action="store_true", help="config and tokenizer only")
    mk.add_argument(
        "--hot-experts", metavar="IDS", help="experts most tokens choose (router bias), e.g. 0,1"
    )
    mk.add_argument(
        "--quantize",
        choices=["fp8"],
        help="write the projections in block-wise FP8 (128x128 blocks, the 'fp8' layout)",
    )
    mk.set_defaults(func=_make_checkpoint)

    qz = sub.add_parser(
        "quantize", help="write a block-wise FP8 copy of a bf16/fp16/fp32 checkpoint directory"
    )
    qz.add_argument("source", help="checkpoint directory to read")
    qz.add_argument("output", help="directory to write (created if missing)")
    qz.add_argument(
        "--block", default="128,128", metavar="ROWS,COLS", help="weight block per scale"
    )
    qz.set_defaults(func=_quantize)

    from cluster.commands import client as client_cmd
    from cluster.commands import serve as serve_cmd
    from cluster.commands import status as status_cmd

    sv = sub.add_parser("serve", help="start a local Ray cluster serving a model over gRPC")
    serve_cmd.add_arguments(sv)
    sv.set_defaults(func=serve_cmd.run)
    gen = sub.add_parser("generate", help="stream a completion from a running server")
    client_cmd.add_arguments(gen, chat=False)
    gen.set_defaults(func=client_cmd.run_generate)
    ch = sub.add_parser("chat", help="chat with a running server (one message, or turns on stdin)")
    client_cmd.add_arguments(ch, chat=True)
    ch.set_defaults(func=client_cmd.run_chat)
    st = sub.add_parser(
        "status", help="deployments, replicas, expert placement and load of a running cluster"
    )
    status_cmd.add_arguments(st)
    st.set_defaults(func=status_cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
