"""Alignment counts, WER / CER and hallucination figures (speechrl.metrics)."""

import math
import random

import jiwer
import numpy as np
import pytest

from speechrl.metrics import (
    ErrorCounts,
    cer,
    cer_counts,
    error_counts,
    hallucination_stats,
    has_loop,
    paired_bootstrap,
    wer,
)


def test_counted_word_alignments():
    refs = ["the cat sat on the mat", "hello world", "a b c d", "", "", "  a   b "]
    hyps = ["the cat sit on mat", "hello hello big world", "", "oh no", "", "a\tb"]
    per_utt, total = error_counts(refs, hyps)
    # the cat sat on the mat / the cat sit on mat:
    #   the=the cat=cat sat->sit on=on the->(del) mat=mat  -> H4 S1 D1 I0, N 6
    assert per_utt[0] == ErrorCounts(hits=4, substitutions=1, deletions=1, ref_words=6)
    assert per_utt[0].wer == pytest.approx(2 / 6)
    # hello world / hello hello big world: hello=hello (ins hello) (ins big) world=world
    assert per_utt[1] == ErrorCounts(hits=2, insertions=2, ref_words=2)
    assert per_utt[1].wer == 1.0
    # a b c d / (nothing): four deletions
    assert per_utt[2] == ErrorCounts(deletions=4, ref_words=4)
    # empty reference: every hypothesis word is an insertion, WER = I / max(N, 1) = 2
    assert per_utt[3] == ErrorCounts(insertions=2)
    assert per_utt[3].wer == 2.0
    assert per_utt[4] == ErrorCounts()
    assert per_utt[4].wer == 0.0
    # whitespace of any kind separates words, and only that
    assert per_utt[5] == ErrorCounts(hits=2, ref_words=2)
    # totals: H 4+2+2=8, S 1, D 1+4=5, I 2+2=4, N 6+2+4+2=14 -> WER (1+5+4)/14
    assert total == ErrorCounts(hits=8, substitutions=1, deletions=5, insertions=4, ref_words=14)
    assert total.errors == 10
    assert wer(refs, hyps) == pytest.approx(10 / 14)


def test_counted_character_alignments():
    refs = ["abc de", "ab", ""]
    hyps = ["abd  de", "", "xy z"]
    per_utt, total = cer_counts(refs, hyps)
    # a b c _ d e / a b d _ d e (spaces collapsed): c->d  -> H5 S1, N 6
    assert per_utt[0] == ErrorCounts(hits=5, substitutions=1, ref_words=6)
    assert per_utt[1] == ErrorCounts(deletions=2, ref_words=2)
    # "xy z" is four characters, all inserted
    assert per_utt[2] == ErrorCounts(insertions=4)
    assert total.wer == pytest.approx((1 + 2 + 4) / 8)
    assert cer(refs, hyps) == pytest.approx(7 / 8)


def test_error_counts_add_and_to_dict():
    a = ErrorCounts(hits=3, substitutions=1, deletions=0, insertions=2, ref_words=4)
    b = ErrorCounts(hits=1, substitutions=0, deletions=1, insertions=0, ref_words=2)
    assert a + b == ErrorCounts(4, 1, 1, 2, 6)
    assert sum([a, b], ErrorCounts()) == a + b
    assert (a + b).to_dict() == {
        "hits": 4,
        "substitutions": 1,
        "deletions": 1,
        "insertions": 2,
        "ref_words": 6,
        "errors": 4,
        "wer": 4 / 6,
    }


def _random_pair(rng: random.Random) -> tuple[str, str]:
    vocab = ["a", "b", "c", "d", "e", "f"]
    ref = [rng.choice(vocab) for _ in range(rng.randint(1, 12))]
    hyp = [rng.choice(vocab) for _ in range(rng.randint(0, 14))]
    return " ".join(ref), " ".join(hyp)


def test_agrees_with_jiwer_on_random_pairs():
    rng = random.Random(0)
    pairs = [_random_pair(rng) for _ in range(300)]
    refs, hyps = [p[0] for p in pairs], [p[1] for p in pairs]
    per_utt, total = error_counts(refs, hyps)
    for ref, hyp, counts in zip(refs, hyps, per_utt, strict=True):
        assert counts.wer == pytest.approx(jiwer.wer(ref, hyp))
        assert counts.hits + counts.substitutions + counts.deletions == counts.ref_words
        assert counts.hits + counts.substitutions + counts.insertions == len(hyp.split())
    assert total.wer == pytest.approx(jiwer.wer(refs, hyps))
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))


def test_batch_equals_single():
    rng = random.Random(1)
    pairs = [_random_pair(rng) for _ in range(20)]
    batch, _ = error_counts([p[0] for p in pairs], [p[1] for p in pairs])
    single = [error_counts([r], [h])[0][0] for r, h in pairs]
    assert batch == single


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_counts(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="not single strings"):
        error_counts("a b", "a b")
    with pytest.raises(TypeError, match="hypothesis 1 is NoneType"):
        error_counts(["a", "b"], ["a", None])
    with pytest.raises(ValueError, match="at least one utterance"):
        hallucination_stats([], [])


