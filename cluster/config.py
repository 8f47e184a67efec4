"""ClusterConfig: the one pydantic model that `serve run`, `serve deploy`, KubeRay and the CLI pass
to ``cluster.app:build_app``. Unknown or invalid fields fail at start with the field's name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.cpus import node_cpus
from replicas.experts.placement import ExpertPlacement
from replicas.model.config import AUTO_DTYPE, ModelConfig, resolve_dtype


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineOptions(_Strict):
    max_num_seqs: int = Field(64, ge=1, description="Sequences decoded together at most.")
    max_num_batched_tokens: int = Field(512, ge=1, description="Tokens per engine step at most.")
    block_size: int = Field(16, ge=1, description="Tokens per KV block (global layers).")
    kv_cache_bytes: int = Field(1 << 30, ge=1, description="Memory for global-layer KV blocks.")
    max_model_len: int | None = Field(
        None, ge=2, description="Prompt + output tokens per request; default: the model's limit."
    )
    max_waiting_requests: int = Field(
        256, ge=0, description="Requests queued beyond max_num_seqs before RESOURCE_EXHAUSTED."
    )
    num_speculative_tokens: int = Field(
        0, ge=0, le=8, description="MTP draft tokens per sequence and step (0: no drafting)."
    )
    adaptive_drafting: bool = Field(
        True, description="Let the draft policy shrink or pause drafting when it does not pay."
    )


class _Autoscaling(_Strict):
    enabled: bool = Field(False, description="Let Serve scale the replicas with this policy.")
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(4, ge=1)
    upscale_delay_s: float = Field(5.0, ge=0, description="A scale-up must hold this long.")
    downscale_delay_s: float = Field(30.0, ge=0, description="A scale-down must hold this long.")
    # Serve 2.60 deprecates this field but still reads it (the push interval of replica
    # metrics; the env vars meant to replace it are not read yet), so we set it.
    metrics_interval_s: float = Field(1.0, gt=0, description="How often replicas report.")
    look_back_period_s: float = Field(5.0, gt=0, description="Reports averaged over this long.")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must be longer than metrics_interval_s")
        return self

    def _serve_config(self, initial_replicas: int, policy: str, **kwargs) -> dict:
        """Serve's ``autoscaling_config`` with our custom policy (cluster.ops.autoscaling)."""
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": min(max(initial_replicas, self.min_replicas), self.max_replicas),
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
            "policy": {
                "policy_function": f"cluster.ops.autoscaling:{policy}",
                "policy_kwargs": kwargs,
            },
        }


class ExpertAutoscaling(_Autoscaling):
    target_tokens_per_s: float = Field(
        2000.0, gt=0, description="Slots per second per MoE layer one expert replica should serve."
    )
    target_busy: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Fraction of time an expert replica should spend computing "
        "(on CPU: its computing thread's CPU time over wall time).",
    )

    def serve_config(self, initial_replicas: int) -> dict:
        return super()._serve_config(
            initial_replicas,
            "ExpertGroupPolicy",
            target_tokens_per_s=self.target_tokens_per_s,
            target_busy=self.target_busy,
        )


class AttentionAutoscaling(_Autoscaling):
    target_running_seqs: float = Field(32.0, gt=0, description="Running sequences per replica.")
    target_waiting: float = Field(4.0, gt=0, description="Waiting requests per replica.")
    target_kv_usage: float = Field(0.8, gt=0, le=1, description="KV-cache use per replica.")

    def serve_config(self, initial_replicas: int) -> dict:
        return super()._serve_config(
            initial_replicas,
            "AttentionPolicy",
            target_running_seqs=self.target_running_seqs,
            target_waiting=self.target_waiting,
            target_kv_usage=self.target_kv_usage,
        )


REQUEST_PLANE_ACTIVE_PARAMS = 16_000_000
"""Below this many active parameters per token a decode step costs the engine about as much
per token as the request plane's work for that token (about 0.2 ms of a core: streaming,
detokenizing, protobuf), so the request plane keeps a core of its own; above it the engine's
share dwarfs that and every core steps the model. Measured on 2 cores (bench/served.py):
bundled model (3.6M) served 558 tok/s at 8 in flight with 1 engine thread, 451 with 2;
small preset (197M) 84 tok/s at 32 in flight with 1, 126 with 2."""


