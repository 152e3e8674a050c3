"""Pretrained-model families end to end, as a user runs them: ``sft`` (2 steps) -> ``grpo``
(2 steps) -> ``eval`` -> ``transcribe``, through the command line, on the ``whisper-qwen`` preset
with ``key=value`` overrides.

Each model is built from a config with the real model's layout, scaled down (hidden 32, two
layers, random weights) and saved to a temporary folder beside a tokenizer with the real one's
special tokens: Llama 3 (BOS, no pad token, BOS added by its post-processor; the instruct one's
EOS ``<|eot_id|>`` and chat template), Qwen2.5 (no BOS, EOS == pad, chat template, a vocabulary
padded past the tokenizer's), Qwen3 (no BOS, EOS ``<|im_end|>``, head_dim != hidden / heads) and
Gemma 3 (BOS, its own pad, sliding-window layers). Encoders: Whisper with 80 and 128 mel bins,
HuBERT, WavLM, wav2vec2 with and without ``do_normalize`` (their preprocessor files written by
Hugging Face's own feature extractors) and the built-in conformer.

The rows pair them so that every encoder and every LLM family appears, with LoRA on and off and
layer weighting on. Before ``grpo`` the original model folders are deleted: from then on every
command has nothing but the checkpoint folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from speechrl.checkpoint import load_model
from speechrl.encoders import EncoderInput

SR = 16000
TEXTS = ["the cat sat on the mat", "hello world this is a test", "on the mat sat the cat",
         "a test of the world", "hello cat"]

# --------------------------------------------------------------------------- tokenizers

QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                  "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                  "{{ m['content'] }}<end_of_turn>\n{% endfor %}")


@dataclass(frozen=True)
class TokenizerLayout:
    """A real tokenizer's special tokens: which exist, which double as which."""

    specials: tuple[str, ...]  # in id order, first in the vocabulary
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None = None
    adds_bos: bool = False  # its post-processor puts BOS first (Llama 3, Gemma)
    chat_template: str | None = None
    tokenizer_class: str = "PreTrainedTokenizerFast"


