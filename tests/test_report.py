"""The report holds what the hypotheses say: hand-counted WER parts, relative changes, the
JSONL files, paper-shaped sections and the plots it links."""

from __future__ import annotations

import json
import random
from pathlib import Path

import matplotlib.image
import pytest

from speechrl.metrics import ErrorCounts, error_counts
from speechrl.report import Hypothesis, Section, relative_change, score_set, write_report
from speechrl.text import get_normalizer

# Two checkpoints on two sets, counted by hand (plain lower-case words, which every normaliser
# leaves as they are).
#
# set "indomain"                                  sft            grpo
#   u1 en "the cat sat on the mat" (6 words)      "a" for "the": S=1    exact
#   u2 en "hello world" (2)                       +"world again": I=2   exact
#   u3 fr "bonjour le monde" (3)                  "le" dropped: D=1     "la" for "le": S=1
# sft:  N=11, S=1 D=1 I=2 -> WER 4/11 = 36.36%, Ins 2/11 = 18.18%, Del 9.09%, Sub 9.09%
#       en: N=8, S=1 I=2 -> 37.50%, Ins 25.00%, Sub 12.50%;  fr: N=3, D=1 -> 33.33%
# grpo: N=11, S=1 -> 9.09%; en 0%; fr 33.33%
# relative change grpo vs sft: overall (1/11 - 4/11) / (4/11) = -75%; en -100%; fr 0%
#
# set "far" (English only)
#   f1 "red green blue black" (4)   sft: the 4 words three times: I=8   grpo: "red blue black": D=1
#   f2 "open the door" (3)          sft: "" (empty): D=3                grpo: exact
# sft:  N=7, I=8 D=3 -> WER 11/7 = 157.14%, Ins 8/7 = 114.29%, Del 3/7 = 42.86%
# grpo: N=7, D=1 -> 1/7 = 14.29%;  relative (1/7 - 11/7) / (11/7) = -10/11 = -90.91%
# sft hallucination figures: insertion rate 8/7; f1 has 12 > 2*4 words (share 1/2), a 4-gram
# repeated 3 times in a row (share 1/2); f2 is empty (share 1/2); length ratio (12/4 + 0/3)/2 = 1.5
INDOMAIN = [("u1", "en", "the cat sat on the mat"), ("u2", "en", "hello world"),
            ("u3", "fr", "bonjour le monde")]
FAR = [("f1", "en", "red green blue black"), ("f2", "en", "open the door")]
HYPS = {
    "sft": {"u1": "the cat sat on a mat", "u2": "hello world world again", "u3": "bonjour monde",
            "f1": " ".join(["red green blue black"] * 3), "f2": ""},
    "grpo": {"u1": "the cat sat on the mat", "u2": "hello world", "u3": "bonjour la monde",
             "f1": "red blue black", "f2": "open the door"},
}


def hand_results() -> dict[str, dict[str, list[Hypothesis]]]:
    def records(ckpt: str, rows: list[tuple[str, str, str]], domain: str) -> list[Hypothesis]:
        return [Hypothesis(i, ref, HYPS[ckpt][i], lang, domain) for i, lang, ref in rows]

    return {ckpt: {"indomain": records(ckpt, INDOMAIN, "clean"), "far": records(ckpt, FAR, "far")}
            for ckpt in ("sft", "grpo")}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("report")
    metrics = out / "grpo_metrics.jsonl"
    rows = [{"step": s, "reward_mean": -0.5 + s / 100, "loss": 1.0 / (1 + s)} for s in range(10)]
    rows[4]["dev_wer"], rows[9]["dev_wer"] = 30.0, 20.0
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    sections = [
        Section("Table II", ("indomain",), relative=True),
        {"title": "Table III", "sets": ["far"], "kind": "breakdown"},
        {"title": "French only, grpo first", "sets": ["indomain"], "kind": "breakdown",
         "languages": ["fr"], "checkpoints": ["grpo", "sft"]},
        Section("Table IV", ("indomain",), checkpoints=("grpo", "sft"), relative=True),
    ]
    paths = write_report(out / "report", hand_results(), normalizer="whisper", title="Hand",
                         training_metrics={"grpo": metrics}, sections=sections)
    return paths, json.loads(paths.json.read_text()), paths.markdown.read_text()


