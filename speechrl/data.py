"""Utterances in, padded batches out: the dataset (audio decoded, checked, augmented,
turned into features), the collate, and the loader that puts a manifest
(:mod:`speechrl.manifest`), a sampler (:mod:`speechrl.sampling`) and the dataset together.

* A row whose audio turns out unusable when the dataset loads it comes back as a :class:`Skip`
  and is dropped by :func:`collate`; it is counted by reason in the loader's
  :class:`~speechrl.manifest.SkipCounter` (``strict=True`` raises
  :class:`~speechrl.manifest.ManifestError` instead).
* :class:`~speechrl.sampling.DurationBatchSampler` fills batches up to ``max_duration`` seconds
  of audio within duration buckets, shuffles by (seed, epoch), shards by (rank, world size) and
  can resume in the middle of an epoch; :func:`make_dataloader` puts it all together.

Shapes: B batch, N frames, F features, S samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from speechrl import audio as audio_lib
from speechrl.audio import AudioError
from speechrl.config import DataConfig
from speechrl.manifest import (
    MIN_AUDIO_SECONDS,
    ManifestError,
    SkipCounter,
    Utterance,
    read_manifest,
)
from speechrl.sampling import DurationBatchSampler

if TYPE_CHECKING:
    from speechrl.encoders import EncoderInput


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

    ``known`` maps the ids of utterances whose inputs the consumer no longer needs (their
    encoder output is cached: ``sft.cache_encoder_outputs``) to the seconds of audio they held;
    such an utterance is neither read nor featurised, and its :class:`Item` carries empty
    inputs (0, F) or (0,). The consumer may fill the mapping while a pass runs; a worker
    process sees it as it was when the pass began.
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
        self.known: Mapping[str, float] = {}

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> Item | Skip:
        utt = self.utterances[index]
        if utt.id in self.known:  # its inputs would go unused
            return Item(index, utt.id, self._empty_inputs(), utt.text, utt.language,
                        utt.domain, self.known[utt.id])
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
            wave = audio_lib.augment_waveform(wave, rng, self.sample_rate)
        inputs = self.features.features(wave, self.sample_rate)
        return Item(index, utt.id, inputs, utt.text, utt.language, utt.domain,
                    len(wave) / self.sample_rate)

    def _empty_inputs(self) -> torch.Tensor:
        """(0, F) features, or (0,) samples for a waveform encoder."""
        spec = self.features
        return torch.zeros(0) if spec.kind == "waveform" else torch.zeros(0, spec.n_mels)

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
        utterances, features=features, sample_rate=cfg.sample_rate,
        max_duration=cfg.max_utterance_duration, duration_tolerance=cfg.duration_tolerance,
        strict=cfg.strict, augment=cfg.augment and training, seed=seed)
    sampler = DurationBatchSampler(
        [u.duration for u in utterances], max_duration=cfg.max_duration, batch_size=batch_size,
        num_buckets=cfg.num_buckets, training=training, seed=seed, rank=rank,
        world_size=world_size)
    len(sampler)  # too little data for the ranks fails here, not at the first step
    return SpeechDataLoader(dataset, batch_sampler=sampler, skips=skips,
                            num_workers=cfg.num_workers)
