"""The single-process engine every attention replica runs: schedule -> execute -> update.

Plain Python + torch, no Ray. ``add_request`` / ``step`` / ``abort``; each ``step`` returns the
new tokens (and log-probs) of every request that produced any, and which requests finished.
Stop strings need text, so they are handled by the caller that detokenizes
(``router.stream``), which aborts the request when one matches.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from replicas.engine import decode_native, decode_path
from replicas.engine.draft_policy import AcceptanceTracker, DraftPolicy, DraftPolicyConfig
from replicas.engine.kv_cache import HybridKVCache, kv_footprint
from replicas.engine.prefix_interface import PrefixCache, PrefixCacheSpec
from replicas.engine.prompt_logprobs import PromptLogprobState, collect_prompt_logprobs, top_pairs
from replicas.engine.request import Request
from replicas.engine.request_limits import RequestLimits
from replicas.engine.sampler import SamplingBatch, make_generator, sample
from replicas.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from replicas.engine.speculative import MtpDrafter
from replicas.experts.dispatch import ExpertDispatcher, run_microbatches, split_balanced
from replicas.kernels import backend as kernel_backend
from replicas.kernels.attention_batch import SeqChunk
from replicas.model.exaone_moe import ExaoneMoeForCausalLM
from replicas.model.moe import use_expert_kernels
from replicas.outputs import RequestOutput, StepFailedError, TokenLogprob
from replicas.sampling_params import SamplingParams

# Colocated bf16 steps on CPU of up to 64 rows run replicas.engine.decode_native (from C) and other
# decode steps replicas.engine.decode_path (the same bits as the module path, less time around the
# kernels); EXAONE_DECODE_PATH=0 keeps the module path for every step, for comparisons.
DECODE_PATH = os.environ.get("EXAONE_DECODE_PATH", "1") != "0"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30
    """Memory for global-layer KV blocks (sliding states are sized by max_num_seqs)."""
    num_blocks: int | None = None
    """Override the block count derived from kv_cache_bytes."""
    max_model_len: int | None = None
    """Context limit (prompt + output); default: the model's max_position_embeddings."""
    num_microbatches: int = 2
    """Micro-batches per step when the experts are remote (2 = ping-pong: one micro-batch's
    attention overlaps another's experts); 1 sends the whole step at once."""
    prefix_cache: PrefixCacheSpec | None = None
    """Reuse the KV state of shared prompt prefixes (None: off); a
    replicas.prefix_cache.manager.PrefixCacheConfig."""
    num_speculative_tokens: int = 0
    """MTP self-speculative decoding: draft tokens per sequence and step (0: off). Needs the
    model's MTP block; every step verifies the drafts of all running requests in one batch."""
    draft_policy: DraftPolicyConfig | None = None
    """Adaptive draft length (replicas.engine.draft_policy): each step drafts the k <= its
    max_draft_tokens with the best expected tokens/s for the batch, pausing when drafting does
    not pay (large batches, low acceptance). None: always num_speculative_tokens."""
    kernels: str = "torch"
    """Kernels for the routed experts and attention: auto, torch, triton or vllm
    (replicas.kernels.backend; the choice is logged when the engine starts)."""

    def __post_init__(self):
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        policy = self.draft_policy
        if policy is not None and policy.max_draft_tokens > self.num_speculative_tokens:
            raise ValueError(
                f"draft_policy.max_draft_tokens ({policy.max_draft_tokens}) exceeds "
                f"num_speculative_tokens ({self.num_speculative_tokens})"
            )


