"""Changes of a checkpoint against the baseline, with paired bootstrap intervals, and the
paper's findings checked with them.

Every figure of :data:`CHANGE_FIGURES` is a pooled ratio of per-utterance numbers, so its
change between two checkpoints on the same utterances gets a paired bootstrap 95 % interval
over utterances (:func:`speechrl.metrics.paired_bootstrap`), in points for percentages, and is
significant when the interval leaves out 0. A :class:`Finding` is a "lower is better" claim
whose verdict follows from such a change. The scores come from ``speechrl.report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from speechrl.metrics import has_loop, paired_bootstrap

if TYPE_CHECKING:
    from speechrl.report import SetScores

# The figures whose change against the baseline gets an interval: key -> (label, scale). Each is
# a pooled ratio of per-utterance numbers (see _utterance_columns); scale 100 shows a percentage.
CHANGE_FIGURES: dict[str, tuple[str, float]] = {
    "wer_pct": ("WER", 100.0),
    "ins_pct": ("Ins", 100.0),
    "del_pct": ("Del", 100.0),
    "sub_pct": ("Sub", 100.0),
    "loop_pct": ("Loops", 100.0),
    "length_ratio": ("Hyp/ref length", 1.0),
    "output_pct": ("Clips with output", 100.0),
    "words_per_clip": ("Words per clip", 1.0),
}
# Those defined only where the references have words.
_NEEDS_REFERENCE_WORDS = ("wer_pct", "ins_pct", "del_pct", "sub_pct", "length_ratio")


# --------------------------------------------------------------------------- changes


def _utterance_columns(s: SetScores) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per utterance, the numerator and denominator of every figure of CHANGE_FIGURES, in
    the set's utterance order: pooled, sum(num) / sum(den) is the figure."""
    counts = [u.counts for u in s.utterances]
    ref_words = np.array([c.ref_words for c in counts], dtype=np.float64)
    hyp_words = np.array([len(u.hyp_norm.split()) for u in s.utterances], dtype=np.float64)
    ones = np.ones(len(counts))
    with_ref = (ref_words > 0).astype(np.float64)
    return {
        "wer_pct": (np.array([c.errors for c in counts], dtype=np.float64), ref_words),
        "ins_pct": (np.array([c.insertions for c in counts], dtype=np.float64), ref_words),
        "del_pct": (np.array([c.deletions for c in counts], dtype=np.float64), ref_words),
        "sub_pct": (np.array([c.substitutions for c in counts], dtype=np.float64), ref_words),
        "loop_pct": (np.array([has_loop(u.hyp_norm.split()) for u in s.utterances],
                              dtype=np.float64), ones),
        "length_ratio": (np.divide(hyp_words, ref_words, out=np.zeros_like(hyp_words),
                                   where=ref_words > 0), with_ref),
        "output_pct": ((hyp_words > 0).astype(np.float64), ones),
        "words_per_clip": (hyp_words, ones),
    }


class Changes:
    """Changes of each checkpoint (or pool of checkpoints) against a baseline on the same
    utterances, with their paired bootstrap intervals; computed once per (baseline,
    checkpoints, set, languages)."""

    def __init__(self, scores: dict[str, dict[str, SetScores]]) -> None:
        self.scores = scores
        self._cache: dict[tuple, dict[str, dict[str, Any]] | None] = {}

    def get(self, base: str, ckpt: str, set_name: str,
            languages: Sequence[str] | None = None) -> dict[str, dict[str, Any]] | None:
        """{figure: {"delta", "low", "high", "level", "significant"}} of ``ckpt`` minus
        ``base`` on ``set_name`` (pooled over ``languages``; None: the whole set), in the
        figures' units (points for percentages); None when either lacks the set or the
        languages hold no utterance. Figures undefined on the utterances are left out."""
        return self.pooled(base, (ckpt,), set_name, languages)

    def pooled(self, base: str, ckpts: Sequence[str], set_name: str,
               languages: Sequence[str] | None = None) -> dict[str, dict[str, Any]] | None:
        """As :meth:`get`, for the run whose per-utterance counts are the means of ``ckpts``'
        (a :class:`Pool`'s members); None when any of them lacks the set."""
        key = (base, tuple(ckpts), set_name,
               None if languages is None else tuple(sorted(languages)))
        if key not in self._cache:
            self._cache[key] = self._compute(base, key[1], set_name, key[3])
        return self._cache[key]

    def _compute(self, base: str, ckpts: tuple[str, ...], set_name: str,
                 languages: tuple[str, ...] | None) -> dict[str, dict[str, Any]] | None:
        a = self.scores[base].get(set_name)
        bs = [self.scores[c].get(set_name) for c in ckpts]
        if a is None or any(b is None for b in bs) or base in ckpts:
            return None
        keep = [i for i, u in enumerate(a.utterances)
                if languages is None or u.hypothesis.language in languages]
        if not keep:
            return None
        cols_a = _utterance_columns(a)
        has_words = cols_a["wer_pct"][1][keep].sum() > 0
        names = [k for k in CHANGE_FIGURES if has_words or k not in _NEEDS_REFERENCE_WORDS]
        mean_b = np.zeros((len(keep), len(names)))  # one run: exactly its own counts
        for b in bs:
            position = {u.hypothesis.id: i for i, u in enumerate(b.utterances)}
            paired = [position[a.utterances[i].hypothesis.id] for i in keep]
            cols_b = _utterance_columns(b)
            mean_b += np.stack([cols_b[k][0][paired] for k in names], axis=1) / len(bs)
        intervals = paired_bootstrap(
            np.stack([cols_a[k][0][keep] for k in names], axis=1), mean_b,
            np.stack([cols_a[k][1][keep] for k in names], axis=1))
        return {k: interval.scaled(CHANGE_FIGURES[k][1]).to_dict()
                for k, interval in zip(names, intervals, strict=True)}


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Finding:
    """A claim of the paper checked on the evaluation: ``checkpoint`` has a lower ``figure``
    (a key of CHANGE_FIGURES) than ``baseline`` on ``set_name``, by at least ``cut`` of the
    baseline's value (0.5: "by more than half"; 0: any drop). The report states the change with
    its paired bootstrap interval and a verdict: ``reproduced`` (significant, and at least the
    cut), ``partly`` (significant but short of the cut), ``noise`` (the interval holds 0) or
    ``opposite`` (significant, the other way)."""

    claim: str
    set_name: str
    figure: str
    checkpoint: str
    baseline: str
    cut: float = 0.0

    def __post_init__(self) -> None:
        if self.figure not in CHANGE_FIGURES:
            raise ValueError(f"finding {self.claim!r}: figure must be one of "
                             f"{', '.join(CHANGE_FIGURES)}, got {self.figure!r}")
        if not 0.0 <= self.cut < 1.0:
            raise ValueError(f"finding {self.claim!r}: cut {self.cut} must lie in [0, 1)")


