"""``report.md``: the evaluation report of :func:`speechrl.report.write_report` as Markdown.

Everything shown comes from the summary that ``report.json`` holds, so the two never disagree.
Changes against the baseline are printed in points (percentage points for percentages) with
their paired bootstrap 95 % interval, e.g. ``−1.20 [−2.01, −0.40]*``; the star marks a change
whose interval leaves out 0.
"""

from __future__ import annotations

import math
from typing import Any

from speechrl.report_changes import CHANGE_FIGURES

_NA = "–"
_SIGNIFICANT = "*"
# Hallucination figures of a set with references: key of metrics.hallucination_stats, label,
# scale (fractions are shown as percentages, the length ratio as is).
HALLUCINATION_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("insertion_rate", "Ins. rate %", 100.0),
    ("over_twice_share", "Hyp > 2x ref words %", 100.0),
    ("loop_share", "Repeated n-gram loops %", 100.0),
    ("empty_share", "Empty outputs %", 100.0),
    ("length_ratio", "Hyp/ref length", 1.0),
)
# ... and of a set without reference words, where WER is undefined.
NO_REFERENCE_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("output_share", "Clips with output %", 100.0),
    ("words_per_clip", "Words per clip", 1.0),
    ("loop_share", "Repeated n-gram loops %", 100.0),
)
_UNDEFINED_WER = ("WER is undefined here: the references hold no words, so every word written is "
                  "an insertion. The figures are the share of clips with any output and the words "
                  "written per clip.")


def render_markdown(summary: dict[str, Any]) -> str:
    first = summary["reference_checkpoint"]
    note = f" ({summary['normalizer_description']})" if summary["normalizer_description"] else ""
    parts = [
        f"# {summary['title']}\n",
        f"Text normaliser: `{summary['normalizer']}`{note}, applied per language to references and "
        f"hypotheses before alignment. WER, Ins, Del and Sub are percentages of reference words, "
        f"pooled over utterances (Ins + Del + Sub = WER). Relative WER change = "
        f"(WER - WER of `{first}`) / WER of `{first}`; negative is better. A change Δ is in "
        f"points against `{first}` (against the first row of a summary table), with its paired "
        f"bootstrap 95 % interval over utterances in brackets; {_SIGNIFICANT} marks a change "
        f"whose interval leaves out 0 (significant at 95 %).\n",
    ]
    if summary.get("provenance"):
        parts.append(_provenance_markdown(summary["provenance"]))
    if summary.get("findings"):
        parts.append(_findings_markdown(summary["findings"]))
    if summary.get("pools"):
        parts.append(_pools_markdown(summary["pools"]))
    parts.append(_significance_markdown(summary))
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


# --------------------------------------------------------------------------- what was measured


