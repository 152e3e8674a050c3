"""What a stage needs before it runs, checked before anything is loaded or written: the
settings that must go together, the inputs it reads (every missing one named at once, with
where it came from), and an output folder that can be written.

Each option's own values are checked where the config is built (:mod:`speechrl.config`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from speechrl.config import (
    ENCODER_FEATURES,
    STAGES,
    ConfigError,
    GRPOConfig,
    InputError,
    RunConfig,
    did_you_mean,
)
from speechrl.configio import parse_overrides


def check_stage(cfg: RunConfig, stage: str, *, source: str | None = None,
                overrides: Iterable[str] = ()) -> None:
    """What ``stage`` needs of ``cfg`` beyond each option's own values, checked before anything
    is loaded or written: the settings it cannot run without (:class:`ConfigError`), then the
    inputs it reads (:class:`InputError` naming every missing one). ``source`` (the preset or
    YAML file) and ``overrides`` (the ``key=value`` items given) only word the message about
    missing inputs: which of them came from the preset."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    _check_settings(cfg, stage)
    missing = missing_inputs(cfg, stage)
    if missing:
        overridden = set(_leaf_keys(parse_overrides(list(overrides))))
        raise InputError(_missing_message(missing, source, overridden))
    check_output_folder(cfg.train.output_dir, "train.output_dir")


def _check_settings(cfg: RunConfig, stage: str) -> None:
    if cfg.train.grad_accum > 1 and stage != "sft":  # only sft_step accumulates micro-batches
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} applies to sft only: {stage} "
                          "takes one batch a step; raise train.batch_size (or data.max_duration) "
                          "instead")
    if stage == "pretrain-lm":
        if not cfg.data.train and not cfg.lm.text:
            raise ConfigError("no text to pre-train on: set data.train=[manifests] or "
                              "lm.text=[text files]")
        return
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give one or more manifests, e.g. "
                          "data.train=[corpus/train.jsonl]")
    if stage == "pretrain-encoder":
        if cfg.model.encoder.kind != "conformer":
            raise ConfigError("pretrain-encoder trains the built-in encoder (model.encoder.kind="
                              "conformer); Hugging Face encoders come pre-trained")
        return
    if not cfg.train.init and not (cfg.model.tokenizer or cfg.model.llm.path):
        raise ConfigError("model.tokenizer (or model.llm.path with tokenizer files) is required "
                          "to build a speech-LLM; run `speechrl pretrain-lm` to train one")
    kind = _encoder_kind(cfg)
    if cfg.data.features is not None and kind in ENCODER_FEATURES \
            and cfg.data.features != ENCODER_FEATURES[kind]:
        raise ConfigError(f"data.features={cfg.data.features} does not fit the {kind} encoder, "
                          f"which takes {ENCODER_FEATURES[kind]} features: leave data.features "
                          "unset (it follows the encoder)")
    if stage == "sft" and cfg.sft.cache_encoder_outputs and cfg.data.augment:
        raise ConfigError("sft.cache_encoder_outputs cannot be used with data.augment: "
                          "augmented audio changes every epoch")
    if stage == "grpo":
        if not cfg.train.init:
            raise ConfigError("GRPO starts from a trained model: set train.init=<SFT "
                              "checkpoint>, e.g. train.init=runs/tiny/sft/best")
        _check_reward(cfg.grpo, cfg.decoding.normalizer)


def _encoder_kind(cfg: RunConfig) -> str | None:
    """The encoder a speech stage will run: the ``train.init`` checkpoint's when it starts from
    one (None if that cannot be read: loading it reports why), else ``model.encoder``'s."""
    if not cfg.train.init:
        return cfg.model.encoder.kind
    try:
        saved = json.loads((Path(cfg.train.init) / "speechrl.json").read_text())
        return saved["model"]["encoder"]["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_reward(grpo: GRPOConfig, normalizer: str) -> None:
    """The reward spec parses and each of its names resolves (a ``module:function`` is
    imported now, not after the model has loaded)."""
    from speechrl.rewards import REWARDS, build_reward, parse_spec

    try:
        build_reward(grpo.reward, normalizer=normalizer)
    except ValueError as err:
        try:
            names = [name for _, name in parse_spec(grpo.reward)]
        except ValueError:  # the spec does not parse: the message says where
            names = []
        typo = next((n for n in names if ":" not in n and n not in REWARDS), None)
        hint = did_you_mean(typo, REWARDS) if typo else ""
        raise ConfigError(f"grpo.reward: {err}{hint}") from err
    except Exception as err:  # the user's module failed while being imported
        raise ConfigError(f"grpo.reward={grpo.reward!r}: importing it raised "
                          f"{type(err).__name__}: {err}") from err


def missing_inputs(cfg: RunConfig, stage: str) -> list[tuple[str, str]]:
    """``(key, path)`` of each file or folder ``stage`` reads that does not exist. A speech stage
    that starts from ``train.init`` reads the model from it alone."""
    inputs: list[tuple[str, str | None]] = [("data.train", p) for p in cfg.data.train]
    inputs += [("data.dev", p) for p in cfg.data.dev]
    if stage == "pretrain-lm":
        inputs += [("lm.text", p) for p in cfg.lm.text]
        inputs += [("model.tokenizer", cfg.model.tokenizer), ("model.llm.path", cfg.model.llm.path)]
    elif stage in ("sft", "grpo"):
        if cfg.train.init:
            inputs.append(("train.init", cfg.train.init))
        else:
            inputs += [("model.llm.path", cfg.model.llm.path),
                       ("model.tokenizer", cfg.model.tokenizer),
                       ("model.encoder.path", cfg.model.encoder.path)]
    return [(key, path) for key, path in inputs if path and not Path(path).exists()]


def check_output_folder(path: str | Path, what: str) -> None:
    """``path`` is a folder, or one can be made there: no file in the way, a writable parent.
    ``what`` names the option in the message (``--out``)."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"{what} {path}: {folder} is a file, not a folder; give a "
                                 "folder (it is made if missing)")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise InputError(f"{what} {path}: {folder} is not writable")
            return


def _missing_message(missing: list[tuple[str, str]], source: str | None,
                     overridden: set[str]) -> str:
    listed = ", ".join(f"{key}={path}" for key, path in missing)
    text = f"missing input(s): {listed}"
    if any(not Path(path).is_absolute() for _, path in missing):
        text += f" (relative to {Path.cwd()})"
    from_source = [key for key, _ in missing if key not in overridden]
    if not source or not from_source:
        return text
    which = "these are" if len(from_source) == len(missing) else f"{', '.join(from_source)} are"
    if Path(source).suffix in (".yaml", ".yml"):
        return f"{text}; {which} {source}'s paths: point elsewhere with key=PATH overrides"
    return (f"{text}; {which} the {source} preset's paths: make them with the commands at the "
            f"top of configs/{source}.yaml (or `speechrl demo`), or point elsewhere with "
            "key=PATH overrides")


def _leaf_keys(nested: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    for k, v in nested.items():
        if isinstance(v, Mapping):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"
