"""SpeechLLM: a speech encoder, a projector and a decoder-only causal LM (paper II-A, III-A).

The encoder's frames are stacked k at a time and projected to the LLM's embedding size; the
projected frames take the place of the speech placeholders of the prompt (``speechrl.prompt``).
The model scores transcripts (eq. 2) with :meth:`SpeechLLM.target_logits` /
:meth:`SpeechLLM.target_logprobs`; ``speechrl.generate`` decodes from
:meth:`SpeechLLM.inference_prompt`. Both use left padding with position ids
``cumsum(attention_mask) - 1``, as Hugging Face ``generate`` does, so a transcript gets the same
log-probabilities from either path.

Shapes: B batch, L prompt length, T tokens, N frames, F features, V vocabulary, D hidden.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import peft
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    PreTrainedModel,
)

from speechrl.config import LLMConfig, LoraConfig, ModelConfig, ProjectorConfig
from speechrl.encoders import SpeechEncoder, build_encoder, lengths_to_mask
from speechrl.prompt import build_prompt, pad_prompts
from speechrl.tokenizer import SpeechTokenizer


class SpeechLLMOutput(NamedTuple):
    """What :meth:`SpeechLLM.forward` returns (a tuple, so DDP and FSDP2 see its tensors)."""

    logits: torch.Tensor  # (B*G, T, V) target logits
    # With ``with_speech_ctc``: each speech token read through the LLM's input embeddings,
    # (B, N, V) = speech @ E^T, and the speech lengths (B,); None otherwise.
    speech_ctc_logits: torch.Tensor | None = None
    speech_lengths: torch.Tensor | None = None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LLM families whose prompt keys and values can be computed once per audio and shared by its G
# candidates (SpeechLLM.group_target_logits): checked against the full pass per candidate in
# tests/test_model.py, with sdpa and eager attention, LoRA on and off.
SHARED_PROMPT_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SHARED_PROMPT_ATTENTION = ("sdpa", "eager")

# Llama-architecture presets. paper-2b / paper-8b follow III-A: SwiGLU, 8 query groups (KV
# heads), weights tied in the 8B only. tiny is a CPU demo (5-15 M parameters with the built-in
# encoder and a ~2k vocabulary); small fits one GPU (~100 M).
LLM_PRESETS: dict[str, dict[str, int | bool]] = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        tie_word_embeddings=True,
    ),
    "small": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        tie_word_embeddings=True,
    ),
    "paper-2b": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=8192,
        tie_word_embeddings=False,
    ),
    "paper-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=16384,
        tie_word_embeddings=True,
    ),
}


def llm_config_for_preset(name: str, vocab_size: int) -> LlamaConfig:
    """The Llama config of preset ``name`` for a ``vocab_size``-token vocabulary."""
    if name not in LLM_PRESETS:
        raise ValueError(f"unknown LLM preset {name!r}; choose one of {sorted(LLM_PRESETS)}")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_act="silu",  # with the gate projection: SwiGLU
        max_position_embeddings=2048,  # the paper caps sequences at 2048 tokens
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **LLM_PRESETS[name],
    )


def build_llm(cfg: LLMConfig, vocab_size: int, *, load_weights: bool = True,
              trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM of ``cfg``: from ``cfg.path`` if set, else a randomly initialised preset.
    ``trust_remote_code`` lets a folder's own modelling code run (``model.trust_remote_code``)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"unknown llm.dtype {cfg.dtype!r}; choose one of {sorted(DTYPES)}")
    kwargs = dict(dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation,
                  trust_remote_code=trust_remote_code)
    if cfg.path is None:
        return AutoModelForCausalLM.from_config(
            llm_config_for_preset(cfg.preset, vocab_size), **kwargs
        )
    if load_weights:
        return AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_config(config, **kwargs)


def apply_lora(llm: PreTrainedModel, cfg: LoraConfig, tokenizer: SpeechTokenizer) -> nn.Module:
    """Wrap ``llm`` with LoRA adapters on ``cfg.target_modules``; base weights are frozen.

    The input embeddings of the prompt's special tokens stay trainable: tokens added to a
    pretrained LLM start identical (the mean embedding) and must learn their roles.
    """
    prompt_ids = sorted(
        {
            tokenizer.user_id,
            tokenizer.bos_id,
            tokenizer.speech_bos_id,
            tokenizer.system_id,
            tokenizer.eos_id,
        }
    )
    lora = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        trainable_token_indices=prompt_ids,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(llm, lora)


class Projector(nn.Module):
    """Stack k consecutive frames, then project to the LLM's embedding size (paper III-A)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: ProjectorConfig) -> None:
        super().__init__()
        if cfg.stack < 1:
            raise ValueError(f"projector.stack must be >= 1, got {cfg.stack}")
        self.stack = cfg.stack
        stacked = in_dim * cfg.stack
        if cfg.kind == "linear":
            self.net = nn.Linear(stacked, out_dim)
        elif cfg.kind == "mlp":
            hidden = cfg.hidden or out_dim
            self.net = nn.Sequential(
                nn.Linear(stacked, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
            )
        else:
            raise ValueError(f"unknown projector.kind {cfg.kind!r}; choose 'linear' or 'mlp'")

    def forward(
        self, frames: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, N, D_enc), lengths (B,) -> (B, ceil(N/k), D), ceil(lengths/k).

        The remainder is zero-padded, not dropped, so the last few frames of audio are kept.
        """
        b, n, d = frames.shape
        k = self.stack
        frames = frames.masked_fill(~lengths_to_mask(lengths, n)[..., None], 0.0)
        frames = nn.functional.pad(frames, (0, 0, 0, (-n) % k))
        stacked = frames.reshape(b, -1, k * d)
        return self.net(stacked), torch.div(lengths + k - 1, k, rounding_mode="floor")


class SpeechLLM(nn.Module):
    """Encoder + projector + causal LM, with the prompt of ``speechrl.prompt``."""

    def __init__(
        self,
        encoder: SpeechEncoder,
        projector: Projector,
        llm: nn.Module,
        tokenizer: SpeechTokenizer,
        config: ModelConfig,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_config(
        cls, cfg: ModelConfig, tokenizer: SpeechTokenizer, *, load_weights: bool = True
    ) -> SpeechLLM:
        """Build the model ``cfg`` describes; ``load_weights=False`` builds the architecture
        only (``speechrl.checkpoint`` then loads its own weights)."""
        remote = cfg.trust_remote_code
        encoder = build_encoder(cfg.encoder, load_weights=load_weights, trust_remote_code=remote)
        llm = build_llm(cfg.llm, tokenizer.vocab_size, load_weights=load_weights,
                        trust_remote_code=remote)
        tokenizer.resize_embeddings(llm)
        hidden = llm.get_input_embeddings().embedding_dim
        if cfg.llm.lora.r > 0:
            llm = apply_lora(llm, cfg.llm.lora, tokenizer)
        projector = Projector(encoder.output_dim, hidden, cfg.projector)
        return cls(encoder, projector, llm, tokenizer, cfg)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) -> (B, T, D) with the LLM's input embeddings."""
        return self.llm.get_input_embeddings()(ids)

    def encode_speech(
        self, inputs: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder features (B, N, F) or waveform (B, S) -> speech (B, N'', D), lengths (B,)."""
        frames, frame_lengths = self.encoder(inputs.to(self.device), lengths.to(self.device))
        return self.projector(frames, frame_lengths)

    def inference_prompt(
        self, speech: torch.Tensor, speech_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """speech (B, N, D), lengths (B,) -> inputs_embeds (B, L, D), attention_mask (B, L) long.

        Left-padded; every row ends with ``<System><BOS>``, ready for the decoder's prefill.
        """
        lengths = speech_lengths.tolist()
        if min(lengths) < 1 or max(lengths) > speech.shape[1]:
            raise ValueError(
                f"speech_lengths {lengths} must lie in 1..{speech.shape[1]} (the speech width)"
            )
        prompts = [
            build_prompt(self.tokenizer, n, instruction=self.config.instruction) for n in lengths
        ]
        batch = pad_prompts(prompts, self.tokenizer.pad_id, side="left")
        embeds = self.embed_tokens(batch.ids.to(self.device))
        speech_mask = batch.speech_mask.to(self.device)[..., None]
        valid = lengths_to_mask(speech_lengths.to(speech.device), speech.shape[1])
        # Row-major order of the placeholders matches row-major order of the valid frames.
        embeds = embeds.masked_scatter(speech_mask, speech[valid].to(embeds.dtype))
        return embeds, batch.attention_mask.to(self.device)

    def target_logits(
        self,
        speech: torch.Tensor,
        speech_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, T, V) predicting each target token after the inference prompt.

        targets (B, T) long: transcript ids then <EOS>, right-padded; target_mask (B, T) bool.
        The last target is never fed in, and lm_head runs on the T predicting positions only.
        """
        _check_targets(targets, target_mask)
        prompt_embeds, prompt_mask = self.inference_prompt(speech, speech_lengths)
        targets, target_mask = targets.to(self.device), target_mask.to(self.device)
        fed = targets[:, :-1].masked_fill(~target_mask[:, :-1], self.tokenizer.pad_id)
        embeds = torch.cat([prompt_embeds, self.embed_tokens(fed)], dim=1)
        mask = torch.cat([prompt_mask, target_mask[:, :-1].long()], dim=1)
        # Positions count real tokens only: left padding shifts nothing (as HF generate).
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            logits_to_keep=targets.shape[1],
            use_cache=False,
        )
        return out.logits

    def shared_prompt_unsupported(self) -> str | None:
        """Why this model's G candidates cannot share one prompt pass, or None when they can
        (:meth:`group_target_logits`)."""
        base = _unwrapped(self.llm)
        config = base.config
        if config.model_type not in SHARED_PROMPT_MODEL_TYPES:
            return (f"LLM type {config.model_type!r} is not among those checked with a shared "
                    f"prompt pass ({', '.join(SHARED_PROMPT_MODEL_TYPES)})")
        attention = getattr(config, "_attn_implementation", None) or "eager"
        if attention not in SHARED_PROMPT_ATTENTION:
            return (f"attention {attention!r} is not among those checked with a shared prompt "
                    f"pass ({', '.join(SHARED_PROMPT_ATTENTION)})")
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window",
                                                                True):
            return "sliding-window attention"
        return None

    def group_target_logits(
        self,
        speech: torch.Tensor,
        speech_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor,
        group_size: int,
        packed: bool = False,
    ) -> torch.Tensor:
        """:meth:`target_logits` of G = ``group_size`` candidates per audio, with the prompt run
        once per audio instead of once per candidate.

        speech (B, N, D) and speech_lengths (B,) are each audio's once; targets and
        target_mask (B*G, T) its G candidates, audio-major. Causal attention makes the prompt's
        keys and values independent of what follows, so they are computed for the B prompts
        (with gradients), repeated for the G candidates, and only the candidates' tokens run
        against them. Backward sums the G candidates' gradients into the shared prompt. The
        logits equal the full pass's up to float rounding.

        ``packed``: lm_head runs on the target_mask positions only and the logits come back
        (n, V), n = target_mask.sum(), in row-major order of the mask: the padded positions of
        short candidates cost no vocabulary projection (nor its backward).
        """
        _check_targets(targets, target_mask)
        B, G = speech.shape[0], group_size
        if targets.shape[0] != B * G:
            raise ValueError(f"targets hold {targets.shape[0]} rows for {B} audios x G={G}")
        prompt_embeds, prompt_mask = self.inference_prompt(speech, speech_lengths)
        targets, target_mask = targets.to(self.device), target_mask.to(self.device)
        base = _unwrapped(self.llm)
        decoder, lm_head = base.get_decoder(), base.get_output_embeddings()
        cache_arg = _cache_argument(self.llm)
        cache = DynamicCache(config=self.llm.config)
        positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
        out = decoder(inputs_embeds=prompt_embeds, attention_mask=prompt_mask,
                      position_ids=positions, use_cache=True, **{cache_arg: cache})
        # The prompt's last position predicts every candidate's first token.
        hidden = out.last_hidden_state[:, -1:].repeat_interleave(G, dim=0)  # (B*G, 1, H)
        if targets.shape[1] > 1:
            cache.batch_repeat_interleave(G)
            fed_mask = target_mask[:, :-1]
            fed = targets[:, :-1].masked_fill(~fed_mask, self.tokenizer.pad_id)
            mask = torch.cat([prompt_mask.repeat_interleave(G, dim=0), fed_mask.long()], dim=1)
            # Positions go on from each prompt's real length, as in the full pass.
            start = prompt_mask.sum(-1).repeat_interleave(G)[:, None]
            steps = torch.arange(fed.shape[1], device=fed.device)[None]
            positions = (start + steps).masked_fill(~fed_mask, 1)
            out = decoder(inputs_embeds=self.embed_tokens(fed), attention_mask=mask,
                          position_ids=positions, use_cache=True, **{cache_arg: cache})
            hidden = torch.cat([hidden, out.last_hidden_state], dim=1)  # (B*G, T, H)
        return lm_head(hidden[target_mask] if packed else hidden)

    def target_logprobs(
        self,
        speech: torch.Tensor,
        speech_lengths: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor,
    ) -> torch.Tensor:
        """log p(target_t | prompt, target_<t) (B, T), float32, 0 where target_mask is False."""
        logits = self.target_logits(speech, speech_lengths, targets, target_mask)
        return token_logprobs(logits, targets.to(logits.device), target_mask.to(logits.device))

    def forward(
        self,
        inputs: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        target_mask: torch.Tensor,
        group_size: int = 1,
        frames: tuple[torch.Tensor, torch.Tensor] | None = None,
        with_speech_ctc: bool = False,
        shared_prompt: bool = False,
        packed: bool = False,
    ) -> SpeechLLMOutput:
        """Audio inputs to target logits (B*G, T, V): the path a DDP- or FSDP-wrapped trainer
        calls. targets and target_mask (B*G, T) hold G = ``group_size`` candidates per audio,
        audio-major (GRPO); each audio is encoded once and its speech repeated G times, or,
        with ``shared_prompt``, its prompt run once for the G candidates
        (:meth:`group_target_logits`; check :meth:`shared_prompt_unsupported` first).

        ``frames``: the encoder's output (B, N, D_enc) and lengths (B,) when already known (a
        frozen encoder's cached output); the encoder is then skipped and ``inputs`` unused.
        ``with_speech_ctc``: also return each speech token read through the LLM's input
        embeddings, logits (B, N, V) = speech @ E^T, and the speech lengths (B,), for
        :func:`speechrl.losses.speech_ctc_loss` (``sft.speech_ctc_weight``).
        ``packed``: the logits at the target_mask positions only, (n, V) in row-major order of
        the mask (:func:`packed_token_logprobs` reads them); with ``shared_prompt`` the padded
        positions then cost no lm_head.
        """
        if frames is None:
            speech, speech_lengths = self.encode_speech(inputs, lengths)
        else:
            speech, speech_lengths = self.projector(frames[0].to(self.device),
                                                    frames[1].to(self.device))
        ctc_logits = speech @ self.llm.get_input_embeddings().weight.t() if with_speech_ctc \
            else None
        ctc_lengths = speech_lengths if with_speech_ctc else None
        if shared_prompt:
            logits = self.group_target_logits(speech, speech_lengths, targets, target_mask,
                                              group_size, packed=packed)
        else:
            if group_size > 1:
                speech = speech.repeat_interleave(group_size, dim=0)
                speech_lengths = speech_lengths.repeat_interleave(group_size, dim=0)
            logits = self.target_logits(speech, speech_lengths, targets, target_mask)
            if packed:
                logits = logits[target_mask.to(logits.device)]
        return SpeechLLMOutput(logits, ctc_logits, ctc_lengths)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer should update (frozen encoder and LoRA base excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (tied weights once)."""
        params = self.trainable_parameters() if trainable_only else self.parameters()
        return sum(p.numel() for p in params)


def _unwrapped(llm: nn.Module) -> nn.Module:
    """The causal LM under a PEFT wrapper (its LoRA layers are injected in place), or ``llm``."""
    return llm.get_base_model() if isinstance(llm, peft.PeftModel) else llm


def _cache_argument(llm: nn.Module) -> str:
    """The name a causal LM's forward gives its KV cache (transformers 5 renamed
    ``past_key_values`` to ``cache``)."""
    base = _unwrapped(llm)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T), mask (B, T) -> log p(targets) (B, T), 0 off the mask."""
    safe = targets.masked_fill(~mask, 0)
    picked = logits.gather(-1, safe[..., None]).squeeze(-1).float()
    logp = picked - torch.logsumexp(logits.float(), dim=-1)
    return logp.masked_fill(~mask, 0.0)


def packed_token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed logits (n, V) at the mask's positions (``SpeechLLM.forward(..., packed=True)``),
    targets (B, T), mask (B, T) -> (log p(targets) (B, T) float32, 0 off the mask; the
    log-softmax (n, V) float32, for the entropy)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(-1, targets[mask][:, None]).squeeze(-1)
    logp = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    return logp.masked_scatter(mask, picked), log_probs


def _check_targets(targets: torch.Tensor, target_mask: torch.Tensor) -> None:
    if targets.dim() != 2 or targets.shape != target_mask.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} and target_mask {tuple(target_mask.shape)} must both "
            f"be (B, T)"
        )
    if target_mask.dtype != torch.bool:
        raise ValueError(f"target_mask must be bool, got {target_mask.dtype}")
    if targets.shape[1] == 0:
        raise ValueError("targets are empty (T = 0): append at least the <EOS> token")
    if (target_mask[:, 1:] & ~target_mask[:, :-1]).any():
        raise ValueError("target_mask must be right-padded: True then False in every row")