def test_hand_counted_percentages(report) -> None:
    _, summary, _ = report
    sft, grpo = summary["results"]["sft"], summary["results"]["grpo"]
    overall = sft["indomain"]["overall"]
    assert (overall["ref_words"], overall["substitutions"], overall["deletions"],
            overall["insertions"]) == (11, 1, 1, 2)
    assert overall["wer_pct"] == pytest.approx(400 / 11)
    assert overall["ins_pct"] == pytest.approx(200 / 11)
    assert overall["del_pct"] == pytest.approx(100 / 11)
    assert overall["sub_pct"] == pytest.approx(100 / 11)
    assert overall["rel_wer_change_pct"] is None  # the first checkpoint is the reference
    en = sft["indomain"]["languages"]["en"]
    assert (en["utterances"], en["ref_words"], en["wer_pct"], en["ins_pct"], en["sub_pct"]) == (
        2, 8, 37.5, 25.0, 12.5)
    assert grpo["indomain"]["overall"]["wer_pct"] == pytest.approx(100 / 11)
    assert grpo["indomain"]["overall"]["rel_wer_change_pct"] == pytest.approx(-75.0)
    assert grpo["indomain"]["languages"]["en"]["rel_wer_change_pct"] == pytest.approx(-100.0)
    assert grpo["indomain"]["languages"]["fr"]["rel_wer_change_pct"] == pytest.approx(0.0)
    far = sft["far"]["overall"]
    assert (far["wer_pct"], far["ins_pct"], far["del_pct"], far["sub_pct"]) == pytest.approx(
        (1100 / 7, 800 / 7, 300 / 7, 0.0))
    assert grpo["far"]["overall"]["rel_wer_change_pct"] == pytest.approx(-1000 / 11)
    assert sft["far"]["hallucination"] == pytest.approx({
        "insertion_rate": 8 / 7, "over_twice_share": 0.5, "loop_share": 0.5,
        "empty_share": 0.5, "length_ratio": 1.5, "output_share": 0.5, "words_per_clip": 6.0,
        "utterances": 2.0})
    assert summary["normalizer"] == "whisper"
    assert summary["reference_checkpoint"] == "sft"


def test_markdown_rows(report) -> None:
    _, _, md = report
    assert "Text normaliser: `whisper`" in md
    for row in [
        "| sft | en | 2 | 8 | 37.50 | 25.00 | 0.00 | 12.50 | – |",
        "| grpo | en | 2 | 8 | 0.00 | 0.00 | 0.00 | 0.00 | −100.0% |",
        "| sft | fr | 1 | 3 | 33.33 | 0.00 | 33.33 | 0.00 | – |",
        "| grpo | fr | 1 | 3 | 33.33 | 0.00 | 0.00 | 33.33 | +0.0% |",
        "| sft | **overall** | 3 | 11 | 36.36 | 18.18 | 9.09 | 9.09 | – |",
        "| grpo | **overall** | 3 | 11 | 9.09 | 0.00 | 0.00 | 9.09 | −75.0% |",
        # "far" has one language, which is its overall: no repeated overall rows
        "| sft | en | 2 | 7 | 157.14 | 114.29 | 42.86 | 0.00 | – |",
        "| grpo | en | 2 | 7 | 14.29 | 0.00 | 14.29 | 0.00 | −90.9% |",
        # hallucination figures of "far": 8/7 insertions, half long, looping and empty, ratio 1.5
        "| sft | 114.29 | 50.00 | 50.00 | 50.00 | 1.50 |",
    ]:
        assert row in md, row
    assert md.count("| sft | **overall** |") == 1


def test_sections(report) -> None:
    _, summary, md = report
    for row in [
        "| Model | indomain en | indomain fr | indomain overall |",
        "| sft | 37.50 | 33.33 | 36.36 |",
        # en is significant (see test_intervals_in_report); the star marks it
        "| grpo | 0.00 (−100.0%)* | 33.33 (+0.0%) | 9.09 (−75.0%) |",
        # table III shape: Ins / Del / Sub then WER, one decimal for the parts as in the paper
        "| Model | far Ins / Del / Sub | far WER |",
        "| sft | 114.3 / 42.9 / 0.0 | 157.14 |",
        "| grpo | 0.0 / 14.3 / 0.0 | 14.29* |",  # every resample of "far" improves
        # pooled over French only: sft D=1 of 3, grpo S=1 of 3
        "| grpo | 0.0 / 0.0 / 33.3 | 33.33 |",
        # sft against grpo, French: D +1 and S -1 on the one utterance, so [+33.3, +33.3]
        "| sft | 0.0 / 33.3* / 0.0* | 33.33 |",
        # rows in the asked order, the first row the reference: sft overall is
        # (36.36 - 9.09) / 9.09 = +300%; en against 0% is undefined, so no change is shown
        # (its en change, +37.50 [+16.67, +100.00], is significant all the same)
        "| sft | 37.50* | 33.33 (+0.0%) | 36.36 (+300.0%) |",
    ]:
        assert row in md, row
    table_iv = summary["sections"][3]
    assert [r["checkpoint"] for r in table_iv["rows"]] == ["grpo", "sft"]
    assert table_iv["rows"][1]["cells"][2]["rel_wer_change_pct"] == pytest.approx(300.0)