def default_engine_threads(cpus: int, active_params_per_token: int | None) -> int:
    """Torch threads for an attention replica on a node with ``cpus`` cores: every core but
    one for light models (or when the model is not known), every core for heavy ones."""
    heavy = (active_params_per_token or 0) >= REQUEST_PLANE_ACTIVE_PARAMS
    return max(1, cpus if heavy else cpus - 1)


class AttentionOptions(_Strict):
    num_replicas: int = Field(1, ge=1, description="Replicas (the initial count when autoscaled).")
    autoscaling: AttentionAutoscaling = AttentionAutoscaling()
    num_cpus: float = Field(1.0, ge=0, description="Ray CPUs reserved per replica.")
    num_gpus: float = Field(
        0, ge=0, description="GPUs per replica (1 on GPU nodes: the model then runs on it)."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each replica needs."
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per replica; default: every core the replica may use (its "
        "CPUs, capped by a cgroup CPU quota such as a pod's limit), but one that the request "
        "plane (gRPC, tokenizing, detokenizing) keeps for itself when the model is light "
        "(fewer than 16M active parameters per token).",
    )

    def engine_threads(self, active_params_per_token: int | None = None) -> int:
        """The torch threads an attention replica uses: ``num_threads``, else
        ``default_engine_threads`` for this node's cores and the model served."""
        return self.num_threads or default_engine_threads(node_cpus(), active_params_per_token)

    num_microbatches: int = Field(
        2,
        ge=1,
        description="With expert groups: micro-batches per step kept in flight (2 = ping-pong).",
    )
    engine_process: bool = Field(
        True,
        description="Colocated experts: each replica's engine steps in a child process of its "
        "own, away from the GIL of the replica's request handling (Serve, Ray, the step "
        "stream); false: on a thread of the replica. With expert groups the engine always "
        "runs on a thread of the replica.",
    )
    pin_engine: bool = Field(
        True,
        description="With the engine in its own process and one attention replica (not "
        "autoscaled): bind that process to its torch threads' worth of cores, the last the "
        "replica may use, when it may use more; the request plane keeps the others. The "
        "engine then keeps its core's caches and is not moved between cores mid-step. "
        "Several replicas of a node would bind to the same cores, and under a CPU quota "
        "narrower than the cores a pod may run on the cores are shared: not done then.",
    )

    def pins_engine(self) -> bool:
        """Whether each replica binds its engine process (see ``pin_engine``)."""
        scaled = self.autoscaling.enabled and self.autoscaling.max_replicas > 1
        return self.pin_engine and self.engine_process and self.num_replicas == 1 and not scaled

    prefix_affinity_blocks: int = Field(
        4, ge=0, description="Leading prompt blocks that pick a replica (0: least loaded only)."
    )
    max_load_imbalance: int = Field(
        8,
        ge=0,
        description="Requests more than the least loaded replica before affinity is ignored.",
    )
    graceful_shutdown_timeout_s: float = Field(
        60.0,
        ge=0,
        description="How long a replica being stopped (scale-down, upgrade, shutdown) waits for "
        "its running streams to finish before they are cut (they end UNAVAILABLE).",
    )
    stall_timeout_s: float = Field(
        120.0,
        gt=0,
        description="An engine step running longer than this is hung: the replica reports "
        "unhealthy (health NOT_SERVING) and refuses new requests (the router retries them "
        "elsewhere), its open requests end UNAVAILABLE at Serve's next health check, and Serve "
        "replaces it.",
    )
    health_check_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A replica that has not answered Serve's health check (every 10 s) by then "
        "fails it; three failures in a row and Serve replaces the replica. The check only reads "
        "the engine's state, so a live replica answers in milliseconds; one that does not is "
        "frozen (a stopped process, a hung node). Serve's own default, 30 s, kept a frozen "
        "replica in the set for over 90 s.",
    )


