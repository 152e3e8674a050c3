"""synth.py: a small corpus end to end, and the conditions the training mix and the
adaptation domains render (their plans: test_corpus_plan.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechrl import espeak, synth
from speechrl.corpus_plan import UtterancePlan, set_sizes
from speechrl.degrade import MIX_NONSPEECH_KINDS, render
from speechrl.espeak import Espeak, Speaker
from speechrl.manifest import read_manifest
from speechrl.textgen import LANGUAGES


def espeak_available() -> bool:
    try:
        espeak._load_espeak()
    except RuntimeError:
        return False
    return True


needs_espeak = pytest.mark.skipif(not espeak_available(), reason="espeak-ng not installed")


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_espeak
def test_small_corpus_is_complete_readable_and_deterministic(tmp_path):
    manifests = synth.synthesize_corpus(tmp_path / "a", utts=2, seed=0, workers=2,
                                        progress=False)
    sizes = set_sizes(2)
    assert set(manifests) == set(sizes)
    description = json.loads((tmp_path / "a" / "corpus.json").read_text())
    train_rows = [json.loads(line) for line in manifests["train"].read_text().splitlines()]
    for name, path in manifests.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 5 * sizes[name] == description["sets"][name]["utterances"]
        assert {r["language"] for r in rows} == set(LANGUAGES)
        utts, skips = read_manifest(path, training=name != "ood_nonspeech", max_duration=30.0)
        assert len(utts) == len(rows) and len(skips) == 0
        for r, u in zip(rows, utts, strict=True):
            wave, sr = sf.read(u.audio, dtype="float32")
            assert sr == 16000 and len(wave) / sr == pytest.approx(r["duration"], abs=1e-4)
            assert 0.3 < r["duration"] < 21.0 and np.abs(wave).max() <= 0.99 + 1e-4
            if name.startswith("adapt"):  # telephone band: nothing left above 4 kHz
                spec = np.abs(np.fft.rfft(wave)) ** 2
                freqs = np.fft.rfftfreq(len(wave), 1 / sr)
                assert spec[freqs > 4100].sum() < 1e-4 * spec.sum()
            if name == "ood_noisy":
                assert 0.0 <= r["acoustics"]["snr_db"] <= 10.0
            if name == "ood_overlap":
                a = r["acoustics"]
                assert 0.0 <= a["interferer_db_below"] <= 6.0 and a["overlap_s"] > 0
            if name == "ood_nonspeech":
                assert r["text"] == "" and 1.0 <= r["duration"] <= 8.0
            if name == "ood_long":  # 2+ sentences, 12-20 s: longer than every training clip
                assert 12.0 <= r["duration"] <= 20.0 and r["acoustics"]["sentences"] >= 2
                assert r["duration"] > max(t["duration"] for t in train_rows)
    # Same seed, one worker instead of two: the very same bytes, audio and manifests.
    synth.synthesize_corpus(tmp_path / "b", utts=2, seed=0, workers=1, progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_unknown_language_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"languages \['xx'\] not supported"):
        synth.synthesize_corpus(tmp_path, langs=["en", "xx"], utts=1)


@needs_espeak
def test_train_mix_renders_its_conditions():
    engine = Espeak()
    speaker = Speaker("m3", 50, 170)
    base = UtterancePlan("train", "train-en-00000", "en", "the cat sat on the mat",
                         speaker, "clean", (0, 0, 0, 0))
    clean, _, _ = render(base, engine)
    noisy, info, text = render(dataclasses.replace(base, condition="mix_noisy"), engine)
    assert text == base.text and info["noise"] in ("hum", "band") and 5 <= info["snr_db"] <= 20
    assert abs(len(noisy) - len(clean)) < 0.05 * len(clean)  # espeak-ng varies a little
    overlap, info, _ = render(dataclasses.replace(
        base, condition="mix_overlap", interferer=("hello world", Speaker("f2", 40, 150))),
        engine)
    assert 3.0 <= info["interferer_db_below"] <= 12.0 and len(overlap) >= len(clean)
    for kind in MIX_NONSPEECH_KINDS:
        babble = (("hello world", Speaker("f2", 40, 150)),) * 3 if kind == "babble" else ()
        wave, info, text = render(dataclasses.replace(
            base, text="", condition="mix_nonspeech", nonspeech=kind, babble=babble), engine)
        assert text == "" and info["nonspeech"] == kind and 1.0 <= len(wave) / 16000 <= 8.0


@needs_espeak
def test_meeting_renders_crosstalk_in_a_room():
    engine = Espeak()
    base = UtterancePlan("adapt_test", "adapt_test-en-00000", "en",
                         "the cat sat on the mat", Speaker("klatt4", 50, 170),
                         "meeting", (0, 5, 0, 0))
    clean, _, _ = render(dataclasses.replace(base, condition="clean"), engine)
    wave, info, text = render(dataclasses.replace(
        base, interferer=("a second talker says this", Speaker("robosoft3", 40, 150))),
        engine)
    assert text == base.text and 0.0 <= info["interferer_db_below"] <= 6.0
    assert info["overlap_s"] > 0 and len(wave) > len(clean)  # runs on past the main talker
    assert 0.2 <= info["rt60"] <= 0.5 and 15.0 <= info["snr_db"] <= 30.0
    alone, info, _ = render(base, engine)  # no interferer planned: the room alone
    assert "interferer_db_below" not in info and abs(len(alone) - len(clean)) < 0.05 * len(clean)


@needs_espeak
def test_headset_renders_crosstalk_and_noise_without_a_room(monkeypatch):
    from speechrl import degrade

    def no_room(*args, **kwargs):
        raise AssertionError("a headset clip went through a room")

    monkeypatch.setattr(degrade.audio, "reverberate", no_room)
    engine = Espeak()
    base = UtterancePlan("adapt_test", "adapt_test-en-00000", "en",
                         "the cat sat on the mat", Speaker("m3", 50, 170), "headset",
                         (0, 5, 0, 0),
                         interferer=("a second talker says this", Speaker("robosoft3", 40, 150)))
    clean, _, _ = render(dataclasses.replace(base, condition="clean"), engine)
    wave, info, text = render(base, engine)
    assert text == base.text and 0.0 <= info["interferer_db_below"] <= 6.0
    assert info["overlap_s"] > 0 and len(wave) > 1.1 * len(clean)  # runs on past the main talker
    assert 20.0 <= info["snr_db"] <= 35.0 and "rt60" not in info
