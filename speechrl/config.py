"""Frozen configuration dataclasses, YAML presets and ``key=value`` overrides.

A run is described by one :class:`RunConfig` tree. Presets live in ``configs/*.yaml`` (and are
shipped inside the package as ``speechrl/configs``); the command line overrides any leaf with a
dotted path, e.g. ``speechrl sft --config tiny train.lr=1e-4 model.llm.preset=small``.
Changes to a frozen config go through :func:`dataclasses.replace` or :func:`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"  # a link to the repository's configs/


class ConfigError(ValueError):
    """A mistake in a preset, a YAML file or a ``key=value`` override: the message names the key
    and what it accepts. Raised while the config is built, before any work; the command line
    prints it as one line and exits 2."""


class InputError(RuntimeError):
    """Something a command names cannot be used: a missing file or folder, an output folder that
    is a file, a device this machine lacks. The command line prints it as one line and exits 1."""


# The values of each enumerated option. The modules that implement them keep their own tuples
# (losses.SCALES, distributed.STRATEGIES, ...; tests/test_config.py checks that they agree):
# they are spelt out here so that a config is checked without importing torch.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.encoder.kind": ("conformer", "whisper", "hubert", "wavlm", "wav2vec2"),
    "model.projector.kind": ("linear", "mlp"),
    "model.llm.preset": ("tiny", "small", "paper-2b", "paper-8b"),
    "model.llm.dtype": ("float32", "bfloat16", "float16"),
    "data.features": ("fbank", "whisper", "waveform"),
    "train.schedule": ("constant", "cosine"),
    "train.parallel": ("ddp", "fsdp2"),
    "grpo.algorithm": ("grpo", "dapo", "dr_grpo"),
    "grpo.strategy": ("sample", "beam"),  # greedy would give G identical candidates
    "grpo.scale": ("group", "batch", "none"),
    "grpo.agg": ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"),
    "decoding.normalizer": ("whisper", "basic", "lower", "none"),
}
# The features each kind of encoder takes (what ``data.features`` must be when it is set).
ENCODER_FEATURES = {"conformer": "fbank", "whisper": "whisper", "hubert": "waveform",
                    "wavlm": "waveform", "wav2vec2": "waveform"}
DEVICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


# train.precision, eval --precision, demo --precision; what each means: speechrl.runtime.
PRECISIONS = ("auto", "fp32", "bf16")


def check_precision(precision: str, key: str = "train.precision") -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a :class:`ConfigError` naming
    them. Here rather than in speechrl.runtime (which re-exports it) so that a config is
    checked without importing torch."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is not a precision; use one of "
                          f"{', '.join(PRECISIONS)} (auto: bf16 on a GPU or on a CPU that "
                          "computes bf16 natively, fp32 otherwise)")
    return precision


def did_you_mean(word: Any, options: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean X?)`` for the option closest to ``word``, or ``""``."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]}?)" if close else ""


def device_error(name: str) -> str | None:
    """Why ``name`` is not a device name (None when it is one); whether this machine has that
    device is checked when the run starts."""
    if isinstance(name, str) and _DEVICE.fullmatch(name):
        return None
    return f"unknown device {name!r}; use {DEVICES}"


def _choose(key: str, value: Any, optional: bool = False) -> None:
    allowed = CHOICES[key]
    if value in allowed or (optional and value is None):
        return
    raise ConfigError(f"unknown {key} {value!r}; one of {', '.join(allowed)}"
                      + did_you_mean(value, allowed))


def _at_least(key: str, value: float | None, low: float, why: str = "") -> None:
    if value is not None and value < low:
        raise ConfigError(f"{key}={value!r} must be >= {low}{why}")


def _above(key: str, value: float | None, low: float) -> None:
    if value is not None and value <= low:
        raise ConfigError(f"{key}={value!r} must be > {low}")


def _within(key: str, value: float | None, low: float, high: float, *,
            high_open: bool = False, low_open: bool = False) -> None:
    if value is None:
        return
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key}={value!r} must be in {interval}")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class EncoderConfig:
    # "conformer": the built-in encoder on 80-bin log-mel features (trainable with CTC).
    # "whisper" | "hubert" | "wavlm" | "wav2vec2": a Hugging Face encoder loaded from `path`.
    kind: str = "conformer"
    path: str | None = None  # HF folder, or a speechrl encoder checkpoint for "conformer"
    n_mels: int = 80
    d_model: int = 144
    n_layers: int = 4
    n_heads: int = 4
    ff_mult: int = 4
    conv_kernel: int = 15
    subsampling_channels: int | None = None  # channels of the x4 conv front-end; None: d_model
    dropout: float = 0.1
    # Hidden layers combined by a learned softmax-weighted sum (the paper combines several
    # layers); None uses the last layer only.
    layers: tuple[int, ...] | None = None
    freeze: bool = True

    def __post_init__(self) -> None:
        _choose("model.encoder.kind", self.kind)
        for name in ("n_mels", "d_model", "n_layers", "n_heads", "ff_mult", "conv_kernel"):
            _at_least(f"model.encoder.{name}", getattr(self, name), 1)
        _within("model.encoder.dropout", self.dropout, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class ProjectorConfig:
    stack: int = 2  # k consecutive encoder frames are concatenated before the projection
    kind: str = "linear"  # "linear" (the paper's) or "mlp" (two layers, GELU)
    hidden: int | None = None  # MLP hidden size; defaults to the LLM hidden size

    def __post_init__(self) -> None:
        _at_least("model.projector.stack", self.stack, 1)
        _choose("model.projector.kind", self.kind)
        _at_least("model.projector.hidden", self.hidden, 1)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 0  # 0 disables LoRA: the whole LLM is trained
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        _at_least("model.llm.lora.r", self.r, 0, " (0 trains the whole LLM)")
        _within("model.llm.lora.dropout", self.dropout, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class LLMConfig:
    path: str | None = None  # any HF causal LM folder (Llama, Qwen2, ...); else built from preset
    preset: str = "tiny"  # tiny | small | paper-2b | paper-8b
    dtype: str = "float32"  # weights' dtype when loading; training uses autocast on GPU
    attn_implementation: str = "sdpa"
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _choose("model.llm.preset", self.preset)
        _choose("model.llm.dtype", self.dtype)


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: str | None = None  # HF tokenizer folder; defaults to the LLM's own
    instruction: str = "Convert speech to text"
    # Let Hugging Face run Python shipped inside a model folder (its auto_map): only for folders
    # you trust. Off, models that need it fail to load with transformers' own message.
    trust_remote_code: bool = False


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    train: tuple[str, ...] = ()  # manifests (JSONL) or Lhotse CutSets (.jsonl.gz)
    dev: tuple[str, ...] = ()
    sample_rate: int = 16000
    # "fbank": 80-bin log-mel for the built-in encoder; "whisper": Whisper log-mel;
    # "waveform": raw samples for HuBERT / WavLM / wav2vec2. Derived from the encoder if None.
    features: str | None = None
    # Seconds of audio per batch (sum over utterances) on EACH rank under torchrun: the global
    # batch is world_size times larger. (train.batch_size, when set, is global instead.)
    max_duration: float = 60.0
    max_utterance_duration: float = 30.0  # longer rows are skipped and counted
    duration_tolerance: float = 0.5  # seconds a manifest duration may differ from the audio
    num_buckets: int = 8
    strict: bool = False  # raise on the first bad row instead of skipping it
    num_workers: int = 0
    augment: bool = False  # speed / noise / reverb augmentation of training audio
    # Train on rows whose text is empty as "transcribe nothing" (the target is <EOS> alone),
    # e.g. non-speech clips (synth --train-mix nonspeech=S); off, such rows are skipped and
    # counted as bad ones.
    train_empty_text: bool = False

    def __post_init__(self) -> None:
        _choose("data.features", self.features, optional=True)
        _at_least("data.sample_rate", self.sample_rate, 1)
        _above("data.max_duration", self.max_duration, 0)
        _above("data.max_utterance_duration", self.max_utterance_duration, 0)
        _at_least("data.duration_tolerance", self.duration_tolerance, 0)
        _at_least("data.num_buckets", self.num_buckets, 1)
        _at_least("data.num_workers", self.num_workers, 0)


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class TrainConfig:
    """The loop settings every stage shares (pretrain-lm, pretrain-encoder, sft, grpo)."""

    output_dir: str = "runs/sft"
    init: str | None = None  # speechrl checkpoint to start from (GRPO: the SFT model)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 autocast on a GPU, and on a CPU only where it computes bf16 natively (AVX512-BF16,
    # AMX, Arm BF16), fp32 otherwise | fp32 | bf16 (speechrl.runtime)
    precision: str = "auto"
    lr: float = 1e-4
    schedule: str = "cosine"  # constant | cosine (both with linear warm-up)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak
    max_steps: int = 1000
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    grad_accum: int = 1
    # Utterances (GRPO: audios) per batch over ALL ranks (a step takes grad_accum batches); each
    # of N ranks takes batch_size / N (must divide). None: batches by data.max_duration.
    batch_size: int | None = None
    log_every: int = 10
    eval_every: int = 200  # dev loss and greedy dev WER; the best checkpoint is kept by dev WER
    save_every: int = 200  # resumable checkpoint
    dev_utterances: int | None = 200  # cap on dev utterances decoded at each evaluation
    max_nonfinite_steps: int = 5  # stop (with a checkpoint) after this many skipped steps in a row
    resume: bool = True  # continue from output_dir/last when it exists
    # Under torchrun: "ddp" (every rank holds the model) or "fsdp2" (parameters, gradients and
    # optimizer state sharded with fully_shard, for models that do not fit one device).
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        _choose("train.schedule", self.schedule)
        _choose("train.parallel", self.parallel)
        check_precision(self.precision)
        if device_error(self.device):
            raise ConfigError(f"train.device: {device_error(self.device)}")
        _above("train.lr", self.lr, 0)
        for name in ("max_steps", "grad_accum", "log_every", "eval_every", "save_every",
                     "max_nonfinite_steps", "batch_size", "dev_utterances"):
            _at_least(f"train.{name}", getattr(self, name), 1)
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            _at_least(f"train.{name}", getattr(self, name), 0)
        _within("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas={list(self.adam_betas)} must be two numbers "
                              "in [0, 1), e.g. [0.9, 0.98]")


@dataclass(frozen=True)
class DecodingConfig:
    """How a transcript is decoded and scored wherever one is: the dev WER of SFT and GRPO,
    GRPO's rollouts and rewards, ``eval`` and ``transcribe``. New tokens are capped at
    ``max_new_tokens`` and by audio duration (``ceil(seconds * tokens_per_second)``, never
    below ``min_token_cap``; 0 turns the duration cap off), so runaway loops end
    (``speechrl.generate.DecodingOptions`` applies the caps)."""

    normalizer: str = "whisper"  # the same normaliser for rewards and evaluation
    max_new_tokens: int = 128
    tokens_per_second: float = 8.0
    min_token_cap: int = 8

    def __post_init__(self) -> None:
        _choose("decoding.normalizer", self.normalizer)
        _at_least("decoding.max_new_tokens", self.max_new_tokens, 1)
        _at_least("decoding.tokens_per_second", self.tokens_per_second, 0)
        _at_least("decoding.min_token_cap", self.min_token_cap, 1)


# The defaults every command decodes with: a run's ``decoding`` section, and the options of
# ``eval`` and ``transcribe``.
DECODING = DecodingConfig()


@dataclass(frozen=True)
class SFTConfig:
    """SFT's own switches; all off is the paper's SFT (eq. 2)."""

    # Keep the frozen encoder's output frames of every training utterance after its first use,
    # so later epochs skip the encoder (memory: frames x encoder width per utterance, on the
    # model's device). For small encoders and corpora such as the CPU demo's.
    cache_encoder_outputs: bool = False
    # For the first this many steps only the projector (and any trainable encoder part) learns;
    # the LLM's gradients are dropped. The speech embeddings then have to carry the transcript
    # before the LLM can fall back on its text prior (docs/results.md).
    llm_frozen_steps: int = 0
    # Weight of an auxiliary CTC loss that reads each projected speech token through the LLM's
    # input embeddings (logits = speech @ E^T, blank = the pad token) and scores the
    # transcript's tokens against them. It gives the projector a direct signal from the first
    # step, so the LLM meets text-like speech tokens; 0 is the paper's SFT (eq. 2 only).
    speech_ctc_weight: float = 0.0

    def __post_init__(self) -> None:
        _at_least("sft.llm_frozen_steps", self.llm_frozen_steps, 0)
        _at_least("sft.speech_ctc_weight", self.speech_ctc_weight, 0)


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO and its variants (paper eq. 3-9). Fields left as None take the algorithm's preset
    (see ``speechrl.losses.PRESETS``); anything set explicitly wins. Rollouts are capped and
    rewards normalised as the run's ``decoding`` section says, like the dev evaluation."""

    algorithm: str = "grpo"  # grpo | dapo | dr_grpo
    group_size: int = 6  # G candidates per audio (the paper tried 6 and 10)
    num_iterations: int = 1  # policy updates per rollout batch (old log-probs kept for the ratio)
    reward: str = "wer"  # wer | em | ed | "0.7*wer+0.3*em" | package.module:function
    strategy: str = "sample"  # sample | beam (n-best as the group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    num_beams: int | None = None  # beam width for strategy=beam; defaults to group_size
    scale: str | None = None  # advantage scaling: group | batch | none
    agg: str | None = None  # seq_mean_token_mean | token_mean | seq_mean_token_sum_norm
    beta: float | None = None  # k3 KL weight towards the reference (SFT) model
    eps_low: float | None = None
    eps_high: float | None = None
    dynamic_sampling: bool | None = None  # DAPO: drop all-equal groups and draw more audios
    max_refill_rounds: int = 4  # bound on extra draws per step for dynamic sampling
    mask_truncated: bool = False  # leave candidates cut by the token cap out of the loss
    # Run each audio's prompt once for its G candidates in the log-prob passes and the update
    # (SpeechLLM.group_target_logits: the same log-probs and gradients up to rounding); off,
    # or where a model is not checked with it, the prompt runs once per candidate.
    shared_prompt: bool = True

    def __post_init__(self) -> None:
        _choose("grpo.algorithm", self.algorithm)
        _choose("grpo.strategy", self.strategy)
        _choose("grpo.scale", self.scale, optional=True)
        _choose("grpo.agg", self.agg, optional=True)
        # Advantages are rewards relative to the group's mean: one candidate is its own mean.
        _at_least("grpo.group_size", self.group_size, 2,
                  ": a group of one candidate has zero advantage and teaches nothing")
        for name in ("num_iterations", "num_beams"):
            _at_least(f"grpo.{name}", getattr(self, name), 1)
        for name in ("top_k", "max_refill_rounds", "beta", "eps_high"):
            _at_least(f"grpo.{name}", getattr(self, name), 0)
        _above("grpo.temperature", self.temperature, 0)
        _within("grpo.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _within("grpo.min_p", self.min_p, 0.0, 1.0)
        _within("grpo.eps_low", self.eps_low, 0.0, 1.0, high_open=True)
        if self.strategy == "beam" and (self.num_beams or self.group_size) < self.group_size:
            raise ConfigError(f"grpo.num_beams={self.num_beams} must be >= grpo.group_size="
                              f"{self.group_size}: the group is the beam's n-best")


@dataclass(frozen=True)
class CTCConfig:
    """The built-in encoder's CTC pre-training: a linear head over characters."""

    min_char_count: int = 1  # characters seen fewer times than this map to <unk>

    def __post_init__(self) -> None:
        _at_least("ctc.min_char_count", self.min_char_count, 1)


@dataclass(frozen=True)
class LMConfig:
    """Text-only LM pre-training (paper eq. 1) and the BPE tokenizer trained for it."""

    text: tuple[str, ...] = ()  # extra plain-text files; the train manifests' text is always used
    vocab_size: int = 2000
    max_length: int = 128  # tokens per training sequence
    sentences_per_sequence: int = 4  # sentences packed into one sequence

    def __post_init__(self) -> None:
        _at_least("lm.vocab_size", self.vocab_size, 1)
        _at_least("lm.max_length", self.max_length, 2)
        _at_least("lm.sentences_per_sequence", self.sentences_per_sequence, 1)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ctc: CTCConfig = field(default_factory=CTCConfig)
    lm: LMConfig = field(default_factory=LMConfig)


STAGES = ("pretrain-lm", "pretrain-encoder", "sft", "grpo")

# Options that moved, old dotted key -> new: presets, overrides and the run configs recorded by
# older runs (``<stage>_config.json``) still load with the old keys, to the same settings.
RENAMED_KEYS = {
    "grpo.normalizer": "decoding.normalizer",
    "grpo.max_new_tokens": "decoding.max_new_tokens",
    "grpo.tokens_per_second": "decoding.tokens_per_second",
    "train.cache_encoder_outputs": "sft.cache_encoder_outputs",
    "train.llm_frozen_steps": "sft.llm_frozen_steps",
    "train.speech_ctc_weight": "sft.speech_ctc_weight",
}


def renamed_keys(data: Any, source: str | None = None) -> Any:
    """A copy of the nested :class:`RunConfig` dict ``data`` with each old key of
    :data:`RENAMED_KEYS` moved to its new name. ``source`` (``"override"``, a YAML file), when
    given, is named in a one-line note on stderr for each old key it used."""
    if not isinstance(data, Mapping):
        return data
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for old, new in RENAMED_KEYS.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        section, target = out.get(old_section), out.setdefault(new_section, {})
        if not (isinstance(section, dict) and old_name in section and isinstance(target, dict)):
            continue
        value = section.pop(old_name)
        if new_name in target and target[new_name] != value:
            raise ConfigError(f"{old}={value!r} and {new}={target[new_name]!r} are one option "
                              f"({old} is its old name): give it once")
        target[new_name] = value
        if source:
            print(f"speechrl: {old} is now {new} ({source}); the old name still works",
                  file=sys.stderr)
    return {k: v for k, v in out.items() if v != {} or k in data}


def _renamed_preset(data: dict[str, Any], source: str) -> dict[str, Any]:
    """:func:`renamed_keys` of a preset's sections and of each of its ``stages:``."""
    stages = data.get("stages")
    data = renamed_keys({k: v for k, v in data.items() if k != "stages"}, source)
    if isinstance(stages, Mapping):
        data["stages"] = {name: renamed_keys(section, source)
                          for name, section in stages.items()}
    elif stages is not None:
        data["stages"] = stages
    return data


def load_run_config(name_or_path: str | None, overrides: list[str] | None = None,
                    stage: str | None = None) -> RunConfig:
    """Preset or YAML file, then the preset's section for ``stage``, then ``key=value``
    overrides, as one frozen :class:`RunConfig`.

    A preset describes every stage of one scale: shared ``model`` / ``data`` / ``train``
    sections, and under ``stages:`` what each stage changes (its learning rate, steps, ...).
    Every option is checked here (:class:`ConfigError` naming the key); what a stage needs to
    run (settings that go together, inputs that exist) is checked by
    :func:`speechrl.preflight.check_stage`.
    """
    data = load_yaml(name_or_path) if name_or_path else {}
    stages = data.pop("stages", {}) or {}
    if not isinstance(stages, dict):
        raise ConfigError(f"{name_or_path}: stages must map stage names to sections, not "
                          f"{stages!r}")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"{name_or_path}: unknown stage section(s) {unknown}; known: "
                          f"{', '.join(STAGES)}")
    if stage is not None:
        data = merge(data, stages.get(stage) or {})
    update = renamed_keys(parse_overrides(overrides or []), "override")
    return from_dict(RunConfig, merge(data, update))