class BalancerOptions(_Strict):
    enabled: bool = Field(
        False, description="Rebalance experts live: copies of hot experts, moved between groups."
    )
    threshold: float = Field(1.2, ge=1, description="Rebalance above this imbalance (max/mean).")
    min_gain: float = Field(
        0.05, ge=0, lt=1, description="... if the new map is at least this fraction better."
    )
    redundant_slots: int = Field(
        1, ge=0, description="Expert slots per group and layer beyond an even share (copies)."
    )
    min_interval_s: float = Field(30.0, ge=0, description="Time between rebalances at least.")
    report_interval_s: float = Field(1.0, gt=0, description="How often replicas report load.")
    stale_s: float = Field(10.0, gt=0, description="A replica silent this long is taken as gone.")
    min_tokens: int = Field(256, ge=0, description="Reported slots needed to trust the load.")

    def rebalance_config(self):
        from cluster.ops.rebalancer import RebalanceConfig

        return RebalanceConfig(
            threshold=self.threshold,
            min_gain=self.min_gain,
            redundant_slots=self.redundant_slots,
            min_interval_s=self.min_interval_s,
            stale_s=self.stale_s,
            min_tokens=self.min_tokens,
        )


class ExpertOptions(_Strict):
    num_groups: int = Field(
        0, ge=0, description="Expert groups; 0 = colocated (attention replicas run the experts)."
    )
    replicas_per_group: int = Field(1, ge=1, description="Replicas (initial, when autoscaled).")
    autoscaling: ExpertAutoscaling = ExpertAutoscaling()
    balancer: BalancerOptions = BalancerOptions()
    load_window_s: float = Field(
        10.0, gt=0, description="Expert replicas report their token load over this window."
    )
    expert_map: list[list[int]] | None = Field(
        None,
        description="Expert ids of each group; default: contiguous ranges of equal size.",
    )
    num_cpus: float = Field(0.5, ge=0, description="Ray CPUs reserved per expert replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per expert replica (on GPU nodes: 1).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each expert replica needs."
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch threads per expert replica; default: every core."
    )
    call_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long one layer call may retry (replica lost or hung, group "
        "restarting) before its requests end UNAVAILABLE.",
    )
    attempt_timeout_s: float = Field(
        5.0,
        gt=0,
        description="How long one attempt of a layer call waits for an expert replica before "
        "it is sent to another replica of the group (a hung replica's worker then leaves the "
        "rotation until it answers again).",
    )
    health_check_timeout_s: float = Field(
        10.0,
        gt=0,
        description="An expert replica that has not answered Serve's health check (every "
        "10 s) by then fails it; three failures in a row and Serve replaces the replica and "
        "its worker (a starting replica's first check: one failure). The check asks the "
        "worker to answer beside its layer calls, so a live one answers in milliseconds; "
        "one that does not is frozen (its layer calls already go to the group's other "
        "replicas). Serve's own default, 30 s, took 103 s to replace a "
        "frozen worker's replica, 45 s with 10 s.",
    )
    transport: Literal["actor", "serve"] = Field(
        "actor",
        description="Per-layer calls: 'actor' = direct Ray actor calls to each replica's expert "
        "worker (fastest; Serve still runs and scales the replicas), 'serve' = through Serve "
        "deployment handles.",
    )


