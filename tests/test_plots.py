"""Figures take plain numbers: metrics rows are read strictly, curve keys are ordered the
usual ones first, and bad input names what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from speechrl.plots import (
    curve_keys_of,
    plot_error_breakdown,
    plot_training_curves,
    plot_wer_by_language,
    read_metrics,
)


def test_training_curves(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 0, "loss": 2.0, "lr": 1e-6, "tag": "x"}\n\n'
                    '{"step": 1, "loss": 1.5, "reward_mean": -0.4, "dev_wer": 30.0}\n')
    rows = read_metrics(path)
    # the usual keys first, then the others in order of appearance; step and strings left out
    assert curve_keys_of(rows) == ["reward_mean", "dev_wer", "loss", "lr"]
    png = plot_training_curves(rows, tmp_path / "c.png", run="r", keys=["loss"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no numeric values for \\['kl'\\]"):
        plot_training_curves(rows, tmp_path / "d.png", run="r", keys=["kl"])
    path.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match="m.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_trainer_keys_come_first() -> None:
    # speechrl's trainers log "train/..." and "dev/..." keys; they lead in the fixed order,
    # "epoch" is bookkeeping, and the unknown "train/lr" follows in order of appearance
    rows = [{"step": 0, "epoch": 0, "train/lr": 1e-6, "train/loss": 2.0, "train/kl": 0.0},
            {"step": 1, "train/reward_mean": -0.3, "dev/wer": 41.0}]
    assert curve_keys_of(rows) == ["train/reward_mean", "dev/wer", "train/loss", "train/kl",
                                   "train/lr"]


def test_empty_figures_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plot_wer_by_language: no sets"):
        plot_wer_by_language({}, tmp_path / "a.png", title="t")
    with pytest.raises(ValueError, match="plot_error_breakdown: no sets"):
        plot_error_breakdown({}, tmp_path / "b.png", title="t")
