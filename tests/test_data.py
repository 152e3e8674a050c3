"""data.py: manifests and their bad rows, Lhotse cuts, dataset, batching, resuming, collate."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechrl.config import DataConfig
from speechrl.data import (
    Skip,
    SpeechDataset,
    collate,
    features_for_files,
    make_dataloader,
)
from speechrl.manifest import ManifestError, read_manifest, read_manifest_texts, write_manifest
from speechrl.sampling import DurationBatchSampler

SR = 16000


def write_tone(path: Path, seconds: float, freq: float = 440.0, sr: int = SR) -> Path:
    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)
    return path


def row(i: int, seconds: float, **extra) -> dict:
    base = {"id": f"u{i}", "audio": f"wav/u{i}.wav", "text": f"words of row {i}",
            "language": "en", "duration": seconds}
    base.update(extra)
    return base


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Eight good rows, 0.5 to 4.0 s, audio relative to the manifest's folder."""
    (tmp_path / "wav").mkdir()
    rows = []
    for i in range(8):
        seconds = 0.5 * (i + 1)
        write_tone(tmp_path / "wav" / f"u{i}.wav", seconds, 200 + 50 * i)
        rows.append(row(i, seconds, domain="clean"))
    return write_jsonl(tmp_path / "train.jsonl", rows)


# --------------------------------------------------------------------------- manifests


def test_read_and_write_round_trip(corpus, tmp_path):
    utts, skips = read_manifest(corpus, training=True, max_duration=30.0)
    assert len(skips) == 0 and skips.summary() == "no rows skipped"
    assert [u.id for u in utts] == [f"u{i}" for i in range(8)]
    assert utts[2].audio == str((tmp_path / "wav" / "u2.wav").resolve())
    assert utts[2].duration == 1.5 and utts[2].domain == "clean" and utts[2].where.endswith(":3")
    out = write_manifest(tmp_path / "copy.jsonl", utts)
    first = json.loads(out.read_text().splitlines()[0])
    assert first == {"id": "u0", "audio": "wav/u0.wav", "text": "words of row 0",
                     "language": "en", "duration": 0.5, "domain": "clean"}
    again, _ = read_manifest(out, training=True, max_duration=30.0)
    assert [(u.id, u.audio, u.text, u.duration) for u in again] == [
        (u.id, u.audio, u.text, u.duration) for u in utts]
    assert read_manifest_texts(corpus)[:2] == ["words of row 0", "words of row 1"]


def as_line(r: dict) -> bytes:
    return json.dumps(r).encode()


BAD_ROWS = {
    "missing field": as_line({k: v for k, v in row(9, 1.0).items() if k != "text"}),
    "wrong field type": as_line(row(9, "1.0")),
    "not valid JSON": b'{"id": "u9", "audio": ',
    "text not valid UTF-8": as_line(row(9, 1.0)).replace(b"words", b"w\xffrds"),
    "duplicate id": as_line(row(0, 0.5)),
    "empty text": as_line(row(9, 1.0, text="   ")),
    "longer than the limit": as_line(row(9, 40.0)),
    "missing audio file": as_line(row(9, 1.0, audio="wav/nowhere.wav")),
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_bad_row_is_skipped_and_counted_or_raises_when_strict(corpus, reason):
    lines = corpus.read_bytes().splitlines()
    lines.insert(3, BAD_ROWS[reason])
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    utts, skips = read_manifest(corpus, training=True, max_duration=30.0)
    assert len(utts) == 8  # the bad row, line 4, and nothing else is gone
    assert skips.counts == {reason: 1}
    assert f"1 {reason} (e.g. {corpus}:4" in skips.summary()
    with pytest.raises(ManifestError, match=rf"{corpus.name}:4 \(id=(u[09]|\?)\): {reason}"):
        read_manifest(corpus, training=True, max_duration=30.0, strict=True)


def test_empty_text_is_kept_for_evaluation(corpus):
    write_jsonl(corpus, [row(0, 0.5, text="")])
    utts, skips = read_manifest(corpus, training=False, max_duration=30.0)
    assert [u.text for u in utts] == [""] and len(skips) == 0


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="nope.jsonl does not exist"):
        read_manifest(tmp_path / "nope.jsonl", training=True, max_duration=30.0)


