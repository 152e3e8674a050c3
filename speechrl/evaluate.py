"""Decoding of test sets with trained checkpoints, and the ``speechrl eval`` / ``transcribe`` CLI.

    checkpoint folders x manifests ──decode_manifest (greedy, or beam)──▶ Hypothesis records
        ──report.write_report──▶ report.md, report.json, hyps/*.jsonl, *.png

Greedy decoding is the paper's evaluation; the first checkpoint named is the baseline of every
relative WER change in the report. Scoring and the report itself live in ``speechrl.report``.

Under torchrun each rank decodes every W-th batch of a set; the hypotheses are gathered back in
the order one process decodes them, and rank 0 writes the same report one process would.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speechrl import distributed
from speechrl.report import Hypothesis, ReportPaths, Section, write_report


def decode_manifest(model, manifest: str | Path, *, options, device, data_cfg=None,
                    desc: str = "", skips=None, precision="fp32") -> list[Hypothesis]:
    """Decode every readable utterance of a manifest (sorted by length, batched by duration),
    in ``precision`` (``fp32``, ``bf16`` autocast, or ``auto``: see :mod:`speechrl.runtime`).

    Rows that cannot be read are skipped and counted by the loader, never fatal; ``skips`` (a
    :class:`~speechrl.data.SkipCounter`), when given, receives them from all ranks. Under
    torchrun every rank decodes its batches and every rank returns all the records, in one
    process's order.
    """
    import torch
    from tqdm.auto import tqdm

    from speechrl.config import DataConfig
    from speechrl.data import make_dataloader
    from speechrl.generate import generate
    from speechrl.runtime import autocast
    from speechrl.train.common import gather_skips

    data_cfg = data_cfg or DataConfig()
    loader = make_dataloader([str(manifest)], data_cfg, features=model.encoder.input_kind,
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


def decoding_options(beam: int = 0, max_new_tokens: int = 128, tokens_per_second: float = 8.0):
    """Greedy by default (the paper's evaluation); beam search when ``beam`` > 1."""
    from speechrl.generate import DecodingOptions

    if beam > 1:
        return DecodingOptions(strategy="beam", num_beams=beam, max_new_tokens=max_new_tokens,
                               tokens_per_second=tokens_per_second)
    return DecodingOptions(strategy="greedy", max_new_tokens=max_new_tokens,
                           tokens_per_second=tokens_per_second)


def evaluate_checkpoints(checkpoints: Mapping[str, str | Path], sets: Mapping[str, str | Path],
                         out_dir: str | Path, *, normalizer: str = "whisper", beam: int = 0,
                         device: str = "auto", max_new_tokens: int = 128,
                         sections: Sequence[Section | Mapping[str, Any]] | None = None,
                         training_metrics: Mapping[str, str | Path] | None = None,
                         curve_keys: Sequence[str] | None = None,
                         title: str = "speechrl evaluation",
                         trust_remote_code: bool = False,
                         precision: str = "fp32",
                         checkpoint_sets: Mapping[str, Sequence[str]] | None = None
                         ) -> ReportPaths:
    """Decode each set with each checkpoint and write the report; the first checkpoint is the
    baseline of the changes (with their intervals). The rows of each set left out go to
    ``skips.json`` (``{set: {reason: count}}``) beside the report. Under torchrun the ranks
    share the decoding and rank 0 writes the report; every rank returns its paths.
    ``trust_remote_code`` lets the checkpoints' Hugging Face parts run their own code (never
    switched on by a checkpoint). ``checkpoint_sets`` limits a checkpoint to some of the sets
    (by name; a checkpoint not named decodes them all).
    ``precision``: ``fp32`` (the default), ``bf16`` autocast, or ``auto`` (bf16 on a GPU or on
    a CPU that computes it natively; :mod:`speechrl.runtime`)."""
    from speechrl.checkpoint import load_model
    from speechrl.data import SkipCounter
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
    for name, path in checkpoints.items():
        model = load_model(path, device=dev, trust_remote_code=trust_remote_code)
        wanted = (checkpoint_sets or {}).get(name, list(sets))
        results[name] = {}
        for set_name, manifest in sets.items():
            if set_name not in wanted:
                continue
            results[name][set_name] = decode_manifest(
                model, manifest, options=options, device=dev, desc=f"{name} / {set_name}",
                skips=skips[set_name], precision=precision)
        del model
    paths = None
    if distributed.is_main():
        counts = {set_name: counter.counts for set_name, counter in skips.items()}
        provenance = {
            "checkpoints": {name: str(Path(path).resolve()) for name, path in checkpoints.items()},
            "sets": {name: str(Path(path).resolve()) for name, path in sets.items()},
            "decoding": {"strategy": f"beam {beam}" if beam > 1 else "greedy",
                         "precision": precision.name, "normaliser": normalizer,
                         "max_new_tokens": max_new_tokens,
                         "tokens_per_second": options.tokens_per_second},
            "skipped": counts,
        }
        paths = write_report(out_dir, results, normalizer=normalizer, title=title,
                             training_metrics=training_metrics, sections=sections,
                             curve_keys=curve_keys, provenance=provenance)
        (Path(out_dir) / "skips.json").write_text(json.dumps(counts, indent=2) + "\n")
        for set_name, counter in skips.items():
            say(f"eval, {set_name}: {counter.summary()}")
        say(f"report: {paths.markdown}")
    # The other ranks wait for the report, so none reads it (or exits) before it exists.
    return distributed.broadcast_object(paths)


# --------------------------------------------------------------------------- command line


def add_eval_arguments(parser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="a checkpoint folder; repeat for several (the first is the baseline); "
                             "NAME=PATH names it in the report")
    parser.add_argument("--data", action="append", required=True,
                        help="a manifest (JSONL or Lhotse .jsonl.gz); repeat for several; "
                             "NAME=PATH names the set")
    parser.add_argument("--out", required=True, help="folder for report.md, report.json, plots")
    parser.add_argument("--beam", type=int, default=0, help="beam width; 0 decodes greedily")
    parser.add_argument("--normalizer", default="whisper",
                        choices=["whisper", "basic", "lower", "none"])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                        help="bf16 autocast, or auto (bf16 on a GPU or on a CPU that computes "
                             "bf16 natively); fp32 by default")
    add_trust_remote_code_argument(parser)
    parser.add_argument("--metrics", action="append", default=[],
                        help="NAME=metrics.jsonl of a training run, plotted as curves")


