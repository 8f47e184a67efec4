"""Build a byte-level BPE tokenizer with EXAONE's special tokens, offline and deterministically.

The real K-EXAONE tokenizer (SuperBPE, 153,600 entries) cannot be fetched here, so generated
checkpoints get a small BPE trained on a built-in synthetic corpus. What matters for serving is
kept exactly: byte-level coverage of any text, the special tokens at fixed ids (pad 0, bos 1,
eos 53 = ``<|endofturn|>``), and the chat template from model-spec.md section 6.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "[PAD]", "[BOS]", "<|endofturn|>"
# Role and control markers: special (dropped by skip_special_tokens).
CONTROL_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|tool_declare|>"]
# Structural tags the parsers must see in decoded text: added tokens, but not "special".
TEXT_TAGS = [
    "<think>",
    "</think>",
    "<tool>",
    "</tool>",
    "<tool_call>",
    "</tool_call>",
    "<tool_result>",
    "</tool_result>",
]
EOS_ID = 53


def special_tokens() -> list[str]:
    """Ids 0..53 in order: pad, bos, the markers, unused fillers, and eos at 53."""
    head = [PAD, BOS, *CONTROL_TOKENS, *TEXT_TAGS]
    fillers = [f"<|unused_{i}|>" for i in range(EOS_ID - len(head))]
    return [*head, *fillers, EOS]


_WORDS = (
    "the a of to and in is that for it as with was on be by this are from at an or which model "
    "token expert layer attention cache request server cluster replica prompt answer question "
    "system user assistant tool call result function weather city time number list search file "
    "data value error memory batch stream window sequence prefix router group load scale ray "
    "serve redis kubernetes helm grpc python torch tensor matrix compute fast slow good small "
    "large first last next previous open close read write send receive start stop run test "
    "hello world please thanks yes no maybe because when where what how why who today tomorrow"
).split()
_KOREAN = (
    "안녕하세요 감사합니다 모델 서버 질문 답변 오늘 날씨 서울 전문가 토큰 요청 캐시 계산 데이터"
).split()


def synthetic_corpus(num_docs: int = 3000, seed: int = 0) -> Iterator[str]:
    """Chat transcripts in the EXAONE format plus plain sentences, reproducible from ``seed``."""
    rng = random.Random(seed)

    def sentence() -> str:
        words = [
            rng.choice(_KOREAN if rng.random() < 0.1 else _WORDS) for _ in range(rng.randint(4, 16))
        ]
        text = " ".join(words)
        return text[0].upper() + text[1:] + rng.choice([".", "?", "!", ".", ".", ","])

    for _ in range(num_docs):
        kind = rng.random()
        if kind < 0.5:
            yield " ".join(sentence() for _ in range(rng.randint(1, 4)))
        elif kind < 0.8:
            yield (
                f"<|system|>\n{sentence()}<|endofturn|>\n<|user|>\n{sentence()}<|endofturn|>\n"
                f"<|assistant|>\n<think>\n{sentence()}\n</think>\n\n{sentence()}<|endofturn|>\n"
            )
        else:
            args = json.dumps({"city": rng.choice(_WORDS), "days": rng.randint(1, 9)})
            yield (
                f'<tool_call>{{"name": "get_{rng.choice(_WORDS)}", '
                f'"arguments": {args}}}</tool_call>'
                f"<|endofturn|>\n<|tool|>\n<tool_result>{rng.randint(0, 999)} {sentence()}"
                "</tool_result><|endofturn|>\n"
            )


def chat_template() -> str:
    return resources.files("cluster").joinpath("chat_template.jinja").read_text()


def build_tokenizer(
    vocab_size: int, seed: int = 0, corpus: Iterable[str] | None = None
) -> Tokenizer:
    """Train byte-level BPE (at most ``vocab_size`` entries) with the special tokens first, on
    ``corpus`` (default: the built-in synthetic one)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed) if corpus is None else corpus, trainer)
    return tok


def write_tokenizer(
    out_dir: Path,
    vocab_size: int,
    max_length: int,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
) -> None:
    """tokenizer.json and tokenizer_config.json (with the chat template) into ``out_dir``;
    ``corpus``: the texts to train the BPE on (default: the built-in synthetic one)."""
    tok = build_tokenizer(min(vocab_size, 8192), seed, corpus)
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in TEXT_TAGS
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, indent=1))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": chat_template(),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2))
