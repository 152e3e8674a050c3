import dataclasses

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from speechrl.config import EncoderConfig, LLMConfig, LoraConfig, ModelConfig, ProjectorConfig
from speechrl.model import Projector, SpeechLLM, llm_config_for_preset
from speechrl.prompt import build_prompt, pad_targets
from speechrl.tokenizer import train_bpe

TEXTS = ["the cat sat on the mat", "hello world", "la città è bellissima"]


def speech_batch(model, random_fbank, lengths=(100, 61, 37)):
    feats, feat_lengths = random_fbank(list(lengths))
    with torch.no_grad():
        return model.encode_speech(feats, feat_lengths)


def targets_for(model, texts=TEXTS):
    return pad_targets(model.tokenizer, [model.tokenizer.encode(t) for t in texts])


def test_projector_stacks_frames_in_order_and_pads_the_remainder():
    projector = Projector(1, 1, ProjectorConfig(stack=2))
    with torch.no_grad():
        projector.net.weight.copy_(torch.tensor([[1.0, 10.0]]))
        projector.net.bias.zero_()
    frames = torch.tensor([[1.0, 2, 3, 4, 5], [1, 2, 3, 4, 99]])[..., None]
    out, lengths = projector(frames, torch.tensor([5, 4]))
    # Pairs (1,2) (3,4) (5,pad): 1 + 10*2 = 21, 3 + 40 = 43, 5 + 0 = 5. Row 2 drops the 99
    # past its length 4; lengths ceil(5/2) = 3, ceil(4/2) = 2.
    assert out[..., 0].tolist() == [[21.0, 43.0, 5.0], [21.0, 43.0, 0.0]]
    assert lengths.tolist() == [3, 2]
    mlp = Projector(8, 16, ProjectorConfig(stack=4, kind="mlp", hidden=12))
    assert [m.weight.shape for m in mlp.net if isinstance(m, nn.Linear)] == [(12, 32), (16, 12)]
    with pytest.raises(ValueError, match="projector.kind"):
        Projector(8, 16, ProjectorConfig(kind="qformer"))


def meta_param_count(name: str, vocab: int, tied: bool) -> int:
    with torch.device("meta"):
        llm = LlamaForCausalLM(llm_config_for_preset(name, vocab))
    assert llm.config.tie_word_embeddings == tied
    return sum(p.numel() for p in llm.parameters())


def test_presets_follow_the_paper():
    two = llm_config_for_preset("paper-2b", 187178)
    assert (
        two.num_hidden_layers,
        two.num_attention_heads,
        two.hidden_size,
        two.intermediate_size,
        two.num_key_value_heads,
        two.hidden_act,
    ) == (24, 16, 2048, 8192, 8, "silu")
    eight = llm_config_for_preset("paper-8b", 187178)
    assert (
        eight.num_hidden_layers,
        eight.num_attention_heads,
        eight.hidden_size,
        eight.intermediate_size,
        eight.num_key_value_heads,
    ) == (32, 32, 4096, 16384, 8)
    # Per layer: q, o d^2 each; k, v d*d/2 each (8 KV heads of 128: 1024 wide); SwiGLU
    # 3*d*ffn; two RMSNorms d. 2B: 62,918,656 x 24 + 2 untied tables 187178*2048 + final norm.
    layer_2b = 2 * 2048**2 + 2 * 2048 * 1024 + 3 * 2048 * 8192 + 2 * 2048
    assert layer_2b == 62_918_656
    assert (
        meta_param_count("paper-2b", 187178, tied=False)
        == (24 * layer_2b + 2 * 187178 * 2048 + 2048)
        == 2_276_730_880
    )
    # 8B: 243,277,824 x 32 + one tied table 187178*4096 + final norm.
    layer_8b = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 16384 + 2 * 4096
    assert (
        meta_param_count("paper-8b", 187178, tied=True)
        == (32 * layer_8b + 187178 * 4096 + 4096)
        == 8_551_575_552
    )
    assert 90e6 < meta_param_count("small", 32000, tied=True) < 110e6
    with pytest.raises(ValueError, match="unknown LLM preset 'huge'"):
        llm_config_for_preset("huge", 100)


def test_tiny_preset_is_a_5_to_15m_cpu_model(tmp_path):
    tokenizer = train_bpe([f"{t} {i}" for i in range(300) for t in TEXTS], vocab_size=2000)
    model = SpeechLLM.from_config(ModelConfig(llm=LLMConfig(preset="tiny")), tokenizer)
    assert 5e6 < model.num_parameters() < 15e6
    # Frozen conformer: the trainable part is projector + LLM.
    trainable = model.num_parameters(trainable_only=True)
    assert trainable == model.num_parameters() - sum(p.numel() for p in model.encoder.parameters())


