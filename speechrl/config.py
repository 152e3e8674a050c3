"""Frozen configuration dataclasses and :func:`load_run_config`.

A run is described by one :class:`RunConfig` tree. Presets live in ``configs/*.yaml`` (and are
shipped inside the package as ``speechrl/configs``); the command line overrides any leaf with a
dotted path, e.g. ``speechrl sft --config tiny train.lr=1e-4 model.llm.preset=small``.
Changes to a frozen config go through :func:`dataclasses.replace` or
:func:`speechrl.configio.apply_overrides`. Reading presets and overrides into these dataclasses
(and writing them back out as dicts) is :mod:`speechrl.configio`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


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
    reward: str = "wer"  # wer | em | ed | sub | del | ins | "0.7*wer+0.3*em" | pkg.module:function
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
    # configio builds on the dataclasses above, so it is imported here rather than at the top.
    from speechrl.configio import from_dict, load_yaml, merge, parse_overrides, renamed_keys

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

