"""runtime.py: the precision a run uses (auto asks whether the CPU computes bf16 natively)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch

from speechrl import runtime
from speechrl.config import TrainConfig, load_run_config


@pytest.fixture
def cpu_has_native_bf16(monkeypatch):
    """Set what the probe says: ``cpu_has_native_bf16(True)`` or ``(False)``."""
    def set_probe(native: bool) -> None:
        reason = "this CPU computes bf16 natively (avx512_bf16)" if native else \
            "this CPU has no avx512_bf16 or amx_bf16, so bf16 would be emulated"
        monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: (native, reason))
    return set_probe


def test_auto_on_a_cpu_follows_the_probe(cpu_has_native_bf16):
    cpu_has_native_bf16(False)
    chosen = runtime.resolve_precision("auto", "cpu")
    assert (chosen.name, chosen.requested, chosen.slow) == ("fp32", "auto", False)
    assert chosen.autocast_dtype is None
    assert chosen.describe() == ("precision fp32 (auto: this CPU has no avx512_bf16 or amx_bf16, "
                                 "so bf16 would be emulated)")
    assert isinstance(runtime.autocast(torch.device("cpu"), "auto"), contextlib.nullcontext)
    cpu_has_native_bf16(True)
    chosen = runtime.resolve_precision("auto", "cpu")
    assert (chosen.name, chosen.autocast_dtype) == ("bf16", torch.bfloat16)
    with runtime.autocast(torch.device("cpu"), "auto"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.is_autocast_enabled("cpu")


def test_explicit_choices_and_the_gpu(cpu_has_native_bf16):
    cpu_has_native_bf16(False)
    assert runtime.resolve_precision("fp32", "cuda").name == "fp32"
    assert runtime.resolve_precision("auto", "cuda").name == "bf16"  # whatever the CPU
    slow = runtime.resolve_precision("bf16", "cpu")
    assert (slow.name, slow.slow) == ("bf16", True)  # as asked, with a warning at the start
    assert "several times slower than fp32" in slow.reason
    with pytest.raises(ValueError, match=r"train.precision='fp23' is not a precision; use one "
                                         r"of auto, fp32, bf16"):
        runtime.resolve_precision("fp23", "cpu")


def test_bf16_asked_for_without_native_support_warns_once_at_the_start(cpu_has_native_bf16,
                                                                       capsys):
    cpu_has_native_bf16(False)
    with pytest.warns(UserWarning, match="several times slower than fp32"):
        runtime.announce_precision("sft", "bf16", torch.device("cpu"))
    assert capsys.readouterr().err.startswith("sft: precision bf16 (bf16: as asked, but ")
    cpu_has_native_bf16(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = runtime.announce_precision("sft", "bf16", torch.device("cpu"))
    assert not chosen.slow


def test_tiny_preset_resolves_to_fp32_without_native_bf16(cpu_has_native_bf16):
    cpu_has_native_bf16(False)
    for stage in ("pretrain-lm", "pretrain-encoder", "sft", "grpo"):
        cfg = load_run_config("tiny", stage=stage)
        assert cfg.train.precision == "auto"
        assert runtime.resolve_precision(cfg.train.precision, "cpu").name == "fp32"
    cpu_has_native_bf16(True)
    assert runtime.resolve_precision(load_run_config("tiny", stage="sft").train.precision,
                                     "cpu").name == "bf16"


def test_no_preset_forces_bf16_on_a_cpu():
    for preset in sorted(Path(runtime.__file__).parent.joinpath("configs").glob("*.yaml")):
        for stage in (None, "pretrain-lm", "pretrain-encoder", "sft", "grpo"):
            assert load_run_config(str(preset), stage=stage).train.precision != "bf16", preset


def test_a_typo_is_refused_when_the_config_is_built():
    with pytest.raises(ValueError, match="'fp23' is not a precision"):
        TrainConfig(precision="fp23")
    with pytest.raises(ValueError, match="'fp23' is not a precision"):
        load_run_config("tiny", ["train.precision=fp23"], stage="sft")


def test_the_probe_reads_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.delenv(runtime.CPU_BF16_ENV, raising=False)  # conftest forces fp32
    # x86 flags of a CPU with AVX512 (oneDNN would run bf16, emulated) but no AVX512-BF16
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert runtime._cpu_flags(info) == {"fpu", "sse", "avx2", "avx512f", "avx512bw"}
    assert runtime._cpu_flags(tmp_path / "missing") is None
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(runtime, "_cpu_family", lambda: "x86")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    runtime.cpu_bf16_support.cache_clear()
    try:
        native, why = runtime.cpu_bf16_support()
        assert not native and "avx512_bf16 or amx_bf16" in why
        monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
        runtime.cpu_bf16_support.cache_clear()
        assert runtime.cpu_bf16_support() == (True, "this CPU computes bf16 natively (amx_bf16)")
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        runtime.cpu_bf16_support.cache_clear()
        assert runtime.cpu_bf16_support()[0] is False
    finally:
        runtime.cpu_bf16_support.cache_clear()


def test_the_environment_overrides_the_probe(monkeypatch):
    runtime.cpu_bf16_support.cache_clear()
    try:
        monkeypatch.setenv(runtime.CPU_BF16_ENV, "0")
        assert runtime.cpu_bf16_support() == (False, "SPEECHRL_CPU_BF16=0 in the environment")
        assert runtime.resolve_precision("auto", "cpu").name == "fp32"
        runtime.cpu_bf16_support.cache_clear()
        monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
        assert runtime.resolve_precision("auto", "cpu").name == "bf16"
    finally:
        runtime.cpu_bf16_support.cache_clear()
