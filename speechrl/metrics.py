"""Alignment counts, WER / CER and hallucination figures.

One alignment serves rewards (paper eq. 7 and 9) and evaluation: :func:`error_counts` runs
jiwer's Levenshtein alignment (``jiwer.process_words``) over already-normalised text (see
:mod:`speechrl.text`) and keeps, per utterance, the hits, substitutions, deletions and insertions.

Empty references: jiwer before 4.0 rejects them, so they never reach it. Against an empty
reference every hypothesis word is an insertion, and a rate divides by ``max(N, 1)`` (N reference
words), so an utterance with an empty reference has WER equal to its insertion count, 0 when the
hypothesis is empty too. This is jiwer's own convention for a set without reference words, and it
keeps rewards finite.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer
import jiwer.transforms as jt

# The text is already normalised and its whitespace collapsed before it reaches jiwer, whose
# transforms then only cut it into words or characters.
_WORDS = jt.ReduceToListOfListOfWords()
_CHARS = jt.ReduceToListOfListOfChars()


@dataclass(frozen=True)
class ErrorCounts:
    """Counts from one alignment (or a sum of several). For character counts (:func:`cer_counts`)
    ``ref_words`` holds reference characters and ``wer`` is the character error rate."""

    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_words: int = 0

    @property
    def errors(self) -> int:
        """S + D + I."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """(S + D + I) / N, with N taken as 1 when the reference is empty (see module doc)."""
        return self.rate("errors")

    def rate(self, kind: str) -> float:
        """One count (``"substitutions"``, ``"deletions"``, ``"insertions"`` or ``"errors"``)
        over N, with N taken as 1 when the reference is empty."""
        return getattr(self, kind) / max(self.ref_words, 1)

    def __add__(self, other: ErrorCounts) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )

    def to_dict(self) -> dict[str, int | float]:
        """The counts plus ``errors`` and ``wer``, for JSON reports."""
        return {**dataclasses.asdict(self), "errors": self.errors, "wer": self.wer}


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if isinstance(refs, str) or isinstance(hyps, str):
        raise TypeError("refs and hyps must be lists of strings, not single strings")
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    for kind, texts in (("reference", refs), ("hypothesis", hyps)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{kind} {i} is {type(text).__name__}, not str")


def _counts(
    refs: Sequence[str], hyps: Sequence[str], transform: jt.AbstractTransform, by_char: bool
) -> tuple[list[ErrorCounts], ErrorCounts]:
    """Align the pairs whose reference is not empty with jiwer; fill in the others."""
    _check_pairs(refs, hyps)
    refs = [" ".join(ref.split()) for ref in refs]
    hyps = [" ".join(hyp.split()) for hyp in hyps]

    def units(text: str) -> int:
        return len(text) if by_char else len(text.split())

    per_utt = [ErrorCounts(insertions=units(hyp)) for hyp in hyps]
    aligned = [i for i, ref in enumerate(refs) if ref]
    if aligned:
        out = jiwer.process_words(
            [refs[i] for i in aligned],
            [hyps[i] for i in aligned],
            reference_transform=transform,
            hypothesis_transform=transform,
        )
        for i, chunks in zip(aligned, out.alignments, strict=True):
            per_utt[i] = _chunk_counts(chunks, units(refs[i]))
    return per_utt, sum(per_utt, ErrorCounts())


def _chunk_counts(chunks: list, ref_units: int) -> ErrorCounts:
    hits = subs = dels = ins = 0
    for chunk in chunks:
        ref_len = chunk.ref_end_idx - chunk.ref_start_idx
        if chunk.type == "equal":
            hits += ref_len
        elif chunk.type == "substitute":
            subs += ref_len
        elif chunk.type == "delete":
            dels += ref_len
        else:
            ins += chunk.hyp_end_idx - chunk.hyp_start_idx
    return ErrorCounts(hits, subs, dels, ins, ref_units)


def error_counts(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[ErrorCounts], ErrorCounts]:
    """Word-level counts per utterance and summed, on already-normalised text."""
    return _counts(refs, hyps, _WORDS, by_char=False)


def cer_counts(refs: Sequence[str], hyps: Sequence[str]) -> tuple[list[ErrorCounts], ErrorCounts]:
    """Character-level counts per utterance and summed. Words are joined by one space, which
    counts as a character (jiwer's convention); leading and trailing spaces do not."""
    return _counts(refs, hyps, _CHARS, by_char=True)


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus WER: summed errors over summed reference words."""
    return error_counts(refs, hyps)[1].wer


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus CER: summed character errors over summed reference characters."""
    return cer_counts(refs, hyps)[1].wer


def has_loop(words: Sequence[str], max_n: int = 4, min_repeats: int = 3) -> bool:
    """Whether some n-gram (1 <= n <= max_n) occurs ``min_repeats`` or more times in a row.

    An n-gram repeated k times in a row starting at i means words[j] == words[j + n] for
    every j in [i, i + (k - 1) n), so it is found as a run of (k - 1) n such equalities.
    """
    for n in range(1, max_n + 1):
        needed = (min_repeats - 1) * n
        run = 0
        for j in range(len(words) - n):
            run = run + 1 if words[j] == words[j + n] else 0
            if run >= needed:
                return True
    return False


def hallucination_stats(
    refs: Sequence[str], hyps: Sequence[str], counts: Sequence[ErrorCounts] | None = None
) -> dict[str, float]:
    """Hallucination figures of one set, on already-normalised text.

    - ``insertion_rate``: I / N over the set;
    - ``over_twice_share``: share of utterances whose hypothesis has more than twice the
      reference's words;
    - ``loop_share``: share of hypotheses with an n-gram of 1-4 words repeated 3+ times in a row;
    - ``empty_share``: share of empty hypotheses;
    - ``length_ratio``: mean over utterances with a non-empty reference of hyp words / ref words
      (NaN when every reference is empty);
    - ``output_share``: share of utterances with any hypothesis word (on clips with an empty
      reference, the share that hallucinate);
    - ``words_per_clip``: mean hypothesis words per utterance;
    - ``utterances``: how many utterances the figures are over.

    ``counts`` (per utterance, from :func:`error_counts`) avoids aligning the set a second time.
    """
    _check_pairs(refs, hyps)
    if not refs:
        raise ValueError("hallucination_stats needs at least one utterance")
    if counts is None:
        counts = error_counts(refs, hyps)[0]
    elif len(counts) != len(refs):
        raise ValueError(f"{len(counts)} counts for {len(refs)} utterances")
    hyp_words = [hyp.split() for hyp in hyps]
    ref_lens = [len(ref.split()) for ref in refs]
    total = sum(counts, ErrorCounts())
    ratios = [len(h) / r for h, r in zip(hyp_words, ref_lens, strict=True) if r > 0]
    over_twice = sum(len(h) > 2 * r for h, r in zip(hyp_words, ref_lens, strict=True))
    n = len(refs)
    return {
        "insertion_rate": total.rate("insertions"),
        "over_twice_share": over_twice / n,
        "loop_share": sum(has_loop(h) for h in hyp_words) / n,
        "empty_share": sum(not h for h in hyp_words) / n,
        "length_ratio": sum(ratios) / len(ratios) if ratios else math.nan,
        "output_share": sum(bool(h) for h in hyp_words) / n,
        "words_per_clip": sum(len(h) for h in hyp_words) / n,
        "utterances": float(n),
    }


# --------------------------------------------------------------------------- significance


@dataclass(frozen=True)
class Interval:
    """A change between two systems on the same utterances, with its paired bootstrap interval.

    ``delta`` is the change on the whole set (system B minus system A); ``low`` and ``high``
    bound the central ``level`` share of the resampled changes. The change is significant when
    the interval leaves out 0.
    """

    delta: float
    low: float
    high: float
    level: float = 0.95

    @property
    def significant(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def scaled(self, factor: float) -> Interval:
        return Interval(self.delta * factor, self.low * factor, self.high * factor, self.level)

    def to_dict(self) -> dict[str, float | bool | None]:
        """JSON-ready; an undefined change (NaN) becomes None."""
        def plain(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {"delta": plain(self.delta), "low": plain(self.low), "high": plain(self.high),
                "level": self.level, "significant": self.significant}


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                     den: Sequence[Sequence[float]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> list[Interval]:
    """Paired bootstrap intervals for changes in pooled ratios, one per column.

    ``a``, ``b``: per-utterance numerators (n, k) of systems A and B on the same n utterances;
    ``den``: their shared denominators (n, k), which depend on the references only (reference
    words for WER and its parts, 1 for a share of utterances). Column j's statistic is
    sum(num[:, j]) / sum(den[:, j]) and its change is that of B minus that of A, e.g. for WER
    (S + D + I summed) / (reference words summed).

    Each of ``resamples`` draws n utterances with replacement (the same draw for A and B, which
    is what makes it paired) and computes the change on the draw; the interval is the central
    ``level`` share of those changes (percentiles). A draw whose denominator sums to 0 is left
    out. Identical systems give [0, 0]; a fixed ``seed`` gives the same interval every time.
    """
    import numpy as np

    a, b, den = (np.asarray(x, dtype=np.float64) for x in (a, b, den))
    if a.ndim == 1:
        a, b, den = a[:, None], b[:, None], den[:, None]
    if not (a.shape == b.shape == den.shape) or a.ndim != 2:
        raise ValueError(f"a {a.shape}, b {b.shape} and den {den.shape} must all be (n, k)")
    n, k = a.shape
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one utterance")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"level must lie in (0, 1) and resamples be >= 1, got {level}, "
                         f"{resamples}")
    diff = b - a  # (n, k)
    total = den.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(total > 0, diff.sum(0) / np.where(total > 0, total, 1.0), np.nan)
    rng = np.random.default_rng(seed)
    # How often each utterance is drawn, per resample: (R, n), rows summing to n.
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    num_r, den_r = weights @ diff, weights @ den  # (R, k)
    intervals = []
    tail = 100.0 * (1.0 - level) / 2.0
    for j in range(k):
        ok = den_r[:, j] > 0
        if not ok.any() or math.isnan(delta[j]):
            intervals.append(Interval(math.nan, math.nan, math.nan, level))
            continue
        changes = num_r[ok, j] / den_r[ok, j]
        low, high = np.percentile(changes, [tail, 100.0 - tail])
        intervals.append(Interval(float(delta[j]), float(low), float(high), level))
    return intervals