TOKENIZERS = {
    # Llama-3.2-1B: BOS <|begin_of_text|>, EOS <|end_of_text|>, no pad token.
    "llama3": TokenizerLayout(("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"),
                              bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                              adds_bos=True),
    # Llama-3.1-8B-Instruct: EOS <|eot_id|>, a chat template.
    "llama3-instruct": TokenizerLayout(
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eot_id|>"), bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, adds_bos=True,
        chat_template=LLAMA_TEMPLATE),
    # Qwen2.5-0.5B: no BOS; EOS and pad are both <|endoftext|>; a chat template.
    "qwen2": TokenizerLayout(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None,
                             eos="<|endoftext|>", pad="<|endoftext|>",
                             chat_template=QWEN_TEMPLATE, tokenizer_class="Qwen2Tokenizer"),
    # Qwen3-0.6B: no BOS; EOS <|im_end|>, pad <|endoftext|>.
    "qwen3": TokenizerLayout(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None,
                             eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN_TEMPLATE,
                             tokenizer_class="Qwen2Tokenizer"),
    # Gemma 3: <pad> 0, <eos> 1, <bos> 2, <unk> 3; BOS added; a chat template.
    "gemma3": TokenizerLayout(("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                               "<end_of_turn>"), bos="<bos>", eos="<eos>", pad="<pad>",
                              unk="<unk>", adds_bos=True, chat_template=GEMMA_TEMPLATE),
}


def save_tokenizer(layout: TokenizerLayout, out: Path) -> int:
    """A byte-level BPE (~300 tokens) with ``layout``'s special tokens; returns its size."""
    bpe = Tokenizer(models.BPE(unk_token=layout.unk))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(layout.specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if layout.adds_bos:
        bos = layout.bos
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, bpe.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=layout.bos,
                                 eos_token=layout.eos, pad_token=layout.pad,
                                 unk_token=layout.unk, chat_template=layout.chat_template)
    hf.save_pretrained(out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = layout.tokenizer_class
    config_file.write_text(json.dumps(config, indent=2))
    return len(hf)


# --------------------------------------------------------------------------- LLMs


def llm_config(family: str, vocab: int, ids: dict[str, int | None]):
    """The family's config, scaled down: the real layout's quirks kept."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    if family in ("llama-tied", "llama-untied"):
        # Llama 3.x: llama3 RoPE scaling, 8 KV groups (here 2 of 4 heads); 1B/3B tie their
        # embeddings, 8B does not (and lists several EOS ids).
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        tied = family == "llama-tied"
        if not tied:
            common["eos_token_id"] = [ids["eos"], ids["eos"] - 1]
        return LlamaConfig(vocab_size=vocab, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, rope_parameters=rope,
                           tie_word_embeddings=tied, **common)
    if family == "qwen2":
        # Qwen2.5-0.5B: biased q/k/v, tied, a sliding window that is configured but off, and an
        # embedding table larger than the tokenizer.
        return Qwen2Config(vocab_size=vocab + 16, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048, tie_word_embeddings=True,
                           use_sliding_window=False, sliding_window=2048, **common)
    if family == "qwen3":
        # Qwen3-0.6B: q/k RMSNorm, head_dim 128 with 16 heads of a 1024 model (here 16 x 4 of
        # 32), tied.
        return Qwen3Config(vocab_size=vocab + 16, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                           **common)
    if family == "gemma3":
        # Gemma 3 1B: one KV head, head_dim 256, sliding-window layers between global ones,
        # embeddings scaled by sqrt(hidden), tied.
        return Gemma3TextConfig(vocab_size=vocab, num_attention_heads=2, num_key_value_heads=1,
                                head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"],
                                max_position_embeddings=2048, tie_word_embeddings=True,
                                **common)
    raise ValueError(family)


LLM_CLASSES = {"llama-tied": LlamaForCausalLM, "llama-untied": LlamaForCausalLM,
               "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM, "gemma3": Gemma3ForCausalLM}
LLM_TOKENIZERS = {"llama-tied": "llama3", "llama-untied": "llama3-instruct", "qwen2": "qwen2",
                  "qwen3": "qwen3", "gemma3": "gemma3"}


def save_llm(family: str, out: Path) -> None:
    """The LLM and its tokenizer in one folder, as on the Hub."""
    layout = TOKENIZERS[LLM_TOKENIZERS[family]]
    vocab = save_tokenizer(layout, out)
    hf = PreTrainedTokenizerFast.from_pretrained(out)
    ids = {"bos": hf.bos_token_id, "eos": hf.eos_token_id, "pad": hf.pad_token_id}
    torch.manual_seed(0)
    LLM_CLASSES[family](llm_config(family, vocab, ids)).save_pretrained(out)


# --------------------------------------------------------------------------- encoders

# wav2vec2's real feature encoder (seven convolutions, 320 samples a frame), 16 channels wide.
CONV = dict(conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2),
            conv_stride=(5, 2, 2, 2, 2, 2, 2), hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2)


def encoder_overrides(family: str) -> dict[str, str]:
    """``model.encoder.*`` for the family (its path apart)."""
    if family.startswith("whisper"):
        return {"kind": "whisper", "n_mels": family.removeprefix("whisper")}
    return {"kind": family.partition("-")[0]}


def save_encoder(family: str, out: Path) -> None:
    """The encoder's folder: model and preprocessor files, as on the Hub."""
    torch.manual_seed(0)
    if family.startswith("whisper"):
        n_mels = int(family.removeprefix("whisper"))  # large-v3: 128; up to large-v2: 80
        config = WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=n_mels,
                               max_source_positions=100, max_target_positions=16,
                               vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1)
        WhisperForConditionalGeneration(config).save_pretrained(out)
        WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(out)
        return
    kind, _, variant = family.partition("-")
    if kind == "hubert":  # hubert-base-ls960: GroupNorm feature encoder, no normalisation
        model, normalize = HubertModel(HubertConfig(**CONV, feat_extract_norm="group")), False
    elif kind == "wavlm":  # wavlm-large: LayerNorm encoder, stable layer norm, normalised input
        model = WavLMModel(WavLMConfig(**CONV, feat_extract_norm="layer", conv_bias=True,
                                       do_stable_layer_norm=True, num_buckets=16,
                                       max_bucket_distance=40))
        normalize = True
    elif variant == "large":  # wav2vec2-large-lv60: LayerNorm encoder, normalised input
        model = Wav2Vec2Model(Wav2Vec2Config(**CONV, feat_extract_norm="layer", conv_bias=True,
                                             do_stable_layer_norm=True))
        normalize = True
    else:  # wav2vec2-base: GroupNorm encoder, raw input
        model = Wav2Vec2Model(Wav2Vec2Config(**CONV, feat_extract_norm="group"))
        normalize = False
    model.save_pretrained(out)
    Wav2Vec2FeatureExtractor(do_normalize=normalize, return_attention_mask=normalize
                             ).save_pretrained(out)


CONFORMER = {"kind": "conformer", "path": "null", "n_mels": "80", "d_model": "32",
             "n_layers": "2", "n_heads": "2", "ff_mult": "2", "conv_kernel": "5"}

# The encoder input each family must come with (what the data loader computes).
SPECS = {
    "whisper80": EncoderInput("whisper", n_mels=80),
    "whisper128": EncoderInput("whisper", n_mels=128),
    "hubert": EncoderInput("waveform"),
    "wavlm": EncoderInput("waveform", normalize=True),
    "wav2vec2-base": EncoderInput("waveform"),
    "wav2vec2-large": EncoderInput("waveform", normalize=True),
    "conformer": EncoderInput("fbank", n_mels=80),
}


# --------------------------------------------------------------------------- matrix

@dataclass(frozen=True)
class Row:
    encoder: str
    llm: str
    lora: bool = False
    layers: str | None = None  # model.encoder.layers


ROWS = [
    # The README's recipe shape: a 128-bin Whisper (large-v3), layer weighting, LoRA.
    Row("whisper128", "qwen2", lora=True, layers="[1,2]"),
    Row("whisper80", "llama-tied"),
    Row("hubert", "llama-untied", lora=True),
    Row("wavlm", "qwen3", layers="[0,2]"),
    Row("wav2vec2-large", "gemma3", lora=True),
    Row("wav2vec2-base", "qwen3", lora=True),
    Row("conformer", "gemma3", layers="[1,2]"),
]


def tone_clip(words: list[str], rng: np.random.Generator) -> np.ndarray:
    """0.2 s of two tones per word (frequencies by word), 50 ms gaps, a little noise."""
    t = np.arange(int(0.2 * SR)) / SR
    parts = []
    for word in words:
        k = sum(map(ord, word)) % 11
        parts += [0.3 * np.sin(2 * np.pi * (300 + 150 * k) * t)
                  + 0.2 * np.sin(2 * np.pi * (2000 + 90 * k) * t), np.zeros(int(0.05 * SR))]
    clip = np.concatenate(parts)
    return (clip + 0.01 * rng.standard_normal(len(clip))).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """Six training clips and two dev clips (0.5-1 s), manifests beside them."""
    root = tmp_path_factory.mktemp("families_corpus")
    rng = np.random.default_rng(0)
    manifests = {}
    for name, n in (("train", 6), ("dev", 2)):
        rows = []
        for i in range(n):
            text = TEXTS[i % len(TEXTS)].split()[:4]
            clip = tone_clip(text, rng)
            sf.write(root / f"{name}{i}.wav", clip, SR)
            rows.append({"id": f"{name}{i}", "audio": f"{name}{i}.wav", "text": " ".join(text),
                         "language": "en", "duration": len(clip) / SR})
        manifests[name] = root / f"{name}.jsonl"
        manifests[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifests


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """Every encoder and LLM folder of the matrix, built once for all rows."""
    root = tmp_path_factory.mktemp("families_models")
    folders = {}
    for family in {row.encoder for row in ROWS} - {"conformer"}:
        folders[family] = root / family
        save_encoder(family, folders[family])
    for family in {row.llm for row in ROWS}:
        folders[family] = root / family
        save_llm(family, folders[family])
    return folders


def run_cli(*args: str) -> None:
    from speechrl.cli import main

    assert main(list(args)) == 0, args


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.encoder}+{r.llm}{'+lora' if r.lora else ''}"
                                           f"{'+layers' if r.layers else ''}" for r in ROWS])
