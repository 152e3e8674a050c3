"""The GRPO stage: presets, dynamic sampling, resume, and an end-to-end run on the tone corpus
(tests/test_train.py) that must raise the expected reward of the policy's samples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import run_config, write_tone_corpus

from speechrl.config import GRPOConfig
from speechrl.train import grpo as grpo_stage
from speechrl.train.grpo import Rollout, collect_rollouts, resolve_algorithm


def test_presets_fill_only_unset_switches():
    g = resolve_algorithm(GRPOConfig(algorithm="grpo"))
    assert (g.scale, g.agg, g.beta, g.eps_low, g.eps_high, g.dynamic_sampling) == (
        "group", "seq_mean_token_mean", 0.04, 0.2, 0.2, False)
    d = resolve_algorithm(GRPOConfig(algorithm="dapo"))
    assert (d.scale, d.agg, d.beta, d.eps_low, d.eps_high, d.dynamic_sampling) == (
        "group", "token_mean", 0.0, 0.2, 0.28, True)
    r = resolve_algorithm(GRPOConfig(algorithm="dr_grpo"))
    assert (r.scale, r.agg) == ("none", "seq_mean_token_sum_norm")
    # An explicit setting wins over the preset.
    assert resolve_algorithm(GRPOConfig(algorithm="dapo", beta=0.01)).beta == 0.01
    with pytest.raises(ValueError, match="unknown grpo.algorithm"):
        resolve_algorithm(GRPOConfig(algorithm="ppo"))


def fake_rollout(rewards: list[list[float]], first_id: int) -> Rollout:
    """B audios with G candidates each; audio b's "features" hold its id so it can be traced."""
    B, G = len(rewards), len(rewards[0])
    return Rollout(
        speech_inputs=torch.arange(first_id, first_id + B, dtype=torch.float32).view(B, 1, 1),
        input_lengths=torch.ones(B, dtype=torch.long),
        refs=[f"ref {first_id + b}" for b in range(B)],
        languages=["en"] * B,
        tokens=torch.ones(B * G, 2, dtype=torch.long),
        mask=torch.ones(B * G, 2, dtype=torch.bool),
        texts=["x"] * (B * G),
        finished=torch.ones(B * G, dtype=torch.bool),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        wers=-torch.tensor(rewards, dtype=torch.float32),
    )


class FakeRun:
    def __init__(self, grpo: GRPOConfig):
        self.cfg = type("Cfg", (), {"grpo": resolve_algorithm(grpo)})()
        self.device = torch.device("cpu")


class FakeBatch:
    def __init__(self, n: int):
        self.texts = ["t"] * n

    def to(self, device):
        return self


def test_dynamic_sampling_drops_uninformative_groups_and_refills(monkeypatch):
    # Draw 1: audios 0..3, of which 1 and 3 have all-equal rewards (no signal).
    # Draw 2: audios 4..7, of which 4 is all-equal. The step needs 4 informative audios:
    # 0, 2 from the first draw, then 5, 6 from the second (7 is cut off at the target).
    draws = iter([
        fake_rollout([[0, 1], [1, 1], [0.5, 0], [-1, -1]], first_id=0),
        fake_rollout([[0, 0], [0, 1], [1, 0], [0.2, 0.1]], first_id=4),
    ])
    monkeypatch.setattr(grpo_stage, "sample_groups", lambda *a, **k: next(draws))
    run = FakeRun(GRPOConfig(algorithm="dapo", group_size=2, max_refill_rounds=3))
    batches = iter([FakeBatch(4), FakeBatch(4)])
    rollout, stats = collect_rollouts(run, None, batches, None, None, None)
    assert rollout.speech_inputs.flatten().tolist() == [0, 2, 5, 6]
    assert rollout.rewards.tolist() == [[0, 1], [0.5, 0], [0, 1], [1, 0]]
    assert stats["audios_drawn"] == 8 and stats["zero_std_share"] == 3 / 8


