"""The bundled model's card: evaluate a trained checkpoint on held-out chats
and write ``README.md``, ``eval.json`` and ``loss.svg`` next to its weights.

    .venv/bin/python -m cluster.bundled.model_card MODEL_DIR [--chats 64]

The evaluation asks every assistant turn of ``--chats`` held-out synthetic chats (a seed the
trainer never uses) with greedy decoding and MTP drafting (k = 3), parses the answer as the
router does (reasoning, content, tool calls), and counts an answer as right when its content
and tool calls equal the reference's. The drafting counters give the acceptance per position.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from cluster.bundled.chat_corpus import TASKS, chats
from replicas.engine.engine import EngineConfig, LLMEngine
from replicas.model.exaone_moe import count_parameters
from replicas.model.loader import load_causal_lm
from replicas.sampling_params import SamplingParams
from router.parsing import ToolCall, parse_output
from router.tokenizer import Tokenizer

EVAL_SEED = 20_000
"""Held-out chats: training draws from seed 0, bench/mtp.py's prompts from 10_000 + n."""


def turns(n: int, seed: int = EVAL_SEED) -> list[dict[str, Any]]:
    """Every assistant turn of n chats -> {family, messages (before the turn), tools, reference}."""
    out = []
    for i, (messages, tools) in enumerate(chats(n, seed)):
        for j, message in enumerate(messages):
            if message["role"] == "assistant":
                family = TASKS[i % len(TASKS)].__name__.lstrip("_")
                out.append(
                    {
                        "family": family,
                        "messages": messages[:j],
                        "tools": tools,
                        "reference": message,
                    }
                )
    return out


def _calls(calls: list) -> list[tuple[str, Any]]:
    """Tool calls, from the parser or from a reference message, as comparable pairs."""
    pairs = []
    for c in calls:
        if isinstance(c, ToolCall):
            pairs.append((c.name, json.loads(c.arguments)))
        else:
            pairs.append((c["function"]["name"], json.loads(c["function"]["arguments"])))
    return pairs


def is_correct(text: str, reference: dict[str, Any]) -> bool:
    """Generated text (after the generation prompt) against the reference assistant message."""
    parsed = parse_output(text)
    return (
        parsed.content.strip() == reference["content"].strip()
        and _calls(parsed.tool_calls) == _calls(reference.get("tool_calls", []))
        and not parsed.tool_call_errors
        and bool(parsed.reasoning.strip())
    )


def evaluate(path: str | Path, num_chats: int = 64, k: int = 3, max_tokens: int = 128) -> dict:
    """Greedy answers with k MTP drafts -> accuracy per family, acceptance, sample transcripts."""
    path = Path(path)
    tok = Tokenizer(path)
    model = load_causal_lm(path, dtype=torch.float32)
    items = turns(num_chats)
    prompts = [tok.encode(tok.render_chat(t["messages"], tools=t["tools"])) for t in items]
    engine = LLMEngine(
        model,
        EngineConfig(
            max_num_seqs=len(prompts),
            block_size=16,
            kv_cache_bytes=256 << 20,
            num_speculative_tokens=k,
        ),
    )
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    families: dict[str, list[int]] = {}
    samples: list[dict[str, Any]] = []
    for item, ids in zip(items, outputs, strict=True):
        text = tok.decode(ids)
        right = is_correct(text, item["reference"])
        tally = families.setdefault(item["family"], [0, 0])
        tally[0] += right
        tally[1] += 1
        if len(samples) < len(TASKS) and item["family"] not in {s["family"] for s in samples}:
            prompt = tok.render_chat(item["messages"], tools=item["tools"])
            samples.append(
                {"family": item["family"], "prompt": prompt, "output": text, "correct": right}
            )
    drafted, accepted = engine.acceptance.drafted, engine.acceptance.accepted
    return {
        "seed": EVAL_SEED,
        "chats": num_chats,
        "turns": len(items),
        "k": k,
        "correct": sum(c for c, _ in families.values()),
        "families": {f: {"correct": c, "turns": n} for f, (c, n) in sorted(families.items())},
        "acceptance_per_position": [
            round(a / d, 4) if d else 0.0 for a, d in zip(accepted, drafted, strict=True)
        ][:k],
        "accepted_per_step": round(sum(accepted) / max(drafted[0], 1), 3),
        "drafted": sum(drafted),
        "accepted": sum(accepted),
        "samples": samples,
    }