def add_trust_remote_code_argument(parser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let the checkpoint's Hugging Face encoder, LLM or tokenizer run "
                             "code of their own (off by default: only for checkpoints you trust)")


def _named(items: Sequence[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, _, path = item.rpartition("=")
        if not name:
            path = item
            name = Path(item.rstrip("/")).name
            if name.endswith(".jsonl.gz"):
                name = name[: -len(".jsonl.gz")]
            name = name.removesuffix(".jsonl")
        if name in named:
            raise ValueError(f"two inputs are both called {name!r}: name them NAME=PATH")
        named[name] = path
    return named


def eval_main(args) -> int:
    from speechrl.checkpoint import CheckpointError
    from speechrl.data import ManifestError

    try:
        paths = evaluate_checkpoints(_named(args.checkpoint), _named(args.data), args.out,
                                     normalizer=args.normalizer, beam=args.beam,
                                     device=args.device, max_new_tokens=args.max_new_tokens,
                                     training_metrics=_named(args.metrics) or None,
                                     trust_remote_code=args.trust_remote_code,
                                     precision=args.precision)
    except (CheckpointError, ManifestError) as err:  # a message, not a stack trace
        print(f"eval: {err}", file=sys.stderr, flush=True)
        return 1
    if distributed.is_main():
        print(f"eval done: {paths.markdown}")
    return 0


def transcribe_files(checkpoint: str | Path, files: Sequence[str], *, beam: int = 0,
                     device: str = "auto", trust_remote_code: bool = False):
    """Yield (path, transcript) for each audio file, one at a time. A checkpoint that cannot
    be loaded raises :class:`~speechrl.checkpoint.CheckpointError`, an unreadable file
    :class:`~speechrl.audio.AudioError`."""
    import torch

    from speechrl.checkpoint import load_model
    from speechrl.data import features_for_files
    from speechrl.generate import generate
    from speechrl.train.common import resolve_device

    dev = resolve_device(device)
    model = load_model(checkpoint, device=dev, trust_remote_code=trust_remote_code).eval()
    options = decoding_options(beam)
    for path in files:
        inputs, lengths, durations = features_for_files([path], model.encoder.input_kind)
        with torch.no_grad():
            result = generate(model, inputs.to(dev), lengths.to(dev), options,
                              durations=durations.to(dev))
        yield path, result.texts[0]
