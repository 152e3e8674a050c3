"""What the speech stages (SFT and GRPO) share: building or loading the speech-LLM, the train
and dev loaders, and the dev evaluation that picks the best checkpoint.

Under torchrun each rank loads its shard of the train and dev data; the dev figures are summed
(loss) and gathered (transcripts) over ranks, so they equal those of one process.
"""

from __future__ import annotations

import torch

from speechrl import distributed
from speechrl.checkpoint import save_speech_checkpoint
from speechrl.config import ConfigError, DecodingConfig, RunConfig
from speechrl.losses import sft_loss
from speechrl.runtime import autocast, say
from speechrl.train.common import Run, encode_targets, local_batch_size
from speechrl.train.resume import TrainerState


def load_or_build_model(cfg: RunConfig, device: torch.device):
    """The ``train.init`` checkpoint when given (GRPO starts from SFT), else a model built from
    ``cfg.model`` (pretrained encoder and LLM by path, or presets)."""
    from speechrl.checkpoint import load_model
    from speechrl.model import SpeechLLM
    from speechrl.tokenizer import SpeechTokenizer

    if cfg.train.init:
        return load_model(cfg.train.init, device=device,
                          trust_remote_code=cfg.model.trust_remote_code)
    tokenizer_path = cfg.model.tokenizer or cfg.model.llm.path
    if tokenizer_path is None:
        raise ValueError("model.tokenizer (or model.llm.path with tokenizer files) is required "
                         "to build a speech-LLM; run `speechrl pretrain-lm` to train one")
    tokenizer = SpeechTokenizer.from_pretrained(tokenizer_path,
                                                trust_remote_code=cfg.model.trust_remote_code)
    return SpeechLLM.from_config(cfg.model, tokenizer).to(device)


def speech_loaders(cfg: RunConfig, model, rank: int = 0, world_size: int = 1):
    """(train loader, dev loader or None) with the features the model's encoder takes, for
    rank ``rank`` of ``world_size``: the global ``train.batch_size`` is split over the ranks."""
    from speechrl.data import make_dataloader

    # What the encoder takes: kind, its own mel bins (a 128-bin Whisper takes 128), sample rate
    # and normalisation. data.features, when set, was checked to name the same kind.
    features = model.encoder.input_spec
    if not cfg.data.train:
        raise ValueError("data.train is empty: give one or more manifests, e.g. "
                         "data.train=corpus/train.jsonl")
    train = make_dataloader(cfg.data.train, cfg.data, features=features, training=True,
                            seed=cfg.train.seed, rank=rank, world_size=world_size,
                            batch_size=local_batch_size(cfg.train))
    dev = None
    if cfg.data.dev:
        dev = make_dataloader(cfg.data.dev, cfg.data, features=features, training=False,
                              rank=rank, world_size=world_size,
                              max_utterances=cfg.train.dev_utterances)
    return train, dev


class EncoderOutputCache:
    """A frozen encoder's output frames for each training utterance (by id), computed the first
    time the utterance is met and reused in later epochs (``sft.cache_encoder_outputs``).

    Valid only while the encoder's output cannot change: every encoder parameter frozen (a
    trainable layer weighting rules it out) and no audio augmentation. The frames computed for
    an utterance alone equal those inside a padded batch up to float rounding, so a cached run
    matches an uncached one to rounding, not bit for bit.

    ``seconds`` (id -> seconds of audio) lists the cached utterances; handed to the training
    dataset (:attr:`~speechrl.data.SpeechDataset.known`), it spares their reading and
    featurising in later epochs, since their inputs would go unused.
    """

    def __init__(self, model, cfg: RunConfig) -> None:
        encoder = distributed.unwrap(model).encoder
        if any(p.requires_grad for p in encoder.parameters()):
            raise ConfigError("sft.cache_encoder_outputs needs a fully frozen encoder (no "
                             "trainable parameters, e.g. no learned layer weighting)")
        if cfg.data.augment:
            raise ConfigError("sft.cache_encoder_outputs cannot be used with data.augment: "
                             "augmented audio changes every epoch")
        self.frames: dict[str, torch.Tensor] = {}
        self.seconds: dict[str, float] = {}
        self.encoded = 0  # utterances put through the encoder

    @torch.no_grad()
    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """batch -> its encoder frames (B, N, D_enc), zero-padded, and lengths (B,)."""
        from speechrl.data import pad_inputs

        missing = [i for i, utt_id in enumerate(batch.ids) if utt_id not in self.frames]
        if missing:
            rows = torch.tensor(missing, device=batch.inputs.device)
            lengths = batch.input_lengths[rows]
            inputs = batch.inputs[rows][:, : int(lengths.max())]
            out, out_lengths = distributed.unwrap(model).encoder(inputs, lengths)
            for j, i in enumerate(missing):
                self.frames[batch.ids[i]] = out[j, : int(out_lengths[j])].detach()
                self.seconds[batch.ids[i]] = float(batch.durations[i])
            self.encoded += len(missing)
        frames, lengths = pad_inputs([self.frames[utt_id] for utt_id in batch.ids])
        return frames, lengths.to(frames.device)


