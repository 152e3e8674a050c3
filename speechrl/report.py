"""Scoring of decoded test sets and the evaluation report (Markdown, JSON, hypotheses, PNG).

The paper's claims are about error types: GRPO cuts insertions (hallucinations) out of domain
(tables II-IV). This module turns decoded hypotheses into those numbers:

    records ──normalise (per language)──▶ align (metrics.error_counts) ──▶ SetScores
    {checkpoint: {set: records}} ──▶ report.md, report.json, hyps/*.jsonl, *.png

Every WER here is pooled over utterances (total errors / total reference words), as the paper's
"Overall" columns are, and Ins / Del / Sub are percentages of reference words, so
Ins + Del + Sub = WER. Relative change of a checkpoint against the first one is
100 * (WER - WER_first) / WER_first: negative is better. Every change against the first
checkpoint also carries a paired bootstrap 95 % interval over utterances
(:func:`speechrl.metrics.paired_bootstrap`), in points, and is called significant when the
interval leaves out 0. A set without reference words (the non-speech probe) has no WER: its
figures are the share of clips with any output and the words written per clip.

The changes and the findings are ``speechrl.report_changes``, the figures are drawn by
``speechrl.plots``, the Markdown by ``speechrl.report_markdown``; decoding a checkpoint into
records is ``speechrl.evaluate``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from operator import add
from pathlib import Path
from typing import Any

from speechrl.configio import from_dict
from speechrl.metrics import ErrorCounts, error_counts, hallucination_stats
from speechrl.plots import (
    plot_error_breakdown,
    plot_training_curves,
    plot_wer_by_language,
    read_metrics,
)
from speechrl.report_changes import (
    Changes,
    Finding,
    Pool,
    check_pools,
    finding_entry,
    pooled_changes,
)
from speechrl.text import get_normalizer

# What each name of speechrl.text.get_normalizer does, for the report's reader.
NORMALIZER_NOTES = {
    "whisper": "Whisper's English normaliser for English, its basic normaliser otherwise",
    "basic": "Whisper's basic normaliser for every language",
    "lower": "lower-case, punctuation removed",
    "none": "whitespace collapsed only",
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Hypothesis:
    """One decoded utterance: what the model wrote next to what was said."""

    id: str
    ref: str
    hyp: str
    language: str = "en"
    domain: str | None = None


@dataclass(frozen=True)
class ScoredUtterance:
    """A hypothesis with its normalised texts and its alignment counts."""

    hypothesis: Hypothesis
    ref_norm: str
    hyp_norm: str
    counts: ErrorCounts

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.hypothesis), "ref_norm": self.ref_norm,
                "hyp_norm": self.hyp_norm, "counts": self.counts.to_dict()}


@dataclass(frozen=True)
class SetScores:
    """One checkpoint on one test set: utterances, pooled counts and hallucination figures."""

    normalizer: str
    utterances: tuple[ScoredUtterance, ...]
    total: ErrorCounts
    by_language: dict[str, ErrorCounts]
    hallucination: dict[str, float | None]
    hallucination_by_language: dict[str, dict[str, float | None]]

    @property
    def languages(self) -> tuple[str, ...]:
        return tuple(sorted(self.by_language))

    @property
    def has_references(self) -> bool:
        """Whether the references hold any word (the non-speech probe's do not: no WER)."""
        return self.total.ref_words > 0


SECTION_KINDS = ("wer", "breakdown", "hallucination")


@dataclass(frozen=True)
class Section:
    """A paper-shaped table asked for by name of its sets; rows are checkpoints.

    kind "wer": WER per language of each set, plus an Overall column (tables II and IV).
    kind "breakdown": Ins / Del / Sub and WER of each set (table III).
    kind "hallucination": per set Ins / Del / Sub, WER, loops and hyp/ref length; for a set
    without reference words the share of clips with any output, words per clip and loops.
    Every row after the first also gets its changes against the first row, with intervals.
    """

    title: str
    sets: tuple[str, ...]
    kind: str = "wer"
    languages: tuple[str, ...] | None = None  # None: every language found in the set
    overall: bool = True  # "wer" only: an Overall column per set (the whole set, pooled)
    relative: bool = False  # add the relative WER change against the first row to each cell
    checkpoints: tuple[str, ...] | None = None  # rows, in this order; None: all of them

    def __post_init__(self) -> None:
        if self.kind not in SECTION_KINDS:
            raise ValueError(f"section {self.title!r}: kind must be one of "
                             f"{', '.join(repr(k) for k in SECTION_KINDS)}, got {self.kind!r}")
        if not self.sets:
            raise ValueError(f"section {self.title!r}: no sets given")
        for name in ("sets", "languages", "checkpoints"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"section {self.title!r}: {name} must be a list, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, tuple(value))

@dataclass(frozen=True)
class ReportPaths:
    markdown: Path
    json: Path
    hypotheses: tuple[Path, ...]
    plots: tuple[Path, ...]


# --------------------------------------------------------------------------- scoring


def _zero_counts() -> ErrorCounts:
    return ErrorCounts(hits=0, substitutions=0, deletions=0, insertions=0, ref_words=0)


def _sum_counts(counts: Sequence[ErrorCounts]) -> ErrorCounts:
    return reduce(add, counts, _zero_counts())


def score_set(records: Sequence[Hypothesis], normalizer: str) -> SetScores:
    """Normalise refs and hyps per language, align them, and pool the counts.

    ``normalizer`` names a normaliser of ``speechrl.text.get_normalizer``; it is chosen per
    record language, the same way rewards use it.
    """
    if not records:
        raise ValueError("score_set: no hypotheses to score")
    _check_unique_ids(records)
    normalisers: dict[str, Callable[[str], str]] = {}
    for r in records:
        if r.language not in normalisers:
            normalisers[r.language] = get_normalizer(normalizer, r.language)
    refs = [normalisers[r.language](r.ref) for r in records]
    hyps = [normalisers[r.language](r.hyp) for r in records]
    per_utterance, total = error_counts(refs, hyps)
    utterances = tuple(ScoredUtterance(r, ref, hyp, c)
                       for r, ref, hyp, c in zip(records, refs, hyps, per_utterance, strict=True))
    by_language: dict[str, ErrorCounts] = {}
    hallucination_by_language: dict[str, dict[str, float | None]] = {}
    for lang in sorted(normalisers):
        idx = [i for i, r in enumerate(records) if r.language == lang]
        by_language[lang] = _sum_counts([per_utterance[i] for i in idx])
        hallucination_by_language[lang] = _hallucination(
            [refs[i] for i in idx], [hyps[i] for i in idx], [per_utterance[i] for i in idx])
    return SetScores(normalizer, utterances, total, by_language,
                     _hallucination(refs, hyps, per_utterance), hallucination_by_language)


def _hallucination(refs: list[str], hyps: list[str],
                   counts: list[ErrorCounts]) -> dict[str, float | None]:
    # NaN (a length ratio over empty references only) becomes None, which JSON can hold.
    stats = hallucination_stats(refs, hyps, counts)
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in stats.items()}


def _check_unique_ids(records: Sequence[Hypothesis]) -> None:
    seen: set[str] = set()
    for r in records:
        if not isinstance(r, Hypothesis):
            raise TypeError(f"expected Hypothesis records, got {type(r).__name__}")
        if r.id in seen:
            raise ValueError(f"utterance id {r.id!r} appears twice in one set")
        seen.add(r.id)


def score_results(results: Mapping[str, Mapping[str, Sequence[Hypothesis]]],
                  normalizer: str) -> dict[str, dict[str, SetScores]]:
    """Score every checkpoint x set; checkpoints must have decoded the same utterances."""
    if not results:
        raise ValueError("no checkpoints to report on")
    scores: dict[str, dict[str, SetScores]] = {}
    ids: dict[str, tuple[str, set[str]]] = {}
    for ckpt, sets in results.items():
        if not sets:
            raise ValueError(f"checkpoint {ckpt!r} has no test sets")
        scores[ckpt] = {}
        for set_name, records in sets.items():
            _check_same_utterances(ids, ckpt, set_name, records)
            scores[ckpt][set_name] = score_set(records, normalizer)
    return scores


def _check_same_utterances(ids: dict[str, tuple[str, set[str]]], ckpt: str, set_name: str,
                           records: Sequence[Hypothesis]) -> None:
    # A relative WER change is only meaningful on the same utterances.
    these = {r.id for r in records}
    first_ckpt, first_ids = ids.setdefault(set_name, (ckpt, these))
    if these != first_ids:
        missing, extra = sorted(first_ids - these)[:3], sorted(these - first_ids)[:3]
        raise ValueError(
            f"set {set_name!r}: checkpoint {ckpt!r} decoded other utterances than "
            f"{first_ckpt!r} ({len(these)} vs {len(first_ids)}; missing e.g. {missing}, "
            f"extra e.g. {extra})")


def error_rates(counts: ErrorCounts) -> dict[str, float | None]:
    """WER and its parts as percentages of reference words (None without reference words)."""
    n = counts.ref_words
    if n == 0:
        return {"wer_pct": None, "ins_pct": None, "del_pct": None, "sub_pct": None}
    return {"wer_pct": 100.0 * counts.errors / n, "ins_pct": 100.0 * counts.insertions / n,
            "del_pct": 100.0 * counts.deletions / n, "sub_pct": 100.0 * counts.substitutions / n}


def relative_change(value: float | None, reference: float | None) -> float | None:
    """100 * (value - reference) / reference; None when undefined (missing or zero reference)."""
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * (value - reference) / reference


# --------------------------------------------------------------------------- report


def write_report(out_dir: str | Path,
                 results: Mapping[str, Mapping[str, Sequence[Hypothesis]]], *,
                 normalizer: str,
                 title: str = "speechrl evaluation",
                 training_metrics: Mapping[str, str | Path] | None = None,
                 sections: Sequence[Section | Mapping[str, Any]] | None = None,
                 curve_keys: Sequence[str] | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 findings: Sequence[Finding] = (),
                 pools: Sequence[Pool] = ()) -> ReportPaths:
    """Score ``results[checkpoint][set]`` and write the report into ``out_dir``.

    Writes ``report.md``, ``report.json`` (every number, the intervals included),
    ``hyps/<checkpoint>.<set>.jsonl``, ``wer_breakdown.png`` and, for each run in
    ``training_metrics`` (name -> metrics JSONL), ``curves_<run>.png`` with ``curve_keys``
    (default: the numeric keys found). The first checkpoint is the baseline of every change.
    ``provenance`` (JSON-ready: checkpoint paths, manifests, decoding settings, skipped rows)
    is written as it is, and shown at the top of the Markdown. Each of ``findings`` is checked
    and stated with its interval and verdict (:class:`Finding`); one whose checkpoints or set
    were not evaluated keeps its row, with the verdict "not evaluated". Each of ``pools``
    (runs of one configuration with different seeds, :class:`Pool`) gets its pooled change
    against the baseline on every set, with its interval and each run's own change.
    """
    from speechrl.report_markdown import render_markdown

    out = Path(out_dir)
    wanted = [s if isinstance(s, Section) else from_dict(Section, dict(s))
              for s in (sections or [])]
    scores = score_results(results, normalizer)
    _check_sections(wanted, scores)
    check_pools(pools, list(scores))
    runs = {run: (Path(path), read_metrics(path)) for run, path in (training_metrics or {}).items()}
    (out / "hyps").mkdir(parents=True, exist_ok=True)
    hyp_files = _write_hypotheses(out / "hyps", scores)
    plots = _write_plots(out, scores, title, runs, curve_keys)
    changes = Changes(scores)
    summary = _summary(scores, changes, title, normalizer, hyp_files, out)
    summary["provenance"] = dict(provenance or {})
    summary["sections"] = [_section_table(s, scores, changes) for s in wanted]
    summary["findings"] = [finding_entry(f, scores, changes) for f in findings]
    base = summary["reference_checkpoint"]
    summary["pools"] = [{"name": p.name, "members": list(p.members), "baseline": base,
                         **pooled_changes(p, base, scores, changes)} for p in pools]
    summary["plots"] = [{"file": p.name, "caption": c} for p, c in plots.items()]
    (out / "report.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    (out / "report.md").write_text(render_markdown(summary))
    return ReportPaths(out / "report.md", out / "report.json",
                       tuple(hyp_files.values()), tuple(plots))


def _write_plots(out: Path, scores: dict[str, dict[str, SetScores]], title: str,
                 runs: dict[str, tuple[Path, list[dict[str, Any]]]],
                 curve_keys: Sequence[str] | None) -> dict[Path, str]:
    """Every PNG of the report, each with the caption the Markdown gives it."""
    plots = {_plot_breakdown(out / "wer_breakdown.png", scores, title):
             "WER split into insertions, deletions and substitutions, per set and checkpoint"}
    if any(len(_set_languages(scores, name)) > 1 for name in _set_names(scores)):
        plots[_plot_languages(out / "wer_by_language.png", scores, title)] = \
            "WER per language of each multilingual set, per checkpoint"
    for run, (source, rows) in runs.items():
        target = out / f"curves_{_file_stem(run)}.png"
        if target in plots:
            raise ValueError(f"training run {run!r} maps to the file name {target.name} of "
                             f"another run; rename one of them")
        plots[plot_training_curves(rows, target, run=run, keys=curve_keys)] = \
            f"Training curves of run `{run}` ({source.name})"
    return plots


def _file_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "unnamed"


def _write_hypotheses(folder: Path,
                      scores: dict[str, dict[str, SetScores]]) -> dict[tuple[str, str], Path]:
    files: dict[tuple[str, str], Path] = {}
    for ckpt, sets in scores.items():
        for set_name, s in sets.items():
            path = folder / f"{_file_stem(ckpt)}.{_file_stem(set_name)}.jsonl"
            if path in files.values():
                raise ValueError(f"checkpoint {ckpt!r} and set {set_name!r} map to the file name "
                                 f"{path.name} of another pair; rename one of them")
            lines = (json.dumps(u.to_dict(), ensure_ascii=False) for u in s.utterances)
            path.write_text("\n".join(lines) + "\n")
            files[ckpt, set_name] = path
    return files


def _set_names(scores: dict[str, dict[str, SetScores]]) -> list[str]:
    return list(dict.fromkeys(name for sets in scores.values() for name in sets))


def _set_languages(scores: dict[str, dict[str, SetScores]], set_name: str) -> list[str]:
    return sorted({lang for sets in scores.values() if set_name in sets
                   for lang in sets[set_name].by_language})


def _counts_entry(counts: ErrorCounts, reference: ErrorCounts | None,
                  change: dict[str, Any] | None = None) -> dict[str, Any]:
    rates = error_rates(counts)
    ref_wer = error_rates(reference)["wer_pct"] if reference is not None else None
    return {**counts.to_dict(), **rates,
            "rel_wer_change_pct": relative_change(rates["wer_pct"], ref_wer),
            "change": change}


def _language_entries(s: SetScores, base: SetScores | None, changes: Changes, base_name: str,
                      ckpt: str, set_name: str) -> dict[str, dict[str, Any]]:
    entries = {}
    for lang, counts in s.by_language.items():
        n_utts = sum(u.hypothesis.language == lang for u in s.utterances)
        reference = base.by_language.get(lang) if base is not None else None
        change = changes.get(base_name, ckpt, set_name, (lang,)) if base is not None else None
        entries[lang] = {"utterances": n_utts, **_counts_entry(counts, reference, change)}
    return entries


def _summary(scores: dict[str, dict[str, SetScores]], changes: Changes, title: str,
             normalizer: str, hyp_files: dict[tuple[str, str], Path],
             out: Path) -> dict[str, Any]:
    ckpts = list(scores)
    first = scores[ckpts[0]]
    results: dict[str, Any] = {}
    for ckpt, sets in scores.items():
        results[ckpt] = {}
        for set_name, s in sets.items():
            base = first.get(set_name) if ckpt != ckpts[0] else None
            change = changes.get(ckpts[0], ckpt, set_name) if base is not None else None
            results[ckpt][set_name] = {
                "utterances": len(s.utterances),
                "has_references": s.has_references,
                "hypotheses": hyp_files[ckpt, set_name].relative_to(out).as_posix(),
                "overall": _counts_entry(s.total, base.total if base else None, change),
                "languages": _language_entries(s, base, changes, ckpts[0], ckpt, set_name),
                "hallucination": s.hallucination,
                "hallucination_by_language": s.hallucination_by_language,
            }
    return {"title": title, "normalizer": normalizer,
            "normalizer_description": NORMALIZER_NOTES.get(normalizer),
            "reference_checkpoint": ckpts[0],
            "checkpoints": ckpts, "sets": _set_names(scores), "results": results}


# --------------------------------------------------------------------------- sections


def _check_sections(sections: Sequence[Section], scores: dict[str, dict[str, SetScores]]) -> None:
    known_sets = _set_names(scores)
    for s in sections:
        for set_name in s.sets:
            if set_name not in known_sets:
                raise ValueError(f"section {s.title!r}: unknown set {set_name!r}; "
                                 f"the results hold {known_sets}")
        for ckpt in s.checkpoints or ():
            if ckpt not in scores:
                raise ValueError(f"section {s.title!r}: unknown checkpoint {ckpt!r}; "
                                 f"the results hold {list(scores)}")


def _section_counts(scores: dict[str, dict[str, SetScores]], ckpt: str, set_name: str,
                    languages: Sequence[str] | None) -> ErrorCounts | None:
    s = scores[ckpt].get(set_name)
    if s is None:
        return None
    if languages is None:
        return s.total
    present = [s.by_language[lang] for lang in languages if lang in s.by_language]
    return _sum_counts(present) if present else None


def _section_columns(section: Section,
                     scores: dict[str, dict[str, SetScores]]) -> list[tuple[str, str, Any]]:
    """(set, column label, languages to pool or None for the whole set) per column."""
    columns: list[tuple[str, str, Any]] = []
    for set_name in section.sets:
        if section.kind in ("breakdown", "hallucination"):
            columns.append((set_name, set_name, section.languages))
            continue
        for lang in section.languages or _set_languages(scores, set_name):
            columns.append((set_name, f"{set_name} {lang}", (lang,)))
        if section.overall:
            columns.append((set_name, f"{set_name} overall", None))
    return columns


def _section_table(section: Section, scores: dict[str, dict[str, SetScores]],
                   changes: Changes) -> dict[str, Any]:
    """A section as header + rows of cells, each cell the numbers behind it (for JSON and MD);
    a cell of a row after the first holds its ``change`` against the first row."""
    ckpts = list(section.checkpoints or scores)
    columns = _section_columns(section, scores)
    rows = []
    for ckpt in ckpts:
        cells = []
        for set_name, label, langs in columns:
            counts = _section_counts(scores, ckpt, set_name, langs)
            is_base = ckpt == ckpts[0]
            base = None if is_base else _section_counts(scores, ckpts[0], set_name, langs)
            change = None if is_base else changes.get(ckpts[0], ckpt, set_name, langs)
            cell = {"column": label, "set": set_name}
            if counts is not None:
                cell.update(_counts_entry(counts, base, change))
                cell["hallucination"] = _pooled_hallucination(scores[ckpt][set_name], langs)
                cell["has_references"] = counts.ref_words > 0
            cells.append(cell)
        rows.append({"checkpoint": ckpt, "cells": cells})
    return {**asdict(section), "columns": [label for _, label, _ in columns],
            "baseline": ckpts[0], "rows": rows}


def _pooled_hallucination(s: SetScores, languages: Sequence[str] | None) -> dict[str, Any]:
    """Hallucination figures of a set's utterances in ``languages`` (None: all of them)."""
    if languages is None:
        return s.hallucination
    chosen = [u for u in s.utterances if u.hypothesis.language in languages]
    return _hallucination([u.ref_norm for u in chosen], [u.hyp_norm for u in chosen],
                          [u.counts for u in chosen])


# --------------------------------------------------------------------------- figures


def _plot_breakdown(path: Path, scores: dict[str, dict[str, SetScores]], title: str) -> Path:
    breakdown = {set_name: {ckpt: error_rates(sets[set_name].total)
                            for ckpt, sets in scores.items() if set_name in sets}
                 for set_name in _set_names(scores)}
    return plot_error_breakdown(breakdown, path, title=f"{title}: WER by error type")


def _plot_languages(path: Path, scores: dict[str, dict[str, SetScores]], title: str) -> Path:
    per_set = {name: {ckpt: {**{lang: error_rates(c)["wer_pct"]
                                for lang, c in sets[name].by_language.items()},
                             "overall": error_rates(sets[name].total)["wer_pct"]}
                      for ckpt, sets in scores.items() if name in sets}
               for name in _set_names(scores) if len(_set_languages(scores, name)) > 1}
    return plot_wer_by_language(per_set, path, title=f"{title}: WER per language")
