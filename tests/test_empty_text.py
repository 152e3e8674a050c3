"""Training on clips whose transcript is empty (data.train_empty_text): non-speech taught as
"transcribe nothing", the target <EOS> alone; off, such rows are skipped and counted."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import soundfile as sf
import torch
from test_train import run_config
from tones import SR, write_tone_corpus

from speechrl.config import DataConfig
from speechrl.data import make_dataloader


def add_silent_clips(manifest, n: int, seed: int) -> None:
    """Append ``n`` clips of faint noise with empty text to a tone-corpus manifest."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        audio = (0.01 * rng.standard_normal(int(0.6 * SR))).astype(np.float32)
        sf.write(manifest.parent / f"quiet{i}.wav", audio, SR)
        rows.append({"id": f"quiet{i}", "audio": f"quiet{i}.wav", "text": "",
                     "language": "en", "duration": len(audio) / SR})
    with manifest.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_empty_text_rows_are_kept_only_when_asked(tmp_path):
    manifest = write_tone_corpus(tmp_path / "train", 6, seed=0)
    add_silent_clips(manifest, 2, seed=0)
    skipped = make_dataloader([manifest], DataConfig(), features="fbank", training=True)
    assert skipped.skips.counts == {"empty text": 2} and len(skipped.dataset) == 6
    kept = make_dataloader([manifest], DataConfig(train_empty_text=True), features="fbank",
                           training=True)
    assert len(kept.skips) == 0 and len(kept.dataset) == 8
    texts = [t for batch in kept for t in batch.texts]
    assert sorted(texts).count("") == 2


def test_sft_learns_to_say_nothing_on_the_empty_clips(tmp_path, tiny_model_config):
    from speechrl.checkpoint import load_model
    from speechrl.generate import DecodingOptions, generate
    from speechrl.train.sft import train_sft

    corpus = {"train": write_tone_corpus(tmp_path / "train", 24, seed=0),
              "dev": write_tone_corpus(tmp_path / "dev", 4, seed=1)}
    add_silent_clips(corpus["train"], 8, seed=0)
    cfg = run_config(tmp_path, corpus, tiny_model_config, max_steps=40, eval_every=1000)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_empty_text=True))
    model = load_model(train_sft(cfg)).eval()
    assert json.loads((tmp_path / "run" / "skips.json").read_text())["train"] == {}
    # On fresh quiet clips the trained model ends at once (EOS first) far more often than not.
    add_silent_clips(corpus["dev"], 6, seed=5)
    loader = make_dataloader([corpus["dev"]], DataConfig(), features="fbank", training=False)
    empty = total = 0
    with torch.no_grad():
        for batch in loader:
            result = generate(model, batch.inputs, batch.input_lengths,
                              DecodingOptions(max_new_tokens=8))
            for text, hyp in zip(batch.texts, result.texts, strict=True):
                if text == "":
                    empty, total = empty + (hyp.strip() == ""), total + 1
    assert total == 6 and empty >= 5, (empty, total)