# --------------------------------------------------------------------------- load-time checks


def make_load_time_bad(tmp_path: Path, reason: str) -> dict:
    wav = tmp_path / "wav" / "bad.wav"
    if reason == "unreadable audio":
        wav.write_bytes(b"not audio at all" * 10)
        return row(9, 1.0, audio="wav/bad.wav")
    if reason == "truncated audio":
        write_tone(wav, 1.0)
        wav.write_bytes(wav.read_bytes()[:20000])
        return row(9, 1.0, audio="wav/bad.wav")
    if reason == "zero-length audio":
        sf.write(wav, np.zeros(0, np.float32), SR)
        return row(9, 0.5, audio="wav/bad.wav")
    if reason == "duration mismatch":
        write_tone(wav, 1.0)
        return row(9, 3.0, audio="wav/bad.wav")  # the manifest says 3 s, the file has 1 s
    assert reason == "longer than the limit"
    write_tone(wav, 6.0)
    return row(9, 1.0, audio="wav/bad.wav")  # the field says 1 s, the audio runs 6 s


LOAD_TIME = ["unreadable audio", "truncated audio", "zero-length audio", "duration mismatch",
             "longer than the limit"]


@pytest.mark.parametrize("reason", LOAD_TIME)
def test_load_time_bad_row_is_dropped_by_collate_and_counted(corpus, tmp_path, reason):
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    rows.insert(1, make_load_time_bad(tmp_path, reason))
    write_jsonl(corpus, rows)
    cfg = DataConfig(max_duration=100.0, max_utterance_duration=5.0)
    loader = make_dataloader([corpus], cfg, features="fbank", training=False)
    ids = [i for batch in loader for i in batch.ids]
    assert sorted(ids) == sorted(f"u{i}" for i in range(8))  # u9 is gone, the rest is there
    assert loader.skips.counts == {reason: 1}
    assert f"{corpus}:2 id=u9" in loader.skips.summary()
    strict = make_dataloader([corpus], DataConfig(max_duration=100.0, max_utterance_duration=5.0,
                                                  strict=True), features="fbank", training=False)
    with pytest.raises(ManifestError, match=rf":2 \(id=u9\): {reason}"):
        list(strict)


def test_dataset_returns_skip_and_collate_keeps_the_rest(corpus, tmp_path):
    utts, _ = read_manifest(corpus, training=True, max_duration=30.0)
    write_tone(tmp_path / "wav" / "u1.wav", 3.0)  # u1 now disagrees with its 1.0 s field
    ds = SpeechDataset(utts[:3], features="waveform")
    items = [ds[i] for i in range(3)]
    assert isinstance(items[1], Skip) and items[1].reason == "duration mismatch"
    batch = collate(items)
    assert batch.ids == ["u0", "u2"] and batch.input_lengths.tolist() == [8000, 24000]
    assert [s.id for s in batch.skipped] == ["u1"]


# --------------------------------------------------------------------------- Lhotse


def make_cuts(tmp_path: Path) -> tuple[Path, np.ndarray]:
    lhotse = pytest.importorskip("lhotse")
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 3 * SR).astype(np.float32)
    sf.write(tmp_path / "rec.wav", wave, SR, subtype="FLOAT")
    rec = lhotse.Recording.from_file(tmp_path / "rec.wav", recording_id="rec")
    sups = [lhotse.SupervisionSegment(id=f"s{i}", recording_id="rec", start=0.5 + i,
                                      duration=1.0, text=f"segment {i}", language="English")
            for i in range(2)]
    cuts = lhotse.CutSet.from_manifests(
        recordings=lhotse.RecordingSet.from_recordings([rec]),
        supervisions=lhotse.SupervisionSet.from_segments(sups)).trim_to_supervisions()
    path = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(path)
    return path, wave


