"""Audio in, features out, and the acoustic domain shifts of the synthetic corpus.

* :func:`load_audio` reads any file soundfile knows (WAV, FLAC, OGG/Opus, ...), mixes channels
  down and resamples to 16 kHz with soxr; a file that cannot be used raises :class:`AudioError`.
* Features for the encoders (``kind`` as in ``speechrl.encoders``): ``"fbank"`` 80-bin log-mel
  for the built-in Conformer, ``"whisper"`` Whisper's log-mel, ``"waveform"`` the samples.
* Augmentations: additive noise at an exact SNR, coloured (1/f^alpha) noise, babble, synthetic
  room impulse responses and reverberation, speed perturbation, a narrow-band telephone channel.
  They are plain numpy and take a ``np.random.Generator`` where they draw anything, so a seed
  fixes the result.

Shapes: S samples, N frames, F features (mel bins).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import soxr

if TYPE_CHECKING:
    import torch

# torch is imported by the feature functions that need it: the synthetic corpus (and the
# command line's --help, which lists synth's options) need only numpy.

SAMPLE_RATE = 16000
FEATURE_KINDS = ("fbank", "whisper", "waveform")
WHISPER_WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper reads 30 s windows


class AudioError(ValueError):
    """An audio file that cannot be used. ``reason`` is a short category for skip counts:
    "missing audio file", "unreadable audio", "truncated audio", "zero-length audio"."""

    def __init__(self, message: str, reason: str = "unreadable audio") -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------- loading


def load_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    *,
    offset: float = 0.0,
    duration: float | None = None,
    channel: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Mono float32 samples (S,) at ``sample_rate``.

    ``offset`` / ``duration`` (seconds) read a segment of a longer recording; ``channel`` picks
    one channel or averages several (None averages all).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such audio file", "missing audio file")
    if path.lower().endswith(".wav"):
        _check_wav_complete(path)
    try:
        with sf.SoundFile(path) as f:
            native_rate, total = f.samplerate, f.frames
            start = round(offset * native_rate)
            if start > total:
                raise AudioError(f"{path}: offset {offset:.3f} s is past the end "
                                 f"({total / native_rate:.3f} s)", "truncated audio")
            frames = total - start if duration is None else round(duration * native_rate)
            f.seek(start)
            data = f.read(frames, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (RuntimeError, OSError, ValueError) as e:  # LibsndfileError is a RuntimeError
        raise AudioError(f"{path}: unreadable, truncated or corrupt audio ({e})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: zero-length audio", "zero-length audio")
    wave = _select_channels(data, channel, path)
    if not np.isfinite(wave).all():
        raise AudioError(f"{path}: audio has NaN or infinite samples")
    if native_rate != sample_rate:
        wave = resample(wave, native_rate, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def _select_channels(data: np.ndarray, channel: int | Sequence[int] | None, path: str):
    """(S, C) -> (S,): one channel, or the mean of several."""
    if channel is None:
        return data.mean(axis=1)
    picked = [channel] if isinstance(channel, int) else list(channel)
    bad = [c for c in picked if not 0 <= c < data.shape[1]]
    if bad:
        raise AudioError(f"{path}: channel {bad} requested but the file has {data.shape[1]}")
    return data[:, picked].mean(axis=1)


def _check_wav_complete(path: str) -> None:
    """Raise if a RIFF/WAVE file holds fewer sample bytes than its header declares.

    libsndfile silently reads what is there, so a cut-off download would pass as a short file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not plain RIFF (RF64, W64...): leave it to libsndfile
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return
            declared = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                available = size - f.tell()
                # Writers streaming to a pipe put a placeholder size near 2**31 or 2**32.
                if declared < 0x7FFF0000 and declared > available:
                    raise AudioError(f"{path}: truncated WAV: the header declares {declared} "
                                     f"bytes of samples, the file holds {available}",
                                     "truncated audio")
                return
            f.seek(declared + (declared & 1), os.SEEK_CUR)


