"""Many processes: two-rank runs under torchrun (gloo on CPU) that must take the updates of one
process with the same global batch, to float rounding: the same loss and gradient norm at every
step (three steps for SFT and the pre-training stages, so that the data each rank takes from
step 2 on counts), the same optimizer moments, the same weights. The helpers of
speechrl.distributed on one process are tested in tests/test_distributed_helpers.py.

The two-rank runs go through the command line the way a user launches them
(``torchrun --nproc_per_node 2 ...``): this file is also the script torchrun starts (see the end
of the file), which runs several ``speechrl`` commands in one launch to pay the start-up once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from speechrl import distributed
from speechrl.config import DecodingConfig, GRPOConfig, ModelConfig, RunConfig
from speechrl.configio import to_dict

# --------------------------------------------------------------------------- two processes


def length_gap(hyps: list[str], refs: list[str]) -> list[float]:
    """A reward for the random test model: minus the gap in characters to the reference."""
    return [-abs(len(h) - len(r)) / max(len(r), 1) for h, r in zip(hyps, refs, strict=True)]


def write_config(cfg: RunConfig, path: Path) -> str:
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return str(path)


def cli(argv: list[str]) -> None:
    from speechrl.cli import build_parser, run_command

    assert run_command(build_parser().parse_args(argv)) == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tone_corpus, tiny_model_config_module) -> dict[str, Path]:
    """The same jobs run by one process here and by two under torchrun: three SFT steps (DDP and
    FSDP2) ending with a dev evaluation, three steps of each pre-training stage, one GRPO step
    (the GRPO preset; DAPO's token mean with batch-std advantages), and an evaluation. The two
    ranks also run two FSDP2 SFT steps alone (``sft-fsdp-stopped``), which one process
    resumes."""
    import dataclasses

    from test_train import run_config
    from tones import write_tone_corpus

    root = tmp_path_factory.mktemp("dist")
    corpus = {**tone_corpus,
              # Over 120 s of audio: three eval batches of up to 60 s; rank 0 decodes the
              # first and the third, which must come back in order around the second.
              "test": write_tone_corpus(root / "test", 170, seed=2)}
    out = {name: root / name for name in ("one", "two")}

    def sft(where: Path, **train) -> RunConfig:
        cfg = run_config(where, corpus, tiny_model_config_module, max_steps=3, batch_size=4,
                         lr=1e-3, warmup_steps=0, eval_every=3, save_every=1, **train)
        # Dev batches of ~2.5 s: several, so that both ranks decode some.
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_duration=2.5))

    sft_last = out["one"] / "sft" / "run" / "last"
    # GRPO starts from a random model, whose candidates are junk of a few words: WER alone
    # would be -1 for all; length_gap tells them apart, so every group has a learning signal.
    from speechrl.checkpoint import save_checkpoint
    from speechrl.model import SpeechLLM
    from speechrl.tokenizer import SpeechTokenizer

    torch.manual_seed(0)
    init = save_checkpoint(SpeechLLM.from_config(
        tiny_model_config_module,
        SpeechTokenizer.from_pretrained(tiny_model_config_module.tokenizer)), root / "init")

    def grpo(where: Path, **options) -> RunConfig:
        cfg = run_config(where, corpus, tiny_model_config_module, init=str(init), max_steps=1,
                         batch_size=4, lr=1e-3, warmup_steps=0, eval_every=1000, save_every=1)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dev=()),
                                   decoding=DecodingConfig(max_new_tokens=8),
                                   grpo=GRPOConfig(group_size=4, **options))

    def stages(base: Path) -> dict[str, tuple[str, RunConfig]]:
        return {
            "sft": ("sft", sft(base / "sft")),
            "grpo": ("grpo", grpo(base / "grpo", reward="wer+test_distributed:length_gap")),
            # The per-candidate path FSDP2 falls back to, on one process (not run on two).
            "grpo-full": ("grpo", grpo(base / "grpo-full", shared_prompt=False,
                                       reward="wer+test_distributed:length_gap")),
            "dapo": ("grpo", grpo(base / "dapo", algorithm="dapo", dynamic_sampling=False,
                                  scale="batch", reward="ed+0.5*test_distributed:length_gap")),
            # Exact match never rewards a random model: every group is uninformative, so
            # dynamic sampling runs all its refill rounds, on every rank alike.
            "dyn": ("grpo", grpo(base / "dyn", algorithm="dapo", reward="em",
                                 max_refill_rounds=2)),
            "lm": ("pretrain-lm", run_config(base / "lm", corpus, ModelConfig(), max_steps=3,
                                             batch_size=8, lr=1e-3, warmup_steps=0,
                                             eval_every=3, save_every=1)),
            "ctc": ("pretrain-encoder", dataclasses.replace(
                sft(base / "ctc"), model=ModelConfig(encoder=tiny_model_config_module.encoder))),
        }

    def commands(base: Path, fsdp: bool) -> list[list[str]]:
        """Each stage (and with ``fsdp`` its FSDP2 twin, in ``<name>-fsdp``), then eval."""
        base.mkdir(parents=True, exist_ok=True)
        jobs = []
        for name, (command, cfg) in stages(base).items():
            if fsdp and name == "grpo-full":
                continue
            jobs.append([command, "--config", write_config(cfg, base / f"{name}.yaml")])
            if fsdp and name in ("sft", "grpo", "lm", "ctc"):
                train = dataclasses.replace(cfg.train, parallel="fsdp2",
                                            output_dir=str(base / f"{name}-fsdp" / "run"))
                jobs.append([command, "--config", write_config(
                    dataclasses.replace(cfg, train=train), base / f"{name}-fsdp.yaml")])
            if fsdp and name == "sft":  # stopped after 2 of the 3 steps, for a resume
                train = dataclasses.replace(cfg.train, parallel="fsdp2", max_steps=2,
                                            output_dir=str(base / "sft-fsdp-stopped" / "run"))
                jobs.append([command, "--config", write_config(dataclasses.replace(
                    cfg, train=train, data=dataclasses.replace(cfg.data, dev=())),
                    base / "sft-fsdp-stopped.yaml")])
        jobs.append(["eval", "--checkpoint", f"sft={sft_last}", "--checkpoint", f"init={init}",
                     "--data", f"dev={corpus['dev']}", "--data", f"test={corpus['test']}",
                     "--out", str(base / "eval")])
        return jobs

    for argv in commands(out["one"], fsdp=False):
        cli(argv)
    spec = out["two"] / "jobs.json"
    spec.write_text(json.dumps(commands(out["two"], fsdp=True)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node", "2", __file__, str(spec)]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    (out["two"] / "stdout.txt").write_text(done.stdout)
    (out["two"] / "stderr.txt").write_text(done.stderr)
    return out


def metrics(run: Path) -> dict[str, float]:
    """The last value of each metric."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {k: v for row in rows for k, v in row.items() if k not in ("step", "time")}


def assert_same_steps(one: Path, two: Path, keys: list[str], steps: int) -> None:
    """Each metric of ``keys`` with the same values (rel 1e-5) at each of the ``steps`` steps
    (dev metrics: once, at the end)."""
    from test_train import logged

    for key in keys:
        a, b = logged(one, key), logged(two, key)
        assert len(a) == (steps if key.startswith("train/") else 1), key  # dev: at the end
        assert b == pytest.approx(a, rel=1e-5), key


def assert_same_moments(one: Path, two: Path) -> None:
    """The optimizer's moments after the steps: Adam's running mean and mean square of every
    parameter's gradient, so the gradients agree parameter by parameter, not just in norm.
    (A one-process or DDP run keeps them whole in optimizer.pt; under FSDP2 they are shards.)"""
    a = torch.load(one / "last" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    b = torch.load(two / "last" / "optimizer.pt", weights_only=False)["optimizer"]["state"]
    assert a.keys() == b.keys() and a
    for index in a:
        assert torch.equal(a[index]["step"], b[index]["step"])
        for moment in ("exp_avg", "exp_avg_sq"):
            scale = a[index][moment].abs().max().item()
            torch.testing.assert_close(b[index][moment], a[index][moment], rtol=1e-3,
                                       atol=1e-4 * scale, msg=f"{index} {moment}")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal to float noise. Each Adam step moves a weight by up to about lr = 1e-3; where a
    gradient is near Adam's eps (1e-8), the noise of summing it in another order is amplified,
    so the bound is 1% of a step."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)


def assert_same_update(one: Path, two: Path, before: Path) -> None:
    """The two runs moved the weights away from ``before`` in the same way."""
    start, a = load_file(str(before / "model.safetensors")), weights(one)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 5e-4  # a real update, not two copies of the initial weights
    assert_same_weights(a, weights(two))


PARALLEL = {"ddp": "", "fsdp2": "-fsdp"}  # where the two-rank run of each kind wrote


@pytest.mark.parametrize("parallel", PARALLEL)
def test_sft_takes_the_one_process_update(runs, parallel):
    one, two = runs["one"] / "sft" / "run", runs["two"] / f"sft{PARALLEL[parallel]}" / "run"
    m1, m2 = metrics(one), metrics(two)
    # At each step the loss is the mean over the global batch's tokens and the gradient is the
    # same one: the ranks took the global batch's halves, step after step.
    assert_same_steps(one, two, ["train/loss", "train/grad_norm", "train/tokens", "dev/loss"],
                      steps=3)
    if parallel == "ddp":
        assert_same_moments(one, two)
    # Dev WER over the gathered hypotheses of both ranks, on all 8 dev utterances.
    assert (m2["dev/wer"], m2["dev/utterances"]) == (m1["dev/wer"], m1["dev/utterances"]) and \
        m1["dev/utterances"] == 8
    assert (two / "best" / "model.safetensors").is_file()  # kept by dev WER, written once
    # FSDP2: the full weights gathered from the shards, in the one-process layout.
    assert_same_weights(weights(one), weights(two))
    # Only rank 0 wrote: one metrics file, one line per metric row.
    assert len((two / "metrics.jsonl").read_text().splitlines()) == \
        len((one / "metrics.jsonl").read_text().splitlines())
    # FSDP2 keeps the optimizer moments sharded, in a torch.distributed.checkpoint folder.
    shards = two / "last" / "optimizer_shards" / ".metadata"
    assert shards.is_file() == (parallel == "fsdp2")


@pytest.mark.parametrize("name, parallel", [("grpo", "ddp"), ("dapo", "ddp"),
                                            ("grpo", "fsdp2")])
def test_grpo_takes_the_one_process_update(runs, name, parallel):
    one, two = runs["one"] / name / "run", runs["two"] / f"{name}{PARALLEL[parallel]}" / "run"
    m1, m2 = metrics(one), metrics(two)
    # The same candidates were sampled (per-audio generators), so the same rewards ...
    assert m1["train/reward_std"] > 0  # the groups carry a learning signal
    for key in ("train/reward_mean", "train/reward_std", "train/candidate_len"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-6), key
    # ... and the loss normalised by the counts over both ranks is the one-process loss.
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/entropy"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7), key
    # FSDP2 takes the per-candidate pass: its weights are held against that pass on one process.
    # The shared and per-candidate gradients agree to 1e-5 before the optimizer
    # (tests/test_shared_prompt.py), but a first Adam step turns a gradient within a few eps of
    # 0 into a fraction of lr that float rounding moves (0.32 against 0.30 lr, once, seen).
    reference = runs["one"] / ("grpo-full" if parallel == "fsdp2" else name) / "run"
    assert_same_update(reference, two, runs["one"].parent / "init")


def test_grpo_under_fsdp2_falls_back_to_the_per_candidate_pass(runs):
    """FSDP2 is not checked with the shared prompt pass (train/grpo.py shared_prompt_choice):
    the two ranks run every candidate's own prompt, say so once, and take the update of one
    process with grpo.shared_prompt=false."""
    jobs = json.loads((runs["two"] / "jobs.json").read_text())
    fsdp = next(i for i, argv in enumerate(jobs) if argv[-1].endswith("grpo-fsdp.yaml"))
    ddp = next(i for i, argv in enumerate(jobs) if argv[-1].endswith("/grpo.yaml"))
    for rank in (0, 1):
        seen = json.loads((runs["two"] / f"forwards.{rank}.json").read_text())
        # Every forward of the log-prob passes and the update, on both ranks, per candidate;
        # the DDP job of the same launch kept the shared pass.
        assert seen[str(fsdp)] == [False] and seen[str(ddp)] == [True], (rank, seen)
    said = (runs["two"] / "stderr.txt").read_text().count(
        "grpo: FSDP2 sharding: the prompt runs once per candidate (grpo.shared_prompt off)")
    assert said == 1  # once, by rank 0, for the one FSDP2 GRPO job
    one, two = runs["one"] / "grpo-full" / "run", runs["two"] / "grpo-fsdp" / "run"
    m1, m2 = metrics(one), metrics(two)
    assert all(np.isfinite(m2[k]) for k in ("train/loss", "train/grad_norm", "train/kl"))
    # The same candidates, hence the same rewards, to the bit ...
    for key in ("train/reward_mean", "train/reward_std", "train/candidate_len"):
        assert m2[key] == m1[key], key
    # ... and the same loss and gradient as one process on the per-candidate path, to float
    # rounding only: the ranks hold half the batch each (other padding, other sums).
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/entropy", "train/logp_gap"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    assert_same_update(one, two, runs["one"].parent / "init")


def test_dynamic_sampling_keeps_the_ranks_in_step(runs):
    one, two = runs["one"] / "dyn" / "run", runs["two"] / "dyn" / "run"
    m1, m2 = metrics(one), metrics(two)
    # The first batch and 2 refill batches, all uninformative: the same global batches drawn
    # by one process and by the two ranks together (the third is a bucket's tail of 2).
    assert (m1["train/audios_drawn"], m1["train/zero_std_share"]) == (4 + 4 + 2, 1.0)
    for key in ("train/audios_drawn", "train/zero_std_share", "train/audios"):
        assert m2[key] == m1[key], key
    assert_same_weights(weights(one), weights(two))


@pytest.mark.parametrize("parallel", PARALLEL)
@pytest.mark.parametrize("stage", ["lm", "ctc"])
def test_pretraining_takes_the_one_process_update(runs, stage, parallel):
    one, two = runs["one"] / stage / "run", runs["two"] / f"{stage}{PARALLEL[parallel]}" / "run"
    keys = ["train/loss", "train/grad_norm", "dev/loss"] + (["dev/cer"] if stage == "ctc" else [])
    assert_same_steps(one, two, keys, steps=3)
    if parallel == "ddp":
        assert_same_moments(one, two)
    assert_same_weights(weights(one), weights(two))
    # What later stages load: the LM as a Hugging Face folder (tied head stored once), the
    # encoder alone.
    product = "model" if stage == "lm" else "encoder"
    assert_same_weights(load_file(str(one / product / "model.safetensors")),
                        load_file(str(two / product / "model.safetensors")))


def test_eval_under_two_processes_writes_the_one_process_report(runs):
    one, two = runs["one"] / "eval", runs["two"] / "eval"

    def text(path: Path, base: Path) -> str:
        return path.read_text().replace(str(base), "OUT")

    assert text(two / "report.json", two) == text(one / "report.json", one)
    assert text(two / "report.md", two) == text(one / "report.md", one)
    hyps = sorted(p.name for p in (one / "hyps").iterdir())
    assert hyps == sorted(p.name for p in (two / "hyps").iterdir()) and len(hyps) == 4
    for name in hyps:
        # The same hypotheses in the same order (longest first, as one process decodes).
        assert (two / "hyps" / name).read_text() == (one / "hyps" / name).read_text()
    assert len((one / "hyps" / "sft.test.jsonl").read_text().splitlines()) == 170
    # Rank 0 printed the closing line, rank 1 did not.
    assert (runs["two"] / "stdout.txt").read_text().count("eval done:") == 1


def test_fsdp2_checkpoint_resumes_in_one_process(runs):
    """Two FSDP2 ranks stopped after step 2 of 3 (optimizer in shards); one process resumes
    them to step 3 and ends where one process running the three steps uninterrupted ends (to
    float rounding: the two ranks summed the gradients in another order)."""
    import dataclasses

    from speechrl.config import load_run_config
    from speechrl.train.sft import train_sft

    resumed = runs["one"].parent / "resume" / "run"
    shutil.copytree(runs["two"] / "sft-fsdp-stopped" / "run", resumed)
    assert json.loads((resumed / "last" / "trainer_state.json").read_text())["step"] == 2
    cfg = load_run_config(str(runs["two"] / "sft-fsdp-stopped.yaml"))
    train = dataclasses.replace(cfg.train, output_dir=str(resumed), max_steps=3, parallel="ddp")
    # The sampler notes that it was saved by 2 ranks (the global batches are the same).
    with pytest.warns(UserWarning, match="world size"):
        train_sft(dataclasses.replace(cfg, train=train))
    straight = runs["one"] / "sft" / "run"
    assert logged_steps(resumed) == [1, 2, 3]
    assert_same_steps(straight, resumed, ["train/loss", "train/grad_norm"], steps=3)
    assert_same_moments(straight, resumed)
    assert_same_weights(weights(straight), weights(resumed))


def logged_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


# --------------------------------------------------------------------------- torchrun worker


def worker(spec: str) -> None:
    """Run each ``speechrl`` command of the JSON list ``spec`` on this rank, then leave the
    process group once (as ``speechrl.cli.main`` does after its one command)."""
    from speechrl.cli import build_parser, run_command
    from speechrl.model import SpeechLLM

    # The shared_prompt flag of every SpeechLLM.forward (log-prob passes and updates) by job,
    # for test_grpo_under_fsdp2_falls_back_to_the_per_candidate_pass.
    seen: dict[int, set[bool]] = {}
    job = [0]
    real = SpeechLLM.forward

    def forward(self, *args, **kwargs):
        seen.setdefault(job[0], set()).add(bool(kwargs.get("shared_prompt", False)))
        return real(self, *args, **kwargs)

    SpeechLLM.forward = forward
    try:
        for job[0], argv in enumerate(json.loads(Path(spec).read_text())):
            run_command(build_parser().parse_args(argv))
    except BaseException:
        distributed.teardown()
        raise
    record = Path(spec).parent / f"forwards.{distributed.rank()}.json"
    record.write_text(json.dumps({i: sorted(flags) for i, flags in seen.items()}))
    distributed.teardown(synchronize=True)


if __name__ == "__main__":
    worker(sys.argv[1])