def test_sft_grpo_eval_transcribe(row, built, corpus, tmp_path, capsys):
    # A copy of the original folders, deleted once SFT has made its checkpoint.
    originals = tmp_path / "models"
    llm = shutil.copytree(built[row.llm], originals / row.llm)
    overrides = [f"model.llm.path={llm}", f"model.tokenizer={llm}", "model.llm.dtype=float32",
                 f"model.llm.lora.r={4 if row.lora else 0}"]
    if row.encoder == "conformer":
        encoder = CONFORMER
    else:
        folder = shutil.copytree(built[row.encoder], originals / row.encoder)
        encoder = {**encoder_overrides(row.encoder), "path": str(folder)}
    overrides += [f"model.encoder.{key}={value}" for key, value in encoder.items()]
    overrides += [f"model.encoder.layers={row.layers or 'null'}", "model.projector.stack=2"]
    data = [f"data.train=[{corpus['train']}]", f"data.dev=[{corpus['dev']}]",
            "data.max_duration=30"]
    steps = ["train.max_steps=2", "train.batch_size=3", "train.warmup_steps=0",
             "train.log_every=1", "train.eval_every=1000", "train.save_every=1000",
             "train.dev_utterances=2", "grpo.group_size=2", "decoding.max_new_tokens=4"]
    sft_dir, grpo_dir = tmp_path / "sft", tmp_path / "grpo"
    run_cli("sft", "--config", "whisper-qwen", *overrides, *data, *steps,
            f"train.output_dir={sft_dir}")
    sft = sft_dir / "best"
    shutil.rmtree(originals)  # from here on, nothing but checkpoint folders

    run_cli("grpo", "--config", "whisper-qwen", *overrides, *data, *steps,
            f"train.output_dir={grpo_dir}", f"train.init={sft}")
    grpo = grpo_dir / "best"
    steps_logged = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text()
                    .splitlines()]
    assert max(r.get("step", 0) for r in steps_logged) == 2

    out = tmp_path / "eval"
    run_cli("eval", "--checkpoint", f"sft={sft}", "--checkpoint", f"grpo={grpo}",
            "--data", f"dev={corpus['dev']}", "--out", str(out), "--device", "cpu")
    for name in ("sft", "grpo"):
        assert len((out / "hyps" / f"{name}.dev.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    wav = corpus["dev"].parent / "dev0.wav"
    run_cli("transcribe", "--checkpoint", str(grpo), "--device", "cpu", str(wav))
    printed = capsys.readouterr().out
    assert printed.startswith(f"{wav}\t") and printed.count("\n") == 1

    # The checkpoint says what its encoder takes, and which prompt tokens its LLM uses.
    model = load_model(grpo)
    assert model.encoder.input_spec == SPECS[row.encoder]
    check_prompt_tokens(model.tokenizer, TOKENIZERS[LLM_TOKENIZERS[row.llm]])


def check_prompt_tokens(tokenizer, layout: TokenizerLayout) -> None:
    """The LLM's own BOS / EOS / pad are reused; what it lacks is added."""
    tokens = tokenizer.prompt_tokens()
    assert tokens["bos"] == (layout.bos or "<BOS>")
    assert tokens["eos"] == layout.eos
    assert tokens["pad"] == (layout.pad or "<pad>")
    # Transcript tokens never include the BOS a post-processor would add.
    assert tokenizer.encode("the cat") == tokenizer.hf.encode("the cat",
                                                              add_special_tokens=False)


# --------------------------------------------------------------------------- the preset, the loader


def test_whisper_qwen_preset_parses_and_names_what_it_needs(tmp_path, monkeypatch):
    from speechrl.config import InputError, load_run_config
    from speechrl.preflight import check_stage

    monkeypatch.chdir(tmp_path)
    sft = load_run_config("whisper-qwen", ["data.train=[train.jsonl]"], stage="sft")
    encoder, llm = sft.model.encoder, sft.model.llm
    assert (encoder.kind, encoder.n_mels, encoder.freeze) == ("whisper", 128, True)
    assert (llm.path, sft.model.tokenizer, llm.lora.r) == ("models/Qwen2.5-0.5B",) * 2 + (0,)
    assert (sft.model.projector.stack, sft.train.output_dir) == (4, "runs/whisper-qwen/sft")
    grpo = load_run_config("whisper-qwen", ["model.llm.lora.r=16"], stage="grpo")
    assert grpo.train.init == "runs/whisper-qwen/sft/best" and grpo.model.llm.lora.r == 16
    assert (grpo.grpo.algorithm, grpo.grpo.group_size) == ("grpo", 4)
    with pytest.raises(InputError) as missing:
        check_stage(sft, "sft", source="whisper-qwen", overrides=["data.train=[train.jsonl]"])
    assert str(missing.value).startswith(
        "missing input(s): data.train=train.jsonl, model.llm.path=models/Qwen2.5-0.5B, "
        "model.tokenizer=models/Qwen2.5-0.5B, model.encoder.path=models/whisper-large-v3")


def test_a_128_bin_whisper_gets_128_bins_in_training_eval_and_transcribe(built, corpus):
    """The issue's bug: the loaders were built with 80 bins whatever the encoder took, and a
    128-bin Whisper (large-v3) failed at its first batch."""
    from speechrl.config import DataConfig, EncoderConfig, RunConfig
    from speechrl.data import features_for_files, make_dataloader
    from speechrl.encoders import build_encoder
    from speechrl.train.speech import speech_loaders

    encoder = build_encoder(EncoderConfig(kind="whisper", path=str(built["whisper128"]),
                                          n_mels=128))
    assert encoder.input_spec == EncoderInput("whisper", n_mels=128)
    cfg = RunConfig(data=DataConfig(train=(str(corpus["train"]),), dev=(str(corpus["dev"]),)))
    train, dev = speech_loaders(cfg, SimpleNamespace(encoder=encoder))
    evaluation = make_dataloader([corpus["dev"]], DataConfig(), features=encoder.input_spec,
                                 training=False)
    for loader in (train, dev, evaluation):
        batch = next(iter(loader))
        assert batch.inputs.shape[-1] == 128
        encoder(batch.inputs, batch.input_lengths)  # the first batch no longer fails
    inputs, _, _ = features_for_files([corpus["dev"].parent / "dev0.wav"], encoder.input_spec)
    assert inputs.shape[-1] == 128
