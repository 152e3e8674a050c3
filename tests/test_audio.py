"""audio.py: loading, features against reference implementations, augmentations on numbers."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from speechrl import audio
from speechrl.audio import AudioError

SR = 16000


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def band_energy(wave: np.ndarray, sr: int, lo: float, hi: float) -> float:
    spec = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(len(wave), 1 / sr)
    return float(spec[(freqs >= lo) & (freqs < hi)].sum())


# --------------------------------------------------------------------------- loading


def test_load_audio_mixes_down_and_resamples(tmp_path):
    left = tone(440, 1.0, 44100)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    sf.write(tmp_path / "a.wav", stereo, 44100, subtype="FLOAT")
    wave = audio.load_audio(tmp_path / "a.wav")
    # Mean of the two channels is left / 2, then soxr 44.1 -> 16 kHz: 44100 samples -> 16000.
    expected = soxr.resample(left / 2, 44100, SR, quality="HQ")
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    np.testing.assert_allclose(wave, expected, atol=1e-6)
    only_left = audio.load_audio(tmp_path / "a.wav", channel=0)
    np.testing.assert_allclose(only_left, 2 * expected, atol=1e-6)


def test_load_audio_reads_a_segment(tmp_path):
    ramp = (np.arange(32000) / 32000).astype(np.float32)
    sf.write(tmp_path / "r.wav", ramp, SR, subtype="FLOAT")
    seg = audio.load_audio(tmp_path / "r.wav", offset=0.5, duration=0.25)
    # Samples 8000 .. 11999 of the ramp.
    np.testing.assert_allclose(seg, ramp[8000:12000])


def test_load_audio_errors(tmp_path):
    with pytest.raises(AudioError, match="no such audio file"):
        audio.load_audio(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio" * 20)
    with pytest.raises(AudioError, match="unreadable"):
        audio.load_audio(tmp_path / "junk.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match="zero-length"):
        audio.load_audio(tmp_path / "empty.wav")
    sf.write(tmp_path / "x.wav", tone(300, 1.0), SR)
    with pytest.raises(AudioError, match="channel"):
        audio.load_audio(tmp_path / "x.wav", channel=1)
    with pytest.raises(AudioError, match="past the end"):
        audio.load_audio(tmp_path / "x.wav", offset=2.0)


def test_truncated_wav_and_flac_are_refused(tmp_path):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, SR).astype(np.float32)
    for ext in ("wav", "flac"):
        sf.write(tmp_path / f"full.{ext}", noise, SR, subtype="PCM_16")
        data = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated WAV"):
        audio.load_audio(tmp_path / "cut.wav")
    with pytest.raises(AudioError, match="corrupt"):
        audio.load_audio(tmp_path / "cut.flac")


# --------------------------------------------------------------------------- features


def test_feature_dim_and_kinds():
    wave = tone(500, 0.5)
    assert audio.features(wave, "fbank").shape[-1] == 80
    assert audio.features(wave, "whisper", n_mels=128).shape[-1] == 128
    assert audio.features(wave, "waveform").dim() == 1  # one sample a step
    with pytest.raises(ValueError, match="unknown feature kind 'mfcc'"):
        audio.features(wave, "mfcc")
    assert audio.features(wave, "waveform").shape == (8000,)
    assert audio.features(wave, "fbank").shape == (1 + (8000 - 400) // 160, 80)  # 48 frames
    assert audio.features(wave, "whisper").shape == (8000 // 160, 80)  # 50 frames


def test_mel_scales_hand_values():
    # HTK: 2595 log10(1 + 1000/700) = 999.99; Slaney: 1 kHz is mel 15, 6.4 kHz is mel 15 + 27.
    assert audio._hz_to_mel_htk(1000.0) == pytest.approx(999.9855, abs=1e-3)
    assert audio._hz_to_mel_slaney(1000.0) == pytest.approx(15.0)
    assert audio._hz_to_mel_slaney(6400.0) == pytest.approx(42.0)
    assert audio._mel_to_hz_slaney(audio._hz_to_mel_slaney(3210.0)) == pytest.approx(3210.0)


def reference_log_mel(wave: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Frame by frame with loops: 400-sample periodic Hann frames every 160, 512-point FFT,
    HTK triangles 20 Hz - 8 kHz built one filter at a time."""
    window = np.hanning(401)[:-1]
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges_mel = np.linspace(mel(20.0), mel(8000.0), n_mels + 2)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    freqs = np.arange(257) * SR / 512
    filters = np.zeros((257, n_mels))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for k, f in enumerate(freqs):
            if lo < f <= mid:
                filters[k, m] = (f - lo) / (mid - lo)
            elif mid < f < hi:
                filters[k, m] = (hi - f) / (hi - mid)
    rows = []
    for start in range(0, len(wave) - 400 + 1, 160):
        power = np.abs(np.fft.rfft(wave[start : start + 400] * window, 512)) ** 2
        rows.append(np.log(np.maximum(power @ filters, 1e-10)))
    return np.array(rows)


