"""How many MTP draft tokens to propose per sequence this step. Pure Python.

Speculation pays when the extra tokens a step verifies cost less than the tokens it saves. Per
step, with ``B`` running sequences and ``k`` drafts each:

    tokens gained per sequence   E(k) = 1 + sum_{i=1..k} prod_{j<=i} a_j
    time of the step             T(k) = step_s(B * (k + 1)) + k * draft_s(B)

where ``a_j`` is the acceptance rate of draft position j given the earlier ones were accepted,
``step_s(n)`` the main model's time for n tokens and ``draft_s(B)`` one MTP pass. The policy picks
the k (0 = no drafting) with the most tokens per second ``B * E(k) / T(k)``, within the step's
token budget. Small batches are latency-bound (more tokens cost little) and favour drafting; large
ones are compute-bound and do not. When drafting stops paying, it pauses; every
``probe_interval_steps`` it drafts once anyway so the acceptance estimate stays current.

``StepCostModel`` learns ``step_s(n) = fixed + per_token * n`` from observed steps (exponentially
weighted least squares); ``AcceptanceTracker`` keeps the per-position rates the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DraftPolicyConfig:
    max_draft_tokens: int = 2
    """k at most (LG recommends 2 for K-EXAONE); 0 disables drafting."""
    max_step_tokens: int = 512
    """B * (k + 1) must fit the step's token budget."""
    min_gain: float = 1.05
    """Draft only when the best k beats no drafting by this factor (hysteresis against noise)."""
    probe_interval_steps: int = 64
    """While paused, draft once in this many steps to keep measuring acceptance."""

    def __post_init__(self):
        if self.max_draft_tokens < 0 or self.max_step_tokens < 1 or self.min_gain < 1.0:
            raise ValueError("max_draft_tokens >= 0, max_step_tokens >= 1, min_gain >= 1")
        if self.probe_interval_steps < 1:
            raise ValueError("probe_interval_steps must be >= 1")


def expected_tokens(acceptance: Sequence[float], k: int) -> float:
    """Tokens a sequence gains in a step with k drafts: the bonus token plus each accepted draft
    (position i counts only if every draft before it was accepted)."""
    total, run = 1.0, 1.0
    for a in list(acceptance)[:k]:
        run *= min(max(a, 0.0), 1.0)
        total += run
    return total


def choose_draft_length(
    num_seqs: int,
    acceptance: Sequence[float],
    step_s: Callable[[int], float],
    draft_s: Callable[[int], float],
    config: DraftPolicyConfig,
) -> int:
    """The k in [0, max_draft_tokens] with the best expected tokens per second."""
    if num_seqs < 1:
        return 0
    base = num_seqs / max(step_s(num_seqs), 1e-12)
    best_k, best = 0, base * config.min_gain
    for k in range(1, min(config.max_draft_tokens, len(acceptance)) + 1):
        if num_seqs * (k + 1) > config.max_step_tokens:
            break
        rate = (
            num_seqs
            * expected_tokens(acceptance, k)
            / max(step_s(num_seqs * (k + 1)) + k * draft_s(num_seqs), 1e-12)
        )
        if rate > best:
            best_k, best = k, rate
    return best_k


class StepCostModel:
    """``seconds(n) = fixed + per_token * n`` fitted to observed (n, seconds) pairs, newer
    observations weighing more (decay per observation)."""

    def __init__(
        self, decay: float = 0.98, prior_fixed_s: float = 0.01, prior_per_token_s: float = 0.001
    ):
        self.decay = decay
        self.prior = (prior_fixed_s, prior_per_token_s)
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, num_tokens: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + num_tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + num_tokens * num_tokens
        self._xy = d * self._xy + num_tokens * seconds

    @property
    def coefficients(self) -> tuple[float, float]:
        """(fixed seconds, seconds per token); the prior until two distinct sizes were seen."""
        if self._w == 0:
            return self.prior
        var = self._xx * self._w - self._x * self._x
        if var <= 1e-9 * max(self._xx * self._w, 1.0):
            mean_n, mean_s = self._x / self._w, self._y / self._w
            per = self.prior[1]
            return max(mean_s - per * mean_n, 0.0), per
        per = (self._xy * self._w - self._x * self._y) / var
        per = max(per, 0.0)
        fixed = max((self._y - per * self._x) / self._w, 0.0)
        return fixed, per

    def __call__(self, num_tokens: int) -> float:
        fixed, per = self.coefficients
        return fixed + per * num_tokens


class AcceptanceTracker:
    """Per-position conditional acceptance rates, exponentially weighted."""

    def __init__(self, max_positions: int, decay: float = 0.99, prior: float = 0.5):
        self.decay = decay
        self._num = [0.0] * max_positions
        self._den = [0.0] * max_positions
        self.prior = prior
        self.drafted = [0] * max_positions
        self.accepted = [0] * max_positions

    def observe(self, num_drafted: int, num_accepted: int) -> None:
        """One sequence's step: positions 1..num_drafted were proposed, the first num_accepted
        of them accepted. Position i counts only if every earlier one was accepted."""
        if not 0 <= num_accepted <= num_drafted <= len(self._num):
            raise ValueError(f"accepted {num_accepted} of {num_drafted} drafts")
        for i in range(min(num_accepted + 1, num_drafted)):
            ok = i < num_accepted
            self._num[i] = self.decay * self._num[i] + (1.0 if ok else 0.0)
            self._den[i] = self.decay * self._den[i] + 1.0
            self.drafted[i] += 1
            self.accepted[i] += int(ok)

    @property
    def rates(self) -> list[float]:
        return [n / d if d else self.prior for n, d in zip(self._num, self._den, strict=True)]


class DraftPolicy:
    """The stateful wrapper the engine calls once per step."""

    def __init__(
        self,
        config: DraftPolicyConfig,
        step_s: StepCostModel | None = None,
        draft_s: StepCostModel | None = None,
    ):
        self.config = config
        self.step_s = step_s or StepCostModel()
        self.draft_s = draft_s or StepCostModel(prior_fixed_s=0.002, prior_per_token_s=0.0002)
        self.acceptance = AcceptanceTracker(max(config.max_draft_tokens, 1))
        self._paused_steps = 0

    def draft_length(self, num_seqs: int) -> int:
        k = choose_draft_length(
            num_seqs, self.acceptance.rates, self.step_s, self.draft_s, self.config
        )
        if k > 0:
            self._paused_steps = 0
            return k
        self._paused_steps += 1
        fits = num_seqs * 2 <= self.config.max_step_tokens
        if (
            self.config.max_draft_tokens
            and fits
            and (self._paused_steps >= self.config.probe_interval_steps)
        ):
            self._paused_steps = 0
            return 1  # a probe: keeps the acceptance estimate current
        return 0