class RouterOptions(_Strict):
    num_replicas: int = Field(1, ge=1)
    health_check_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A Router replica that has not answered Serve's health check (every 10 s) "
        "by then fails it; after three failures Serve replaces it. A live one answers at once; "
        "one that does not is frozen, its clients' streams cut by their keepalive, and new "
        "connections to its port left unanswered (Serve's default, 30 s, took 108 s to serve "
        "again).",
    )
    grpc_host: str = Field(
        "127.0.0.1",
        description="Address each Router replica's gRPC server listens on (0.0.0.0 in a pod "
        "that a Service must reach).",
    )
    grpc_port: int = Field(
        9000,
        ge=1,
        le=65535,
        description="The client-facing gRPC port (Router replicas on one node share it).",
    )
    openai_api: bool = Field(
        True,
        description="Each Router replica also serves the OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models, /health) on grpc_host:openai_port, "
        "with the same TLS files, limits and timeout as gRPC.",
    )
    openai_port: int = Field(
        9080,
        ge=1,
        le=65535,
        description="The OpenAI-compatible HTTP port (Router replicas on one node share it).",
    )
    max_request_bytes: int = Field(4 << 20, ge=1024, description="Largest request accepted.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each Router replica needs: where the client-facing "
        "port must be (the Helm chart puts the Routers on the head pod this way).",
    )
    retry_budget_s: float = Field(
        30.0,
        ge=0,
        description="How long a request whose attention replica was lost before its "
        "first token is retried (on another replica, or the one Serve starts in its place).",
    )
    max_output_tokens: int | None = Field(
        None, ge=1, description="Largest max_tokens accepted; default: the context limit."
    )
    stream_interval_ms: float = Field(
        50.0,
        ge=0,
        description="Under load (stream_pacing_min_streams or more streams on a Router "
        "replica) one stream's token deltas leave at most this often, merged; its first and "
        "last still leave at once. 0: every engine step's delta is sent as it comes.",
    )
    stream_pacing_min_streams: int = Field(
        8, ge=1, description="Streams a Router replica holds from which on it paces them."
    )
    max_ongoing_requests: int = Field(
        1024,
        ge=1,
        description="Streams one router replica holds at once; more are refused with "
        "RESOURCE_EXHAUSTED before any work.",
    )
    request_timeout_s: float | None = Field(
        1800.0,
        gt=0,
        description="How long one Generate stream may run before it ends DEADLINE_EXCEEDED "
        "and its request is aborted (null: no limit).",
    )
    http_read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="The OpenAI-compatible HTTP port closes a connection that has not sent a "
        "whole request's headers within this long of opening or of its last response (an idle "
        "or slow client holds no connection for good), and answers 408 to a request whose body "
        "has not all arrived within this long of its headers.",
    )
    tls_cert_file: str | None = Field(
        None,
        description="PEM certificate chain: the gRPC port serves TLS and the HTTP port HTTPS "
        "(with tls_key_file).",
    )
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")

    @model_validator(mode="after")
    def _tls_pair(self):
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("router.tls_cert_file and router.tls_key_file go together")
        return self


class PrefixCacheOptions(_Strict):
    enabled: bool = Field(True, description="Reuse the KV state of shared prompt prefixes.")
    redis_url: str | None = Field(
        None,
        description="The shared tier: redis://[user:password@]host:port/db, or rediss:// for "
        "TLS. Unset: `exaone-cluster serve` starts a local redis-server if it finds one, "
        "else each replica keeps its local cache only.",
    )
    redis_password: str | None = Field(
        None, description="Password (else the URL's, else $EXAONE_REDIS_PASSWORD)."
    )
    redis_tls_ca_file: str | None = Field(None, description="CA bundle for rediss:// URLs.")
    ttl_s: int = Field(3600, ge=1, description="Lifetime of every unpinned key in Redis.")
    pinned_system_prompts: list[str] = Field(
        default_factory=list,
        description="System prompts computed at start and kept in Redis without TTL.",
    )
    snapshot_interval_tokens: int = Field(
        512, ge=0, description="Also snapshot every N prompt tokens (0: system prompts only)."
    )
    local_snapshot_bytes: int = Field(
        256 << 20, ge=0, description="Window snapshots kept per replica (LRU)."
    )
    redis_queue_bytes: int = Field(
        256 << 20,
        ge=0,
        description="Host copies waiting for the Redis write thread; past it a "
        "write is dropped (counted).",
    )
    local_redis_maxmemory: str = Field(
        "1gb", description="maxmemory of the redis-server `serve` starts (volatile-lru)."
    )
    revision: str = Field("", description="Extra fingerprint part: bump it after retraining.")
    redis_timeout_s: float = Field(1.0, gt=0, description="Socket timeout of Redis calls.")


