"""Offload correctness: are a warm round's answers the ones recomputation gives?

A tier that returns wrong bytes makes the warm round fast and wrong. Every measured
request decodes greedily (temperature 0, a fixed seed), so the answer to a prompt is a
function of its KV: the warm round's answer (KV loaded from the tier) must equal the
cold round's (KV computed). Engines are not bit-for-bit deterministic across batch
shapes, so the divergence that exists without any tier is measured too: a *control*
round recomputes the same prompts with a fresh ``cache_salt`` (vLLM keeps salted
requests apart in its prefix cache, LMCache's MP mode puts the salt in its keys), and
its answers are compared with the cold round's the same way.

The verdict is on the answers whose *first token* differs: that token is read straight
off the prompt's KV, loaded or computed. Later tokens also carry near-ties that flip
when the last chunk of a prompt is computed apart from its loaded prefix instead of in
one pass with it (on the vLLM CPU stack 2 of 16 honest answers differ from the 31st
character on, the same two in every run), which a full recomputation cannot reproduce;
bytes that are wrong change the first token. The check fails when the tier's share of
answers with another first token is significantly larger than the control's (one-sided
Fisher exact test at :data:`OUTPUT_ALPHA`) *and* larger by more than
:data:`OUTPUT_MARGIN`. Answers differing further on are counted and reported. See
docs/correctness.md.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from .models import RequestRecord, ScenarioCase, TrialResult

__all__ = ["CONTROL_ROUND", "OUTPUT_ALPHA", "OUTPUT_MARGIN", "OutputCheck", "Divergence", "check_outputs",
           "checks_outputs", "control_salt", "divergence", "first_difference", "output_digest",
           "why_not_checked"]

#: The name of the round that recomputes the cold round's prompts beside the tier.
CONTROL_ROUND = "control"
#: Significance of the one-sided exact test (tier diverges more than the control).
OUTPUT_ALPHA = 0.01
#: The tier's share of differing answers must exceed the control's by more than this.
OUTPUT_MARGIN = 0.05
#: Differing prompts named in a failure message (all of them are in the JSON).
_NAMED = 10


def output_digest(text: str) -> str:
    """What the item JSON keeps of an answer (the full text is in the outputs file)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def first_difference(a: str, b: str) -> int | None:
    """The first character position where ``a`` and ``b`` differ (None: equal)."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def control_salt(run_id: str, trial: int) -> str:
    """The control round's ``cache_salt``: new in every run and trial, so it never meets
    a cached prefix (of the tier, or of the engine's own cache)."""
    return f"kvcache-control-{run_id}-{trial}"


def checks_outputs(case: ScenarioCase, backend: str, wanted: bool | None) -> bool:
    """Whether ``case``'s answers on ``backend`` are checked: ``wanted`` (the option, else
    the scenario's ``check_outputs``), by default where answers are longer than one token;
    only an offload backend whose rounds start cold and come back has anything to check."""
    on = wanted if wanted is not None else case.check_outputs
    if on is None:
        on = case.output_len > 1
    return bool(on) and why_not_checked(case, backend) is None


def why_not_checked(case: ScenarioCase, backend: str) -> str | None:
    """Why ``case`` on ``backend`` has nothing to check (None: it has)."""
    if backend == "none":
        return "backend none has no tier: every round recomputes, nothing to check"
    if not case.rounds or case.rounds[0] != "cold" or len(case.rounds) < 2:
        return f"rounds {list(case.rounds)} do not start with a cold round followed by another: no reference"
    return None


@dataclass(frozen=True)
class Divergence:
    """Answers of one round against the cold round's, over every trial."""

    compared: int  # prompts answered in both rounds
    #: (trial, prompt index, first differing character, whether the first token differs)
    differing: tuple[tuple[int, int, int, bool], ...]

    @property
    def rate(self) -> float:
        """The share of answers that differ anywhere."""
        return len(self.differing) / self.compared if self.compared else 0.0

    @property
    def first_token(self) -> int:
        """Answers whose first token differs: what the verdict counts."""
        return sum(1 for *_, first in self.differing if first)

    @property
    def first_token_rate(self) -> float:
        return self.first_token / self.compared if self.compared else 0.0

    def to_dict(self) -> dict:
        return {"compared": self.compared, "differing": len(self.differing), "rate": self.rate,
                "first_token_differing": self.first_token, "first_token_rate": self.first_token_rate,
                "requests": [{"trial": t, "prompt": i, "first_difference": pos, "first_token": first}
                             for t, i, pos, first in self.differing]}


@dataclass(frozen=True)
class OutputCheck:
    """The check of one item's answers: ``status`` passed, failed, unchecked (it could
    not be made: ``reason``) or not_applicable (nothing to check: ``reason``)."""

    status: str
    reason: str = ""
    tier: dict[str, Divergence] = field(default_factory=dict)  # per warm round
    control: Divergence | None = None
    p_value: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "alpha": OUTPUT_ALPHA, "margin": OUTPUT_MARGIN,
                "p_value": self.p_value, "tier": {name: d.to_dict() for name, d in self.tier.items()},
                "control": self.control.to_dict() if self.control else None}


