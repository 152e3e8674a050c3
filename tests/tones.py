"""The tone corpus of the training tests: each word is a fixed chord of two tones, so a tiny model
learns the mapping in seconds on CPU. ``tests/conftest.py`` serves one copy of it to every module
as the ``tone_corpus`` fixture; the tests that need a corpus of their own call
:func:`write_tone_corpus`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "test"]
SR = 16000


def word_audio(word: str) -> np.ndarray:
    """0.2 s of two tones whose frequencies identify the word."""
    k = WORDS.index(word)
    t = np.arange(int(0.2 * SR)) / SR
    low, high = 300 + 150 * k, 2000 + 90 * k
    return 0.3 * np.sin(2 * np.pi * low * t) + 0.2 * np.sin(2 * np.pi * high * t)


def write_tone_corpus(folder: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(2, 5))]
        gap = np.zeros(int(0.05 * SR))
        audio = np.concatenate([np.concatenate([word_audio(w), gap]) for w in words])
        audio = (audio + 0.01 * rng.standard_normal(len(audio))).astype(np.float32)
        name = f"utt{i:03d}.wav"
        sf.write(folder / name, audio, SR)
        rows.append({"id": f"utt{i:03d}", "audio": name, "text": " ".join(words),
                     "language": "en", "duration": len(audio) / SR})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest
