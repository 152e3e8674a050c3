"""Manifests in, padded batches out.

* A manifest is JSONL, one utterance a line: ``{"id", "audio", "text", "language", "duration",
  "domain"?}`` (an optional ``offset`` in seconds reads a segment of a longer file; other keys
  are ignored). ``audio`` is absolute, or relative to the manifest's folder and then must stay
  inside it: ``../x.flac`` is skipped ("audio path outside the manifest folder"), so a manifest
  handed around cannot reach files beside or above its own folder unless it says so in full. A
  Lhotse CutSet (``cuts.jsonl.gz``) is accepted wherever a manifest is.
* Bad rows never stop a run. Cheap checks happen when a manifest is read
  (:func:`read_manifest`); checks that need the audio decoded happen when the dataset loads an
  item, which then comes back as a :class:`Skip` and is dropped by :func:`collate`. Each is
  counted by reason in a :class:`SkipCounter`; ``strict=True`` raises :class:`ManifestError`
  naming the file, line and id instead.
* :class:`DurationBatchSampler` fills batches up to ``max_duration`` seconds of audio within
  duration buckets, shuffles by (seed, epoch), shards by (rank, world size) and can resume in the
  middle of an epoch; :func:`make_dataloader` puts it all together.

Shapes: B batch, N frames, F features, S samples.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from speechrl import audio as audio_lib
from speechrl.audio import AudioError
from speechrl.config import DataConfig

if TYPE_CHECKING:
    from speechrl.encoders import EncoderInput

REQUIRED_FIELDS = {"id": str, "audio": str, "text": str, "language": str, "duration": float}
# A transcript longer than this for its duration is not speech (fast speech runs near 20
# characters a second) but a row whose text belongs elsewhere, and a huge one would fill memory.
MAX_TEXT_CHARS_PER_SECOND = 60.0
TEXT_CHARS_SLACK = 100
# Audio shorter than this gives no frame to some encoders (the conformer needs 70 ms).
MIN_AUDIO_SECONDS = 0.1
LHOTSE_CUT_TYPES = ("MonoCut", "MixedCut", "MultiCut", "PaddingCut", "DataCut")
# Lhotse recipes often name languages in full; the normalisers and reports key on ISO codes.
LANGUAGE_CODES = {
    "english": "en", "french": "fr", "german": "de", "italian": "it", "spanish": "es",
    "dutch": "nl", "polish": "pl", "portuguese": "pt", "russian": "ru", "chinese": "zh",
    "mandarin": "zh", "japanese": "ja", "swedish": "sv", "finnish": "fi", "czech": "cs",
}


class ManifestError(ValueError):
    """A manifest that cannot be used, or (with ``strict``) a bad row, named by file:line and id."""


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Utterance:
    """One usable manifest row. ``audio`` is an absolute path, or "" when ``cut`` (a Lhotse cut
    whose source soundfile cannot read directly) loads the audio instead."""

    id: str
    audio: str
    text: str
    language: str
    duration: float  # seconds, as the manifest says
    domain: str | None = None
    offset: float = 0.0  # seconds into ``audio`` where the utterance starts
    segment: bool = False  # read only ``duration`` seconds from ``offset`` (part of a recording)
    channel: int | tuple[int, ...] | None = None  # None: all channels, averaged
    where: str = ""  # "manifest:line", for messages
    cut: Any = field(default=None, compare=False, repr=False)


class SkipCounter:
    """Rows left out, by reason. A row is counted once per reason however often it is met
    (a file that fails to decode fails again every epoch)."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, str]] = {}  # reason -> {where: detail}

    def add(self, reason: str, where: str, detail: str = "") -> None:
        if len(detail) > 200:  # a 100k-character field must not flood the summary
            detail = detail[:200] + "..."
        self._rows.setdefault(reason, {}).setdefault(where, detail)

    def merge(self, other: SkipCounter) -> None:
        for reason, rows in other._rows.items():
            for where, detail in rows.items():
                self.add(reason, where, detail)

    @property
    def counts(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in sorted(self._rows.items())}

    def __len__(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: how many rows were skipped and why, with an example of each reason."""
        if not self._rows:
            return "no rows skipped"
        parts = []
        for reason, rows in sorted(self._rows.items(), key=lambda kv: -len(kv[1])):
            where, detail = next(iter(rows.items()))
            example = f"{where}: {detail}" if detail else where
            parts.append(f"{len(rows)} {reason} (e.g. {example})")
        return f"skipped {len(self)} row(s): " + "; ".join(parts)


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------- reading


def read_manifest(
    path: str | Path,
    *,
    training: bool,
    max_duration: float,
    strict: bool = False,
    check_audio: bool = True,
    skips: SkipCounter | None = None,
    allow_empty_text: bool = False,
) -> tuple[list[Utterance], SkipCounter]:
    """Usable rows of a JSONL manifest or a Lhotse CutSet, and the count of rows left out.

    Checks here are the cheap ones: JSON, fields and their types, UTF-8, duplicate ids, empty
    text (``training`` only, unless ``allow_empty_text``: clips that should be transcribed as
    nothing, such as non-speech), a ``duration`` above ``max_duration`` seconds (the longest
    utterance kept), a text longer than ``MAX_TEXT_CHARS_PER_SECOND`` x duration +
    ``TEXT_CHARS_SLACK`` characters, a relative audio path that leaves the manifest's folder and,
    with ``check_audio``, that the audio file exists. The rest needs the audio decoded and
    happens in :class:`SpeechDataset`.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    skips = SkipCounter() if skips is None else skips
    is_cuts = _looks_like_cuts(path)
    utterances, seen = [], set()
    for lineno, raw in enumerate(_open_lines(path), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        row_id = ""
        try:
            row = _parse_json(raw)
            row_id = str(row.get("id", ""))
            utt = (_row_from_cut if is_cuts else _row_from_manifest)(row, path, where)
            row_id = utt.id
            _check_row(utt, training and not allow_empty_text, max_duration, check_audio, seen)
        except _BadRow as bad:
            if strict:
                raise ManifestError(f"{where} (id={row_id or '?'}): {bad.reason}"
                                    + (f": {bad.detail}" if bad.detail else "")) from None
            skips.add(bad.reason, f"{where} id={row_id or '?'}", bad.detail)
            continue
        seen.add(utt.id)
        utterances.append(utt)
    return utterances, skips


def read_manifest_texts(path: str | Path) -> list[str]:
    """Transcripts of the rows with text (the audio is not looked at), e.g. for LM training."""
    utterances, _ = read_manifest(path, training=True, max_duration=math.inf, check_audio=False)
    return [u.text for u in utterances]


def write_manifest(path: str | Path, utterances: Sequence[Utterance]) -> Path:
    """Write JSONL rows; audio paths under the manifest's folder are written relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    lines = []
    for u in utterances:
        if not u.audio:
            raise ValueError(f"utterance {u.id}: its audio is not a file (a Lhotse cut with "
                             "another source) and cannot go into a JSONL manifest")
        audio = Path(u.audio).resolve()
        with contextlib.suppress(ValueError):
            audio = audio.relative_to(folder)
        row = {"id": u.id, "audio": audio.as_posix(), "text": u.text, "language": u.language,
               "duration": round(u.duration, 4)}
        if u.domain is not None:
            row["domain"] = u.domain
        if u.segment:
            row["offset"] = u.offset
        if u.channel is not None:
            row["channel"] = u.channel if isinstance(u.channel, int) else list(u.channel)
        lines.append(json.dumps(row, ensure_ascii=False))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return path


def _open_lines(path: Path) -> Iterator[bytes]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        yield from f


def _parse_json(raw: bytes) -> dict[str, Any]:
    # Undecodable bytes become lone surrogates, so the row still parses and the check that
    # follows can say which field is not UTF-8.
    try:
        row = _loads(raw)
    except (ValueError, RecursionError) as e:  # also 5000-digit numbers, 10^5 nested brackets
        raise _BadRow("not valid JSON", f"{type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(row, dict):
        raise _BadRow("not valid JSON", f"a JSON {type(row).__name__}, not an object")
    return row


def _loads(raw: bytes) -> Any:
    # A byte-order mark (editors on Windows write one) is not part of the first row.
    return json.loads(raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff"))


def _looks_like_cuts(path: Path) -> bool:
    """Peek at the first row: a Lhotse cut, one of our rows, or another Lhotse manifest."""
    for raw in _open_lines(path):
        if not raw.strip():
            continue
        try:
            row = _loads(raw)
        except (ValueError, RecursionError):
            return False
        if not isinstance(row, dict):
            return False
        if row.get("type") in LHOTSE_CUT_TYPES or ("recording" in row and "start" in row):
            return True
        if "sources" in row and "sampling_rate" in row:
            raise ManifestError(f"{path} is a Lhotse RecordingSet; give a CutSet instead, e.g. "
                                "CutSet.from_manifests(recordings=..., supervisions=...)"
                                ".trim_to_supervisions().to_file('cuts.jsonl.gz')")
        if "recording_id" in row and "audio" not in row:
            raise ManifestError(f"{path} is a Lhotse SupervisionSet; give a CutSet instead "
                                "(CutSet.from_manifests(recordings=..., supervisions=...))")
        return False
    return False


def _row_from_manifest(row: dict[str, Any], manifest: Path, where: str) -> Utterance:
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise _BadRow("missing field", ", ".join(missing))
    for key, kind in REQUIRED_FIELDS.items():
        _check_type(key, row[key], kind)
    domain = row.get("domain")
    if domain is not None:
        _check_type("domain", domain, str)
    offset = row.get("offset", 0.0)
    _check_type("offset", offset, float)
    channel = row.get("channel")
    if channel is not None and not (isinstance(channel, int) and not isinstance(channel, bool)):
        raise _BadRow("wrong field type", f"channel is {type(channel).__name__}, expected int")
    for key in ("id", "audio", "text", "language") + (("domain",) if domain else ()):
        _check_utf8(key, row[key])
    audio = _audio_path(row["audio"], manifest)
    return Utterance(id=row["id"], audio=audio, text=row["text"],
                     language=row["language"], duration=float(row["duration"]), domain=domain,
                     offset=float(offset), segment="offset" in row, channel=channel,
                     where=where)


def _audio_path(audio: str, manifest: Path) -> str:
    """The absolute path of a row's audio; a relative one must stay in the manifest's folder."""
    # abspath, not resolve(): no per-row symlink walk on manifests of a million rows. The check
    # is on the path as written (``..`` collapsed), not on where symlinks lead.
    folder = os.path.abspath(manifest.parent)
    path = os.path.abspath(os.path.join(folder, audio))
    if not os.path.isabs(audio) and os.path.commonpath([folder, path]) != folder:
        raise _BadRow("audio path outside the manifest folder",
                      f"{audio!r} leaves {folder}; give such paths in full")
    return path


def _check_type(key: str, value: Any, kind: type) -> None:
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:  # an integer of 400 digits is a number JSON allows, but no float
            ok = ok and math.isfinite(float(value)) and value >= 0
        except OverflowError:
            ok = False
        expected = "a non-negative number"
    else:
        ok = isinstance(value, kind)
        expected = kind.__name__
    if not ok:
        raise _BadRow("wrong field type", f"{key} is {value!r}, expected {expected}")


def _check_utf8(key: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadRow(f"{key} not valid UTF-8", repr(value)) from None


def _check_row(
    utt: Utterance, needs_text: bool, max_duration: float, check_audio: bool, seen: set[str]
) -> None:
    if not utt.id or not utt.language:
        raise _BadRow("missing field", "id" if not utt.id else "language")
    if utt.id in seen:
        raise _BadRow("duplicate id", utt.id)
    if needs_text and not utt.text.strip():
        raise _BadRow("empty text", repr(utt.text))
    if utt.duration == 0.0:
        raise _BadRow("zero-length audio", "duration is 0")
    if utt.duration > max_duration:
        raise _BadRow("longer than the limit", f"{utt.duration:.2f} s > {max_duration:g} s")
    if len(utt.text) > MAX_TEXT_CHARS_PER_SECOND * utt.duration + TEXT_CHARS_SLACK:
        raise _BadRow("text too long for its audio",
                      f"{len(utt.text)} characters for {utt.duration:.2f} s")
    if check_audio and utt.audio and not os.path.isfile(utt.audio):
        raise _BadRow("missing audio file", utt.audio)


# --------------------------------------------------------------------------- Lhotse cuts


def _require_lhotse():
    try:
        import lhotse
    except ImportError:
        raise ManifestError("reading Lhotse cuts needs lhotse: pip install 'speechrl[lhotse]'"
                            ) from None
    return lhotse


def _row_from_cut(row: dict[str, Any], manifest: Path, where: str) -> Utterance:
    """Text and language from the cut's supervisions, audio from its recording: a plain file
    source is read directly (with the cut's offset and duration); anything else (URLs,
    commands, in-memory audio, mixed cuts, recordings with transforms) through Lhotse."""
    _require_lhotse()
    from lhotse.serialization import deserialize_item

    try:
        cut = deserialize_item(row)
    except Exception as e:  # Lhotse raises assorted errors for malformed cuts
        raise _BadRow("not a valid Lhotse cut", f"{type(e).__name__}: {e}") from None
    supervisions = list(getattr(cut, "supervisions", None) or [])
    text = " ".join(s.text.strip() for s in supervisions if s.text)
    _check_utf8("text", text)
    language = next((s.language for s in supervisions if s.language), None)
    if language is None:
        raise _BadRow("missing field", "language (no supervision of the cut has one)")
    language = LANGUAGE_CODES.get(language.lower(), language)
    custom = getattr(cut, "custom", None) or {}
    domain = custom.get("domain")
    audio, offset, channel, lhotse_cut = _cut_source(cut)
    return Utterance(id=cut.id, audio=audio, text=text, language=language,
                     duration=float(cut.duration), domain=domain, offset=offset,
                     segment=lhotse_cut is None, channel=channel, where=where, cut=lhotse_cut)


def _cut_source(cut) -> tuple[str, float, int | tuple[int, ...] | None, Any]:
    recording = getattr(cut, "recording", None)
    simple = (type(cut).__name__ == "MonoCut" and recording is not None
              and len(recording.sources) == 1 and recording.sources[0].type == "file"
              and not recording.transforms)
    if not simple:
        return "", 0.0, None, cut
    source = recording.sources[0]
    wanted = cut.channel if isinstance(cut.channel, list) else [cut.channel]
    if any(c not in source.channels for c in wanted):
        raise _BadRow("wrong field type", f"channel {cut.channel} not in the recording's "
                      f"{source.channels}")
    index = tuple(source.channels.index(c) for c in wanted)
    # Lhotse recipes store paths relative to the working directory they ran in.
    audio = os.path.abspath(source.source)
    return audio, float(cut.start), index[0] if len(index) == 1 else index, None


# --------------------------------------------------------------------------- dataset


@dataclass
class Item:
    index: int
    id: str
    inputs: torch.Tensor  # (N, F) features or (S,) samples
    text: str
    language: str
    domain: str | None
    duration: float  # seconds of audio actually loaded (after augmentation)


@dataclass
class Skip:
    """What the dataset gives for a row whose audio turned out unusable."""

    index: int
    id: str
    reason: str
    where: str
    detail: str = ""


def input_spec(features: EncoderInput | str) -> EncoderInput:
    """``features`` as an :class:`~speechrl.encoders.EncoderInput`: an encoder's own
    ``input_spec``, or a kind ("fbank" | "whisper" | "waveform") with its defaults (80 mel bins,
    16 kHz, no normalisation)."""
    from speechrl.encoders import EncoderInput  # the loader alone need not import transformers

    return EncoderInput.default(features) if isinstance(features, str) else features


class SpeechDataset(Dataset):
    """Utterances -> :class:`Item` with the inputs ``features`` describes (an encoder's
    :class:`~speechrl.encoders.EncoderInput`, or a kind with its defaults: :func:`input_spec`).

    Audio is read at ``sample_rate`` (augmented there), then turned into the encoder's input
    at the encoder's own rate.

    A row whose audio cannot be used (unreadable, truncated, zero-length, shorter than
    ``MIN_AUDIO_SECONDS``, longer than ``max_duration``, or ``duration_tolerance`` seconds away
    from what the manifest says) comes back as a :class:`Skip`, or raises
    :class:`ManifestError` with ``strict``. With ``augment`` each item gets speed,
    reverberation and noise perturbation drawn from (seed, epoch, index).
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        *,
        features: EncoderInput | str = "fbank",
        sample_rate: int = audio_lib.SAMPLE_RATE,
        max_duration: float = math.inf,
        duration_tolerance: float = 0.5,
        strict: bool = False,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        self.utterances = list(utterances)
        self.features = input_spec(features)
        self.sample_rate = sample_rate
        self.max_duration = max_duration
        self.duration_tolerance = duration_tolerance
        self.strict = strict
        self.augment = augment
        self.seed = seed
        self.epoch = 0  # set by the loader before each pass, for augmentation

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> Item | Skip:
        utt = self.utterances[index]
        try:
            wave = self.load(utt)
        except AudioError as e:
            return self._bad(index, e.reason, str(e))
        except Exception as e:  # a decoder or Lhotse failure must not end a run
            return self._bad(index, "unreadable audio", f"{type(e).__name__}: {e}")
        real = len(wave) / self.sample_rate
        if real < MIN_AUDIO_SECONDS:
            return self._bad(index, "too short", f"{real:.3f} s < {MIN_AUDIO_SECONDS:g} s")
        if real > self.max_duration:
            return self._bad(index, "longer than the limit",
                             f"{real:.2f} s > {self.max_duration:g} s")
        if abs(real - utt.duration) > self.duration_tolerance:
            return self._bad(index, "duration mismatch",
                             f"manifest says {utt.duration:.2f} s, audio is {real:.2f} s")
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            wave = augment_waveform(wave, rng, self.sample_rate)
        inputs = self.features.features(wave, self.sample_rate)
        return Item(index, utt.id, inputs, utt.text, utt.language, utt.domain,
                    len(wave) / self.sample_rate)

    def load(self, utt: Utterance) -> np.ndarray:
        """Mono samples (S,) at the dataset's sample rate."""
        if utt.cut is not None:
            samples = utt.cut.resample(self.sample_rate).load_audio()  # (C, S)
            wave = np.asarray(samples, dtype=np.float32).mean(axis=0)
            if wave.size == 0:
                raise AudioError(f"cut {utt.id}: zero-length audio", "zero-length audio")
            return wave
        return audio_lib.load_audio(utt.audio, self.sample_rate, offset=utt.offset,
                                    duration=utt.duration if utt.segment else None,
                                    channel=utt.channel)

    def _bad(self, index: int, reason: str, detail: str) -> Skip:
        utt = self.utterances[index]
        if self.strict:
            raise ManifestError(f"{utt.where} (id={utt.id}): {reason}: {detail}")
        return Skip(index, utt.id, reason, utt.where, detail)


def augment_waveform(wave: np.ndarray, rng: np.random.Generator, sample_rate: int):
    """Training perturbation (S,) -> (S',): speed 0.9 / 1.1 (half the time), reverberation
    (RT60 0.2-0.6 s, 30 %), coloured noise at 10-30 dB SNR (30 %)."""
    if rng.random() < 0.5:
        wave = audio_lib.speed_perturb(wave, float(rng.choice([0.9, 1.1])), sample_rate)
    if rng.random() < 0.3:
        rir = audio_lib.room_impulse_response(rng.uniform(0.2, 0.6), rng, sample_rate,
                                              drr_db=rng.uniform(0.0, 10.0))
        wave = audio_lib.reverberate(wave, rir)
    if rng.random() < 0.3 and audio_lib.rms(wave) > 0:
        noise = audio_lib.coloured_noise(len(wave), float(rng.choice([0.0, 1.0, 2.0])), rng)
        wave = audio_lib.mix_at_snr(wave, noise, rng.uniform(10.0, 30.0))
    return wave


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    ids: list[str]
    inputs: torch.Tensor  # (B, N, F) features or (B, S) samples, zero-padded
    input_lengths: torch.Tensor  # (B,) long: valid frames (or samples) of each row
    texts: list[str]
    languages: list[str]
    domains: list[str | None]
    durations: torch.Tensor  # (B,) float seconds
    skipped: list[Skip] = field(default_factory=list)  # rows of this batch left out

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(self.ids, self.inputs.to(device, non_blocking=non_blocking),
                     self.input_lengths.to(device, non_blocking=non_blocking), self.texts,
                     self.languages, self.domains,
                     self.durations.to(device, non_blocking=non_blocking), self.skipped)


def pad_inputs(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(N_i, F)] -> (B, max N, F) or [(S_i,)] -> (B, max S), zero-padded, and lengths (B,)."""
    lengths = torch.tensor([x.shape[0] for x in inputs], dtype=torch.long)
    longest = int(lengths.max()) if len(inputs) else 0
    out = inputs[0].new_zeros((len(inputs), longest, *inputs[0].shape[1:])) if inputs else (
        torch.zeros(0, 0))
    for i, x in enumerate(inputs):
        out[i, : x.shape[0]] = x
    return out, lengths


def collate(items: Sequence[Item | Skip]) -> Batch:
    """Items -> :class:`Batch`; skipped rows are dropped from the tensors and listed."""
    good = [x for x in items if isinstance(x, Item)]
    inputs, lengths = pad_inputs([x.inputs for x in good])
    return Batch(
        ids=[x.id for x in good],
        inputs=inputs,
        input_lengths=lengths,
        texts=[x.text for x in good],
        languages=[x.language for x in good],
        domains=[x.domain for x in good],
        durations=torch.tensor([x.duration for x in good], dtype=torch.float32),
        skipped=[x for x in items if isinstance(x, Skip)],
    )


def features_for_files(
    paths: Sequence[str | Path], features: EncoderInput | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs ``features`` describes (:func:`input_spec`) of audio files as a batch: inputs
    (B, N, F) or (B, S), lengths (B,), durations (B,) in seconds. A file that cannot be read,
    or is shorter than ``MIN_AUDIO_SECONDS`` (as a manifest row would be skipped), raises
    :class:`AudioError`."""
    spec = input_spec(features)
    sample_rate = spec.sample_rate
    waves = [audio_lib.load_audio(p, sample_rate) for p in paths]
    for path, wave in zip(paths, waves, strict=True):
        if len(wave) / sample_rate < MIN_AUDIO_SECONDS:
            raise AudioError(f"{path}: too short ({len(wave) / sample_rate:.3f} s < "
                             f"{MIN_AUDIO_SECONDS:g} s)", "too short")
    inputs, lengths = pad_inputs([spec.features(w, sample_rate) for w in waves])
    durations = torch.tensor([len(w) / sample_rate for w in waves], dtype=torch.float32)
    return inputs, lengths, durations


class DurationBatchSampler:
    """Lists of dataset indices, each holding at most ``max_duration`` seconds of audio (or
    exactly ``batch_size`` utterances when that is given).

    Training: utterances are split into ``num_buckets`` equal-count duration buckets, each
    bucket is shuffled and cut into batches, and the batches are shuffled, all from
    (seed, epoch). With W ranks, duration batches are dealt out (rank r takes batches r, r + W,
    ... of a list cut to a multiple of W, so every rank runs the same number of steps);
    fixed-size batches are cut W times larger and rank r takes the r-th slice of each, so the
    utterances of a step are the same whatever W (bar bucket remainders of fewer than W
    utterances, which W ranks cannot share and drop). Evaluation: longest first (a memory problem
    shows at once), no shuffling, nothing dropped (ranks may differ by one batch).

    The position inside the epoch is part of :meth:`state_dict`, so a run resumed from a
    checkpoint continues with exactly the next batch.
    """

    def __init__(
        self,
        durations: Sequence[float],
        *,
        max_duration: float | None = None,
        batch_size: int | None = None,
        num_buckets: int = 8,
        training: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size is None and (max_duration is None or max_duration <= 0):
            raise ValueError(f"give max_duration > 0 (seconds per batch) or batch_size, got "
                             f"max_duration={max_duration}, batch_size={batch_size}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.durations = np.asarray(durations, dtype=np.float64)
        self.max_duration = max_duration
        self.batch_size = batch_size
        self.num_buckets = max(1, num_buckets)
        self.training = training
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._position = 0  # batches of this epoch already consumed
        self._resume = False  # the next pass starts at _position instead of 0
        self._tracked = False  # the loader, not the iterator, advances _position
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self._position, self._resume = epoch, 0, False

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches()
        start = self._position if self._resume else 0
        self._resume = False
        self._position = start
        for i in range(start, len(batches)):
            if not self._tracked:
                self._position = i + 1
            yield batches[i]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self._position, "seed": self.seed,
                "num_utterances": len(self.durations), "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off: the next pass starts at its position."""
        now = (self.seed, len(self.durations), self.world_size)
        saved = (state.get("seed", now[0]), state.get("num_utterances", now[1]),
                 state.get("world_size", now[2]))
        if saved != now:
            warnings.warn(f"resuming batches with other data or settings: (seed, utterances, "
                          f"world size) was {saved}, is {now}; the batch order will not match "
                          "the original run", stacklevel=2)
        self.epoch = int(state["epoch"])
        self._position = min(int(state["position"]), len(self._epoch_batches()))
        self._resume = True

    @contextlib.contextmanager
    def tracked_by_consumer(self) -> Iterator[int]:
        """While active, the position counts batches the consumer received (through
        :meth:`advance`), not those handed to DataLoader workers that prefetch ahead.
        Yields the position the next pass starts at."""
        self._tracked = True
        try:
            yield self._position if self._resume else 0
        finally:
            self._tracked = False

    def advance(self) -> None:
        self._position += 1

    def _epoch_batches(self) -> list[list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._make_batches())
        return self._cache[1]

    def _make_batches(self) -> list[list[int]]:
        if not self.training:
            order = np.argsort(-self.durations, kind="stable")
            return self._pack(order, self.batch_size)[self.rank :: self.world_size]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = np.argsort(self.durations, kind="stable")
        # Fixed-size batches are cut at the global size (batch_size per rank x world size) and
        # each rank takes its slice, so a step's utterances do not depend on the number of ranks.
        size = None if self.batch_size is None else self.batch_size * self.world_size
        batches: list[list[int]] = []
        for bucket in np.array_split(order, min(self.num_buckets, max(len(order), 1))):
            batches += self._pack(rng.permutation(bucket), size)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.batch_size is not None:
            mine = [np.array_split(b, self.world_size)[self.rank].tolist()
                    for b in batches if len(b) >= self.world_size]
        else:
            usable = len(batches) // self.world_size * self.world_size
            mine = batches[self.rank : usable : self.world_size]
        if not mine:
            raise ValueError(f"{len(batches)} batch(es) of data for {self.world_size} ranks: "
                             "lower max_duration / batch_size or add data")
        return mine

    def _pack(self, indices: np.ndarray, batch_size: int | None) -> list[list[int]]:
        if batch_size is not None:
            return [indices[i : i + batch_size].tolist()
                    for i in range(0, len(indices), batch_size)]
        batches, current, total = [], [], 0.0
        for i in indices.tolist():
            if current and total + self.durations[i] > self.max_duration:
                batches.append(current)
                current, total = [], 0.0
            current.append(i)
            total += self.durations[i]
        if current:
            batches.append(current)
        return batches


class SpeechDataLoader(DataLoader):
    """A DataLoader over a :class:`SpeechDataset` with a :class:`DurationBatchSampler`.

    ``skips`` counts every row left out, at read time and at load time (rows found bad inside
    worker processes are reported back through the batches). Batches whose rows were all bad
    are not yielded, but still count as consumed for the sampler's position.

    Each pass draws the workers' base seed from the loader's own generator, seeded from
    (seed, epoch): a DataLoader without one draws it from torch's global generator, which a
    pass begun mid-epoch by a resumed run would then advance once more than the uninterrupted
    run did, and every later dropout mask would differ.
    """

    def __init__(self, dataset: SpeechDataset, *, batch_sampler: DurationBatchSampler,
                 skips: SkipCounter, num_workers: int = 0) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                         num_workers=num_workers, generator=torch.Generator())
        self.skips = skips

    def __iter__(self) -> Iterator[Batch]:
        sampler = self.batch_sampler
        self.dataset.epoch = sampler.epoch  # workers copy the dataset when the pass starts
        seed = np.random.SeedSequence([sampler.seed, sampler.epoch]).generate_state(1)[0]
        self.generator.manual_seed(int(seed))
        with sampler.tracked_by_consumer():
            for batch in super().__iter__():
                sampler.advance()
                for s in batch.skipped:
                    self.skips.add(s.reason, f"{s.where} id={s.id}", s.detail)
                if len(batch):
                    yield batch


def make_dataloader(
    manifests: Sequence[str | Path] | str | Path,
    cfg: DataConfig,
    *,
    features: EncoderInput | str,
    training: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int | None = None,
    max_utterances: int | None = None,
) -> SpeechDataLoader:
    """Batches of the inputs an encoder takes from manifests / CutSets: ``features`` is its
    ``input_spec`` (kind, mel bins, sample rate, normalisation; a 128-bin Whisper gets 128
    bins), or a kind ("fbank" | "whisper" | "waveform") with its defaults.

    Batches hold up to ``cfg.max_duration`` seconds of audio, or ``batch_size`` utterances when
    given. ``max_utterances`` keeps that many rows spread evenly over the manifests (a quick dev
    set that still covers every language). The loader's ``batch_sampler`` holds the resumable
    position, ``skips`` the rows left out (print ``loader.skips.summary()`` at the end of a run).
    """
    if isinstance(manifests, (str, Path)):
        manifests = [manifests]
    if not manifests:
        raise ValueError("no manifests given")
    skips = SkipCounter()
    utterances: list[Utterance] = []
    for manifest in manifests:
        rows, _ = read_manifest(manifest, training=training,
                                max_duration=cfg.max_utterance_duration, strict=cfg.strict,
                                skips=skips, allow_empty_text=cfg.train_empty_text)
        utterances += rows
    if not utterances:
        raise ManifestError(f"no usable utterances in {[str(m) for m in manifests]}: "
                            f"{skips.summary()}")
    if max_utterances is not None and len(utterances) > max_utterances:
        keep = np.unique(np.linspace(0, len(utterances) - 1, max_utterances).round().astype(int))
        utterances = [utterances[i] for i in keep]
    dataset = SpeechDataset(
        utterances, features=input_spec(features), sample_rate=cfg.sample_rate,
        max_duration=cfg.max_utterance_duration, duration_tolerance=cfg.duration_tolerance,
        strict=cfg.strict, augment=cfg.augment and training, seed=seed)
    sampler = DurationBatchSampler(
        [u.duration for u in utterances], max_duration=cfg.max_duration, batch_size=batch_size,
        num_buckets=cfg.num_buckets, training=training, seed=seed, rank=rank,
        world_size=world_size)
    len(sampler)  # too little data for the ranks fails here, not at the first step
    return SpeechDataLoader(dataset, batch_sampler=sampler, skips=skips,
                            num_workers=cfg.num_workers)