def test_log_mel_matches_loop_reference_and_peaks_at_the_tone():
    rng = np.random.default_rng(1)
    wave = tone(1000, 0.3) + 0.01 * rng.standard_normal(4800).astype(np.float32)
    feats = audio.log_mel(wave)
    assert feats.shape == (1 + (4800 - 400) // 160, 80)  # 28 frames
    np.testing.assert_allclose(feats.numpy(), reference_log_mel(wave), atol=2e-3)
    # The 1 kHz tone's energy lands in the filter whose centre is nearest 1 kHz.
    centres = audio._mel_to_hz_htk(np.linspace(audio._hz_to_mel_htk(20.0),
                                               audio._hz_to_mel_htk(8000.0), 82))[1:-1]
    assert int(feats.mean(0).argmax()) == int(np.abs(centres - 1000.0).argmin())


def test_log_mel_of_a_clip_shorter_than_a_window_is_one_frame():
    assert audio.log_mel(tone(200, 0.01)).shape == (1, 80)  # 160 samples < 400


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_log_mel_matches_transformers(n_mels):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    wave = (tone(300, 1.37) + tone(2500, 1.37, amp=0.1)
            + 0.02 * rng.standard_normal(int(1.37 * SR))).astype(np.float32)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    # As Whisper sees it: padded to the 30 s window (3000 frames), the clip's first N of them.
    ref = extractor(wave, sampling_rate=SR, return_tensors="np")["input_features"][0].T
    ours = audio.whisper_log_mel(wave, n_mels)
    assert ours.shape == (len(wave) // 160, n_mels) and ref.shape == (3000, n_mels)
    np.testing.assert_allclose(ours.numpy(), ref[: len(ours)], atol=1e-4)


def test_whisper_log_mel_clamps_to_max_minus_8():
    # Digital silence after a loud tone: log10 floor -10 is clamped to max - 8, i.e.
    # (max - 8 + 4) / 4 = x_max - 2 in the output scale.
    wave = np.concatenate([tone(1000, 0.5, amp=0.9), np.zeros(8000, np.float32)])
    feats = audio.whisper_log_mel(wave)
    assert float(feats.min()) == pytest.approx(float(feats.max()) - 2.0, abs=1e-5)


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("snr", [0.0, 5.0, 10.0])
def test_mix_at_snr_gives_the_requested_snr(snr):
    rng = np.random.default_rng(2)
    clean = tone(440, 1.0)
    noise = audio.coloured_noise(len(clean), 1.0, rng)
    mixed = audio.mix_at_snr(clean, noise, snr)
    added = mixed.astype(np.float64) - clean
    measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(added**2))
    assert measured == pytest.approx(snr, abs=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_coloured_noise_spectral_slope(alpha):
    noise = audio.coloured_noise(1 << 16, alpha, np.random.default_rng(3))
    assert audio.rms(noise) == pytest.approx(1.0, rel=1e-5)
    psd = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(len(noise))
    keep = (freqs > 1e-3) & (freqs < 0.4)
    slope = np.polyfit(np.log10(freqs[keep]), np.log10(psd[keep]), 1)[0]
    assert slope == pytest.approx(-alpha, abs=0.1)


def test_babble_is_unit_level_mix_of_talkers():
    rng = np.random.default_rng(4)
    talkers = [tone(f, 0.3) for f in (200, 330, 470)]
    out = audio.babble(talkers, 16000, rng)
    assert out.shape == (16000,) and audio.rms(out) == pytest.approx(1.0, rel=1e-5)
    # All three talkers are in there: each tone's band holds a share of the energy.
    for f in (200, 330, 470):
        assert band_energy(out, SR, f - 20, f + 20) > 0.1 * band_energy(out, SR, 0, 8000)


def schroeder_rt60(rir: np.ndarray, sr: int = SR) -> float:
    """RT60 from the slope of the backward-integrated energy between -5 and -25 dB (T20 x 3)."""
    edc = np.cumsum(rir[::-1].astype(np.float64) ** 2)[::-1]
    edc_db = 10 * np.log10(edc / edc[0])
    t = np.arange(len(rir)) / sr
    keep = (edc_db <= -5) & (edc_db >= -25)
    slope = np.polyfit(t[keep], edc_db[keep], 1)[0]  # dB per second
    return -60.0 / slope


@pytest.mark.parametrize("rt60", [0.3, 0.6, 1.0])
def test_rir_energy_decay_matches_rt60(rt60):
    rir = audio.room_impulse_response(rt60, np.random.default_rng(5), drr_db=0.0)
    assert len(rir) == int(rt60 * SR) and rir[0] == 1.0
    # Direct-to-reverberant ratio 0 dB: the direct sample holds as much energy as the rest.
    assert np.sum(rir[1:].astype(np.float64) ** 2) == pytest.approx(1.0, rel=1e-4)
    # Energy decay of the reverberant part (direct path left out) gives back the RT60.
    assert schroeder_rt60(rir[1:]) == pytest.approx(rt60, rel=0.06)


def test_rir_direct_to_reverberant_ratio():
    rir = audio.room_impulse_response(0.5, np.random.default_rng(6), drr_db=6.0)
    drr = 10 * np.log10(1.0 / np.sum(rir[1:].astype(np.float64) ** 2))
    assert drr == pytest.approx(6.0, abs=1e-3)


def test_reverberate_is_truncated_linear_convolution():
    rng = np.random.default_rng(7)
    wave = rng.standard_normal(1000).astype(np.float32)
    rir = np.array([1.0, 0.0, 0.5, -0.25], np.float32)
    out = audio.reverberate(wave, rir)
    np.testing.assert_allclose(out, np.convolve(wave, rir)[:1000], atol=1e-5)


def test_speed_perturb_scales_length_and_pitch():
    wave = tone(500, 1.0)
    fast = audio.speed_perturb(wave, 1.1)
    assert len(fast) == pytest.approx(16000 / 1.1, abs=2)
    spec = np.abs(np.fft.rfft(fast))
    peak = np.fft.rfftfreq(len(fast), 1 / SR)[spec.argmax()]
    assert peak == pytest.approx(550.0, abs=2.0)  # 500 Hz played 1.1x faster


def test_telephone_removes_energy_above_4khz_and_below_300hz():
    rng = np.random.default_rng(8)
    white = (0.1 * rng.standard_normal(SR)).astype(np.float32)
    out = audio.telephone(white)
    assert out.shape == white.shape
    total = band_energy(out, SR, 0, 8000)
    assert band_energy(out, SR, 4100, 8000) < 1e-4 * total  # below -40 dB
    assert band_energy(white, SR, 4100, 8000) > 0.4 * band_energy(white, SR, 0, 8000)
    mid, low = tone(1000, 1.0, amp=0.3), tone(100, 1.0, amp=0.3)
    gain_mid = audio.rms(audio.telephone(mid)) / audio.rms(mid)
    gain_low = audio.rms(audio.telephone(low)) / audio.rms(low)
    assert 20 * np.log10(gain_mid) == pytest.approx(0.0, abs=1.0)  # the pass band passes
    assert 20 * np.log10(gain_low) < -30.0  # 100 Hz: 4th-order skirt, (300/100)^8 -> -38 dB


def test_normalise_level_and_peak_guard():
    wave = tone(300, 0.5, amp=0.01)
    out = audio.normalise_level(wave, -20.0)
    assert 20 * np.log10(audio.rms(out)) == pytest.approx(-20.0, abs=1e-3)
    loud = audio.normalise_level(wave, 0.0)  # a sine at 0 dBFS RMS would peak at 1.41
    assert float(np.max(np.abs(loud))) == pytest.approx(0.99, abs=1e-6)


def test_features_are_the_same_for_float64_and_float32_input():
    wave = tone(700, 0.2)
    a = audio.features(wave, "fbank")
    b = audio.features(wave.astype(np.float64), "fbank")
    assert torch.equal(a, b)
