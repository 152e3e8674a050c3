"""GRPO's trial: variants of the demo's GRPO stage, each from the SFT model of one finished demo
run, evaluated against that SFT model with paired bootstrap intervals.

A variant is the demo's own GRPO stage (``speechrl.demo.stage_overrides``: ``grpo_train``, batch,
lr, steps of the full scale) plus the overrides given after ``--``, written to
``<demo>/trial/<name>``. ``report`` decodes every variant named on the sets named and prints,
for each, its training curve (reward, KL, all-equal groups, dev WER against audios seen) and
its change against SFT on each set with the interval::

    python benchmarks/grpo_trial.py train --demo runs/demo --name base --precision fp32
    python benchmarks/grpo_trial.py train --demo runs/demo --name beam --precision fp32 \\
        -- grpo.strategy=beam
    python benchmarks/grpo_trial.py report --demo runs/demo --names base,beam --precision fp32

``--clean`` trains on the clean rows of ``grpo_train`` only (the degraded and no-speech clips
left out). docs/results.md reports the trial these commands ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speechrl.config import load_run_config
from speechrl.demo import EVAL_SETS, FULL, QUICK, stage_overrides

FIGURES = ("wer_pct", "ins_pct", "del_pct", "words_per_clip", "output_pct")
DEFAULT_SETS = ("test", "ood_noisy", "ood_farfield", "ood_overlap", "ood_nonspeech")


def clean_manifest(demo: Path) -> Path:
    """``grpo_train`` without its degraded and no-speech rows (synth writes each row's domain)."""
    src = demo / "data" / "grpo_train.jsonl"
    dst = demo / "data" / "grpo_train_clean.jsonl"  # audio paths are relative to it
    if not dst.exists():
        rows = [line for line in src.read_text().splitlines()
                if json.loads(line).get("domain", "clean") == "clean"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("\n".join(rows) + "\n")
    return dst


def train(args, extra: list[str]) -> None:
    from speechrl.train.grpo import train_grpo

    scale = QUICK if args.quick else FULL
    base = stage_overrides(args.demo, scale, args.precision)[args.stage]
    overrides = list(base)
    if args.clean:
        overrides.append(f"data.train=[{clean_manifest(args.demo)}]")
    overrides += [f"train.output_dir={args.demo}/trial/{args.name}", f"train.seed={args.seed}",
                  *extra]
    cfg = load_run_config("tiny", overrides, stage="grpo")
    (args.demo / "trial").mkdir(parents=True, exist_ok=True)
    (args.demo / "trial" / f"{args.name}.overrides.json").write_text(
        json.dumps(overrides[len(base):]))
    train_grpo(cfg)


def curve(metrics: Path, batch: int) -> dict[str, list]:
    """Reward, KL and all-equal share per logged step, dev WER per evaluation."""
    out: dict[str, list] = {"train": [], "dev": []}
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "train/reward_mean" in row:
            out["train"].append((row["step"], row["step"] * batch, row["train/reward_mean"],
                                 row.get("train/kl"), row.get("train/zero_std_share")))
        if "dev/wer" in row:
            out["dev"].append((row["step"], row["step"] * batch, row["dev/wer"]))
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def _value(entry: dict, figure: str) -> float | None:
    """A set's figure as the report states it (hallucination shares as percentages)."""
    hall = entry["hallucination"] or {}
    if figure == "words_per_clip":
        return hall.get("words_per_clip")
    if figure == "output_pct":
        return None if hall.get("output_share") is None else 100 * hall["output_share"]
    return entry["overall"].get(figure)


def report(args) -> None:
    from speechrl.evaluate import evaluate_checkpoints

    names = args.names.split(",")
    trial = args.demo / "trial"
    base_name, _, base_path = args.baseline.partition("=")
    checkpoints = {base_name: Path(base_path or args.demo / "checkpoints" / base_name)}
    for name in names:
        folder = trial / name
        checkpoints[name] = folder / ("best" if (folder / "best").exists() else "last")
    sets = {s: args.demo / "data" / f"{s}.jsonl" for s in args.sets.split(",")}
    out = trial / (args.out or "eval")
    if not (out / "report.json").exists() or args.again:
        evaluate_checkpoints(checkpoints, sets, out, normalizer="whisper",
                             precision=args.precision, title="speechrl GRPO trial")
    summary = json.loads((out / "report.json").read_text())
    results = summary["results"]
    lines = []
    for name in names:
        extra = trial / f"{name}.overrides.json"
        cfg = json.loads((trial / name / "grpo_config.json").read_text())
        batch = cfg["train"]["batch_size"]
        c = curve(trial / name / "metrics.jsonl", batch)
        rewards = [r[2] for r in c["train"]]
        quarter = max(len(rewards) // 4, 1)
        lines.append(f"## {name}: {extra.read_text() if extra.exists() else ''}")
        lines.append(f"reward first/last quarter {_mean(rewards[:quarter]):.3f} -> "
                     f"{_mean(rewards[-quarter:]):.3f}; KL end {c['train'][-1][3]:.3f}; "
                     f"all-equal {_mean([r[4] for r in c['train']]):.3f}; dev WER "
                     + ", ".join(f"{a} audios {w:.2f}" for _, a, w in c["dev"]))
        for set_name in sets:
            row = results[name][set_name]["overall"]
            parts = []
            for fig in FIGURES:
                ch = (row.get("change") or {}).get(fig)
                if not ch or ch.get("delta") is None:
                    continue
                ref = _value(results[base_name][set_name], fig)
                now = _value(results[name][set_name], fig)
                parts.append(f"{fig} {ref if ref is None else round(ref, 2)}->"
                             f"{now if now is None else round(now, 2)} "
                             f"{ch['delta']:+.2f} [{ch['low']:+.2f},{ch['high']:+.2f}]")
            lines.append(f"  {set_name}: " + "; ".join(parts))
    text = "\n".join(lines)
    (out / "trial.txt").write_text(text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("train", "report"))
    p.add_argument("--demo", type=Path, required=True, help="a finished demo's output folder")
    p.add_argument("--name", help="the variant's folder under <demo>/trial (train)")
    p.add_argument("--names", help="variants to evaluate, comma-separated (report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage", default="grpo", choices=("grpo", "adapt_grpo"),
                   help="the demo stage the variant changes (adapt_grpo: the adaptation run)")
    p.add_argument("--baseline", default="sft",
                   help="NAME or NAME=PATH of the checkpoint the changes are against "
                        "(default: the demo's checkpoints/sft)")
    p.add_argument("--clean", action="store_true", help="clean rows of grpo_train only")
    p.add_argument("--quick", action="store_true", help="the quick demo's scale")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16"))
    p.add_argument("--sets", default=",".join(DEFAULT_SETS),
                   help=f"sets to decode, comma-separated, among {', '.join(EVAL_SETS)}")
    p.add_argument("--out", help="report folder under <demo>/trial (default: eval)")
    p.add_argument("--again", action="store_true", help="decode again over an existing report")
    args = p.parse_args(argv)
    if args.command == "train":
        if not args.name:
            p.error("train needs --name")
        train(args, extra)
    else:
        if not args.names:
            p.error("report needs --names")
        report(args)


if __name__ == "__main__":
    main()
