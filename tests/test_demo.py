"""demo.py: the whole pipeline at a few steps a stage, its wiring, a stop in every stage, and a
restart."""

from __future__ import annotations

import json
import shutil
import signal

import pytest

from speechrl.config import load_run_config
from speechrl.demo import (
    ADAPT_SETS,
    EVAL_SETS,
    FINDINGS,
    FULL,
    QUICK,
    DemoScale,
    run_demo,
    stage_overrides,
    warmup,
)

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

# Two steps at least in every stage, so that each can be stopped before its end.
MICRO = DemoScale(utts=6, eval_utts=None, lm_steps=3, ctc_steps=3, sft_steps=6, grpo_steps=2,
                  adapt_steps=2, eval_every=3)
CHECKPOINTS = ("sft", "grpo", "adapt_sft", "adapt_grpo")
# The demo's stages in order: (name in its messages, command, output folder, steps).
STAGES = (("LM pre-training (eq. 1)", "pretrain-lm", "lm", MICRO.lm_steps),
          ("encoder CTC pre-training", "pretrain-encoder", "encoder", MICRO.ctc_steps),
          ("sft", "sft", "sft", MICRO.sft_steps), ("grpo", "grpo", "grpo", MICRO.grpo_steps),
          ("adapt_sft", "sft", "adapt_sft", MICRO.adapt_steps),
          ("adapt_grpo", "grpo", "adapt_grpo", MICRO.adapt_steps))


def test_adaptation_stages_run_at_their_dev_chosen_lrs_at_every_scale(tmp_path):
    # The lrs chosen on the adaptation dev set (docs/results.md, fifteenth session), not the
    # presets' (SFT 1.5e-3, GRPO 3e-5), for the full and the quick demo alike.
    for scale in (FULL, QUICK):
        overrides = stage_overrides(tmp_path, scale)
        lrs = {name: load_run_config("tiny", overrides[name], stage=command).train.lr
               for name, command in (("sft", "sft"), ("grpo", "grpo"), ("adapt_sft", "sft"),
                                     ("adapt_grpo", "grpo"))}
        assert lrs == {"sft": 1.5e-3, "grpo": 5e-5, "adapt_sft": 5e-4, "adapt_grpo": 1e-4}


def test_warmup_is_the_presets_or_a_quarter_of_a_short_run():
    assert [warmup(n) for n in (3600, 400, 60, 2, 1)] == [100, 100, 15, 1, 1]


def sigterm_after_first_fresh_step(monkeypatch) -> dict[str, bool]:
    """Make the first stage that starts afresh (its progress bar starts at step 0) in a demo run
    get SIGTERM after its first step, as a job scheduler would send it; set ``armed`` before
    each run. A resumed stage (its bar starts further on) runs to its end."""
    from speechrl import runtime
    from speechrl.train import ctc, grpo, lm, sft

    armed = {"armed": False}

    def progress(total: int, initial: int, desc: str):
        bar = runtime.progress(total, initial, desc)
        if initial == 0 and armed["armed"]:
            armed["armed"] = False
            update = bar.update

            def update_then_stop(n: int = 1):
                update(n)
                bar.update = update
                signal.raise_signal(signal.SIGTERM)

            bar.update = update_then_stop
        return bar

    for module in (lm, ctc, sft, grpo):
        monkeypatch.setattr(module, "progress", progress)
    return armed