def test_lhotse_cuts_are_read_as_segments(tmp_path):
    path, wave = make_cuts(tmp_path)
    utts, skips = read_manifest(path, training=True, max_duration=30.0)
    assert len(skips) == 0
    assert [(u.id, u.text, u.language, u.offset, u.duration) for u in utts] == [
        ("s0", "segment 0", "en", 0.5, 1.0), ("s1", "segment 1", "en", 1.5, 1.0)]
    ds = SpeechDataset(utts, features="waveform")
    np.testing.assert_array_equal(ds[1].inputs.numpy(), wave[24000:40000])  # 1.5 s .. 2.5 s


@pytest.mark.filterwarnings("ignore:You requested a subset")
def test_lhotse_cut_with_a_command_source_goes_through_lhotse(tmp_path):
    lhotse = pytest.importorskip("lhotse")  # skipped, not an error, without the extra
    from lhotse.utils import fastcopy

    path, wave = make_cuts(tmp_path)
    cut = next(iter(lhotse.CutSet.from_file(path)))
    source = lhotse.audio.AudioSource(type="command", channels=[0],
                                      source=f"cat {tmp_path / 'rec.wav'}")
    piped = fastcopy(cut, recording=fastcopy(cut.recording, sources=[source]))
    lhotse.CutSet.from_cuts([piped]).to_file(tmp_path / "cmd.jsonl.gz")
    utts, _ = read_manifest(tmp_path / "cmd.jsonl.gz", training=True, max_duration=30.0)
    assert utts[0].audio == "" and utts[0].cut is not None
    got = SpeechDataset(utts, features="waveform")[0].inputs.numpy()
    np.testing.assert_allclose(got, wave[8000:24000], atol=1e-6)  # 0.5 s .. 1.5 s


def test_lhotse_recording_set_is_refused_with_advice(tmp_path):
    with gzip.open(tmp_path / "recs.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "r", "sources": [], "sampling_rate": 16000,
                            "num_samples": 1, "duration": 1.0}) + "\n")
    with pytest.raises(ManifestError, match="RecordingSet; give a CutSet"):
        read_manifest(tmp_path / "recs.jsonl.gz", training=True, max_duration=30.0)


def test_cuts_without_lhotse_installed_say_how_to_get_it(tmp_path, monkeypatch):
    path, _ = make_cuts(tmp_path)
    monkeypatch.setitem(sys.modules, "lhotse", None)  # import lhotse now raises ImportError
    with pytest.raises(ManifestError, match=r"pip install 'speechrl\[lhotse\]'"):
        read_manifest(path, training=True, max_duration=30.0)


# --------------------------------------------------------------------------- sampler


DURS = [0.5, 3.0, 1.0, 2.5, 0.7, 4.0, 1.2, 2.2, 0.9, 3.3, 1.8, 2.9, 0.6, 1.1, 3.7, 2.0]


def flatten(batches):
    return [i for b in batches for i in b]


