"""Manifests: reading and writing them, Lhotse CutSets, and the checks of bad rows.

* A manifest is JSONL, one utterance a line: ``{"id", "audio", "text", "language", "duration",
  "domain"?}`` (an optional ``offset`` in seconds reads a segment of a longer file; other keys
  are ignored). ``audio`` is absolute, or relative to the manifest's folder and then must stay
  inside it: ``../x.flac`` is skipped ("audio path outside the manifest folder"), so a manifest
  handed around cannot reach files beside or above its own folder unless it says so in full. A
  Lhotse CutSet (``cuts.jsonl.gz``) is accepted wherever a manifest is.
* Bad rows never stop a run. Cheap checks happen here, when a manifest is read
  (:func:`read_manifest`); checks that need the audio decoded happen when the dataset
  (:mod:`speechrl.data`) loads an item. Each is counted by reason in a :class:`SkipCounter`;
  ``strict=True`` raises :class:`ManifestError` naming the file, line and id instead.
* :func:`corpus_texts`: the transcripts of manifests (and lines of text files), for the
  stages that train on text alone (the LM, the CTC vocabulary).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def corpus_texts(manifests, extra_files=()) -> list[str]:
    """Transcripts of the manifests (audio is not read) and the lines of plain-text files."""
    texts = [t for m in manifests for t in read_manifest_texts(m)]
    for path in extra_files:
        texts += [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return texts
