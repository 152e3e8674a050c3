"""Speech encoders behind one small interface.

Every encoder maps ``(inputs, lengths) -> (frames (B, N', D_enc), frame_lengths (B,))`` and says
what it eats in ``input_spec``, an :class:`EncoderInput` (kind, mel bins, sample rate,
normalisation) that the data loader is built from; its ``kind`` is one of:

* ``"fbank"``: 80-bin log-mel, (B, N, 80), 10 ms hop: the built-in :class:`ConformerEncoder`
  (40 ms frames after a x4 convolutional subsampling, as the paper's encoder; trained with CTC
  by ``speechrl pretrain-encoder``);
* ``"whisper"``: Whisper log-mel, (B, N, n_mels): the encoder of a Hugging Face Whisper folder;
* ``"waveform"``: 16 kHz samples, (B, S): HuBERT, WavLM, wav2vec2 (Hugging Face folders),
  normalised per utterance when the folder's ``preprocessor_config.json`` says ``do_normalize``.

The spec is read from what a model folder holds (Whisper's ``num_mel_bins``, the preprocessor's
``do_normalize`` and ``sampling_rate``, the conformer's ``n_mels``), so a checkpoint's encoder
says what it takes with no path to the original model.

Frames past an utterance's length are zero, and never influence the valid ones, so an utterance
gives the same frames alone as inside a padded batch. The paper keeps the encoder frozen (II-A):
``freeze()`` (the default of :func:`build_encoder`) stops its gradients and keeps it in eval mode
even when the parent model calls ``train()``. A learned softmax-weighted sum of several hidden
layers (the paper combines several layers, III-A) stays trainable when the encoder is frozen: it
is part of the interface to the LLM, like the projector.

Shapes: B batch, N frames, F features, S samples, D hidden.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from speechrl import audio as audio_lib
from speechrl.config import ConfigError, EncoderConfig

INPUT_KINDS = audio_lib.FEATURE_KINDS
WAVEFORM_KINDS = ("hubert", "wavlm", "wav2vec2")
ENCODER_KINDS = ("conformer", "whisper", *WAVEFORM_KINDS)
CONFORMER_CONFIG_FIELDS = (
    "n_mels",
    "d_model",
    "n_layers",
    "n_heads",
    "ff_mult",
    "conv_kernel",
    "subsampling_channels",
    "dropout",
)


def lengths_to_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) lengths -> (B, width) bool, True on valid positions."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


@dataclass(frozen=True)
class EncoderInput:
    """What an encoder takes: the data loader computes exactly this for it.

    ``kind``: ``"fbank"`` (the built-in conformer's log-mel), ``"whisper"`` (Whisper's log-mel,
    equal to ``WhisperFeatureExtractor``'s) or ``"waveform"`` (the samples, equal to
    ``Wav2Vec2FeatureExtractor``'s). ``n_mels``: mel bins of a log-mel kind, None for the
    waveform. ``sample_rate``: the rate features are computed at (audio is resampled to it).
    ``normalize``: waveform only, zero mean and unit variance per utterance (``do_normalize``).
    """

    kind: str
    n_mels: int | None = None
    sample_rate: int = audio_lib.SAMPLE_RATE
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"unknown encoder input kind {self.kind!r}; one of {INPUT_KINDS}")
        if self.kind == "waveform":
            if self.n_mels is not None:
                raise ValueError(f"a waveform input has no mel bins, got n_mels={self.n_mels}")
        elif self.n_mels is None or self.n_mels < 1:
            raise ValueError(f"a {self.kind} log-mel input needs n_mels >= 1, got {self.n_mels}")
        elif self.normalize:
            raise ValueError("normalize applies to waveform input only")
        if self.kind == "whisper" and self.sample_rate != audio_lib.SAMPLE_RATE:
            raise ValueError(f"Whisper's log-mel is defined at {audio_lib.SAMPLE_RATE} Hz, got "
                             f"sample_rate={self.sample_rate}")
        if self.sample_rate < 1:
            raise ValueError(f"sample_rate must be >= 1, got {self.sample_rate}")

    @classmethod
    def default(cls, kind: str) -> EncoderInput:
        """The usual input of ``kind``: 80 mel bins for a log-mel, 16 kHz, no normalisation."""
        return cls(kind, n_mels=None if kind == "waveform" else 80)

    def features(self, wave: np.ndarray, sample_rate: int) -> torch.Tensor:
        """Samples (S,) at ``sample_rate`` -> (N, n_mels) log-mel, or (S',) samples at
        :attr:`sample_rate` (normalised if :attr:`normalize`)."""
        if sample_rate != self.sample_rate:
            wave = audio_lib.resample(wave, sample_rate, self.sample_rate)
        if self.normalize:
            wave = audio_lib.zero_mean_unit_variance(wave)
        return audio_lib.features(wave, self.kind, self.sample_rate, self.n_mels)


# --------------------------------------------------------------------------- shared parts


class LayerWeightedSum(nn.Module):
    """Softmax-weighted sum of chosen hidden layers; weights start uniform."""

    def __init__(self, layers: Sequence[int], num_hidden_states: int) -> None:
        super().__init__()
        for layer in layers:
            if not -num_hidden_states <= layer < num_hidden_states:
                raise ConfigError(
                    f"encoder layer {layer} does not exist: this encoder has hidden states "
                    f"0..{num_hidden_states - 1} (0 is the input to the first block)"
                )
        if len(set(layers)) != len(layers):
            raise ConfigError(f"encoder layers {tuple(layers)} name a layer twice")
        self.layers = tuple(layers)
        self.logits = nn.Parameter(torch.zeros(len(layers)))

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """K tensors (B, N, D) picked from ``hidden_states`` -> (B, N, D)."""
        picked = torch.stack([hidden_states[i] for i in self.layers])  # (K, B, N, D)
        weights = self.logits.softmax(0).to(picked.dtype)
        return torch.einsum("k,kbnd->bnd", weights, picked)


class SpeechEncoder(nn.Module):
    """What the model sees of an encoder: a backbone's hidden states, combined and masked.

    Concrete encoders set ``input_spec`` (the :class:`EncoderInput` the data must be computed
    as) and ``output_dim``, and define
    ``hidden_states(inputs, lengths, all_layers) -> (list of (B, N', D), frame_lengths)``.
    """

    input_spec: EncoderInput
    output_dim: int

    def __init__(self, layers: Sequence[int] | None, num_hidden_states: int) -> None:
        super().__init__()
        self.frozen = False
        self.layer_sum = LayerWeightedSum(layers, num_hidden_states) if layers else None

    def forward(
        self, inputs: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs (B, N, F) or (B, S), lengths (B,) -> frames (B, N', D), frame_lengths (B,)."""
        if inputs.shape[0] != lengths.shape[0]:
            raise ValueError(f"encoder got {inputs.shape[0]} inputs but {lengths.shape[0]} lengths")
        # Features arrive as float32 whatever dtype the encoder was loaded in.
        inputs = inputs.to(next(self.parameters()).dtype)
        # A frozen backbone keeps no graph: saves the activations' memory during training.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden, frame_lengths = self.hidden_states(
                inputs, lengths, all_layers=self.layer_sum is not None
            )
        frames = hidden[-1] if self.layer_sum is None else self.layer_sum(hidden)
        valid = lengths_to_mask(frame_lengths, frames.shape[1])
        return frames.masked_fill(~valid[..., None], 0.0), frame_lengths

    @property
    def input_kind(self) -> str:
        """``input_spec.kind``: "fbank" | "whisper" | "waveform"."""
        return self.input_spec.kind

    @property
    def n_mels(self) -> int | None:
        """``input_spec.n_mels``: mel bins of a log-mel input, None for the waveform."""
        return self.input_spec.n_mels

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder proper (everything but the layer weighting)."""
        skip = {id(p) for p in self.layer_sum.parameters()} if self.layer_sum else set()
        return [p for p in self.parameters() if id(p) not in skip]

    def freeze(self) -> SpeechEncoder:
        """No gradients, eval mode (dropout off) from now on, whatever ``train()`` says."""
        for p in self.backbone_parameters():
            p.requires_grad_(False)
        self.frozen = True
        return self.train(self.training)

    def train(self, mode: bool = True) -> SpeechEncoder:
        super().train(mode)
        if self.frozen:
            for name, child in self.named_children():
                if name != "layer_sum":
                    child.eval()
        return self


# --------------------------------------------------------------------------- conformer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryPositions(nn.Module):
    """Rotary position encoding: attention scores depend on relative offsets only."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos, sin, each (N, head_dim)."""
        angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x (B, N, D), valid (B, N) bool -> (B, N, D); padded frames are never attended to."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = (t.to(x.dtype) for t in rope)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=valid[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, mult * d_model),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(mult * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv over time, pointwise conv.

    LayerNorm replaces the usual BatchNorm: batch statistics would let padding and batch
    composition change an utterance's frames.
    """

    def __init__(self, d_model: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.depth_norm = nn.LayerNorm(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), valid (B, N) -> (B, N, D)."""
        y = F.glu(self.pointwise_in(self.norm(x)), dim=-1)
        # Zeros past the end, exactly what the convolution's own padding gives a lone utterance.
        y = y.masked_fill(~valid[..., None], 0.0)
        y = self.depthwise(y.transpose(1, 2)).transpose(1, 2)
        return self.dropout(self.pointwise_out(F.silu(self.depth_norm(y))))


class ConformerBlock(nn.Module):
    """Macaron FFN/2, self-attention, convolution, FFN/2, LayerNorm (Gulati et al., 2020)."""

    def __init__(self, d_model: int, n_heads: int, ff_mult: int, kernel: int, dropout: float):
        super().__init__()
        self.ff1 = FeedForward(d_model, ff_mult, dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = ConvModule(d_model, kernel, dropout)
        self.ff2 = FeedForward(d_model, ff_mult, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), valid, rope))
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class Conv2dSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions over (time, frequency): 10 ms frames -> 40 ms."""

    MIN_FRAMES = 7  # shortest input giving one output frame

    def __init__(self, n_mels: int, d_model: int, channels: int | None = None) -> None:
        super().__init__()
        # The second convolution runs at 20 ms over every mel band: with d_model channels it
        # costs more than the conformer blocks, so small (CPU) models use fewer channels.
        channels = channels or d_model
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, stride=2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2),
            nn.ReLU(),
        )
        freq = ((n_mels - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * freq, d_model)

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        # Each unpadded 3-wide stride-2 convolution maps n frames to (n - 1) // 2; a valid
        # output frame therefore never reads an input frame past the utterance's end.
        return ((lengths - 1) // 2 - 1) // 2

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, N, F) -> (B, N', D)."""
        x = self.conv(feats.unsqueeze(1))  # (B, D, N', F')
        b, d, n, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, n, d * f))