def resample(wave: np.ndarray, orig_rate: float, target_rate: float) -> np.ndarray:
    """(S,) at ``orig_rate`` -> (S * target / orig,) at ``target_rate`` (soxr, high quality)."""
    if orig_rate == target_rate:
        return wave
    return soxr.resample(wave, orig_rate, target_rate, quality="HQ").astype(np.float32)


# --------------------------------------------------------------------------- features


def features(
    wave: np.ndarray, kind: str, sample_rate: int = SAMPLE_RATE, n_mels: int | None = 80
) -> torch.Tensor:
    """(S,) at ``sample_rate`` -> (N, n_mels) log-mel for ``"fbank"`` / ``"whisper"`` (16 kHz
    only), or the samples (S,) as float32 for ``"waveform"``. What an encoder takes, resampled
    and normalised, is :meth:`speechrl.encoders.EncoderInput.features`, which calls this."""
    import torch

    _check_kind(kind)
    if kind == "fbank":
        return log_mel(wave, sample_rate, n_mels)
    if kind == "whisper":
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"Whisper's log-mel is defined at {SAMPLE_RATE} Hz, got "
                             f"{sample_rate} Hz audio: resample it first")
        return whisper_log_mel(wave, n_mels)
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


def zero_mean_unit_variance(wave: np.ndarray) -> np.ndarray:
    """(S,) -> (S,) with zero mean and unit variance, as Hugging Face's waveform extractors'
    ``do_normalize`` (the 1e-7 is theirs: silence stays finite)."""
    wave = np.asarray(wave, dtype=np.float32)
    return ((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).astype(np.float32)


def _check_kind(kind: str) -> None:
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {FEATURE_KINDS}")


def log_mel(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, n_mels: int = 80) -> torch.Tensor:
    """Log mel power (N, n_mels) for the built-in Conformer: 25 ms Hann windows every 10 ms.

    Frames are taken whole from the signal (no padding at the edges), so
    N = 1 + (S - window) // hop; a clip shorter than one window is zero-padded to one frame.
    Mel filters are triangles on the HTK mel scale from 20 Hz to the Nyquist frequency.
    """
    import torch
    import torch.nn.functional as F

    window = round(0.025 * sample_rate)
    hop = round(0.010 * sample_rate)
    n_fft = 1 << (window - 1).bit_length()
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if x.numel() < window:
        x = F.pad(x, (0, window - x.numel()))
    frames = x.unfold(0, window, hop) * torch.hann_window(window, periodic=True)  # (N, window)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2)  # (N, n_fft/2 + 1)
    filters = mel_filterbank(n_fft, n_mels, sample_rate, f_min=20.0, scale="htk")
    mel = power @ torch.from_numpy(filters)
    return torch.clamp(mel, min=1e-10).log()


def whisper_log_mel(wave: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """Whisper's log-mel (N, n_mels) of 16 kHz audio, N = S // 160 (at least 1).

    The published recipe: 400-point Hann STFT every 160 samples, last frame dropped, power
    through Slaney-style mel filters (0-8 kHz, area-normalised), log10 with a 1e-10 floor,
    clamped to (max - 8), then (x + 4) / 4. As Whisper sees a clip (``WhisperFeatureExtractor``'s
    default), it is zero-padded to the 30 s window before the STFT's reflect padding, so the
    last frame reads zeros past the end, not the clip mirrored. The max is the clip's own, so
    the features of an utterance do not depend on what else is in its batch.
    """
    import torch
    import torch.nn.functional as F

    n_fft, hop = 400, 160
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    num_frames = max(x.numel() // hop, 1)
    zeros = min(n_fft // 2, max(WHISPER_WINDOW_SAMPLES - x.numel(), 0))  # the window's padding
    x = F.pad(x, (0, max(zeros, n_fft // 2 + 1 - x.numel())))
    padded = F.pad(x[None, None], (n_fft // 2, n_fft // 2 - zeros), mode="reflect")[0, 0]
    frames = padded.unfold(0, n_fft, hop)[:num_frames]  # (N, 400)
    power = torch.fft.rfft(frames * torch.hann_window(n_fft, periodic=True)).abs().pow(2)
    filters = mel_filterbank(n_fft, n_mels, SAMPLE_RATE, scale="slaney", norm="slaney")
    log_spec = torch.clamp(power @ torch.from_numpy(filters), min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def mel_filterbank(
    n_fft: int,
    n_mels: int,
    sample_rate: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    scale: str = "htk",
    norm: str | None = None,
) -> np.ndarray:
    """Triangular mel filters (n_fft // 2 + 1, n_mels), float32.

    ``scale``: "htk" (2595 log10(1 + f / 700)) or "slaney" (linear below 1 kHz, logarithmic
    above). ``norm="slaney"`` divides each triangle by its width in Hz (equal area).
    """
    if scale not in ("htk", "slaney"):
        raise ValueError(f"mel scale must be 'htk' or 'slaney', got {scale!r}")
    f_max = sample_rate / 2 if f_max is None else f_max
    to_mel, to_hz = (_hz_to_mel_htk, _mel_to_hz_htk) if scale == "htk" else (
        _hz_to_mel_slaney, _mel_to_hz_slaney)
    edges = to_hz(np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2))  # (n_mels + 2,)
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)  # FFT bin centres in Hz
    lower = (bins[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - bins[:, None]) / (edges[2:] - edges[1:-1])
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if norm == "slaney":
        weights *= 2.0 / (edges[2:] - edges[:-2])
    return weights.astype(np.float32)


def _hz_to_mel_htk(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


_SLANEY_STEP = 200.0 / 3  # Hz per mel below 1 kHz
_SLANEY_LOG_STEP = np.log(6.4) / 27.0  # log-Hz per mel above 1 kHz


def _hz_to_mel_slaney(f):
    f = np.asarray(f, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / _SLANEY_LOG_STEP
    return np.where(f >= 1000.0, log_part, f / _SLANEY_STEP)


def _mel_to_hz_slaney(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(_SLANEY_LOG_STEP * (m - 15.0)), m * _SLANEY_STEP)


# --------------------------------------------------------------------------- augmentation


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))


def fit_length(wave: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Loop ``wave`` from a random point, or cut a random stretch of it, to ``num_samples``."""
    start = int(rng.integers(len(wave)))
    reps = -(-(start + num_samples) // len(wave))
    return np.tile(wave, reps)[start : start + num_samples]


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """clean + g * noise with g chosen so that 10 log10(P_clean / P_noise) = ``snr_db`` exactly.

    ``noise`` must already have the length of ``clean`` (see :func:`fit_length`).
    """
    if len(noise) != len(clean):
        raise ValueError(f"noise has {len(noise)} samples, clean has {len(clean)}")
    p_noise = np.mean(np.square(noise, dtype=np.float64))
    if p_noise == 0.0:
        raise ValueError("noise is all zeros: no SNR can be set")
    p_clean = np.mean(np.square(clean, dtype=np.float64))
    gain = np.sqrt(p_clean / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (clean + gain * noise).astype(np.float32)


def coloured_noise(num_samples: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise with power spectral density proportional to 1 / f^alpha, unit RMS.

    alpha 0 is white, 1 pink, 2 brown (red). The DC bin is zeroed.
    """
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.fft.rfftfreq(num_samples)
    shape = np.zeros_like(freqs)
    shape[1:] = freqs[1:] ** (-alpha / 2.0)  # amplitude goes as the square root of the PSD
    noise = np.fft.irfft(spectrum * shape, n=num_samples)
    return (noise / max(rms(noise), 1e-12)).astype(np.float32)


def babble(talkers: Sequence[np.ndarray], num_samples: int, rng: np.random.Generator):
    """Several talkers at once (S,): each looped from a random point, at equal level; unit RMS."""
    if not talkers:
        raise ValueError("babble needs at least one talker")
    mix = np.zeros(num_samples, dtype=np.float64)
    for talker in talkers:
        mix += fit_length(talker, num_samples, rng) / max(rms(talker), 1e-12)
    return (mix / max(rms(mix), 1e-12)).astype(np.float32)


def tones(num_samples: int, rng: np.random.Generator,
          sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Beeps and sweeps with gaps between them (S,), unit RMS: each tone 0.05-0.6 s, steady or
    gliding between two frequencies of 200-3000 Hz, with 10 ms fades; gaps of 0.05-0.5 s."""
    out = np.zeros(num_samples, dtype=np.float64)
    pos = min(int(rng.uniform(0.0, 0.3) * sample_rate), num_samples // 2)  # a tone always fits
    while pos < num_samples:
        n = min(int(rng.uniform(0.05, 0.6) * sample_rate), num_samples - pos)
        f0, f1 = rng.uniform(200.0, 3000.0, size=2)
        if rng.random() < 0.5:
            f1 = f0  # a steady beep; else a linear sweep from f0 to f1
        freq = np.linspace(f0, f1, n)
        phase = 2.0 * np.pi * np.cumsum(freq) / sample_rate
        fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * sample_rate))
        out[pos : pos + n] = np.sin(phase) * fade * rng.uniform(0.3, 1.0)
        pos += n + int(rng.uniform(0.05, 0.5) * sample_rate)
    return (out / max(rms(out), 1e-12)).astype(np.float32)


def hum(num_samples: int, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mains hum and buzz (S,), unit RMS: a 50 or 60 Hz fundamental and its first 2-12 harmonics
    with amplitudes falling as 1/k^0.5-1/k^1.5, and a little white noise."""
    t = np.arange(num_samples) / sample_rate
    f0 = float(rng.choice([50.0, 60.0]))
    fall = rng.uniform(0.5, 1.5)
    wave = np.zeros(num_samples)
    for k in range(1, int(rng.integers(3, 14))):
        wave += np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k**fall
    wave = wave / max(rms(wave), 1e-12) + 0.05 * rng.standard_normal(num_samples)
    return (wave / max(rms(wave), 1e-12)).astype(np.float32)


def band_noise(num_samples: int, rng: np.random.Generator,
               sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """White noise in one octave band (S,) whose low edge lies between 200 and 3000 Hz, unit
    RMS."""
    low = float(rng.uniform(200.0, 3000.0))
    wave = band_pass(rng.standard_normal(num_samples).astype(np.float32), sample_rate, low,
                     2.0 * low)
    return (wave / max(rms(wave), 1e-12)).astype(np.float32)


def room_impulse_response(
    rt60: float,
    rng: np.random.Generator,
    sample_rate: int = SAMPLE_RATE,
    *,
    drr_db: float = 0.0,
    num_reflections: int = 8,
) -> np.ndarray:
    """A synthetic room impulse response (S,), S = rt60 * sample_rate.

    A unit direct path at t = 0; ``num_reflections`` early reflections of random sign between
    2 and 40 ms; a diffuse tail of Gaussian noise whose amplitude falls 60 dB over ``rt60``
    seconds (exp(-ln(1000) t / rt60)). Reflections and tail are scaled together so that the
    direct-to-reverberant energy ratio is ``drr_db``.
    """
    if rt60 <= 0:
        raise ValueError(f"rt60 must be positive, got {rt60}")
    n = max(int(rt60 * sample_rate), 2)
    t = np.arange(n) / sample_rate
    envelope = np.exp(-np.log(1000.0) * t / rt60)
    reverb = rng.standard_normal(n) * envelope
    reverb[: int(0.002 * sample_rate)] = 0.0  # the tail starts after the first reflection
    last = min(int(0.040 * sample_rate), n - 1)
    first = min(int(0.002 * sample_rate), last)
    taps = rng.integers(first, last + 1, size=num_reflections)
    reverb[taps] += rng.choice([-1.0, 1.0], size=num_reflections) * rng.uniform(
        0.3, 0.8, size=num_reflections) * envelope[taps] * 4.0
    reverb[0] = 0.0
    energy = np.sum(reverb**2)
    reverb *= np.sqrt(1.0 / (energy * 10.0 ** (drr_db / 10.0)))
    reverb[0] = 1.0  # direct path
    return reverb.astype(np.float32)


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """wave * rir (linear convolution by FFT), cut to the input's length (S,).

    The direct path is at t = 0, so speech stays aligned with its transcript timing.
    """
    n = len(wave) + len(rir) - 1
    size = 1 << (n - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(wave, size) * np.fft.rfft(rir, size), size)
    return out[: len(wave)].astype(np.float32)


def speed_perturb(wave: np.ndarray, factor: float, sample_rate: int = SAMPLE_RATE):
    """Play ``factor`` times faster (S / factor,): tempo and pitch both scale, as sox ``speed``."""
    if factor <= 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    return resample(wave, sample_rate * factor, sample_rate)


def telephone(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A narrow-band telephone channel (S,): the signal goes down to 8 kHz (nothing above 4 kHz
    survives), through a 300-3400 Hz band-pass, through G.711 mu-law 8-bit companding (the
    codec's quantisation noise and level compression), and back up to ``sample_rate``."""
    narrow = resample(np.asarray(wave, dtype=np.float32), sample_rate, 8000)
    narrow = band_pass(narrow, 8000, 300.0, 3400.0)
    peak = max(float(np.max(np.abs(narrow))), 1e-9)
    narrow = mu_law_round_trip(narrow / peak * 0.9) * (peak / 0.9)
    return resample(narrow.astype(np.float32), 8000, sample_rate)[: len(wave)]


def band_pass(
    wave: np.ndarray, sample_rate: int, low: float, high: float, order: int = 4
) -> np.ndarray:
    """Zero-phase band-pass (S,) with 4th-order Butterworth magnitude skirts, applied by FFT."""
    n = len(wave)
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    with np.errstate(divide="ignore"):
        high_pass = 1.0 / np.sqrt(1.0 + (low / np.maximum(freqs, 1e-9)) ** (2 * order))
    low_pass = 1.0 / np.sqrt(1.0 + (freqs / high) ** (2 * order))
    return np.fft.irfft(np.fft.rfft(wave) * high_pass * low_pass, n).astype(np.float32)


def mu_law_round_trip(wave: np.ndarray, mu: int = 255) -> np.ndarray:
    """Encode to ``mu + 1`` mu-law levels and decode again (G.711's companding), in [-1, 1]."""
    x = np.clip(wave, -1.0, 1.0)
    encoded = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    levels = np.round((encoded + 1.0) / 2.0 * mu) / mu * 2.0 - 1.0
    return (np.sign(levels) * np.expm1(np.abs(levels) * np.log1p(mu)) / mu).astype(np.float32)


def normalise_level(wave: np.ndarray, rms_db: float, peak: float = 0.99) -> np.ndarray:
    """Scale to ``rms_db`` dBFS RMS, then down again if that would clip above ``peak``."""
    level = max(rms(wave), 1e-9)
    out = wave * (10.0 ** (rms_db / 20.0) / level)
    top = float(np.max(np.abs(out)))
    if top > peak:
        out = out * (peak / top)
    return out.astype(np.float32)


def augment_waveform(wave: np.ndarray, rng: np.random.Generator, sample_rate: int):
    """Training perturbation (S,) -> (S',): speed 0.9 / 1.1 (half the time), reverberation
    (RT60 0.2-0.6 s, 30 %), coloured noise at 10-30 dB SNR (30 %)."""
    if rng.random() < 0.5:
        wave = speed_perturb(wave, float(rng.choice([0.9, 1.1])), sample_rate)
    if rng.random() < 0.3:
        rir = room_impulse_response(rng.uniform(0.2, 0.6), rng, sample_rate,
                                              drr_db=rng.uniform(0.0, 10.0))
        wave = reverberate(wave, rir)
    if rng.random() < 0.3 and rms(wave) > 0:
        noise = coloured_noise(len(wave), float(rng.choice([0.0, 1.0, 2.0])), rng)
        wave = mix_at_snr(wave, noise, rng.uniform(10.0, 30.0))
    return wave
