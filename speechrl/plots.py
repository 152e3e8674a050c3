"""Figures of the evaluation report: WER per language, WER by error type, training curves.

Each function takes plain numbers (nested dicts of percentages, or rows of a metrics JSONL), so
it can be called without scoring anything. Plots are drawn on bare ``matplotlib.figure.Figure``
objects (Agg canvas), so producing a figure never changes the caller's pyplot backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

# Bars of the breakdown plot, bottom to top: insertions on top because they are the story.
_BREAKDOWN_PARTS = (
    ("sub_pct", "Substitutions", "#4C72B0"),
    ("del_pct", "Deletions", "#DD8452"),
    ("ins_pct", "Insertions", "#C44E52"),
)
# Keys of a metrics JSONL that are bookkeeping, not curves.
_NOT_CURVES = frozenset({"step", "epoch", "time", "timestamp", "wall_time", "elapsed"})
# speechrl's trainers log "train/..." and "dev/..." keys; plain names serve other loggers.
_CURVE_FIRST = ("train/reward_mean", "train/sample_wer", "dev/wer", "train/loss", "dev/loss",
                "train/kl", "train/zero_std_share", "reward_mean", "dev_wer", "loss", "kl")
_MAX_CURVES = 9


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
            ax.bar_label(bars, labels=[_bar_label(values.get(lang)) for lang in langs],
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


def _bar_label(value: float | None) -> str:
    # A missing WER is marked with a dash rather than left blank, as in the report's tables.
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.1f}"


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