class ConformerEncoder(SpeechEncoder):
    """The built-in encoder: log-mel (B, N, n_mels) at 10 ms -> (B, N/4, d_model) at 40 ms."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(cfg.layers, cfg.n_layers + 1)
        d_model, n_heads = cfg.d_model, cfg.n_heads
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ConfigError(
                f"conformer d_model={d_model} must split into n_heads={n_heads} heads of even size"
            )
        if cfg.conv_kernel % 2 == 0:
            raise ConfigError(f"conformer conv_kernel must be odd, got {cfg.conv_kernel}")
        if cfg.n_mels < 7:
            raise ConfigError(f"conformer needs at least 7 mel bins, got n_mels={cfg.n_mels}")
        # The architecture alone: what save_pretrained records and from_pretrained rebuilds.
        self.arch = {k: getattr(cfg, k) for k in CONFORMER_CONFIG_FIELDS}
        self.output_dim = d_model
        self.input_spec = EncoderInput("fbank", n_mels=cfg.n_mels)
        self.subsampling = Conv2dSubsampling(cfg.n_mels, d_model, cfg.subsampling_channels)
        self.rope = RotaryPositions(d_model // n_heads)
        self.blocks = nn.ModuleList(
            ConformerBlock(d_model, n_heads, cfg.ff_mult, cfg.conv_kernel, cfg.dropout)
            for _ in range(cfg.n_layers)
        )

    def hidden_states(
        self, feats: torch.Tensor, lengths: torch.Tensor, all_layers: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """feats (B, N, F) -> hidden states [subsampled input, block 1, ...] of (B, N', D)."""
        n_mels = self.arch["n_mels"]
        if feats.dim() != 3 or feats.shape[-1] != n_mels:
            raise ValueError(
                f"conformer encoder expects log-mel features (B, N, {n_mels}), got "
                f"{tuple(feats.shape)}"
            )
        if int(lengths.min()) < Conv2dSubsampling.MIN_FRAMES:
            raise ValueError(
                f"utterance too short for the conformer: {int(lengths.min())} frames, needs at "
                f"least {Conv2dSubsampling.MIN_FRAMES} (70 ms)"
            )
        feats = feats.masked_fill(~lengths_to_mask(lengths, feats.shape[1])[..., None], 0.0)
        x = self.subsampling(feats)
        frame_lengths = Conv2dSubsampling.output_lengths(lengths)
        valid = lengths_to_mask(frame_lengths, x.shape[1])
        rope = self.rope(x.shape[1], x.device)
        hidden = [x]
        for block in self.blocks:
            x = block(x, valid, rope)
            hidden.append(x)
        return (hidden if all_layers else hidden[-1:]), frame_lengths

    def save_config(self, directory: str | Path) -> None:
        """Write the architecture (``config.json``) to ``directory``."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        config = {"model_type": "speechrl-conformer", **self.arch}
        (Path(directory) / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` (the layer weighting is not part of it)."""
        self.save_config(directory)
        state = {
            k: v.contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("layer_sum.")
        }
        save_file(state, str(Path(directory) / "model.safetensors"))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        layers: Sequence[int] | None = None,
        load_weights: bool = True,
    ) -> ConformerEncoder:
        """Load what :meth:`save_pretrained` wrote (only the architecture if not load_weights)."""
        directory = Path(directory)
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no conformer encoder at {directory}: config.json is missing")
        config = json.loads(config_file.read_text())
        if config.get("model_type") != "speechrl-conformer":
            raise ValueError(
                f"{config_file} is not a speechrl conformer (model_type "
                f"{config.get('model_type')!r}); for a Hugging Face encoder set encoder.kind"
            )
        arch = {k: config[k] for k in CONFORMER_CONFIG_FIELDS if k in config}
        encoder = cls(
            EncoderConfig(kind="conformer", layers=tuple(layers) if layers else None, **arch)
        )
        if load_weights:
            weights = directory / "model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"conformer encoder weights missing: {weights}")
            missing, unexpected = encoder.load_state_dict(load_file(str(weights)), strict=False)
            missing = [k for k in missing if not k.startswith("layer_sum.")]
            if missing or unexpected:
                raise ValueError(
                    f"{weights} does not match the conformer in config.json: missing "
                    f"{missing[:5]}, unexpected {unexpected[:5]}"
                )
        return encoder