@pytest.mark.parametrize(
    "text, loop",
    [
        ("the the the", True),  # 1-gram x3
        ("the the", False),  # only twice
        ("i said no no no really", True),  # loop in the middle
        ("a b a b a b", True),  # 2-gram x3
        ("a b a b", False),
        ("a b c d a b c d a b c d", True),  # 4-gram x3
        ("a b c d e a b c d e a b c d e", False),  # a 5-gram is longer than the figure looks at
        ("", False),
    ],
)
def test_has_loop(text, loop):
    assert has_loop(text.split()) is loop


def test_hallucination_stats_on_constructed_set():
    refs = ["a b c d", "a b", "x y z", "p q", "m n o"]
    hyps = ["a b c d", "a b c d e", "x y z z z", "", "m n o m n o m n o"]
    stats = hallucination_stats(refs, hyps)
    # insertions 0 + 3 + 2 + 0 + 6 = 11 over 4 + 2 + 3 + 2 + 3 = 14 reference words
    assert stats["insertion_rate"] == pytest.approx(11 / 14)
    # more than twice the reference's words: 5 > 4 and 9 > 6 (5 > 6 is not)
    assert stats["over_twice_share"] == pytest.approx(2 / 5)
    # loops: "z z z" and "m n o" x3
    assert stats["loop_share"] == pytest.approx(2 / 5)
    assert stats["empty_share"] == pytest.approx(1 / 5)
    # (4/4 + 5/2 + 5/3 + 0/2 + 9/3) / 5
    assert stats["length_ratio"] == pytest.approx((1 + 2.5 + 5 / 3 + 0 + 3) / 5)
    assert stats["output_share"] == pytest.approx(4 / 5)  # all but the empty one
    assert stats["words_per_clip"] == pytest.approx((4 + 5 + 5 + 0 + 9) / 5)
    assert stats["utterances"] == 5
    # the counts of an earlier alignment give the same figures
    assert hallucination_stats(refs, hyps, counts=error_counts(refs, hyps)[0]) == stats


def test_hallucination_stats_with_empty_references():
    stats = hallucination_stats(["", "a"], ["x", "a"])
    assert stats["insertion_rate"] == 1.0  # one insertion over max(1, 1) word
    assert stats["length_ratio"] == 1.0  # the empty reference has no ratio
    assert stats["over_twice_share"] == 0.5  # 1 word > 2 * 0
    assert math.isnan(hallucination_stats([""], [""])["length_ratio"])


def test_paired_bootstrap_hand_computed():
    # Numerators of A and B on three utterances, denominators 4, 5, 6 (reference words): the
    # change on the whole set is (-1 + 0 + 3) / 15. A resample of one utterance three times
    # has probability 1/27 > 2.5 %, so the interval's ends are the extremes: all utterance 1,
    # -3/12 = -0.25, and all utterance 3, 9/18 = +0.5.
    (interval,) = paired_bootstrap([1, 2, 0], [0, 2, 3], [4, 5, 6])
    assert interval.delta == pytest.approx(2 / 15)
    assert (interval.low, interval.high) == pytest.approx((-0.25, 0.5))
    assert not interval.significant
    assert paired_bootstrap([1, 2, 0], [0, 2, 3], [4, 5, 6]) == [interval]  # fixed seed
    # Two columns at once; B better on every utterance of the second: significant
    second = paired_bootstrap([[0, 2], [0, 1]], [[0, 1], [0, 0]], [[1, 2], [1, 2]])[1]
    assert second.delta == pytest.approx(-0.5) and second.high < 0 and second.significant
    assert second.scaled(100.0).delta == pytest.approx(-50.0)


def test_paired_bootstrap_identical_systems_and_bad_input():
    rng = np.random.default_rng(0)
    num = rng.integers(0, 5, size=(50, 3)).astype(float)
    den = rng.integers(1, 9, size=(50, 3)).astype(float)
    for interval in paired_bootstrap(num, num, den):
        assert (interval.delta, interval.low, interval.high) == (0.0, 0.0, 0.0)
        assert not interval.significant
    with pytest.raises(ValueError, match="must all be"):
        paired_bootstrap([1, 2], [1], [1, 1])
    with pytest.raises(ValueError, match="at least one utterance"):
        paired_bootstrap([], [], [])


def test_paired_bootstrap_matches_the_normal_approximation():
    # 400 utterances, B one error fewer than A on a random 10 % of them: the interval is close
    # to delta +- 1.96 standard errors of the mean difference (den = 10 words each).
    rng = np.random.default_rng(1)
    diff = -(rng.random(400) < 0.1).astype(float)
    a = np.full(400, 2.0)
    interval = paired_bootstrap(a, a + diff, np.full(400, 10.0), resamples=4000)[0]
    se = diff.std(ddof=1) / np.sqrt(400) / 10.0
    assert interval.delta == pytest.approx(diff.mean() / 10.0)
    assert interval.low == pytest.approx(interval.delta - 1.96 * se, abs=0.25 * se)
    assert interval.high == pytest.approx(interval.delta + 1.96 * se, abs=0.25 * se)
