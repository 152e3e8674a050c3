"""The shared prompt pass of GRPO (SpeechLLM.group_target_logits): each audio's prompt runs once
for its G candidates, and log-probs and gradients equal the full pass per candidate; the frozen
encoder runs once per GRPO step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import peft
import pytest
import torch
from test_grpo import grpo_config
from test_train import run_config
from tones import write_tone_corpus
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from speechrl.config import LLMConfig, LoraConfig, ModelConfig, ProjectorConfig
from speechrl.model import SpeechLLM, packed_token_logprobs, token_logprobs
from speechrl.tokenizer import SpeechTokenizer

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama-tied": lambda v: LlamaForCausalLM(LlamaConfig(vocab_size=v, tie_word_embeddings=True,
                                                         **SIZES)),
    "llama-untied": lambda v: LlamaForCausalLM(LlamaConfig(vocab_size=v, **SIZES)),
    "qwen2": lambda v: Qwen2ForCausalLM(Qwen2Config(vocab_size=v, **SIZES)),
    "qwen3": lambda v: Qwen3ForCausalLM(Qwen3Config(vocab_size=v, head_dim=8, **SIZES)),
}


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    vocab = SpeechTokenizer.from_pretrained(tiny_tokenizer_dir).vocab_size
    dirs = {}
    for name, build in FAMILIES.items():
        torch.manual_seed(0)
        dirs[name] = tmp_path_factory.mktemp(name)
        build(vocab).save_pretrained(dirs[name])
    return dirs


def speech_llm(llm_dir: Path, tokenizer_dir: Path, tiny_encoder_config, attention: str = "sdpa",
               lora: int = 0) -> SpeechLLM:
    cfg = ModelConfig(encoder=tiny_encoder_config, projector=ProjectorConfig(stack=2),
                      llm=LLMConfig(path=str(llm_dir), attn_implementation=attention,
                                    lora=LoraConfig(r=lora, dropout=0.0)),
                      tokenizer=str(tokenizer_dir))
    torch.manual_seed(0)
    return SpeechLLM.from_config(cfg, SpeechTokenizer.from_pretrained(tokenizer_dir)).train()


def candidates(B: int, G: int, vocab: int, seed: int = 1):
    """Ragged audios (B, N, 80) and G right-padded candidates each, from 1 token (eos only) up
    to T = 7."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([40, 23, 31][:B])
    feats = torch.zeros(B, 40, 80)
    for i, n in enumerate(lengths.tolist()):
        feats[i, :n] = torch.randn(n, 80, generator=gen)
    T = 7
    tokens = torch.randint(5, vocab, (B * G, T), generator=gen)
    lens = torch.randint(1, T + 1, (B * G,), generator=gen)
    lens[0] = 1  # a candidate that is eos alone
    mask = torch.arange(T)[None] < lens[:, None]
    weights = torch.randn(B * G, T, generator=gen)
    return feats, lengths, tokens, mask, weights


def logprobs_and_grads(model: SpeechLLM, batch, G: int, shared: bool, packed: bool = False):
    feats, lengths, tokens, mask, weights = batch
    model.zero_grad(set_to_none=True)
    logits = model(feats, lengths, tokens, mask, group_size=G, shared_prompt=shared,
                   packed=packed).logits
    if packed:
        assert logits.shape == (int(mask.sum()), model.tokenizer.vocab_size)
        logp = packed_token_logprobs(logits, tokens, mask)[0]
    else:
        logp = token_logprobs(logits, tokens, mask)
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logp.detach(), grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("G", [1, 2, 6])
def test_shared_prompt_equals_the_full_pass(llm_dirs, tiny_tokenizer_dir, tiny_encoder_config,
                                            family, attention, G):
    model = speech_llm(llm_dirs[family], tiny_tokenizer_dir, tiny_encoder_config, attention)
    assert model.shared_prompt_unsupported() is None
    batch = candidates(3, G, model.tokenizer.vocab_size)
    full, full_grads = logprobs_and_grads(model, batch, G, shared=False)
    shared, shared_grads = logprobs_and_grads(model, batch, G, shared=True)
    torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
    assert full_grads.keys() == shared_grads.keys()
    for name, grad in full_grads.items():
        assert grad is not None and shared_grads[name] is not None, name
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-5, msg=name)
    assert full.abs().sum() > 0 and sum(g.abs().sum() for g in full_grads.values()) > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shared", [False, True])
