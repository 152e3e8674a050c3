"""Speech encoders behind one small interface.

Every encoder maps ``(inputs, lengths) -> (frames (B, N', D_enc), frame_lengths (B,))`` and says
what it eats in ``input_spec``, an :class:`EncoderInput` (kind, mel bins, sample rate,
normalisation) that the data loader is built from; its ``kind`` is one of:

* ``"fbank"``: 80-bin log-mel, (B, N, 80), 10 ms hop: the built-in
  :class:`~speechrl.conformer.ConformerEncoder` (40 ms frames after a x4 convolutional
  subsampling, as the paper's encoder; trained with CTC by ``speechrl pretrain-encoder``);
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
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from speechrl import audio as audio_lib
from speechrl.config import ConfigError, EncoderConfig

INPUT_KINDS = audio_lib.FEATURE_KINDS
WAVEFORM_KINDS = ("hubert", "wavlm", "wav2vec2")
ENCODER_KINDS = ("conformer", "whisper", *WAVEFORM_KINDS)


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
    # speechrl.conformer builds on SpeechEncoder above, so it is imported here, not at the top.
    from speechrl.conformer import ConformerEncoder

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
