"""Checkpoints and Hugging Face folders a run is given: ``trust_remote_code`` reaches every
loader (and a checkpoint never switches it on by itself), and a corrupt or missing checkpoint
ends loading, resuming, eval and transcribe with a message naming the file, not a stack trace.
The runs and signals of tests/test_reliability_resume.py make the checkpoints some of them use."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_reliability_resume import sft_config

from speechrl.config import RunConfig
from speechrl.configio import to_dict


@pytest.fixture(scope="session")
def corpus(small_tone_corpus) -> dict[str, Path]:
    return small_tone_corpus


# --------------------------------------------------------------------------- trust_remote_code


def spy_on_hf_loaders(monkeypatch) -> list[tuple[str, object]]:
    """Record (loader, trust_remote_code) for every Hugging Face loader speechrl calls itself
    (the loaders' calls to each other are left out), then load as usual."""
    import transformers

    calls: list[tuple[str, object]] = []

    def spy(name: str, original):
        def load(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("speechrl"):
                calls.append((name, kwargs.get("trust_remote_code", "not passed")))
            return original(*args, **kwargs)
        return load

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModel,
                transformers.AutoModelForCausalLM):
        for method in ("from_pretrained", "from_config"):
            if hasattr(cls, method):
                monkeypatch.setattr(cls, method, spy(f"{cls.__name__}.{method}",
                                                     getattr(cls, method)))
    return calls


@pytest.fixture
def hubert_dir(tmp_path) -> Path:
    from test_encoders import TINY_CONV
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    HubertModel(HubertConfig(**TINY_CONV, feat_extract_norm="layer")).save_pretrained(
        tmp_path / "hubert")
    return tmp_path / "hubert"


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_hugging_face_loader(tmp_path, hubert_dir, tiny_llm_dir,
                                                             tiny_tokenizer_dir, monkeypatch,
                                                             trust):
    from speechrl.checkpoint import save_checkpoint
    from speechrl.config import EncoderConfig, LLMConfig, ModelConfig, TrainConfig
    from speechrl.train.speech import load_or_build_model

    fields = {} if not trust else {"trust_remote_code": True}  # False: the default
    model_cfg = ModelConfig(encoder=EncoderConfig(kind="hubert", path=str(hubert_dir)),
                            llm=LLMConfig(path=str(tiny_llm_dir)),
                            tokenizer=str(tiny_tokenizer_dir), **fields)
    calls = spy_on_hf_loaders(monkeypatch)
    model = load_or_build_model(RunConfig(model=model_cfg), torch.device("cpu"))
    # Building from folders: the tokenizer, the encoder's config and weights, the LLM.
    assert sorted(calls) == sorted([("AutoTokenizer.from_pretrained", trust),
                                    ("AutoConfig.from_pretrained", trust),
                                    ("AutoModel.from_pretrained", trust),
                                    ("AutoModelForCausalLM.from_pretrained", trust)])
    save_checkpoint(model, tmp_path / "ckpt")
    calls.clear()
    init = RunConfig(model=model_cfg, train=TrainConfig(init=str(tmp_path / "ckpt")))
    load_or_build_model(init, torch.device("cpu"))  # GRPO's start: the run's setting rules
    # From a checkpoint: architectures from the saved configs, then the saved weights.
    assert sorted(calls) == sorted([("AutoTokenizer.from_pretrained", trust),
                                    ("AutoConfig.from_pretrained", trust),
                                    ("AutoModel.from_config", trust),
                                    ("AutoConfig.from_pretrained", trust),
                                    ("AutoModelForCausalLM.from_config", trust)])


def test_a_checkpoint_never_switches_remote_code_on_by_itself(tmp_path, tiny_model_config,
                                                              tiny_tokenizer, monkeypatch):
    from speechrl.checkpoint import load_model, save_checkpoint
    from speechrl.model import SpeechLLM

    trusting = dataclasses.replace(tiny_model_config, trust_remote_code=True)
    save_checkpoint(SpeechLLM.from_config(trusting, tiny_tokenizer), tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "speechrl.json").read_text())["model"][
        "trust_remote_code"] is True
    calls = spy_on_hf_loaders(monkeypatch)
    model = load_model(tmp_path / "ckpt")
    assert calls and {trust for _, trust in calls} == {False}
    assert model.config.trust_remote_code is True  # kept as saved, for re-saving


