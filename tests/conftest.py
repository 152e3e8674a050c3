"""Shared tiny fixtures: a BPE tokenizer trained on a few sentences, a tiny random Llama and a
tiny SpeechLLM around them (conformer encoder), all on CPU and built in well under a second."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tones import write_tone_corpus
from transformers import LlamaConfig, LlamaForCausalLM

from speechrl.config import EncoderConfig, LLMConfig, ModelConfig, ProjectorConfig
from speechrl.model import SpeechLLM
from speechrl.tokenizer import SpeechTokenizer, train_bpe

# precision auto means fp32 on every CPU in the tests, and in the commands they start, so that
# their figures do not depend on whether the machine computes bf16 natively; the tests of bf16
# and of the probe itself ask for them explicitly (tests/test_runtime.py).
os.environ["SPEECHRL_CPU_BF16"] = "0"

TINY_TEXTS = [
    "the cat sat on the mat",
    "hello world this is a test",
    "convert speech to text",
    "le chat est sur le tapis près de la fenêtre",
    "où est la gare s'il vous plaît",
    "der Hund läuft über die Straße",
    "el niño come una manzana en la mañana",
    "la città è bellissima di notte",
]

TINY_ENCODER = EncoderConfig(
    kind="conformer",
    n_mels=80,
    d_model=32,
    n_layers=2,
    n_heads=2,
    ff_mult=2,
    conv_kernel=5,
    dropout=0.0,
)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (~300 tokens) saved in the Hugging Face format."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_bpe(TINY_TEXTS * 4, vocab_size=300, out_dir=out)
    return out


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> SpeechTokenizer:
    return SpeechTokenizer.from_pretrained(tiny_tokenizer_dir)


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random 2-layer Llama (hidden 32) saved with save_pretrained."""
    out = tmp_path_factory.mktemp("tiny_llm")
    vocab = SpeechTokenizer.from_pretrained(tiny_tokenizer_dir).vocab_size
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(vocab)).save_pretrained(out)
    return out


@pytest.fixture
def tiny_encoder_config() -> EncoderConfig:
    """A 2-block conformer, d_model 32, no dropout, frozen (the EncoderConfig default)."""
    return TINY_ENCODER


@pytest.fixture
def tiny_model_config(tiny_llm_dir: Path, tiny_tokenizer_dir: Path) -> ModelConfig:
    return ModelConfig(
        encoder=TINY_ENCODER,
        projector=ProjectorConfig(stack=2),
        llm=LLMConfig(path=str(tiny_llm_dir)),
        tokenizer=str(tiny_tokenizer_dir),
    )


@pytest.fixture(scope="module")
def tiny_model_config_module(tiny_llm_dir: Path, tiny_tokenizer_dir: Path) -> ModelConfig:
    """The same tiny model config, for module-scoped fixtures (e.g. a model trained once)."""
    return ModelConfig(
        encoder=TINY_ENCODER,
        projector=ProjectorConfig(stack=2),
        llm=LLMConfig(path=str(tiny_llm_dir)),
        tokenizer=str(tiny_tokenizer_dir),
    )


@pytest.fixture
def tiny_model(tiny_model_config: ModelConfig, tiny_tokenizer: SpeechTokenizer) -> SpeechLLM:
    """A tiny SpeechLLM in eval mode (conformer 32-d frozen, projector x2, Llama 32-d)."""
    torch.manual_seed(0)
    return SpeechLLM.from_config(tiny_model_config, tiny_tokenizer).eval()


@pytest.fixture
def random_fbank() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """make(lengths, n_mels=80, seed=0) -> zero-padded features (B, N, F) and lengths (B,)."""

    def make(lengths: list[int], n_mels: int = 80, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        feats = torch.zeros(len(lengths), max(lengths), n_mels)
        for i, n in enumerate(lengths):
            feats[i, :n] = torch.randn(n, n_mels, generator=gen)
        return feats, torch.tensor(lengths)

    return make


@pytest.fixture(scope="session")
def tone_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """48 training and 8 dev utterances of the tone corpus (tests/tones.py), written once and
    read, never written, by the tests that take it."""
    root = tmp_path_factory.mktemp("tones")
    return {"train": write_tone_corpus(root / "train", 48, seed=0),
            "dev": write_tone_corpus(root / "dev", 8, seed=1)}


@pytest.fixture(scope="session")
def small_tone_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """32 training and 4 dev utterances of the tone corpus, for the reliability tests' short
    runs (stopped, resumed, corrupted checkpoints); written once, never written by a test."""
    root = tmp_path_factory.mktemp("reliability")
    return {"train": write_tone_corpus(root / "train", 32, seed=0),
            "dev": write_tone_corpus(root / "dev", 4, seed=1)}
