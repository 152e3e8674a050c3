"""The ``speechrl`` command.

    speechrl synth   --out DIR [--langs en,fr,de,it,es] [--utts N] [--eval-utts N] [--seed S]
    speechrl pretrain-lm      --config C [key=value ...]
    speechrl pretrain-encoder --config C [key=value ...]
    speechrl sft     --config C [key=value ...]
    speechrl grpo    --config C [key=value ...]
    speechrl eval    --checkpoint CKPT [--checkpoint CKPT2 ...] --data MANIFEST [...] --out DIR
                     [--pool NAME=CKPT2,CKPT3]
    speechrl transcribe --checkpoint CKPT FILE.wav [...]
    speechrl demo    [--out DIR] [--quick]

Stage modules are imported only when their command runs, so ``speechrl --help`` stays fast, and
a mistake in the command or the config is reported before torch is even imported.
The training stages and ``eval`` also run under ``torchrun --nproc_per_node N -m speechrl.cli``
(or ``torchrun ... $(which speechrl)``): every rank runs the command on its share of the data.

A mistake ends in one line on stderr that says what to do, never a traceback. Exit status:

    0        done
    1        something the command names is missing or unusable (a manifest, a checkpoint, an
             audio file, a preset's paths, a device), or the run stopped on non-finite steps
    2        the command line or the config is wrong (argparse's convention): an unknown
             option or key, a value of the wrong type or outside its allowed values, settings
             that differ from those of the run being resumed
    128 + N  stopped by signal N (143: SIGTERM, 130: SIGINT) after saving a checkpoint; the
             same command resumes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import textwrap
from collections.abc import Iterator, Sequence

from speechrl.config import STAGES, ConfigError
from speechrl.configio import presets

EXIT_CODES = ("Exit status: 0 done; 1 an input is missing or unusable; 2 a mistake in the "
              "command or the config; 128+N stopped by signal N (143 for SIGTERM) after saving "
              "a checkpoint: the same command resumes.")

STAGE_HELP = {
    "pretrain-lm": (
        "text-only LM pre-training (paper eq. 1)",
        "Pre-train the LLM preset (model.llm.preset) with next-token loss on the training "
        "manifests' text (and lm.text files), with a BPE tokenizer trained for it: for when no "
        "pretrained LLM is at hand. Writes OUTPUT_DIR/model, a Hugging Face folder the later "
        "stages take as model.llm.path and model.tokenizer."),
    "pretrain-encoder": (
        "CTC pre-training of the built-in Conformer encoder",
        "Train the built-in Conformer encoder from scratch with a CTC head over the "
        "transcripts' characters. Writes OUTPUT_DIR/encoder, which SFT and GRPO load frozen as "
        "model.encoder.path."),
    "sft": (
        "supervised fine-tuning of the speech-LLM (paper eq. 2)",
        "Train the projector and the LLM (or its LoRA adapters) on the transcript tokens, the "
        "encoder frozen. Measures dev loss and greedy dev WER every train.eval_every steps and "
        "keeps the best model in OUTPUT_DIR/best."),
    "grpo": (
        "GRPO / DAPO / Dr. GRPO fine-tuning (paper eq. 3-9)",
        "Fine-tune an SFT checkpoint (train.init) with group-relative policy optimisation on a "
        "rule-based reward (grpo.reward: wer, em, ed, a weighted sum, or module:function); "
        "grpo.algorithm=grpo|dapo|dr_grpo picks the switches. Keeps the best model by dev WER "
        "in OUTPUT_DIR/best."),
}
STAGE_EPILOG = (
    "The preset sets every option and key=value overrides change any of them (train.lr=1e-4 "
    "data.train=[a.jsonl,b.jsonl]); the tiny preset reads and writes runs/tiny/... relative to "
    "the current folder, as configs/tiny.yaml lists. Every stage keeps a resumable checkpoint "
    "in OUTPUT_DIR/last (OUTPUT_DIR is train.output_dir): running the same command again "
    "resumes from it, with the same settings (how long it runs and how often it evaluates, "
    "saves and logs may change).")


def _paragraphs(*texts: str) -> str:
    """Help text kept in paragraphs (argparse would run them together)."""
    return "\n\n".join(textwrap.fill(text, 88) for text in texts)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (what is wrong, and where the usage is) and its
    descriptions kept in paragraphs."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _stage_parser(sub, name: str) -> None:
    summary, description = STAGE_HELP[name]
    p = sub.add_parser(name, help=summary,
                       description=_paragraphs(f"{summary[0].upper()}{summary[1:]}. {description}"),
                       epilog=_paragraphs(STAGE_EPILOG, EXIT_CODES))
    p.add_argument("--config", default="tiny",
                   help=f"a preset ({', '.join(presets())}) or a YAML file (default: "
                        "%(default)s, the CPU demo's scale)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of any option, e.g. train.lr=1e-4 train.output_dir=runs/x")


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options; imports nothing heavier than numpy."""
    from speechrl.evaluate import (
        add_device_argument,
        add_eval_arguments,
        add_trust_remote_code_argument,
    )
    from speechrl.synth import add_synth_arguments

    parser = Parser(prog="speechrl", epilog=_paragraphs(EXIT_CODES),
                    description="GRPO, DAPO and Dr. GRPO for LLM-based speech recognition")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=_paragraphs(description),
                              epilog=_paragraphs(EXIT_CODES))

    add_synth_arguments(command(
        "synth", "make the synthetic multilingual corpus",
        "Synthesise the multilingual corpus with espeak-ng: train, dev and test sets in "
        "domain, two out-of-domain sets and an adaptation domain, as manifests DIR/<set>.jsonl "
        "with 16 kHz FLAC audio."))
    for name in STAGES:
        _stage_parser(sub, name)

    add_eval_arguments(command(
        "eval", "decode, score and report",
        "Decode each --data set with each --checkpoint and write report.md, report.json, the "
        "hypotheses and plots into --out; the first checkpoint is the baseline of every "
        "relative WER change. Every input is checked before decoding starts."))

    p = command("transcribe", "print one transcript per audio file",
                "Print FILE<tab>transcript for each audio file. A file that cannot be read is "
                "reported and the others are still transcribed; the exit status is then 1.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder")
    p.add_argument("files", nargs="+", help="audio files (any format soundfile reads)")
    p.add_argument("--beam", type=int, default=0,
                   help="beam width; 0 decodes greedily (default: %(default)s)")
    add_device_argument(p)
    add_trust_remote_code_argument(p)

    p = command("demo", "the whole pipeline on the embedded synthetic default",
                "Synthesise the corpus, pre-train the LM and the encoder, then run SFT, GRPO, "
                "the domain-adaptation runs and the evaluation, writing OUT/report.md. A "
                "restarted demo resumes an interrupted stage and skips the finished ones.")
    p.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a much smaller corpus and few steps: a check that the pipeline runs "
                        "(WER stays near 100 %%), not a result")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="every stage's train.precision and the evaluation's (default: auto, "
                        "bf16 only on a GPU or a CPU that computes bf16 natively)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun the stage joined the process group; leave it once the command is done,
    # all ranks together when it succeeded.
    try:
        code = run_command(args)
    except BaseException:
        _teardown(synchronize=False)
        raise
    _teardown(synchronize=code == 0)
    return code


