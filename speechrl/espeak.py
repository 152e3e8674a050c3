"""espeak-ng through its C library: a voice (a variant, a pitch, a rate) speaks a text.

:class:`Espeak` drives libespeak-ng in synchronous mode (no audio device) and returns its
int16 samples; :func:`speak` gives them as float32 at 16 kHz, the synthetic corpus's rate
(``speechrl.synth``). The library is a process-wide singleton that carries state from one
utterance to the next; ``speechrl.synth`` says how its corpus stays deterministic all the same.

Shapes: S samples.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass

import numpy as np

from speechrl import audio

# espeak-ng voice per language; a speaker adds a variant ("en-us+m3"), a pitch and a rate.
LANGUAGE_VOICES = {"en": "en-us", "fr": "fr", "de": "de", "it": "it", "es": "es"}


@dataclass(frozen=True)
class Speaker:
    """A voice: an espeak-ng variant of the language's voice, a pitch and a rate; ``label``
    names it in the manifests."""

    variant: str
    pitch: int  # espeak-ng 0-99, default 50
    rate: int  # words per minute, default 175

    @property
    def label(self) -> str:
        return f"{self.variant}-p{self.pitch}-r{self.rate}"


_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE, _PARAM_PITCH = 1, 3
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


class Espeak:
    """libespeak-ng through ctypes, in synchronous mode (no audio device): text -> int16 samples.

    One per process: the library is a process-wide singleton with state carried from one
    utterance to the next (see ``speechrl.synth`` for how that stays deterministic).
    """

    def __init__(self) -> None:
        self.lib = _load_espeak()
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None,
                                                      _INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise (is espeak-ng-data installed?)")
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as self
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                          ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                          ctypes.c_void_p, ctypes.c_void_p]

    def _collect(self, samples, count: int, events) -> int:
        if count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0: go on synthesising

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples (S,) at ``self.sample_rate`` (22050 Hz)."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r} (see espeak-ng --voices)")
        self.lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        self.lib.espeak_SetParameter(_PARAM_PITCH, pitch, 0)
        self._chunks = []
        data = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                       None, None)
        self.lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} ({voice})")
        return np.concatenate(self._chunks)


def _load_espeak() -> ctypes.CDLL:
    for name in (ctypes.util.find_library("espeak-ng"), "libespeak-ng.so.1", "libespeak-ng.so",
                 "libespeak-ng.dylib"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise RuntimeError("the espeak-ng library (libespeak-ng) is not installed: "
                       "apt install espeak-ng, or brew install espeak-ng")


def espeak_version() -> str:
    lib = _load_espeak()
    lib.espeak_Info.restype = ctypes.c_char_p
    return (lib.espeak_Info(None) or b"unknown").decode()


def speak(engine: Espeak, text: str, language: str, speaker: Speaker) -> np.ndarray:
    """espeak-ng speech as float32 (S,) at 16 kHz."""
    voice = f"{LANGUAGE_VOICES[language]}+{speaker.variant}"
    samples = engine.synthesize(text, voice, speaker.rate, speaker.pitch)
    return audio.resample(samples.astype(np.float32) / 32768.0, engine.sample_rate,
                          audio.SAMPLE_RATE)