def test_packed_logits_equal_the_full_pass(llm_dirs, tiny_tokenizer_dir, tiny_encoder_config,
                                          family, shared):
    # Packed (lm_head on the real tokens only, the GRPO passes' path) against the full pass
    # per candidate with every position's logits: the same log-probs and gradients.
    model = speech_llm(llm_dirs[family], tiny_tokenizer_dir, tiny_encoder_config)
    batch = candidates(3, 6, model.tokenizer.vocab_size)
    full, full_grads = logprobs_and_grads(model, batch, 6, shared=False)
    packed, packed_grads = logprobs_and_grads(model, batch, 6, shared=shared, packed=True)
    torch.testing.assert_close(packed, full, rtol=0, atol=1e-5)
    assert (packed[~batch[3]] == 0).all() and full.abs().sum() > 0
    assert full_grads.keys() == packed_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=0, atol=1e-5, msg=name)


def test_packed_token_logprobs_by_hand():
    # Two rows, T = 3, V = 3: row 0 holds 2 real tokens, row 1 one. Packed logits are the rows'
    # real positions in row-major order: (0, 0), (0, 1), (1, 0).
    packed = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    targets = torch.tensor([[1, 0, 2], [2, 1, 1]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    logp, log_probs = packed_token_logprobs(packed, targets, mask)
    e = torch.e
    expected = torch.tensor([[-torch.log(torch.tensor(3.0)).item(),
                              2 - torch.log(torch.tensor(e ** 2 + 2)).item(), 0.0],
                             [-torch.log(torch.tensor(2 * e + 1)).item(), 0.0, 0.0]])
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)
    assert log_probs.shape == (3, 3)


def test_shared_prompt_with_lora(llm_dirs, tiny_tokenizer_dir, tiny_encoder_config):
    model = speech_llm(llm_dirs["qwen2"], tiny_tokenizer_dir, tiny_encoder_config, lora=4)
    assert isinstance(model.llm, peft.PeftModel) and model.shared_prompt_unsupported() is None
    # LoRA's B matrices start at zero: move them so the adapters change the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    batch = candidates(3, 6, model.tokenizer.vocab_size)
    full, full_grads = logprobs_and_grads(model, batch, 6, shared=False)
    for packed in (False, True):
        shared, shared_grads = logprobs_and_grads(model, batch, 6, shared=True, packed=packed)
        torch.testing.assert_close(shared, full, rtol=0, atol=1e-5)
        assert any("lora_A" in n for n in full_grads)
        for name, grad in full_grads.items():
            torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("shared", [False, True])
def test_each_candidate_is_scored_against_its_own_audio(llm_dirs, tiny_tokenizer_dir,
                                                        tiny_encoder_config, shared):
    # Candidate b*G + g, run alone (batch of one, no padding) with audio b, has the log-probs it
    # has in the group: the speech is repeated audio-major (repeat_interleave), not tiled
    # (repeat, which pairs row 1 with audio 1). Both paths: the speech repeated per candidate,
    # and the shared prompt pass (its logits, cache, mask and positions are each repeated).
    model = speech_llm(llm_dirs["llama-tied"], tiny_tokenizer_dir, tiny_encoder_config).eval()
    B, G = 3, 2
    feats, lengths, tokens, mask, _ = candidates(B, G, model.tokenizer.vocab_size)
    with torch.no_grad():
        grouped = token_logprobs(model(feats, lengths, tokens, mask, group_size=G,
                                       shared_prompt=shared).logits, tokens, mask)
        for row in range(B * G):
            b = row // G
            alone = token_logprobs(model(feats[b : b + 1, : lengths[b]], lengths[b : b + 1],
                                         tokens[row : row + 1], mask[row : row + 1]).logits,
                                   tokens[row : row + 1], mask[row : row + 1])
            torch.testing.assert_close(grouped[row : row + 1], alone, rtol=0, atol=1e-5)
        # The check can tell the audios apart: candidate 1 scored against audio 1 differs.
        wrong = token_logprobs(model(feats[1:2, : lengths[1]], lengths[1:2], tokens[1:2],
                                     mask[1:2]).logits, tokens[1:2], mask[1:2])
        assert (wrong - grouped[1:2]).abs().max() > 1e-3


def test_unchecked_models_fall_back_and_say_so(tiny_model):
    assert tiny_model.shared_prompt_unsupported() is None
    tiny_model.llm.config.model_type = "gpt2"
    assert "'gpt2' is not among those checked" in tiny_model.shared_prompt_unsupported()


# --------------------------------------------------------------------------- in the GRPO loop


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory, tiny_model_config_module):
    from speechrl.train.sft import train_sft

    root = tmp_path_factory.mktemp("shared")
    corpus = {"train": write_tone_corpus(root / "train", 16, seed=0),
              "dev": write_tone_corpus(root / "dev", 4, seed=1)}
    cfg = run_config(root / "sft", corpus, tiny_model_config_module, max_steps=20,
                     eval_every=1000)
    return train_sft(cfg), corpus, root


