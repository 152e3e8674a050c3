"""The synthetic corpus's acoustic conditions: a planned utterance rendered as 16 kHz audio.

:func:`render` speaks a plan of ``speechrl.corpus_plan`` with espeak-ng (``speechrl.espeak``) and
applies its condition with the primitives of ``speechrl.audio``:

- ``noisy``: babble of 3-5 talkers or coloured noise at 0-10 dB SNR;
- ``farfield``: room reverberation (RT60 0.4-1.0 s) plus coloured noise at 5-20 dB SNR;
- ``telephone``: reverberation (RT60 0.2-0.5 s), line noise at 25-35 dB SNR, the 300-3400 Hz
  band at 8 kHz, mu-law;
- ``meeting``: a second talker (crosstalk) 0-6 dB below, from 10-60 % into the sentence and
  running on past its end (every planned clip has one); then a small room (RT60 0.2-0.5 s) and noise
  at 15-30 dB SNR;
- ``headset``: a second talker (crosstalk) 0-6 dB below, from 10-60 % into the sentence and
  running on past its end, then noise at 20-35 dB SNR (no room: a close-talking microphone);
- ``overlap`` / ``mix_overlap``: a second talker 0-6 / 3-12 dB below, from 10-60 % into the
  sentence and running on past its end;
- ``nonspeech``: 1-8 s of babble, coloured noise, tones or near-silence, with an empty
  transcript; ``mix_nonspeech`` the same with babble, mains hum or octave-band noise;
- ``long``: two or more sentences of one speaker, 0.2-0.6 s apart, 12-20 s;
- ``mix_noisy``: babble, mains hum or octave-band noise at 5-20 dB SNR;
- ``clean``: the speech as it is.

Each clip is then set to a random level (-28 to -18 dB RMS for speech).

Every draw comes from a generator seeded by the plan, so a plan gives the same audio each time
(for a given espeak-ng version). Shapes: S samples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from speechrl import audio
from speechrl.espeak import Espeak, speak

if TYPE_CHECKING:
    from speechrl.corpus_plan import UtterancePlan

# What ood_nonspeech clips hold, each drawn equally often.
NONSPEECH_KINDS = ("babble", "noise", "tones", "silence")
# What the training mix's non-speech clips hold (TrainMix): other families than the probes',
# so the probes stay unseen.
MIX_NONSPEECH_KINDS = ("babble", "hum", "band")
# ood_long: sentences are added until the clip lasts LONG_SECONDS[0], never beyond [1].
LONG_SECONDS = (12.0, 20.0)


def render(plan: UtterancePlan,
           engine: Espeak) -> tuple[np.ndarray, dict[str, float | str], str]:
    """The utterance's audio (S,) at 16 kHz in its acoustic condition, what was applied, and
    its transcript (the plan's text; for ``long``, the sentences that were spoken)."""
    rng = np.random.default_rng(list(plan.seed))
    if plan.condition in ("nonspeech", "mix_nonspeech"):
        wave, acoustics = _nonspeech(plan, engine, rng)
        return wave, acoustics, ""
    if plan.condition == "long":
        wave, text, acoustics = _long(plan, engine, rng)
        return audio.normalise_level(wave, float(rng.uniform(-28.0, -18.0))), acoustics, text
    wave = speak(engine, plan.text, plan.language, plan.speaker)
    acoustics: dict[str, float | str] = {}
    if plan.condition == "overlap":
        wave, acoustics = _overlap(wave, plan, engine, rng)
    elif plan.condition == "mix_overlap":
        wave, acoustics = _overlap(wave, plan, engine, rng, below_db=(3.0, 12.0))
    elif plan.condition == "meeting":
        wave, acoustics = _crosstalk(wave, plan, engine, rng, room=True, snr_db=(15.0, 30.0))
    elif plan.condition == "headset":
        wave, acoustics = _crosstalk(wave, plan, engine, rng, room=False, snr_db=(20.0, 35.0))
    elif plan.condition == "mix_noisy":
        snr = float(rng.uniform(5.0, 20.0))
        if plan.babble:
            noise, talkers = _babble(plan, engine, len(wave), rng)
            kind = f"babble{talkers}"
        else:
            kind = "hum" if rng.random() < 0.5 else "band"
            noise = audio.hum(len(wave), rng) if kind == "hum" else audio.band_noise(len(wave),
                                                                                  rng)
        wave = audio.mix_at_snr(wave, noise, snr)
        acoustics = {"noise": kind, "snr_db": round(snr, 2)}
    elif plan.condition == "noisy":
        snr = float(rng.uniform(0.0, 10.0))
        if plan.babble:
            noise, talkers = _babble(plan, engine, len(wave), rng)
            kind = f"babble{talkers}"
        else:
            alpha = float(rng.choice([0.0, 1.0, 2.0]))
            noise, kind = audio.coloured_noise(len(wave), alpha, rng), f"noise_alpha{alpha:g}"
        wave = audio.mix_at_snr(wave, noise, snr)
        acoustics = {"noise": kind, "snr_db": round(snr, 2)}
    elif plan.condition == "farfield":
        rt60, drr = float(rng.uniform(0.4, 1.0)), float(rng.uniform(-5.0, 3.0))
        wave = audio.reverberate(wave, audio.room_impulse_response(rt60, rng, drr_db=drr))
        snr, alpha = float(rng.uniform(5.0, 20.0)), float(rng.choice([1.0, 2.0]))
        wave = audio.mix_at_snr(wave, audio.coloured_noise(len(wave), alpha, rng), snr)
        acoustics = {"rt60": round(rt60, 3), "drr_db": round(drr, 2), "snr_db": round(snr, 2)}
    elif plan.condition == "telephone":
        rt60, drr = float(rng.uniform(0.2, 0.5)), float(rng.uniform(0.0, 6.0))
        wave = audio.reverberate(wave, audio.room_impulse_response(rt60, rng, drr_db=drr))
        snr = float(rng.uniform(25.0, 35.0))  # line noise, band-limited with the speech
        wave = audio.mix_at_snr(wave, audio.coloured_noise(len(wave), 0.0, rng), snr)
        wave = audio.telephone(wave)
        acoustics = {"rt60": round(rt60, 3), "drr_db": round(drr, 2), "snr_db": round(snr, 2)}
    return audio.normalise_level(wave, float(rng.uniform(-28.0, -18.0))), acoustics, plan.text


def _babble(plan: UtterancePlan, engine: Espeak, n: int,
            rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """The plan's babble talkers spoken and mixed into ``n`` samples, and how many they are."""
    talkers = [speak(engine, t, plan.language, s) for t, s in plan.babble]
    return audio.babble(talkers, n, rng), len(talkers)


def _overlap(main: np.ndarray, plan: UtterancePlan, engine: Espeak, rng: np.random.Generator,
             below_db: tuple[float, float] = (0.0, 6.0)
             ) -> tuple[np.ndarray, dict[str, float | str]]:
    """``main`` (S,) with the plan's second talker starting 10-60 % into it, ``below_db`` dB
    quieter (speech power against speech power), the clip lengthened to wherever that talker
    stops."""
    text, speaker = plan.interferer
    other = speak(engine, text, plan.language, speaker)
    start = int(rng.uniform(0.1, 0.6) * len(main))
    below_db = float(rng.uniform(*below_db))
    gain = audio.rms(main) / max(audio.rms(other), 1e-12) * 10.0 ** (-below_db / 20.0)
    mix = np.zeros(max(len(main), start + len(other)), dtype=np.float32)
    mix[: len(main)] += main
    mix[start : start + len(other)] += gain * other
    overlap = (min(len(main), start + len(other)) - start) / audio.SAMPLE_RATE
    return mix, {"interferer_db_below": round(below_db, 2),
                 "interferer_start_s": round(start / audio.SAMPLE_RATE, 3),
                 "overlap_s": round(overlap, 3), "interferer": speaker.label}


def _crosstalk(main: np.ndarray, plan: UtterancePlan, engine: Espeak, rng: np.random.Generator,
               room: bool, snr_db: tuple[float, float]
               ) -> tuple[np.ndarray, dict[str, float | str]]:
    """``main`` (S,) as a microphone among other talkers hears it: the plan's crosstalk talker
    (if any) 0-6 dB below, then a small room (RT60 0.2-0.5 s: a meeting) when ``room``, and
    pink noise at ``snr_db`` over all."""
    acoustics: dict[str, float | str] = {}
    wave = main
    if plan.interferer is not None:
        wave, acoustics = _overlap(main, plan, engine, rng, below_db=(0.0, 6.0))
    if room:
        rt60, drr = float(rng.uniform(0.2, 0.5)), float(rng.uniform(0.0, 6.0))
        wave = audio.reverberate(wave, audio.room_impulse_response(rt60, rng, drr_db=drr))
        acoustics.update(rt60=round(rt60, 3), drr_db=round(drr, 2))
    snr = float(rng.uniform(*snr_db))
    wave = audio.mix_at_snr(wave, audio.coloured_noise(len(wave), 1.0, rng), snr)
    acoustics["snr_db"] = round(snr, 2)
    return wave, acoustics


def _nonspeech(plan: UtterancePlan, engine: Espeak,
               rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float | str]]:
    """1-8 s with no speech to transcribe: babble, coloured noise, tones or near-silence."""
    n = int(rng.uniform(1.0, 8.0) * audio.SAMPLE_RATE)
    kind = plan.nonspeech
    acoustics: dict[str, float | str] = {"nonspeech": kind}
    if kind == "babble":
        wave, acoustics["talkers"] = _babble(plan, engine, n, rng)
    elif kind == "noise":
        alpha = float(rng.choice([0.0, 1.0, 2.0]))
        wave = audio.coloured_noise(n, alpha, rng)
        acoustics["alpha"] = alpha
    elif kind == "tones":
        wave = audio.tones(n, rng)
    elif kind == "silence":
        wave = audio.coloured_noise(n, 1.0, rng)
    elif kind == "hum":
        wave = audio.hum(n, rng)
    elif kind == "band":
        wave = audio.band_noise(n, rng)
    else:
        raise ValueError(f"unknown nonspeech kind {kind!r}; one of "
                         f"{NONSPEECH_KINDS + MIX_NONSPEECH_KINDS}")
    # Near-silence is a faint noise floor; the others sit at the speech sets' levels.
    level = float(rng.uniform(-65.0, -50.0) if kind == "silence" else rng.uniform(-30.0, -18.0))
    acoustics["rms_db"] = round(level, 2)
    return audio.normalise_level(wave, level), acoustics


def _long(plan: UtterancePlan, engine: Espeak,
          rng: np.random.Generator) -> tuple[np.ndarray, str, dict[str, float | str]]:
    """The plan's sentences by one speaker, 0.2-0.6 s of silence apart, added in order until
    the clip lasts ``LONG_SECONDS[0]`` with at least two sentences; a sentence that would take
    it past ``LONG_SECONDS[1]`` is passed over for the next one."""
    pieces: list[np.ndarray] = []
    spoken: list[str] = []
    length = 0
    low, high = (int(s * audio.SAMPLE_RATE) for s in LONG_SECONDS)
    for text in (plan.text, *plan.more_text):
        if len(spoken) >= 2 and length >= low:
            break
        wave = speak(engine, text, plan.language, plan.speaker)
        pause = np.zeros(int(rng.uniform(0.2, 0.6) * audio.SAMPLE_RATE), dtype=np.float32)
        extra = len(wave) + (len(pause) if pieces else 0)
        if pieces and length + extra > high:
            continue
        if pieces:
            pieces.append(pause)
        pieces.append(wave)
        spoken.append(text)
        length += extra
    return np.concatenate(pieces), " ".join(spoken), {"sentences": len(spoken)}

