"""SFT's switches on the tiny tone corpus of test_train.py: the encoder-output cache (the same
weights as without it, each training utterance encoded and read once, and what would make it
stale refused), the LLM's frozen first steps, and the speech CTC term."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import logged, run_config

from speechrl.config import DataConfig, RunConfig
from speechrl.data import SpeechDataset


def test_sft_with_cached_encoder_outputs_matches_uncached(tmp_path, tone_corpus, tiny_model_config,
                                                         monkeypatch):
    from speechrl.train import speech
    from speechrl.train.sft import train_sft

    caches = []
    original_init = speech.EncoderOutputCache.__init__

    def spy(self, model, cfg):
        original_init(self, model, cfg)
        caches.append(self)

    monkeypatch.setattr(speech.EncoderOutputCache, "__init__", spy)
    loaded = []  # ids whose audio a training dataset read (the dev set's holds 8 rows)
    original_load = SpeechDataset.load

    def counting_load(self, utt):
        if len(self) == 48:
            loaded.append(utt.id)
        return original_load(self, utt)

    monkeypatch.setattr(SpeechDataset, "load", counting_load)
    # 30 steps of about 4 utterances over 48 training utterances: two and a half epochs.
    plain = run_config(tmp_path / "a", tone_corpus, tiny_model_config, max_steps=30)
    cached = run_config(tmp_path / "b", tone_corpus, tiny_model_config, max_steps=30,
                        cache_encoder_outputs=True)
    train_sft(plain)
    assert caches == []
    plain_loads = list(loaded)
    loaded.clear()
    train_sft(cached)
    (cache,) = caches
    # Every training utterance went through the encoder exactly once, and its audio was read
    # and featurised once: later epochs take the cached frames without loading the audio.
    assert cache.encoded == len(cache.frames) == len(cache.seconds) == 48
    assert sorted(loaded) == sorted(cache.frames)
    assert len(plain_loads) > 100  # the uncached run read every epoch
    a = load_file(str(tmp_path / "a" / "run" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "last" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4, msg=key)
    assert logged(tmp_path / "a" / "run", "train/loss") == pytest.approx(
        logged(tmp_path / "b" / "run", "train/loss"), abs=1e-4)


def test_sft_llm_frozen_steps_train_only_the_projector_first(tmp_path, tone_corpus,
                                                           tiny_model_config):
    from speechrl.train.sft import train_sft

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / "run" / "last" / "model.safetensors"))

    from speechrl.model import SpeechLLM
    from speechrl.tokenizer import SpeechTokenizer

    frozen = run_config(tmp_path / "b", tone_corpus, tiny_model_config, max_steps=3,
                        llm_frozen_steps=3)
    after = run_config(tmp_path / "c", tone_corpus, tiny_model_config, max_steps=5,
                       llm_frozen_steps=3)
    for cfg in (frozen, after):
        train_sft(cfg)
    w3, w5 = weights(tmp_path / "b"), weights(tmp_path / "c")
    torch.manual_seed(0)  # the trainer builds its model after seeding with train.seed = 0
    fresh = SpeechLLM.from_config(tiny_model_config,
                                  SpeechTokenizer.from_pretrained(tiny_model_config.tokenizer))
    w0 = {k: v for k, v in fresh.state_dict().items() if k in w3}
    llm = [k for k in w0 if k.startswith("llm.")]
    projector = [k for k in w0 if k.startswith("projector.")]
    assert llm and projector
    # Three frozen steps: the LLM is exactly as it started, the projector has moved.
    assert all(torch.equal(w0[k], w3[k]) for k in llm)
    assert not all(torch.equal(w0[k], w3[k]) for k in projector)
    # Steps 4 and 5 train the LLM too.
    assert not all(torch.equal(w0[k], w5[k]) for k in llm)


def test_encoder_output_cache_refuses_what_would_make_it_stale(tiny_model_config):
    from speechrl.model import SpeechLLM
    from speechrl.tokenizer import SpeechTokenizer
    from speechrl.train.speech import EncoderOutputCache

    model = SpeechLLM.from_config(tiny_model_config,
                                  SpeechTokenizer.from_pretrained(tiny_model_config.tokenizer))
    cfg = RunConfig(model=tiny_model_config, data=DataConfig(augment=True))
    with pytest.raises(ValueError, match="data.augment"):
        EncoderOutputCache(model, cfg)
    next(model.encoder.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match="fully frozen encoder"):
        EncoderOutputCache(model, RunConfig(model=tiny_model_config))


def test_sft_speech_ctc_weight_trains_the_projector_on_the_ctc_loss(tmp_path, tone_corpus,
                                                                   tiny_model_config):
    from speechrl.train.sft import train_sft

    def run(folder: str, weight: float, steps: int) -> Path:
        return train_sft(run_config(tmp_path / folder, tone_corpus, tiny_model_config,
                                    max_steps=steps, eval_every=1000, speech_ctc_weight=weight))

    plain, ctc = run("plain", 0.0, 20), run("ctc", 1.0, 20)
    # Step 1 sees the same model and batch: the logged SFT loss (eq. 2 alone) is the same;
    # the CTC term is logged beside it, and only when switched on.
    assert logged(tmp_path / "plain" / "run", "train/loss")[0] == pytest.approx(
        logged(tmp_path / "ctc" / "run", "train/loss")[0], rel=1e-6)
    assert logged(tmp_path / "plain" / "run", "train/speech_ctc") == []
    ctc_losses = logged(tmp_path / "ctc" / "run", "train/speech_ctc")
    assert len(ctc_losses) == 20 and all(np.isfinite(ctc_losses))
    # It is in the backward: the projector moves differently, and the CTC loss falls.
    a = load_file(str(plain / "model.safetensors"))
    b = load_file(str(ctc / "model.safetensors"))
    assert not torch.equal(a["projector.net.weight"], b["projector.net.weight"])
    assert np.mean(ctc_losses[-5:]) < 0.8 * np.mean(ctc_losses[:5])
    with pytest.raises(ValueError, match=r"sft.speech_ctc_weight=-0.5 must be >= 0"):
        run("negative", -0.5, 1)