def test_sampler_respects_max_duration_and_covers_every_utterance_once():
    s = DurationBatchSampler(DURS, max_duration=5.0, num_buckets=4, seed=1)
    batches = list(s)
    assert sorted(flatten(batches)) == list(range(16))
    assert all(sum(DURS[i] for i in b) <= 5.0 for b in batches)
    # Buckets of four by duration: a batch never mixes utterances from different buckets.
    bucket_of = {i: rank // 4 for rank, i in enumerate(np.argsort(DURS, kind="stable"))}
    assert all(len({bucket_of[i] for i in b}) == 1 for b in batches)


def test_sampler_shuffle_is_reproducible_by_seed_and_epoch():
    a = DurationBatchSampler(DURS, max_duration=5.0, seed=3)
    b = DurationBatchSampler(DURS, max_duration=5.0, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 == list(b)
    a.set_epoch(0)
    assert list(a) != epoch1


def test_sampler_shards_evenly_disjointly_and_cover_the_epoch():
    shards = [list(DurationBatchSampler(DURS, max_duration=3.0, seed=0, rank=r, world_size=3))
              for r in range(3)]
    assert len({len(s) for s in shards}) == 1  # same number of steps on every rank
    seen = [set(flatten(s)) for s in shards]
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    # Together they hold every batch of the one-rank epoch (the same seed makes the same
    # batches) except the last len % 3, which three ranks cannot share out evenly.
    whole = list(DurationBatchSampler(DURS, max_duration=3.0, seed=0))
    assert sorted(flatten(whole)) == list(range(16))  # one rank: everything, once
    usable = len(whole) // 3 * 3
    assert sorted(flatten(sum(shards, []))) == sorted(flatten(whole[:usable]))
    assert len(whole) - usable < 3
    # Fixed-size batches of 2 per rank, 2 ranks, buckets of 8: nothing is left over, and the
    # two ranks together see every utterance once.
    halves = [list(DurationBatchSampler(DURS, batch_size=2, num_buckets=2, seed=0, rank=r,
                                        world_size=2)) for r in range(2)]
    assert sorted(flatten(halves[0] + halves[1])) == list(range(16))


def test_evaluation_order_is_longest_first_and_keeps_everything():
    shards = [list(DurationBatchSampler(DURS, max_duration=5.0, training=False, rank=r,
                                        world_size=2)) for r in range(2)]
    assert sorted(flatten(shards[0] + shards[1])) == list(range(16))
    single = list(DurationBatchSampler(DURS, max_duration=5.0, training=False))
    assert [DURS[i] for i in flatten(single)] == sorted(DURS, reverse=True)
    # 4.0 + 3.7 > 5, so the longest goes alone; then 3.7, then 3.3, then 3.0 (3.0 + 2.9 > 5).
    assert single[:3] == [[5], [14], [9]]


def test_batch_size_mode():
    s = DurationBatchSampler(DURS, batch_size=4, num_buckets=2, seed=0)
    assert [len(b) for b in s] == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="max_duration > 0"):
        DurationBatchSampler(DURS)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        DurationBatchSampler(DURS, max_duration=5.0, rank=2, world_size=2)


def test_too_few_batches_for_the_ranks_is_a_clear_error():
    s = DurationBatchSampler([1.0, 1.0], max_duration=10.0, num_buckets=1, world_size=2)
    with pytest.raises(ValueError, match="1 batch\\(es\\) of data for 2 ranks"):
        len(s)


def test_sampler_resumes_with_exactly_the_next_batch():
    full = DurationBatchSampler(DURS, max_duration=3.0, seed=5)
    full.set_epoch(2)
    expected = list(full)
    s = DurationBatchSampler(DURS, max_duration=3.0, seed=5)
    s.set_epoch(2)
    it = iter(s)
    taken = [next(it) for _ in range(3)]
    state = s.state_dict()
    assert state["epoch"] == 2 and state["position"] == 3
    resumed = DurationBatchSampler(DURS, max_duration=3.0, seed=5)
    resumed.set_epoch(state["epoch"])  # what the trainer's loop does before restoring
    resumed.load_state_dict(state)
    assert taken + list(resumed) == expected
    assert list(resumed) == expected  # the next pass starts the epoch again


# --------------------------------------------------------------------------- loader


@pytest.mark.parametrize("kind,shape", [("fbank", 80), ("whisper", 80), ("waveform", None)])
def test_loader_batches_and_features(corpus, kind, shape):
    loader = make_dataloader([corpus], DataConfig(max_duration=5.0), features=kind,
                             training=False)
    batches = list(loader)
    assert sum(len(b) for b in batches) == 8
    batch = batches[-1]  # shortest utterances (evaluation runs longest first)
    assert batch.inputs.dim() == (3 if shape else 2) and batch.input_lengths.dtype == torch.long
    if shape:
        assert batch.inputs.shape[-1] == shape
    assert batch.durations.tolist() == pytest.approx([0.5 * (int(i[1:]) + 1) for i in batch.ids])
    assert batch.languages == ["en"] * len(batch) and batch.domains == ["clean"] * len(batch)
    assert batch.to("cpu").inputs.data_ptr() == batch.inputs.data_ptr()


@pytest.mark.parametrize("kind,empty", [("fbank", (0, 80)), ("waveform", (0,))])
def test_known_utterances_are_neither_read_nor_featurised(corpus, kind, empty):
    utts, _ = read_manifest(corpus, training=True, max_duration=30.0)
    Path(utts[1].audio).unlink()  # reading u1 would now make it a Skip
    ds = SpeechDataset(utts[:3], features=kind)
    ds.known = {"u1": 0.75}
    items = [ds[i] for i in range(3)]
    assert items[1].inputs.shape == empty and items[1].duration == 0.75
    assert (items[1].text, items[1].language) == (utts[1].text, utts[1].language)
    batch = collate(items)
    assert batch.ids == ["u0", "u1", "u2"] and batch.input_lengths[1] == 0
    assert batch.durations.tolist() == [0.5, 0.75, 1.5]
    assert torch.equal(batch.inputs[2, : batch.input_lengths[2]], SpeechDataset(
        utts[:3], features=kind)[2].inputs)
    ds.known = {}
    assert isinstance(ds[1], Skip)


def test_padded_batch_rows_equal_single_utterance_features(corpus):
    utts, _ = read_manifest(corpus, training=True, max_duration=30.0)
    ds = SpeechDataset(utts, features="fbank")
    batch = collate([ds[i] for i in (1, 4, 6)])
    for row_index, i in enumerate((1, 4, 6)):
        alone = ds[i].inputs
        n = int(batch.input_lengths[row_index])
        assert n == alone.shape[0] == 1 + (int(0.5 * (i + 1) * SR) - 400) // 160
        assert torch.equal(batch.inputs[row_index, :n], alone)
        assert not batch.inputs[row_index, n:].any()  # zero padding
    inputs, lengths, durations = features_for_files([utts[1].audio, utts[4].audio], "fbank")
    assert torch.equal(inputs[0, : lengths[0]], ds[1].inputs)
    assert durations.tolist() == [1.0, 2.5]


def test_max_utterances_spreads_over_the_manifest(corpus):
    loader = make_dataloader([corpus], DataConfig(max_duration=100.0), features="waveform",
                             training=False, max_utterances=3)
    assert sorted(i for b in loader for i in b.ids) == ["u0", "u4", "u7"]  # rows 0, 3.5->4, 7


def test_loader_resume_position_counts_received_batches_with_prefetching_workers(corpus):
    cfg = DataConfig(max_duration=2.0, num_buckets=1, num_workers=2)
    loader = make_dataloader([corpus], cfg, features="waveform", training=True, seed=7)
    expected = [b.ids for b in loader]
    assert len(expected) >= 5
    it = iter(loader)
    got = [next(it).ids for _ in range(2)]  # workers have prefetched further by now
    state = loader.batch_sampler.state_dict()
    assert state["position"] == 2
    del it
    again = make_dataloader([corpus], cfg, features="waveform", training=True, seed=7)
    again.batch_sampler.load_state_dict(state)
    assert got + [b.ids for b in again] == expected


def test_augmentation_is_reproducible_by_seed_epoch_and_index(corpus):
    utts, _ = read_manifest(corpus, training=True, max_duration=30.0)
    ds = SpeechDataset(utts, features="waveform", augment=True, seed=1)
    plain = SpeechDataset(utts, features="waveform")
    runs = [[ds[i].inputs for i in range(8)] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert any(not torch.equal(a, plain[i].inputs) for i, a in enumerate(runs[0]))
    ds.epoch = 1
    assert any(not torch.equal(ds[i].inputs, runs[0][i]) for i in range(8))


def test_no_usable_rows_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [row(0, 1.0, audio="missing.wav")])
    with pytest.raises(ManifestError, match="no usable utterances.*1 missing audio file"):
        make_dataloader([tmp_path / "m.jsonl"], DataConfig(), features="fbank", training=True)
