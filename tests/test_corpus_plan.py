"""corpus_plan.py: voice pools, set sizes, the corpus plan, training mixes and adaptation
domains, checked without rendering any audio."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechrl import corpus_plan
from speechrl.degrade import MIX_NONSPEECH_KINDS, NONSPEECH_KINDS


def test_voice_pools_are_disjoint_and_exist():
    pools = {k: set(v) for k, v in corpus_plan.VOICE_POOLS.items()}
    assert not (pools["in_domain"] & pools["ood"]) and not (pools["in_domain"] & pools["adapt"])
    assert not (pools["ood"] & pools["adapt"])
    assert len(pools["in_domain"]) >= 40 and len(pools["ood"]) >= 20
    data = Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v")
    if data.is_dir():
        installed = {p.name for p in data.iterdir()}
        assert set().union(*pools.values()) <= installed


def test_plan_sizes_pools_and_unseen_text():
    plans = corpus_plan.plan_corpus(["en", "de"], utts=20, seed=3)
    sizes = corpus_plan.set_sizes(20)
    assert sizes == {"train": 20, "dev": 2, "test": 2, "ood_noisy": 2, "ood_farfield": 2,
                     "adapt_train": 5, "adapt_dev": 1, "adapt_test": 2, "ood_overlap": 2,
                     "ood_nonspeech": 1, "ood_long": 1, "grpo_train": 4}
    assert len(plans) == 2 * sum(sizes.values())
    pool_of = {s.name: s.pool for s in corpus_plan.SETS}
    for p in plans:
        voices = corpus_plan.VOICE_POOLS[pool_of[p.set_name]]
        assert p.speaker.variant in voices
        # Babbling and interfering talkers: the noisy set's own pool; the probes' unseen voices
        unseen = p.condition in ("overlap", "nonspeech")
        others = corpus_plan.VOICE_POOLS["ood"] if unseen else voices
        assert all(s.variant in others for _, s in p.babble)
    for p in plans:
        if p.condition == "overlap":
            assert p.interferer[1].variant in corpus_plan.VOICE_POOLS["ood"]
        if p.condition == "nonspeech":
            assert p.text == "" and p.nonspeech in NONSPEECH_KINDS
            assert bool(p.babble) == (p.nonspeech == "babble")
        if p.condition == "long":
            assert len(p.more_text) == corpus_plan.LONG_MAX_SENTENCES - 1
    spoken = [t for p in plans for t in (p.text, *p.more_text) if t]
    assert len(spoken) == len(set(spoken))  # no sentence twice, the long clips' included
    train = {p.text for p in plans if p.set_name == "train"}
    assert not train & {p.text for p in plans if p.set_name != "train"}
    assert plans == corpus_plan.plan_corpus(["en", "de"], utts=20, seed=3)
    assert [p.text for p in plans] != [p.text for p in corpus_plan.plan_corpus(["en", "de"], 20, 4)]


def test_eval_utts_sizes_the_other_sets_apart_from_train():
    # 60 training utterances a language, the other sets as for 20: dev 10 % of 20 = 2, etc.
    assert corpus_plan.set_sizes(60, eval_utts=20) == {
        "train": 60, "dev": 2, "test": 2, "ood_noisy": 2, "ood_farfield": 2,
        "adapt_train": 5, "adapt_dev": 1, "adapt_test": 2, "ood_overlap": 2,
        "ood_nonspeech": 1, "ood_long": 1, "grpo_train": 12}  # GRPO's: 20 % of the 60
    plans = corpus_plan.plan_corpus(["en"], utts=60, seed=3, eval_utts=20)
    assert len(plans) == 60 + 20 + 12
    small = corpus_plan.plan_corpus(["en"], utts=20, seed=3)
    # train draws from its own stream: the first 20 sentences are those of the smaller corpus
    assert [p.text for p in plans if p.set_name == "train"][:20] == \
        [p.text for p in small if p.set_name == "train"]
    train = {p.text for p in plans if p.set_name == "train"}
    assert not train & {p.text for p in plans if p.set_name != "train"}
    with pytest.raises(ValueError, match="eval_utts"):
        corpus_plan.set_sizes(10, eval_utts=0)


def test_test_utts_sizes_the_test_set_alone_and_extends_it():
    default = corpus_plan.set_sizes(60, eval_utts=20)
    assert corpus_plan.set_sizes(60, eval_utts=20, test_utts=9) == {**default, "test": 9}
    plans = corpus_plan.plan_corpus(["en", "de"], utts=60, seed=3, eval_utts=20, test_utts=9)
    base = corpus_plan.plan_corpus(["en", "de"], utts=60, seed=3, eval_utts=20)
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
        corpus_plan.set_sizes(10, test_utts=0)


def test_grpo_train_holds_new_sentences_and_its_own_mix():
    mix = corpus_plan.TrainMix(noisy=0.25, overlap=0.25, nonspeech=0.25)
    plans = corpus_plan.plan_corpus(["en", "de"], utts=40, seed=0, eval_utts=20, grpo_mix=mix)
    clean = corpus_plan.plan_corpus(["en", "de"], utts=40, seed=0, eval_utts=20)
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
    in_domain = set(corpus_plan.VOICE_POOLS["in_domain"])
    assert all(s.variant in in_domain for p in grpo for _, s in p.babble)


def test_train_mix_degrades_a_share_of_training_and_adds_nonspeech():
    mix = corpus_plan.TrainMix(noisy=0.2, overlap=0.1, nonspeech=0.1)
    plans = corpus_plan.plan_corpus(["en", "de"], utts=40, seed=0, eval_utts=20, train_mix=mix)
    clean = corpus_plan.plan_corpus(["en", "de"], utts=40, seed=0, eval_utts=20)
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
    in_domain = set(corpus_plan.VOICE_POOLS["in_domain"])
    for p in train:
        assert all(s.variant in in_domain for _, s in p.babble)  # never the probes' voices
        if p.condition == "mix_overlap":
            assert p.interferer[1].variant in in_domain
        if p.condition == "mix_nonspeech":
            assert p.text == "" and p.nonspeech in MIX_NONSPEECH_KINDS
            assert p.id.startswith(f"train-{p.language}-n")
    assert not set(MIX_NONSPEECH_KINDS) & {"noise", "tones", "silence"}
    with pytest.raises(ValueError, match="noisy=S, overlap=S or nonspeech=S"):
        corpus_plan.TrainMix.parse("noise=0.1")
    assert not [p for p in plans if p.set_name == "grpo_train" and p.condition != "clean"]
    parsed = corpus_plan.TrainMix.parse("noisy=0.1, nonspeech=0.02")
    assert parsed == corpus_plan.TrainMix(0.1, 0, 0.02)
    with pytest.raises(ValueError, match=r"share must lie in \[0, 1\]"):
        corpus_plan.TrainMix(overlap=1.5)


def test_adapt_domain_changes_the_adaptation_sets_alone():
    # At the demo's size, where later sets' unique sentences would collide with any change in
    # the adaptation sets' texts (a smaller corpus hides that).
    def plan(domain: str | None = None):
        kwargs = {} if domain is None else {"adapt_domain": domain}
        return corpus_plan.plan_corpus(
            ["en", "es"], utts=3000, seed=0, eval_utts=1000,
            grpo_mix=corpus_plan.TrainMix.parse("noisy=0.2,overlap=0.1"), test_utts=500, **kwargs)

    telephone = plan()
    assert telephone == plan("telephone")
    others = [p for p in telephone if not p.set_name.startswith("adapt")]
    pool = set(corpus_plan.VOICE_POOLS["adapt"])
    in_domain = set(corpus_plan.VOICE_POOLS["in_domain"])
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
        corpus_plan.plan_corpus(["en"], utts=4, seed=0, adapt_domain="office")