class ClusterConfig(_Strict):
    model_path: str = Field(description="Local checkpoint directory (Hugging Face layout).")
    model_id: str | None = Field(None, description="Name reported by GetModelInfo.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights' and activations' dtype on the replicas. auto: the checkpoint's own "
        "(config.json's dtype or torch_dtype; float32 without one), as vLLM does; resolved "
        "when the config is validated, so the running config always names a concrete dtype.",
    )
    kernels: Literal["auto", "torch", "triton", "vllm"] = Field(
        "auto",
        description="Kernels for the routed experts and attention: torch (reference; our C "
        "kernels on CPU), triton (ours, CUDA), vllm (vLLM's fused MoE and attention, CUDA, the "
        "gpu extra), auto (CUDA: vllm if installed, else triton; CPU: torch). Logged at start.",
    )
    engine: EngineOptions = EngineOptions()
    attention: AttentionOptions = AttentionOptions()
    experts: ExpertOptions = ExpertOptions()
    router: RouterOptions = RouterOptions()
    prefix_cache: PrefixCacheOptions = PrefixCacheOptions()
    metrics_interval_s: float = Field(
        2.0, gt=0, description="How often replicas update their gauges (cluster/ops/metrics.py)."
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_dtype(cls, data: Any) -> Any:
        """``dtype: auto`` (the default) becomes the checkpoint's dtype here, once, so every
        consumer of ``config.dtype`` (attention replicas, expert groups, GetModelInfo, the
        prefix-cache fingerprint) reads the same concrete name. A model_path without a
        config.json is left alone: ``_model_dir_exists`` reports it."""
        if not isinstance(data, dict) or data.get("dtype", AUTO_DTYPE) != AUTO_DTYPE:
            return data
        path = data.get("model_path")
        if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
            return data
        return {**data, "dtype": resolve_dtype(AUTO_DTYPE, path)}

    @model_validator(mode="after")
    def _model_dir_exists(self) -> ClusterConfig:
        config = Path(self.model_path) / "config.json"
        if not config.is_file():
            raise ValueError(f"model_path={self.model_path!r}: no config.json there")
        if self.experts.num_groups:
            num_experts = json.loads(config.read_text()).get("num_experts", 0)
            try:
                self.placement(num_experts)
            except ValueError as e:
                raise ValueError(f"experts: {e}") from None
        elif self.experts.expert_map is not None:
            raise ValueError("experts.expert_map is set but experts.num_groups is 0")
        elif self.experts.balancer.enabled or self.experts.autoscaling.enabled:
            raise ValueError(
                "experts.balancer and experts.autoscaling need expert groups "
                "(experts.num_groups > 0)"
            )
        mtp = json.loads(config.read_text()).get("num_nextn_predict_layers", 0)
        if self.engine.num_speculative_tokens and not mtp:
            raise ValueError(
                "engine.num_speculative_tokens needs an MTP block, and this checkpoint has none "
                "(num_nextn_predict_layers is 0)"
            )
        return self

    def placement(self, num_experts: int):
        """The ExpertPlacement of ``experts`` (None in colocated mode)."""
        experts = self.experts
        if not experts.num_groups:
            return None
        return ExpertPlacement.of(num_experts, experts.num_groups, experts.expert_map)

    def read_model_config(self) -> ModelConfig:
        """The checkpoint's model configuration (its config.json)."""
        return ModelConfig.from_json_file(Path(self.model_path) / "config.json")

    def engine_threads(self) -> int:
        """Torch threads of an attention replica on this node, for this checkpoint's model."""
        return self.attention.engine_threads(self.read_model_config().active_params_per_token)

    @property
    def name(self) -> str:
        return self.model_id or Path(self.model_path).resolve().name

    def serving_at(self, host: str, port: int, openai_port: int | None = None) -> ClusterConfig:
        """This config with its Router replicas' gRPC server on host:port (and their HTTP
        server on host:openai_port, when given)."""
        update: dict[str, Any] = {"grpc_host": host, "grpc_port": port}
        if openai_port is not None:
            update["openai_port"] = openai_port
        router = self.router.model_copy(update=update)
        return self.model_copy(update={"router": router})

    @staticmethod
    def read_file(path: str | Path) -> dict[str, Any]:
        """The fields a YAML or JSON file sets, not validated yet (so a caller can see which
        it leaves out: ``serve`` fills in the bundled model when model_path is one)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of ClusterConfig fields")
        return data

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> ClusterConfig:
        """YAML or JSON file; ``overrides`` (e.g. model_path from the command line) win."""
        data = cls.read_file(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(data)
