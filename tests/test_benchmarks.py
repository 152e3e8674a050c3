"""The GPU benchmarks (benchmarks/rollout.py, benchmarks/train_step.py) at toy sizes on CPU:
their tables hold consistent positive figures, the roofline and FLOP counts match numbers
worked out by hand, and speechrl's decoder and Hugging Face generate agree token for token."""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# The tiny preset with a 400-token vocabulary (hidden 256, 4 layers, 4 heads of 64, 2 KV
# heads, FFN 768, tied embeddings):
#   embeddings 400 * 256                                   = 102,400
#   a layer: q 65,536 + k 32,768 + v 32,768 + o 65,536
#            + gate/up/down 3 * 256 * 768 = 589,824 + two norms 512 = 786,944
#   4 layers                                               = 3,147,776
#   final norm                                             = 256
TINY = ["--device", "cpu", "--dtype", "float32", "--preset", "tiny", "--vocab", "400",
        "--seconds", "1", "--threads", "1", "--seed", "0"]


def load(name: str):
    """Import benchmarks/<name>.py as a module (the scripts import their neighbour _common)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rollout():
    return load("rollout")


@pytest.fixture(autouse=True)
def one_thread_own_rng(rollout):
    """One torch thread, as the benchmarks' --threads 1 (steadier on a shared CPU); the global
    random state the benchmarks reseed is given back to the tests that follow."""
    with rollout.torch_threads(1), torch.random.fork_rng():
        yield


@pytest.fixture(scope="module")
def train_step():
    return load("train_step")


@pytest.fixture(scope="module")
def tiny(rollout):
    with torch.random.fork_rng():
        return rollout.build_model("tiny", "float32", torch.device("cpu"), 400).eval()


def test_rollout_table_and_record(rollout, tmp_path, capsys):
    record = tmp_path / "bench.md"
    record.write_text("# Benchmarks\n", encoding="utf-8")
    args = [*TINY, "--batch", "2", "--group", "3", "--new-tokens", "8", "--repeats", "2",
            "--append", str(record)]
    rows = rollout.main(args)

    assert [r["decoder"] for r in rows] == ["speechrl", "HF generate"]
    for r in rows:
        assert (r["G"], r["T"]) == (3, 8)
        for key in ("seconds", "tokens_per_s", "prefill_s", "step_ms", "roofline_ms",
                    "roofline_share"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["decoder"], key, r[key])
        assert r["prefill_s"] < r["seconds"]
        assert r["tokens_per_s"] == pytest.approx(2 * 3 * 8 / r["seconds"])
        assert r["roofline_share"] == pytest.approx(r["roofline_ms"] / r["step_ms"])
    assert rows[0]["vs_hf"] == pytest.approx(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"])
    assert rows[1]["vs_hf"] == 1.0
    # Both decoders saw the same prompts and rows: the same roofline.
    assert rows[0]["roofline_ms"] == rows[1]["roofline_ms"]

    out = capsys.readouterr().out
    assert "| preset | G | T | decoder" in out
    # The greedy check decodes the first 2 prompts for 8 tokens each.
    assert "Greedy tokens equal between the two decoders: tiny 16/16." in out
    text = record.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\n## ")
    assert f"## {datetime.date.today().isoformat()}: rollout speed, CPU" in text
    assert "    .venv/bin/python benchmarks/rollout.py --device cpu" in text
    assert "| tiny   | 3 | 8 | speechrl    |" in text
    assert "Reading: speechrl's decoder made" in text


def test_speechrl_and_hf_greedy_tokens_identical(rollout, tiny):
    # Left padding on purpose: speech of 5, 9 and 13 frames.
    gen = torch.Generator().manual_seed(1)
    speech = torch.randn(3, 13, 256, generator=gen) * 0.02
    with torch.no_grad():
        embeds, mask = tiny.inference_prompt(speech, torch.tensor([5, 9, 13]))
    assert not bool(mask.all())
    equal, total = rollout.greedy_agreement(tiny, embeds, mask, new_tokens=12)
    assert total == 3 * 12
    assert equal == total


def test_eos_suppressed_masks_the_head_then_lets_go(rollout, tiny):
    eos = tiny.tokenizer.eos_id
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad(), rollout.eos_suppressed(tiny.llm, eos):
        masked = tiny.llm(input_ids=ids).logits
    with torch.no_grad():
        plain = tiny.llm(input_ids=ids).logits
    assert torch.isneginf(masked[..., eos]).all()
    assert torch.isfinite(plain[..., eos]).all()
    others = torch.arange(plain.shape[-1]) != eos
    torch.testing.assert_close(masked[..., others], plain[..., others])


def test_decode_step_bytes_by_hand(rollout, tiny):
    # Weights (tied: the head is the embedding table, read once):
    #   (102,400 + 3,147,776 + 256) parameters * 4 bytes = 13,001,728 bytes
    # KV cache: 4 layers * 2 (K, V) * 2 KV heads * 64 * 4 bytes = 4,096 bytes a position;
    #   6 rows * 20 positions * 4,096 = 491,520 bytes
    assert rollout.decode_step_bytes(tiny.llm, rows=6, context=20) == 13_493_248
    # At 1e9 bytes/s the step takes 13.493248 ms; a measured 26.986496 ms step reaches half.
    rows = [dict(step_bytes=13_493_248, step_ms=26.986496)]
    rollout.add_roofline(rows, bandwidth=1e9)
    assert rows[0]["roofline_ms"] == pytest.approx(13.493248, rel=1e-12)
    assert rows[0]["roofline_share"] == pytest.approx(0.5, rel=1e-12)


def test_forward_flops_by_hand(train_step, tiny):
    # One audio, one candidate, L = 10 prompt tokens, T = 3: 12 positions fed.
    #   layers:    2 * 3,147,776 * 12          = 75,546,624
    #   attention: 2 * 4 layers * 12^2 * 256   =    294,912
    #   head:      2 * 102,400 * 3             =    614,400
    #   projector: 1 s = 25 encoder frames -> 7 after stacking 4 (the tiny preset's);
    #              (576 * 256 + 256) = 147,712 parameters; 2 * 147,712 * 7 = 2,067,968
    #   total                                  = 78,523,904
    flops = train_step.forward_flops(tiny, batch=1, group=1, prompt=10, new_tokens=3,
                                     seconds=1.0)
    assert flops == 78_523_904
    # Shared prompt, 2 audios x 3 candidates, L = 10, T = 3 (2 candidate positions fed):
    #   a prompt:    2 * 3,147,776 * 10 + 2 * 4 * 256 * 10^2 = 62,955,520 + 204,800
    #   a candidate: 2 * 3,147,776 * 2 + 2 * 4 * 256 * 2 * 2 * (10 + 1) = 12,591,104 + 90,112
    #                + head 2 * 102,400 * 3 = 614,400
    #   2 * 63,160,320 + 6 * 13,295,616 + projector 2 * 2,067,968 = 210,230,272
    flops = train_step.forward_flops(tiny, batch=2, group=3, prompt=10, new_tokens=3,
                                     seconds=1.0, shared=True)
    assert flops == 210_230_272
    full = train_step.forward_flops(tiny, batch=2, group=3, prompt=10, new_tokens=3, seconds=1.0)
    assert full == 6 * (78_523_904 - 2_067_968) + 2 * 2_067_968  # the prompt 6 times


def test_train_step_table_and_record(train_step, tmp_path, capsys):
    record = tmp_path / "bench.md"
    rows = train_step.main([*TINY, "--batch", "2", "--group", "2", "--new-tokens", "4",
                            "--repeats", "1", "--prompt-tokens", "20", "--append", str(record)])
    full, shared = rows
    assert (full["path"], shared["path"]) == ("full", "shared")
    for r in rows:
        assert (r["B"], r["G"], r["L"], r["T"]) == (2, 2, 20, 4)
        for key in ("ref_s", "old_s", "update_s", "step_s", "tokens_per_s", "flops",
                    "flop_rate", "mfu", "update_tokens_per_s", "logprob_tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["update_gib"] >= 0 and r["logprob_gib"] >= 0
        assert r["step_s"] == pytest.approx(r["ref_s"] + r["old_s"] + r["update_s"])
        assert r["tokens_per_s"] == pytest.approx(4 * (20 + 4) / r["step_s"])
        assert r["flop_rate"] == pytest.approx(r["flops"] / r["step_s"])
    assert shared["flops"] < full["flops"]
    assert shared["speedup"] == pytest.approx(full["step_s"] / shared["step_s"])
    assert "| preset | path   | B | G |" in capsys.readouterr().out
    text = record.read_text(encoding="utf-8")
    assert text.startswith(f"\n## {datetime.date.today().isoformat()}: GRPO update speed, CPU")
    assert "    .venv/bin/python benchmarks/train_step.py --device cpu" in text
    assert "| tiny   | full   | 2 | 2 | 20 | 4 |" in text


def test_grpo_update_moves_the_policy_only(train_step, tmp_path):
    device = torch.device("cpu")
    policy = train_step.build_model("tiny", "float32", device, 400, seed=0)
    reference = train_step.build_model("tiny", "float32", device, 400, seed=0)
    reference.eval().requires_grad_(False)
    before = policy.llm.get_input_embeddings().weight.detach().clone()
    torch.testing.assert_close(before, reference.llm.get_input_embeddings().weight)
    run = train_step.make_run(device, "float32", group=2, new_tokens=3, output_dir=tmp_path)
    optimizer = train_step.build_optimizer(policy, run.cfg.train)
    rollout = train_step.random_rollout(policy, batch=2, group=2, seconds=1.0, new_tokens=3,
                                        seed=0)
    train_step.grpo_update(run, policy, reference, optimizer, rollout)
    assert rollout.ref_logp.shape == rollout.old_logp.shape == (4, 3)
    # Same weights before the update: reference and old-policy log-probs are equal.
    torch.testing.assert_close(rollout.ref_logp, rollout.old_logp)
    assert not torch.equal(policy.llm.get_input_embeddings().weight, before)
    torch.testing.assert_close(reference.llm.get_input_embeddings().weight, before)


def test_grpo_trial_keeps_clean_rows_and_reads_the_curves(tmp_path):
    trial = load("grpo_trial")
    demo = tmp_path / "demo"
    (demo / "data").mkdir(parents=True)
    rows = [{"id": "a", "domain": "clean"}, {"id": "b", "domain": "mix_noisy"},
            {"id": "c", "domain": "clean"}, {"id": "d", "domain": "mix_nonspeech"}]
    (demo / "data" / "grpo_train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    kept = trial.clean_manifest(demo)
    assert [json.loads(line)["id"] for line in kept.read_text().splitlines()] == ["a", "c"]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "train/reward_mean": -0.5, "train/kl": 0.0, "train/zero_std_share": 0.25},
        {"step": 2, "dev/wer": 0.2},
        {"step": 2, "train/reward_mean": -0.25, "train/kl": 0.01, "train/zero_std_share": 0.0}]))
    c = trial.curve(metrics, batch=16)
    assert c["train"] == [(1, 16, -0.5, 0.0, 0.25), (2, 32, -0.25, 0.01, 0.0)]
    assert c["dev"] == [(2, 32, 0.2)]


def test_phase_memory_counts_what_is_allocated():
    phase_memory = load("phase_memory")

    def work() -> None:
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(1_000_000)  # 8 MB in use
        del a
        c = torch.ones(2_000_000)  # 4 + 8 = 12 MB at the peak
        del b, c

    kept = torch.ones(3_000_000)  # allocated before: not part of the phase's peak
    assert phase_memory.allocated_peak(work, torch.device("cpu")) == 12_000_000
    assert kept.numel() == 3_000_000


def test_phase_memory_table(tmp_path, capsys):
    phase_memory = load("phase_memory")
    rows = phase_memory.main(["--preset", "tiny", "--vocab", "400", "--batch", "2", "--group",
                              "3", "--prompt-tokens", "40", "--new-tokens", "4", "--threads",
                              "1"])
    (r,) = rows
    assert (r["B"], r["G"], r["T"]) == (2, 3, 4) and r["L"] >= 40
    for key in ("rollout", "ref_full", "ref_shared", "update_full", "update_shared"):
        assert r[key] > 0, key
    # The full path holds B*G copies of the prompt's activations, the shared one B.
    assert r["ref_full"] > r["ref_shared"] and r["update_full"] > r["update_shared"]
    assert "| tiny " in capsys.readouterr().out


def test_phase_memory_ragged_candidates_cost_only_their_real_tokens(capsys):
    # With a vocabulary large enough that the logits dominate the reference pass, candidates
    # of 1 to T tokens take about their real tokens' share of its memory: the GRPO passes
    # compute no logits at padded positions (SpeechLLM.forward's packed). (At this size the
    # update's peak is mostly the parameters' gradients, 20,000 x 256 tied embeddings.)
    phase_memory = load("phase_memory")
    mask = phase_memory.ragged_mask(6, 8, seed=0)
    assert mask[0].all() and mask[:, 0].all()
    assert not (mask[:, 1:] & ~mask[:, :-1]).any()  # right-padded
    common = ["--preset", "tiny", "--vocab", "20000", "--batch", "2", "--group", "3",
              "--prompt-tokens", "40", "--new-tokens", "8", "--threads", "1"]
    (full,) = phase_memory.main(common)
    (ragged,) = phase_memory.main([*common, "--ragged"])
    share = phase_memory.ragged_mask(6, 8, seed=0).float().mean().item()
    assert share < 0.8
    assert ragged["ref_shared"] < (share + 0.1) * full["ref_shared"]
    assert ragged["ref_full"] < 0.9 * full["ref_full"]
    assert ragged["update_shared"] < full["update_shared"]
    assert "Candidates ragged" in capsys.readouterr().out


def test_best_of_group_picks_and_totals_by_hand():
    best = load("best_of_group")
    texts = ["a b", "c", "a b c", "d"]
    # best reward -0.5 at 0 and 2: fewer words wins (0); fewest words (1) at 1 and 3: the better
    # reward wins (3)
    assert best.choose(texts, [-0.5, -1.0, -0.5, -0.8], texts) == \
        {"sample": 0, "best of G": 0, "fewest words": 3}
    from speechrl.metrics import error_counts

    # "a b c" -> "a x c d": 1 substitution, 1 insertion; "d e" -> "": 2 deletions; 5 words
    per, _ = error_counts(["a b c", "d e"], ["a x c d", ""])
    assert best.totals(per) == {"wer": 80.0, "ins": 20.0, "del": 40.0, "sub": 20.0}


def test_best_of_group_oracles_bound_the_first_sample(tiny_model, tone_corpus):
    from speechrl.config import DecodingConfig, GRPOConfig, RunConfig, TrainConfig
    from speechrl.rewards import build_reward
    from speechrl.train.grpo import StepSettings, resolve_algorithm

    best = load("best_of_group")
    cfg = RunConfig(train=TrainConfig(precision="fp32", device="cpu"),
                    decoding=DecodingConfig(max_new_tokens=12),
                    grpo=resolve_algorithm(GRPOConfig(group_size=3)))
    settings = StepSettings.of(cfg, torch.device("cpu"))
    f = best.measure_set(settings, tiny_model.eval(), str(tone_corpus["dev"]),
                         build_reward("wer"), seed=0, batch_size=4)
    assert set(f) == set(best.CHOICES)
    # Per utterance the best of G has no more errors than the first sample (same reference),
    # and the shortest candidate no more words: so over the set too.
    assert f["best of G"]["wer"] <= f["sample"]["wer"] + 1e-9
    assert f["fewest words"]["words"] <= f["sample"]["words"] + 1e-9
    assert f["fewest words"]["words"] <= f["best of G"]["words"] + 1e-9
    assert all(math.isfinite(f[c]["wer"]) and f[c]["wer"] > 0 for c in best.CHOICES)
