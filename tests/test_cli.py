"""Every mistake a user can make, made as a user makes it: one ``python -m speechrl.cli`` process
per case. Each ends in one line on stderr that says what to do, no traceback, the exit status
speechrl/cli.py documents, and loses nothing already done.

Exit status: 2 for a mistake in the command or the config (argparse's convention, kept for
config keys and values, and for settings that differ from the run being resumed); 1 for
something the command names that is missing or unusable (a manifest, a checkpoint, an audio
file, a preset's paths, a device, an output folder that is a file); 128 + N after signal N
(143: SIGTERM), the checkpoint saved.

Cases that fail before loading anything run in a fraction of a second each; the others share
one tiny SFT run (its ``last`` and ``best``) and one tone corpus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from test_train import run_config
from tones import write_tone_corpus

import speechrl
from speechrl.configio import to_dict

ROOT = Path(speechrl.__file__).resolve().parents[1]
TINY_PATHS = ("data.train=runs/tiny/data/train.jsonl, data.dev=runs/tiny/data/dev.jsonl, "
              "model.llm.path=runs/tiny/lm/model, model.tokenizer=runs/tiny/lm/model, "
              "model.encoder.path=runs/tiny/encoder/encoder")


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def speechrl_cli(*args: str, cwd: Path, timeout: float = 300) -> tuple[int, str, str]:
    """``speechrl ARGS`` run in ``cwd``: (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "speechrl.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=env(), timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def messages(err: str) -> list[str]:
    """stderr without its progress bars (tqdm redraws them after a carriage return)."""
    assert "Traceback" not in err, err
    bars = re.compile(r"\d+%\||\|\s*\d+/\d+ \[")
    return [line for line in re.split(r"[\r\n]+", err) if line.strip() and not bars.search(line)]


def one_line(err: str) -> str:
    lines = messages(err)
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- before any work

# (command line, exit status, the one line); run in an empty folder, so the tiny preset's
# runs/tiny/... paths do not exist there.
BEFORE_ANY_WORK = [
    (["sft", "train.lr=abc"], 2, "sft: train.lr='abc' is not a number (e.g. train.lr=1e-4)"),
    (["sft", "train.lrr=1e-3"], 2, "sft: unknown option train.lrr (did you mean train.lr?)"),
    (["sft", "--config", "nonexistent"], 2,
     "sft: no preset 'nonexistent'; presets: paper-2b, paper-8b, small, tiny, whisper-qwen (or "
     "give a YAML file)"),
    (["sft", "train.lr"], 2, "sft: 'train.lr' is not a key=value override (e.g. train.lr=1e-4; "
                             "a preset goes after --config)"),
    (["sft"], 1, f"sft: missing input(s): {TINY_PATHS} (relative to {{cwd}}); these are the "
                 "tiny preset's paths: make them with the commands at the top of "
                 "configs/tiny.yaml (or `speechrl demo`), or point elsewhere with key=PATH "
                 "overrides"),
    (["sft", "train.schedule=cosin"], 2,
     "sft: unknown train.schedule 'cosin'; one of constant, cosine (did you mean cosine?)"),
    (["sft", "train.parallel=zero3"], 2, "sft: unknown train.parallel 'zero3'; one of ddp, fsdp2"),
    (["sft", "data.features=waveform"], 2,
     "sft: data.features=waveform does not fit the conformer encoder, which takes fbank "
     "features: leave data.features unset (it follows the encoder)"),
    (["grpo", "grpo.strategy=beem"], 2,
     "grpo: unknown grpo.strategy 'beem'; one of sample, beam (did you mean beam?)"),
    (["grpo", "grpo.scale=grp"], 2,
     "grpo: unknown grpo.scale 'grp'; one of group, batch, none (did you mean group?)"),
    (["grpo", "grpo.algorithm=ppo"], 2,
     "grpo: unknown grpo.algorithm 'ppo'; one of grpo, dapo, dr_grpo"),
    (["grpo", "grpo.group_size=1"], 2,
     "grpo: grpo.group_size=1 must be >= 2: a group of one candidate has zero advantage and "
     "teaches nothing"),
    (["grpo", "grpo.reward=wre"], 2,
     "grpo: grpo.reward: unknown reward 'wre'; known: del, ed, em, ins, sub, wer, "
     "a weighted sum such as 0.7*wer+0.3*em, or package.module:function (did you mean wer?)"),
    (["grpo", "grpo.reward=0.5*wer+0.5*nomodule_here:score"], 2,
     "grpo: grpo.reward: reward 'nomodule_here:score': cannot import module 'nomodule_here'"),
    (["synth", "--out", "corpus", "--langs", "en,xx"], 2,
     "synth: --langs en,xx: xx not in the corpus; choose from en,fr,de,it,es"),
    (["synth", "--out", "corpus", "--utts", "0"], 2, "synth: --utts 0: give at least 1"),
    (["synth", "--out", "corpus", "--test-utts", "0"], 2, "synth: --test-utts 0: give at least 1"),
    (["eval", "--checkpoint", "a", "--data", "d.jsonl", "--out", "o", "--device", "gpu"], 2,
     "speechrl eval: argument --device: unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps "
     "(see speechrl eval --help)"),
    (["transcribe", "a.wav"], 2, "speechrl transcribe: the following arguments are required: "
                                 "--checkpoint (see speechrl transcribe --help)"),
    (["pretrain-lm", "data.train=[a_file]", "data.dev=[]", "train.output_dir=a_file/run"], 1,
     "pretrain-lm: train.output_dir a_file/run: a_file is a file, not a folder; give a folder "
     "(it is made if missing)"),
    (["demo", "--out", "a_file/demo"], 1,
     "demo: --out a_file/demo: a_file is a file, not a folder; give a folder (it is made if "
     "missing)"),
]


@pytest.mark.parametrize(("args", "status", "line"), BEFORE_ANY_WORK,
                         ids=[" ".join(case[0]) for case in BEFORE_ANY_WORK])
def test_a_mistake_is_one_line_before_any_work(tmp_path, args, status, line):
    (tmp_path / "a_file").write_text("not a folder")
    code, out, err = speechrl_cli(*args, cwd=tmp_path)
    assert (code, one_line(err), out) == (status, line.format(cwd=tmp_path), "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing made


def test_help_is_fast_and_says_what_each_stage_does_and_its_defaults(tmp_path):
    probe = ("import sys\nfrom speechrl.cli import main\ntry:\n    main(['--help'])\n"
             "except SystemExit:\n    pass\nprint('torch imported' if 'torch' in sys.modules "
             "else 'no torch')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env(), cwd=tmp_path)
    assert proc.stdout.splitlines()[-1] == "no torch"
    assert "pretrain-encoder" in proc.stdout and "Exit status: 0 done; 1 an input" in proc.stdout
    for stage, description in (("pretrain-lm", "Text-only LM pre-training (paper eq. 1)."),
                               ("sft", "Supervised fine-tuning of the speech-LLM (paper eq. 2)."),
                               ("grpo", "GRPO / DAPO / Dr. GRPO fine-tuning (paper eq. 3-9).")):
        code, out, _ = speechrl_cli(stage, "--help", cwd=tmp_path)
        text = " ".join(out.split())
        assert code == 0 and description in text, out
        assert "(default: tiny, the CPU demo's scale)" in text
    code, out, _ = speechrl_cli("eval", "--help", cwd=tmp_path)
    assert "(default: auto)" in " ".join(out.split())


def test_a_progress_bar_keeps_its_line_when_a_stage_says_something(capsys):
    from speechrl.runtime import progress, say

    bar = progress(10, 0, "sft")
    bar.update(1)
    bar.refresh()
    say("step 1: dev loss 1.000, dev WER 50.00%")
    bar.close()
    err = capsys.readouterr().err
    before = err[: err.index("step 1: dev")]
    # The message starts a line of its own (the bar's line was cleared first), not the bar's.
    assert before.endswith("\r") or before.endswith("\n"), repr(err)
    assert "sft:" in before


# --------------------------------------------------------------------------- after some work


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_model_config_module) -> dict[str, Path]:
    """A finished 2-step SFT run (``last`` and ``best``), its YAML config, and a tone corpus."""
    from speechrl.train.sft import train_sft

    root = tmp_path_factory.mktemp("cli")
    corpus = {"train": write_tone_corpus(root / "train", 8, seed=0),
              "dev": write_tone_corpus(root / "dev", 2, seed=1)}
    cfg = run_config(root, corpus, tiny_model_config_module, max_steps=2, save_every=1,
                     batch_size=4, dev_utterances=2)
    train_sft(cfg)
    config = root / "sft.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    return {"root": root, "run": root / "run", "config": config, **corpus}


def test_resume_refuses_other_settings_and_keeps_the_run(done, tmp_path):
    run = done["run"]
    kept = (run / "sft_config.json", run / "last" / "model.safetensors",
            run / "last" / "trainer_state.json")
    before = {p: p.read_bytes() for p in kept}
    code, out, err = speechrl_cli("sft", "--config", done["config"], "train.max_steps=3",
                                  "train.warmup_steps=5", "train.weight_decay=0.1", cwd=tmp_path)
    assert code == 2 and out == ""
    assert one_line(err) == (
        f"sft: {run / 'last'} was trained with other settings: train.warmup_steps 2 -> 5, "
        "train.weight_decay 0.01 -> 0.1; these cannot change when a run resumes: give the old "
        "values to resume it, or start afresh with a new train.output_dir")
    assert {p: p.read_bytes() for p in before} == before  # not even the record was rewritten


def test_resume_applies_a_constant_schedules_new_lr_and_records_it(done, tmp_path):
    """The issue's case: 2 steps at lr 3e-3, then resumed for a third with lr 1e-2. The step is
    taken at the new rate, and the record says so."""
    run = shutil.copytree(done["run"], tmp_path / "run")
    cfg = yaml.safe_load(done["config"].read_text())
    cfg["train"]["output_dir"] = str(run)
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(cfg))
    code, out, err = speechrl_cli("sft", "--config", config, "train.max_steps=3", "train.lr=1e-2",
                                  cwd=tmp_path)
    assert code == 0, err
    # The folder moved (a copy), which a resume may do too.
    assert (f"sft: resuming with train.output_dir {str(done['run'])!r} -> {str(run)!r}, train.lr "
            "0.003 -> 0.01, train.max_steps 2 -> 3 (the constant schedule's new rate applies "
            "from the next step)") in messages(err)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/lr"] for r in rows if r["step"] == 3 and "train/lr" in r] == [0.01]
    recorded = json.loads((run / "sft_config.json").read_text())["train"]
    assert (recorded["lr"], recorded["max_steps"]) == (0.01, 3)


def test_eval_checks_its_inputs_before_decoding(done, tmp_path):
    best = done["run"] / "best"
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--metrics", "x=nope.jsonl"], "eval: --metrics x: no metrics file at nope.jsonl"),
        (["--data", "gone.jsonl"], "eval: --data gone: no manifest at gone.jsonl"),
        (["--pool", "seeds"], "eval: --pool 'seeds': write NAME=CKPT,CKPT[,...] (checkpoint "
                              "names as the report gives them)"),
        (["--pool", "=s0,s1"], "eval: --pool: give it a name: write NAME=CKPT,CKPT[,...]"),
        (["--pool", "seeds=s0,s1"], "eval: --pool 'seeds': s0, s1 not among the "
                                    "checkpoints (run)"),
    ]
    for extra, line in cases:
        code, _, err = speechrl_cli("eval", "--checkpoint", best, "--data", done["dev"],
                                    "--out", "report", *extra, cwd=tmp_path)
        assert (code, one_line(err)) == (1, line)
    code, _, err = speechrl_cli("eval", "--checkpoint", best, "--data", done["dev"],
                                "--out", "a_file", cwd=tmp_path)
    assert (code, one_line(err)) == (1, "eval: --out a_file: a_file is a file, not a folder; "
                                        "give a folder (it is made if missing)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing decoded


def test_eval_pools_seeds(done, tmp_path):
    """Two "seeds" that are the baseline's own checkpoint: the pool and each run change nothing,
    so every pooled change is 0 with the interval [0, 0]."""
    best = done["run"] / "best"
    code, _, err = speechrl_cli("eval", "--checkpoint", f"base={best}", "--checkpoint",
                                f"s0={best}", "--checkpoint", f"s1={best}", "--data", done["dev"],
                                "--out", "report", "--device", "cpu", "--pool", "seeds=s0,s1",
                                cwd=tmp_path)
    assert code == 0, err
    [pool] = json.loads((tmp_path / "report" / "report.json").read_text())["pools"]
    assert (pool["name"], pool["members"], pool["baseline"]) == ("seeds", ["s0", "s1"], "base")
    wer = pool["sets"]["manifest"]["change"]["wer_pct"]
    assert (wer["delta"], wer["low"], wer["high"], wer["significant"]) == (0.0, 0.0, 0.0, False)
    assert "| `seeds` | `manifest` | WER | +0.00 [+0.00, +0.00] |" in (
        tmp_path / "report" / "report.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only machine")
def test_eval_on_cuda_without_a_gpu_says_so(done, tmp_path):
    code, _, err = speechrl_cli("eval", "--checkpoint", done["run"] / "best", "--data",
                                done["dev"], "--out", "report", "--device", "cuda", cwd=tmp_path)
    build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
    assert (code, one_line(err)) == (
        1, f"eval: device 'cuda' asked for, but this machine has no usable GPU (torch "
           f"{torch.__version__}: {build}); use cpu or auto")


def test_eval_names_best_checkpoints_by_their_run_and_keeps_what_it_decoded(done, tmp_path):
    """Two unnamed .../best checkpoints are called after their runs; the second one's weights
    are corrupt, which only loading finds: the first one's report is written all the same."""
    for run in ("sft", "grpo"):
        shutil.copytree(done["run"] / "best", tmp_path / run / "best")
    weights = tmp_path / "grpo" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, out, err = speechrl_cli("eval", "--checkpoint", "sft/best", "--checkpoint", "grpo/best",
                                  "--data", done["dev"], "--out", "report", "--device", "cpu",
                                  cwd=tmp_path)
    report = tmp_path / "report"
    assert code == 1 and out == ""
    [line] = [m for m in messages(err) if m.startswith("eval:")
              and not m.startswith("eval: precision ")]  # (the line saying which it chose)
    assert line.startswith(f"eval: {Path('grpo/best/model.safetensors')} is unreadable")
    assert line.endswith(f"; what was decoded before is in {Path('report/report.md')}")
    results = json.loads((report / "report.json").read_text())["results"]
    assert list(results) == ["sft"] and results["sft"]["manifest"]["utterances"] == 2


def test_transcribe_reports_each_bad_file_and_transcribes_the_rest(done, tmp_path):
    audio = done["dev"].parent
    short = tmp_path / "short.wav"
    sf.write(short, np.full(800, 0.1, dtype=np.float32), 16000)  # 0.05 s
    files = [audio / "utt000.wav", tmp_path / "missing.wav", short, audio / "utt001.wav"]
    code, out, err = speechrl_cli("transcribe", "--checkpoint", done["run"] / "best",
                                  "--device", "cpu", *files, cwd=tmp_path)
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(files[0]), str(files[3])]
    assert messages(err) == [f"transcribe: {files[1]}: no such audio file",
                             f"transcribe: {short}: too short (0.050 s < 0.1 s)"]


