"""The Router deployment: the request plane. Each replica serves the public gRPC API itself
(cluster.deployments.ingress) and reaches attention replicas through Serve and their step
streams (cluster.deployments.shard_client)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from aiohttp import web
from ray import serve
from ray.serve.handle import DeploymentHandle

from cluster.config import ClusterConfig
from protos.exaone.v1 import generation_pb2 as pb
from replicas.model.config import ModelConfig
from replicas.model.quant_config import BlockFp8
from router.hops import HopStats
from router.openai_api.frontend import OpenAIFrontend
from router.pacing import StreamPacing
from router.prompt_workers import PromptWorkers
from router.requests import RequestLimits
from router.service import GenerationService
from router.stream_slots import StreamSlots
from router.tokenizer import Tokenizer

_serve_log = logging.getLogger("ray.serve")  # shown in each replica's log and the dashboard


def model_info(config: ClusterConfig, cfg: ModelConfig, tokenizer: Tokenizer) -> pb.ModelInfo:
    raw = json.loads((Path(config.model_path) / "config.json").read_text())
    max_len = config.engine.max_model_len or cfg.max_position_embeddings
    return pb.ModelInfo(
        model_id=config.name,
        architecture=(raw.get("architectures") or ["ExaoneMoeForCausalLM"])[0],
        max_context_tokens=max_len,
        max_output_tokens=min(config.router.max_output_tokens or max_len - 1, max_len - 1),
        sliding_window=cfg.sliding_window or 0,
        num_layers=cfg.num_hidden_layers,
        num_sliding_layers=len(cfg.sliding_layers),
        num_global_layers=len(cfg.full_layers),
        num_moe_layers=len(cfg.moe_layers),
        num_experts=cfg.num_experts,
        num_experts_per_token=cfg.num_experts_per_tok,
        num_shared_experts=cfg.num_shared_experts,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        dtype=config.dtype,
        quantization=quant.describe() if (quant := BlockFp8.from_config(raw)) else "",
        eos_token_ids=list(cfg.eos_token_ids),
        capabilities=pb.Capabilities(
            chat=tokenizer.chat_template is not None,
            tools=tokenizer.chat_template is not None,
            reasoning=tokenizer.chat_template is not None,
            logprobs=True,
            prompt_logprobs=True,
            mtp=cfg.num_nextn_predict_layers > 0,
            prefix_cache=False,
        ),
    )


@serve.deployment(name="Router")
class RouterDeployment:
    """The request plane: each replica serves the public gRPC API itself
    (cluster.deployments.ingress) on ``router.grpc_host:grpc_port``, tokenizes and renders
    chats, sends each request to an attention replica through Serve (prefix-affinity choice)
    and reads the token deltas from that replica's step stream
    (cluster.deployments.shard_client)."""

    # Serve awaits an async constructor (type checkers want __init__ to return None).
    async def __init__(self, config: ClusterConfig, shard: DeploymentHandle):  # type: ignore[misc]
        from cluster.deployments import replica_directory
        from cluster.deployments.http_ingress import OpenAIServer, start_http_ingress
        from cluster.deployments.ingress import start_ingress
        from cluster.deployments.shard_client import DirectShardClient
        from cluster.deployments.step_subscriber import StepSubscriber
        from cluster.ops.metrics import RouterMetrics

        cfg = config.read_model_config()
        tokenizer = Tokenizer(config.model_path)
        info = model_info(config, cfg, tokenizer)
        r = config.router
        limits = RequestLimits(
            vocab_size=cfg.vocab_size,
            max_model_len=info.max_context_tokens,
            max_output_tokens=info.max_output_tokens,
            max_request_bytes=r.max_request_bytes,
        )
        self.shard = shard
        self.metrics = RouterMetrics()
        self.hops = HopStats(self.metrics.hop_observed)
        app_name = serve.get_replica_context().app_name
        self.client = DirectShardClient(
            shard,
            StepSubscriber(self.hops),
            retry_budget_s=r.retry_budget_s,
            pacing=StreamPacing(r.stream_interval_ms / 1000, r.stream_pacing_min_streams),
            replicas=lambda: replica_directory.running(app_name),
            block_size=config.engine.block_size,
            affinity_blocks=config.attention.prefix_affinity_blocks,
            max_imbalance=config.attention.max_load_imbalance,
        )
        self.prompts = PromptWorkers(config.model_path, tokenizer, limits)
        self.service = GenerationService(
            tokenizer, self.client, limits, info, self.prompts, self.hops
        )
        slots = StreamSlots(r.max_ongoing_requests)  # over both protocols
        tls = (r.tls_cert_file, r.tls_key_file) if r.tls_cert_file and r.tls_key_file else None
        self.server = await start_ingress(
            r.grpc_host,
            r.grpc_port,
            self.service,
            self.healthy,
            self.metrics,
            r.max_request_bytes,
            slots,
            r.request_timeout_s,
            tls=tls,
        )
        _serve_log.info("Router serving gRPC at %s:%d", r.grpc_host, r.grpc_port)
        self.http: web.AppRunner | None = None
        if r.openai_api:
            frontend = OpenAIFrontend(self.service, info.model_id, self.metrics)
            server = OpenAIServer(
                frontend,
                self.healthy,
                slots,
                r.max_request_bytes,
                r.request_timeout_s,
                self.metrics,
                r.http_read_timeout_s,
            )
            self.http = await start_http_ingress(r.grpc_host, r.openai_port, server, tls)
            _serve_log.info("Router serving the OpenAI API at %s:%d", r.grpc_host, r.openai_port)

    async def submits_directly(self) -> bool:
        """Whether this router knows the attention replicas' step streams and submits to them
        itself (cluster.deployments.replica_directory); until then Serve chooses the replica for
        each request, which works but costs each a Serve call. A call through the AttentionShard
        handle starts the Serve request router that publishes them, so one is made while they
        are unknown."""
        if not self.client.replicas():
            await self.healthy(tries=1)
        return bool(self.client.replicas())

    def submit_counts(self) -> dict[str, int]:
        """Request attempts this router sent to a replica it chose ("direct") and through a
        Serve handle call ("serve"), since start (cluster.deployments.shard_client)."""
        return {"direct": self.client.num_direct, "serve": self.client.num_via_serve}

    def hop_stats(self, clear: bool = False) -> dict[str, dict[str, float]]:
        """Recent per-hop latencies of this router's token deltas (router.hops); ``clear``
        starts a new window."""
        out = self.hops.summary()
        if clear:
            self.hops.clear()
        return out

    async def healthy(self, tries: int = 3) -> bool:
        """An attention replica answers and its engine can serve (its thread alive, no step
        hung). Serve picks the replica each call answers from, so one unhealthy replica among
        healthy ones (Serve replaces it) is asked again rather than reported."""
        for _ in range(tries):
            try:
                if await asyncio.wait_for(self.shard.healthy.remote(), timeout=2.0):
                    return True
            except Exception:  # noqa: BLE001 - unreachable counts as not serving
                pass
        return False

    async def __del__(self):
        # Both listeners stop taking requests at once; open streams get a second (then cut).
        http, self.http = getattr(self, "http", None), None
        grpc_server, self.server = getattr(self, "server", None), None
        stops = [http.cleanup()] if http is not None else []
        if grpc_server is not None:
            stops.append(grpc_server.stop(1.0))
        for result in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(result, BaseException):
                _serve_log.warning("stopping a listener failed: %r", result)
        if getattr(self, "client", None) is not None:
            await self.client.close()
        if getattr(self, "prompts", None) is not None:
            self.prompts.close()