def loss_svg(curve: list[dict], width: int = 640, height: int = 320) -> str:
    """The training curve (main and MTP loss per step) as a small standalone SVG line chart,
    loss on a log scale."""
    pad = 40
    steps = max(len(curve) - 1, 1)
    values = [c[k] for c in curve for k in ("loss", "mtp_loss") if c[k] > 0]
    low, high = math.log(min(values)), math.log(max(values))
    span = max(high - low, 1e-6)

    def y(v: float) -> float:
        return height - pad - (height - 2 * pad) * (math.log(max(v, 1e-9)) - low) / span

    def points(key: str) -> str:
        return " ".join(
            f"{pad + (width - 2 * pad) * c['step'] / steps:.1f},{y(c[key]):.1f}" for c in curve
        )

    ticks = "".join(
        f'<text x="{pad - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>'
        f'<line x1="{pad}" y1="{y(v):.1f}" x2="{width - pad}" y2="{y(v):.1f}" stroke="#ddd"/>'
        for v in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)
        if low - 1e-9 <= math.log(v) <= high + 1e-9
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>\n{ticks}\n'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        f'stroke="black"/>\n<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" '
        f'stroke="black"/>\n'
        f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">step (0 to {steps}); '
        f"loss on a log scale</text>\n"
        f'<polyline fill="none" stroke="#1f77b4" points="{points("loss")}"/>\n'
        f'<polyline fill="none" stroke="#ff7f0e" points="{points("mtp_loss")}"/>\n'
        f'<text x="{width - pad}" y="{pad}" text-anchor="end" fill="#1f77b4">main loss</text>\n'
        f'<text x="{width - pad}" y="{pad + 14}" text-anchor="end" fill="#ff7f0e">MTP loss'
        f"</text>\n</svg>\n"
    )


def _mean(curve: list[dict], key: str) -> float:
    return sum(c[key] for c in curve) / len(curve)