def test_a_demo_stage_that_cannot_resume_says_to_use_a_new_out(tmp_path, monkeypatch, capsys):
    """A stage's settings that differ from those it would resume (a demo restarted at another
    scale or precision): the line ends with what starting afresh means for the demo."""
    from speechrl import cli, demo
    from speechrl.config import ConfigError

    def refuse(*args, **kwargs):
        raise ConfigError("runs/x/sft/last was trained with other settings: train.warmup_steps "
                          "30 -> 100; ... or start afresh with a new train.output_dir")

    monkeypatch.setattr(demo, "run_demo", refuse)
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err == (
        "demo: runs/x/sft/last was trained with other settings: train.warmup_steps 30 -> 100; "
        "... or start afresh with a new train.output_dir (for the demo: a new --out)\n")


def test_demo_stopped_by_sigterm_exits_143_with_how_to_resume(done, tmp_path):
    """The demo's pre-training stage stopped by SIGTERM: the stage saves and stops, and the
    demo says how to go on. (Data: the tone corpus in place of the synthetic one.)"""
    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    for split in ("train", "dev"):  # LM pre-training reads the text alone
        shutil.copy(done[split], out / "data" / f"{split}.jsonl")
    (out / "data" / "corpus.json").write_text("{}")  # the corpus counts as made
    script = ("import sys\nimport speechrl.demo as demo\n"
              "demo.FULL = demo.DemoScale(utts=1, eval_utts=None, lm_steps=100000, ctc_steps=1, "
              "sft_steps=1, grpo_steps=1, adapt_steps=1, eval_every=1)\n"
              "from speechrl.cli import main\nsys.exit(main(['demo', '--out', sys.argv[1]]))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], cwd=tmp_path, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "lm" / "metrics.jsonl").exists():  # 10 steps done: it is training
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    step = json.loads((out / "lm" / "last" / "trainer_state.json").read_text())["step"]
    assert proc.returncode == 128 + signal.SIGTERM
    assert [m for m in messages(err) if m.startswith("demo:")] == [
        f"demo: pretrain-lm: stopped by SIGTERM after step {step}; checkpoint saved in "
        f"{out / 'lm' / 'last'}. Run the same command again to resume. (speechrl demo --out "
        f"{out})"]
    assert 10 <= step < 100000
