"""synth.py: voice pools, the corpus plan, and a small corpus end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechrl import espeak, synth
from speechrl.manifest import read_manifest
from speechrl.textgen import LANGUAGES

# --------------------------------------------------------------------------- voices and plan


def test_voice_pools_are_disjoint_and_exist():
    pools = {k: set(v) for k, v in synth.VOICE_POOLS.items()}
    assert not (pools["in_domain"] & pools["ood"]) and not (pools["in_domain"] & pools["adapt"])
    assert not (pools["ood"] & pools["adapt"])
    assert len(pools["in_domain"]) >= 40 and len(pools["ood"]) >= 20
    data = Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v")
    if data.is_dir():
        installed = {p.name for p in data.iterdir()}
        assert set().union(*pools.values()) <= installed


def test_plan_sizes_pools_and_unseen_text():
    plans = synth.plan_corpus(["en", "de"], utts=20, seed=3)
    sizes = synth.set_sizes(20)
    assert sizes == {"train": 20, "dev": 2, "test": 2, "ood_noisy": 2, "ood_farfield": 2,
                     "adapt_train": 5, "adapt_dev": 1, "adapt_test": 2, "ood_overlap": 2,
                     "ood_nonspeech": 1, "ood_long": 1, "grpo_train": 4}
    assert len(plans) == 2 * sum(sizes.values())
    pool_of = {s.name: s.pool for s in synth.SETS}
    for p in plans:
        voices = synth.VOICE_POOLS[pool_of[p.set_name]]
        assert p.speaker.variant in voices
        # Babbling and interfering talkers: the noisy set's own pool; the probes' unseen voices
        others = synth.VOICE_POOLS["ood"] if p.condition in ("overlap", "nonspeech") else voices
        assert all(s.variant in others for _, s in p.babble)
    for p in plans:
        if p.condition == "overlap":
            assert p.interferer[1].variant in synth.VOICE_POOLS["ood"]
        if p.condition == "nonspeech":
            assert p.text == "" and p.nonspeech in synth.NONSPEECH_KINDS
            assert bool(p.babble) == (p.nonspeech == "babble")
        if p.condition == "long":
            assert len(p.more_text) == synth.LONG_MAX_SENTENCES - 1
    spoken = [t for p in plans for t in (p.text, *p.more_text) if t]
    assert len(spoken) == len(set(spoken))  # no sentence twice, the long clips' included
    train = {p.text for p in plans if p.set_name == "train"}
    assert not train & {p.text for p in plans if p.set_name != "train"}
    assert plans == synth.plan_corpus(["en", "de"], utts=20, seed=3)
    assert [p.text for p in plans] != [p.text for p in synth.plan_corpus(["en", "de"], 20, 4)]


def test_eval_utts_sizes_the_other_sets_apart_from_train():
    # 60 training utterances a language, the other sets as for 20: dev 10 % of 20 = 2, etc.
    assert synth.set_sizes(60, eval_utts=20) == {
        "train": 60, "dev": 2, "test": 2, "ood_noisy": 2, "ood_farfield": 2,
        "adapt_train": 5, "adapt_dev": 1, "adapt_test": 2, "ood_overlap": 2,
        "ood_nonspeech": 1, "ood_long": 1, "grpo_train": 12}  # GRPO's: 20 % of the 60
    plans = synth.plan_corpus(["en"], utts=60, seed=3, eval_utts=20)
    assert len(plans) == 60 + 20 + 12
    small = synth.plan_corpus(["en"], utts=20, seed=3)
    # train draws from its own stream: the first 20 sentences are those of the smaller corpus
    assert [p.text for p in plans if p.set_name == "train"][:20] == \
        [p.text for p in small if p.set_name == "train"]
    train = {p.text for p in plans if p.set_name == "train"}
    assert not train & {p.text for p in plans if p.set_name != "train"}
    with pytest.raises(ValueError, match="eval_utts"):
        synth.set_sizes(10, eval_utts=0)


def test_test_utts_sizes_the_test_set_alone_and_extends_it():
    default = synth.set_sizes(60, eval_utts=20)
    assert synth.set_sizes(60, eval_utts=20, test_utts=9) == {**default, "test": 9}
    plans = synth.plan_corpus(["en", "de"], utts=60, seed=3, eval_utts=20, test_utts=9)
    base = synth.plan_corpus(["en", "de"], utts=60, seed=3, eval_utts=20)
    for lang in ("en", "de"):
        longer = [p for p in plans if p.set_name == "test" and p.language == lang]
        short = [p for p in base if p.set_name == "test" and p.language == lang]
        assert (len(longer), len(short)) == (9, 2)
        assert longer[:2] == short  # the default test set is where the longer one starts
    # every other set as before (no sentence of the seven more collided with a later set's)
    assert [p for p in plans if p.set_name != "test"] == [p for p in base if p.set_name != "test"]
    spoken = [p.text for p in plans if p.text]
    assert len(spoken) == len(set(spoken))
    with pytest.raises(ValueError, match="test_utts"):
        synth.set_sizes(10, test_utts=0)


# --------------------------------------------------------------------------- corpus


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
    sizes = synth.set_sizes(2)
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


def test_grpo_train_holds_new_sentences_and_its_own_mix():
    mix = synth.TrainMix(noisy=0.25, overlap=0.25, nonspeech=0.25)
    plans = synth.plan_corpus(["en", "de"], utts=40, seed=0, eval_utts=20, grpo_mix=mix)
    clean = synth.plan_corpus(["en", "de"], utts=40, seed=0, eval_utts=20)
    # Every other set as in the clean corpus; grpo_train's sentences are in no other set.
    assert [p for p in plans if p.set_name != "grpo_train"] == \
        [p for p in clean if p.set_name != "grpo_train"]
    grpo = [p for p in plans if p.set_name == "grpo_train"]
    others = {p.text for p in plans if p.set_name != "grpo_train"}
    assert not {p.text for p in grpo if p.text} & others
    conditions = [p.condition for p in grpo]
    assert conditions.count("mix_nonspeech") == 2 * 2  # 25 % of grpo_train's 8, per language
    assert len(grpo) == 2 * 8 + 4 and conditions.count("clean") < 16
    assert {p.id for p in grpo if p.condition == "mix_nonspeech"} == \
        {f"grpo_train-{lang}-n{k:05d}" for lang in ("en", "de") for k in range(2)}
    in_domain = set(synth.VOICE_POOLS["in_domain"])
    assert all(s.variant in in_domain for p in grpo for _, s in p.babble)


def test_unknown_language_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"languages \['xx'\] not supported"):
        synth.synthesize_corpus(tmp_path, langs=["en", "xx"], utts=1)


def test_train_mix_degrades_a_share_of_training_and_adds_nonspeech():
    mix = synth.TrainMix(noisy=0.2, overlap=0.1, nonspeech=0.1)
    plans = synth.plan_corpus(["en", "de"], utts=40, seed=0, eval_utts=20, train_mix=mix)
    clean = synth.plan_corpus(["en", "de"], utts=40, seed=0, eval_utts=20)
    # The same sentences and speakers everywhere; only the mix's conditions differ.
    kept = [p for p in plans if p.condition != "mix_nonspeech"]
    assert [(p.id, p.text, p.speaker) for p in kept] == [(p.id, p.text, p.speaker) for p in clean]
    assert all(a == b for a, b in zip(kept, clean, strict=True) if a.set_name != "train")
    train = [p for p in plans if p.set_name == "train"]
    conditions = [p.condition for p in train]
    assert conditions.count("mix_nonspeech") == 2 * 4  # 10 % of 40, per language, added
    assert 0 < conditions.count("mix_noisy") and 0 < conditions.count("mix_overlap")
    assert conditions.count("mix_noisy") + conditions.count("mix_overlap") + \
        conditions.count("clean") == 80
    in_domain = set(synth.VOICE_POOLS["in_domain"])
    for p in train:
        assert all(s.variant in in_domain for _, s in p.babble)  # never the probes' voices
        if p.condition == "mix_overlap":
            assert p.interferer[1].variant in in_domain
        if p.condition == "mix_nonspeech":
            assert p.text == "" and p.nonspeech in synth.MIX_NONSPEECH_KINDS
            assert p.id.startswith(f"train-{p.language}-n")
    assert not set(synth.MIX_NONSPEECH_KINDS) & {"noise", "tones", "silence"}
    with pytest.raises(ValueError, match="noisy=S, overlap=S or nonspeech=S"):
        synth.TrainMix.parse("noise=0.1")
    assert not [p for p in plans if p.set_name == "grpo_train" and p.condition != "clean"]
    assert synth.TrainMix.parse("noisy=0.1, nonspeech=0.02") == synth.TrainMix(0.1, 0, 0.02)
    with pytest.raises(ValueError, match=r"share must lie in \[0, 1\]"):
        synth.TrainMix(overlap=1.5)


@needs_espeak
def test_train_mix_renders_its_conditions():
    engine = synth.Espeak()
    speaker = synth.Speaker("m3", 50, 170)
    base = synth.UtterancePlan("train", "train-en-00000", "en", "the cat sat on the mat",
                               speaker, "clean", (0, 0, 0, 0))
    clean, _, _ = synth.render(base, engine)
    noisy, info, text = synth.render(dataclasses.replace(base, condition="mix_noisy"), engine)
    assert text == base.text and info["noise"] in ("hum", "band") and 5 <= info["snr_db"] <= 20
    assert abs(len(noisy) - len(clean)) < 0.05 * len(clean)  # espeak-ng varies a little
    overlap, info, _ = synth.render(dataclasses.replace(
        base, condition="mix_overlap", interferer=("hello world", synth.Speaker("f2", 40, 150))),
        engine)
    assert 3.0 <= info["interferer_db_below"] <= 12.0 and len(overlap) >= len(clean)
    for kind in synth.MIX_NONSPEECH_KINDS:
        babble = (("hello world", synth.Speaker("f2", 40, 150)),) * 3 if kind == "babble" else ()
        wave, info, text = synth.render(dataclasses.replace(
            base, text="", condition="mix_nonspeech", nonspeech=kind, babble=babble), engine)
        assert text == "" and info["nonspeech"] == kind and 1.0 <= len(wave) / 16000 <= 8.0


def test_adapt_domain_changes_the_adaptation_sets_alone():
    # At the demo's size, where later sets' unique sentences would collide with any change in
    # the adaptation sets' texts (a smaller corpus hides that).
    def plan(domain: str | None = None):
        kwargs = {} if domain is None else {"adapt_domain": domain}
        return synth.plan_corpus(["en", "es"], utts=3000, seed=0, eval_utts=1000,
                                 grpo_mix=synth.TrainMix.parse("noisy=0.2,overlap=0.1"),
                                 test_utts=500, **kwargs)

    telephone = plan()
    assert telephone == plan("telephone")
    others = [p for p in telephone if not p.set_name.startswith("adapt")]
    pool, in_domain = set(synth.VOICE_POOLS["adapt"]), set(synth.VOICE_POOLS["in_domain"])
    for domain, talkers in (("meeting", pool), ("headset", in_domain)):
        plans = plan(domain)
        assert [p for p in plans if not p.set_name.startswith("adapt")] == others, domain
        adapt = [p for p in plans if p.set_name.startswith("adapt")]
        assert len(adapt) == len(telephone) - len(others) > 0
        # the same sentences as on the telephone line, each clip with crosstalk of an
        # adaptation voice over a talker of the domain's pool
        assert [p.text for p in adapt] == [p.text for p in telephone
                                           if p.set_name.startswith("adapt")]
        for p in adapt:
            assert p.condition == domain and p.interferer is not None
            assert p.speaker.variant in talkers and p.interferer[1].variant in pool
    with pytest.raises(ValueError, match="adaptation domain 'office': choose one of telephone"):
        synth.plan_corpus(["en"], utts=4, seed=0, adapt_domain="office")


@needs_espeak
def test_meeting_renders_crosstalk_in_a_room():
    engine = synth.Espeak()
    base = synth.UtterancePlan("adapt_test", "adapt_test-en-00000", "en",
                               "the cat sat on the mat", synth.Speaker("klatt4", 50, 170),
                               "meeting", (0, 5, 0, 0))
    clean, _, _ = synth.render(dataclasses.replace(base, condition="clean"), engine)
    wave, info, text = synth.render(dataclasses.replace(
        base, interferer=("a second talker says this", synth.Speaker("robosoft3", 40, 150))),
        engine)
    assert text == base.text and 0.0 <= info["interferer_db_below"] <= 6.0
    assert info["overlap_s"] > 0 and len(wave) > len(clean)  # runs on past the main talker
    assert 0.2 <= info["rt60"] <= 0.5 and 15.0 <= info["snr_db"] <= 30.0
    alone, info, _ = synth.render(base, engine)  # no interferer planned: the room alone
    assert "interferer_db_below" not in info and abs(len(alone) - len(clean)) < 0.05 * len(clean)


@needs_espeak
def test_headset_renders_crosstalk_and_noise_without_a_room(monkeypatch):
    from speechrl import degrade

    def no_room(*args, **kwargs):
        raise AssertionError("a headset clip went through a room")

    monkeypatch.setattr(degrade.audio, "reverberate", no_room)
    engine = synth.Espeak()
    base = synth.UtterancePlan("adapt_test", "adapt_test-en-00000", "en",
                               "the cat sat on the mat", synth.Speaker("m3", 50, 170), "headset",
                               (0, 5, 0, 0),
                               interferer=("a second talker says this",
                                           synth.Speaker("robosoft3", 40, 150)))
    clean, _, _ = synth.render(dataclasses.replace(base, condition="clean"), engine)
    wave, info, text = synth.render(base, engine)
    assert text == base.text and 0.0 <= info["interferer_db_below"] <= 6.0
    assert info["overlap_s"] > 0 and len(wave) > 1.1 * len(clean)  # runs on past the main talker
    assert 20.0 <= info["snr_db"] <= 35.0 and "rt60" not in info