def test_jsonl_counts_equal_report(tmp_path: Path) -> None:
    rng = random.Random(3)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()

    def noisy(ref: str) -> str:
        out = [w for w in ref.split() if rng.random() > 0.2]
        out = [rng.choice(words) if rng.random() < 0.2 else w for w in out]
        return " ".join(out + rng.choice([[], [], ["eta", "eta", "eta"]]))

    refs = {f"{lang}{i}": (lang, " ".join(rng.choices(words, k=rng.randint(1, 9))))
            for lang in ("en", "de", "es") for i in range(15)}
    results = {ckpt: {"dev": [Hypothesis(i, ref, noisy(ref), lang) for i, (lang, ref) in
                              refs.items()]} for ckpt in ("a", "b", "c")}
    paths = write_report(tmp_path, results, normalizer="basic")
    summary = json.loads(paths.json.read_text())
    assert len(paths.hypotheses) == 3
    for ckpt in results:
        entry = summary["results"][ckpt]["dev"]
        lines = [json.loads(x) for x in (tmp_path / entry["hypotheses"]).read_text().splitlines()]
        assert [(x["id"], x["ref"], x["hyp"]) for x in lines] == [
            (r.id, r.ref, r.hyp) for r in results[ckpt]["dev"]]
        recomputed, _ = error_counts([x["ref_norm"] for x in lines], [x["hyp_norm"] for x in lines])
        assert [c.to_dict() for c in recomputed] == [x["counts"] for x in lines]
        for lang in ("en", "de", "es", None):
            mine = [x["counts"] for x in lines if lang is None or x["language"] == lang]
            stored = entry["overall"] if lang is None else entry["languages"][lang]
            for key in ("hits", "substitutions", "deletions", "insertions", "ref_words"):
                assert stored[key] == sum(c[key] for c in mine)
            assert stored["wer_pct"] == pytest.approx(
                100 * sum(c["errors"] for c in mine) / sum(c["ref_words"] for c in mine))
        base = summary["results"]["a"]["dev"]["overall"]["wer_pct"]
        expected = None if ckpt == "a" else 100 * (entry["overall"]["wer_pct"] - base) / base
        assert entry["overall"]["rel_wer_change_pct"] == pytest.approx(expected)


def test_normaliser_chosen_per_language() -> None:
    # Whisper's English normaliser maps British spelling and drops case and punctuation;
    # the basic one (every other language under "whisper") keeps "colour" as it is.
    records = [Hypothesis("e", "the color", "The colour!", "en"),
               Hypothesis("f", "the color", "The colour!", "fr")]
    scores = score_set(records, "whisper")
    assert [u.hyp_norm for u in scores.utterances] == ["the color", "the colour"]
    assert scores.by_language["en"] == ErrorCounts(2, 0, 0, 0, 2)
    assert scores.by_language["fr"] == ErrorCounts(1, 1, 0, 0, 2)
    assert scores.total == ErrorCounts(3, 1, 0, 0, 4)
    assert scores.utterances[1].ref_norm == get_normalizer("whisper", "fr")("the color")


def test_relative_change() -> None:
    assert relative_change(21.53, 23.5) == pytest.approx(-8.383, abs=1e-3)  # paper, table II
    assert relative_change(5.0, 0.0) is None
    assert relative_change(None, 3.0) is None


def test_pngs(report) -> None:
    paths, summary, md = report
    names = [p.name for p in paths.plots]
    assert names == ["wer_breakdown.png", "wer_by_language.png", "curves_grpo.png"]
    assert [p["file"] for p in summary["plots"]] == names
    for path in paths.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 300 and width > 400
        assert f"]({path.name})" in md


