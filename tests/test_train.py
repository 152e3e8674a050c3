"""The training stages on a tiny tone corpus: each word is a fixed chord of tones, so a tiny model
learns the mapping in seconds on CPU. Checks that losses fall, that a resumed run ends with exactly
the weights of an uninterrupted one (also stopped by a signal mid warm-up, with dropout,
augmentation, the encoder cache and gradient accumulation), that accumulated micro-batches give
the gradient of the whole batch, that ``best/`` is the step of the lowest dev WER, and that a
frozen encoder does not move."""

from __future__ import annotations

import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from speechrl.config import (
    DataConfig,
    LMConfig,
    ModelConfig,
    ProjectorConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)


def run_config(tmp_path: Path, corpus, model_cfg: ModelConfig, **train) -> RunConfig:
    """``train`` holds TrainConfig's settings, and SFTConfig's (``speech_ctc_weight``, ...)."""
    sft = {name: train.pop(name) for name in SFTConfig.__dataclass_fields__ if name in train}
    defaults = dict(output_dir=str(tmp_path / "run"), lr=3e-3, warmup_steps=2, max_steps=20,
                    log_every=1, eval_every=1000, save_every=1000, dev_utterances=8,
                    schedule="constant", seed=0)
    defaults.update(train)
    return RunConfig(
        model=model_cfg,
        data=DataConfig(train=(str(corpus["train"]),), dev=(str(corpus["dev"]),),
                        max_duration=8.0),
        train=TrainConfig(**defaults),
        sft=SFTConfig(**sft),
        lm=LMConfig(vocab_size=300, max_length=64),
    )