class LLMEngine:
    def __init__(
        self,
        model: ExaoneMoeForCausalLM,
        config: EngineConfig = EngineConfig(),
        eos_token_ids: Sequence[int] | None = None,
        experts: ExpertDispatcher | None = None,
        redis: Any = None,
    ):
        """``experts``: where the routed experts run when ``model`` holds none of them
        (disaggregated mode); None when the model holds them all (colocated).
        ``redis``: the shared tier of the prefix cache (a
        replicas.prefix_cache.redis_tier.RedisTier; needs config.prefix_cache)."""
        if redis is not None and config.prefix_cache is None:
            raise ValueError("a Redis tier needs EngineConfig.prefix_cache")
        cfg = model.cfg
        if model.experts_remote != (experts is not None):
            raise ValueError(
                "a model without routed experts needs an ExpertDispatcher, and only such a model"
            )
        self.model, self.config, self.experts = model, config, experts
        dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        per_token = kv_footprint(cfg, torch.finfo(dtype).bits // 8).global_bytes_per_token
        num_blocks = config.num_blocks or max(
            1, config.kv_cache_bytes // max(per_token * config.block_size, 1)
        )
        spec = config.prefix_cache
        pool = spec.new_block_pool(num_blocks) if spec is not None else None
        self.spec_tokens = config.num_speculative_tokens
        if self.spec_tokens and model.mtp is None:
            raise ValueError("speculative decoding needs the model's MTP block (include_mtp)")
        self.kernels = kernel_backend.choose(config.kernels, self.device)
        logger.info("engine kernels: %s (%s)", self.kernels.name, self.kernels.reason)
        use_expert_kernels(model, self.kernels.name)
        self.cache = HybridKVCache(
            cfg,
            num_blocks,
            config.block_size,
            config.max_num_seqs,
            dtype,
            self.device,
            pool,
            include_mtp=bool(self.spec_tokens),
            spec_tokens=self.spec_tokens,
            kernels=self.kernels.name,
        )
        self.prefix: PrefixCache | None = None
        if spec is not None:
            self.prefix = spec.attach(self.cache, pool, redis, dtype)
        sched = SchedulerConfig(
            config.max_num_batched_tokens, config.max_num_seqs, config.block_size
        )
        self.scheduler = Scheduler(sched, self.cache.blocks, self.cache.slots, self.prefix)
        self.eos_token_ids = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self._arrival = itertools.count()
        self._prompt_logprobs: dict[str, PromptLogprobState] = {}
        self.policy = DraftPolicy(config.draft_policy) if config.draft_policy else None
        self.acceptance = (
            self.policy.acceptance if self.policy else AcceptanceTracker(max(self.spec_tokens, 1))
        )
        """MTP drafts verified and accepted per draft position (``drafted`` / ``accepted``)."""
        self.drafter = None
        if self.spec_tokens:
            self.drafter = MtpDrafter(
                model, self.cache, self.scheduler, self.spec_tokens, self.max_model_len, self.policy
            )

    # ---- API -----------------------------------------------------------------------------------
    @property
    def limits(self) -> RequestLimits:
        """What a request must fit (check_request), as plain data."""
        return RequestLimits(
            self.model.cfg.vocab_size,
            self.max_model_len,
            self.config.block_size,
            self.cache.blocks.num_total,
        )

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise RequestRejectedError (a ValueError naming the field) if the request can never
        be served."""
        self.limits.check(prompt_ids, params)

    def add_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        pinned: bool = False,
    ) -> None:
        """Queue a request. Raises ValueError (naming the field) for invalid input.
        ``pinned``: its prefix-cache entries never expire (see pin_prefix)."""
        self.check_request(prompt_ids, params)
        request = Request(request_id, list(prompt_ids), params, next(self._arrival))
        request.arrival_time = time.monotonic()
        if params.seed is not None:
            request.generator = make_generator(params.seed, self.device)
        self.scheduler.add(request)
        if self.prefix is not None:
            self.prefix.on_add(request, params.prefix_boundaries, pinned)
        if params.prompt_logprobs is not None:
            self._prompt_logprobs[request_id] = PromptLogprobState()

    def pin_prefix(self, token_ids: Sequence[int]) -> None:
        """Register a prefix (e.g. a rendered system prompt) whose cache entries never expire:
        compute it now (or fetch it from Redis) and keep a snapshot at its end for every
        prompt that starts with it."""
        if self.prefix is None:
            raise ValueError("pinning a prefix needs the prefix cache (EngineConfig.prefix_cache)")
        ids = list(token_ids)
        if not ids:
            raise ValueError("a pinned prefix needs at least one token")
        self.prefix.pin(ids)
        # One extra token so the prefix itself is a boundary a hit can use.
        rid = f"pin-{next(self._arrival)}"
        self.add_request(
            rid, ids + [ids[-1]], SamplingParams(max_tokens=1, temperature=0.0), pinned=True
        )
        while self.has_unfinished_requests():
            self.step()

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its KV blocks return to the pool immediately."""
        self._prompt_logprobs.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_blocks_in_use(self) -> int:
        return self.cache.blocks.num_used

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.chunks:
            if self.prefix is not None:  # only Redis lookups outstanding: wait a little
                self.prefix.wait_any(self.scheduler.waiting, timeout_s=0.005)
            return []
        now = time.monotonic()
        for c in plan.chunks:
            if c.request.first_scheduled_time is None:
                c.request.first_scheduled_time = now
        try:
            for request in plan.restored:
                if self.prefix is None:
                    raise RuntimeError("a request was restored without a prefix cache")
                self.prefix.restore(request)
            started = time.perf_counter()
            hidden = self._execute(plan)  # [N, H]
            if self.policy is not None:
                self.policy.step_s.observe(plan.num_tokens, time.perf_counter() - started)
            sampled, outputs = self._sample(plan, hidden)
            filled = self.drafter.fill(plan, hidden, sampled) if self.drafter else None
            if self.prefix is not None:  # after the MTP, so snapshots hold its rows too
                for c in plan.chunks:
                    self.prefix.capture(c.request, c.start + c.num_new)
        except Exception as e:
            # The step may have written part of these sequences' KV: drop them, free blocks.
            ids = [c.request.request_id for c in plan.chunks]
            for request_id in ids:
                self.abort(request_id)
            raise StepFailedError(ids, e) from e
        before = {c.request.request_id: len(c.request.output_ids) for c in plan.chunks}
        finished = self.scheduler.update(plan, sampled, self.eos_token_ids)
        for c in plan.chunks:
            rid = c.request.request_id
            if rid not in sampled:
                continue
            kept = len(c.request.output_ids) - before[rid]  # tokens past a stop are dropped
            if rid in outputs and kept < len(outputs[rid].new_token_ids):
                out = outputs[rid]
                out.new_token_ids = out.new_token_ids[:kept]
                if out.logprobs is not None:
                    out.logprobs = out.logprobs[:kept]
            if c.num_drafts:
                accepted = len(sampled[rid]) - 1
                c.request.num_drafted_tokens += c.num_drafts
                c.request.num_accepted_draft_tokens += min(accepted, kept)
                self.acceptance.observe(c.num_drafts, accepted)
        if self.drafter is not None:
            self.drafter.draft(filled)
        for request in finished:
            out = outputs[request.request_id]
            out.finished, out.finish_reason = True, request.finish_reason
        requests = {c.request.request_id: c.request for c in plan.chunks}
        for out in outputs.values():
            r = requests[out.request_id]
            out.num_output_tokens = len(r.output_ids)
            out.num_drafted_tokens = r.num_drafted_tokens
            out.num_accepted_draft_tokens = r.num_accepted_draft_tokens
        return list(outputs.values())

    def _execute(self, plan: SchedulerOutput) -> torch.Tensor:
        if self.experts is None:
            ids, positions, backend = self._inputs(plan.chunks)
            if DECODE_PATH:
                hidden = decode_native.step_hidden(self.model, self.cache, ids, positions, backend)
                if hidden is not None:
                    return hidden
                if decode_path.applies(self.model, ids.shape[0], backend):
                    return decode_path.decode_hidden(self.model, ids, positions, backend)
            return self.model.step_hidden(ids, positions, backend)
        self.experts.begin_step()  # a new expert map takes effect between steps
        try:
            runs = split_balanced([c.num_new for c in plan.chunks], self.config.num_microbatches)
            stages = [
                self.model.step_layers(*self._inputs(plan.chunks[run.start : run.stop]))
                for run in runs
            ]
            return torch.cat(run_microbatches(stages, self.experts))  # [N, H], chunk order
        finally:
            self.experts.end_step()

    def _inputs(self, chunks: Sequence[ScheduledChunk]):
        """(input_ids [N], positions [N], attention backend) of these chunks."""
        ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqChunk] = []
        for c in chunks:
            r = c.request
            ids.extend(r.token_at(c.start, c.start + c.num_new))
            positions.extend(range(c.start, c.start + c.num_new))
            seqs.append(SeqChunk(c.start, c.num_new, r.block_ids, r.scheduled_slot))
        dev = self.device
        return (
            torch.tensor(ids, device=dev),
            torch.tensor(positions, device=dev),
            self.cache.step(seqs),
        )

    def _sample(self, plan: SchedulerOutput, hidden: torch.Tensor):
        """Sample every completing chunk's next token. A chunk with drafts d_1..d_k gets k + 1
        rows, the positions of its last known token and of each draft; row i is sampled as if
        d_1..d_i had been generated (penalties see them) and verifies d_{i+1}: greedy rows keep
        it when it is their argmax, sampled rows by rejection sampling (replicas.engine.sampler), so
        every token follows the main model's distribution. Drafts count while each row kept
        its draft; the row after the last kept one adds its own token."""
        rows: list[int] = []
        owners: list[tuple[Request, int]] = []  # (request, row i of its chunk)
        outputs: dict[str, RequestOutput] = {}
        offset = 0
        for c in plan.chunks:
            r = c.request
            if r.request_id in self._prompt_logprobs:
                collect_prompt_logprobs(
                    self.model.lm_head,
                    c,
                    hidden[offset : offset + c.num_new],
                    self._prompt_logprobs[r.request_id].entries,
                )
            if c.completes:
                last = offset + c.num_new - c.num_drafts - 1  # the last known token's row
                rows.extend(range(last, last + c.num_drafts + 1))
                owners.extend((r, i) for i in range(c.num_drafts + 1))
            offset += c.num_new
        sampled: dict[str, list[int]] = {}
        if not rows:
            return sampled, outputs
        logits = self.model.lm_head(hidden[rows])  # [S, V]
        batch = SamplingBatch(
            params=[r.params for r, _ in owners],
            output_ids=[r.output_ids + r.draft_ids[:i] if i else r.output_ids for r, i in owners],
            prompt_ids=[r.prompt_ids for r, _ in owners],
            generators=[r.generator for r, _ in owners],
            draft_ids=[r.draft_ids[i] if i < len(r.draft_ids) else None for r, i in owners],
        )
        result = sample(logits, batch)
        picks = result.token_ids.tolist()
        for j, (r, i) in enumerate(owners):
            if i and (i > len(sampled[r.request_id]) or picks[j - 1] != r.draft_ids[i - 1]):
                continue  # an earlier draft was rejected: this row does not count
            token = picks[j]
            sampled.setdefault(r.request_id, []).append(token)
            out = outputs.get(r.request_id)
            if out is None:
                out = outputs[r.request_id] = RequestOutput(
                    r.request_id,
                    [],
                    num_prompt_tokens=r.num_prompt_tokens,
                    queue_time_s=r.queue_time_s,
                    num_cached_tokens=r.num_cached_tokens,
                )
                state = self._prompt_logprobs.pop(r.request_id, None)
                if state is not None:
                    out.prompt_logprobs = state.entries
            out.new_token_ids.append(token)
            n_top = r.params.logprobs
            if n_top is not None and result.logprobs is not None:  # the sampler gave them
                top: tuple[tuple[int, float], ...] = ()
                if n_top and result.top_ids is not None and result.top_logprobs is not None:
                    top = top_pairs(result.top_ids[j, :n_top], result.top_logprobs[j, :n_top])
                out.logprobs = (out.logprobs or []) + [
                    TokenLogprob(token, float(result.logprobs[j]), top)
                ]
        return sampled, outputs

    # ---- convenience ---------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[int]]:
        """Run prompts to completion; returns the generated token ids of each, in order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [f"gen-{next(self._arrival)}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(rid, prompt, p)
        tokens: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                tokens[out.request_id].extend(out.new_token_ids)
        return [tokens[rid] for rid in ids]