def _provenance_markdown(prov: dict[str, Any]) -> str:
    lines = ["## What was evaluated\n"]
    for key, label in (("checkpoints", "Checkpoints"), ("sets", "Sets")):
        if prov.get(key):
            lines.append(f"{label}:\n")
            lines += [f"- `{_escape(name)}`: `{path}`" for name, path in prov[key].items()]
            lines.append("")
    if prov.get("decoding"):
        settings = ", ".join(f"{k} {v}" for k, v in prov["decoding"].items())
        lines.append(f"Decoding: {settings}.\n")
    if "skipped" in prov:
        skipped = []
        for set_name, reasons in prov["skipped"].items():
            if reasons:
                why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
                skipped.append(f"- `{_escape(set_name)}`: {sum(reasons.values())} rows ({why})")
        lines += (["Rows left out (unreadable or invalid):\n", *skipped, ""] if skipped
                  else ["Rows left out: none.\n"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- findings

_VERDICTS = {
    "reproduced": "reproduced",
    "partly": "partly: significant, short of the cut",
    "noise": "not reproduced: within noise",
    "opposite": "not reproduced: significant, the other way",
    "not evaluated": "not evaluated",
}


def _findings_markdown(findings: list[dict[str, Any]]) -> str:
    """The paper's findings, each with what this evaluation measured and a verdict."""
    rows = []
    for f in findings:
        label, scale = CHANGE_FIGURES[f["figure"]]
        unit = "" if scale == 1.0 else " %"
        measured = _NA if f["change"] is None else (
            f"{_fmt(f['base_value'])}{unit} → {_fmt(f['value'])}{unit}: "
            f"{_fmt_change(f['change'], mark=False)}")
        wanted = f"lower by ≥ {f['cut']:.0%}" if f["cut"] else "lower"
        rows.append([_escape(f["claim"]), f"`{_escape(f['set_name'])}`",
                     f"{label}, `{_escape(f['checkpoint'])}` against `{_escape(f['baseline'])}`"
                     f" ({wanted})", _minus(measured), _VERDICTS[f["verdict"]]])
    return ("## The paper's findings, checked\n\n"
            "Reproduced: the change has the paper's sign, its interval leaves out 0 and it is at "
            "least the cut the finding names.\n\n"
            + _md_table(["finding", "set", "figure", "measured (Δ, 95 % interval)", "verdict"],
                        rows) + "\n")


# The figures a seed pool's table shows: with reference words, and without (no-speech clips).
_POOL_FIGURES = ("wer_pct", "ins_pct", "del_pct", "sub_pct")
_POOL_FIGURES_NO_REFERENCE = ("words_per_clip", "output_pct")


def _pools_markdown(pools: list[dict[str, Any]]) -> str:
    """Each seed pool's change against the baseline per set and figure, beside its runs'."""
    rows = []
    for pool in pools:
        for set_name, entry in pool["sets"].items():
            change = entry["change"]
            keys = _POOL_FIGURES if "wer_pct" in change else _POOL_FIGURES_NO_REFERENCE
            for key in keys:
                runs = ", ".join(_fmt_change(entry["members"][m].get(key))
                                 for m in pool["members"])
                rows.append([f"`{_escape(pool['name'])}`", f"`{_escape(set_name)}`",
                             CHANGE_FIGURES[key][0], _fmt_change(change[key]), runs])
    names = "; ".join(f"`{_escape(p['name'])}`: " + ", ".join(f"`{_escape(m)}`"
                                                             for m in p["members"])
                      for p in pools)
    missing = "".join(f"Not pooled on {', '.join(f'`{_escape(n)}`' for n in p['not_pooled'])} "
                      f"(`{_escape(p['name'])}`): not every run decoded it.\n\n"
                      for p in pools if p["not_pooled"])
    return ("## Seed pools against the baseline\n\n"
            f"Each pool is runs of one configuration that differ in their seed ({names}). Its "
            "per-utterance counts are the runs' means, so its Δ is the mean of the runs' Δs; its "
            "interval (paired bootstrap over utterances) holds for these runs together and does "
            "not say where another seed would fall: the runs' own Δs, in the order named, show "
            "that spread. Each set is pooled whole (its languages are not pooled apart).\n\n"
            + missing
            + _md_table(["pool", "set", "figure", "pooled Δ (95 % interval)",
                         "each run's Δ"], rows) + "\n")


# --------------------------------------------------------------------------- significance


def _significance_markdown(summary: dict[str, Any]) -> str:
    """Every change of the whole sets in words: which are significant, which are not."""
    first = summary["reference_checkpoint"]
    lines = [f"## Changes against `{_escape(first)}` (paired bootstrap, 95 %)\n"]
    significant, noise = [], []
    for ckpt in summary["checkpoints"][1:]:
        for set_name, r in summary["results"][ckpt].items():
            change = r["overall"].get("change")
            if not change:
                continue
            keys = (("wer_pct", "ins_pct", "del_pct", "sub_pct") if r["has_references"]
                    else ("words_per_clip", "output_pct"))
            for key in keys:
                c = change.get(key)
                if c is None or c["delta"] is None:
                    continue
                text = f"`{_escape(ckpt)}` on `{_escape(set_name)}`: {CHANGE_FIGURES[key][0]} " \
                       f"{_fmt_change(c, mark=False)}"
                (significant if c["significant"] else noise).append(text)
            for lang, e in r["languages"].items() if len(r["languages"]) > 1 else ():
                c = (e.get("change") or {}).get("wer_pct")
                if c is not None and c["delta"] is not None and c["significant"]:
                    significant.append(f"`{_escape(ckpt)}` on `{_escape(set_name)}` {lang}: WER "
                                       f"{_fmt_change(c, mark=False)}")
    if not significant and not noise:
        return "\n".join(lines + ["Only one checkpoint: no changes to test.\n"])
    lines.append(f"Significant ({len(significant)}):\n")
    lines += [f"- {t}" for t in significant] or ["- none"]
    lines.append(f"\nWithin noise: the interval holds 0 ({len(noise)}):\n")
    lines += [f"- {t}" for t in noise] or ["- none"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- sections


def _section_markdown(table: dict[str, Any]) -> str:
    if table["kind"] == "hallucination":
        return _hallucination_section(table)
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
            wer += _mark(cell, "wer_pct")
            if breakdown:
                parts = " / ".join(_fmt(cell.get(k), 1) + _mark(cell, k)
                                   for k in ("ins_pct", "del_pct", "sub_pct"))
                cells += [parts, wer]
            else:
                cells.append(wer)
        rows.append(cells)
    keys = ("ins_pct", "del_pct", "sub_pct", "wer_pct") if breakdown else ("wer_pct",)
    return (f"### {table['title']}\n\n{_md_table(header, rows)}\n"
            f"{_change_table(table, keys)}")


def _hallucination_section(table: dict[str, Any]) -> str:
    header = ["Model"]
    for label, cell in zip(table["columns"], table["rows"][0]["cells"], strict=True):
        header += ([f"{label} Ins / Del / Sub", f"{label} WER", f"{label} loops %",
                    f"{label} hyp/ref"] if cell.get("has_references", True)
                   else [f"{label} clips with output %", f"{label} words per clip",
                         f"{label} loops %"])
    rows = []
    for row in table["rows"]:
        cells = [_escape(row["checkpoint"])]
        for cell in row["cells"]:
            h = cell.get("hallucination") or {}
            loops = _fmt(_scaled(h.get("loop_share"), 100.0), 1) + _mark(cell, "loop_pct")
            if cell.get("has_references", True):
                parts = " / ".join(_fmt(cell.get(k), 1) + _mark(cell, k)
                                   for k in ("ins_pct", "del_pct", "sub_pct"))
                cells += [parts, _fmt(cell.get("wer_pct")) + _mark(cell, "wer_pct"), loops,
                          _fmt(h.get("length_ratio")) + _mark(cell, "length_ratio")]
            else:
                cells += [_fmt(_scaled(h.get("output_share"), 100.0), 1)
                          + _mark(cell, "output_pct"),
                          _fmt(h.get("words_per_clip")) + _mark(cell, "words_per_clip"), loops]
        rows.append(cells)
    text = f"### {table['title']}\n\n{_md_table(header, rows)}\n"
    if any(not c.get("has_references", True) for c in table["rows"][0]["cells"]):
        text += f"{_UNDEFINED_WER}\n\n"
    return text + _change_table(table, ("ins_pct", "del_pct", "sub_pct", "wer_pct", "loop_pct",
                                        "length_ratio"),
                                without_references=("output_pct", "words_per_clip", "loop_pct"))


def _change_table(table: dict[str, Any], keys: tuple[str, ...],
                  without_references: tuple[str, ...] = ()) -> str:
    """Δ against the table's first row, with intervals, one column per (set column, figure):
    ``keys`` for a column whose references hold words, ``without_references`` otherwise."""
    if len(table["rows"]) < 2:
        return ""
    columns = []
    for i, label in enumerate(table["columns"]):
        has_words = table["rows"][0]["cells"][i].get("has_references", True)
        for key in keys if has_words else without_references:
            if any((row["cells"][i].get("change") or {}).get(key) for row in table["rows"][1:]):
                columns.append((i, key, f"Δ {label} {CHANGE_FIGURES[key][0]}"))
    rows = [[_escape(row["checkpoint"])]
            + [_fmt_change((row["cells"][i].get("change") or {}).get(key)) for i, key, _ in columns]
            for row in table["rows"][1:]]
    return (f"Change against `{_escape(table['baseline'])}`, in points, with paired bootstrap "
            f"95 % intervals:\n\n{_md_table(['Model'] + [c[2] for c in columns], rows)}")


# --------------------------------------------------------------------------- one set


def _set_markdown(set_name: str, summary: dict[str, Any], first: str) -> str:
    per_ckpt = {c: r[set_name] for c, r in summary["results"].items() if set_name in r}
    if not any(r["has_references"] for r in per_ckpt.values()):
        return _set_without_references(set_name, per_ckpt)
    header = ["Checkpoint", "Language", "Utts", "Ref words", "WER %", "Ins %", "Del %", "Sub %",
              f"Rel. WER change vs {_escape(first)}", "Δ WER", "Δ Ins", "Δ Del", "Δ Sub"]
    rows = []
    langs = sorted({lang for r in per_ckpt.values() for lang in r["languages"]})
    # A single-language set is its own overall: no repeated rows.
    for lang in [*langs, None] if len(langs) > 1 else langs:
        for ckpt, r in per_ckpt.items():
            e = r["overall"] if lang is None else r["languages"].get(lang)
            if e is None:
                continue
            n_utts = r["utterances"] if lang is None else e["utterances"]
            rel = _NA if ckpt == first else _fmt_rel(e["rel_wer_change_pct"])
            change = e.get("change") or {}
            rows.append([_escape(ckpt), lang or "**overall**", str(n_utts), str(e["ref_words"]),
                         _fmt(e["wer_pct"]), _fmt(e["ins_pct"]), _fmt(e["del_pct"]),
                         _fmt(e["sub_pct"]), rel]
                        + [_fmt_change(change.get(k))
                           for k in ("wer_pct", "ins_pct", "del_pct", "sub_pct")])
    hall_header = (["Checkpoint"] + [label for _, label, _ in HALLUCINATION_COLUMNS]
                   + ["Δ loops", "Δ hyp/ref length"])
    hall_rows = []
    for ckpt, r in per_ckpt.items():
        change = r["overall"].get("change") or {}
        hall_rows.append([_escape(ckpt)]
                         + [_fmt(_scaled(r["hallucination"].get(k), scale))
                            for k, _, scale in HALLUCINATION_COLUMNS]
                         + [_fmt_change(change.get("loop_pct")),
                            _fmt_change(change.get("length_ratio"))])
    return (f"## Set `{set_name}`\n\n{_md_table(header, rows)}\n"
            f"Hallucination figures (all languages of the set):\n\n"
            f"{_md_table(hall_header, hall_rows)}")


def _set_without_references(set_name: str, per_ckpt: dict[str, Any]) -> str:
    header = (["Checkpoint", "Clips"] + [label for _, label, _ in NO_REFERENCE_COLUMNS]
              + ["Δ clips with output", "Δ words per clip", "Δ loops"])
    rows = []
    for ckpt, r in per_ckpt.items():
        change = r["overall"].get("change") or {}
        rows.append([_escape(ckpt), str(r["utterances"])]
                    + [_fmt(_scaled(r["hallucination"].get(k), scale))
                       for k, _, scale in NO_REFERENCE_COLUMNS]
                    + [_fmt_change(change.get(k))
                       for k in ("output_pct", "words_per_clip", "loop_pct")])
    return f"## Set `{set_name}` (no reference words)\n\n{_UNDEFINED_WER}\n\n" \
           f"{_md_table(header, rows)}"


# --------------------------------------------------------------------------- formatting


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _minus(text: str) -> str:
    # A true minus sign reads better than a hyphen in tables.
    return text.replace("-", "−")


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _NA
    return f"{value:.{digits}f}"


def _fmt_rel(value: float | None) -> str:
    if value is None:
        return _NA
    return _minus(f"{value:+.1f}%")


def _fmt_change(change: dict[str, Any] | None, mark: bool = True) -> str:
    """``−1.20 [−2.01, −0.40]*``: the change, its interval, and the mark when significant."""
    if not change or change.get("delta") is None:
        return _NA
    text = _minus(f"{change['delta']:+.2f} [{change['low']:+.2f}, {change['high']:+.2f}]")
    if mark:
        return text + (_SIGNIFICANT if change["significant"] else "")
    return text + (" (significant)" if change["significant"] else " (not significant)")


def _mark(cell: dict[str, Any], key: str) -> str:
    change = (cell.get("change") or {}).get(key)
    return _SIGNIFICANT if change and change.get("significant") else ""


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
