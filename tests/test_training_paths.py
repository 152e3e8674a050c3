"""Training paths that the loss-falls and reward-rises tests do not reach, on the tone corpus
(tests/test_train.py) with the tiny model:

* SFT uses the audio: dev WER after SFT is significantly below the same model's with the
  speech zeroed;
* GRPO with ``num_iterations > 1``: the ratio moves off 1 and the clip acts;
* GRPO with ``strategy=beam``: the G candidates of an audio are distinct beams;
* GRPO with ``mask_truncated``: candidates cut by the token cap carry no loss and no gradient;
* LoRA under SFT and GRPO: only the adapters (and the projector) move, base weights stay
  bit-equal.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import run_config
from tones import write_tone_corpus

from speechrl.config import DecodingConfig, GRPOConfig, LoraConfig, RunConfig

SFT_STEPS = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paths")
    return {"train": write_tone_corpus(root / "train", 48, seed=0),
            "dev": write_tone_corpus(root / "dev", 24, seed=1), "root": root}


@pytest.fixture(scope="module")
def sft_model(corpus, tiny_model_config_module) -> Path:
    """The tiny speech-LLM after SFT on the tone corpus (its best = last checkpoint)."""
    from speechrl.train.sft import train_sft

    cfg = run_config(corpus["root"] / "sft", corpus, tiny_model_config_module, max_steps=SFT_STEPS,
                     eval_every=10_000)
    return train_sft(cfg)


def grpo_run(corpus, model_cfg, init: Path, name: str, **grpo) -> RunConfig:
    """A short GRPO run from ``init``: 4 audios x 4 candidates a step, no dev evaluation."""
    train = dict(max_steps=grpo.pop("max_steps", 2), lr=grpo.pop("lr", 1e-3), batch_size=4)
    cfg = run_config(corpus["root"] / name, corpus, model_cfg, init=str(init), warmup_steps=0,
                     eval_every=10_000, save_every=10_000, **train)
    decoding = DecodingConfig(max_new_tokens=grpo.pop("max_new_tokens", 12))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dev=()),
                               decoding=decoding, grpo=GRPOConfig(**{"group_size": 4, **grpo}))


def logged(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- SFT uses the audio


@torch.no_grad()
def dev_errors(checkpoint: Path, manifest: Path, silence: bool) -> list[tuple[int, int]]:
    """(errors, reference words) of each dev utterance, greedy, with the real features or with
    every feature zeroed (the same lengths: the prompt is unchanged, the audio gone)."""
    from speechrl.checkpoint import load_model
    from speechrl.config import DataConfig
    from speechrl.data import make_dataloader
    from speechrl.generate import DecodingOptions, generate
    from speechrl.metrics import error_counts
    from speechrl.text import get_normalizer

    model = load_model(checkpoint).eval()
    norm = get_normalizer("whisper", "en")
    loader = make_dataloader([str(manifest)], DataConfig(), features="fbank", training=False)
    options = DecodingOptions(strategy="greedy", max_new_tokens=16)
    counts = []
    for batch in loader:
        inputs = torch.zeros_like(batch.inputs) if silence else batch.inputs
        texts = generate(model, inputs, batch.input_lengths, options).texts
        per_utt, _ = error_counts([norm(t) for t in batch.texts], [norm(t) for t in texts])
        counts += [(c.errors, c.ref_words) for c in per_utt]
    return counts


def test_sft_transcribes_from_the_audio_not_the_prompt(sft_model, corpus):
    # A model that ignored the speech would still see its loss fall (it learns the word
    # frequencies); here the words are only in the tones, so the audio must carry the WER.
    from speechrl.metrics import paired_bootstrap

    heard = dev_errors(sft_model, corpus["dev"], silence=False)
    deaf = dev_errors(sft_model, corpus["dev"], silence=True)
    words = [[n] for _, n in heard]
    change = paired_bootstrap([[e] for e, _ in heard], [[e] for e, _ in deaf], words)[0]
    wer_heard = sum(e for e, _ in heard) / sum(n for _, n in heard)
    # Zeroing the speech raises dev WER significantly: the whole paired-bootstrap 95 % interval
    # lies above +0.03 (measured: WER 0.67 heard, change +0.21 in [+0.08, +0.35]). A model
    # whose speech never reaches the LLM gives a change of exactly 0.
    assert change.low > 0.03, (wer_heard, change)
    assert wer_heard < 0.75, wer_heard


# --------------------------------------------------------------------------- GRPO paths


def test_grpo_with_several_iterations_moves_the_ratio_and_clips(sft_model, corpus,
                                                                 tiny_model_config_module):
    # Iterations 2 and 3 reuse the first's old log-probs after optimizer steps: the ratio is no
    # longer exactly 1, and with a narrow clip range some tokens lose their gradient.
    from speechrl.train.grpo import train_grpo

    cfg = grpo_run(corpus, tiny_model_config_module, sft_model, "iterations", num_iterations=3,
                   algorithm="dapo", dynamic_sampling=False, eps_low=0.05, eps_high=0.05,
                   lr=3e-3)
    train_grpo(cfg)
    rows = [r for r in logged(corpus["root"] / "iterations" / "run") if "train/ratio_mean" in r]
    assert len(rows) == 2
    assert all(abs(r["train/ratio_mean"] - 1.0) > 1e-4 for r in rows), rows
    assert any(r["train/clip_low"] + r["train/clip_high"] > 0 for r in rows), rows


def spy_rollouts(monkeypatch) -> list:
    from speechrl.train import grpo as stage

    rollouts = []
    real = stage.sample_groups
    monkeypatch.setattr(stage, "sample_groups",
                        lambda *a, **k: rollouts.append(real(*a, **k)) or rollouts[-1])
    return rollouts


def test_grpo_with_beam_candidates_trains_on_distinct_beams(sft_model, corpus,
                                                          tiny_model_config_module,
                                                          monkeypatch):
    from speechrl.train.grpo import train_grpo

    rollouts = spy_rollouts(monkeypatch)
    cfg = grpo_run(corpus, tiny_model_config_module, sft_model, "beam", strategy="beam",
                   algorithm="dapo", dynamic_sampling=False, max_steps=1)
    train_grpo(cfg)
    (rollout,) = rollouts
    G = 4
    assert rollout.tokens.shape[0] == rollout.num_audios * G == 16
    for b in range(rollout.num_audios):
        beams = {tuple(t[m].tolist()) for t, m in zip(rollout.tokens[b * G : (b + 1) * G],
                                                      rollout.mask[b * G : (b + 1) * G],
                                                      strict=True)}
        assert len(beams) == G, (b, rollout.texts[b * G : (b + 1) * G])
    (row,) = [r for r in logged(corpus["root"] / "beam" / "run") if "train/loss" in r]
    assert torch.isfinite(torch.tensor(row["train/loss"]))


def test_grpo_mask_truncated_leaves_cut_candidates_out_of_the_gradient(
        sft_model, corpus, tiny_model_config_module, monkeypatch):
    # With a cap below some candidates' lengths, those are cut. The update's gradient is the
    # same whatever those candidates' advantages (and tokens); a finished candidate's advantage
    # does change it. The cap comes from an uncut rollout of the same seed (its candidates'
    # lengths differ from machine to machine): the shortest finished candidate's length, so
    # that it finishes and the longer ones are cut.
    from speechrl.train import grpo as stage

    grads = {}
    real_update = stage.policy_update
    lengths = {}

    def measure(settings, policy, optimizer, rollout, advantages, counts):
        lengths["finished"] = rollout.mask.sum(1)[rollout.finished].tolist()
        lengths["longest"] = int(rollout.mask.sum(1).max())
        return real_update(settings, policy, optimizer, rollout, advantages, counts)

    monkeypatch.setattr(stage, "policy_update", measure)
    stage.train_grpo(grpo_run(corpus, tiny_model_config_module, sft_model, "uncut",
                              max_new_tokens=12, beta=0.0, max_steps=1))
    assert lengths["finished"], "no candidate of the SFT model finished within 12 tokens"
    cap = int(min(lengths["finished"]))
    assert cap < lengths["longest"], lengths

    def gradient(settings, policy, rollout, advantages, counts) -> dict[str, torch.Tensor]:
        still = torch.optim.SGD(policy.parameters(), lr=0.0)  # step() changes nothing
        assert real_update(settings, policy, still, rollout, advantages, counts) is not None
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    def spy(settings, policy, optimizer, rollout, advantages, counts):
        if not grads:
            cut, done = ~rollout.finished, rollout.finished
            grads["rollout"] = (rollout.mask.clone(), cut.clone())
            grads["as is"] = gradient(settings, policy, rollout, advantages, counts)
            scrambled = dataclasses.replace(rollout, tokens=torch.where(
                cut[:, None], torch.randint_like(rollout.tokens, 5, 200), rollout.tokens))
            grads["cut changed"] = gradient(settings, policy, scrambled,
                                            torch.where(cut, -5.0 * advantages.sign() - 1.0,
                                                        advantages), counts)
            first_done = int(done.nonzero()[0])
            other = advantages.clone()
            other[first_done] += 3.0
            grads["finished changed"] = gradient(settings, policy, rollout, other, counts)
        return real_update(settings, policy, optimizer, rollout, advantages, counts)

    monkeypatch.setattr(stage, "policy_update", spy)
    cfg = grpo_run(corpus, tiny_model_config_module, sft_model, "truncated", max_new_tokens=cap,
                   mask_truncated=True, beta=0.0, max_steps=1)
    stage.train_grpo(cfg)
    mask, cut = grads["rollout"]
    assert cut.any() and (~cut).any()  # both kinds in the batch
    assert not mask[cut].any() and mask[~cut].any(1).all()
    for name, grad in grads["as is"].items():
        torch.testing.assert_close(grads["cut changed"][name], grad, rtol=0, atol=1e-7, msg=name)
    assert any(not torch.allclose(grads["finished changed"][n], g)
               for n, g in grads["as is"].items())


# --------------------------------------------------------------------------- LoRA


def lora_config(model_cfg):
    llm = dataclasses.replace(model_cfg.llm, lora=LoraConfig(r=4, dropout=0.0))
    return dataclasses.replace(model_cfg, llm=llm)


def is_adapter(name: str) -> bool:
    return "lora_" in name or "trainable_tokens" in name


def test_lora_trains_only_the_adapters_under_sft_and_grpo(corpus, tiny_model_config_module):
    from speechrl.model import SpeechLLM
    from speechrl.tokenizer import SpeechTokenizer
    from speechrl.train.grpo import train_grpo
    from speechrl.train.sft import train_sft

    model_cfg = lora_config(tiny_model_config_module)
    sft = train_sft(run_config(corpus["root"] / "lora-sft", corpus, model_cfg, max_steps=4,
                               eval_every=10_000))
    grpo = train_grpo(grpo_run(corpus, model_cfg, sft, "lora-grpo", algorithm="dapo",
                               dynamic_sampling=False, max_steps=1, lr=1e-2))
    torch.manual_seed(0)  # the trainer builds its model after seeding with train.seed = 0
    fresh = SpeechLLM.from_config(model_cfg, SpeechTokenizer.from_pretrained(model_cfg.tokenizer))
    w0 = {k: v for k, v in fresh.state_dict().items()}
    w_sft = load_file(str(sft / "model.safetensors"))
    w_grpo = load_file(str(grpo / "model.safetensors"))
    assert w0.keys() >= w_sft.keys() == w_grpo.keys()
    adapters = [k for k in w_sft if is_adapter(k)]
    base = [k for k in w_sft if k.startswith("llm.") and not is_adapter(k)]
    assert any("lora_A" in k for k in adapters) and any("lora_B" in k for k in adapters)
    assert len(base) > 10
    for before, after in ((w0, w_sft), (w_sft, w_grpo)):
        for k in base:
            assert torch.equal(before[k], after[k]), k  # bit-equal
        assert all(not torch.equal(before[k], after[k]) for k in adapters if "lora_B" in k)
    assert not torch.equal(w0["projector.net.weight"], w_sft["projector.net.weight"])
