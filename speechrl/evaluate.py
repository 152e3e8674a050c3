"""Scoring of decoded test sets and the evaluation report (Markdown, JSON, PNG).

The paper's claims are about error types: GRPO cuts insertions (hallucinations) out of domain
(tables II-IV). This module turns decoded hypotheses into those numbers:

    records ──normalise (per language)──▶ align (metrics.error_counts) ──▶ SetScores
    {checkpoint: {set: records}} ──▶ report.md, report.json, hyps/*.jsonl, *.png

Every WER here is pooled over utterances (total errors / total reference words), as the paper's
"Overall" columns are, and Ins / Del / Sub are percentages of reference words, so
Ins + Del + Sub = WER. Relative change of a checkpoint against the first one is
100 * (WER - WER_first) / WER_first: negative is better.

Plots are drawn on bare ``matplotlib.figure.Figure`` objects (Agg canvas), so producing a report
never changes the caller's pyplot backend.
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

from matplotlib.figure import Figure

from speechrl.config import from_dict
from speechrl.metrics import ErrorCounts, error_counts, hallucination_stats
from speechrl.text import get_normalizer

# Hallucination figures as shown in the report: key of metrics.hallucination_stats, column label,
# scale (fractions are shown as percentages, the length ratio as is).
HALLUCINATION_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("insertion_rate", "Ins. rate %", 100.0),
    ("over_twice_share", "Hyp > 2x ref words %", 100.0),
    ("loop_share", "Repeated n-gram loops %", 100.0),
    ("empty_share", "Empty outputs %", 100.0),
    ("length_ratio", "Hyp/ref length", 1.0),
)
# Bars of the breakdown plot, bottom to top: insertions on top because they are the story.
_BREAKDOWN_PARTS = (
    ("sub_pct", "Substitutions", "#4C72B0"),
    ("del_pct", "Deletions", "#DD8452"),
    ("ins_pct", "Insertions", "#C44E52"),
)
# Keys of a metrics JSONL that are bookkeeping, not curves.
_NOT_CURVES = frozenset({"step", "epoch", "time", "timestamp", "wall_time", "elapsed"})
_CURVE_FIRST = ("reward_mean", "dev_wer", "loss", "kl")
_MAX_CURVES = 9
_NA = "–"
# What each name of speechrl.text.get_normalizer does, for the report's reader.
_NORMALIZER_NOTES = {
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


@dataclass(frozen=True)
class Section:
    """A paper-shaped table asked for by name of its sets; rows are checkpoints.

    kind "wer": WER per language of each set, plus an Overall column (tables II and IV).
    kind "breakdown": Ins / Del / Sub and WER of each set (table III).
    """

    title: str
    sets: tuple[str, ...]
    kind: str = "wer"
    languages: tuple[str, ...] | None = None  # None: every language found in the set
    overall: bool = True  # "wer" only: an Overall column per set (the whole set, pooled)
    relative: bool = False  # add the relative WER change against the first row to each cell
    checkpoints: tuple[str, ...] | None = None  # rows, in this order; None: all of them

    def __post_init__(self) -> None:
        if self.kind not in ("wer", "breakdown"):
            raise ValueError(f"section {self.title!r}: kind must be 'wer' or 'breakdown', "
                             f"got {self.kind!r}")
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
                 curve_keys: Sequence[str] | None = None) -> ReportPaths:
    """Score ``results[checkpoint][set]`` and write the report into ``out_dir``.

    Writes ``report.md``, ``report.json`` (every number), ``hyps/<checkpoint>.<set>.jsonl``,
    ``wer_breakdown.png`` and, for each run in ``training_metrics`` (name -> metrics JSONL),
    ``curves_<run>.png`` with ``curve_keys`` (default: the numeric keys found). The first
    checkpoint is the reference of every relative WER change.
    """
    out = Path(out_dir)
    wanted = [s if isinstance(s, Section) else from_dict(Section, dict(s))
              for s in (sections or [])]
    scores = score_results(results, normalizer)
    _check_sections(wanted, scores)
    runs = {run: (Path(path), read_metrics(path)) for run, path in (training_metrics or {}).items()}
    (out / "hyps").mkdir(parents=True, exist_ok=True)
    hyp_files = _write_hypotheses(out / "hyps", scores)
    plots = _write_plots(out, scores, title, runs, curve_keys)
    summary = _summary(scores, title, normalizer, hyp_files, out)
    summary["sections"] = [_section_table(s, scores) for s in wanted]
    summary["plots"] = [{"file": p.name, "caption": c} for p, c in plots.items()]
    (out / "report.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    (out / "report.md").write_text(_markdown(summary))
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


def _counts_entry(counts: ErrorCounts, reference: ErrorCounts | None) -> dict[str, Any]:
    rates = error_rates(counts)
    ref_wer = error_rates(reference)["wer_pct"] if reference is not None else None
    return {**counts.to_dict(), **rates,
            "rel_wer_change_pct": relative_change(rates["wer_pct"], ref_wer)}


def _language_entries(s: SetScores, base: SetScores | None) -> dict[str, dict[str, Any]]:
    entries = {}
    for lang, counts in s.by_language.items():
        n_utts = sum(u.hypothesis.language == lang for u in s.utterances)
        reference = base.by_language.get(lang) if base is not None else None
        entries[lang] = {"utterances": n_utts, **_counts_entry(counts, reference)}
    return entries


def _summary(scores: dict[str, dict[str, SetScores]], title: str, normalizer: str,
             hyp_files: dict[tuple[str, str], Path], out: Path) -> dict[str, Any]:
    ckpts = list(scores)
    first = scores[ckpts[0]]
    results: dict[str, Any] = {}
    for ckpt, sets in scores.items():
        results[ckpt] = {}
        for set_name, s in sets.items():
            base = first.get(set_name) if ckpt != ckpts[0] else None
            results[ckpt][set_name] = {
                "utterances": len(s.utterances),
                "hypotheses": hyp_files[ckpt, set_name].relative_to(out).as_posix(),
                "overall": _counts_entry(s.total, base.total if base else None),
                "languages": _language_entries(s, base),
                "hallucination": s.hallucination,
                "hallucination_by_language": s.hallucination_by_language,
            }
    return {"title": title, "normalizer": normalizer,
            "normalizer_description": _NORMALIZER_NOTES.get(normalizer),
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
    """(set, column label, languages to pool or None for the whole set) per WER column."""
    columns: list[tuple[str, str, Any]] = []
    for set_name in section.sets:
        if section.kind == "breakdown":
            columns.append((set_name, set_name, section.languages))
            continue
        for lang in section.languages or _set_languages(scores, set_name):
            columns.append((set_name, f"{set_name} {lang}", (lang,)))
        if section.overall:
            columns.append((set_name, f"{set_name} overall", None))
    return columns


def _section_table(section: Section, scores: dict[str, dict[str, SetScores]]) -> dict[str, Any]:
    """A section as header + rows of cells, each cell the numbers behind it (for JSON and MD)."""
    ckpts = list(section.checkpoints or scores)
    columns = _section_columns(section, scores)
    rows = []
    for ckpt in ckpts:
        cells = []
        for set_name, label, langs in columns:
            counts = _section_counts(scores, ckpt, set_name, langs)
            base = _section_counts(scores, ckpts[0], set_name, langs) if ckpt != ckpts[0] else None
            cells.append({"column": label,
                          **(_counts_entry(counts, base) if counts is not None else {})})
        rows.append({"checkpoint": ckpt, "cells": cells})
    return {**asdict(section), "columns": [label for _, label, _ in columns], "rows": rows}


def _section_markdown(table: dict[str, Any]) -> str:
    breakdown = table["kind"] == "breakdown"
    header = ["Model"]
    for label in table["columns"]:
        header += [f"{label} Ins / Del / Sub", f"{label} WER"] if breakdown else [label]
    rows = []
    for row in table["rows"]:
        cells = [_escape(row["checkpoint"])]
        for cell in row["cells"]:
            wer = _fmt(cell.get("wer_pct"))
            if table["relative"] and cell.get("rel_wer_change_pct") is not None:
                wer += f" ({_fmt_rel(cell['rel_wer_change_pct'])})"
            if breakdown:
                parts = " / ".join(_fmt(cell.get(k), 1) for k in ("ins_pct", "del_pct", "sub_pct"))
                cells += [parts, wer]
            else:
                cells.append(wer)
        rows.append(cells)
    return f"### {table['title']}\n\n{_md_table(header, rows)}"


# --------------------------------------------------------------------------- markdown


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _NA
    return f"{value:.{digits}f}"


def _fmt_rel(value: float | None) -> str:
    if value is None:
        return _NA
    # A true minus sign reads better than a hyphen in tables.
    return f"{value:+.1f}%".replace("-", "−")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _set_markdown(set_name: str, summary: dict[str, Any], first: str) -> str:
    header = ["Checkpoint", "Language", "Utts", "Ref words", "WER %", "Ins %", "Del %", "Sub %",
              f"Rel. WER change vs {_escape(first)}"]
    rows = []
    per_ckpt = {c: r[set_name] for c, r in summary["results"].items() if set_name in r}
    langs = sorted({lang for r in per_ckpt.values() for lang in r["languages"]})
    # A single-language set is its own overall: no repeated rows.
    for lang in [*langs, None] if len(langs) > 1 else langs:
        for ckpt, r in per_ckpt.items():
            e = r["overall"] if lang is None else r["languages"].get(lang)
            if e is None:
                continue
            n_utts = r["utterances"] if lang is None else e["utterances"]
            rel = _NA if ckpt == first else _fmt_rel(e["rel_wer_change_pct"])
            rows.append([_escape(ckpt), lang or "**overall**", str(n_utts), str(e["ref_words"]),
                         _fmt(e["wer_pct"]), _fmt(e["ins_pct"]), _fmt(e["del_pct"]),
                         _fmt(e["sub_pct"]), rel])
    hall_header = ["Checkpoint"] + [label for _, label, _ in HALLUCINATION_COLUMNS]
    hall_rows = [[_escape(ckpt)] + [_fmt(_scaled(r["hallucination"].get(k), scale))
                                    for k, _, scale in HALLUCINATION_COLUMNS]
                 for ckpt, r in per_ckpt.items()]
    return (f"## Set `{set_name}`\n\n{_md_table(header, rows)}\n"
            f"Hallucination figures (all languages of the set):\n\n"
            f"{_md_table(hall_header, hall_rows)}")


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _markdown(summary: dict[str, Any]) -> str:
    first = summary["reference_checkpoint"]
    note = f" ({summary['normalizer_description']})" if summary["normalizer_description"] else ""
    parts = [
        f"# {summary['title']}\n",
        f"Text normaliser: `{summary['normalizer']}`{note}, applied per language to references and "
        f"hypotheses before alignment. WER, Ins, Del and Sub are percentages of reference words, "
        f"pooled over utterances (Ins + Del + Sub = WER). Relative WER change = "
        f"(WER - WER of `{first}`) / WER of `{first}`; negative is better.\n",
    ]
    if summary["sections"]:
        parts.append("## Summary tables\n")
        parts += [_section_markdown(t) for t in summary["sections"]]
    parts += [_set_markdown(name, summary, first) for name in summary["sets"]]
    parts.append("## Plots\n")
    parts += [f"{p['caption']}:\n\n![{p['caption']}]({p['file']})\n" for p in summary["plots"]]
    files = [r["hypotheses"] for sets in summary["results"].values() for r in sets.values()]
    parts.append("Hypotheses with their normalised forms and counts: "
                 + ", ".join(f"[{f}]({f})" for f in files) + ".\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- plots


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


def plot_wer_by_language(wer: Mapping[str, Mapping[str, Mapping[str, float | None]]],
                         path: str | Path, *, title: str) -> Path:
    """Grouped bars, a panel per set: languages along x, a bar per checkpoint, WER on each bar.

    ``wer[set][checkpoint][language]`` is a WER in percent (None or absent: no bar); a
    language called "overall" is drawn last.
    """
    if not wer:
        raise ValueError("plot_wer_by_language: no sets to plot")
    n_langs = max(len({lang for c in v.values() for lang in c}) for v in wer.values())
    n_ckpts = max(len(v) for v in wer.values())
    fig = Figure(figsize=(max(5.0, 0.45 * n_langs * n_ckpts + 2.0), 3.8 * len(wer) + 0.6),
                 layout="constrained")
    axes = fig.subplots(len(wer), 1, squeeze=False).ravel()
    for ax, (set_name, per_ckpt) in zip(axes, wer.items(), strict=True):
        found = {lang for c in per_ckpt.values() for lang in c}
        langs = sorted(found - {"overall"}) + (["overall"] if "overall" in found else [])
        width = 0.8 / len(per_ckpt)
        for k, (ckpt, values) in enumerate(per_ckpt.items()):
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(langs))]
            heights = [values.get(lang) or 0.0 for lang in langs]
            bars = ax.bar(xs, heights, width=width * 0.95, label=ckpt, color=_colour(k))
            ax.bar_label(bars, labels=[_fmt(values.get(lang), 1) for lang in langs],
                         fontsize=7, padding=2)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_xlabel("language")
        ax.set_ylabel("WER (%)")
        ax.set_title(f"set: {set_name}")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, n_ckpts))
    fig.suptitle(title, fontsize=13)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _colour(k: int) -> str:
    palette = ("#8C8C8C", "#4C72B0", "#55A868", "#C44E52", "#8172B3", "#CCB974", "#64B5CD")
    return palette[k % len(palette)]


def plot_error_breakdown(breakdown: Mapping[str, Mapping[str, Mapping[str, float | None]]],
                         path: str | Path, *, title: str) -> Path:
    """Stacked bars of Sub / Del / Ins (% of reference words) per checkpoint, a panel per set.

    ``breakdown[set][checkpoint]`` holds ``sub_pct``, ``del_pct``, ``ins_pct`` and ``wer_pct``;
    the total WER is written above each bar, each part inside it when tall enough to read.
    """
    if not breakdown:
        raise ValueError("plot_error_breakdown: no sets to plot")
    n_ckpts = max(len(v) for v in breakdown.values())
    ncols = min(3, len(breakdown))
    nrows = math.ceil(len(breakdown) / ncols)
    fig = Figure(figsize=(ncols * max(4.0, 1.1 * n_ckpts + 1.5), nrows * 4.2 + 0.6),
                 layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (set_name, per_ckpt) in zip(axes, breakdown.items(), strict=False):
        _breakdown_panel(ax, set_name, per_ckpt)
    for ax in axes[len(breakdown):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="outside lower center", ncols=3)
    fig.suptitle(title, fontsize=13)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _breakdown_panel(ax: Any, set_name: str, per_ckpt: Mapping[str, Mapping[str, Any]]) -> None:
    names = list(per_ckpt)
    x = list(range(len(names)))
    totals = [per_ckpt[c].get("wer_pct") or 0.0 for c in names]
    top = max(totals) or 1.0
    bottom = [0.0] * len(names)
    for key, label, color in _BREAKDOWN_PARTS:
        heights = [per_ckpt[c].get(key) or 0.0 for c in names]
        bars = ax.bar(x, heights, bottom=bottom, color=color, label=label, width=0.6)
        # Label a part only where it is tall enough for its digits to fit inside.
        ax.bar_label(bars, labels=[f"{h:.1f}" if h >= 0.07 * top else "" for h in heights],
                     label_type="center", color="white", fontsize=8)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for xi, total in zip(x, totals, strict=True):
        ax.annotate(f"WER {total:.1f}", (xi, total), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=9, fontweight="bold")
    ax.set_title(f"set: {set_name}")
    ax.set_ylabel("% of reference words")
    ax.set_ylim(0, top * 1.15)
    # Long checkpoint names ("+ GRPO (WER)") are tilted so neighbours do not overlap.
    tilted = max(len(n) for n in names) > 8
    ax.set_xticks(x, names, rotation=20 if tilted else 0, ha="right" if tilted else "center")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL (one JSON object a line; blank lines skipped)."""
    rows = []
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {line.strip()!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_keys_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric, non-bookkeeping keys of metrics rows: the usual ones first, at most nine."""
    found = list(dict.fromkeys(k for row in rows for k, v in row.items()
                               if _is_number(v) and k not in _NOT_CURVES))
    ordered = [k for k in _CURVE_FIRST if k in found] + [k for k in found if k not in _CURVE_FIRST]
    return ordered[:_MAX_CURVES]


def plot_training_curves(rows: Sequence[Mapping[str, Any]], path: str | Path, *, run: str,
                         keys: Sequence[str] | None = None) -> Path:
    """A panel per metric against ``step`` (or the row index when rows have no step).

    Rows lacking a key (e.g. ``dev_wer`` logged every few hundred steps) are skipped for that
    panel only; sparse series are drawn with markers.
    """
    keys = list(keys) if keys is not None else curve_keys_of(rows)
    present = {k for row in rows for k, v in row.items() if _is_number(v)}
    unknown = [k for k in keys if k not in present]
    if unknown or not keys:
        raise ValueError(f"run {run!r}: no numeric values for {unknown or 'any curve'}; "
                         f"numeric keys present: {sorted(present - _NOT_CURVES)}")
    has_step = all(_is_number(row.get("step")) for row in rows)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, key in zip(axes, keys, strict=False):
        points = [(row["step"] if has_step else i, row[key]) for i, row in enumerate(rows)
                  if _is_number(row.get(key))]
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=4, color="#4C72B0")
        ax.set_title(key)
        ax.set_xlabel("step" if has_step else "logged row")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"Training curves: {run}", fontsize=13)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


# --------------------------------------------------------------------------- decoding


def decode_manifest(model, manifest: str | Path, *, options, device, data_cfg=None,
                    desc: str = "") -> list[Hypothesis]:
    """Decode every readable utterance of a manifest (sorted by length, batched by duration).

    Rows that cannot be read are skipped and counted by the loader, never fatal.
    """
    import torch
    from tqdm.auto import tqdm

    from speechrl.config import DataConfig
    from speechrl.data import make_dataloader
    from speechrl.generate import generate

    data_cfg = data_cfg or DataConfig()
    loader = make_dataloader([str(manifest)], data_cfg, features=model.encoder.input_kind,
                             training=False)
    records: list[Hypothesis] = []
    model.eval()
    with torch.no_grad(), tqdm(total=len(loader), desc=desc or str(manifest),
                               dynamic_ncols=True, mininterval=2.0) as bar:
        for batch in loader:
            batch = batch.to(device)
            result = generate(model, batch.inputs, batch.input_lengths, options,
                              durations=batch.durations)
            G = options.num_return_sequences
            for i, utt_id in enumerate(batch.ids):
                records.append(Hypothesis(id=utt_id, ref=batch.texts[i], hyp=result.texts[i * G],
                                          language=batch.languages[i],
                                          domain=batch.domains[i] if batch.domains else None))
            bar.update(1)
    return records


def decoding_options(beam: int = 0, max_new_tokens: int = 128, tokens_per_second: float = 8.0):
    """Greedy by default (the paper's evaluation); beam search when ``beam`` > 1."""
    from speechrl.generate import DecodingOptions

    if beam > 1:
        return DecodingOptions(strategy="beam", num_beams=beam, max_new_tokens=max_new_tokens,
                               tokens_per_second=tokens_per_second)
    return DecodingOptions(strategy="greedy", max_new_tokens=max_new_tokens,
                           tokens_per_second=tokens_per_second)


def evaluate_checkpoints(checkpoints: Mapping[str, str | Path], sets: Mapping[str, str | Path],
                         out_dir: str | Path, *, normalizer: str = "whisper", beam: int = 0,
                         device: str = "auto", max_new_tokens: int = 128,
                         sections: Sequence[Section | Mapping[str, Any]] | None = None,
                         training_metrics: Mapping[str, str | Path] | None = None,
                         curve_keys: Sequence[str] | None = None,
                         title: str = "speechrl evaluation") -> ReportPaths:
    """Decode each set with each checkpoint and write the report; the first checkpoint is the
    baseline of the relative WER changes."""
    from speechrl.checkpoint import load_model
    from speechrl.train.common import resolve_device, say

    dev = resolve_device(device)
    options = decoding_options(beam, max_new_tokens)
    results: dict[str, dict[str, list[Hypothesis]]] = {}
    for name, path in checkpoints.items():
        model = load_model(path, device=dev)
        results[name] = {set_name: decode_manifest(model, manifest, options=options, device=dev,
                                                   desc=f"{name} / {set_name}")
                         for set_name, manifest in sets.items()}
        del model
    paths = write_report(out_dir, results, normalizer=normalizer, title=title,
                         training_metrics=training_metrics, sections=sections,
                         curve_keys=curve_keys)
    say(f"report: {paths.markdown}")
    return paths


def add_eval_arguments(parser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a checkpoint folder; repeat for several (the first is the baseline); "
                             "NAME=PATH names it in the report")
    parser.add_argument("--data", action="append", required=True,
                        help="a manifest (JSONL or Lhotse .jsonl.gz); repeat for several; "
                             "NAME=PATH names the set")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json, plots")
    parser.add_argument("--beam", type=int, default=0, help="beam width; 0 decodes greedily")
    parser.add_argument("--normalizer", default="whisper",
                        choices=["whisper", "basic", "lower", "none"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--metrics", action="append", default=[],
                        help="NAME=metrics.jsonl of a training run, plotted as curves")


def _named(items: Sequence[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, _, path = item.rpartition("=")
        if not name:
            path = item
            name = Path(item.rstrip("/")).name
            if name.endswith(".jsonl.gz"):
                name = name[: -len(".jsonl.gz")]
            name = name.removesuffix(".jsonl")
        if name in named:
            raise ValueError(f"two inputs are both called {name!r}: name them NAME=PATH")
        named[name] = path
    return named


def eval_main(args) -> int:
    paths = evaluate_checkpoints(_named(args.checkpoint), _named(args.data), args.out,
                                 normalizer=args.normalizer, beam=args.beam, device=args.device,
                                 max_new_tokens=args.max_new_tokens,
                                 training_metrics=_named(args.metrics) or None)
    print(f"eval done: {paths.markdown}")
    return 0


def transcribe_files(checkpoint: str | Path, files: Sequence[str], *, beam: int = 0,
                     device: str = "auto"):
    """Yield (path, transcript) for each audio file, one at a time."""
    import torch

    from speechrl.checkpoint import load_model
    from speechrl.data import features_for_files
    from speechrl.generate import generate
    from speechrl.train.common import resolve_device

    dev = resolve_device(device)
    model = load_model(checkpoint, device=dev).eval()
    options = decoding_options(beam)
    for path in files:
        inputs, lengths, durations = features_for_files([path], model.encoder.input_kind)
        with torch.no_grad():
            result = generate(model, inputs.to(dev), lengths.to(dev), options,
                              durations=durations.to(dev))
        yield path, result.texts[0]