def test_shapes_and_left_padded_prompt(tiny_model, random_fbank):
    speech, speech_lengths = speech_batch(tiny_model, random_fbank)
    # Frames 100, 61, 37 -> conformer 24, 14, 8 -> stack 2 -> 12, 7, 4.
    assert speech.shape == (3, 12, 32) and speech_lengths.tolist() == [12, 7, 4]
    embeds, mask = tiny_model.inference_prompt(speech, speech_lengths)
    n_instruction = len(tiny_model.tokenizer.encode("Convert speech to text"))
    width = 2 + n_instruction + 1 + 12 + 2
    assert embeds.shape == (3, width, 32) and mask.shape == (3, width)
    assert mask.sum(1).tolist() == [width, width - 5, width - 8]
    assert mask[2].tolist() == [0] * 8 + [1] * (width - 8)
    tok = tiny_model.tokenizer
    tail = tiny_model.embed_tokens(torch.tensor([tok.system_id, tok.bos_id]))
    assert torch.equal(embeds[:, -2:], tail.expand(3, 2, 32))
    # The speech frames sit right before <System><BOS>.
    assert torch.equal(embeds[2, -6:-2], speech[2, :4])
    targets, target_mask = targets_for(tiny_model)
    logits = tiny_model.target_logits(speech, speech_lengths, targets, target_mask)
    assert logits.shape == (3, targets.shape[1], tok.vocab_size)



def test_forward_with_speech_ctc_reads_the_speech_through_the_input_embeddings(tiny_model,
                                                                                random_fbank):
    feats, feat_lengths = random_fbank([100, 61, 37])
    targets, target_mask = targets_for(tiny_model)
    with torch.no_grad():
        plain = tiny_model(feats, feat_lengths, targets, target_mask)
        assert (plain.speech_ctc_logits, plain.speech_lengths) == (None, None)
        plain = plain.logits
        logits, ctc_logits, lengths = tiny_model(feats, feat_lengths, targets, target_mask,
                                                 with_speech_ctc=True)
        speech, speech_lengths = tiny_model.encode_speech(feats, feat_lengths)
        embeddings = tiny_model.embed_tokens(torch.arange(tiny_model.tokenizer.vocab_size))
    assert torch.equal(logits, plain)
    assert ctc_logits.shape == (3, 12, tiny_model.tokenizer.vocab_size)
    assert lengths.tolist() == speech_lengths.tolist() == [12, 7, 4]
    # Token n of utterance b scores word v by the dot product of its speech and v's embedding.
    torch.testing.assert_close(ctc_logits[1, 5, 9], speech[1, 5] @ embeddings[9])
    torch.testing.assert_close(ctc_logits, speech @ embeddings.T)

def test_logprobs_alone_equal_logprobs_in_a_padded_batch(tiny_model, random_fbank):
    speech, speech_lengths = speech_batch(tiny_model, random_fbank)
    targets, target_mask = targets_for(tiny_model)
    with torch.no_grad():
        batched = tiny_model.target_logprobs(speech, speech_lengths, targets, target_mask)
        for i in range(3):
            n, t = speech_lengths[i].item(), target_mask[i].sum().item()
            alone = tiny_model.target_logprobs(
                speech[i : i + 1, :n],
                speech_lengths[i : i + 1],
                targets[i : i + 1, :t],
                target_mask[i : i + 1, :t],
            )
            torch.testing.assert_close(batched[i, :t], alone[0], atol=1e-5, rtol=0)
            assert torch.all(batched[i, t:] == 0)
    assert torch.all(batched[target_mask] < 0)


def test_first_target_logits_equal_a_plain_forward_over_the_prompt(tiny_model, random_fbank):
    speech, speech_lengths = speech_batch(tiny_model, random_fbank)
    targets, target_mask = targets_for(tiny_model)
    with torch.no_grad():
        logits = tiny_model.target_logits(speech, speech_lengths, targets, target_mask)
        for i in (0, 2):  # the longest row (no padding) and the most padded one
            n = speech_lengths[i].item()
            ids = torch.tensor(build_prompt(tiny_model.tokenizer, n).ids)
            embeds = tiny_model.embed_tokens(ids)
            embeds[ids == tiny_model.tokenizer.speech_id] = speech[i, :n]
            plain = tiny_model.llm(inputs_embeds=embeds[None]).logits[0, -1]
            torch.testing.assert_close(logits[i, 0], plain, atol=1e-5, rtol=0)