def test_without_dynamic_sampling_all_groups_are_kept(monkeypatch):
    monkeypatch.setattr(grpo_stage, "sample_groups",
                        lambda *a, **k: fake_rollout([[1, 1], [0, 1]], first_id=0))
    run = FakeRun(GRPOConfig(algorithm="grpo", group_size=2))
    rollout, stats = collect_rollouts(run, None, iter([FakeBatch(2)]), None, None, None)
    assert rollout.num_audios == 2 and stats["zero_std_share"] == 0.5


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory, tiny_model_config_module):
    """The tiny speech-LLM after 150 SFT steps on the tone corpus."""
    from speechrl.train.sft import train_sft

    root = tmp_path_factory.mktemp("grpo")
    corpus = {"train": write_tone_corpus(root / "train", 48, seed=0),
              "dev": write_tone_corpus(root / "dev", 8, seed=1)}
    cfg = run_config(root / "sft", corpus, tiny_model_config_module, max_steps=150,
                     eval_every=150)
    return train_sft(cfg), corpus, root


@torch.no_grad()
def expected_reward(checkpoint: Path, manifest: Path, samples: int = 16) -> float:
    """Mean negated WER of ``samples`` candidates per utterance, sampled at temperature 1 with a
    fixed seed: the objective GRPO maximises, measured with little noise."""
    from speechrl.checkpoint import load_model
    from speechrl.config import DataConfig
    from speechrl.data import make_dataloader
    from speechrl.generate import DecodingOptions, generate
    from speechrl.rewards import build_reward

    model = load_model(checkpoint).eval()
    reward = build_reward("wer")
    loader = make_dataloader([str(manifest)], DataConfig(), features="fbank", training=False)
    options = DecodingOptions(strategy="sample", num_return_sequences=samples, max_new_tokens=16)
    generator = torch.Generator().manual_seed(123)
    total, count = 0.0, 0
    for batch in loader:
        result = generate(model, batch.inputs, batch.input_lengths, options, generator=generator)
        refs = [t for t in batch.texts for _ in range(samples)]
        values = reward(result.texts, refs)
        total, count = total + sum(values), count + len(values)
    return total / count


def grpo_config(root: Path, corpus, model_cfg, sft: Path, name: str, **grpo):
    cfg = run_config(root / name, corpus, model_cfg, init=str(sft), lr=1e-3, batch_size=8,
                     max_steps=grpo.pop("max_steps", 100), eval_every=1000, save_every=1000)
    return dataclasses.replace(cfg, grpo=GRPOConfig(group_size=8, max_new_tokens=16, **grpo))


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "dr_grpo"])
def test_grpo_raises_expected_reward(sft_model, tiny_model_config_module, algorithm):
    from speechrl.train.grpo import train_grpo

    sft, corpus, root = sft_model
    before = expected_reward(sft, corpus["train"])
    out = train_grpo(grpo_config(root, corpus, tiny_model_config_module, sft, algorithm,
                                 algorithm=algorithm))
    after = expected_reward(out.parent / "last", corpus["train"])
    assert after > before + 0.03, (before, after)


def test_grpo_resume_matches_uninterrupted_run(sft_model, tiny_model_config_module):
    from speechrl.train.grpo import train_grpo

    sft, corpus, root = sft_model

    def cfg(name, steps):
        c = grpo_config(root, corpus, tiny_model_config_module, sft, name, max_steps=steps)
        return dataclasses.replace(c, train=dataclasses.replace(c.train, save_every=3))

    train_grpo(cfg("straight", 6))
    train_grpo(cfg("resumed", 3))
    train_grpo(cfg("resumed", 6))
    a = load_file(str(root / "straight" / "run" / "last" / "model.safetensors"))
    b = load_file(str(root / "resumed" / "run" / "last" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_beta_zero_loads_no_reference(sft_model, tiny_model_config_module, monkeypatch):
    from speechrl.train import grpo as stage

    sft, corpus, root = sft_model
    loads = []
    real = stage.load_or_build_model
    monkeypatch.setattr(stage, "load_or_build_model",
                        lambda cfg, device: loads.append(1) or real(cfg, device))
    stage.train_grpo(grpo_config(root, corpus, tiny_model_config_module, sft, "dapo1",
                                 algorithm="dapo", max_steps=1))
    assert len(loads) == 1  # the policy only
    stage.train_grpo(grpo_config(root, corpus, tiny_model_config_module, sft, "grpo1",
                                 algorithm="grpo", max_steps=1))
    assert len(loads) == 3  # policy and reference