# --------------------------------------------------------------------------- Hugging Face


def read_safetensors(directory: Path, prefixes: Sequence[str] = ("",)) -> dict[str, torch.Tensor]:
    """Tensors of a HF folder (single or sharded safetensors) whose names start with the first
    prefix that matches any name; the prefix is stripped."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / shard for shard in shards]
    else:
        raise FileNotFoundError(
            f"no model.safetensors in {directory} (pickled pytorch_model.bin files are not "
            f"loaded; re-save the model with save_pretrained(safe_serialization=True))"
        )
    names = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            names.update({name: file for name in f.keys()})
    prefix = next((p for p in prefixes if any(n.startswith(p) for n in names)), None)
    if prefix is None:
        raise ValueError(f"no weights under {list(prefixes)} in {directory}")
    state = {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    state[name[len(prefix) :]] = f.get_tensor(name)
    return state


def read_hf_config(path: str | Path | None, kind: str,
                   trust_remote_code: bool = False) -> PretrainedConfig:
    if path is None:
        raise ConfigError(f"encoder.kind={kind!r} needs encoder.path (a Hugging Face folder)")
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model at {path}: config.json is missing")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if config.model_type != kind:
        raise ConfigError(
            f"encoder.kind={kind!r} but {path} holds a {config.model_type!r} model; set "
            f"encoder.kind to match"
        )
    return config


class WhisperSpeechEncoder(SpeechEncoder):
    """The encoder half of Whisper on Whisper log-mel (B, N, n_mels): 20 ms frames.

    Whisper always sees 30 s windows; each utterance is padded there with the value silence
    takes after Whisper's normalisation, so its frames are independent of the batch.
    """

    def __init__(self, model: WhisperEncoder, layers: Sequence[int] | None = None) -> None:
        super().__init__(layers, model.config.encoder_layers + 1)
        self.model = model
        self.output_dim = model.config.d_model
        self.input_spec = EncoderInput("whisper", n_mels=model.config.num_mel_bins)
        self.window = model.config.max_source_positions * 2  # input frames per 30 s window

    @classmethod
    def from_pretrained(
        cls, path: str | Path, layers: Sequence[int] | None = None, load_weights: bool = True,
        trust_remote_code: bool = False,
    ) -> WhisperSpeechEncoder:
        """From a full Whisper folder (encoder weights picked out) or an encoder-only one."""
        config = read_hf_config(path, "whisper", trust_remote_code)
        model = WhisperEncoder(config)
        if load_weights:
            state = read_safetensors(Path(path), ("model.encoder.", "encoder.", ""))
            model.load_state_dict(state, strict=True)
        return cls(model.eval(), layers)

    def save_config(self, directory: str | Path) -> None:
        self.model.config.save_pretrained(str(directory))

    def silence_value(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per utterance: what Whisper's feature extractor gives a zero-padded tail. (B, 1, 1)

        Whisper's log-mel is x = (max(log10 m, top - 8) + 4) / 4 with top the clip's largest
        log10 m; silence has log10 m = -10, hence x = max(-1.5, max(x) - 2).
        """
        top = feats.masked_fill(~valid[..., None], float("-inf")).amax(dim=(1, 2))
        return torch.clamp(top - 2.0, min=-1.5)[:, None, None]

    def hidden_states(
        self, feats: torch.Tensor, lengths: torch.Tensor, all_layers: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if feats.dim() != 3 or feats.shape[-1] != self.n_mels:
            raise ValueError(
                f"Whisper encoder expects log-mel (B, N, {self.n_mels}), got {tuple(feats.shape)}"
            )
        if int(lengths.max()) > self.window or feats.shape[1] > self.window:
            raise ValueError(
                f"Whisper takes at most {self.window} frames (30 s), got {feats.shape[1]}"
            )
        valid = lengths_to_mask(lengths, feats.shape[1])
        padded = self.silence_value(feats, valid).expand(-1, self.window, self.n_mels).clone()
        padded[:, : feats.shape[1]] = torch.where(valid[..., None], feats, padded[:, :1])
        out = self.model(padded.transpose(1, 2), output_hidden_states=all_layers)
        frame_lengths = (lengths - 1) // 2 + 1  # conv2 has stride 2, padding 1
        n = int(frame_lengths.max())
        hidden = out.hidden_states if all_layers else (out.last_hidden_state,)
        return [h[:, :n] for h in hidden], frame_lengths


class WaveformSpeechEncoder(SpeechEncoder):
    """HuBERT, WavLM or wav2vec2 on 16 kHz waveform (B, S): 20 ms frames.

    ``normalize`` (the folder's ``do_normalize``) is part of :attr:`input_spec`: the data loader
    normalises each utterance, as Hugging Face's feature extractor does, before it is batched.
    """

    def __init__(
        self, model: PreTrainedModel, layers: Sequence[int] | None = None, normalize: bool = False,
        sample_rate: int = audio_lib.SAMPLE_RATE,
    ) -> None:
        config = model.config
        if getattr(config, "add_adapter", False):
            raise ValueError("wav2vec2 models with an adapter (add_adapter=True) are not supported")
        super().__init__(layers, config.num_hidden_layers + 1)
        self.model = model
        self.output_dim = config.hidden_size
        self.input_spec = EncoderInput("waveform", sample_rate=sample_rate, normalize=normalize)
        # GroupNorm in the first convolution normalises over time, padding included: such
        # models (feat_extract_norm="group") must see each utterance alone.
        self.one_by_one = config.feat_extract_norm == "group"

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        kind: str,
        layers: Sequence[int] | None = None,
        load_weights: bool = True,
        trust_remote_code: bool = False,
    ) -> WaveformSpeechEncoder:
        config = read_hf_config(path, kind, trust_remote_code)
        if load_weights:
            model = AutoModel.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        else:
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        preprocessor = Path(path) / "preprocessor_config.json"
        settings = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        return cls(model.eval(), layers, bool(settings.get("do_normalize", False)),
                   int(settings.get("sampling_rate", audio_lib.SAMPLE_RATE)))

    @property
    def normalize(self) -> bool:
        """``input_spec.normalize``: the folder's ``do_normalize``."""
        return self.input_spec.normalize

    def save_config(self, directory: str | Path) -> None:
        self.model.config.save_pretrained(str(directory))
        preprocessor = {"do_normalize": self.normalize,
                        "sampling_rate": self.input_spec.sample_rate}
        (Path(directory) / "preprocessor_config.json").write_text(json.dumps(preprocessor) + "\n")

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Samples -> frames through the model's convolutions (no padding)."""
        config = self.model.config
        for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return lengths

    def hidden_states(
        self, wave: torch.Tensor, lengths: torch.Tensor, all_layers: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        if wave.dim() != 2:
            raise ValueError(
                f"{self.model.config.model_type} expects waveform (B, S), got {tuple(wave.shape)}"
            )
        frame_lengths = self.output_lengths(lengths)
        if int(frame_lengths.min()) < 1:
            raise ValueError(
                f"utterance too short: {int(lengths.min())} samples give no encoder frame"
            )
        valid = lengths_to_mask(lengths, wave.shape[1])
        wave = wave.masked_fill(~valid, 0.0)  # normalised already, if at all (input_spec)
        if self.one_by_one:
            hidden = self._one_by_one(wave, lengths, all_layers)
        else:
            out = self.model(wave, attention_mask=valid.long(), output_hidden_states=all_layers)
            hidden = out.hidden_states if all_layers else (out.last_hidden_state,)
        n = int(frame_lengths.max())
        return [h[:, :n] for h in hidden], frame_lengths

    def _one_by_one(
        self, wave: torch.Tensor, lengths: torch.Tensor, all_layers: bool
    ) -> list[torch.Tensor]:
        per_utt = []
        for row, length in zip(wave, lengths.tolist(), strict=True):
            out = self.model(row[None, :length], output_hidden_states=all_layers)
            per_utt.append(out.hidden_states if all_layers else (out.last_hidden_state,))
        n = max(h[0].shape[1] for h in per_utt)
        return [
            torch.cat([F.pad(h[i], (0, 0, 0, n - h[i].shape[1])) for h in per_utt])
            for i in range(len(per_utt[0]))
        ]


# --------------------------------------------------------------------------- factory


def build_encoder(cfg: EncoderConfig, *, load_weights: bool = True,
                  trust_remote_code: bool = False) -> SpeechEncoder:
    """The encoder ``cfg`` describes, frozen if ``cfg.freeze``.

    ``load_weights=False`` builds the architecture only (from ``cfg.path``'s config): checkpoints
    load their own copy of the weights afterwards. ``trust_remote_code`` goes to every Hugging
    Face loader (``model.trust_remote_code``).
    """
    layers = tuple(cfg.layers) if cfg.layers else None
    if cfg.kind == "conformer":
        if cfg.path:
            encoder = ConformerEncoder.from_pretrained(cfg.path, layers, load_weights)
        else:
            encoder = ConformerEncoder(cfg)
    elif cfg.kind == "whisper":
        encoder = WhisperSpeechEncoder.from_pretrained(cfg.path, layers, load_weights,
                                                       trust_remote_code)
        if encoder.n_mels != cfg.n_mels:
            raise ConfigError(
                f"{cfg.path} is a Whisper with {encoder.n_mels} mel bins but encoder.n_mels="
                f"{cfg.n_mels}; set encoder.n_mels={encoder.n_mels} so features match"
            )
    elif cfg.kind in WAVEFORM_KINDS:
        encoder = WaveformSpeechEncoder.from_pretrained(cfg.path, cfg.kind, layers, load_weights,
                                                        trust_remote_code)
    else:
        raise ValueError(f"unknown encoder.kind {cfg.kind!r}; choose one of {ENCODER_KINDS}")
    if cfg.freeze:
        encoder.freeze()
    return encoder