def _figure_value(s: SetScores, figure: str) -> float | None:
    num, den = _utterance_columns(s)[figure]
    return float(num.sum() / den.sum() * CHANGE_FIGURES[figure][1]) if den.sum() > 0 else None


def finding_verdict(delta: float, low: float, high: float, base_value: float,
                    cut: float) -> str:
    """The verdict of a "lower is better" finding (:class:`Finding`) from its change."""
    if low <= 0.0 <= high:
        return "noise"
    if delta > 0:
        return "opposite"
    return "reproduced" if -delta >= cut * base_value else "partly"


def finding_entry(f: Finding, scores: dict[str, dict[str, SetScores]],
                  changes: Changes) -> dict[str, Any]:
    """The finding as it is written in report.json: its fields, both values, the change
    with its interval and the verdict ("not evaluated" when its checkpoints or set were not)."""
    entry: dict[str, Any] = {**asdict(f), "base_value": None, "value": None, "change": None,
                             "verdict": "not evaluated"}
    a = scores.get(f.baseline, {}).get(f.set_name)
    b = scores.get(f.checkpoint, {}).get(f.set_name)
    change = changes.get(f.baseline, f.checkpoint, f.set_name) if a and b else None
    c = (change or {}).get(f.figure)
    if c is None or c["delta"] is None:
        return entry
    entry.update(base_value=_figure_value(a, f.figure), value=_figure_value(b, f.figure),
                 change=c)
    entry["verdict"] = finding_verdict(c["delta"], c["low"], c["high"], entry["base_value"],
                                       f.cut)
    return entry


# --------------------------------------------------------------------------- seed pools


@dataclass(frozen=True)
class Pool:
    """Runs of one configuration that differ only in their seed, reported as one against the
    baseline: ``members`` name evaluated checkpoints (at least two), ``name`` the pool's row.

    The pooled run's per-utterance counts are the members' means, so its change is the mean of
    the members' changes, and its paired bootstrap interval over utterances holds for these
    runs together: it narrows as seeds are added only as far as their disagreement allows, and
    says nothing of where another seed would fall (each member's own change shows the spread)."""

    name: str
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.members, str):
            raise ValueError(f"pool {self.name!r}: members must be a list, got {self.members!r}")
        object.__setattr__(self, "members", tuple(self.members))
        if not self.name:
            raise ValueError("pool: give it a name: write NAME=CKPT,CKPT[,...]")
        if len(self.members) < 2:
            raise ValueError(f"pool {self.name!r}: pool at least two runs, got "
                             f"{list(self.members)}")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"pool {self.name!r}: a run is named twice in {list(self.members)}")

    def check(self, checkpoints: Sequence[str]) -> None:
        """Raise ValueError (one line) unless every member is among ``checkpoints`` (whose
        first is the baseline, which cannot be a member) and the name is not one of them."""
        unknown = [m for m in self.members if m not in checkpoints]
        if unknown:
            raise ValueError(f"pool {self.name!r}: {', '.join(unknown)} not among the "
                             f"checkpoints ({', '.join(checkpoints)})")
        if checkpoints and checkpoints[0] in self.members:
            raise ValueError(f"pool {self.name!r}: {checkpoints[0]} is the baseline the changes "
                             "are against; pool other runs")
        if self.name in checkpoints:
            raise ValueError(f"pool {self.name!r}: the name is taken by a checkpoint; name the "
                             "pool otherwise")


def check_pools(pools: Sequence[Pool], checkpoints: Sequence[str]) -> None:
    """Raise ValueError (one line, starting "pool") unless every pool holds among
    ``checkpoints`` (:meth:`Pool.check`) and no two share a name."""
    for pool in pools:
        pool.check(checkpoints)
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"pool: two pools share a name among {names}")


def pooled_changes(pool: Pool, base: str, scores: dict[str, dict[str, SetScores]],
                   changes: Changes) -> dict[str, Any]:
    """The pool against ``base`` on every set that the baseline and all members decoded, over
    the whole set (languages are not pooled apart): ``{"sets": {set: {"change": {figure:
    interval}, "members": {member: {figure: interval}}}}, "not_pooled": [sets some member did
    not decode]}``, in the figures' units (points for percentages)."""
    out: dict[str, Any] = {}
    not_pooled = []
    for set_name in scores[base]:
        change = changes.pooled(base, pool.members, set_name)
        if change is None:
            not_pooled.append(set_name)
            continue
        out[set_name] = {"change": change,
                         "members": {m: changes.get(base, m, set_name) for m in pool.members}}
    return {"sets": out, "not_pooled": not_pooled}
