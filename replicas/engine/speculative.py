"""MTP self-speculative decoding around the engine's step: the MTP layer's KV cache gets each
step's verified positions, then every running request that sampled drafts up to ``spec_tokens``
tokens for the next step to verify (the policy may draft fewer, or none).

Verification is the sampler's (replicas.engine.sampler); the engine counts what was accepted.
"""

from __future__ import annotations

import time

import torch

from replicas.engine.draft_policy import DraftPolicy
from replicas.engine.kv_cache import HybridKVCache
from replicas.engine.request import Request
from replicas.engine.scheduler import Scheduler, SchedulerOutput
from replicas.kernels.attention_batch import SeqChunk
from replicas.model.exaone_moe import ExaoneMoeForCausalLM


class MtpDrafter:
    """The MTP side of one engine: ``fill`` after sampling, ``draft`` after the scheduler's
    update."""

    def __init__(
        self,
        model: ExaoneMoeForCausalLM,
        cache: HybridKVCache,
        scheduler: Scheduler,
        spec_tokens: int,
        max_model_len: int,
        policy: DraftPolicy | None,
    ):
        self.model, self.cache, self.scheduler = model, cache, scheduler
        self.spec_tokens, self.max_model_len, self.policy = spec_tokens, max_model_len, policy
        self.device = next(model.parameters()).device

    def fill(self, plan: SchedulerOutput, hidden: torch.Tensor, sampled):
        """The MTP's KV cache gets this step's verified positions: position p's main-model
        hidden state with the token at p + 1 (as vLLM feeds it). Runs before the prefix cache
        snapshots the step and before the scheduler updates it (requests may finish then).
        -> (d [M, H] the MTP outputs, [(request, row of d at its last verified position)] for
        the requests that sampled this step) or None."""
        seqs: list[SeqChunk] = []
        ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []
        last: list[tuple[Request, int]] = []
        offset = 0
        for c in plan.chunks:
            r = c.request
            tokens = sampled.get(r.request_id, [])
            n = c.num_verified(len(tokens))
            if not r.is_finished and n > 0:
                known = r.num_tokens  # before this step's tokens are appended
                rows.extend(range(offset, offset + n))
                positions.extend(range(c.start, c.start + n))
                following = r.token_at(c.start + 1, min(c.start + n + 1, known)) + tokens
                ids.extend(following[:n])
                seqs.append(SeqChunk(c.start, n, r.block_ids, r.scheduled_slot))
                if tokens:
                    last.append((r, len(ids) - 1))
            offset += c.num_new
        if not seqs:
            return None
        dev = self.device
        d = self.model.mtp_step(
            torch.tensor(ids, device=dev),
            hidden[rows],
            torch.tensor(positions, device=dev),
            self.cache.step(seqs),
            self.cache.mtp_layer,
        )
        return d, last

    def draft(self, filled) -> None:
        """After the scheduler's update: up to ``spec_tokens`` greedy drafts per running
        request that sampled this step, the first from its MTP output at its last verified
        position, the later ones from the MTP's own output (position + 1 each time), written
        to the spare positions the cache keeps for them."""
        if filled is None:
            return
        d, last = filled
        drafting = []
        for r, row in last:
            budget = min(
                self.spec_tokens,
                r.params.max_tokens - len(r.output_ids) - 1,
                self.max_model_len - r.num_tokens,
            )
            if not r.is_finished and budget > 0:
                drafting.append((r, row, budget))
        dev, mtp = self.device, self.cache.mtp_layer
        k = self.policy.draft_length(len(drafting)) if self.policy else self.spec_tokens
        drafting = [(r, row, min(budget, k)) for r, row, budget in drafting]
        if not drafting or not k:
            return
        started, num_seqs = time.perf_counter(), len(drafting)
        h = d[[row for _, row, _ in drafting]]  # [B, H]
        for j in range(k):
            picks = self.model.lm_head(h).argmax(-1).tolist()
            for (r, _, _), token in zip(drafting, picks, strict=True):
                r.draft_ids.append(token)
            # The next draft comes from (the MTP's own output, the draft just made) one position
            # on; a global MTP layer needs the blocks of that position.
            pos = [r.num_tokens - 2 + len(r.draft_ids) for r, _, _ in drafting]
            keep = [
                i
                for i, ((r, _, budget), p) in enumerate(zip(drafting, pos, strict=True))
                if budget > j + 1 and self.scheduler.reserve(r, p + 1)
            ]
            if not keep or j + 1 == k:
                if self.policy is not None:  # seconds per MTP pass over the batch
                    self.policy.draft_s.observe(num_seqs, (time.perf_counter() - started) / (j + 1))
                break
            drafting, pos, h = [drafting[i] for i in keep], [pos[i] for i in keep], h[keep]
            steps = [
                SeqChunk(p, 1, r.block_ids, r.scheduled_slot)
                for p, (r, _, _) in zip(pos, drafting, strict=True)
            ]
            h = self.model.mtp_step(
                torch.tensor([r.draft_ids[-1] for r, _, _ in drafting], device=dev),
                h,
                torch.tensor(pos, device=dev),
                self.cache.step(steps),
                mtp,
            )
