"""Expert load balancing: which experts each group holds in each MoE layer, with
redundant copies of hot experts. A pure policy in the spirit of DeepSeek's EPLB; no Ray, no torch.

Given the tokens each expert served per MoE layer (``load[l][e]``) and a budget of expert slots
per group and layer, ``balance`` decides, layer by layer:

1. **Copies.** Every expert gets one copy; each spare slot goes to the expert with the most
   tokens per copy (a hot expert's tokens are split evenly over its copies by the dispatcher).
   No expert gets more copies than there are groups (two copies in one group would not help).
2. **Packing.** Copies go to groups heaviest first, each to the least loaded group that has a
   free slot and does not hold that expert yet, so groups end up with about equal token load.

``imbalance`` is what the autoscaler and the metrics report: every MoE layer waits for its
slowest group, so it is the sum over layers of the busiest group's tokens over the sum of the
mean group's tokens (1.0 = perfectly even).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

Holdings = tuple[tuple[int, ...], ...]
"""One MoE layer: ``holdings[g]`` = the sorted expert ids group g holds."""


def replicate(load: Sequence[float], num_slots: int, max_copies: int) -> list[int]:
    """Copies per expert: one each, then every spare slot to the expert with the highest load
    per copy (ties: the lower id), never more than ``max_copies``. Uses at most ``num_slots``."""
    n = len(load)
    if num_slots < n:
        raise ValueError(f"{num_slots} expert slots cannot hold {n} experts once each")
    copies = [1] * n
    heap = [(-float(w), e) for e, w in enumerate(load) if max_copies > 1]
    heapq.heapify(heap)
    for _ in range(num_slots - n):
        if not heap:
            break
        _, e = heapq.heappop(heap)
        copies[e] += 1
        if copies[e] < max_copies:
            heapq.heappush(heap, (-float(load[e]) / copies[e], e))
    return copies


def pack(
    load: Sequence[float], copies: Sequence[int], num_groups: int, slots_per_group: int
) -> Holdings:
    """Place every copy in a group: heaviest copies first, each to the least loaded group with a
    free slot that does not hold that expert yet. -> sorted expert ids per group."""
    if sum(copies) > num_groups * slots_per_group:
        raise ValueError(f"{sum(copies)} copies do not fit {num_groups} x {slots_per_group} slots")
    if max(copies) > num_groups:
        raise ValueError(f"an expert has {max(copies)} copies but there are {num_groups} groups")
    held: list[set[int]] = [set() for _ in range(num_groups)]
    weight = [0.0] * num_groups
    items = sorted(
        ((load[e] / copies[e], e) for e in range(len(copies)) for _ in range(copies[e])),
        key=lambda item: (-item[0], -copies[item[1]], item[1]),
    )
    for share, e in items:
        room = [g for g in range(num_groups) if len(held[g]) < slots_per_group]
        free = [g for g in room if e not in held[g]]
        if not free:  # only groups that hold e have room: make room elsewhere
            free = [_swap_into(held, weight, load, copies, e, room[0], slots_per_group)]
        g = min(free, key=lambda g: (weight[g], len(held[g]), g))
        held[g].add(e)
        weight[g] += share
    return tuple(tuple(sorted(ids)) for ids in held)


def _swap_into(
    held: list[set[int]],
    weight: list[float],
    load: Sequence[float],
    copies: Sequence[int],
    e: int,
    roomy: int,
    slots_per_group: int,
) -> int:
    """Move one expert from a full group without ``e`` to ``roomy`` (which holds e and has a
    free slot) -> the full group, which now has room for e. One always exists: were all of a
    full group's experts in ``roomy``, ``roomy`` (holding e too) would exceed its slots."""
    for g in range(len(held)):
        if g != roomy and e not in held[g] and len(held[g]) == slots_per_group:
            movable = sorted(held[g] - held[roomy])
            x = movable[0]
            held[g].remove(x)
            held[roomy].add(x)
            share = load[x] / copies[x]
            weight[g] -= share
            weight[roomy] += share
            return g
    raise AssertionError("unreachable: a full group without the expert exists")


def group_loads(holdings: Holdings, load: Sequence[float]) -> list[float]:
    """Tokens each group serves in one layer when every expert's tokens split evenly over its
    copies."""
    copies = [0] * len(load)
    for ids in holdings:
        for e in ids:
            copies[e] += 1
    return [sum(load[e] / copies[e] for e in ids) for ids in holdings]


def busiest_over_mean(per_layer: Iterable[Sequence[float]]) -> float:
    """[L][G] tokens per MoE layer and group -> sum over layers of the busiest group's over the
    sum of the mean group's (>= 1; 1.0 when there is no load)."""
    busiest = mean = 0.0
    for per_group in per_layer:
        if per_group:
            busiest += max(per_group)
            mean += sum(per_group) / len(per_group)
    return busiest / mean if mean > 0 else 1.0


def imbalance(layers: Sequence[Holdings], load: Sequence[Sequence[float]]) -> float:
    """``busiest_over_mean`` of the groups' loads when every expert's tokens split evenly over
    its copies."""
    pairs = zip(layers, load, strict=True)
    return busiest_over_mean(group_loads(holdings, layer_load) for holdings, layer_load in pairs)


def balance(
    load: Sequence[Sequence[float]], num_groups: int, slots_per_group: int
) -> tuple[Holdings, ...]:
    """Per MoE layer: copies of hot experts and their groups, from ``load[l][e]`` (tokens per
    expert). ``slots_per_group`` experts per group and layer; the spare slots beyond one copy
    of every expert hold redundant copies."""
    if num_groups < 1 or slots_per_group < 1:
        raise ValueError("balance: num_groups and slots_per_group must be at least 1")
    out = []
    for layer_load in load:
        copies = replicate(layer_load, num_groups * slots_per_group, num_groups)
        out.append(pack(layer_load, copies, num_groups, slots_per_group))
    return tuple(out)
