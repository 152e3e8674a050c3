"""Rule-based rewards (paper eq. 7-9) and their registry (speechrl.rewards)."""

import textwrap

import pytest

from speechrl.rewards import (
    build_reward,
    del_reward,
    ed_reward,
    em_reward,
    ins_reward,
    parse_spec,
    sub_reward,
    wer_reward,
)

REFS = ["the cat sat on the mat", "hello world", "bonjour"]
HYPS = ["the cat sit on mat", "hello world", ""]
# pair 0: sat->sit (S), "the" deleted (D): S+D+I = 2 over N = 6
# pair 1: exact
# pair 2: "bonjour" deleted: 1 over 1


def test_builtin_rewards_hand_counted():
    assert wer_reward(HYPS, REFS) == pytest.approx([-2 / 6, 0.0, -1.0])
    assert em_reward(HYPS, REFS) == [0.0, 1.0, 0.0]
    assert ed_reward(HYPS, REFS) == [-2.0, 0.0, -1.0]
    # an empty reference: two inserted words, WER = 2 / max(0, 1)
    assert wer_reward(["oh no"], [""]) == [-2.0]
    assert em_reward([""], [""]) == [1.0]


def test_error_kind_rewards_hand_counted():
    assert sub_reward(HYPS, REFS) == pytest.approx([-1 / 6, 0.0, 0.0])
    assert del_reward(HYPS, REFS) == pytest.approx([-1 / 6, 0.0, -1.0])
    assert ins_reward(HYPS, REFS) == [0.0, 0.0, 0.0]
    # "a b" -> "a x b c": x and c inserted over N = 2; an empty reference divides by 1
    assert ins_reward(["a x b c", "oh no"], ["a b", ""]) == [-1.0, -2.0]
    assert del_reward(["a x b c", "oh no"], ["a b", ""]) == [0.0, 0.0]
    # the kinds add up to -WER, and wer+del counts a deletion twice: (1 + 2 * 1) / 6, 0, 2 / 1
    assert build_reward("sub+del+ins", normalizer="none")(HYPS, REFS) == pytest.approx(
        wer_reward(HYPS, REFS))
    assert build_reward("wer+del", normalizer="none")(HYPS, REFS) == pytest.approx(
        [-3 / 6, 0.0, -2.0])


def test_weighted_sum():
    reward = build_reward("0.7*wer+0.3*em", normalizer="none")
    # 0.7 * (-1/3) + 0.3 * 0,  0.7 * 0 + 0.3 * 1,  0.7 * (-1) + 0.3 * 0
    assert reward(HYPS, REFS) == pytest.approx([-0.7 / 3, 0.3, -0.7])
    assert build_reward(" 2 * ed + em ", normalizer="none")(HYPS, REFS) == [-4.0, 1.0, -2.0]
    assert parse_spec("1e-2*wer+.5*em+ed") == [(0.01, "wer"), (0.5, "em"), (1.0, "ed")]


def test_normalised_per_language():
    reward = build_reward("em")
    hyps = ["Twenty five cats!", "Twenty five cats!", "L'ÉTÉ..."]
    refs = ["25 cats", "25 cats", "l'été"]
    # English turns "twenty five" into "25"; the basic normaliser (French) does not;
    # both turn "L'ÉTÉ..." and "l'été" into "l été"
    assert reward(hyps, refs, ["en", "fr", "fr"]) == [1.0, 0.0, 1.0]
    # no languages: the Reward's own (None: the basic normaliser for all)
    assert reward(hyps, refs) == [0.0, 0.0, 1.0]
    assert build_reward("em", language="en")(hyps[:1], refs[:1]) == [1.0]
    assert reward.normalize(["Hello, World!"], ["en"]) == ["hello world"]
    # the wer reward on normalised text: "The Cat sat." vs "the cat sat on" -> 1 deletion / 4
    assert build_reward("wer")(["The Cat sat."], ["the cat sat on"], ["en"]) == [-0.25]


def test_importable_function(tmp_path, monkeypatch):
    package = tmp_path / "my_rewards_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scores.py").write_text(
        textwrap.dedent(
            """
            def hyp_words(hyps, refs):
                return [len(h.split()) for h in hyps]

            def too_short(hyps, refs):
                return [0.0]

            def not_finite(hyps, refs):
                return [float("nan")] * len(hyps)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward("my_rewards_pkg.scores:hyp_words", normalizer="none")
    assert reward(HYPS, REFS) == [5.0, 2.0, 0.0]
    mixed = build_reward("0.5*my_rewards_pkg.scores:hyp_words+em", normalizer="none")
    assert mixed(HYPS, REFS) == [2.5, 2.0, 0.0]
    with pytest.raises(ValueError, match="returned 1 values for 3 pairs"):
        build_reward("my_rewards_pkg.scores:too_short")(HYPS, REFS)
    with pytest.raises(ValueError, match="not finite"):
        build_reward("my_rewards_pkg.scores:not_finite")(HYPS, REFS)
    with pytest.raises(ValueError, match="has no function 'missing'"):
        build_reward("my_rewards_pkg.scores:missing")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bleu", "unknown reward 'bleu'"),
        ("0.7 wer", "cannot read reward term '0.7 wer'"),
        ("wer+", "cannot read reward term ''"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ],
)
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        build_reward(spec)


def test_bad_normaliser_and_lengths():
    with pytest.raises(ValueError, match="unknown normaliser 'wisper'"):
        build_reward("wer", normalizer="wisper")
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        build_reward("wer")(["a", "b"], ["a"])
