"""The decision: comparisons -> verdicts -> item judgement -> session gate (docs/statistics.md).

Everything that turns numbers into PASS / WARN / IMPROVED / FAIL lives here, pure and
without pytest; the session only turns a judgement into a pytest outcome.

Zones, for each compared metric:

* FAIL: significantly worse after the multiplicity correction *and* worse than the
  metric's practical threshold;
* WARN: worse beyond the threshold but not proven, or significantly worse but within
  the threshold, or not judged at all (too few baseline runs): a comparison that
  cannot be made never looks like a pass;
* IMPROVED: significantly better and better beyond the threshold (news, not a failure);
* PASS: otherwise.

An item fails with Bonferroni over every comparison the session planned (known when
collection ends); the session's exit status uses Holm over the p-values actually seen,
which is never stricter, so an item that failed always fails the gate. A suspicious
first run (:func:`needs_confirmation`) is measured again before it is judged.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # stats is imported where a comparison is judged: the history and the
    # reports read zones (this module) in runs that compare nothing
    from .stats import MetricComparison

__all__ = [
    "SCREEN_P",
    "Gate",
    "GateEntry",
    "ItemJudgement",
    "NightShift",
    "UpdatePlan",
    "Verdict",
    "Zone",
    "judge_item",
    "needs_confirmation",
    "night_shift",
    "plan_baseline_update",
    "session_gate",
    "verdict",
    "worst_zone",
]

#: A first run whose uncorrected p of being worse is at most this, and which is worse
#: by more than half a threshold, is confirmed by another run before it is judged
#: (docs/statistics.md, When a first run is confirmed).
SCREEN_P = 0.05


class Zone(str, enum.Enum):
    """The outcome of one comparison; the order of the members is worst first
    (docs/statistics.md, Zones)."""

    FAIL = "FAIL"
    WARN = "WARN"
    IMPROVED = "IMPROVED"
    PASS = "PASS"

    @classmethod
    def named(cls, word: str) -> Zone | None:
        """The zone a word of a report names ("FAIL", ...); None for any other word."""
        try:
            return cls(word)
        except ValueError:
            return None


def worst_zone(zones: Sequence[Zone]) -> Zone | None:
    """The worst of some zones (FAIL, then WARN, IMPROVED, PASS); None for none."""
    present = set(zones)
    return next((z for z in Zone if z in present), None)


@dataclass(frozen=True)
class Verdict:
    """The zone of one comparison after multiplicity correction, with a reason."""

    metric: str
    zone: Zone
    reason: str
    significant: bool  # significantly worse after correction
    beyond_threshold: bool  # point estimate worse than the practical threshold
    better: bool  # significantly better after correction
    p_worse_adjusted: float
    p_better_adjusted: float

    def to_dict(self) -> dict[str, object]:
        return {"metric": self.metric, "zone": self.zone.value, "reason": self.reason,
                "significant": self.significant, "beyond_threshold": self.beyond_threshold, "better": self.better,
                "p_worse_adjusted": self.p_worse_adjusted, "p_better_adjusted": self.p_better_adjusted}


def _fmt_p(p: float) -> str:
    if p < 0.001:
        return f"{p:.1e}"
    return f"{p:.3f}".rstrip("0").rstrip(".") if p < 1 else "1"


def verdict(c: MetricComparison, adjusted_p_worse: float, adjusted_p_better: float, *, alpha: float,
            correction: str = "Holm", paired: bool = False) -> Verdict:
    """The zone of ``c`` given its p-values after the multiplicity correction.

    ``paired``: the comparison is a candidate against a reference run interleaved with
    it (a design that expects the candidate to be better), so better is a PASS.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    for p in (adjusted_p_worse, adjusted_p_better):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"adjusted p-values must be in [0, 1], got {p!r}")
    significant = c.judged and adjusted_p_worse <= alpha
    better = c.judged and adjusted_p_better <= alpha and not significant
    beyond = c.beyond_threshold
    thr = f"{c.threshold * 100:g}%"
    worse = c.worse_pct
    against = "the reference" if paired else _baseline_words(c)
    after = f"after {correction}" if correction else "uncorrected"
    p_text = f"p={_fmt_p(adjusted_p_worse)} {after}"
    if not c.judged:
        zone = Zone.WARN
        word = "worse" if worse >= 0 else "better"
        reason = f"{c.metric} {abs(worse):.1f}% {word} than {against}, not judged: {c.note}"
    elif significant and beyond:
        zone = Zone.FAIL
        reason = f"{c.metric} {worse:.1f}% worse than {against} (threshold {thr}), {p_text}"
    elif better and c.better_beyond_threshold and not paired:
        zone = Zone.IMPROVED
        reason = (f"{c.metric} {-worse:.1f}% better than {against} (p={_fmt_p(adjusted_p_better)} {after}); "
                  "refresh the baseline when the change is intended (docs: refreshing baselines)")
    elif significant:
        zone = Zone.WARN
        reason = f"{c.metric} {worse:.1f}% worse than {against}, significant ({p_text}) but within the {thr} threshold"
    elif beyond:
        zone = Zone.WARN
        reason = f"{c.metric} {worse:.1f}% worse than {against} (threshold {thr}) but not proven ({p_text})"
        if c.note:
            reason += f"; {c.note}"
    else:
        zone = Zone.PASS
        word = "worse" if worse >= 0 else "better"
        reason = f"{c.metric} {abs(worse):.1f}% {word} than {against}, within noise and the {thr} threshold ({p_text})"
    return Verdict(metric=c.metric, zone=zone, reason=reason, significant=significant, beyond_threshold=beyond,
                   better=better, p_worse_adjusted=adjusted_p_worse, p_better_adjusted=adjusted_p_better)