def test_grpo_update_gradients_equal_with_and_without_the_shared_prompt(
        sft_checkpoint, tiny_model_config_module, monkeypatch):
    # One GRPO step each way from the same SFT model, same rollout: the gradient every
    # trainable parameter gets before the optimizer step (beta > 0, two iterations, so the
    # reference and old-policy passes run too) is the same to 1e-5.
    from speechrl.train import grpo as stage

    sft, corpus, root = sft_checkpoint
    grads: dict[bool, dict[str, torch.Tensor]] = {}
    shared_flags: list[bool] = []
    real_update = stage.policy_update

    def spy_update(settings, policy, optimizer, rollout, advantages, counts):
        shared_flags.append(settings.grpo.shared_prompt)
        original_step = optimizer.step

        def record_then_step(*a, **k):
            grads.setdefault(settings.grpo.shared_prompt, {
                n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
            return original_step(*a, **k)

        optimizer.step = record_then_step
        return real_update(settings, policy, optimizer, rollout, advantages, counts)

    monkeypatch.setattr(stage, "policy_update", spy_update)
    for shared in (False, True):
        cfg = grpo_config(root, corpus, tiny_model_config_module, sft, f"shared{shared}",
                          max_steps=1, num_iterations=2, shared_prompt=shared)
        stage.train_grpo(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dev=())))
    assert shared_flags == [False, False, True, True]
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 5
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=1e-5, msg=name)


def test_the_frozen_encoder_runs_once_per_grpo_step(sft_checkpoint, tiny_model_config_module,
                                                    monkeypatch):
    from speechrl.encoders import SpeechEncoder
    from speechrl.train import grpo as stage

    sft, corpus, root = sft_checkpoint
    calls = []
    real_forward = SpeechEncoder.forward
    monkeypatch.setattr(SpeechEncoder, "forward",
                        lambda self, *a, **k: calls.append(1) or real_forward(self, *a, **k))
    per_step = []
    real_step = stage.grpo_step

    def counted_step(*a, **k):
        before = len(calls)
        out = real_step(*a, **k)
        per_step.append(len(calls) - before)
        return out

    monkeypatch.setattr(stage, "grpo_step", counted_step)
    cfg = grpo_config(root, corpus, tiny_model_config_module, sft, "encoder_once", max_steps=3,
                      num_iterations=2)  # rollout, reference, old policy and 2 updates
    stage.train_grpo(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dev=())))
    assert per_step == [1, 1, 1]


def test_grpo_says_once_when_it_falls_back(sft_checkpoint, tiny_model_config_module,
                                          monkeypatch, capsys):
    from speechrl.train import grpo as stage

    sft, corpus, root = sft_checkpoint
    monkeypatch.setattr(SpeechLLM, "shared_prompt_unsupported", lambda self: "a test's reason")
    seen = []
    real = SpeechLLM.forward
    monkeypatch.setattr(SpeechLLM, "forward",
                        lambda self, *a, **k: seen.append(k.get("shared_prompt")) or
                        real(self, *a, **k))
    cfg = grpo_config(root, corpus, tiny_model_config_module, sft, "fallback", max_steps=2)
    stage.train_grpo(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dev=())))
    err = capsys.readouterr().err
    assert err.count("a test's reason: the prompt runs once per candidate") == 1
    assert seen and not any(seen)