def test_bad_input(tmp_path: Path) -> None:
    results = hand_results()
    with pytest.raises(ValueError, match="unknown set 'nope'"):
        write_report(tmp_path, results, normalizer="whisper", sections=[Section("x", ("nope",))])
    with pytest.raises(ValueError, match="kind must be one of 'wer', 'breakdown', 'hallucination'"):
        Section("x", ("far",), kind="table")
    with pytest.raises(ValueError, match="unknown normaliser"):
        write_report(tmp_path, results, normalizer="fancy")
    uneven = {"sft": results["sft"], "grpo": {"far": results["grpo"]["far"][:1]}}
    with pytest.raises(ValueError, match="'grpo' decoded other utterances than 'sft'"):
        write_report(tmp_path, uneven, normalizer="whisper")
    twice = {"sft": {"far": results["sft"]["far"] * 2}}
    with pytest.raises(ValueError, match="id 'f1' appears twice"):
        write_report(tmp_path, twice, normalizer="whisper")
    clash = {"a b": results["sft"], "a_b": results["grpo"]}
    with pytest.raises(ValueError, match="map to the file name"):
        write_report(tmp_path, clash, normalizer="whisper")
    with pytest.raises(ValueError, match="no checkpoints"):
        write_report(tmp_path, {}, normalizer="whisper")


def test_intervals_in_report(report) -> None:
    # grpo against sft on "indomain" English: u1 (6 words) loses 1 error, u2 (2 words) loses 2.
    # A resample of u1 twice gives -1/6 = -16.67 points, of u2 twice -2/2 = -100 points, each
    # with probability 1/4 (> 2.5 %), so the 95 % interval is exactly [-100, -16.67]: every
    # resample improves, so the change is significant.
    _, summary, md = report
    grpo = summary["results"]["grpo"]["indomain"]
    en = grpo["languages"]["en"]["change"]["wer_pct"]
    assert (en["delta"], en["low"], en["high"]) == pytest.approx((-37.5, -100.0, -100 / 6))
    assert en["significant"] is True and en["level"] == 0.95
    # French: one utterance, D=1 traded for S=1: WER unchanged in every resample -> [0, 0]
    fr = grpo["languages"]["fr"]["change"]
    assert (fr["wer_pct"]["low"], fr["wer_pct"]["high"]) == (0.0, 0.0)
    assert not fr["wer_pct"]["significant"]
    assert fr["del_pct"] == pytest.approx({"delta": -100 / 3, "low": -100 / 3, "high": -100 / 3,
                                           "level": 0.95, "significant": True})
    # The baseline carries no change; the whole set's change is in the overall entry
    assert summary["results"]["sft"]["indomain"]["overall"]["change"] is None
    assert grpo["overall"]["change"]["wer_pct"]["delta"] == pytest.approx(-300 / 11)
    # Table II's grpo row holds the same intervals as the per-set entries
    en_cell = summary["sections"][0]["rows"][1]["cells"][0]
    assert en_cell["change"]["wer_pct"] == pytest.approx(en)
    assert "| grpo | −37.50 [−100.00, −16.67]* | +0.00 [+0.00, +0.00] |" in md
    assert "- `grpo` on `indomain` en: WER −37.50 [−100.00, −16.67] (significant)" in md
    assert "- `grpo` on `indomain`: WER −27.27 [" in md


def test_set_without_reference_words(tmp_path: Path) -> None:
    # Non-speech clips: empty references. a writes 3 words on n1 and nothing on n2; b writes
    # "la la la la" (a loop) on n1 and 1 word on n2, c nothing at all.
    hyps = {"a": ("yes no maybe", ""), "b": ("la la la la", "oh"), "c": ("", "")}
    results = {k: {"noise": [Hypothesis("n1", "", h1), Hypothesis("n2", "", h2)]}
               for k, (h1, h2) in hyps.items()}
    paths = write_report(tmp_path, results, normalizer="basic", sections=[
        Section("Probes", ("noise",), kind="hallucination")])
    summary = json.loads(paths.json.read_text())
    a, b, c = (summary["results"][k]["noise"] for k in "abc")
    assert not a["has_references"] and a["overall"]["wer_pct"] is None
    assert a["hallucination"]["output_share"] == 0.5 and a["hallucination"]["words_per_clip"] == 1.5
    assert b["hallucination"]["output_share"] == 1.0 and b["hallucination"]["loop_share"] == 0.5
    # b - a: words per clip (4 + 1) / 2 - 3 / 2 = +1; per clip +1 and +1, so [+1, +1]
    assert b["overall"]["change"]["words_per_clip"] == pytest.approx(
        {"delta": 1.0, "low": 1.0, "high": 1.0, "level": 0.95, "significant": True})
    # c - a: -3 words on n1, 0 on n2 -> resamples -3, -1.5, 0 -> [-3, 0], not significant
    words = c["overall"]["change"]["words_per_clip"]
    assert (words["delta"], words["low"], words["high"]) == (-1.5, -3.0, 0.0)
    assert not words["significant"]
    assert "wer_pct" not in c["overall"]["change"]  # undefined: no reference words
    md = paths.markdown.read_text()
    assert "## Set `noise` (no reference words)" in md and "WER is undefined here" in md
    assert ("| b | 2 | 100.00 | 2.50 | 50.00 | +50.00 [+0.00, +100.00] | +1.00 [+1.00, +1.00]* |"
            in md)
    assert "noise clips with output %" in md


