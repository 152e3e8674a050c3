"""The text tokenizer with the prompt's special tokens (paper II-A), and BPE training.

:class:`SpeechTokenizer` wraps a Hugging Face fast tokenizer and makes sure every id the prompt
needs exists: ``<User>``, ``<BOS>``, ``<S-BOS>``, ``<System>``, ``<EOS>``, a padding token and the
speech placeholder whose embedding the model replaces with projected speech frames. An LLM's own
BOS / EOS / padding tokens are reused when it has them, so a pretrained model keeps the embeddings
it learned for them.

:func:`train_bpe` builds a byte-level BPE tokenizer for a new corpus (any script or accent: bytes
never go out of vocabulary), saved in the Hugging Face format.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from speechrl.config import ModelConfig

USER_TOKEN = "<User>"
BOS_TOKEN = "<BOS>"
SPEECH_BOS_TOKEN = "<S-BOS>"
SYSTEM_TOKEN = "<System>"
EOS_TOKEN = "<EOS>"
PAD_TOKEN = "<pad>"
SPEECH_TOKEN = "<speech>"

# The tokens this package always owns; BOS, EOS and padding come from the wrapped tokenizer
# when it defines them.
PROMPT_ONLY_TOKENS = (USER_TOKEN, SPEECH_BOS_TOKEN, SYSTEM_TOKEN, SPEECH_TOKEN)


class SpeechTokenizer:
    """A Hugging Face fast tokenizer plus the ids of the ASR prompt's special tokens.

    Attributes ``user_id, bos_id, speech_bos_id, system_id, eos_id, pad_id, speech_id`` are
    ints; ``vocab_size`` counts added tokens too, so it is the embedding size the LLM needs.
    """

    def __init__(self, hf_tokenizer: PreTrainedTokenizerFast) -> None:
        if not isinstance(hf_tokenizer, PreTrainedTokenizerFast):
            raise TypeError(
                f"SpeechTokenizer needs a fast (Rust) Hugging Face tokenizer, got "
                f"{type(hf_tokenizer).__name__}; load it with AutoTokenizer(..., use_fast=True)"
            )
        self.hf = hf_tokenizer
        self._add_missing_tokens()
        self.user_id = self._token_id(USER_TOKEN)
        self.bos_id = self._token_id(hf_tokenizer.bos_token)
        self.speech_bos_id = self._token_id(SPEECH_BOS_TOKEN)
        self.system_id = self._token_id(SYSTEM_TOKEN)
        self.eos_id = self._token_id(hf_tokenizer.eos_token)
        self.pad_id = self._token_id(hf_tokenizer.pad_token)
        self.speech_id = self._token_id(SPEECH_TOKEN)

    def _add_missing_tokens(self) -> None:
        hf = self.hf
        new = [t for t in PROMPT_ONLY_TOKENS if t not in hf.get_vocab()]
        roles = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
        missing_roles = {role: tok for role, tok in roles.items() if getattr(hf, role) is None}
        new += [t for t in missing_roles.values() if t not in hf.get_vocab() and t not in new]
        if new:
            # normalized=False: the token must match verbatim, whatever the text normaliser does.
            hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        for role, tok in missing_roles.items():
            setattr(hf, role, tok)

    def _token_id(self, token: str) -> int:
        token_id = self.hf.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.hf.unk_token_id and token != self.hf.unk_token:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the prompt's special tokens (never part of a transcript)."""
        return frozenset(
            (
                self.user_id,
                self.bos_id,
                self.speech_bos_id,
                self.system_id,
                self.eos_id,
                self.pad_id,
                self.speech_id,
            )
        )

    def prompt_tokens(self) -> dict[str, str]:
        """The prompt's token strings by role (recorded in checkpoints)."""
        return {
            "user": USER_TOKEN,
            "bos": self.hf.bos_token,
            "speech_bos": SPEECH_BOS_TOKEN,
            "system": SYSTEM_TOKEN,
            "eos": self.hf.eos_token,
            "pad": self.hf.pad_token,
            "speech": SPEECH_TOKEN,
        }

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens around it.

        Text is only ever text: a transcript that spells a special token ("say <EOS> now") is
        tokenized as its characters, never as that token, so it cannot end a training target
        early or open a fake prompt section. ``split_special_tokens`` is per call, so the
        wrapped tokenizer's own default (and its saved files) stay as they were.
        """
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; special tokens (prompt, EOS, padding) are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` of each row of ``batch`` ((B, T) tensor or list of id lists)."""
        return [self.decode(ids) for ids in batch]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the Hugging Face tokenizer files (added tokens included) to ``directory``."""
        self.hf.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, trust_remote_code: bool = False
                        ) -> SpeechTokenizer:
        """Load any Hugging Face fast tokenizer folder and add the prompt tokens it lacks
        (``trust_remote_code``: let the folder's own tokenizer code run)."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"no tokenizer folder at {path}")
        return cls(AutoTokenizer.from_pretrained(str(path), use_fast=True,
                                                 trust_remote_code=trust_remote_code))

    def resize_embeddings(self, llm: PreTrainedModel) -> int:
        """Grow ``llm``'s embeddings to :attr:`vocab_size` if they are smaller.

        New rows start at the mean of the existing ones (input and, if untied, output), which
        keeps the first logits of a pretrained model sane. Returns the number of rows added.
        """
        old = llm.get_input_embeddings().weight.shape[0]
        if old >= self.vocab_size:
            return 0
        llm.resize_token_embeddings(self.vocab_size, mean_resizing=False)
        with torch.no_grad():
            for layer in (llm.get_input_embeddings(), llm.get_output_embeddings()):
                if layer is not None:
                    layer.weight[old:] = layer.weight[:old].mean(dim=0, keepdim=True)
        return self.vocab_size - old


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path | None = None,
    *,
    min_frequency: int = 2,
) -> SpeechTokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it (saved to ``out_dir`` if given).

    The prompt's special tokens come first (ids 0..6, padding at 0). Text is NFC-normalised so
    that an accented letter has one spelling whether it arrived composed or decomposed.
    """
    specials = [
        PAD_TOKEN,
        BOS_TOKEN,
        EOS_TOKEN,
        USER_TOKEN,
        SPEECH_BOS_TOKEN,
        SYSTEM_TOKEN,
        SPEECH_TOKEN,
    ]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(specials)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {smallest} "
            f"({len(alphabet)} bytes + {len(specials)} special tokens)"
        )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_bpe got no non-empty text to learn from")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    # No prefix space: decode(encode(text)) == text, with no stray leading blank.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    tokenizer = SpeechTokenizer(hf)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tokenizer(cfg: ModelConfig) -> SpeechTokenizer:
    """The tokenizer a model config names: ``cfg.tokenizer``, else the LLM folder's own."""
    path = cfg.tokenizer or cfg.llm.path
    if path is None:
        raise ValueError(
            "model.tokenizer is not set and the LLM is built from a preset, so there is no "
            "tokenizer to load: train one with speechrl.tokenizer.train_bpe and set model.tokenizer"
        )
    return SpeechTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
