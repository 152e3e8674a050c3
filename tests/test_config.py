"""config.py: every option checked when the config is built, with the key, what it accepts and
the closest key or value in the message; what each stage needs; the checks a resumed run makes
against the settings of the run it resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from speechrl.config import (
    CHOICES,
    ENCODER_FEATURES,
    ConfigError,
    InputError,
    RunConfig,
    TrainConfig,
    load_run_config,
)
from speechrl.configio import to_dict
from speechrl.preflight import check_stage


def refused(overrides: list[str], stage: str | None = "sft", preset: str = "tiny") -> str:
    with pytest.raises(ConfigError) as err:
        cfg = load_run_config(preset, overrides, stage=stage)
        check_stage(cfg, stage)
    return str(err.value)


@pytest.mark.parametrize(("override", "message"), [
    ("train.schedule=cosin", "unknown train.schedule 'cosin'; one of constant, cosine "
                             "(did you mean cosine?)"),
    ("grpo.strategy=beem", "unknown grpo.strategy 'beem'; one of sample, beam (did you mean "
                           "beam?)"),
    ("grpo.scale=grp", "unknown grpo.scale 'grp'; one of group, batch, none (did you mean "
                       "group?)"),
    ("grpo.agg=mean", "unknown grpo.agg 'mean'; one of seq_mean_token_mean, token_mean, "
                      "seq_mean_token_sum_norm"),
    ("grpo.algorithm=ppo", "unknown grpo.algorithm 'ppo'; one of grpo, dapo, dr_grpo"),
    ("train.parallel=zero3", "unknown train.parallel 'zero3'; one of ddp, fsdp2"),
    ("train.device=gpu", "train.device: unknown device 'gpu'; use auto, cpu, cuda, cuda:N or "
                         "mps"),
    ("grpo.group_size=1", "grpo.group_size=1 must be >= 2: a group of one candidate has zero "
                          "advantage and teaches nothing"),
    ("train.eval_every=0", "train.eval_every=0 must be >= 1"),
    ("grpo.top_p=0", "grpo.top_p=0.0 must be in (0.0, 1.0]"),
    ("train.lr=abc", "train.lr='abc' is not a number (e.g. train.lr=1e-4)"),
    ("train.max_steps=1.5", "train.max_steps=1.5 is not a whole number (e.g. train.max_steps=10)"),
    ("data.strict=maybe", "data.strict='maybe' is not a boolean (true or false)"),
    ("train.lrr=1e-3", "unknown option train.lrr (did you mean train.lr?)"),
    ("train.group_size=4", "unknown option train.group_size (did you mean grpo.group_size?)"),
    ("train.lr.peak=1", "train.lr is a single value, not a section: got {'peak': 1}"),
    ("train=5", "train is a section, not a value: set its options one by one (e.g. "
                "train.NAME=VALUE), not 5"),
    ("train.lr", "'train.lr' is not a key=value override (e.g. train.lr=1e-4; a preset goes "
                 "after --config)"),
    ("data.features=waveform", "data.features=waveform does not fit the conformer encoder, "
                               "which takes fbank features: leave data.features unset (it "
                               "follows the encoder)"),
])
def test_a_wrong_option_is_refused_when_the_config_is_built(override, message):
    assert refused([override]) == message


def test_an_unknown_key_without_a_close_one_lists_the_section():
    message = refused(["train.colour=red"])
    assert message.startswith("unknown option train.colour; train options: adam_betas, ")
    assert "warmup_steps" in message


def test_values_are_typed_as_the_fields_say():
    cfg = load_run_config("tiny", ["train.max_steps=1e3", "train.lr=3e-4", "data.strict=1",
                                   "grpo.reward=0.5*wer+0.5*em", "model.encoder.layers=[1,2]"])
    assert (cfg.train.max_steps, cfg.train.lr, cfg.data.strict) == (1000, 3e-4, True)
    assert cfg.model.encoder.layers == (1, 2)


def test_an_unknown_preset_lists_the_presets():
    assert refused([], preset="tny") == ("no preset 'tny'; presets: paper-2b, paper-8b, small, "
                                         "tiny, whisper-qwen (or give a YAML file) (did you mean "
                                         "tiny?)")
    assert refused([], preset="nowhere.yaml").startswith("no config file nowhere.yaml; give a "
                                                         "YAML file or a preset: paper-2b, ")


def test_a_yaml_file_that_does_not_parse_names_itself(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: 1e-4\n")
    message = refused([], preset=str(bad))
    assert message.startswith(f"{bad} is not valid YAML: ") and "\n" not in message


@pytest.mark.parametrize(("spec", "message"), [
    ("wre", "grpo.reward: unknown reward 'wre'; known: del, ed, em, ins, sub, wer, "
            "a weighted sum such as 0.7*wer+0.3*em, or package.module:function (did you mean "
            "wer?)"),
    ("nomodule_here:score", "grpo.reward: reward 'nomodule_here:score': cannot import module "
                            "'nomodule_here'"),
    ("json:nothing", "grpo.reward: reward 'json:nothing': json has no function 'nothing'"),
])
def test_grpo_resolves_its_reward_before_loading_anything(tmp_path, spec, message):
    overrides = [f"grpo.reward={spec}", f"train.init={tmp_path}"]
    assert refused(overrides, stage="grpo") == message


def test_grpo_needs_train_init():
    assert refused(["train.init=null"], stage="grpo").startswith(
        "GRPO starts from a trained model: set train.init=<SFT checkpoint>")


def test_missing_inputs_are_named_all_at_once_with_where_they_came_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where runs/tiny/... does not exist
    overrides = ["data.dev=[/nowhere/dev.jsonl]"]
    with pytest.raises(InputError) as err:
        check_stage(load_run_config("tiny", overrides, stage="sft"), "sft", source="tiny",
                    overrides=overrides)
    assert str(err.value) == (
        "missing input(s): data.train=runs/tiny/data/train.jsonl, data.dev=/nowhere/dev.jsonl, "
        "model.llm.path=runs/tiny/lm/model, model.tokenizer=runs/tiny/lm/model, "
        f"model.encoder.path=runs/tiny/encoder/encoder (relative to {tmp_path}); "
        "data.train, model.llm.path, model.tokenizer, model.encoder.path are the tiny preset's "
        "paths: make them with the commands at the top of configs/tiny.yaml (or `speechrl "
        "demo`), or point elsewhere with key=PATH overrides")
    # Starting from a checkpoint, the model comes from it alone.
    (tmp_path / "data").mkdir()
    for name in ("train.jsonl", "dev.jsonl"):
        (tmp_path / "data" / name).write_text("")
    data = [f"data.train=[{tmp_path}/data/train.jsonl]", f"data.dev=[{tmp_path}/data/dev.jsonl]"]
    with pytest.raises(InputError, match=r"^missing input\(s\): train.init=/gone$"):
        check_stage(load_run_config("tiny", data + ["train.init=/gone"], stage="sft"), "sft")


def test_the_choices_are_those_the_modules_implement():
    from speechrl import audio, distributed, encoders, losses, model, text

    assert CHOICES["grpo.scale"] == losses.SCALES
    assert CHOICES["grpo.agg"] == losses.AGGREGATIONS
    assert set(CHOICES["grpo.algorithm"]) == set(losses.PRESETS)
    assert CHOICES["train.parallel"] == distributed.STRATEGIES
    assert CHOICES["decoding.normalizer"] == text.NORMALIZERS
    assert CHOICES["model.encoder.kind"] == encoders.ENCODER_KINDS
    assert CHOICES["data.features"] == audio.FEATURE_KINDS == encoders.INPUT_KINDS
    assert set(CHOICES["model.llm.preset"]) == set(model.LLM_PRESETS)
    assert set(CHOICES["model.llm.dtype"]) == set(model.DTYPES)
    assert set(ENCODER_FEATURES) == set(encoders.ENCODER_KINDS)


@pytest.mark.parametrize("stage", ["pretrain-lm", "pretrain-encoder", "grpo"])
def test_grad_accum_is_refused_where_the_stage_would_ignore_it(stage):
    """Only SFT's step accumulates micro-batches; elsewhere train.grad_accum=2 would silently
    take one batch a step, not two."""
    message = refused(["train.grad_accum=2"], stage=stage)
    assert message == (f"train.grad_accum=2 applies to sft only: {stage} takes one batch a "
                       "step; raise train.batch_size (or data.max_duration) instead")


def test_a_library_user_gets_the_same_checks():
    with pytest.raises(ConfigError, match="unknown train.schedule 'cosin'"):
        TrainConfig(schedule="cosin")
    with pytest.raises(ConfigError, match="data.train is empty"):
        check_stage(RunConfig(), "sft")


# --------------------------------------------------------------------------- resume


def recorded(tmp_path: Path, cfg: RunConfig, stage: str = "sft") -> Path:
    """An output folder as a run leaves it: its settings, and a resumable ``last``."""
    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    (out / "last" / "trainer_state.json").write_text('{"step": 5}')
    (out / f"{stage}_config.json").write_text(json.dumps(to_dict(cfg)))
    return out


def test_resume_refuses_changed_settings_naming_each_key(tmp_path):
    from speechrl.train.resume import check_resumed_settings

    old = RunConfig(train=TrainConfig(lr=1e-4, max_steps=5))
    out = recorded(tmp_path, old)
    new = RunConfig(train=TrainConfig(lr=1e-2, max_steps=6, warmup_steps=7))
    with pytest.raises(ConfigError) as err:
        check_resumed_settings(new, "sft", out)
    assert str(err.value) == (
        f"{out / 'last'} was trained with other settings: train.lr 0.0001 -> 0.01, "
        "train.warmup_steps 100 -> 7; these cannot change when a run resumes: give the old "
        "values to resume it, or start afresh with a new train.output_dir")


def test_resume_accepts_cadence_and_a_constant_schedules_lr_and_says_so(tmp_path, capsys):
    from speechrl.train.resume import check_resumed_settings

    old = RunConfig(train=TrainConfig(lr=1e-4, schedule="constant", max_steps=5))
    out = recorded(tmp_path, old)
    new = RunConfig(train=TrainConfig(lr=1e-2, schedule="constant", max_steps=6,
                                      eval_every=3, device="cpu"))
    check_resumed_settings(new, "sft", out)
    assert capsys.readouterr().err == (
        "sft: resuming with train.device 'auto' -> 'cpu', train.lr 0.0001 -> 0.01, "
        "train.max_steps 5 -> 6, train.eval_every 200 -> 3 (the constant schedule's new rate "
        "applies from the next step)\n")


def test_a_resumed_constant_schedule_takes_the_new_lr(tmp_path):
    """The scheduler's saved state holds the old peak rate: the new one replaces it, at the
    step's factor (here the third of 4 warm-up steps)."""
    from speechrl.train.optim import build_optimizer, build_scheduler
    from speechrl.train.resume import use_configured_lr

    model = torch.nn.Linear(2, 2)
    old_cfg = TrainConfig(lr=1e-4, schedule="constant", warmup_steps=4)
    optimizer = build_optimizer(model, old_cfg)
    scheduler = build_scheduler(optimizer, old_cfg)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    new_cfg = TrainConfig(lr=1e-2, schedule="constant", warmup_steps=4)
    optimizer = build_optimizer(model, new_cfg)
    scheduler = build_scheduler(optimizer, new_cfg)
    scheduler.load_state_dict(state)
    assert scheduler.base_lrs == [1e-4, 1e-4]  # what resuming used to train on
    use_configured_lr(optimizer, scheduler, new_cfg, tmp_path)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2 * 3 / 4] * 2
    scheduler.step()
    assert scheduler.get_last_lr() == [1e-2, 1e-2]  # warm-up done: the new peak
    cosine = TrainConfig(lr=1e-3)
    with pytest.raises(ConfigError, match=r"train.lr=0.01 under a cosine schedule"):
        use_configured_lr(optimizer, scheduler, cosine, tmp_path)


