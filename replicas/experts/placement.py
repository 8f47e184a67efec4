"""Which routed experts each expert group owns. Torch-free: the config and the router read it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    """``groups[g]`` = the expert ids group g owns (every expert exactly once)."""

    num_experts: int
    groups: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        seen: dict[int, int] = {}
        if not self.groups:
            raise ValueError("expert placement: at least one group is needed")
        for g, ids in enumerate(self.groups):
            if not ids:
                raise ValueError(f"expert group {g} owns no experts")
            for e in ids:
                if not 0 <= e < self.num_experts:
                    raise ValueError(
                        f"expert group {g}: expert id {e} not in [0, {self.num_experts})"
                    )
                if e in seen:
                    raise ValueError(f"expert {e} is in groups {seen[e]} and {g}: each once")
                seen[e] = g
        missing = sorted(set(range(self.num_experts)) - set(seen))
        if missing:
            raise ValueError(
                f"experts {missing[:8]}{'...' if len(missing) > 8 else ''} are in no group"
            )

    @classmethod
    def contiguous(cls, num_experts: int, num_groups: int) -> ExpertPlacement:
        """Group g owns [g * E / G, (g + 1) * E / G) (sizes differ by at most one)."""
        if not 1 <= num_groups <= num_experts:
            raise ValueError(f"num_groups={num_groups}: must be in [1, {num_experts}] (experts)")
        bounds = [num_experts * g // num_groups for g in range(num_groups + 1)]
        return cls(
            num_experts, tuple(tuple(range(bounds[g], bounds[g + 1])) for g in range(num_groups))
        )

    @classmethod
    def of(cls, num_experts: int, num_groups: int, expert_map: Sequence[Sequence[int]] | None):
        """An explicit map (one list of expert ids per group) or, without one, contiguous."""
        if expert_map is None:
            return cls.contiguous(num_experts, num_groups)
        if len(expert_map) != num_groups:
            raise ValueError(f"expert_map has {len(expert_map)} groups, num_groups is {num_groups}")
        return cls(num_experts, tuple(tuple(int(e) for e in ids) for ids in expert_map))

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_of(self) -> list[int]:
        """The group that owns each expert, indexed by expert id."""
        owner = [0] * self.num_experts
        for g, ids in enumerate(self.groups):
            for e in ids:
                owner[e] = g
        return owner


Holdings = tuple[tuple[int, ...], ...]
"""One MoE layer: ``holdings[g]`` = the sorted expert ids group g holds there."""


@dataclass(frozen=True)
class ExpertMap:
    """Which experts each group holds in each MoE layer, where a hot expert may be held by
    several groups (redundant copies; the dispatcher splits its tokens over them).

    ``layers[layer]`` (by model layer id) overrides ``default`` for that layer; ``version``
    grows with every rebalance, so a replica can tell which map a call was made with.
    """

    num_experts: int
    default: Holdings
    layers: tuple[tuple[int, Holdings], ...] = ()
    version: int = 0

    def __post_init__(self):
        for layer, holdings in ((None, self.default), *self.layers):
            where = "default" if layer is None else f"layer {layer}"
            if len(holdings) != len(self.default):
                raise ValueError(
                    f"expert map, {where}: {len(holdings)} groups, not {len(self.default)}"
                )
            copies = [0] * self.num_experts
            for g, ids in enumerate(holdings):
                if len(set(ids)) != len(ids) or not ids:
                    raise ValueError(
                        f"expert map, {where}: group {g} holds {list(ids)} (each "
                        "expert at most once, at least one expert)"
                    )
                for e in ids:
                    if not 0 <= e < self.num_experts:
                        raise ValueError(
                            f"expert map, {where}: expert id {e} not in [0, {self.num_experts})"
                        )
                    copies[e] += 1
            if 0 in copies:
                raise ValueError(f"expert map, {where}: expert {copies.index(0)} is in no group")

    @classmethod
    def of(cls, placement: ExpertPlacement) -> ExpertMap:
        """A static placement: every layer as ``placement.groups``, no copies."""
        return cls(placement.num_experts, placement.groups)

    @property
    def num_groups(self) -> int:
        return len(self.default)

    def holdings(self, layer: int) -> Holdings:
        return dict(self.layers).get(layer, self.default)

    def group_holdings(self, group: int, layers: Sequence[int]) -> dict[int, tuple[int, ...]]:
        """What group ``group`` holds in each of ``layers`` -> {layer: expert ids}."""
        return {layer: self.holdings(layer)[group] for layer in layers}

    def copies(self, layer: int) -> list[list[int]]:
        """The groups holding each expert in ``layer``, indexed by expert id."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for g, ids in enumerate(self.holdings(layer)):
            for e in ids:
                out[e].append(g)
        return out