def test_logprobs_agree_with_kv_cache_decoding(tiny_model, random_fbank):
    """Prefill the left-padded prompt once, then feed the targets one token at a time."""
    speech, speech_lengths = speech_batch(tiny_model, random_fbank)
    targets, target_mask = targets_for(tiny_model)
    llm = tiny_model.llm
    with torch.no_grad():
        expected = tiny_model.target_logprobs(speech, speech_lengths, targets, target_mask)
        embeds, mask = tiny_model.inference_prompt(speech, speech_lengths)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        next_pos = positions[:, -1:] + 1
        stepped = []
        for t in range(targets.shape[1]):
            stepped.append(logits.log_softmax(-1).gather(-1, targets[:, t : t + 1]))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = llm(
                input_ids=targets[:, t : t + 1],
                attention_mask=mask,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
        stepped = torch.cat(stepped, dim=1) * target_mask
    torch.testing.assert_close(expected, stepped, atol=1e-5, rtol=0)


def test_lora_wraps_only_target_modules_and_freezes_the_base(
    tiny_model_config, tiny_tokenizer, random_fbank
):
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    cfg = dataclasses.replace(
        tiny_model_config, llm=dataclasses.replace(tiny_model_config.llm, lora=lora)
    )
    torch.manual_seed(0)
    model = SpeechLLM.from_config(cfg, tiny_tokenizer)
    layer = model.llm.get_base_model().model.layers[0].self_attn
    assert hasattr(layer.q_proj, "lora_A") and hasattr(layer.v_proj, "lora_A")
    assert type(layer.k_proj) is nn.Linear and type(layer.o_proj) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    llm_trainable = {n for n in trainable if n.startswith("llm.")}
    assert llm_trainable and all(
        ".lora_A." in n or ".lora_B." in n or "trainable_tokens_delta" in n for n in llm_trainable
    )
    assert {n.split(".")[0] for n in trainable} == {"projector", "llm"}
    base = {n: p.detach().clone() for n, p in model.llm.named_parameters() if not p.requires_grad}
    lora_b = layer.q_proj.lora_B["default"].weight.detach().clone()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    speech, speech_lengths = model.encode_speech(*random_fbank([60, 40]))
    targets, target_mask = targets_for(model, TEXTS[:2])
    (-model.target_logprobs(speech, speech_lengths, targets, target_mask).sum()).backward()
    optimizer.step()
    assert all(torch.equal(p, base[n]) for n, p in model.llm.named_parameters() if n in base)
    assert not torch.equal(layer.q_proj.lora_B["default"].weight, lora_b)


@pytest.mark.parametrize("layers", [None, (1, 2)])
def test_frozen_encoder_is_bit_identical_after_an_optimizer_step(
    tiny_model_config, tiny_tokenizer, random_fbank, layers
):
    encoder_cfg = dataclasses.replace(tiny_model_config.encoder, layers=layers, dropout=0.3)
    cfg = dataclasses.replace(tiny_model_config, encoder=encoder_cfg)
    torch.manual_seed(0)
    model = SpeechLLM.from_config(cfg, tiny_tokenizer).train()
    # model.train() leaves every encoder submodule in eval: dropout 0.3 stays off.
    assert not any(m.training for n, m in model.encoder.named_modules() if n and n != "layer_sum")
    feats, feat_lengths = random_fbank([60, 40])
    torch.testing.assert_close(
        model.encoder(feats, feat_lengths), model.encoder(feats, feat_lengths)
    )
    before = [p.detach().clone() for p in model.encoder.backbone_parameters()]
    projector_before = model.projector.net.weight.detach().clone()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    targets, target_mask = targets_for(model, TEXTS[:2])
    logits = model(feats, feat_lengths, targets, target_mask).logits
    nn.functional.cross_entropy(logits[target_mask], targets[target_mask]).backward()
    optimizer.step()
    assert all(
        torch.equal(p, b) for p, b in zip(model.encoder.backbone_parameters(), before, strict=True)
    )
    assert not torch.equal(model.projector.net.weight, projector_before)
    if layers:  # the layer weighting is trained with the projector
        assert not torch.equal(model.encoder.layer_sum.logits, torch.zeros(2))


def test_bad_targets_are_refused(tiny_model, random_fbank):
    speech, speech_lengths = speech_batch(tiny_model, random_fbank, (60, 40))
    targets, target_mask = targets_for(tiny_model, TEXTS[:2])
    holes = target_mask.clone()
    holes[0, 1] = False
    with pytest.raises(ValueError, match="right-padded"):
        tiny_model.target_logprobs(speech, speech_lengths, targets, holes)
    with pytest.raises(ValueError, match="must both be"):
        tiny_model.target_logprobs(speech, speech_lengths, targets[:, :2], target_mask)
    with pytest.raises(ValueError, match="speech_lengths"):
        tiny_model.inference_prompt(speech, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unknown model.llm.dtype"):
        SpeechLLM.from_config(
            ModelConfig(encoder=EncoderConfig(d_model=32, n_layers=1), llm=LLMConfig(dtype="fp8")),
            tiny_model.tokenizer,
        )