def logged(path: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def stop_after(monkeypatch, module, step: int, signum: int) -> None:
    """The stage of ``module`` (its loop calls ``stop_if_needed`` between steps) gets ``signum``
    from its own process once, right after step ``step``, as from a job scheduler or Ctrl-C: its
    handler, not a test hook, turns that into a checkpoint and a stop."""
    real = module.stop_if_needed
    sent = []

    def signal_then_check(run, request, *args, **kwargs) -> None:
        if args[-1].step == step and not sent:  # args[-1]: the TrainerState
            sent.append(signum)
            signal.raise_signal(signum)
        real(run, request, *args, **kwargs)

    monkeypatch.setattr(module, "stop_if_needed", signal_then_check)


def assert_same_values(a: Any, b: Any, where: str, atol: float = 0.0) -> None:
    """Nested dicts / lists of tensors and plain values: equal (tensors torch.equal, or within
    ``atol``)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        if atol == 0.0 or not a.is_floating_point():
            assert torch.equal(a, b), where
        else:
            torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} {b.keys()}"
        for k in a:
            assert_same_values(a[k], b[k], f"{where}.{k}", atol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_values(x, y, f"{where}[{i}]", atol)
    elif isinstance(a, float) and atol > 0.0:
        assert b == pytest.approx(a, abs=atol), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(a: Path, b: Path, atol: float = 0.0) -> None:
    """Two resumable ``last/`` folders hold the same training state: every weight, every tensor
    of the optimizer (moments, step counts), the schedule and the RNG states (optimizer.pt),
    and the step, data position and generator states of trainer_state.json."""
    assert_same_values(load_file(str(a / "model.safetensors")),
                       load_file(str(b / "model.safetensors")), "weights", atol)
    assert_same_values(torch.load(a / "optimizer.pt", weights_only=False),
                       torch.load(b / "optimizer.pt", weights_only=False), "optimizer.pt", atol)
    assert_same_values(json.loads((a / "trainer_state.json").read_text()),
                       json.loads((b / "trainer_state.json").read_text()), "trainer_state")


def test_sft_loss_falls_and_encoder_stays_frozen(tmp_path, tone_corpus, tiny_model_config):
    from speechrl.train.sft import train_sft

    cfg = run_config(tmp_path, tone_corpus, tiny_model_config, max_steps=30, eval_every=30)
    best = train_sft(cfg)
    losses = logged(tmp_path / "run", "train/loss")
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    dev = logged(tmp_path / "run", "dev/wer")
    assert len(dev) == 1 and 0.0 <= dev[0]
    # The encoder was frozen: its weights equal a freshly built model's (same seed, same init).
    from speechrl.checkpoint import load_model

    torch.manual_seed(0)
    trained = load_model(best)
    assert trained.encoder.frozen
    from speechrl.model import SpeechLLM
    from speechrl.tokenizer import SpeechTokenizer

    torch.manual_seed(0)
    fresh = SpeechLLM.from_config(tiny_model_config,
                                  SpeechTokenizer.from_pretrained(tiny_model_config.tokenizer))
    for (name, a), (_, b) in zip(trained.encoder.named_parameters(),
                                 fresh.encoder.named_parameters(), strict=True):
        if "layer_weights" not in name:
            assert torch.equal(a, b), name


def test_sft_resume_matches_uninterrupted_run(tmp_path, tone_corpus, tiny_model_config):
    from speechrl.train.sft import train_sft

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(str(folder / "last" / "model.safetensors"))

    straight = run_config(tmp_path / "a", tone_corpus, tiny_model_config, max_steps=8,
                          save_every=4, eval_every=4)
    train_sft(straight)
    # Interrupted after 4 steps (its last checkpoint), then the same command runs on to 8.
    first = run_config(tmp_path / "b", tone_corpus, tiny_model_config, max_steps=4,
                       save_every=4, eval_every=4)
    train_sft(first)
    resumed = run_config(tmp_path / "b", tone_corpus, tiny_model_config, max_steps=8,
                         save_every=4, eval_every=4)
    train_sft(resumed)
    a, b = weights(tmp_path / "a" / "run"), weights(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_speech_loaders_compute_the_mel_bins_the_encoder_takes(tone_corpus, tiny_model_config):
    """A 40-bin encoder (a 128-bin Whisper alike) gets 40-bin features, train and dev alike:
    the loaders read the bins from the encoder, not a default of 80."""
    import dataclasses
    from types import SimpleNamespace

    from speechrl.encoders import build_encoder
    from speechrl.train.speech import speech_loaders

    encoder = build_encoder(dataclasses.replace(tiny_model_config.encoder, n_mels=40))
    cfg = RunConfig(model=tiny_model_config,
                    data=DataConfig(train=(str(tone_corpus["train"]),),
                                    dev=(str(tone_corpus["dev"]),)),
                    train=TrainConfig(batch_size=2))
    train, dev = speech_loaders(cfg, SimpleNamespace(encoder=encoder))
    assert next(iter(train)).inputs.shape[-1] == next(iter(dev)).inputs.shape[-1] == 40


def test_lm_pretraining_loss_falls(tmp_path, tone_corpus):
    from speechrl.train.lm import train_lm

    model_cfg = ModelConfig(projector=ProjectorConfig(stack=2))
    cfg = run_config(tmp_path, tone_corpus, model_cfg, max_steps=40, batch_size=8,
                     eval_every=40, lr=3e-3)
    out = train_lm(cfg)
    losses = logged(tmp_path / "run", "train/loss")
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    # The output is an ordinary Hugging Face folder with the tokenizer beside the weights.
    from transformers import AutoModelForCausalLM

    from speechrl.tokenizer import SpeechTokenizer

    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == \
        SpeechTokenizer.from_pretrained(out).vocab_size


def test_ctc_pretraining_loss_falls(tmp_path, tone_corpus, tiny_encoder_config):
    from speechrl.config import EncoderConfig
    from speechrl.encoders import build_encoder
    from speechrl.train.ctc import train_ctc

    model_cfg = ModelConfig(encoder=tiny_encoder_config)
    cfg = run_config(tmp_path, tone_corpus, model_cfg, max_steps=40, eval_every=40, lr=3e-3)
    out = train_ctc(cfg)
    losses = logged(tmp_path / "run", "train/loss")
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    # Later stages load the saved encoder by path, frozen.
    encoder = build_encoder(EncoderConfig(kind="conformer", path=str(out)))
    assert encoder.frozen and encoder.output_dim == tiny_encoder_config.d_model


@pytest.mark.parametrize("stage", ["pretrain-lm", "pretrain-encoder"])
def test_pretraining_resume_matches_uninterrupted_run(tmp_path, tone_corpus, tiny_encoder_config,
                                                      stage):
    from speechrl.train.ctc import train_ctc
    from speechrl.train.lm import train_lm

    if stage == "pretrain-lm":
        train, model_cfg, extra = train_lm, ModelConfig(projector=ProjectorConfig(stack=2)), \
            {"batch_size": 8}
    else:
        train, model_cfg, extra = train_ctc, ModelConfig(encoder=tiny_encoder_config), {}

    def run(folder: str, steps: int) -> None:
        train(run_config(tmp_path / folder, tone_corpus, model_cfg, max_steps=steps,
                         save_every=3, eval_every=steps, **extra))

    run("straight", 6)
    run("resumed", 3)  # interrupted after its step-3 checkpoint, then the same command to 6
    run("resumed", 6)
    a = load_file(str(tmp_path / "straight" / "run" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "run" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_dev_evaluation_encodes_each_batch_once_with_the_same_results(tone_corpus,
                                                                      tiny_model_config):
    """_dev_shard feeds the speech encoded for the loss to the decoder; the figures equal those
    of the former two passes (loss from one encoding, generate() encoding again)."""
    from types import SimpleNamespace

    from speechrl.data import make_dataloader
    from speechrl.generate import DecodingOptions, generate, max_tokens_for_duration
    from speechrl.losses import sft_loss
    from speechrl.model import SpeechLLM
    from speechrl.text import get_normalizer
    from speechrl.tokenizer import load_tokenizer
    from speechrl.train.common import encode_targets
    from speechrl.train.speech import _dev_shard

    torch.manual_seed(0)
    model = SpeechLLM.from_config(tiny_model_config, load_tokenizer(tiny_model_config)).eval()
    cfg = run_config(Path("unused"), tone_corpus, tiny_model_config)
    run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"))
    loader = make_dataloader([str(tone_corpus["dev"])], cfg.data, features="fbank",
                             training=False, batch_size=3)  # 8 rows: batches of 3, 3, 2
    norm = get_normalizer("whisper", "en")
    loss_sum, token_sum, refs, hyps = 0.0, 0, [], []
    with torch.no_grad():
        for batch in loader:  # the former way
            targets, mask = encode_targets(model.tokenizer, batch.texts, run.device)
            speech, speech_lengths = model.encode_speech(batch.inputs, batch.input_lengths)
            logits = model.target_logits(speech, speech_lengths, targets, mask)
            options = DecodingOptions(strategy="greedy",
                                      max_new_tokens=cfg.decoding.max_new_tokens)
            caps = max_tokens_for_duration(batch.durations, cfg.decoding.tokens_per_second,
                                           floor=8, cap=options.max_new_tokens)
            texts = generate(model, batch.inputs, batch.input_lengths, options,
                             max_new_tokens=caps).texts
            loss_sum += sft_loss(logits, targets, mask).item() * int(mask.sum())
            token_sum += int(mask.sum())
            refs += [norm(t) for t in batch.texts]
            hyps += [norm(t) for t in texts]

    encoded = []
    real = model.encode_speech
    model.encode_speech = lambda inputs, lengths: encoded.append(len(inputs)) or real(inputs,
                                                                                       lengths)
    assert cfg.decoding.normalizer == "whisper"
    assert _dev_shard(model, loader, cfg.decoding, run.device, cfg.train.precision) == (
        loss_sum, token_sum, refs, hyps)
    assert encoded == [3, 3, 2]  # one encoder pass per dev batch
    assert any(hyps) and token_sum > 8  # the comparison is over real transcripts


def test_accumulated_micro_batches_give_the_whole_batch_gradient(tone_corpus, tiny_model_config):
    """train.grad_accum=2 over the two halves of a batch takes the step of grad_accum=1 over the
    whole batch (to float rounding: the halves are padded to other lengths). Eq. 2 over the
    batch divides every half's token sum by the tokens of both; dividing each half by its own
    tokens would weigh the tokens of the shorter half more."""
    from types import SimpleNamespace

    from speechrl.data import make_dataloader
    from speechrl.model import SpeechLLM
    from speechrl.tokenizer import SpeechTokenizer
    from speechrl.train.common import encode_targets
    from speechrl.train.resume import TrainerState
    from speechrl.train.sft import sft_step

    cfg = run_config(Path("unused"), tone_corpus, tiny_model_config, grad_clip=0.0)

    def step(grad_accum: int, batch_size: int) -> tuple[dict, dict[str, torch.Tensor], list]:
        torch.manual_seed(0)
        model = SpeechLLM.from_config(tiny_model_config, SpeechTokenizer.from_pretrained(
            tiny_model_config.tokenizer))
        grads: dict[str, torch.Tensor] = {}

        class RecordingOptimizer:  # the step's gradients, as the optimizer would get them
            def zero_grad(self, set_to_none: bool = True) -> None:
                model.zero_grad(set_to_none=set_to_none)

            def step(self) -> None:
                grads.update({n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None})

        loader = make_dataloader([str(tone_corpus["dev"])], cfg.data, features="fbank",
                                 training=False, batch_size=batch_size)
        train = dataclasses.replace(cfg.train, grad_accum=grad_accum)
        run = SimpleNamespace(cfg=dataclasses.replace(cfg, train=train),
                              device=torch.device("cpu"))
        no_schedule = SimpleNamespace(step=lambda: None)
        stats = sft_step(run, model, RecordingOptimizer(), no_schedule, iter(loader),
                         TrainerState())
        return stats, grads, list(loader)

    # The 8 dev utterances in evaluation order (longest first, no shuffling): one batch of 8,
    # or two of 4 whose transcripts have different lengths.
    (whole, whole_grads, _), (halves, half_grads, half_batches) = step(1, 8), step(2, 4)
    tokenizer = SpeechTokenizer.from_pretrained(tiny_model_config.tokenizer)
    counts = [int(encode_targets(tokenizer, b.texts, torch.device("cpu"))[1].sum())
              for b in half_batches]
    assert len(counts) == 2 and counts[0] > counts[1] and sum(counts) == whole["tokens"]
    assert halves["tokens"] == whole["tokens"]
    assert halves["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert halves["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    assert whole_grads.keys() == half_grads.keys() and whole_grads
    for name, g in whole_grads.items():
        torch.testing.assert_close(half_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_best_holds_the_step_with_the_lowest_dev_wer(tmp_path, tone_corpus, tiny_model_config,
                                                     monkeypatch):
    """``best/`` is the first step with the lowest dev WER (a tie keeps the earlier step), with
    that step's weights. The dev evaluation runs; its WERs are replaced by a set sequence that
    a random model on 2 dev utterances would not give."""
    from speechrl.train import sft

    scripted = iter([0.9, 0.5, 0.7, 0.5, 0.6])
    real = sft.dev_evaluation

    def scripted_wer(*args, **kwargs) -> dict[str, float]:
        return {**real(*args, **kwargs), "wer": next(scripted)}

    monkeypatch.setattr(sft, "dev_evaluation", scripted_wer)
    run = tmp_path / "five" / "run"
    best = sft.train_sft(run_config(tmp_path / "five", tone_corpus, tiny_model_config,
                                    max_steps=5, eval_every=1, dev_utterances=2))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    dev = {r["step"]: r["dev/wer"] for r in rows if "dev/wer" in r}
    assert dev == {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.5, 5: 0.6}
    saved = json.loads((best / "trainer_state.json").read_text())
    assert best == run / "best" and saved["step"] == min(dev, key=lambda s: (dev[s], s)) == 2
    assert saved["dev"]["wer"] == 0.5
    # Its weights are step 2's: those of a run that stopped there.
    monkeypatch.undo()
    sft.train_sft(run_config(tmp_path / "two", tone_corpus, tiny_model_config, max_steps=2))
    assert_same_values(load_file(str(best / "model.safetensors")),
                       load_file(str(tmp_path / "two" / "run" / "last" / "model.safetensors")),
                       "weights")
