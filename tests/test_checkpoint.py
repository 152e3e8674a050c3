import dataclasses
import json
import shutil

import pytest
import torch
from transformers import (
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import speechrl.checkpoint as checkpoint
from speechrl.checkpoint import (
    CheckpointError,
    load_model,
    load_training_state,
    load_weights,
    save_checkpoint,
)
from speechrl.config import EncoderConfig, LLMConfig, LoraConfig
from speechrl.configio import from_dict, to_dict
from speechrl.model import SpeechLLM
from speechrl.prompt import pad_targets


class NotATensor:
    """A pickled custom object: what weights_only loading must refuse."""


def logits_of(model, feats, lengths):
    targets, mask = pad_targets(
        model.tokenizer, [model.tokenizer.encode(t) for t in ("hello world", "the cat")]
    )
    with torch.no_grad():
        return model(feats, lengths, targets, mask).logits


@pytest.fixture
def batch(random_fbank):
    return random_fbank([60, 41])


def test_round_trip_gives_identical_logits_and_records_the_prompt(tiny_model, batch, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "speechrl.json").read_text())
    assert from_dict(type(tiny_model.config), manifest["model"]) == tiny_model.config
    assert manifest["prompt"]["tokens"]["system"] == "<System>"
    assert manifest["prompt"]["inference_layout"] == (
        "<User><BOS> Convert speech to text <S-BOS> s1..s3 <System><BOS>"
    )
    assert set(manifest["versions"]) == {"speechrl", "torch", "transformers"}
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.tokenizer.special_ids == tiny_model.tokenizer.special_ids
    assert torch.equal(logits_of(loaded, *batch), logits_of(tiny_model, *batch))
    assert not list(tmp_path.glob(".ckpt.*"))  # no temporary folder left behind


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_llms_by_path_match_their_original_logits(
    family, tiny_model_config, tiny_tokenizer, tmp_path, batch
):
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=tiny_tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if family == "llama":
        original = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    else:
        original = Qwen2ForCausalLM(Qwen2Config(**kwargs)).eval()
    original.save_pretrained(tmp_path / "hf")
    llm_cfg = LLMConfig(path=str(tmp_path / "hf"))
    cfg = dataclasses.replace(tiny_model_config, llm=llm_cfg)
    model = SpeechLLM.from_config(cfg, tiny_tokenizer).eval()
    ids = torch.tensor([tiny_tokenizer.encode("hello world la città")])
    expected = original(input_ids=ids).logits
    torch.testing.assert_close(model.llm(input_ids=ids).logits, expected, rtol=0, atol=0)
    save_checkpoint(model, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "hf")  # self-contained: the original folder is no longer needed
    loaded = load_model(tmp_path / "ckpt").eval()
    assert type(loaded.llm) is type(original)
    torch.testing.assert_close(loaded.llm(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert torch.equal(logits_of(loaded, *batch), logits_of(model, *batch))


def tiny_whisper(path):
    config = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=50,
        max_target_positions=16,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperForConditionalGeneration(config).save_pretrained(path)
    return EncoderConfig(kind="whisper", path=str(path), layers=(0, 2))


def tiny_hubert(path):
    config = HubertConfig(
        conv_dim=(16, 16),
        conv_kernel=(10, 3),
        conv_stride=(5, 2),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    HubertModel(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text('{"do_normalize": true}')
    return EncoderConfig(kind="hubert", path=str(path))


@pytest.mark.parametrize("make_encoder", [tiny_whisper, tiny_hubert])
def test_hf_encoders_round_trip_without_their_original_folder(
    make_encoder, tiny_model_config, tiny_tokenizer, tmp_path, random_fbank
):
    torch.manual_seed(0)
    encoder_cfg = make_encoder(tmp_path / "hf")
    cfg = dataclasses.replace(tiny_model_config, encoder=encoder_cfg)
    model = SpeechLLM.from_config(cfg, tiny_tokenizer).eval()
    if encoder_cfg.kind == "whisper":
        inputs, lengths = random_fbank([80, 41])
    else:
        gen = torch.Generator().manual_seed(0)
        inputs, lengths = torch.randn(2, 1600, generator=gen), torch.tensor([1600, 1003])
    save_checkpoint(model, tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "hf")
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.encoder.frozen and type(loaded.encoder) is type(model.encoder)
    if encoder_cfg.kind == "hubert":
        assert loaded.encoder.normalize  # preprocessor's do_normalize travels with it
    with torch.no_grad():
        expected, expected_lengths = model.encode_speech(inputs, lengths)
        speech, speech_lengths = loaded.encode_speech(inputs, lengths)
    assert torch.equal(speech, expected) and torch.equal(speech_lengths, expected_lengths)


def test_lora_model_round_trips(tiny_model_config, tiny_tokenizer, tmp_path, batch):
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    cfg = dataclasses.replace(
        tiny_model_config, llm=dataclasses.replace(tiny_model_config.llm, lora=lora)
    )
    torch.manual_seed(0)
    model = SpeechLLM.from_config(cfg, tiny_tokenizer).eval()
    with torch.no_grad():  # LoRA B starts at zero; give the adapters something to carry
        for name, p in model.llm.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_()
    save_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    assert torch.equal(logits_of(loaded, *batch), logits_of(model, *batch))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable


def test_training_state_round_trip(tiny_model, tmp_path, batch):
    optimizer = torch.optim.Adam(tiny_model.trainable_parameters(), lr=1e-3)
    targets, mask = pad_targets(tiny_model.tokenizer, [[10, 11], [12]])
    tiny_model(*batch, targets, mask).logits.sum().backward()
    optimizer.step()
    state = {"step": 7, "best_dev_wer": 0.25}
    save_checkpoint(
        tiny_model,
        tmp_path / "ckpt",
        trainer_state=state,
        optimizer_state={"optimizer": optimizer.state_dict()},
    )
    trainer_state, optimizer_state = load_training_state(tmp_path / "ckpt")
    assert trainer_state == state
    restored = torch.optim.Adam(tiny_model.trainable_parameters(), lr=1e-3)
    restored.load_state_dict(optimizer_state["optimizer"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(restored.state_dict()["state"][0][key], value)
    save_checkpoint(tiny_model, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        load_training_state(tmp_path / "plain")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tiny_model, tmp_path / "bad", trainer_state={"x": object()})


def test_arbitrary_pickles_are_never_loaded(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ckpt", trainer_state={"step": 1})
    torch.save({"optimizer": NotATensor()}, tmp_path / "ckpt" / "optimizer.pt")
    with pytest.raises(CheckpointError, match="cannot read .*optimizer.pt"):
        load_training_state(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "name", ["model.safetensors", "speechrl.json", "tokenizer/tokenizer.json", "llm/config.json"]
)
def test_missing_file_is_named(tiny_model, tmp_path, name):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing {name}"):
        load_model(tmp_path / "ckpt")


def test_corrupt_files_give_checkpoint_errors(tiny_model, tmp_path):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="model.safetensors is unreadable"):
        load_weights(tiny_model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "speechrl.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*speechrl.json"):
        load_model(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_model(tmp_path / "absent")


def test_a_crash_mid_save_leaves_the_previous_checkpoint_whole(
    tiny_model, tmp_path, batch, monkeypatch
):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    before = logits_of(tiny_model, *batch)
    with torch.no_grad():
        tiny_model.projector.net.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model, tmp_path / "ckpt")
    monkeypatch.undo()
    assert torch.equal(logits_of(load_model(tmp_path / "ckpt").eval(), *batch), before)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    save_checkpoint(tiny_model, tmp_path / "ckpt")  # a later save replaces it whole
    after = logits_of(load_model(tmp_path / "ckpt").eval(), *batch)
    assert torch.equal(after, logits_of(tiny_model, *batch)) and not torch.equal(after, before)
    assert to_dict(load_model(tmp_path / "ckpt").config) == to_dict(tiny_model.config)


def test_load_casts_to_the_requested_dtype(tiny_model, tmp_path, batch):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", dtype=torch.bfloat16).eval()
    loaded_params = dict(loaded.named_parameters())
    assert {p.dtype for p in loaded_params.values()} == {torch.bfloat16}
    for name, param in tiny_model.named_parameters():
        assert torch.equal(loaded_params[name], param.to(torch.bfloat16))
    # float32 features go through the bfloat16 model; logits (std ~0.1) move by bf16 rounding.
    logits = logits_of(loaded, *batch)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), logits_of(tiny_model, *batch), atol=0.01, rtol=0)