def _architecture(config: dict) -> str:
    from replicas.model.config import ModelConfig

    counts = count_parameters(ModelConfig.from_hf(config))
    c = config
    layers = "".join("G" if t == "full_attention" else "L" for t in c["layer_types"])
    rows = [
        (
            "parameters",
            f"{counts['total'] / 1e6:.1f}M ({counts['active'] / 1e6:.1f}M active "
            "per token, MTP included)",
        ),
        (
            "hidden size / layers",
            f"{c['hidden_size']} / {c['num_hidden_layers']} ({layers}; "
            f"L = sliding window {c['sliding_window']}, G = global)",
        ),
        (
            "attention",
            f"{c['num_attention_heads']} query heads, {c['num_key_value_heads']} KV "
            f"heads, head dim {c['head_dim']}",
        ),
        (
            "experts",
            f"{c['num_experts']} routed (top-{c['num_experts_per_tok']}, "
            f"{c['moe_intermediate_size']} wide) + {c['num_shared_experts']} shared; "
            f"the first {c['first_k_dense_replace']} layer(s) dense",
        ),
        ("MTP", f"{c['num_nextn_predict_layers']} layer (drafts the token after next)"),
        (
            "vocabulary",
            f"{c['vocab_size']} (byte-level BPE trained on the same chats; "
            "EXAONE's special tokens at EXAONE's ids)",
        ),
        ("weights", "bf16 safetensors"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def card(config: dict, training: dict, evaluation: dict) -> str:
    """README.md for the checkpoint, from its config.json, training.json and the evaluation."""
    curve, tc, ev = training["curve"], training["config"], evaluation
    rows = [curve[min(len(curve) - 1, round(i * (len(curve) - 1) / 10))] for i in range(11)]
    table = "\n".join(
        f"| {c['step']} | {c['seconds']:.0f} | {c['loss']:.3f} | {c['mtp_loss']:.3f} |"
        for c in rows
    )
    fam = "\n".join(f"| {f} | {v['correct']}/{v['turns']} |" for f, v in ev["families"].items())
    rates = ", ".join(f"{r:.3f}" for r in ev["acceptance_per_position"])
    samples = "\n\n".join(
        f"**{s['family']}** ({'right' if s['correct'] else 'wrong'}):\n\n```\n{s['prompt']}"
        f"{s['output']}\n```"
        for s in ev["samples"][:3]
    )
    tail = curve[-20:]
    minutes, where = tc["minutes"], training.get("machine", "(not recorded)")
    return f"""# exaone-cluster bundled model

A small EXAONE-MoE (`exaone_moe`) with a trained MTP head, made by `cluster/bundled/train.py`
so that `exaone-cluster serve` answers a newcomer's first Generate call with readable text and
MTP speculative decoding has drafts worth accepting. It knows the eight kinds of synthetic chat
it was trained on and nothing else: it is a working fixture for the serving stack, not a
language model for real use.

## Architecture

{_architecture(config)}

## Data

{tc["num_chats"]} synthetic chats from `cluster/bundled/chat_corpus.py` (seed {tc["seed"]}),
rendered with the EXAONE chat template exactly as the router renders prompts: system prompts,
user turns, assistant turns with a `<think>` reasoning block, tool declarations, `get_weather`
tool calls and their results. The families, in turn: addition, multiplication, capitals, unit
conversions, spelling backwards, counting letters, sorting numbers, weather tool calls.

Why synthetic: the model must train offline, on any machine, in 30 minutes on 2 CPU cores. A
public corpus is neither on every machine nor learnable in that budget; templated tasks with
worked reasoning are, they cover every part of the chat template, and their regular phrasing is
what an MTP head can learn to draft.

## Training

`python -m cluster.bundled.train OUT --minutes {minutes:g}` (seed {tc["seed"]}): AdamW,
learning rate {tc["lr"]} with {tc["warmup_steps"]} warm-up steps, then cosine decay to a tenth
over the time budget; batch {tc["batch"]} x {tc["seq_len"]} tokens of packed chats. Loss:
next-token cross-entropy plus {tc["mtp_weight"]} x the MTP block's cross-entropy on the token
after next. {training["steps"]} steps ({training["tokens"]:,} tokens), {training["seconds"]:.0f} s
in all (corpus, tokenizer and saving included) on {where}. Mean of the last 20 steps: loss
{_mean(tail, "loss"):.3f}, MTP loss {_mean(tail, "mtp_loss"):.3f}.

![loss curve](loss.svg)

| step | seconds | loss | MTP loss |
|---:|---:|---:|---:|
{table}

## Evaluation

`python -m cluster.bundled.model_card DIR`: every assistant turn of {ev["chats"]} held-out chats
(seed {ev["seed"]}, {ev["turns"]} turns), greedy, with k = {ev["k"]} MTP drafts per step. An
answer is right when its content and tool calls equal the reference exactly and it has a reasoning
block: **{ev["correct"]}/{ev["turns"]}**.

| family | right |
|---|---:|
{fam}

MTP acceptance per draft position (greedy, k = {ev["k"]}): {rates}. Accepted drafts per step:
{ev["accepted_per_step"]:.2f} ({ev["accepted"]} of {ev["drafted"]} drafted). Throughput with and
without drafting: `bench/mtp.py --model DIR --chat-prompts`.

## Samples

{samples}
"""


def write(path: str | Path, num_chats: int = 64) -> dict:
    """Evaluate the checkpoint at ``path`` and write its card -> the evaluation."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    training = json.loads((path / "training.json").read_text())
    evaluation = evaluate(path, num_chats)
    (path / "eval.json").write_text(json.dumps(evaluation, indent=1) + "\n")
    (path / "loss.svg").write_text(loss_svg(training["curve"]))
    (path / "README.md").write_text(card(config, training, evaluation))
    return evaluation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--chats", type=int, default=64)
    args = ap.parse_args()
    e = write(args.model_dir, args.chats)
    print(
        f"{e['correct']}/{e['turns']} right; acceptance per position "
        f"{e['acceptance_per_position']}; wrote README.md, eval.json, loss.svg"
    )


if __name__ == "__main__":
    main()
