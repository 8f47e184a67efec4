"""What the request plane's unit tests share: the tiny checkpoint's tokenizer, model info and
request limits, as a Router replica builds them."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig, EngineOptions
from cluster.deployments.router import model_info
from replicas.model.config import ModelConfig
from router.requests import RequestLimits
from router.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def env(make_ckpt):
    path = make_ckpt(dtype="float32")
    config = ClusterConfig(model_path=str(path), engine=EngineOptions(max_model_len=256))
    cfg = ModelConfig.from_json_file(path / "config.json")
    tok = Tokenizer(path)
    info = model_info(config, cfg, tok)
    limits = RequestLimits(cfg.vocab_size, info.max_context_tokens, info.max_output_tokens)
    return path, tok, info, limits