# --------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory, tiny_model_config_module) -> Path:
    from speechrl.checkpoint import save_checkpoint
    from speechrl.model import SpeechLLM
    from speechrl.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = SpeechLLM.from_config(tiny_model_config_module,
                                  load_tokenizer(tiny_model_config_module))
    optimizer = torch.optim.AdamW(model.parameters())
    return save_checkpoint(model, tmp_path_factory.mktemp("good") / "ckpt",
                           trainer_state={"step": 1},
                           optimizer_state={"optimizer": optimizer.state_dict()})


def cut_in_half(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def not_json(file: Path) -> None:
    file.write_text('{"model_type": "llama", "hidden_size": ')  # a write cut off mid-way


CORRUPT = {  # name: (file, what is done to it, the message's start, {d}: the folder)
    "truncated weights": ("model.safetensors", cut_in_half,
                          "{d}/model.safetensors is unreadable or does not fit the model: "),
    "manifest not JSON": ("speechrl.json", not_json, "cannot read {d}/speechrl.json: "),
    "LLM config not JSON": ("llm/config.json", not_json, "cannot read {d}/llm/config.json: "),
    "encoder config not JSON": ("encoder/config.json", not_json,
                                "cannot read {d}/encoder/config.json: "),
    "tokenizer not JSON": ("tokenizer/tokenizer.json", cut_in_half,
                           "cannot read {d}/tokenizer/tokenizer.json: "),
    "missing tokenizer": ("tokenizer/tokenizer.json", Path.unlink,
                          "checkpoint {d} is incomplete: missing tokenizer/tokenizer.json"),
    "missing tokenizer config": (
        "tokenizer/tokenizer_config.json", Path.unlink,
        "checkpoint {d} is incomplete: missing tokenizer/tokenizer_config.json"),
    "LLM config with a wrong type": (
        "llm/config.json",
        lambda f: f.write_text(f.read_text().replace('"hidden_size": 32', '"hidden_size": "x"')),
        "cannot rebuild the model from {d}/llm/config.json and {d}/encoder/config.json: "),
    # Which file changed cannot be known: the tokenizer folder is named.
    "tokenizer with another EOS": (
        "tokenizer/tokenizer_config.json",
        lambda f: f.write_text(f.read_text().replace('"eos_token": "<EOS>"',
                                                     '"eos_token": "<pad>"')),
        "the tokenizer in {d}/tokenizer gives the prompt tokens "),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path, good_checkpoint,
                                                                    case):
    import shutil

    from speechrl.checkpoint import CheckpointError, load_model

    folder = shutil.copytree(good_checkpoint, tmp_path / "ckpt")
    name, corrupt, says = CORRUPT[case]
    before = (folder / name).read_bytes()
    corrupt(folder / name)
    assert not (folder / name).exists() or (folder / name).read_bytes() != before
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    assert str(info.value).startswith(says.format(d=folder)), str(info.value)


def garbage_optimizer(file: Path) -> None:
    file.write_bytes(b"\x00not a torch file" * 8)


def foreign_optimizer(file: Path) -> None:
    """A readable optimizer state of another model (one parameter of another shape)."""
    other = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(other.parameters())
    other(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": {}}, file)


RESUME_CORRUPT = {  # name: (file in last/, corruption, what the message says)
    "garbage optimizer state": ("optimizer.pt", garbage_optimizer, "cannot read"),
    "truncated optimizer state": ("optimizer.pt", cut_in_half, "cannot read"),
    "another run's optimizer state": ("optimizer.pt", foreign_optimizer, "does not fit"),
    "trainer state not JSON": ("trainer_state.json", not_json, "cannot read"),
    "trainer state with a text step": (
        "trainer_state.json",
        lambda f: f.write_text(json.dumps({**json.loads(f.read_text()), "step": "two"})),
        "step is 'two', not a count"),
    "truncated weights": ("model.safetensors", cut_in_half, "is unreadable"),
}


@pytest.fixture(scope="module")
def two_step_sft(tmp_path_factory, corpus, tiny_model_config_module) -> RunConfig:
    from speechrl.train.sft import train_sft

    cfg = sft_config(tmp_path_factory.mktemp("two_steps"), corpus, tiny_model_config_module,
                     max_steps=2)
    train_sft(cfg)
    return cfg


@pytest.mark.parametrize("case", sorted(RESUME_CORRUPT))
def test_resuming_from_a_corrupt_checkpoint_exits_1_naming_the_file(tmp_path, two_step_sft,
                                                                    capsys, case):
    import shutil

    from speechrl.cli import main

    last = tmp_path / "run" / "last"
    shutil.copytree(Path(two_step_sft.train.output_dir) / "last", last)
    name, corrupt, says = RESUME_CORRUPT[case]
    corrupt(last / name)
    cfg = dataclasses.replace(two_step_sft, train=dataclasses.replace(
        two_step_sft.train, output_dir=str(tmp_path / "run"), max_steps=4))
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["sft", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "sft: " in err and says in err and str(last / name) in err, err
    assert "Traceback" not in err


def test_eval_of_a_corrupt_checkpoint_exits_1_naming_the_file(tmp_path, good_checkpoint, corpus,
                                                              capsys):
    import shutil

    from speechrl.cli import main

    folder = shutil.copytree(good_checkpoint, tmp_path / "ckpt")
    cut_in_half(folder / "model.safetensors")
    assert main(["eval", "--checkpoint", str(folder), "--data", str(corpus["dev"]),
                 "--out", str(tmp_path / "eval")]) == 1
    err = capsys.readouterr().err
    assert f"eval: {folder / 'model.safetensors'} is unreadable" in err and "Traceback" not in err


def test_transcribe_of_a_missing_or_corrupt_checkpoint_exits_1_with_a_message(
        tmp_path, good_checkpoint, corpus, capsys):
    import shutil

    from speechrl.cli import main

    wav = str(corpus["dev"].parent / "utt000.wav")
    assert main(["transcribe", "--checkpoint", str(tmp_path / "absent"), wav]) == 1
    err = capsys.readouterr().err
    assert f"transcribe: no checkpoint folder at {tmp_path / 'absent'}" in err
    assert "Traceback" not in err
    folder = shutil.copytree(good_checkpoint, tmp_path / "ckpt")
    cut_in_half(folder / "model.safetensors")
    assert main(["transcribe", "--checkpoint", str(folder), wav]) == 1
    err = capsys.readouterr().err
    assert f"transcribe: {folder / 'model.safetensors'} is unreadable" in err
    assert "Traceback" not in err


def test_transcribe_reports_an_unreadable_file_and_transcribes_the_others(tmp_path,
                                                                         good_checkpoint, corpus,
                                                                         capsys):
    from speechrl.cli import main
    from speechrl.evaluate import transcribe_files

    wav = str(corpus["dev"].parent / "utt000.wav")
    other = str(corpus["dev"].parent / "utt001.wav")
    expected = dict(transcribe_files(good_checkpoint, [wav, other], device="cpu"))
    missing = str(tmp_path / "missing.wav")
    assert main(["transcribe", "--checkpoint", str(good_checkpoint), "--device", "cpu",
                 wav, missing, other]) == 1
    out, err = capsys.readouterr()
    # Both readable files' transcripts, in order, though the one between them failed.
    assert out == f"{wav}\t{expected[wav]}\n{other}\t{expected[other]}\n"
    assert err == f"transcribe: {missing}: no such audio file\n"


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_eval_and_transcribe_pass_trust_remote_code_to_every_loader(tmp_path, good_checkpoint,
                                                                    corpus, monkeypatch, flag):
    from speechrl.cli import main

    calls = spy_on_hf_loaders(monkeypatch)
    wav = str(corpus["dev"].parent / "utt000.wav")
    assert main(["transcribe", "--checkpoint", str(good_checkpoint), *flag, wav]) == 0
    # The tokenizer and the LLM's config and architecture (the conformer is built-in).
    assert sorted(calls) == sorted([("AutoTokenizer.from_pretrained", bool(flag)),
                                    ("AutoConfig.from_pretrained", bool(flag)),
                                    ("AutoModelForCausalLM.from_config", bool(flag))])
    calls.clear()
    assert main(["eval", "--checkpoint", str(good_checkpoint), "--data", str(corpus["dev"]),
                 "--out", str(tmp_path / "eval"), *flag]) == 0
    assert calls and {trust for _, trust in calls} == {bool(flag)}