def _baseline_words(c: MetricComparison) -> str:
    runs = c.runs_baseline
    return f"the baseline ({runs} run{'s' if runs != 1 else ''})"


# --------------------------------------------------------------------------- one item


def needs_confirmation(comparisons: Sequence[MetricComparison]) -> bool:
    """Whether an item's first run looks worse enough to be measured again first.

    Any judged comparison with an uncorrected ``p_worse <= SCREEN_P`` that is worse by
    more than half its threshold (on the log scale). Measuring again costs one run of
    the item; it is what lets the gate hold its false failures on runners whose runs
    are noisy and heavy-tailed (docs/statistics.md).
    """
    from .stats import threshold_log

    for c in comparisons:
        if not c.judged or c.runs_current > 1 or c.p_worse > SCREEN_P:
            continue
        worse_log = math.log(c.ratio) * c.direction.sign
        if worse_log > threshold_log(c.threshold, c.direction) / 2.0:
            return True
    return False


@dataclass(frozen=True)
class ItemJudgement:
    """The verdicts of one item's comparisons and the lines of its failure, if any."""

    verdicts: tuple[Verdict, ...]
    failures: tuple[str, ...]

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    @property
    def zone(self) -> Zone | None:
        return worst_zone([v.zone for v in self.verdicts])


def judge_item(comparisons: Sequence[MetricComparison], *, alpha: float, planned: int, paired: bool = False,
               software_change: str = "") -> ItemJudgement:
    """Verdicts with Bonferroni over the ``planned`` comparisons of the session.

    ``software_change`` ("vllm_version 0.11.0 -> 0.11.1") is named on each failure line.
    """
    planned = max(1, planned)
    correction = f"Bonferroni over {planned}"
    verdicts, failures = [], []
    for c in comparisons:
        v = verdict(c, min(1.0, c.p_worse * planned), min(1.0, c.p_better * planned), alpha=alpha,
                    correction=correction, paired=paired)
        verdicts.append(v)
        if v.zone is Zone.FAIL:
            failures.append(_failure_line(c, planned, software_change))
    return ItemJudgement(verdicts=tuple(verdicts), failures=tuple(failures))


def _failure_line(c: MetricComparison, planned: int, software_change: str) -> str:
    unit = " ms" if c.metric.endswith("_ms") else ""
    runs = f" ({c.runs_current} runs)" if c.runs_current > 1 else ""
    line = (f"{c.metric}: baseline {c.baseline_value:.4g}{unit} ({c.runs_baseline} runs), current "
            f"{c.current_value:.4g}{unit}{runs}, change {c.change_pct:+.1f}% (threshold {c.threshold * 100:g}%), "
            f"p={c.p_worse:.2g} (Bonferroni over {planned} planned comparisons)")
    if c.between_sd is not None:
        line += f"; run-to-run noise {c.between_sd * 100:.1f}%, trial noise {(c.within_sd or 0) * 100:.1f}%"
    if software_change:
        line += f"; software since the baseline: {software_change}"
    return line


# --------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class UpdatePlan:
    """What ``--update-baselines`` does with one item's run."""

    action: str  # "create" | "append" | "replace" | "refuse"
    message: str


def plan_baseline_update(comparisons: Sequence[MetricComparison], *, stored_runs: int, reset: bool, alpha: float,
                         planned: int, stored_summary: str = "") -> UpdatePlan:
    """Create, append, replace (stale runs) or refuse, from this run against the stored runs.

    ``comparisons`` compare this run with the ``stored_runs`` runs already stored
    (empty when there are none); ``stored_summary`` describes them for messages.
    A run the gate would fail is refused (a sick run never becomes a baseline, unless
    ``reset`` says so); a run significantly better beyond the threshold makes the
    stored runs stale, so they are replaced; otherwise the run joins them.
    """
    if reset:
        dropped = f"; replaced {stored_summary}" if stored_runs else ""
        return UpdatePlan("replace", f"baseline reset to this run{dropped}")
    if not stored_runs:
        return UpdatePlan("create", "baseline created from this run")
    judgement = judge_item(comparisons, alpha=alpha, planned=planned)
    if judgement.failed:
        return UpdatePlan("refuse", "baseline NOT updated: this run is worse than the stored runs:\n  "
                          + "\n  ".join(judgement.failures)
                          + "\n  if the change is intended, replace them with --reset-baselines")
    improved = [v for v in judgement.verdicts if v.zone is Zone.IMPROVED]
    if improved:
        why = improved[0].reason.split(";")[0]
        return UpdatePlan("replace", f"baseline refreshed: the stored runs are stale ({why}); dropped {stored_summary}")
    return UpdatePlan("append", "baseline updated: this run joins " + (stored_summary or f"{stored_runs} runs"))


