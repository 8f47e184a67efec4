"""Dispatch/combine between an attention replica and the expert groups (design.md decision 3).

``ExpertPlacement`` (replicas.experts.placement) says which routed experts each group owns, and
``ExpertMap`` which it holds per layer after rebalancing (copies of hot experts included).
``ExpertTransport`` is the small
interface a transport implements: send one group the hidden states of the tokens that chose its
experts, get back ``(slots, y)`` (the group's held slots and their unweighted expert outputs,
see ``RoutedExperts.compute``). ``ExpertDispatcher`` splits an ExpertCall by group and gathers
the answers into one ``ExpertRows``, which the model weights and sums exactly as in colocated
mode, so outputs do not depend on the number of groups. ``run_microbatches`` drives several
micro-batches of one step so that one micro-batch's attention runs while another's experts do
(ping-pong).

Transports: ``InProcessTransport`` (expert groups in this process: tests, benchmarks) and
``cluster.deployments.expert_transport.ServeHandleTransport`` (Ray Serve deployment handles).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from replicas.experts.placement import ExpertMap, ExpertPlacement
from replicas.model.moe import ExpertCall, ExpertRows


class ExpertResult(Protocol):
    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [S_g] long into the sub-batch's N_g * K slots, y [S_g, H]); blocks."""
        ...


class ExpertTransport(Protocol):
    placement: ExpertPlacement

    def submit(
        self, group: int, layer: int, x: torch.Tensor, topk_ids: torch.Tensor
    ) -> ExpertResult:
        """Start group ``group``'s experts of MoE layer ``layer`` on x [N_g, H] with
        topk_ids [N_g, K] (global ids); must not block on the answer."""
        ...


@dataclass
class _Done:
    value: tuple[torch.Tensor, torch.Tensor]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.value


class InProcessTransport:
    """Expert groups that live in this process (``groups[g].forward`` answers at once)."""

    def __init__(self, placement: ExpertPlacement, groups: Sequence):
        if len(groups) != placement.num_groups:
            raise ValueError(f"{len(groups)} groups given, placement has {placement.num_groups}")
        self.placement, self.groups = placement, list(groups)

    def submit(self, group, layer, x, topk_ids) -> ExpertResult:
        return _Done(self.groups[group].forward(layer, x, topk_ids))


