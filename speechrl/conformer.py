"""The built-in Conformer encoder: 80-bin log-mel at 10 ms -> ``d_model`` frames at 40 ms.

A x4 convolutional subsampling front-end, then Conformer blocks (feed-forward, self-attention with
rotary positions, convolution, feed-forward); trained with CTC by ``speechrl pretrain-encoder``.
:class:`ConformerEncoder` is one :class:`~speechrl.encoders.SpeechEncoder`, built by
:func:`speechrl.encoders.build_encoder` for ``model.encoder.kind=conformer``; it saves and loads
its own folder (``config.json`` with ``model_type: speechrl-conformer`` + ``model.safetensors``).

Shapes: B batch, N frames, F features, D hidden.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from speechrl.config import ConfigError, EncoderConfig
from speechrl.encoders import EncoderInput, SpeechEncoder, lengths_to_mask

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