def _teardown(synchronize: bool) -> None:
    # A command that never imported speechrl.distributed never joined a process group.
    distributed = sys.modules.get("speechrl.distributed")
    if distributed is not None:
        distributed.teardown(synchronize=synchronize)


def run_command(args: argparse.Namespace) -> int:
    """Run one parsed command; under torchrun every rank runs it, rank 0 prints the result. A
    mistake or a stop ends in one line on stderr and the exit status of the module doc."""
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        _say(f"{args.command}: interrupted")
        return 128 + signal.SIGINT
    except Exception as err:
        stopped = _class("speechrl.train.stopping", "RunStopped")
        if stopped is not None and isinstance(err, stopped):  # saved and stopped on purpose
            _say(str(err))
            return err.exit_code
        code = _exit_status(err)
        if code is None:  # not a user's mistake: a bug, whose traceback helps
            raise
        _say(f"{args.command}: {err}")
        return code


# Errors that end a command with one line instead of a traceback, and its exit status. They
# are looked up among the modules already imported: an error of a module that was never
# imported cannot have been raised, and importing it (torch) only to check would be slow.
_EXPECTED = (("speechrl.config", "ConfigError", 2), ("speechrl.config", "InputError", 1),
             ("speechrl.checkpoint", "CheckpointError", 1),
             ("speechrl.manifest", "ManifestError", 1),
             ("speechrl.audio", "AudioError", 1),
             ("builtins", "FileNotFoundError", 1))  # a path given that is not there


def _class(module: str, name: str) -> type | None:
    return getattr(sys.modules.get(module), name, None)