# The decoding and SFT settings as a run saved them before the decoding and sft sections (its
# <stage>_config.json, trimmed to the keys that cross stages): they load as they were, to the
# new keys (speechrl.configio.RENAMED_KEYS), and a run resuming with them unchanged says nothing.
OLD_SFT_RECORD = {
    "train": {"max_steps": 5, "cache_encoder_outputs": True, "llm_frozen_steps": 2,
              "speech_ctc_weight": 0.5},
    "grpo": {"normalizer": "basic", "max_new_tokens": 96, "tokens_per_second": 6.0},
}


def test_a_run_config_saved_before_the_decoding_defaults_loads_and_resumes(tmp_path, capsys):
    from speechrl.config import DECODING
    from speechrl.configio import RENAMED_KEYS, from_dict
    from speechrl.train.resume import check_resumed_settings

    old = from_dict(RunConfig, OLD_SFT_RECORD)
    assert (old.decoding.normalizer, old.decoding.max_new_tokens,
            old.decoding.tokens_per_second) == ("basic", 96, 6.0)
    assert (old.sft.cache_encoder_outputs, old.sft.llm_frozen_steps,
            old.sft.speech_ctc_weight) == (True, 2, 0.5)
    assert old == from_dict(RunConfig, {
        "train": {"max_steps": 5},
        "sft": {"cache_encoder_outputs": True, "llm_frozen_steps": 2, "speech_ctc_weight": 0.5},
        "decoding": {"normalizer": "basic", "max_new_tokens": 96, "tokens_per_second": 6.0}})
    fresh = RunConfig()
    assert (fresh.decoding.normalizer, fresh.decoding.max_new_tokens,
            fresh.decoding.tokens_per_second) == (
        DECODING.normalizer, DECODING.max_new_tokens, DECODING.tokens_per_second) == (
        "whisper", 128, 8.0)
    out = tmp_path / "run"
    (out / "last").mkdir(parents=True)
    (out / "last" / "trainer_state.json").write_text('{"step": 5}')
    (out / "sft_config.json").write_text(json.dumps(OLD_SFT_RECORD))
    old_keys = ["train.max_steps=5", "train.cache_encoder_outputs=true",
                "train.llm_frozen_steps=2", "train.speech_ctc_weight=0.5",
                "grpo.normalizer=basic", "grpo.max_new_tokens=96", "grpo.tokens_per_second=6.0"]
    again = load_run_config(None, old_keys)
    assert again == old
    # Each old key given as an override is named once, with its new name.
    notes = capsys.readouterr().err.splitlines()
    assert notes == [f"speechrl: {key} is now {new} (override); the old name still works"
                     for key, new in RENAMED_KEYS.items()]
    new_keys = [f"{RENAMED_KEYS.get(key, key)}={value}"
                for key, value in (item.split("=") for item in old_keys)]
    assert load_run_config(None, new_keys) == old
    check_resumed_settings(again, "sft", out)
    assert capsys.readouterr().err == ""