def test_findings_state_each_change_with_its_interval_and_verdict(tmp_path: Path) -> None:
    from speechrl.report_changes import Finding, finding_verdict

    # 20 clips of "one two three four" (80 reference words). sft inserts 4 words on each clip
    # (Ins 100 %); "half" inserts 3 (75 %: a quarter fewer), "none" nothing, "worse" 5.
    refs = [(f"c{i}", "en", "one two three four") for i in range(20)]

    def records(extra: int) -> list[Hypothesis]:
        return [Hypothesis(i, ref, " ".join([ref] + ["yes"] * extra), lang, "clean")
                for i, lang, ref in refs]

    results = {name: {"probe": records(n)}
               for name, n in (("sft", 4), ("none", 0), ("half", 3), ("worse", 5))}
    findings = [Finding(f"cut by half ({name})", "probe", "ins_pct", name, "sft", cut=0.5)
                for name in ("none", "half", "worse")]
    findings += [Finding("any drop", "probe", "ins_pct", "half", "sft"),
                 Finding("a set never decoded", "elsewhere", "wer_pct", "none", "sft")]
    paths = write_report(tmp_path, results, normalizer="none", findings=findings)
    entries = json.loads(paths.json.read_text())["findings"]
    # Every clip changes by the same count, so each interval is the change itself.
    expected = [(100.0, 0.0, -100.0, "reproduced"), (100.0, 75.0, -25.0, "partly"),
                (100.0, 125.0, 25.0, "opposite"), (100.0, 75.0, -25.0, "reproduced")]
    for entry, (base, value, delta, verdict) in zip(entries, expected, strict=False):
        assert entry["base_value"] == pytest.approx(base)
        assert entry["value"] == pytest.approx(value)
        change = entry["change"]
        assert (change["delta"], change["low"], change["high"]) == \
            (pytest.approx(delta), pytest.approx(delta), pytest.approx(delta))
        assert entry["verdict"] == verdict, entry["claim"]
    assert entries[4]["verdict"] == "not evaluated" and entries[4]["change"] is None
    markdown = paths.markdown.read_text()
    assert "## The paper's findings, checked" in markdown
    assert "| cut by half (none) | `probe` | Ins, `none` against `sft` (lower by ≥ 50%) | " \
           "100.00 % → 0.00 %: −100.00 [−100.00, −100.00] (significant) | reproduced |" in markdown
    # Within noise whenever the interval holds 0, whatever the point estimate.
    assert finding_verdict(-3.0, -6.0, 0.5, 4.0, 0.5) == "noise"
    assert finding_verdict(-1.0, -1.5, -0.5, 4.0, 0.5) == "partly"
    assert finding_verdict(-2.0, -2.5, -1.5, 4.0, 0.5) == "reproduced"
    with pytest.raises(ValueError, match="figure must be one of"):
        Finding("typo", "probe", "insertions", "none", "sft")


