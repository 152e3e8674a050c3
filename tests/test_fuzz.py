"""Manifests with seeded random mixes of bad rows, through the loader and through ``sft``,
``grpo`` and ``eval`` on the command line: nothing may crash, and the skips each one reports
(``skips.json``) must equal, reason by reason, the rows planted.

Every kind of bad row :mod:`speechrl.manifest` and :mod:`speechrl.data` recognise is planted
(bad JSON, missing fields, fields of the wrong type, text that is not UTF-8, duplicate ids,
empty text, durations that are absurd or over the limit, missing, unreadable, truncated, empty,
too short or mismatched audio, texts of 100k characters, relative paths out of the manifest's
folder), and so are rows that look odd but are fine (an absolute path elsewhere, a ``..`` that
stays inside), which must be kept."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from test_train import run_config
from tones import write_tone_corpus

from speechrl.config import DataConfig, DecodingConfig, GRPOConfig
from speechrl.configio import to_dict

SR = 16000
# A planted row: its JSONL line, the reason counted when training and when evaluating (None:
# the row is kept).
Planted = tuple[bytes, str | None, str | None]


def tone(path: Path, seconds: float, subtype: str = "PCM_16") -> Path:
    t = np.arange(int(round(seconds * SR))) / SR
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR, subtype=subtype)
    return path


class Planter:
    """Writes bad rows (and their audio, under ``folder/bad``) beside a good tone corpus."""

    def __init__(self, folder: Path, rng: np.random.Generator) -> None:
        self.folder, self.rng, self.n = folder, rng, 0
        (folder / "bad").mkdir(exist_ok=True)
        self.good = [json.loads(line) for line in (folder / "manifest.jsonl").read_text()
                     .splitlines()]

    def row(self, **fields) -> dict:
        """A well-formed row on a good file of the corpus, with ``fields`` changed."""
        self.n += 1
        source = self.good[int(self.rng.integers(len(self.good)))]
        return {**source, "id": f"bad{self.n:03d}", **fields}

    def audio(self, name: str) -> str:
        return f"bad/{self.n:03d}-{name}"

    def pick(self, *variants):
        return variants[int(self.rng.integers(len(variants)))]

    # Checks made when the manifest is read ----------------------------------------------

    def not_json(self) -> Planted:
        line = self.pick(b'{"id": "cut", "audio": "utt000.wav", "text": ',  # a cut-off write
                         b'["a", "list"]', b"[" * 100_000,  # nested past the recursion limit
                         b'{"id": "big", "duration": ' + b"9" * 5000 + b"}")  # 5000 digits
        return line, "not valid JSON", "not valid JSON"

    def missing_field(self) -> Planted:
        row = self.row()
        del row[self.pick("id", "audio", "text", "language", "duration")]
        return dumps(row), "missing field", "missing field"

    def wrong_type(self) -> Planted:
        key, value = self.pick(
            ("duration", "1.0"), ("duration", [1.0]), ("duration", float("nan")),
            ("duration", -3), ("duration", float("inf")), ("duration", 10**400),
            ("text", 42), ("id", 7), ("language", None), ("offset", -0.5), ("offset", "0"),
            ("channel", 0.5), ("domain", 3))
        return dumps(self.row(**{key: value})), "wrong field type", "wrong field type"

    def not_utf8(self) -> Planted:
        line = dumps(self.row(text="caf\u00e9 noir")).replace(b"\\u00e9", b"\xe9")
        return line, "text not valid UTF-8", "text not valid UTF-8"

    def duplicate_id(self) -> Planted:
        return dumps(self.good[int(self.rng.integers(len(self.good)))]), "duplicate id", \
            "duplicate id"

    def empty_text(self) -> Planted:
        return dumps(self.row(text=self.pick("", "   "))), "empty text", None  # kept in eval

    def absurd_duration(self) -> Planted:
        return dumps(self.row(duration=self.pick(1e9, 40.0))), "longer than the limit", \
            "longer than the limit"

    def zero_duration(self) -> Planted:
        return dumps(self.row(duration=0)), "zero-length audio", "zero-length audio"

    def missing_audio(self) -> Planted:
        audio = self.pick("bad/nowhere.flac", "bad", "")  # no file, a folder, nothing
        return dumps(self.row(audio=audio)), "missing audio file", "missing audio file"

    def outside_folder(self) -> Planted:
        outside = tone(self.folder.parent / f"outside{self.n}.wav", 1.0)
        audio = self.pick("../../x.flac", f"../{outside.name}",  # the second one exists
                          f"bad/../../{outside.name}")
        reason = "audio path outside the manifest folder"
        return dumps(self.row(audio=audio, duration=1.0)), reason, reason

    def huge_text(self) -> Planted:
        text = " ".join(["hello"] * 20_000)[: 100_000]  # 100k characters for about 1 s
        reason = "text too long for its audio"
        return dumps(self.row(text=text)), reason, reason

    # Checks made when the audio is loaded -------------------------------------------------

    def unreadable(self) -> Planted:
        path = self.folder / self.audio("x.wav")
        if self.pick(True, False):
            path.write_bytes(b"RIFF not really a wave file" * 50)
        else:  # a float WAV holding NaNs
            sf.write(path, np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
        return dumps(self.row(audio=self.audio("x.wav"), duration=1.0)), "unreadable audio", \
            "unreadable audio"

    def truncated(self) -> Planted:
        if self.pick(True, False):
            path = tone(self.folder / self.audio("t.wav"), 1.0)
            path.write_bytes(path.read_bytes()[:12000])  # the header says 1 s, 0.37 s is there
            row = self.row(audio=self.audio("t.wav"), duration=1.0)
        else:
            row = self.row(offset=5.0, duration=0.5)  # past the end of a file under a second
        return dumps(row), "truncated audio", "truncated audio"

    def empty_audio(self) -> Planted:
        sf.write(self.folder / self.audio("e.wav"), np.zeros(0, np.float32), SR)
        return dumps(self.row(audio=self.audio("e.wav"), duration=0.5)), "zero-length audio", \
            "zero-length audio"

    def too_short(self) -> Planted:
        tone(self.folder / self.audio("s.wav"), 0.02)
        return dumps(self.row(audio=self.audio("s.wav"), duration=0.02)), "too short", \
            "too short"

    def duration_mismatch(self) -> Planted:
        tone(self.folder / self.audio("m.wav"), 1.0)
        return dumps(self.row(audio=self.audio("m.wav"), duration=3.0)), "duration mismatch", \
            "duration mismatch"

    def long_audio(self) -> Planted:
        tone(self.folder / self.audio("l.wav"), 6.0)  # over the 5 s limit; the field says 1 s
        return dumps(self.row(audio=self.audio("l.wav"), duration=1.0)), \
            "longer than the limit", "longer than the limit"

    # Odd but fine ------------------------------------------------------------------------

    def absolute_elsewhere(self) -> Planted:
        outside = tone(self.folder.parent / f"elsewhere{self.n}.wav", 0.6)
        return dumps(self.row(audio=str(outside.resolve()), duration=0.6, text="cat")), \
            None, None

    def dotdot_inside(self) -> Planted:
        source = self.good[0]
        return dumps(self.row(audio=f"bad/../{source['audio']}", duration=source["duration"],
                              text=source["text"])), None, None


KINDS: list[Callable[[Planter], Planted]] = [
    Planter.not_json, Planter.missing_field, Planter.wrong_type, Planter.not_utf8,
    Planter.duplicate_id, Planter.empty_text, Planter.absurd_duration, Planter.zero_duration,
    Planter.missing_audio, Planter.outside_folder, Planter.huge_text, Planter.unreadable,
    Planter.truncated, Planter.empty_audio, Planter.too_short, Planter.duration_mismatch,
    Planter.long_audio, Planter.absolute_elsewhere, Planter.dotdot_inside,
]


def dumps(row: dict) -> bytes:
    return json.dumps(row).encode()


def fuzz_manifest(folder: Path, seed: int, name: str, every_kind: bool = False,
                  extra: int = 8) -> tuple[Path, Counter, Counter, int]:
    """The good corpus in ``folder`` with bad rows planted at random places: ``every_kind``
    once each, plus ``extra`` drawn at random. Returns the manifest, the reasons planted (for
    training and for evaluation) and the number of rows evaluation decodes."""
    rng = np.random.default_rng(seed)
    planter = Planter(folder, rng)
    kinds = (list(KINDS) if every_kind else []) + [
        KINDS[int(i)] for i in rng.integers(len(KINDS), size=extra)]
    lines = [dumps(r) for r in planter.good]
    train, evaluation = Counter(), Counter()
    kept = len(lines)
    for kind in kinds:
        line, in_training, in_eval = kind(planter)
        lines.insert(int(rng.integers(len(lines) + 1)), line)
        train.update([in_training] if in_training else [])
        evaluation.update([in_eval] if in_eval else [])
        kept += in_eval is None
    manifest = folder / name
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    return manifest, train, evaluation, kept


DATA = DataConfig(max_duration=60.0, max_utterance_duration=5.0, num_buckets=1)


@pytest.mark.parametrize("seed", range(12))
def test_loaders_count_every_planted_row(tmp_path, seed):
    """The training and evaluation loaders over a whole epoch, 12 seeded mixes."""
    from speechrl.data import make_dataloader

    write_tone_corpus(tmp_path / "corpus", 6, seed=seed)
    manifest, train, evaluation, kept = fuzz_manifest(tmp_path / "corpus", seed, "fuzz.jsonl",
                                                      extra=10)
    rows = len(manifest.read_bytes().splitlines())  # good and planted, one line each
    # Training keeps every row not counted as skipped (one rank, nothing dropped for sharing);
    # evaluation keeps empty texts too.
    for training, expected, survivors in ((True, train, rows - sum(train.values())),
                                          (False, evaluation, kept)):
        loader = make_dataloader([manifest], DATA, features="fbank", training=training,
                                 batch_size=4 if training else None)
        ids = [i for batch in loader for i in batch.ids]
        assert loader.skips.counts == dict(sorted(expected.items())), (training, seed)
        assert len(ids) == len(set(ids)) == survivors, (training, seed)


def stage(command: str, cfg, root: Path, capsys) -> str:
    """``speechrl <command> --config <yaml>`` in this process; its stderr."""
    from speechrl.cli import main

    config = root / f"{command}.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main([command, "--config", str(config)]) == 0
    return capsys.readouterr().err


def test_sft_grpo_and_eval_report_what_was_planted(tmp_path, tiny_model_config, capsys):
    from speechrl.cli import main

    corpus = tmp_path / "corpus"
    write_tone_corpus(corpus, 10, seed=0)
    train, train_planted, _, _ = fuzz_manifest(corpus, 1, "train.jsonl", every_kind=True,
                                               extra=6)
    dev, _, dev_planted, dev_kept = fuzz_manifest(corpus, 2, "dev.jsonl", extra=8)
    expected = {"train": dict(sorted(train_planted.items())),
                "dev": dict(sorted(dev_planted.items()))}

    # One batch holds every row that passes the reading checks, so a step meets all the bad
    # audio; the dev set is decoded whole at the end.
    sft = run_config(tmp_path / "sft", {"train": train, "dev": dev}, tiny_model_config,
                     max_steps=2, batch_size=64, dev_utterances=1000)
    sft = replace(sft, data=replace(DATA, train=(str(train),), dev=(str(dev),)))
    err = stage("sft", sft, tmp_path, capsys)
    assert json.loads((tmp_path / "sft" / "run" / "skips.json").read_text()) == expected
    assert f"sft, train data: skipped {sum(train_planted.values())} row(s): " in err

    grpo = replace(sft, grpo=GRPOConfig(group_size=2), decoding=DecodingConfig(max_new_tokens=4),
                   train=replace(sft.train, output_dir=str(tmp_path / "grpo"), max_steps=1,
                                 init=str(tmp_path / "sft" / "run" / "best")))
    err = stage("grpo", grpo, tmp_path, capsys)
    assert json.loads((tmp_path / "grpo" / "skips.json").read_text()) == expected
    assert f"grpo, dev data: skipped {sum(dev_planted.values())} row(s): " in err

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", f"sft={tmp_path / 'sft' / 'run' / 'best'}",
                 "--data", f"dev={dev}", "--out", str(out)]) == 0
    assert json.loads((out / "skips.json").read_text()) == {"dev": expected["dev"]}
    decoded = (out / "hyps" / "sft.dev.jsonl").read_text().splitlines()
    assert len(decoded) == dev_kept  # the good rows, the odd-but-fine ones, empty texts
