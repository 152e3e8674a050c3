"""evaluate.py: decoding precision (fp32 by default, bf16 autocast on request)."""

from __future__ import annotations

import pytest
import torch
from tones import write_tone_corpus

from speechrl import generate as generate_module
from speechrl.evaluate import decode_manifest, decoding_options


@pytest.mark.parametrize(("precision", "autocast_on"), [("fp32", False), ("bf16", True),
                                                         ("auto", False)])  # auto: bf16 on GPU
def test_decode_manifest_runs_the_decoder_in_the_precision_asked(tmp_path, tiny_model,
                                                                  monkeypatch, precision,
                                                                  autocast_on):
    manifest = write_tone_corpus(tmp_path / "set", 5, seed=3)
    seen = []
    real = generate_module.generate

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_module, "generate", spy)
    hyps = decode_manifest(tiny_model, manifest, options=decoding_options(max_new_tokens=6),
                           device=torch.device("cpu"), precision=precision)
    assert len(hyps) == 5 and seen and set(seen) == {autocast_on}


def test_eval_command_passes_precision(monkeypatch, tmp_path):
    import argparse

    from speechrl import evaluate

    seen = {}

    def fake(checkpoints, sets, out_dir, **kwargs):
        seen.update(kwargs)
        return type("Paths", (), {"markdown": tmp_path / "report.md"})()

    monkeypatch.setattr(evaluate, "evaluate_checkpoints", fake)
    parser = argparse.ArgumentParser()
    evaluate.add_eval_arguments(parser)
    base = ["--checkpoint", "a", "--data", "t.jsonl", "--out", str(tmp_path)]
    assert evaluate.eval_main(parser.parse_args(base)) == 0 and seen["precision"] == "fp32"
    assert evaluate.eval_main(parser.parse_args(base + ["--precision", "bf16"])) == 0
    assert seen["precision"] == "bf16"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--precision", "fp16"])