def test_seed_pool_is_the_runs_mean_with_its_interval(tmp_path: Path) -> None:
    from speechrl.report_changes import Pool

    # "same" writes what sft writes, "twin" what grpo writes. Pooling grpo with a copy of the
    # baseline halves every per-utterance difference, so the pooled change and both ends of its
    # interval are exactly half of grpo's own (the same bootstrap draws, scaled by 1/2);
    # pooling grpo with its twin changes nothing.
    # The copies list their utterances in reverse order: pooling pairs them by id. With a third
    # run (another copy of the baseline) the pool's change is a third of grpo's. "partial"
    # decoded "far" only: the pool holding it is reported on "far" and says so.
    results = hand_results()
    results["same"] = {k: list(v)[::-1] for k, v in results["sft"].items()}
    results["same2"] = {k: list(v) for k, v in results["sft"].items()}
    results["twin"] = {k: list(v)[::-1] for k, v in results["grpo"].items()}
    results["partial"] = {"far": list(results["grpo"]["far"])}
    pools = [Pool("half", ("grpo", "same")), Pool("twins", ("grpo", "twin")),
             Pool("third", ("grpo", "same", "same2")), Pool("part", ("grpo", "partial"))]
    paths = write_report(tmp_path, results, normalizer="whisper", pools=pools)
    summary = json.loads(paths.json.read_text())
    [half, twins, third, part] = summary["pools"]
    assert half["not_pooled"] == [] and part["not_pooled"] == ["indomain"]
    assert list(part["sets"]) == ["far"]
    assert (half["name"], half["members"], half["baseline"]) == ("half", ["grpo", "same"], "sft")
    for set_name in ("indomain", "far"):
        own = summary["results"]["grpo"][set_name]["overall"]["change"]
        for key in ("wer_pct", "ins_pct", "del_pct", "sub_pct", "words_per_clip"):
            pooled = half["sets"][set_name]["change"][key]
            assert (pooled["delta"], pooled["low"], pooled["high"]) == pytest.approx(
                (own[key]["delta"] / 2, own[key]["low"] / 2, own[key]["high"] / 2)), key
            assert twins["sets"][set_name]["change"][key] == pytest.approx(own[key])
            assert third["sets"][set_name]["change"][key]["delta"] == pytest.approx(
                own[key]["delta"] / 3)
        assert half["sets"][set_name]["members"]["grpo"] == own
    # By hand on "far": grpo's WER change is (1 - 11) / 7 = -142.86 points, so the pool's -71.43
    far = half["sets"]["far"]["change"]["wer_pct"]
    assert far["delta"] == pytest.approx(-500 / 7)
    # "same" changes nothing on any utterance: [0, 0]
    assert half["sets"]["far"]["members"]["same"]["wer_pct"]["low"] == 0.0
    md = paths.markdown.read_text()
    assert "## Seed pools against the baseline" in md
    assert "`half`: `grpo`, `same`; `twins`: `grpo`, `twin`" in md
    assert "Not pooled on `indomain` (`part`): not every run decoded it." in md
    # "far" resampled: f1 twice (2 - 16) / 8 = -175, f2 twice (0 - 6) / 6 = -100 points, each
    # drawn with probability 1/4: grpo's interval is [-175, -100], the pool's half of it.
    assert ("| `half` | `far` | WER | −71.43 [−87.50, −50.00]* | −142.86 [−175.00, −100.00]*, "
            "+0.00 [+0.00, +0.00] |") in md


def test_seed_pool_mistakes_are_one_line(tmp_path: Path) -> None:
    from speechrl.report_changes import Pool

    with pytest.raises(ValueError, match=r"^pool 'p': pool at least two runs, got \['grpo'\]$"):
        Pool("p", ("grpo",))
    with pytest.raises(ValueError, match="a run is named twice"):
        Pool("p", ("grpo", "grpo"))
    for pool, line in [
        (Pool("p", ("grpo", "gpro")), "pool 'p': gpro not among the checkpoints (sft, grpo)"),
        (Pool("p", ("sft", "grpo")), "pool 'p': sft is the baseline the changes are against; "
                                     "pool other runs"),
        (Pool("twin", ("grpo", "sft")), "pool 'twin': sft is the baseline"),
        (Pool("grpo", ("grpo", "twin")), "pool 'grpo': the name is taken by a checkpoint; name "
                                         "the pool otherwise"),
    ]:
        results = hand_results()
        if "twin" in pool.members:
            results["twin"] = results["grpo"]
        with pytest.raises(ValueError, match=f"^{line.replace('(', '.').replace(')', '.')}"):
            write_report(tmp_path / "r", results, normalizer="whisper", pools=[pool])
    results = {**hand_results(), "grpo2": hand_results()["grpo"]}
    with pytest.raises(ValueError, match="two pools share a name"):
        write_report(tmp_path / "r", results, normalizer="whisper",
                     pools=[Pool("p", ("grpo", "grpo2")), Pool("p", ("grpo2", "grpo"))])
    assert not (tmp_path / "r").exists()  # checked before anything is written
