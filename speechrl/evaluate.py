"""Decoding of test sets with trained checkpoints, and the ``speechrl eval`` / ``transcribe`` CLI.

    checkpoint folders x manifests ──decode_manifest (greedy, or beam)──▶ Hypothesis records
        ──report.write_report──▶ report.md, report.json, hyps/*.jsonl, *.png

Greedy decoding is the paper's evaluation; the first checkpoint named is the baseline of every
relative WER change in the report. Scoring and the report itself live in ``speechrl.report``.

Under torchrun each rank decodes every W-th batch of a set; the hypotheses are gathered back in
the order one process decodes them, and rank 0 writes the same report one process would.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speechrl.config import (
    CHOICES,
    DECODING,
    ConfigError,
    InputError,
    device_error,
)
from speechrl.preflight import check_output_folder

if TYPE_CHECKING:
    from speechrl.report import Hypothesis, ReportPaths, Section
    from speechrl.report_changes import Finding, Pool

# The modules that decode and score import torch, transformers and matplotlib: they are imported
# inside the functions, so that the command line's --help and argument errors stay fast.


def decode_manifest(model, manifest: str | Path, *, options, device, data_cfg=None,
                    desc: str = "", skips=None, precision="fp32") -> list[Hypothesis]:
    """Decode every readable utterance of a manifest (sorted by length, batched by duration),
    in ``precision`` (``fp32``, ``bf16`` autocast, or ``auto``: see :mod:`speechrl.runtime`).

    Rows that cannot be read are skipped and counted by the loader, never fatal; ``skips`` (a
    :class:`~speechrl.manifest.SkipCounter`), when given, receives them from all ranks. Under
    torchrun every rank decodes its batches and every rank returns all the records, in one
    process's order.
    """
    import torch
    from tqdm.auto import tqdm

    from speechrl import distributed
    from speechrl.config import DataConfig
    from speechrl.data import make_dataloader
    from speechrl.generate import generate
    from speechrl.report import Hypothesis
    from speechrl.runtime import autocast, gather_skips

    data_cfg = data_cfg or DataConfig()
    loader = make_dataloader([str(manifest)], data_cfg, features=model.encoder.input_spec,
                             training=False, rank=distributed.rank(),
                             world_size=distributed.world_size())
    batches: list[list[Hypothesis]] = []
    model.eval()
    with torch.no_grad(), tqdm(total=len(loader), desc=desc or str(manifest),
                               dynamic_ncols=True, mininterval=2.0,
                               disable=not distributed.is_main()) as bar:
        for batch in loader:
            batch = batch.to(device)
            with autocast(device, precision):
                result = generate(model, batch.inputs, batch.input_lengths, options,
                                  durations=batch.durations)
            G = options.num_return_sequences
            batches.append([
                Hypothesis(id=utt_id, ref=batch.texts[i], hyp=result.texts[i * G],
                           language=batch.languages[i],
                           domain=batch.domains[i] if batch.domains else None)
                for i, utt_id in enumerate(batch.ids)])
            bar.update(1)
    if skips is not None:
        skips.merge(gather_skips(loader.skips))
    # Rank r decoded batches r, r + W, ...: dealing them back restores one process's order.
    return distributed.interleave(distributed.all_gather_objects(batches))


def decoding_options(beam: int = 0, max_new_tokens: int = DECODING.max_new_tokens,
                     tokens_per_second: float = DECODING.tokens_per_second):
    """Greedy by default (the paper's evaluation); beam search when ``beam`` > 1; the token caps
    of :data:`~speechrl.config.DECODING` unless given."""
    from speechrl.generate import DecodingOptions

    caps = dict(max_new_tokens=max_new_tokens, tokens_per_second=tokens_per_second,
                min_token_cap=DECODING.min_token_cap)
    if beam > 1:
        return DecodingOptions(strategy="beam", num_beams=beam, **caps)
    return DecodingOptions(strategy="greedy", **caps)


def evaluate_checkpoints(checkpoints: Mapping[str, str | Path], sets: Mapping[str, str | Path],
                         out_dir: str | Path, *, normalizer: str = DECODING.normalizer,
                         beam: int = 0, device: str = "auto",
                         max_new_tokens: int = DECODING.max_new_tokens,
                         sections: Sequence[Section | Mapping[str, Any]] | None = None,
                         training_metrics: Mapping[str, str | Path] | None = None,
                         curve_keys: Sequence[str] | None = None,
                         title: str = "speechrl evaluation",
                         trust_remote_code: bool = False,
                         precision: str = "fp32",
                         checkpoint_sets: Mapping[str, Sequence[str]] | None = None,
                         findings: Sequence[Finding] = (),
                         pools: Sequence[Pool] = ()) -> ReportPaths:
    """Decode each set with each checkpoint and write the report; the first checkpoint is the
    baseline of the changes (with their intervals). The rows of each set left out go to
    ``skips.json`` (``{set: {reason: count}}``) beside the report. Under torchrun the ranks
    share the decoding and rank 0 writes the report; every rank returns its paths.
    ``trust_remote_code`` lets the checkpoints' Hugging Face parts run their own code (never
    switched on by a checkpoint). ``checkpoint_sets`` limits a checkpoint to some of the sets
    (by name; a checkpoint not named decodes them all). ``findings`` are the paper's claims the
    report checks, each with its interval and verdict (:class:`speechrl.report_changes.Finding`).
    ``pools`` name runs among the checkpoints that differ only in their seed; each pool is
    reported as one run against the baseline (:class:`speechrl.report_changes.Pool`).
    ``precision``: ``fp32`` (the default), ``bf16`` autocast, or ``auto`` (bf16 on a GPU or on
    a CPU that computes it natively; :mod:`speechrl.runtime`).

    Every input is checked before anything is decoded (:func:`check_eval_inputs`). A failure
    after some decoding (a checkpoint whose weights turn out corrupt, a set with no usable row,
    an interruption) still writes the report of what was decoded, and its message says where.
    """
    from speechrl.report_changes import check_pools

    try:
        check_pools(pools, list(checkpoints))
    except ValueError as err:  # its lines start "pool": they name the option
        raise InputError(f"--{err}") from err
    check_eval_inputs(checkpoints, sets, out_dir, training_metrics, device=device)
    from speechrl import distributed
    from speechrl.checkpoint import CheckpointError, load_model
    from speechrl.manifest import ManifestError, SkipCounter
    from speechrl.report import write_report
    from speechrl.runtime import announce_precision, say

    dev = distributed.setup(device).device
    precision = announce_precision("eval", precision, dev)
    options = decoding_options(beam, max_new_tokens)
    unknown = {s for wanted in (checkpoint_sets or {}).values() for s in wanted} - set(sets)
    if unknown:
        raise ValueError(f"checkpoint_sets names sets {sorted(unknown)} that are not among "
                         f"{sorted(sets)}")
    results: dict[str, dict[str, list[Hypothesis]]] = {}
    skips = {set_name: SkipCounter() for set_name in sets}  # the same rows for every checkpoint
    wanted = {name: list((checkpoint_sets or {}).get(name, sets)) for name in checkpoints}
    try:
        for name, path in checkpoints.items():
            model = load_model(path, device=dev, trust_remote_code=trust_remote_code)
            results[name] = {}
            for set_name, manifest in sets.items():
                if set_name not in wanted[name]:
                    continue
                results[name][set_name] = decode_manifest(
                    model, manifest, options=options, device=dev, desc=f"{name} / {set_name}",
                    skips=skips[set_name], precision=precision)
            del model
        paths = None
        if distributed.is_main():
            paths = write_report(out_dir, results, normalizer=normalizer, title=title,
                                 training_metrics=training_metrics, sections=sections,
                                 curve_keys=curve_keys, findings=findings, pools=pools,
                                 provenance=_provenance(checkpoints, sets, beam, precision,
                                                        normalizer, options, skips))
    except BaseException as err:
        kept = save_decoded(out_dir, results, wanted, normalizer=normalizer, title=title,
                            provenance=_provenance(checkpoints, sets, beam, precision,
                                                   normalizer, options, skips))
        if kept is None:
            raise
        if isinstance(err, (CheckpointError, ManifestError)):
            raise type(err)(f"{err}; what was decoded before is in {kept}") from err
        say(f"eval: what was decoded before the failure is in {kept}")
        raise
    if distributed.is_main():
        counts = {set_name: counter.counts for set_name, counter in skips.items()}
        (Path(out_dir) / "skips.json").write_text(json.dumps(counts, indent=2) + "\n")
        for set_name, counter in skips.items():
            say(f"eval, {set_name}: {counter.summary()}")
        say(f"report: {paths.markdown}")
    # The other ranks wait for the report, so none reads it (or exits) before it exists.
    return distributed.broadcast_object(paths)


def _provenance(checkpoints, sets, beam: int, precision, normalizer: str, options,
                skips) -> dict[str, Any]:
    """What the report says it evaluated: paths, decoding settings, rows skipped per set."""
    return {
        "checkpoints": {name: str(Path(path).resolve()) for name, path in checkpoints.items()},
        "sets": {name: str(Path(path).resolve()) for name, path in sets.items()},
        "decoding": {"strategy": f"beam {beam}" if beam > 1 else "greedy",
                     "precision": precision.name, "normaliser": normalizer,
                     "max_new_tokens": options.max_new_tokens,
                     "tokens_per_second": options.tokens_per_second},
        "skipped": {set_name: counter.counts for set_name, counter in skips.items()},
    }


def check_eval_inputs(checkpoints: Mapping[str, str | Path], sets: Mapping[str, str | Path],
                      out_dir: str | Path,
                      training_metrics: Mapping[str, str | Path] | None = None, *,
                      device: str = "auto") -> None:
    """Everything an evaluation reads or writes, checked before any decoding: the output folder
    can be made, every manifest and metrics file exists (and the metrics parse), the device is
    there, every checkpoint folder is complete (in that order: the file checks need no torch).
    Raises :class:`~speechrl.config.InputError` (or
    :class:`~speechrl.checkpoint.CheckpointError`) naming the first problem."""
    check_output_folder(out_dir, "--out")
    for set_name, manifest in sets.items():
        if not Path(manifest).is_file():
            raise InputError(f"--data {set_name}: no manifest at {manifest}")
    for run, metrics in (training_metrics or {}).items():
        if not Path(metrics).is_file():
            raise InputError(f"--metrics {run}: no metrics file at {metrics}")
        from speechrl.plots import read_metrics

        try:
            read_metrics(metrics)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise InputError(f"--metrics {run}: {err}") from err
    from speechrl.distributed import checked_device

    checked_device(device)
    from speechrl.checkpoint import check_folder

    for path in checkpoints.values():
        check_folder(path)


def save_decoded(out_dir: str | Path, results: Mapping[str, Mapping[str, Sequence[Hypothesis]]],
                 wanted: Mapping[str, Sequence[str]], *, normalizer: str, title: str,
                 provenance: dict[str, Any] | None = None) -> Path | None:
    """After a failure, the report of the checkpoints that decoded all their ``wanted`` sets
    (else of the sets the first one decoded); when even that cannot be written, the raw
    hypotheses as JSONL. Returns where they went, or None when nothing had been decoded (or on
    ranks other than 0)."""
    from speechrl import distributed
    from speechrl.report import write_report

    complete = {name: sets for name, sets in results.items()
                if sets and len(sets) == len(wanted[name])}
    if not complete:
        complete = {name: sets for name, sets in list(results.items())[:1] if sets}
    if not complete or not distributed.is_main():
        return None
    try:
        return write_report(out_dir, complete, normalizer=normalizer,
                            title=f"{title} (incomplete)", provenance=provenance).markdown
    except Exception:  # the report itself failed: keep the hypotheses at least
        raw = Path(out_dir) / "decoded.jsonl"
        raw.parent.mkdir(parents=True, exist_ok=True)
        with raw.open("w") as f:
            for name, sets in results.items():
                for set_name, records in sets.items():
                    for r in records:
                        row = {"checkpoint": name, "set": set_name, **dataclasses.asdict(r)}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return raw


# --------------------------------------------------------------------------- command line


def add_eval_arguments(parser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a checkpoint folder; repeat for several (the first is the baseline); "
                             "NAME=PATH names it in the report, else its folder does (the run's "
                             "folder for .../best and .../last: runs/sft/best is sft)")
    parser.add_argument("--data", action="append", required=True,
                        help="a manifest (JSONL or Lhotse .jsonl.gz); repeat for several; "
                             "NAME=PATH names the set, else its file name does")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json, plots")
    parser.add_argument("--beam", type=int, default=0,
                        help="beam width; 0 decodes greedily (default: %(default)s)")
    parser.add_argument("--normalizer", default=DECODING.normalizer,
                        choices=CHOICES["decoding.normalizer"],
                        help="text normaliser applied before scoring (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=DECODING.max_new_tokens,
                        help="cap on tokens per transcript (default: %(default)s)")
    add_device_argument(parser)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="bf16 autocast, or auto (bf16 on a GPU or on a CPU that computes "
                             "bf16 natively) (default: %(default)s)")
    add_trust_remote_code_argument(parser)
    parser.add_argument("--metrics", action="append", default=[],
                        help="NAME=metrics.jsonl of a training run, plotted as curves")
    parser.add_argument("--pool", action="append", default=[], metavar="NAME=CKPT,CKPT[,...]",
                        help="report checkpoints that differ only in their seed (by their names "
                             "in the report) also as one pooled run against the baseline, with "
                             "its interval beside each run's change; repeat for several")


def add_device_argument(parser) -> None:
    parser.add_argument("--device", default="auto", type=_device_name,
                        help="auto (a GPU when there is one), cpu, cuda, cuda:N or mps "
                             "(default: %(default)s)")


def _device_name(value: str) -> str:
    import argparse

    if device_error(value):
        raise argparse.ArgumentTypeError(device_error(value))
    return value


def add_trust_remote_code_argument(parser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the checkpoint's Hugging Face encoder, LLM or tokenizer run "
                             "code of their own (off by default: only for checkpoints you trust)")


def named_inputs(items: Sequence[str], option: str) -> dict[str, str]:
    """``NAME=PATH`` items (or bare paths) as {name: path}, in order. A bare path is named by its
    file (``test.jsonl`` is ``test``) or, for ``--checkpoint``, by its folder, where a
    checkpoint layout's ``best`` or ``last`` gives way to the run's folder (``runs/sft/best``
    is ``sft``); paths that would share a name take more of their parent folders
    (``a/test.jsonl``, ``b/test.jsonl``: ``a_test``, ``b_test``). Two items still sharing a name
    raise :class:`~speechrl.config.ConfigError`."""
    explicit, candidates = {}, {}
    for i, item in enumerate(items):
        name, _, path = item.rpartition("=")
        if name:
            if name in explicit.values():
                raise ConfigError(f"two {option} are both called {name!r}: give each its own "
                                  "NAME=PATH")
            explicit[i] = name
        else:
            candidates[i] = _name_candidates(item, checkpoint=option == "--checkpoint")
    level = dict.fromkeys(candidates, 0)
    while True:
        names = {**explicit, **{i: c[level[i]] for i, c in candidates.items()}}
        clashing = [i for i in candidates if list(names.values()).count(names[i]) > 1]
        if not clashing:
            break
        movable = [i for i in clashing if level[i] + 1 < len(candidates[i])]
        if not movable:
            raise ConfigError(f"two {option} are both called {names[clashing[0]]!r}: name "
                              "them NAME=PATH")
        for i in movable:
            level[i] += 1
    return {names[i]: item.rpartition("=")[2] for i, item in enumerate(items)}


def _name_candidates(path: str, checkpoint: bool) -> list[str]:
    """Names for a bare ``path``, shortest first (see :func:`named_inputs`)."""
    parts = [p for p in Path(path).parts if p not in (Path(path).anchor, ".", "..")] or [path]
    stem = parts[-1]
    if stem.endswith(".jsonl.gz"):
        stem = stem[: -len(".jsonl.gz")]
    parts[-1] = stem.removesuffix(".jsonl")
    names = []
    if checkpoint and parts[-1] in ("best", "last") and len(parts) > 1:
        run = parts[:-1]
        names += ["_".join(run[-depth:]) for depth in range(1, len(run) + 1)]
    names += ["_".join(parts[-depth:]) for depth in range(1, len(parts) + 1)]
    return list(dict.fromkeys(names))


def parse_pools(items: Sequence[str]) -> list[Pool]:
    """``--pool NAME=CKPT,CKPT[,...]`` items as pools; a malformed one raises
    :class:`~speechrl.config.InputError` saying what to write (pools that do not fit the
    checkpoints are refused by :func:`evaluate_checkpoints`)."""
    from speechrl.report_changes import Pool

    pools = []
    for item in items:
        name, sep, members = item.partition("=")
        try:
            if not sep:
                raise ValueError(f"pool {item!r}: write NAME=CKPT,CKPT[,...] (checkpoint names as "
                                 "the report gives them)")
            pools.append(Pool(name.strip(), tuple(m.strip() for m in members.split(",")
                                                  if m.strip())))
        except ValueError as err:
            raise InputError(f"--{err}") from err
    return pools


def eval_main(args) -> int:
    """``speechrl eval``; its errors are the command line's to report (speechrl.cli)."""
    paths = evaluate_checkpoints(named_inputs(args.checkpoint, "--checkpoint"),
                                 named_inputs(args.data, "--data"), args.out,
                                 normalizer=args.normalizer, beam=args.beam,
                                 device=args.device, max_new_tokens=args.max_new_tokens,
                                 training_metrics=named_inputs(args.metrics, "--metrics") or None,
                                 trust_remote_code=args.trust_remote_code,
                                 precision=args.precision, pools=parse_pools(args.pool))
    from speechrl import distributed

    if distributed.is_main():
        print(f"eval done: {paths.markdown}")
    return 0