class PendingCombine:
    """One ExpertCall in flight: the answers of every group it was sent to."""

    def __init__(self, call: ExpertCall, parts: list[tuple[torch.Tensor, ExpertResult]]):
        self.call, self.parts = call, parts

    def wait(self) -> ExpertRows:
        """-> every group's rows, by slot of the whole call (weighted later, as colocated)."""
        topk_ids = self.call.routing.topk_ids
        k = topk_ids.shape[1]
        parts = []
        for tokens, pending in self.parts:
            local_slots, y = pending.result()  # slots of the sub-batch of `tokens` (CPU)
            local_slots = local_slots.to(tokens.device)  # the activations' device (a GPU)
            slots = tokens.index_select(0, local_slots // k) * k + local_slots % k  # [S_g]
            parts.append((slots, None, y.to(self.call.x.device)))
        return ExpertRows.assemble(topk_ids.numel(), parts)


class ExpertDispatcher:
    """Splits each ExpertCall by group and combines the groups' answers.

    The map (``replicas.experts.placement.ExpertMap``) says which groups hold each expert in each
    layer. A slot goes to the group holding its expert; an expert held by several groups
    (copies of a hot expert) has its slots dealt over them in turn, in slot order. Each group
    gets the tokens with a slot for it, and their top-k ids with every slot that is not its
    own set to ``NO_EXPERT`` (the expert count), so every slot is computed exactly once.
    ``set_map`` takes a new map, which the next step adopts (``begin_step``).
    """

    def __init__(self, transport: ExpertTransport, expert_map: ExpertMap | None = None):
        self.transport = transport
        self.map = expert_map or ExpertMap.of(transport.placement)
        if self.map.num_groups != transport.placement.num_groups:
            raise ValueError(
                f"expert map has {self.map.num_groups} groups, the transport "
                f"{transport.placement.num_groups}"
            )
        self._pending: ExpertMap | None = None
        self._in_step = False
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slot_counts: dict[int, torch.Tensor] = {}  # on the activations' device: no sync

    @property
    def group_slots(self) -> dict[int, list[int]]:
        """{MoE layer: slots sent to each group since start} (for the imbalance metric)."""
        return {layer: counts.tolist() for layer, counts in list(self._slot_counts.items())}

    def set_map(self, expert_map: ExpertMap) -> None:
        """Use ``expert_map`` from the next step on (thread-safe: one reference swap)."""
        if expert_map.num_groups != self.map.num_groups:
            raise ValueError(
                f"expert map has {expert_map.num_groups} groups, not {self.map.num_groups}"
            )
        self._pending = expert_map

    def offer(self, expert_map: ExpertMap) -> None:
        """``set_map`` if ``expert_map`` is newer than the one in use or pending."""
        pending = self._pending
        newest = max(self.map.version, pending.version if pending is not None else -1)
        if expert_map.version > newest:
            self.set_map(expert_map)

    def begin_step(self) -> None:
        """Adopt a map given to ``set_map`` (called between engine steps)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending is not self.map:
            self.map, self._tables = pending, {}
        self._in_step = True

    def end_step(self) -> None:
        self._in_step = False

    @property
    def version_in_use(self) -> int:
        """The newest map version a step may still be using: a step in flight keeps the map it
        began with; any later step takes the one given to ``set_map``."""
        pending = self._pending
        if self._in_step or pending is None:
            return self.map.version
        return pending.version

    def _table(self, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (groups [E, C] holding each expert, padded with its first; copies [E])."""
        if layer not in self._tables:
            copies = self.map.copies(layer)
            width = max(map(len, copies))
            table = torch.tensor([c + c[:1] * (width - len(c)) for c in copies])
            self._tables[layer] = (table, torch.tensor([len(c) for c in copies]))
        table, counts = self._tables[layer]
        return table.to(device), counts.to(device)

    def owners(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [N, K] -> the group computing each slot [N, K]."""
        table, counts = self._table(layer, topk_ids.device)
        flat = topk_ids.flatten()  # [S]
        if table.shape[1] == 1:
            return table[flat, 0].view_as(topk_ids)
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, in slot order
        per_expert = torch.bincount(flat, minlength=table.shape[0])  # [E]
        starts = per_expert.cumsum(0) - per_expert  # [E] first sorted position of each expert
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        return table[flat, rank % counts[flat]].view_as(topk_ids)

    def submit(self, call: ExpertCall) -> PendingCombine:
        topk_ids = call.routing.topk_ids  # [N, K]
        owner = self.owners(call.layer, topk_ids)  # [N, K]
        sent = torch.bincount(owner.flatten(), minlength=self.map.num_groups)  # [G]
        total = self._slot_counts.get(call.layer)
        self._slot_counts[call.layer] = sent if total is None else total + sent  # a new tensor
        parts = []
        for g in torch.unique(owner).tolist():
            mine = owner == g  # [N, K]
            tokens = mine.any(1).nonzero()[:, 0]  # [N_g] tokens with a slot in g
            ids = torch.where(mine, topk_ids, self.map.num_experts)  # others' slots: NO_EXPERT
            if tokens.numel() == owner.shape[0]:
                x = call.x
            else:
                x, ids = call.x.index_select(0, tokens), ids.index_select(0, tokens)
            parts.append((tokens, self.transport.submit(g, call.layer, x, ids)))
        return PendingCombine(call, parts)


Stages = Generator[ExpertCall, ExpertRows, torch.Tensor]


def run_microbatches(stages: Sequence[Stages], dispatcher: ExpertDispatcher) -> list[torch.Tensor]:
    """Drive the step generators of several micro-batches (``model.step_layers``) to the end.

    Each one runs until its next MoE layer, sends its tokens to the experts and yields the
    core to the next; the oldest call in flight is awaited first. With two micro-batches, one's
    attention runs while the other's experts do. Returns each generator's hidden states.
    """
    results: list[torch.Tensor | None] = [None] * len(stages)
    in_flight: deque[tuple[int, PendingCombine]] = deque()

    def advance(i: int, rows: ExpertRows | None) -> None:
        try:
            call = next(stages[i]) if rows is None else stages[i].send(rows)
        except StopIteration as done:
            results[i] = done.value
            return
        in_flight.append((i, dispatcher.submit(call)))

    try:
        for i in range(len(stages)):
            advance(i, None)
        while in_flight:
            i, pending = in_flight.popleft()
            advance(i, pending.wait())
    finally:
        for s in stages:
            s.close()
    hidden = [r for r in results if r is not None]
    if len(hidden) != len(results):
        raise RuntimeError("a micro-batch's step ended without its hidden states")
    return hidden


def split_balanced(sizes: Sequence[int], parts: int) -> list[range]:
    """Split items (with token counts ``sizes``) into at most ``parts`` contiguous runs of about
    equal tokens, none empty."""
    parts = max(1, min(parts, len(sizes)))
    bounds: list[range] = []
    total, acc, start = sum(sizes), 0, 0
    for i, n in enumerate(sizes):
        acc += n
        remaining_items, remaining_parts = len(sizes) - i - 1, parts - len(bounds) - 1
        if remaining_parts and (
            acc * parts >= total * (len(bounds) + 1) or remaining_items == remaining_parts
        ):
            bounds.append(range(start, i + 1))
            start = i + 1
    bounds.append(range(start, len(sizes)))
    return [b for b in bounds if len(b)]
