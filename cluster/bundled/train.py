"""Train a small EXAONE-MoE, MTP head included, on the synthetic chats.

Seeded and time-boxed on CPU; the result is an ordinary checkpoint directory in the Hugging
Face layout (bf16 safetensors, config, tokenizer trained on the same chats, chat template):

    .venv/bin/python -m cluster.bundled.train OUT_DIR --minutes 30

Loss: next-token cross-entropy of the main model plus ``mtp_weight`` times the MTP block's
cross-entropy on the token after next, from (h_t, embedding of x_{t+1}) as it drafts at
serving time (DeepSeek-V3's MTP objective). Chats are packed into one token stream.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.bundled.chat_corpus import chats, render
from cluster.bundled.checkpoint import (
    checkpoint_tensors,
    random_model,
    save_sharded,
    write_checkpoint,
)
from replicas.model.config import ModelConfig
from replicas.model.exaone_moe import ExaoneMoeForCausalLM
from router.tokenizer import Tokenizer

# hidden 256, 8 layers LLLG, 16 experts top-2 (+ MTP): under 12.5M parameters, so the bf16
# checkpoint stays under the 25 MB the repository may carry (tested).
BUNDLED = {
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "moe_intermediate_size": 64,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "sliding_window": 64,
    "max_position_embeddings": 2048,
}
SAVE_SECONDS = 15.0
"""Kept back from the time budget for writing the checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    minutes: float = 30.0
    """Wall-clock budget of the optimisation loop."""
    max_steps: int | None = None
    batch: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int = 30
    mtp_weight: float = 0.3
    num_chats: int = 40_000
    seed: int = 0
    model: dict = field(default_factory=lambda: dict(BUNDLED))
    """config.json fields over the tiny preset's."""


def token_stream(tok: Tokenizer, texts: list[str], seed: int) -> Iterator[int]:
    """The chats' tokens, one chat after another in a seeded order, forever."""
    encoded = [tok.encode(t) for t in texts]
    g = torch.Generator().manual_seed(seed)
    while True:
        for i in torch.randperm(len(encoded), generator=g).tolist():
            yield from encoded[i]


def next_batch(stream: Iterator[int], batch: int, length: int) -> torch.Tensor:
    """[batch, length] token ids cut from the stream."""
    return torch.tensor([[next(stream) for _ in range(length)] for _ in range(batch)])


def losses(model: ExaoneMoeForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] -> (main next-token loss, MTP loss on the token after next)."""
    if model.mtp is None:
        raise ValueError("training needs the MTP block: num_nextn_predict_layers must be 1")
    vocab = model.cfg.vocab_size
    h = model.hidden_states(ids[:, :-1])  # [B, T-1, H]; row t predicts token t+1
    lm = F.cross_entropy(model.lm_head(h).reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
    steps = ids.shape[1] - 2
    cos, sin = model.rope(steps, ids.device, h.dtype)
    d = model.mtp(model.model.embed_tokens(ids[:, 1:-1]), h[:, :steps], cos, sin)  # [B, T-2, H]
    mtp = F.cross_entropy(model.lm_head(d).reshape(-1, vocab).float(), ids[:, 2:].reshape(-1))
    return lm, mtp


def learning_rate(step: int, progress: float, config: TrainConfig) -> float:
    """Linear warm-up over the first steps, then cosine decay to a tenth as ``progress``
    (the fraction of the step or time budget spent, whichever is further) goes 0 -> 1."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    done = min(1.0, max(progress, 0.0))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def machine() -> str:
    """Where the training ran, for the model card."""
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"


def train(
    out_dir: str | Path, config: TrainConfig = TrainConfig(), log: Callable[[str], None] = print
) -> dict:
    """Write the tokenizer and config, train, save bf16 weights and ``training.json`` (the
    loss curve) into ``out_dir`` -> the training summary."""
    out = Path(out_dir)
    began = time.monotonic()  # the budget covers corpus, tokenizer and saving too
    torch.manual_seed(config.seed)
    texts = [render(m, t) for m, t in chats(config.num_chats, seed=config.seed)]
    write_checkpoint(
        out, "tiny", overrides=config.model, seed=config.seed, weights=False, tokenizer_corpus=texts
    )
    cfg = ModelConfig.from_json_file(out / "config.json")
    tok = Tokenizer(out)
    model = random_model(cfg, config.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    stream = token_stream(tok, texts, config.seed)
    started = time.monotonic()
    loop_seconds = 60 * config.minutes - (started - began) - SAVE_SECONDS
    total = config.max_steps or 10**9
    curve, step = [], 0
    while step < total and (elapsed := time.monotonic() - started) < loop_seconds:
        ids = next_batch(stream, config.batch, config.seq_len)
        lm, mtp = losses(model, ids)
        progress = max(step / total, elapsed / loop_seconds)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, progress, config)
        opt.zero_grad(set_to_none=True)
        (lm + config.mtp_weight * mtp).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(
            {
                "step": step,
                "loss": round(lm.item(), 4),
                "mtp_loss": round(mtp.item(), 4),
                "seconds": round(time.monotonic() - started, 1),
            }
        )
        if step % 25 == 0:
            log(f"step {step}: loss {lm.item():.3f}, mtp loss {mtp.item():.3f}")
        step += 1
    model.eval()
    save_sharded(checkpoint_tensors(model, torch.bfloat16), out, 2 << 30)
    summary = {
        "config": asdict(config),
        "steps": step,
        "tokens": step * config.batch * config.seq_len,
        "seconds": round(time.monotonic() - began, 1),
        "machine": machine(),
        "curve": curve,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    summary = train(
        args.out_dir, TrainConfig(minutes=args.minutes, max_steps=args.max_steps, seed=args.seed)
    )
    last = summary["curve"][-1] if summary["curve"] else {}
    print(
        f"{summary['steps']} steps, {summary['tokens']} tokens, {summary['seconds']} s; "
        f"final loss {last.get('loss')}, mtp loss {last.get('mtp_loss')}"
    )


if __name__ == "__main__":
    main()
