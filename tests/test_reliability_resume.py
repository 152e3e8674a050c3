"""Runs that are stopped, killed, fed NaNs or refused a disk: each must keep a whole checkpoint,
say what happened, and (run again) end with exactly the weights of an uninterrupted run.

The interrupted runs are real ``python -m speechrl.cli`` processes, so that the signals reach
the same code a user's job scheduler would; the uninterrupted reference runs in-process."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import assert_same_checkpoint, run_config, stop_after

from speechrl.config import DecodingConfig, GRPOConfig, RunConfig
from speechrl.configio import to_dict


@pytest.fixture(scope="session")
def corpus(small_tone_corpus) -> dict[str, Path]:
    return small_tone_corpus


def sft_config(root: Path, corpus, model_cfg, **train) -> RunConfig:
    settings = dict(max_steps=12, save_every=2, eval_every=1000, batch_size=4, dev_utterances=4)
    settings.update(train)
    return run_config(root, corpus, model_cfg, **settings)


def grpo_config(root: Path, corpus, model_cfg, init: Path, **train) -> RunConfig:
    settings = dict(max_steps=8, save_every=2, eval_every=1000, batch_size=2, dev_utterances=4,
                    lr=1e-3, init=str(init))
    settings.update(train)
    cfg = run_config(root, corpus, model_cfg, **settings)
    return dataclasses.replace(cfg, grpo=GRPOConfig(group_size=4),
                               decoding=DecodingConfig(max_new_tokens=8))


def start(stage: str, cfg: RunConfig, folder: Path) -> subprocess.Popen:
    """``python -m speechrl.cli <stage> --config <yaml>``: the user's command, in the background."""
    config = folder / f"{stage}.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "speechrl.cli", stage, "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path} appeared:\n"
                                 f"{proc.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def last_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return load_file(str(Path(cfg.train.output_dir) / "last" / "model.safetensors"))


def last_step(cfg: RunConfig) -> int:
    state = Path(cfg.train.output_dir) / "last" / "trainer_state.json"
    return json.loads(state.read_text())["step"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, corpus, tiny_model_config_module):
    """The uninterrupted 12-step SFT run every interrupted one must end up equal to."""
    from speechrl.train.sft import train_sft

    cfg = sft_config(tmp_path_factory.mktemp("straight"), corpus, tiny_model_config_module)
    train_sft(cfg)
    return last_weights(cfg)


def test_sigterm_saves_exits_nonzero_and_resumes_exactly(tmp_path, corpus, sft_reference,
                                                         tiny_model_config_module):
    # save_every beyond max_steps: the only checkpoint before the end is the one the signal makes.
    cfg = sft_config(tmp_path, corpus, tiny_model_config_module, save_every=1000)
    proc = start("sft", cfg, tmp_path)
    wait_for(tmp_path / "run" / "metrics.jsonl", proc)  # the first step is logged
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Run the same command again to resume" in err
    stopped_at = last_step(cfg)
    assert 1 <= stopped_at < 12
    rc, err = finish(start("sft", cfg, tmp_path))
    assert rc == 0, err
    assert f"resuming sft from {tmp_path / 'run' / 'last'} at step {stopped_at}" in err
    assert last_step(cfg) == 12
    # The reference saved every 2 steps, this run only on the signal: saving changes nothing.
    assert_same_weights(last_weights(cfg), sft_reference)


# A run of 6 steps stopped after step 2, mid warm-up of the cosine schedule (4 steps): every
# random draw (dropout, augmentation, the data order) and every counter must continue as if
# it had not stopped. name: (stage, signal, encoder changes, data.augment, train settings)
STOPPED_RUNS = {
    "lm": ("pretrain-lm", signal.SIGTERM, {}, False, dict(batch_size=8)),
    "ctc-dropout-augment": ("pretrain-encoder", signal.SIGTERM, dict(dropout=0.1), True,
                            dict(batch_size=4)),
    # A trainable encoder, so that its dropout is live; SIGINT is Ctrl-C.
    "sft-dropout-augment-accum": ("sft", signal.SIGINT, dict(dropout=0.1, freeze=False), True,
                                  dict(batch_size=2, grad_accum=2)),
    # 4 steps an epoch: the resumed run meets in epoch 2 the utterances the stopped run had
    # cached, its cache empty.
    "sft-cache-accum": ("sft", signal.SIGTERM, {}, False,
                        dict(batch_size=4, grad_accum=2, cache_encoder_outputs=True)),
}


