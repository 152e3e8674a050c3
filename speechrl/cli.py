"""The ``speechrl`` command.

    speechrl synth   --out DIR [--langs en,fr,de,it,es] [--utts N] [--eval-utts N] [--seed S]
    speechrl pretrain-lm      --config C [key=value ...]
    speechrl pretrain-encoder --config C [key=value ...]
    speechrl sft     --config C [key=value ...]
    speechrl grpo    --config C [key=value ...]
    speechrl eval    --checkpoint CKPT [--checkpoint CKPT2 ...] --data MANIFEST [...] --out DIR
    speechrl transcribe --checkpoint CKPT FILE.wav [...]
    speechrl demo    [--out DIR] [--quick]

Stage modules are imported only when their command runs, so ``speechrl --help`` stays fast.
The training stages and ``eval`` also run under ``torchrun --nproc_per_node N -m speechrl.cli``
(or ``torchrun ... $(which speechrl)``): every rank runs the command on its share of the data.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_stage(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", default="tiny", help="preset name (configs/*.yaml) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechrl", description="GRPO, DAPO and Dr. GRPO for LLM-based speech recognition"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from speechrl.synth import add_synth_arguments

    add_synth_arguments(sub.add_parser("synth", help="make the synthetic multilingual corpus"))
    _add_stage(sub, "pretrain-lm", "text-only LM pre-training (paper eq. 1)")
    _add_stage(sub, "pretrain-encoder", "CTC pre-training of the built-in Conformer encoder")
    _add_stage(sub, "sft", "supervised fine-tuning of the speech-LLM (paper eq. 2)")
    _add_stage(sub, "grpo", "GRPO / DAPO / Dr. GRPO fine-tuning (paper eq. 3-9)")

    from speechrl.evaluate import add_eval_arguments, add_trust_remote_code_argument

    add_eval_arguments(sub.add_parser("eval", help="decode, score and report"))

    p = sub.add_parser("transcribe", help="print one transcript per audio file")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("files", nargs="+")
    p.add_argument("--beam", type=int, default=0, help="beam width; 0 decodes greedily")
    p.add_argument("--device", default="auto")
    add_trust_remote_code_argument(p)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic default")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much smaller corpus, for a first look")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="every stage's train.precision and the evaluation's (default: auto, "
                        "bf16 only on a GPU or a CPU that computes bf16 natively)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from speechrl import distributed

    # Under torchrun the stage joined the process group; leave it once the command is done,
    # all ranks together when it succeeded.
    try:
        code = run_command(args)
    except BaseException:
        distributed.teardown()
        raise
    distributed.teardown(synchronize=code == 0)
    return code


def run_command(args: argparse.Namespace) -> int:
    """Run one parsed command; under torchrun every rank runs it, rank 0 prints the result."""
    from speechrl.distributed import is_main

    command = args.command

    if command == "synth":
        from speechrl.synth import synth_main

        return synth_main(args) or 0

    if command in ("pretrain-lm", "pretrain-encoder", "sft", "grpo"):
        from speechrl.config import load_run_config

        cfg = load_run_config(args.config, args.overrides, stage=command)
        if command == "pretrain-lm":
            from speechrl.train.lm import train_lm as run
        elif command == "pretrain-encoder":
            from speechrl.train.ctc import train_ctc as run
        elif command == "sft":
            from speechrl.train.sft import train_sft as run
        else:
            from speechrl.train.grpo import train_grpo as run
        from speechrl.checkpoint import CheckpointError
        from speechrl.train.common import RunStopped

        try:
            out = run(cfg)
        except RunStopped as stopped:  # saved and stopped on purpose: say why, no stack trace
            if is_main():
                print(str(stopped), file=sys.stderr, flush=True)
            return stopped.exit_code
        except CheckpointError as err:  # e.g. disk full: the message says what was kept
            print(f"{command}: {err}", file=sys.stderr, flush=True)
            return 1
        if is_main():
            print(f"{command} done: {out}")
        return 0

    if command == "eval":
        from speechrl.evaluate import eval_main

        return eval_main(args) or 0

    if command == "transcribe":
        from speechrl.audio import AudioError
        from speechrl.checkpoint import CheckpointError
        from speechrl.evaluate import transcribe_files

        try:
            for path, text in transcribe_files(args.checkpoint, args.files, beam=args.beam,
                                               device=args.device,
                                               trust_remote_code=args.trust_remote_code):
                print(f"{path}\t{text}", flush=True)
        except (CheckpointError, AudioError) as err:  # a message, not a stack trace
            print(f"transcribe: {err}", file=sys.stderr, flush=True)
            return 1
        return 0

    if command == "demo":
        from speechrl.demo import run_demo

        report = run_demo(args.out, quick=args.quick, precision=args.precision)
        print(f"demo done: report at {report}")
        return 0
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main())