# --------------------------------------------------------------------------- generic machinery


def _resolve_type(tp: Any) -> tuple[Any, bool]:
    """(the concrete type inside Optional[...] / X | None, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) < len(args)
    return tp, False


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` (from YAML or an override) as the field type ``tp``; ``key`` names the field in
    the :class:`ConfigError` a value of the wrong type raises."""
    tp, optional = _resolve_type(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key} needs a value (got none)")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, _path=f"{key}.")
    if isinstance(value, Mapping):
        raise ConfigError(f"{key} is a single value, not a section: got {value!r}")
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        number = _as_number(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} is not a number (e.g. {key}=1e-4)")
        return float(number)
    if tp is int:
        number = _as_number(value)
        if number is None or not float(number).is_integer():
            raise ConfigError(f"{key}={value!r} is not a whole number (e.g. {key}=10)")
        return int(number)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, (str, int)) and str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean (true or false)")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is not a string")
    return value


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def from_dict(cls: type, data: Mapping[str, Any] | None, *, _path: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested dict, rejecting unknown keys by name (with the
    closest known key) and values of the wrong type naming the key (:class:`ConfigError`).
    ``_path`` is the dotted prefix of ``cls`` inside a :class:`RunConfig` (``"train."``)."""
    section = _path.rstrip(".") or cls.__name__
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{section} is a section, not a value: set its options one by one "
                          f"(e.g. {_path or section + '.'}NAME=VALUE), not {data!r}")
    data = dict(data or {})
    if cls is RunConfig:
        data = renamed_keys(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(_unknown_message(cls, unknown, names, _path))
    kwargs = {k: _coerce(hints[k], v, f"{_path}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _unknown_message(cls: type, unknown: list[str], names: list[str], path: str) -> str:
    keys = [f"{path}{k}" for k in unknown]
    text = f"unknown option{'s' if len(keys) > 1 else ''} {', '.join(keys)}"
    close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.6)
    if close:
        return f"{text} (did you mean {path}{close[0]}?)"
    if path or cls is RunConfig:  # the name in another section: train.group_size
        elsewhere = [k for k in _dotted_keys(RunConfig) if k.rsplit(".", 1)[-1] == unknown[0]]
        moved = {new.rsplit(".", 1)[-1]: new for new in RENAMED_KEYS.values()}
        elsewhere += [moved[n] for n in difflib.get_close_matches(unknown[0], moved, n=1)]
        if elsewhere:
            return f"{text} (did you mean {elsewhere[0]}?)"
    section = path.rstrip(".")
    return text + f"; {section + ' options' if section else 'known'}: {', '.join(sorted(names))}"


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every option of the dataclass tree ``cls``, dotted (``train.lr``), sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        tp, _ = _resolve_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            keys += _dotted_keys(tp, f"{key}.")
    return keys


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists stay leaves."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML / JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "data.train=[a.jsonl,b.jsonl]"]`` -> nested dict; each value is
    parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not a key=value override (e.g. train.lr=1e-4; a "
                              "preset goes after --config)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has no key before '=' (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: {raw!r} is not a value ("
                              f"{' '.join(str(err).split())})") from err
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(cfg: Any, overrides: list[str] | dict[str, Any]) -> Any:
    """A copy of the dataclass tree ``cfg`` with dotted ``key=value`` overrides applied."""
    update = parse_overrides(overrides) if isinstance(overrides, list) else overrides
    if isinstance(cfg, RunConfig):
        update = renamed_keys(update)
    return from_dict(type(cfg), merge(to_dict(cfg), update))


def presets() -> list[str]:
    """The preset names ``--config`` takes: the shipped ones and any in ``./configs``."""
    folders = (Path.cwd() / "configs", PACKAGE_CONFIG_DIR)
    return sorted({p.stem for folder in folders if folder.is_dir()
                   for p in folder.glob("*.yaml")})


def find_config(name_or_path: str) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path
        raise ConfigError(f"no config file {path}; give a YAML file or a preset: "
                          f"{', '.join(presets())}")
    for folder in (Path.cwd() / "configs", PACKAGE_CONFIG_DIR):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError(f"no preset {name_or_path!r}; presets: {', '.join(presets())} (or give "
                      "a YAML file)" + did_you_mean(name_or_path, presets()))


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Load a preset, following an optional ``base: other-preset`` key."""
    path = find_config(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not sections (model:, data:, "
                          "train:, ...)")
    base = data.pop("base", None)
    data = _renamed_preset(data, str(path))
    if base:
        data = merge(load_yaml(base), data)
    return data
