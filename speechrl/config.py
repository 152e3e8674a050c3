"""Frozen configuration dataclasses, YAML presets and ``key=value`` overrides.

A run is described by one :class:`RunConfig` tree. Presets live in ``configs/*.yaml`` (and are
shipped inside the package as ``speechrl/configs``); the command line overrides any leaf with a
dotted path, e.g. ``speechrl sft --config tiny train.lr=1e-4 model.llm.preset=small``.
Changes to a frozen config go through :func:`dataclasses.replace` or :func:`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"  # a link to the repository's configs/


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


@dataclass(frozen=True)
class ProjectorConfig:
    stack: int = 2  # k consecutive encoder frames are concatenated before the projection
    kind: str = "linear"  # "linear" (the paper's) or "mlp" (two layers, GELU)
    hidden: int | None = None  # MLP hidden size; defaults to the LLM hidden size


@dataclass(frozen=True)
class LoraConfig:
    r: int = 0  # 0 disables LoRA: the whole LLM is trained
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class LLMConfig:
    path: str | None = None  # any HF causal LM folder (Llama, Qwen2, ...); else built from preset
    preset: str = "tiny"  # tiny | small | paper-2b | paper-8b
    dtype: str = "float32"  # weights' dtype when loading; training uses autocast on GPU
    attn_implementation: str = "sdpa"
    lora: LoraConfig = field(default_factory=LoraConfig)


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
    # SFT: keep the frozen encoder's output frames of every training utterance after its first
    # use, so later epochs skip the encoder (memory: frames x encoder width per utterance, on
    # the model's device). For small encoders and corpora such as the CPU demo's.
    cache_encoder_outputs: bool = False
    # SFT: for the first this many steps only the projector (and any trainable encoder part)
    # learns; the LLM's gradients are dropped. The speech embeddings then have to carry the
    # transcript before the LLM can fall back on its text prior (docs/results.md).
    llm_frozen_steps: int = 0
    # SFT: weight of an auxiliary CTC loss that reads each projected speech token through the
    # LLM's input embeddings (logits = speech @ E^T, blank = the pad token) and scores the
    # transcript's tokens against them. It gives the projector a direct signal from the first
    # step, so the LLM meets text-like speech tokens; 0 is the paper's SFT (eq. 2 only).
    speech_ctc_weight: float = 0.0
    resume: bool = True  # continue from output_dir/last when it exists
    # Under torchrun: "ddp" (every rank holds the model) or "fsdp2" (parameters, gradients and
    # optimizer state sharded with fully_shard, for models that do not fit one device).
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        from speechrl.runtime import check_precision

        check_precision(self.precision)


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO and its variants (paper eq. 3-9). Fields left as None take the algorithm's preset
    (see ``speechrl.losses.PRESETS``); anything set explicitly wins."""

    algorithm: str = "grpo"  # grpo | dapo | dr_grpo
    group_size: int = 6  # G candidates per audio (the paper tried 6 and 10)
    num_iterations: int = 1  # policy updates per rollout batch (old log-probs kept for the ratio)
    reward: str = "wer"  # wer | em | ed | "0.7*wer+0.3*em" | package.module:function
    normalizer: str = "whisper"  # the same normaliser as evaluation
    strategy: str = "sample"  # sample | beam (n-best as the group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    num_beams: int | None = None  # beam width for strategy=beam; defaults to group_size
    max_new_tokens: int = 128
    tokens_per_second: float = 8.0  # cap on new tokens by audio duration: runaway loops end
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


@dataclass(frozen=True)
class CTCConfig:
    """The built-in encoder's CTC pre-training: a linear head over characters."""

    min_char_count: int = 1  # characters seen fewer times than this map to <unk>


@dataclass(frozen=True)
class LMConfig:
    """Text-only LM pre-training (paper eq. 1) and the BPE tokenizer trained for it."""

    text: tuple[str, ...] = ()  # extra plain-text files; the train manifests' text is always used
    vocab_size: int = 2000
    max_length: int = 128  # tokens per training sequence
    sentences_per_sequence: int = 4  # sentences packed into one sequence


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
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
    """
    data = load_yaml(name_or_path) if name_or_path else {}
    stages = data.pop("stages", {}) or {}
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage section(s) {unknown}; known: {list(STAGES)}")
    if stage is not None:
        data = merge(data, stages.get(stage) or {})
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(RunConfig, data)


# --------------------------------------------------------------------------- generic machinery


def _resolve_type(tp: Any) -> Any:
    """Strip Optional[...] / X | None down to the concrete type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _resolve_type(args[0])
    return tp


def _coerce(tp: Any, value: Any) -> Any:
    tp = _resolve_type(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v) for v in value)
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, (int, str)) and not isinstance(value, bool):
        return int(value)
    if tp is bool and isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if tp is str and not isinstance(value, str):
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any] | None) -> Any:
    """Build the dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


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
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
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
    return from_dict(type(cfg), merge(to_dict(cfg), update))


def find_config(name_or_path: str) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    for folder in (Path.cwd() / "configs", PACKAGE_CONFIG_DIR):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"no config {name_or_path!r}: give a YAML path or a preset in {PACKAGE_CONFIG_DIR}"
    )


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Load a preset, following an optional ``base: other-preset`` key."""
    path = find_config(name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("base", None)
    if base:
        data = merge(load_yaml(base), data)
    return data