@pytest.mark.parametrize("name", STOPPED_RUNS)
def test_a_run_stopped_mid_warmup_resumes_to_the_uninterrupted_state(
        tmp_path, corpus, tiny_model_config_module, monkeypatch, name):
    from speechrl.config import ModelConfig, ProjectorConfig
    from speechrl.train import ctc, lm, sft
    from speechrl.train.stopping import RunStopped

    stage, signum, encoder, augment, settings = STOPPED_RUNS[name]
    module, train = {"pretrain-lm": (lm, lm.train_lm), "pretrain-encoder": (ctc, ctc.train_ctc),
                     "sft": (sft, sft.train_sft)}[stage]
    tiny = tiny_model_config_module
    model_cfg = {
        "pretrain-lm": ModelConfig(projector=ProjectorConfig(stack=2)),
        "pretrain-encoder": ModelConfig(encoder=dataclasses.replace(tiny.encoder, **encoder)),
        "sft": dataclasses.replace(tiny, encoder=dataclasses.replace(tiny.encoder, **encoder)),
    }[stage]

    def config(folder: str) -> RunConfig:
        cfg = run_config(tmp_path / folder, corpus, model_cfg, schedule="cosine", warmup_steps=4,
                         max_steps=6, save_every=1000, eval_every=1000, **settings)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dev=(),
                                                                 augment=augment))

    train(config("straight"))
    stop_after(monkeypatch, module, 2, signum)
    with pytest.raises(RunStopped) as stopped:
        train(config("stopped"))
    assert stopped.value.exit_code == 128 + signum
    assert last_step(config("stopped")) == 2
    train(config("stopped"))  # the same command again: it resumes
    assert_same_checkpoint(tmp_path / "straight" / "run" / "last",
                           tmp_path / "stopped" / "run" / "last")


def test_kill9_during_sft_resumes_exactly(tmp_path, corpus, sft_reference,
                                          tiny_model_config_module):
    cfg = sft_config(tmp_path, corpus, tiny_model_config_module)
    proc = start("sft", cfg, tmp_path)
    wait_for(tmp_path / "run" / "last" / "trainer_state.json", proc)
    proc.kill()  # SIGKILL: no handler runs, no checkpoint is written on the way out
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = last_step(cfg)
    assert killed_at < 12 and killed_at % 2 == 0
    rc, err = finish(start("sft", cfg, tmp_path))
    assert rc == 0, err
    assert f"at step {killed_at}" in err
    assert_same_weights(last_weights(cfg), sft_reference)