def decoding_caps(decoding: DecodingConfig) -> dict[str, float]:
    """The new-token caps of ``decoding`` as :class:`~speechrl.generate.DecodingOptions`
    fields."""
    return {"max_new_tokens": decoding.max_new_tokens,
            "tokens_per_second": decoding.tokens_per_second,
            "min_token_cap": decoding.min_token_cap}


def dev_evaluation(model, loader, decoding: DecodingConfig, *, device: torch.device,
                   precision: str) -> dict[str, float]:
    """Dev loss (teacher forcing) and greedy dev WER over the dev loader: each rank scores its
    shard, then the loss sums are summed and the transcripts gathered over ranks."""
    from speechrl.metrics import error_counts

    with distributed.full_parameters(model) as plain:
        loss_sum, token_sum, refs, hyps = _dev_shard(plain, loader, decoding, device, precision)
    loss_sum, token_sum = distributed.all_reduce_sum([loss_sum, token_sum])
    pairs = distributed.all_gather_objects((refs, hyps))
    refs = [r for rank_refs, _ in pairs for r in rank_refs]
    hyps = [h for _, rank_hyps in pairs for h in rank_hyps]
    _, total = error_counts(refs, hyps)
    return {"loss": loss_sum / max(token_sum, 1), "wer": total.wer, "utterances": len(refs)}


@torch.no_grad()
def _dev_shard(model, loader, decoding: DecodingConfig, device: torch.device,
               precision: str) -> tuple[float, int, list[str], list[str]]:
    """(loss sum, token count, normalised refs, normalised hyps) of this rank's dev batches."""
    from speechrl.generate import DecodingOptions, generate_from_speech
    from speechrl.text import get_normalizer

    was_training = model.training
    model.eval()
    options = DecodingOptions(strategy="greedy", **decoding_caps(decoding))
    loss_sum, token_sum = 0.0, 0
    refs, hyps = [], []
    for batch in loader:
        batch = batch.to(device)
        targets, mask = encode_targets(model.tokenizer, batch.texts, device)
        with autocast(device, precision):
            speech, speech_lengths = model.encode_speech(batch.inputs, batch.input_lengths)
            logits = model.target_logits(speech, speech_lengths, targets, mask)
            # The speech encoded for the loss serves the decoding too (one encoder pass).
            result = generate_from_speech(model, speech, speech_lengths, options,
                                          durations=batch.durations)
        n = int(mask.sum())
        loss_sum += sft_loss(logits.float(), targets, mask).item() * n
        token_sum += n
        for ref, hyp, lang in zip(batch.texts, result.texts, batch.languages, strict=True):
            norm = get_normalizer(decoding.normalizer, lang)
            refs.append(norm(ref))
            hyps.append(norm(hyp))
    model.train(was_training)
    return loss_sum, token_sum, refs, hyps


def keep_if_best(run: Run, model, state: TrainerState, dev: dict[str, float]) -> None:
    """Log the dev figures and save ``output_dir/best`` when dev WER improved. Every rank calls
    it (the dev figures are the same on all); rank 0 writes."""
    run.logger.log(state.step, dev, prefix="dev/")
    improved = state.best_dev_wer is None or dev["wer"] < state.best_dev_wer
    if improved:
        state.best_dev_wer, state.best_step = dev["wer"], state.step
        save_speech_checkpoint(model, run.best_dir,
                               trainer_state={"step": state.step, "dev": dev})
    say(f"step {state.step}: dev loss {dev['loss']:.3f}, dev WER {100 * dev['wer']:.2f}%"
        + (" (best)" if improved else f" (best {100 * state.best_dev_wer:.2f}% at "
                                       f"step {state.best_step})"))