class Transcriber:
    """A checkpoint loaded once, to transcribe audio files one at a time: ``transcriber(path)``
    is the file's transcript. A checkpoint that cannot be loaded raises
    :class:`~speechrl.checkpoint.CheckpointError`; a file that cannot be read (or is shorter
    than 0.1 s) :class:`~speechrl.audio.AudioError`, and the next file can still be given."""

    def __init__(self, checkpoint: str | Path, *, beam: int = 0, device: str = "auto",
                 trust_remote_code: bool = False) -> None:
        from speechrl.checkpoint import load_model
        from speechrl.distributed import checked_device

        self.device = checked_device(device)
        self.model = load_model(checkpoint, device=self.device,
                                trust_remote_code=trust_remote_code).eval()
        self.options = decoding_options(beam)

    def __call__(self, path: str | Path) -> str:
        import torch

        from speechrl.data import features_for_files
        from speechrl.generate import generate

        inputs, lengths, durations = features_for_files([path], self.model.encoder.input_spec)
        with torch.no_grad():
            result = generate(self.model, inputs.to(self.device), lengths.to(self.device),
                              self.options, durations=durations.to(self.device))
        return result.texts[0]


def transcribe_files(checkpoint: str | Path, files: Sequence[str], *, beam: int = 0,
                     device: str = "auto", trust_remote_code: bool = False):
    """Yield (path, transcript) for each audio file, one at a time; raises as
    :class:`Transcriber` does, at the first file that cannot be read."""
    transcriber = Transcriber(checkpoint, beam=beam, device=device,
                              trust_remote_code=trust_remote_code)
    for path in files:
        yield path, transcriber(path)