def test_kill9_during_grpo_resumes_exactly(tmp_path, corpus, tiny_model_config_module):
    from speechrl.train.grpo import train_grpo
    from speechrl.train.sft import train_sft

    init = train_sft(sft_config(tmp_path / "sft", corpus, tiny_model_config_module, max_steps=2))
    straight = grpo_config(tmp_path / "straight", corpus, tiny_model_config_module, init)
    train_grpo(straight)
    cfg = grpo_config(tmp_path / "killed", corpus, tiny_model_config_module, init)
    proc = start("grpo", cfg, tmp_path)
    wait_for(tmp_path / "killed" / "run" / "last" / "trainer_state.json", proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = last_step(cfg)
    assert killed_at < 8
    rc, err = finish(start("grpo", cfg, tmp_path))
    assert rc == 0, err
    assert f"resuming grpo from {tmp_path / 'killed' / 'run' / 'last'} at step {killed_at}" in err
    assert_same_weights(last_weights(cfg), last_weights(straight))


def test_nonfinite_steps_in_a_row_stop_with_a_checkpoint(tmp_path, corpus,
                                                        tiny_model_config_module, monkeypatch):
    from speechrl.train import sft as sft_stage
    from speechrl.train.stopping import RunStopped

    good = sft_config(tmp_path / "good", corpus, tiny_model_config_module, max_steps=2)
    sft_stage.train_sft(good)
    calls = {"n": 0}
    real_loss = sft_stage.sft_loss

    def loss_nan_from_step_3(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss

    monkeypatch.setattr(sft_stage, "sft_loss", loss_nan_from_step_3)
    cfg = sft_config(tmp_path / "nan", corpus, tiny_model_config_module, max_steps=20,
                     save_every=1000, max_nonfinite_steps=3)
    with pytest.raises(RunStopped, match="3 non-finite steps in a row .* up to step 5") as info:
        sft_stage.train_sft(cfg)
    assert info.value.exit_code == 1 and "Lower train.lr or check the data" in str(info.value)
    # Steps 1-2 were good, 3-5 skipped (counted, the weights untouched): the checkpoint holds
    # step 5, three skips, and exactly the weights of a 2-step run.
    state = json.loads((Path(cfg.train.output_dir) / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["nonfinite_in_row"], state["nonfinite_total"]) == (5, 3, 3)
    assert_same_weights(last_weights(cfg), last_weights(good))


@pytest.mark.parametrize("stage", ["pretrain-lm", "pretrain-encoder"])
def test_pretraining_counts_nonfinite_steps_and_stops(tmp_path, corpus, tiny_encoder_config,
                                                      monkeypatch, stage):
    """LM and CTC pre-training skip, count and stop on non-finite steps as SFT does: the losses
    of steps 3-5 are made NaN before the real update sees them."""
    from speechrl.config import ModelConfig, ProjectorConfig
    from speechrl.train import common, ctc, lm
    from speechrl.train.stopping import RunStopped

    module, train = (lm, lm.train_lm) if stage == "pretrain-lm" else (ctc, ctc.train_ctc)
    model_cfg = ModelConfig(projector=ProjectorConfig(stack=2)) if stage == "pretrain-lm" \
        else ModelConfig(encoder=tiny_encoder_config)
    settings = dict(batch_size=8) if stage == "pretrain-lm" else {}

    def config(folder: str, **train_settings) -> RunConfig:
        return run_config(tmp_path / folder, corpus, model_cfg, eval_every=1000, **settings,
                          **train_settings)

    train(config("good", max_steps=2, save_every=2))
    calls = {"n": 0}

    def nan_from_step_3(run, model, optimizer, scheduler, state, bar, loss):
        calls["n"] += 1
        loss = loss * float("nan") if calls["n"] > 2 else loss
        common.pretraining_update(run, model, optimizer, scheduler, state, bar, loss)

    monkeypatch.setattr(module, "pretraining_update", nan_from_step_3)
    cfg = config("nan", max_steps=20, save_every=1000, max_nonfinite_steps=3)
    with pytest.raises(RunStopped, match="3 non-finite steps in a row .* up to step 5") as info:
        train(cfg)
    assert info.value.exit_code == 1
    state = json.loads((Path(cfg.train.output_dir) / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["nonfinite_in_row"], state["nonfinite_total"]) == (5, 3, 3)
    assert_same_weights(last_weights(cfg), last_weights(config("good", max_steps=2)))

def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, corpus,
                                                       tiny_model_config_module, monkeypatch,
                                                       capsys):
    import errno

    import speechrl.checkpoint as ckpt
    from speechrl.train.sft import train_sft

    real_write = ckpt.write_checkpoint

    def disk_full_at_step_4(model, folder, **kwargs):
        real_write(model, folder, **kwargs)  # the files are there when the disk fills up
        step = (kwargs.get("trainer_state") or {}).get("step")
        if folder.name.startswith(".last.tmp-") and step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_checkpoint", disk_full_at_step_4)
    cfg = sft_config(tmp_path, corpus, tiny_model_config_module, max_steps=4, save_every=2)
    last = Path(cfg.train.output_dir) / "last"
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    from speechrl.cli import main

    assert main(["sft", "--config", str(config)]) == 1  # a message, not a stack trace
    assert (f"sft: could not write the checkpoint {last}: [Errno 28] No space left on device; "
            f"the previous checkpoint in {last} is unchanged") in capsys.readouterr().err
    assert last_step(cfg) == 2  # the step-2 checkpoint, whole: it loads and it resumes
    model = ckpt.load_model(last)
    weights = last_weights(cfg)
    assert all(torch.equal(t, weights[k]) for k, t in model.state_dict().items() if k in weights)
    # No half-written folder is left beside it.
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []
    monkeypatch.setattr(ckpt, "write_checkpoint", real_write)
    train_sft(cfg)
    assert last_step(cfg) == 4


@pytest.mark.parametrize("stage", ["pretrain-lm", "pretrain-encoder"])
def test_sigterm_stops_the_pretraining_stages_with_a_checkpoint(tmp_path, corpus, stage,
                                                                tiny_encoder_config):
    from speechrl.config import ModelConfig, ProjectorConfig

    model_cfg = (ModelConfig(projector=ProjectorConfig(stack=2)) if stage == "pretrain-lm"
                 else ModelConfig(encoder=tiny_encoder_config))
    cfg = run_config(tmp_path, corpus, model_cfg, max_steps=400, batch_size=8,
                     eval_every=1000, save_every=1000)
    proc = start(stage, cfg, tmp_path)
    wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert f"{stage}: stopped by SIGTERM after step" in err
    assert "Run the same command again to resume" in err
    assert 1 <= last_step(cfg) < 400


def test_kill_between_the_renames_of_a_save_loses_no_checkpoint(tmp_path, corpus,
                                                                 tiny_model_config_module,
                                                                 capsys):
    from speechrl.train.sft import train_sft

    cfg = sft_config(tmp_path, corpus, tiny_model_config_module, max_steps=2)
    train_sft(cfg)
    last = Path(cfg.train.output_dir) / "last"
    # What a kill leaves after the old folder was moved aside and before the new one came in.
    last.rename(last.parent / ".last.old-12345")
    (last.parent / ".last.tmp-abc").mkdir()
    train_sft(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=4)))
    err = capsys.readouterr().err
    assert "the previous checkpoint is back in place" in err
    assert f"resuming sft from {last} at step 2" in err
    assert last_step(cfg) == 4


# --------------------------------------------------------------------------- skips.json on a stop


# The rows planted beside the clean corpus, and what skips.json must say of them.
PLANTED_SKIPS = {"train": {"empty text": 1, "missing audio file": 1, "not valid JSON": 1},
                 "dev": {"missing audio file": 1}}


def with_bad_rows(corpus) -> dict[str, Path]:
    """Copies of the corpus manifests (same folders, so the audio paths hold) with the rows of
    PLANTED_SKIPS added."""
    dirty = {}
    for split in ("train", "dev"):
        rows = corpus[split].read_text().splitlines()
        first = json.loads(rows[0])
        missing = json.dumps({**first, "id": "gone", "audio": "nowhere.wav"})
        planted = [missing]
        if split == "train":
            planted += [json.dumps({**first, "id": "blank", "text": ""}), '{"id": "cut', ]
        dirty[split] = corpus[split].parent / "with_bad_rows.jsonl"
        dirty[split].write_text("\n".join(rows + planted) + "\n")
    return dirty


def skips_json(cfg: RunConfig) -> dict:
    return json.loads((Path(cfg.train.output_dir) / "skips.json").read_text())


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_run_stopped_by_a_signal_writes_skips_json(tmp_path, corpus, tiny_model_config_module,
                                                     stage):
    from speechrl.train.sft import train_sft

    dirty = with_bad_rows(corpus)
    cfg = sft_config(tmp_path, dirty, tiny_model_config_module, max_steps=400, save_every=1000)
    if stage == "grpo":
        init = train_sft(sft_config(tmp_path / "init", corpus, tiny_model_config_module,
                                    max_steps=1))
        cfg = grpo_config(tmp_path, dirty, tiny_model_config_module, init, max_steps=400,
                          save_every=1000)
    proc = start(stage, cfg, tmp_path)
    wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 128 + signal.SIGTERM, err
    assert last_step(cfg) < 400  # stopped early, and yet:
    assert skips_json(cfg) == PLANTED_SKIPS
    assert f"{stage}, train data: skipped 3 row(s): " in err


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # no step is ever taken
def test_a_run_stopped_by_nonfinite_steps_writes_skips_json(tmp_path, corpus,
                                                            tiny_model_config_module,
                                                            monkeypatch):
    from speechrl.train import grpo as grpo_stage
    from speechrl.train.sft import train_sft
    from speechrl.train.stopping import RunStopped

    init = train_sft(sft_config(tmp_path / "init", corpus, tiny_model_config_module,
                                max_steps=1))
    real_loss = grpo_stage.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return loss * float("nan"), stats

    monkeypatch.setattr(grpo_stage, "policy_loss", nan_loss)
    cfg = grpo_config(tmp_path, with_bad_rows(corpus), tiny_model_config_module, init,
                      max_steps=20, save_every=1000, max_nonfinite_steps=2)
    with pytest.raises(RunStopped, match="2 non-finite steps in a row .* up to step 2"):
        grpo_stage.train_grpo(cfg)
    assert skips_json(cfg) == PLANTED_SKIPS