def _exit_status(err: BaseException) -> int | None:
    for module, name, code in _EXPECTED:
        cls = _class(module, name)
        if cls is not None and isinstance(err, cls):
            return code
    return None


def _say(message: str) -> None:
    """One line on stderr, from rank 0 only (every rank meets the same mistake)."""
    if os.environ.get("RANK", "0") == "0":
        print(" ".join(message.splitlines()), file=sys.stderr, flush=True)


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command

    if command == "synth":
        _check_synth_arguments(args)
        from speechrl.synth import synth_main

        return synth_main(args) or 0

    if command in STAGES:
        from speechrl.config import load_run_config
        from speechrl.preflight import check_stage

        # Checked before any import of torch: a mistake costs a fraction of a second.
        cfg = load_run_config(args.config, args.overrides, stage=command)
        check_stage(cfg, command, source=args.config, overrides=args.overrides)
        if command == "pretrain-lm":
            from speechrl.train.lm import train_lm as run
        elif command == "pretrain-encoder":
            from speechrl.train.ctc import train_ctc as run
        elif command == "sft":
            from speechrl.train.sft import train_sft as run
        else:
            from speechrl.train.grpo import train_grpo as run
        out = run(cfg)
        if os.environ.get("RANK", "0") == "0":
            print(f"{command} done: {out}")
        return 0

    if command == "eval":
        from speechrl.evaluate import eval_main

        return eval_main(args) or 0

    if command == "transcribe":
        return _transcribe(args)

    if command == "demo":
        from speechrl.preflight import check_output_folder

        check_output_folder(args.out, "--out")
        from speechrl.demo import run_demo
        from speechrl.train.stopping import RunStopped

        try:
            with _signals_stop_the_demo():
                report = run_demo(args.out, quick=args.quick, precision=args.precision)
        except ConfigError as err:  # a stage's settings differ from those it would resume
            raise ConfigError(f"{err} (for the demo: a new --out)") from err
        except RunStopped as stopped:
            again = (f"speechrl demo --out {args.out}" + (" --quick" if args.quick else "")
                     + (f" --precision {args.precision}" if args.precision != "auto" else ""))
            raise RunStopped(f"demo: {stopped} ({again})", stopped.exit_code) from stopped
        print(f"demo done: report at {report}")
        return 0
    raise AssertionError(command)


def _check_synth_arguments(args: argparse.Namespace) -> None:
    from speechrl.preflight import check_output_folder
    from speechrl.textgen import LANGUAGES

    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if unknown or not langs:
        raise ConfigError(f"--langs {args.langs}: {', '.join(unknown) or 'no language'} not "
                          f"in the corpus; choose from {','.join(LANGUAGES)}")
    for option, value in (("--utts", args.utts), ("--eval-utts", args.eval_utts),
                          ("--test-utts", args.test_utts), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise ConfigError(f"{option} {value}: give at least 1")
    from speechrl.corpus_plan import TrainMix

    for option, value in (("--train-mix", args.train_mix), ("--grpo-mix", args.grpo_mix)):
        try:
            TrainMix.parse(value)
        except ValueError as err:
            raise ConfigError(f"{option} {value}: {err}") from None
    check_output_folder(args.out, "--out")


def _transcribe(args: argparse.Namespace) -> int:
    """Each file's transcript on stdout; a file that cannot be read is reported on stderr and
    the rest are transcribed: exit status 1 if any failed."""
    from speechrl.audio import AudioError
    from speechrl.evaluate import Transcriber

    transcriber = Transcriber(args.checkpoint, beam=args.beam, device=args.device,
                              trust_remote_code=args.trust_remote_code)
    failed = 0
    for path in args.files:
        try:
            text = transcriber(path)
        except AudioError as err:
            _say(f"transcribe: {err}")
            failed += 1
            continue
        print(f"{path}\t{text}", flush=True)
    return 1 if failed else 0


@contextlib.contextmanager
def _signals_stop_the_demo() -> Iterator[None]:
    """SIGTERM or SIGINT outside a stage's training loop (synthesis, loading, evaluation) stops
    the demo at once with a message: the finished stages, and the interrupted stage's last
    checkpoint, are kept. Inside a loop, the stage's own handler finishes the step and saves
    first (train.stopping.stop_on_signals), then hands back to this one."""
    from speechrl.train.stopping import RunStopped

    def stop(signum: int, frame) -> None:
        raise RunStopped(f"stopped by {signal.Signals(signum).name} outside a training step; "
                         "what was finished is kept. Run the same command again to resume",
                         128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
