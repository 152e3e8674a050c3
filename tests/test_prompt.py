import pytest
import torch

from speechrl.prompt import build_prompt, pad_prompts, pad_targets, render_prompt


def test_training_layout_is_pinned_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    instruction = tok.encode("Convert speech to text")
    hello = tok.encode("hello world")
    prompt = build_prompt(tok, 3, target_ids=hello)
    # Ids from train_bpe: <pad> 0, <BOS> 1, <EOS> 2, <User> 3, <S-BOS> 4, <System> 5, <speech> 6.
    assert list(prompt.ids) == [3, 1, *instruction, 4, 6, 6, 6, 5, 1, *hello, 2]
    tokens = tok.hf.convert_ids_to_tokens(list(prompt.ids))
    n = len(instruction)
    assert tokens[:2] == ["<User>", "<BOS>"]
    assert tokens[2 + n : 2 + n + 6] == [
        "<S-BOS>",
        "<speech>",
        "<speech>",
        "<speech>",
        "<System>",
        "<BOS>",
    ]
    assert tokens[-1] == "<EOS>"
    assert render_prompt(tok, prompt.ids) == (
        "<User><BOS> Convert speech to text <S-BOS> s1..s3 <System><BOS> hello world <EOS>"
    )


def test_inference_prompt_is_a_prefix_of_the_training_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    target = tok.encode("le chat est sur le tapis")
    inference = build_prompt(tok, 5)
    training = build_prompt(tok, 5, target_ids=target)
    assert training.ids[: len(inference.ids)] == inference.ids
    assert training.ids[len(inference.ids) :] == (*target, tok.eos_id)
    assert inference.ids[-2:] == (tok.system_id, tok.bos_id)
    assert render_prompt(tok, inference.ids).endswith("s1..s5 <System><BOS>")
    assert inference.target_start == len(inference.ids)
    assert training.target_start == len(inference.ids)
    # The loss covers x1..xT and <EOS>, nothing else (eq. 2).
    assert training.label_mask == (False,) * len(inference.ids) + (True,) * (len(target) + 1)
    assert not any(inference.label_mask)
    speech_positions = [i for i, s in enumerate(training.speech_mask) if s]
    assert speech_positions == [i for i, t in enumerate(training.ids) if t == tok.speech_id]
    assert len(speech_positions) == 5


def test_pad_prompts_left_and_right(tiny_tokenizer):
    tok = tiny_tokenizer
    long, short = build_prompt(tok, 6), build_prompt(tok, 2)
    batch = pad_prompts([long, short], tok.pad_id, side="left")
    width = len(long.ids)
    assert batch.ids.shape == (2, width) and len(short.ids) == width - 4
    assert batch.ids[1].tolist() == [tok.pad_id] * 4 + list(short.ids)
    assert batch.attention_mask.tolist() == [[1] * width, [0] * 4 + [1] * (width - 4)]
    assert batch.speech_mask.sum(1).tolist() == [6, 2]
    # Left padding: every row ends with <System><BOS>, where decoding starts.
    assert batch.ids[:, -2:].tolist() == [[tok.system_id, tok.bos_id]] * 2
    right = pad_prompts([short, long], tok.pad_id, side="right")
    assert right.ids[0].tolist() == list(short.ids) + [tok.pad_id] * 4
    assert right.attention_mask[0].tolist() == [1] * (width - 4) + [0] * 4


def test_pad_targets_appends_eos_and_right_pads(tiny_tokenizer):
    tok = tiny_tokenizer
    targets, mask = pad_targets(tok, [[10, 11, 12], [13]])
    assert targets.tolist() == [[10, 11, 12, tok.eos_id], [13, tok.eos_id, tok.pad_id, tok.pad_id]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]
    assert mask.dtype == torch.bool


def test_bad_prompts_are_refused(tiny_tokenizer):
    tok = tiny_tokenizer
    with pytest.raises(ValueError, match="at least one speech frame"):
        build_prompt(tok, 0)
    with pytest.raises(ValueError, match="speech placeholder"):
        build_prompt(tok, 2, target_ids=[10, tok.speech_id])
    with pytest.raises(ValueError, match="side must be"):
        pad_prompts([build_prompt(tok, 2)], tok.pad_id, side="middle")
    with pytest.raises(ValueError, match="no transcripts"):
        pad_targets(tok, [])