# --------------------------------------------------------------------------- session


@dataclass(frozen=True)
class GateEntry:
    """What the gate needs of one item."""

    item: str
    comparisons: tuple[MetricComparison, ...]
    status: str  # compared | baseline-updated | skipped | failed | measured
    message: str = ""
    testbed_differs: bool = False


@dataclass(frozen=True)
class NightShift:
    """Every item of the session moved the same way by about the same factor."""

    comparisons: int
    items: int
    moved: int  # comparisons that moved in the common direction
    median_worse_pct: float  # the common move, in the bad direction (negative: better)
    spread_pct: float  # median absolute deviation of the moves around it

    @property
    def message(self) -> str:
        word = "worse" if self.median_worse_pct > 0 else "better"
        return (f"every item moved the same way: {self.moved} of {self.comparisons} comparisons over {self.items} "
                f"items are {word}, by {abs(self.median_worse_pct):.1f}% (median, spread {self.spread_pct:.1f}%); "
                "a machine or environment change is more likely than a code change in every item at once: "
                "check the runner (load, clocks, neighbours, labels) before the code")


def night_shift(comparisons: Sequence[tuple[str, MetricComparison]]) -> NightShift | None:
    """A session-wide move, when at least 80% of >= 6 judged comparisons over >= 3 items
    moved the same way, their median move is beyond twice their median noise, and the
    moves agree (spread under half the median): one factor, not many separate changes."""
    judged = [(item, c) for item, c in comparisons if c.judged and c.sd_log]
    if len(judged) < 6 or len({item for item, _ in judged}) < 3:
        return None
    moves = [math.log(c.ratio) * c.direction.sign for _, c in judged]
    centre = statistics.median(moves)
    noise = statistics.median(c.sd_log for _, c in judged if c.sd_log is not None)
    same = sum(1 for m in moves if m * centre > 0)
    spread = statistics.median(abs(m - centre) for m in moves)
    if same < 0.8 * len(moves) or abs(centre) <= 2.0 * noise or spread >= abs(centre) / 2.0:
        return None
    return NightShift(comparisons=len(moves), items=len({item for item, _ in judged}), moved=same,
                      median_worse_pct=math.expm1(centre) * 100.0, spread_pct=math.expm1(spread) * 100.0)


@dataclass(frozen=True)
class Gate:
    """The session's decision: Holm-adjusted p (the gate), BH-adjusted p (the report),
    the comparisons that fail, the items not compared and why, a session-wide move."""

    holm: tuple[float, ...]
    bh: tuple[float, ...]
    failing: tuple[str, ...]  # "item: metric" that fail after Holm
    not_compared: tuple[str, ...] = ()  # "item: why" (no baseline, another testbed, too few runs)
    testbed_differs: int = 0
    night: NightShift | None = None
    judged: int = 0  # comparisons the gate could judge

    @property
    def failed(self) -> bool:
        return bool(self.failing)


def session_gate(entries: Sequence[GateEntry], alpha: float) -> Gate:
    """Holm over every comparison of the session (BH for the report), in entry order;
    the items not compared as docs/statistics.md (What counts as unjudged) defines them."""
    from .stats import benjamini_hochberg, holm

    pairs = [(e.item, c) for e in entries for c in e.comparisons]
    worse = [c.p_worse for _, c in pairs]
    holm_worse, holm_better = holm(worse), holm([c.p_better for _, c in pairs])
    failing = tuple(f"{item}: {c.metric}" for (item, c), pw, pb in zip(pairs, holm_worse, holm_better)
                    if verdict(c, pw, pb, alpha=alpha).zone is Zone.FAIL)
    not_compared = []
    for e in entries:
        if e.status == "skipped" or (e.status == "failed" and not e.comparisons and e.testbed_differs):
            not_compared.append(f"{e.item}: {e.message.splitlines()[0] if e.message else e.status}")
        elif e.comparisons and not any(c.judged for c in e.comparisons):
            not_compared.append(f"{e.item}: not judged ({e.comparisons[0].note.split(';')[0]})")
    return Gate(holm=tuple(holm_worse), bh=tuple(benjamini_hochberg(worse)), failing=failing,
                not_compared=tuple(not_compared), testbed_differs=sum(1 for e in entries if e.testbed_differs),
                night=night_shift(pairs), judged=sum(1 for _, c in pairs if c.judged))