def test_a_preset_with_the_old_keys_loads_to_the_same_settings(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("grpo: {max_new_tokens: 96}\n"
                   "stages:\n  sft:\n    train: {lr: 1.0e-3, speech_ctc_weight: 0.5}\n")
    new = tmp_path / "new.yaml"
    new.write_text("decoding: {max_new_tokens: 96}\n"
                   "stages:\n  sft:\n    train: {lr: 1.0e-3}\n    sft: {speech_ctc_weight: 0.5}\n")
    for stage in ("sft", "grpo"):
        assert load_run_config(str(old), stage=stage) == load_run_config(str(new), stage=stage)
    assert f"grpo.max_new_tokens is now decoding.max_new_tokens ({old})" in capsys.readouterr().err
    cfg = load_run_config(str(old), ["sft.speech_ctc_weight=0.25"], stage="sft")
    assert (cfg.sft.speech_ctc_weight, cfg.decoding.max_new_tokens) == (0.25, 96)
    with pytest.raises(ConfigError, match=r"train.llm_frozen_steps=2 and sft.llm_frozen_steps=3 "
                                          r"are one option"):
        load_run_config(None, ["train.llm_frozen_steps=2", "sft.llm_frozen_steps=3"])
    with pytest.raises(ConfigError, match=r"did you mean sft.llm_frozen_steps\?"):
        load_run_config(None, ["train.llm_frozen_step=2"])
    with pytest.raises(ConfigError, match=r"did you mean decoding.min_token_cap\?"):
        load_run_config(None, ["decoding.min_token_caps=2"])
