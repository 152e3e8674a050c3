import unicodedata

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from speechrl.config import LLMConfig, ModelConfig
from speechrl.tokenizer import SpeechTokenizer, load_tokenizer, train_bpe


def test_train_bpe_is_a_plain_hf_tokenizer_with_the_prompt_tokens_first(tiny_tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok = SpeechTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert hf.convert_ids_to_tokens(list(range(7))) == [
        "<pad>",
        "<BOS>",
        "<EOS>",
        "<User>",
        "<S-BOS>",
        "<System>",
        "<speech>",
    ]
    ids = (
        tok.pad_id,
        tok.bos_id,
        tok.eos_id,
        tok.user_id,
        tok.speech_bos_id,
        tok.system_id,
        tok.speech_id,
    )
    assert ids == (0, 1, 2, 3, 4, 5, 6)
    # 256 byte symbols + 7 specials + merges, capped at the requested 300; nothing was added.
    assert tok.vocab_size == len(hf) == 300


@pytest.mark.parametrize(
    "text",
    ["le chat est sur le tapis", "der Hund läuft über die Straße", "Ñandú, Ærø; 東京!"],
)
def test_roundtrip_multilingual_text_including_unseen_characters(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert all(i not in tiny_tokenizer.special_ids for i in ids)
    assert tiny_tokenizer.decode(ids) == text


def test_decomposed_accents_are_normalised_to_composed(tiny_tokenizer):
    decomposed = unicodedata.normalize("NFD", "fenêtre près")
    assert decomposed != "fenêtre près"
    assert tiny_tokenizer.encode(decomposed) == tiny_tokenizer.encode("fenêtre près")
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(decomposed)) == "fenêtre près"


def test_decode_drops_prompt_tokens_and_batch_decode_takes_tensors(tiny_tokenizer):
    tok = tiny_tokenizer
    hello, cat = tok.encode("hello world"), tok.encode("the cat")
    assert tok.decode([tok.user_id, tok.bos_id, *hello, tok.eos_id, tok.pad_id]) == "hello world"
    width = max(len(hello), len(cat)) + 1
    rows = [r + [tok.eos_id] + [tok.pad_id] * (width - len(r) - 1) for r in (hello, cat)]
    assert tok.batch_decode(torch.tensor(rows)) == ["hello world", "the cat"]


def plain_bpe_without_prompt_tokens() -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer: an end-of-text token, no BOS, no padding, no prompt tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=270,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["hello world"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def test_wrapping_reuses_eos_and_adds_only_what_is_missing(tmp_path):
    hf = plain_bpe_without_prompt_tokens()
    base = len(hf)
    eos = hf.convert_tokens_to_ids("<|endoftext|>")
    tok = SpeechTokenizer(hf)
    assert tok.eos_id == eos
    # Added: <User>, <S-BOS>, <System>, <speech>, then <BOS> and <pad> for the missing roles.
    assert tok.vocab_size == base + 6
    assert (tok.user_id, tok.speech_bos_id, tok.system_id, tok.speech_id) == (
        base,
        base + 1,
        base + 2,
        base + 3,
    )
    assert {tok.bos_id, tok.pad_id} == {base + 4, base + 5}
    tok.save_pretrained(tmp_path)
    again = SpeechTokenizer.from_pretrained(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert again.prompt_tokens() == tok.prompt_tokens()
    assert again.special_ids == tok.special_ids


@pytest.mark.parametrize("tied", [True, False])
def test_resize_embeddings_adds_mean_rows_and_keeps_old_ones(tied):
    hf = plain_bpe_without_prompt_tokens()
    base = len(hf)
    tok = SpeechTokenizer(hf)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=base,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
    )
    before_in = llm.get_input_embeddings().weight.detach().clone()
    before_out = llm.get_output_embeddings().weight.detach().clone()
    assert tok.resize_embeddings(llm) == 6
    after_in = llm.get_input_embeddings().weight
    after_out = llm.get_output_embeddings().weight
    assert after_in.shape == (base + 6, 16) and after_out.shape == (base + 6, 16)
    assert llm.config.vocab_size == base + 6
    torch.testing.assert_close(after_in[:base], before_in, rtol=0, atol=0)
    torch.testing.assert_close(after_out[:base], before_out, rtol=0, atol=0)
    torch.testing.assert_close(after_in[base:], before_in.mean(0).expand(6, 16))
    torch.testing.assert_close(after_out[base:], before_out.mean(0).expand(6, 16))
    assert tok.resize_embeddings(llm) == 0


def test_bad_inputs_give_clear_errors(tiny_tokenizer_dir):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe(["hello"], vocab_size=100)
    with pytest.raises(ValueError, match="no non-empty text"):
        train_bpe(["", "  "], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="no tokenizer folder"):
        SpeechTokenizer.from_pretrained(tiny_tokenizer_dir / "absent")
    with pytest.raises(ValueError, match="model.tokenizer is not set"):
        load_tokenizer(ModelConfig(llm=LLMConfig(preset="tiny")))
    tok = load_tokenizer(ModelConfig(tokenizer=str(tiny_tokenizer_dir)))
    assert tok.vocab_size == 300


def sentencepiece_like_folder(folder) -> str:
    """A Llama-2-like tokenizer folder: metaspace ("▁" for blanks), byte fallback, and <s> </s>
    <unk> that also sit in the BPE model's own vocabulary (ids 1, 2, 0)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    pieces = ["▁", "s", "a", "y", "n", "o", "w", "▁s", "▁n", "ay", "ow", "▁say", "▁now"]
    vocab.update({p: 259 + i for i, p in enumerate(pieces)})
    merges = [("▁", "s"), ("▁", "n"), ("a", "y"), ("o", "w"), ("▁s", "ay"), ("▁n", "ow")]
    bpe = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    hf.save_pretrained(folder)
    return str(folder)


def gpt2_like_folder(folder) -> str:
    plain_bpe_without_prompt_tokens().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("kind", ["train_bpe", "gpt2-like", "sentencepiece-like"])
def test_special_token_strings_in_a_transcript_are_plain_text(tmp_path, tiny_tokenizer_dir,
                                                              kind):
    from speechrl.train.common import encode_targets

    folder = {"train_bpe": lambda: tiny_tokenizer_dir,
              "gpt2-like": lambda: gpt2_like_folder(tmp_path / "tok"),
              "sentencepiece-like": lambda: sentencepiece_like_folder(tmp_path / "tok")}[kind]()
    tok = SpeechTokenizer.from_pretrained(folder)  # the way checkpoints and runs load it
    spelled = " ".join(tok.prompt_tokens().values())  # <User> <BOS>/<s> ... <EOS>/</s> ...
    for text in ["say <EOS> now", f"say {spelled} now", tok.hf.eos_token + tok.hf.bos_token]:
        if any(t in text for t in tok.prompt_tokens().values()):
            # Without the switch the tokenizer would turn these strings into the special ids.
            naive = tok.hf.encode(text, add_special_tokens=False)
            assert set(naive) & tok.special_ids, (kind, text)
        ids = tok.encode(text)
        assert not set(ids) & tok.special_ids, (kind, text, ids)
        assert tok.decode(ids) == text
    # A training target holds exactly one <EOS>: the real one after the transcript.
    targets, mask = encode_targets(tok, ["say <EOS> now", "now"], torch.device("cpu"))
    n = len(tok.encode("say <EOS> now"))
    assert mask.sum(dim=1).tolist() == [n + 1, len(tok.encode("now")) + 1]
    assert (targets[0] == tok.eos_id).nonzero().flatten().tolist() == [n]
    assert tok.decode(targets[0, :n]) == "say <EOS> now"
    # The switch is per call: the wrapped tokenizer still maps the strings to their tokens.
    assert tok.hf.encode(tok.hf.eos_token, add_special_tokens=False) == [tok.eos_id]