def _answers(trial: TrialResult, round_name: str) -> dict[int, RequestRecord] | None:
    rounds = [r for r in trial.rounds if r.round == round_name]
    if round_name == CONTROL_ROUND and trial.control is not None:
        rounds = [trial.control]
    if not rounds:
        return None
    return {r.index: r for r in rounds[0].records if r.success}


def divergence(trials: Sequence[TrialResult], round_name: str, reference: str = "cold") -> Divergence:
    """``round_name``'s answers against ``reference``'s, prompt by prompt, every trial."""
    compared, differing = 0, []
    for trial in trials:
        ref, other = _answers(trial, reference), _answers(trial, round_name)
        if ref is None or other is None:
            continue
        for index in sorted(ref.keys() & other.keys()):
            compared += 1
            a, b = ref[index], other[index]
            pos = first_difference(a.text, b.text)
            if pos is not None:  # the first token: the first streamed chunk's text (at least a character)
                differing.append((trial.index, index, pos, pos < max(1, a.first_chars, b.first_chars)))
    return Divergence(compared=compared, differing=tuple(differing))


def _exact_p(tier: Divergence, control: Divergence) -> float:
    """One-sided Fisher exact test: does the tier's round change the first token more often
    than the control does?"""
    from scipy.stats import fisher_exact

    table = [[tier.first_token, tier.compared - tier.first_token],
             [control.first_token, control.compared - control.first_token]]
    return float(fisher_exact(table, alternative="greater")[1])


def check_outputs(case: ScenarioCase, backend: str, trials: Sequence[TrialResult]) -> OutputCheck:
    """Each warm round's answers on ``backend`` against the cold round's, judged against
    the control's."""
    reason = why_not_checked(case, backend)
    if reason is not None:
        return OutputCheck(status="not_applicable", reason=reason)
    control = divergence(trials, CONTROL_ROUND)
    tier = {name: divergence(trials, name) for name in case.rounds[1:]}
    if not any(d.compared for d in tier.values()):
        return OutputCheck(status="unchecked", reason="no prompt was answered in both the cold and a later round",
                           tier=tier, control=control)
    if not control.compared:
        return OutputCheck(status="unchecked", tier=tier, control=control, reason=(
            "the control round (the same prompts with a fresh cache_salt, recomputed) got no answers; a server "
            "that refuses cache_salt cannot be checked (--no-kv-check-outputs turns the check off)"))
    worst_name, worst = max(tier.items(), key=lambda kv: (kv[1].first_token_rate, kv[1].rate, kv[0]))
    p = _exact_p(worst, control)
    if p < OUTPUT_ALPHA and worst.first_token_rate - control.first_token_rate > OUTPUT_MARGIN:
        return OutputCheck(status="failed", tier=tier, control=control, p_value=p,
                           reason=_failure(worst_name, worst, control, p))
    return OutputCheck(status="passed", tier=tier, control=control, p_value=p)


def _failure(round_name: str, tier: Divergence, control: Divergence, p: float) -> str:
    first = [(t, i, pos) for t, i, pos, is_first in tier.differing if is_first]
    named = ", ".join(f"trial {t + 1} prompt {i} (from character {pos})" for t, i, pos in first[:_NAMED])
    more = f" and {len(first) - _NAMED} more" if len(first) > _NAMED else ""
    return (f"wrong outputs from the tier: {tier.first_token} of {tier.compared} {round_name}-round answers start "
            f"with another token than the cold round's recomputation ({tier.first_token_rate:.0%}; "
            f"{len(tier.differing)} differ anywhere), against {control.first_token} of {control.compared} in the "
            f"control recomputation ({control.first_token_rate:.0%}; Fisher exact p={p:.2g}, margin "
            f"{OUTPUT_MARGIN:.0%}): {named}{more}")