def test_demo_stopped_in_every_stage_resumes_each_then_a_restart_only_rewrites_the_report(
        tmp_path, capsys, monkeypatch):
    from speechrl.train.stopping import RunStopped

    out = tmp_path / "demo"
    armed = sigterm_after_first_fresh_step(monkeypatch)
    said = []  # stderr of every run
    # Run k is stopped in stage k after its first step; run k + 1 resumes that stage (never
    # taking it as done, whatever it has already exported) and is stopped in the next one.
    for k, (_, command, folder, steps) in enumerate(STAGES):
        armed["armed"] = True
        with pytest.raises(RunStopped) as stopped:
            run_demo(out, scale=MICRO)
        assert stopped.value.exit_code == 128 + signal.SIGTERM
        assert str(stopped.value).startswith(f"{command}: stopped by SIGTERM after step 1; ")
        err = capsys.readouterr().err
        said.append(err)
        if k > 0:
            previous = STAGES[k - 1]
            assert (f"resuming {previous[1]} from {out / previous[2] / 'last'} at step 1"
                    in err), err
            assert f"== {previous[0]}: already done" not in err
        state = json.loads((out / folder / "last" / "trainer_state.json").read_text())
        assert state["step"] == 1 < steps
    # The stopped encoder had exported itself (the restart bug of issue 19) and was resumed.
    assert (out / "encoder" / "encoder").exists()
    report = run_demo(out, scale=MICRO)
    assert report == out / "report.md"
    said.append(capsys.readouterr().err)
    assert f"resuming grpo from {out / 'adapt_grpo' / 'last'} at step 1" in said[-1]
    for _, _, folder, steps in STAGES:  # every stage ran to its last step
        state = json.loads((out / folder / "last" / "trainer_state.json").read_text())
        assert state["step"] == steps, folder
    for name in CHECKPOINTS:
        assert (out / "checkpoints" / name / "speechrl.json").exists(), name

    # Each stage ran with the scale's steps, the adaptation ones from the SFT checkpoint on the
    # adaptation data, and adapt SFT warms up within its own few steps.
    def stage_config(name: str) -> dict:
        kind = "grpo" if "grpo" in name else "sft"
        return json.loads((out / name / f"{kind}_config.json").read_text())

    data = out / "data"
    # The adaptation sets are the headset domain: in-domain talkers under crosstalk.
    assert json.loads((data / "corpus.json").read_text())["adapt_domain"] == "headset"
    assert {json.loads(line)["domain"] for line in
            (data / "adapt_test.jsonl").read_text().splitlines()} == {"headset"}
    sft, grpo = stage_config("sft"), stage_config("grpo")
    assert (sft["train"]["max_steps"], sft["data"]["train"]) == (6, [str(data / "train.jsonl")])
    # SFT trains everything from step 1, with the preset's CTC term on the speech tokens.
    assert (sft["sft"]["llm_frozen_steps"], sft["sft"]["speech_ctc_weight"]) == (0, 0.5)
    assert (grpo["train"]["max_steps"], grpo["train"]["init"]) == (2, str(out / "checkpoints/sft"))
    # GRPO trains on sentences SFT never saw, where empty references (no speech) are kept.
    assert (grpo["data"]["train"], grpo["data"]["train_empty_text"]) == \
        ([str(data / "grpo_train.jsonl")], True)
    assert grpo["data"]["dev"] == [str(data / "dev.jsonl")]
    for name in ("adapt_sft", "adapt_grpo"):
        cfg = stage_config(name)
        assert cfg["train"]["init"] == str(out / "checkpoints" / "sft")
        assert cfg["data"]["train"] == [str(data / "adapt_train.jsonl")]
        assert cfg["data"]["dev"] == [str(data / "adapt_dev.jsonl")]
        assert cfg["train"]["max_steps"] == 2
    assert stage_config("adapt_sft")["train"]["warmup_steps"] == 1
    assert stage_config("adapt_grpo")["train"]["warmup_steps"] == 0  # the GRPO preset's
    # Each adaptation stage at the lr chosen on the adaptation dev set, not its preset's.
    assert stage_config("adapt_sft")["train"]["lr"] == 5e-4 != sft["train"]["lr"]
    assert stage_config("adapt_grpo")["train"]["lr"] == 1e-4

    # SFT and GRPO decoded every row of every evaluation set, the probes included; the
    # adaptation runs the two sets of table IV.
    rows = {s: len((data / f"{s}.jsonl").read_text().splitlines()) for s in EVAL_SETS}
    summary = json.loads((out / "report.json").read_text())
    results = summary["results"]
    # Each of the paper's findings is checked on what was decoded, with its interval.
    assert [f["claim"] for f in summary["findings"]] == [f.claim for f in FINDINGS]
    for f in summary["findings"]:
        assert f["change"]["low"] <= f["change"]["delta"] <= f["change"]["high"], f["claim"]
        assert f["verdict"] in ("reproduced", "partly", "noise", "opposite"), f["claim"]
    for name in CHECKPOINTS:
        wanted = EVAL_SETS if name in ("sft", "grpo") else ADAPT_SETS
        assert sorted(results[name]) == sorted(wanted), name
        for set_name in wanted:
            assert results[name][set_name]["utterances"] == rows[set_name], (name, set_name)
    assert not results["sft"]["ood_nonspeech"]["has_references"]
    # Every change against SFT carries its interval, and the report says what it evaluated.
    change = results["grpo"]["test"]["overall"]["change"]["wer_pct"]
    assert change["low"] <= change["delta"] <= change["high"]
    assert summary["provenance"]["decoding"]["precision"] in ("fp32", "bf16")
    assert summary["provenance"]["sets"]["ood_long"] == str((data / "ood_long.jsonl").resolve())
    text = report.read_text()
    for title in ("Table II shape", "Table III shape", "Hallucination probes", "Table IV shape",
                  "## Set `ood_nonspeech` (no reference words)", "(paired bootstrap, 95 %)"):
        assert title in text

    # A restart finds every stage done: nothing is trained again, the report is rewritten.
    weights = {n: (out / "checkpoints" / n / "model.safetensors").stat().st_mtime_ns
               for n in CHECKPOINTS}
    # Each stage, and the evaluation, began by saying which precision it chose and why.
    lines = "".join(said).splitlines()
    for stage in ("pretrain-lm", "pretrain-encoder", "sft", "grpo", "eval"):
        chosen = [line for line in lines if line.startswith(f"{stage}: precision ")]
        assert chosen and all(" (auto: " in line for line in chosen), (stage, lines[:20])
    run_demo(out, scale=MICRO)
    err = capsys.readouterr().err
    assert err.count("already done") == 6, err
    assert {n: (out / "checkpoints" / n / "model.safetensors").stat().st_mtime_ns
            for n in CHECKPOINTS} == weights

    # An older demo's finished stage in the same folder (here adapt_sft at the SFT preset's lr):
    # one line naming the change and what to delete, before any work; nothing is touched.
    from speechrl.config import ConfigError

    monkeypatch.setattr("speechrl.demo.ADAPT_SFT_LR", 1.5e-3)
    report_time = report.stat().st_mtime_ns
    with pytest.raises(ConfigError) as changed:
        run_demo(out, scale=MICRO)
    assert str(changed.value) == (
        f"adapt_sft in {out / 'adapt_sft'} finished with other settings than the demo's: "
        f"train.lr 0.0005 -> 0.0015; delete {out / 'adapt_sft'} and "
        f"{out / 'checkpoints' / 'adapt_sft'} to train it again")
    assert "already done" not in capsys.readouterr().err  # said before any stage ran
    assert report.stat().st_mtime_ns == report_time
    assert {n: (out / "checkpoints" / n / "model.safetensors").stat().st_mtime_ns
            for n in CHECKPOINTS} == weights
