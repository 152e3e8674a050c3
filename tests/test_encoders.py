import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import (
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from speechrl.config import EncoderConfig
from speechrl.conformer import ConformerEncoder
from speechrl.encoders import (
    EncoderInput,
    WaveformSpeechEncoder,
    build_encoder,
)


def assert_alone_equals_batched(encoder, inputs, lengths, atol=1e-5):
    """Each utterance alone (cut to its length) gives the batch's valid frames."""
    frames, frame_lengths = encoder(inputs, lengths)
    for i, n in enumerate(lengths.tolist()):
        single = inputs[i : i + 1, :n]
        alone, alone_lengths = encoder(single, lengths[i : i + 1])
        assert alone_lengths.item() == frame_lengths[i].item()
        m = frame_lengths[i].item()
        torch.testing.assert_close(frames[i, :m], alone[0, :m], atol=atol, rtol=0)
        assert torch.all(frames[i, m:] == 0)
    return frames, frame_lengths


# --------------------------------------------------------------------------- conformer


def test_conformer_subsamples_by_four_and_ignores_padding(tiny_encoder_config, random_fbank):
    torch.manual_seed(0)
    encoder = build_encoder(dataclasses.replace(tiny_encoder_config, freeze=False)).train()
    feats, lengths = random_fbank([100, 61, 7])
    # Two 3-wide stride-2 convolutions: n -> (n-1)//2 -> ...: 100->49->24, 61->30->14, 7->3->1.
    frames, frame_lengths = assert_alone_equals_batched(encoder, feats, lengths)
    assert frames.shape == (3, 24, 32)
    assert frame_lengths.tolist() == [24, 14, 1]
    assert encoder.input_kind == "fbank" and encoder.output_dim == 32
    # Garbage in the padding changes nothing either.
    noisy = feats.clone()
    noisy[1, 61:] = 1e3
    torch.testing.assert_close(encoder(noisy, lengths)[0], frames, atol=1e-5, rtol=0)


def test_conformer_save_and_load_frozen(tmp_path, tiny_encoder_config, random_fbank):
    torch.manual_seed(0)
    trained = ConformerEncoder(dataclasses.replace(tiny_encoder_config, dropout=0.5))
    trained.save_pretrained(tmp_path / "enc")
    cfg = EncoderConfig(kind="conformer", path=str(tmp_path / "enc"), d_model=999)
    loaded = build_encoder(cfg)  # architecture from the folder, not from cfg.d_model
    assert loaded.output_dim == 32 and loaded.arch == trained.arch
    assert all(not p.requires_grad for p in loaded.parameters())
    loaded.train()  # a parent model switching to training must not wake dropout (p=0.5)
    assert not loaded.blocks[0].training
    feats, lengths = random_fbank([50, 40])
    out1, _ = loaded(feats, lengths)
    assert not out1.requires_grad
    trained.eval()
    torch.testing.assert_close(out1, trained(feats, lengths)[0], rtol=0, atol=0)


def test_layer_weighted_sum_starts_uniform_and_stays_trainable(tiny_encoder_config, random_fbank):
    torch.manual_seed(0)
    encoder = build_encoder(dataclasses.replace(tiny_encoder_config, layers=(0, 2)))
    feats, lengths = random_fbank([40, 30])
    hidden, _ = encoder.hidden_states(feats, lengths, all_layers=True)
    assert len(hidden) == 3  # subsampling output + 2 blocks
    frames, frame_lengths = encoder(feats, lengths)
    expected = (hidden[0] + hidden[2]) / 2  # softmax of zeros: weights 1/2, 1/2
    valid = torch.arange(frames.shape[1])[None, :] < frame_lengths[:, None]
    torch.testing.assert_close(frames[valid], expected[valid], atol=1e-6, rtol=0)
    frames.sum().backward()
    assert encoder.layer_sum.logits.grad is not None
    assert all(p.grad is None for p in encoder.backbone_parameters())
    with pytest.raises(ValueError, match="encoder layer 3 does not exist"):
        build_encoder(dataclasses.replace(tiny_encoder_config, layers=(0, 3)))


def test_conformer_bad_input(tiny_encoder_config, random_fbank):
    encoder = build_encoder(tiny_encoder_config)
    feats, lengths = random_fbank([20], n_mels=40)
    with pytest.raises(ValueError, match=r"log-mel features \(B, N, 80\)"):
        encoder(feats, lengths)
    feats, lengths = random_fbank([6])
    with pytest.raises(ValueError, match="too short"):
        encoder(feats, lengths)
    with pytest.raises(ValueError, match="unknown model.encoder.kind 'bert'"):
        build_encoder(EncoderConfig(kind="bert"))
    with pytest.raises(ValueError, match="needs encoder.path"):
        build_encoder(EncoderConfig(kind="hubert"))


# --------------------------------------------------------------------------- Whisper


def tiny_whisper_config() -> WhisperConfig:
    return WhisperConfig(
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


@pytest.fixture(scope="module")
def whisper_dirs(tmp_path_factory):
    """A full random Whisper (window of 100 input frames) and its encoder saved alone."""
    root = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    full = WhisperForConditionalGeneration(tiny_whisper_config()).eval()
    full.save_pretrained(root / "full")
    full.model.encoder.save_pretrained(root / "encoder_only")
    return root / "full", root / "encoder_only", full.model.encoder


def test_whisper_from_full_and_encoder_only_folders(whisper_dirs, random_fbank):
    full_dir, encoder_dir, reference = whisper_dirs
    from_full = build_encoder(EncoderConfig(kind="whisper", path=str(full_dir)))
    from_encoder = build_encoder(EncoderConfig(kind="whisper", path=str(encoder_dir)))
    feats, lengths = random_fbank([80, 41])
    frames, frame_lengths = assert_alone_equals_batched(from_full, feats, lengths)
    # conv2 (stride 2, padding 1): n -> (n - 1)//2 + 1: 80 -> 40, 41 -> 21.
    assert frame_lengths.tolist() == [40, 21] and frames.shape == (2, 40, 32)
    torch.testing.assert_close(from_encoder(feats, lengths)[0], frames, rtol=0, atol=0)
    # Against HF's own encoder on a window padded by hand with the silence value
    # max(max(x) - 2, -1.5) of utterance 0.
    window = torch.full((1, 100, 80), max(feats[0].max().item() - 2, -1.5))
    window[0, :80] = feats[0]
    expected = reference(window.transpose(1, 2)).last_hidden_state[0, :40]
    torch.testing.assert_close(frames[0], expected, atol=1e-5, rtol=0)


def test_whisper_refuses_long_input_and_wrong_mel_count(whisper_dirs, random_fbank):
    full_dir = whisper_dirs[0]
    encoder = build_encoder(EncoderConfig(kind="whisper", path=str(full_dir)))
    feats, lengths = random_fbank([101])
    with pytest.raises(ValueError, match="at most 100 frames"):
        encoder(feats, lengths)
    with pytest.raises(ValueError, match="set encoder.n_mels=80"):
        build_encoder(EncoderConfig(kind="whisper", path=str(full_dir), n_mels=128))
    with pytest.raises(ValueError, match="holds a 'whisper' model"):
        build_encoder(EncoderConfig(kind="hubert", path=str(full_dir)))


# --------------------------------------------------------------------------- waveform models

TINY_CONV = dict(
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


def waveform_models():
    return {
        # GroupNorm feature extractor (HuBERT / wav2vec2 base): must run one utterance at a time.
        "hubert": HubertModel(HubertConfig(**TINY_CONV, feat_extract_norm="group")),
        "wavlm": WavLMModel(
            WavLMConfig(
                **TINY_CONV, feat_extract_norm="layer", num_buckets=16, max_bucket_distance=40
            )
        ),
        "wav2vec2": Wav2Vec2Model(
            Wav2Vec2Config(**TINY_CONV, feat_extract_norm="layer", do_stable_layer_norm=True)
        ),
    }


@pytest.mark.parametrize("kind", ["hubert", "wavlm", "wav2vec2"])
def test_waveform_encoders_lengths_and_padding(kind, tmp_path):
    torch.manual_seed(0)
    model = waveform_models()[kind].eval()
    model.save_pretrained(tmp_path)
    encoder = build_encoder(EncoderConfig(kind=kind, path=str(tmp_path), layers=(1, 2)))
    assert isinstance(encoder, WaveformSpeechEncoder)
    assert encoder.input_kind == "waveform" and encoder.output_dim == 32
    assert encoder.one_by_one == (kind == "hubert")
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1600, 1003])
    wave = torch.randn(2, 1600, generator=gen) * (torch.arange(1600)[None] < lengths[:, None])
    frames, frame_lengths = assert_alone_equals_batched(encoder, wave, lengths)
    # conv (10, 5) then (3, 2): 1600 -> 319 -> 159; 1003 -> 199 -> 99; HF's formula agrees.
    assert frame_lengths.tolist() == [159, 99]
    assert frame_lengths.tolist() == model._get_feat_extract_output_lengths(lengths).tolist()
    # The uniform layer sum equals the mean of HF's hidden states 1 and 2.
    hf = model(wave[:1, :1600], output_hidden_states=True).hidden_states
    torch.testing.assert_close(frames[0], (hf[1][0] + hf[2][0]) / 2, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- input spec


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Two tones and noise, with an offset the normalisation must remove."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.5 * np.sin(2 * np.pi * 300 * t) + 0.05 * np.sin(2 * np.pi * 2500 * t) + 0.1
    return (wave + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_input_equals_whisper_feature_extractor(n_mels):
    wave = speech_like(1.37)
    ours = EncoderInput("whisper", n_mels=n_mels).features(wave, 16000)
    # The extractor's default: the 30 s window Whisper reads, of which the clip fills N frames.
    ref = WhisperFeatureExtractor(feature_size=n_mels)(wave, sampling_rate=16000,
                                                       return_tensors="np")["input_features"][0].T
    assert ours.shape == (137, n_mels)
    np.testing.assert_allclose(ours.numpy(), ref[:137], atol=1e-4, rtol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_waveform_input_equals_wav2vec2_feature_extractor(normalize):
    wave = speech_like(0.71, seed=1)
    ours = EncoderInput("waveform", normalize=normalize).features(wave, 16000)
    ref = Wav2Vec2FeatureExtractor(do_normalize=normalize)(wave, sampling_rate=16000,
                                                           return_tensors="np")["input_values"][0]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4, rtol=0)
    if normalize:
        assert abs(float(ours.mean())) < 1e-5 and float(ours.std()) == pytest.approx(1, abs=1e-4)


def test_input_is_resampled_to_the_encoders_rate():
    wave = speech_like(0.5)
    at_8k = EncoderInput("waveform").features(wave[::2], 8000)
    assert at_8k.shape == (8000,)  # 0.5 s at the encoder's 16 kHz
    assert EncoderInput("fbank", n_mels=40).features(wave[::2], 8000).shape == (48, 40)


@pytest.mark.parametrize(("kwargs", "says"), [
    (dict(kind="mfcc", n_mels=80), "unknown encoder input kind 'mfcc'"),
    (dict(kind="whisper"), "needs n_mels >= 1"),
    (dict(kind="waveform", n_mels=80), "has no mel bins"),
    (dict(kind="fbank", n_mels=80, normalize=True), "waveform input only"),
    (dict(kind="whisper", n_mels=80, sample_rate=8000), "defined at 16000 Hz"),
])
def test_input_spec_refuses_what_no_encoder_takes(kwargs, says):
    with pytest.raises(ValueError, match=says):
        EncoderInput(**kwargs)


def test_each_encoder_says_what_it_takes_from_its_folder(tmp_path, whisper_dirs):
    """Mel bins from Whisper's config, normalisation and rate from the preprocessor file (as a
    checkpoint folder holds them), the conformer's mel bins from its own config."""
    whisper = build_encoder(EncoderConfig(kind="whisper", path=str(whisper_dirs[0])))
    assert whisper.input_spec == EncoderInput("whisper", n_mels=80)
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**TINY_CONV, feat_extract_norm="layer")).save_pretrained(
        tmp_path / "w2v")
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path / "w2v")
    wav2vec2 = build_encoder(EncoderConfig(kind="wav2vec2", path=str(tmp_path / "w2v")))
    assert wav2vec2.input_spec == EncoderInput("waveform", normalize=True)
    wav2vec2.save_config(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "preprocessor_config.json").read_text())
    assert saved == {"do_normalize": True, "sampling_rate": 16000}
    conformer = ConformerEncoder(EncoderConfig(kind="conformer", n_mels=40, d_model=32,
                                               n_layers=1, n_heads=2))
    assert conformer.input_spec == EncoderInput("fbank", n_mels=40)
    assert (conformer.input_kind, conformer.n_mels) == ("fbank", 40)
