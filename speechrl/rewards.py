"""Rule-based rewards for GRPO (paper section II-C, eq. 7-9) and their registry.

A reward function takes hypotheses and references, already normalised, and returns one float per
pair: ``fn(hyps: list[str], refs: list[str]) -> list[float]``. Built in:

- ``wer``: -(S + D + I) / N (eq. 7), the negated word error rate;
- ``em``:  1.0 when the hypothesis equals the reference word for word, else 0.0 (eq. 8);
- ``ed``:  -(S + D + I) (eq. 9), the negated word edit distance;
- ``sub``, ``del``, ``ins``: -S / N, -D / N, -I / N, the negated rates of one kind of error, so
  that ``wer`` equals ``sub+del+ins`` and ``wer+del`` makes a deleted word cost twice an
  inserted or substituted one (the -WER reward lets a model buy fewer insertions on degraded
  audio with deletions on clean speech at par).

:func:`build_reward` turns a spec into a :class:`Reward`, which normalises both sides with the
evaluation normaliser of each utterance's language first. A spec is a name (``"wer"``), a
weighted sum (``"0.7*wer+0.3*em"``), or an importable ``"package.module:function"`` with the
same signature as the built-ins, alone or inside a sum.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from speechrl.metrics import error_counts
from speechrl.text import NORMALIZERS, normalize_texts

RewardFn = Callable[[list[str], list[str]], list[float]]


def wer_reward(hyps: list[str], refs: list[str]) -> list[float]:
    """-(S + D + I) / N per pair (eq. 7); an empty reference divides by 1 (metrics module)."""
    per_utt, _ = error_counts(refs, hyps)
    return [-counts.wer for counts in per_utt]


def em_reward(hyps: list[str], refs: list[str]) -> list[float]:
    """1.0 when hypothesis and reference are the same words, else 0.0 (eq. 8)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    return [float(hyp.split() == ref.split()) for hyp, ref in zip(hyps, refs, strict=True)]


def ed_reward(hyps: list[str], refs: list[str]) -> list[float]:
    """-(S + D + I) per pair (eq. 9)."""
    per_utt, _ = error_counts(refs, hyps)
    return [-float(counts.errors) for counts in per_utt]


def _rate_reward(kind: str) -> RewardFn:
    def reward(hyps: list[str], refs: list[str]) -> list[float]:
        per_utt, _ = error_counts(refs, hyps)
        return [-counts.rate(kind) for counts in per_utt]

    reward.__name__ = f"{kind}_reward"
    reward.__doc__ = f"-{kind} / N per pair, N the reference words (1 for an empty reference)."
    return reward


sub_reward = _rate_reward("substitutions")
del_reward = _rate_reward("deletions")
ins_reward = _rate_reward("insertions")

REWARDS: dict[str, RewardFn] = {
    "wer": wer_reward, "em": em_reward, "ed": ed_reward,
    "sub": sub_reward, "del": del_reward, "ins": ins_reward,
}


def register_reward(name: str, fn: RewardFn) -> None:
    """Make ``fn`` available to specs under ``name``."""
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ValueError(f"reward name {name!r} must be an identifier")
    REWARDS[name] = fn


@dataclass(frozen=True)
class Reward:
    """A weighted sum of reward functions, applied after per-language normalisation.

    ``language`` is assumed for every pair when a call gives no ``languages``; ``None`` there
    means the language-independent normaliser (Whisper's basic one under "whisper").
    """

    spec: str
    terms: tuple[tuple[float, str, RewardFn], ...]  # (weight, name, function)
    normalizer: str = "whisper"
    language: str | None = None

    def normalize(
        self, texts: Sequence[str], languages: Sequence[str | None] | None = None
    ) -> list[str]:
        """``texts`` as the reward sees them."""
        return normalize_texts(
            list(texts), self.normalizer, self.language if languages is None else list(languages)
        )

    def __call__(
        self, hyps: Sequence[str], refs: Sequence[str], languages: Sequence[str] | None = None
    ) -> list[float]:
        """One reward per (hypothesis, reference) pair; ``languages`` gives each pair's."""
        if len(hyps) != len(refs):
            raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
        hyps_n = self.normalize(hyps, languages)
        refs_n = self.normalize(refs, languages)
        total = [0.0] * len(hyps_n)
        for weight, name, fn in self.terms:
            values = _checked(name, fn(hyps_n, refs_n), len(hyps_n))
            total = [t + weight * v for t, v in zip(total, values, strict=True)]
        return total


def _checked(name: str, values: Sequence[float], n: int) -> list[float]:
    # A user function that returns the wrong length or a NaN would silently corrupt the
    # advantages of a whole group; say which function did it.
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward {name!r} returned {len(values)} values for {n} pairs")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"reward {name!r} returned a value that is not finite: {values}")
    return out


_TERM = re.compile(
    r"\s*(?:(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?)\s*\*\s*)?"
    r"(?P<name>[A-Za-z_][\w.]*(?::[A-Za-z_]\w*)?)\s*"
)


def _resolve(name: str) -> RewardFn:
    if ":" in name:
        module_name, attr = name.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward {name!r}: cannot import module {module_name!r}") from err
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ValueError(f"reward {name!r}: {module_name} has no function {attr!r}")
        return fn
    if name not in REWARDS:
        raise ValueError(
            f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}, "
            "a weighted sum such as 0.7*wer+0.3*em, or package.module:function"
        )
    return REWARDS[name]


def parse_spec(spec: str) -> list[tuple[float, str]]:
    """``"0.7*wer+0.3*em"`` -> ``[(0.7, "wer"), (0.3, "em")]``; a bare name has weight 1."""
    terms = []
    for part in spec.split("+"):
        match = _TERM.fullmatch(part)
        if match is None or not part.strip():
            raise ValueError(
                f"cannot read reward term {part.strip()!r} in {spec!r}: expected "
                "[weight*]name, e.g. 0.7*wer+0.3*em or 2*my_pkg.rewards:score"
            )
        weight = float(match["weight"]) if match["weight"] else 1.0
        terms.append((weight, match["name"]))
    return terms


def build_reward(spec: str, normalizer: str = "whisper", language: str | None = None) -> Reward:
    """The :class:`Reward` for ``spec`` (see the module doc) after ``normalizer``."""
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normaliser {normalizer!r}; known: {', '.join(NORMALIZERS)}")
    terms = tuple((weight, name, _resolve(name)) for weight, name in parse_spec(spec))
    return Reward(spec=spec, terms=terms, normalizer=normalizer, language=language)
