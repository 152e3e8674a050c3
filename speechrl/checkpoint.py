"""Checkpoints: one self-contained folder, written atomically, read without unpickling.

    speechrl.json          model config, prompt tokens, versions
    model.safetensors      every weight: encoder, projector, LLM (LoRA adapters included)
    llm/config.json        the LLM's Hugging Face config
    encoder/config.json    the encoder's config (HF, or the built-in conformer's)
    tokenizer/             Hugging Face tokenizer files
    trainer_state.json     for resuming (optional): step, data position, counters, RNG
    optimizer.pt           for resuming (optional; tensors and plain containers only): the
                           schedule, torch's RNG states and, unless FSDP2 shards it, the
                           optimizer state
    optimizer_shards/      for resuming under FSDP2: each rank's part of the optimizer state

The pre-training stages write other model files into the same kind of folder (a Hugging Face
LLM, the encoder alone) and their resume files with :func:`write_resume_files`. This module is
the only one that names the files; every stage reads and writes them through it.

Loading never needs the original model folders. A save goes to a temporary folder beside the
target, is fsync'ed, then renamed into place, so a crash mid-save leaves the previous checkpoint
whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import transformers

import speechrl
from speechrl import distributed
from speechrl.config import ModelConfig
from speechrl.configio import from_dict, to_dict
from speechrl.model import SpeechLLM
from speechrl.prompt import build_prompt, render_prompt
from speechrl.tokenizer import SpeechTokenizer

FORMAT_VERSION = 1
MANIFEST = "speechrl.json"
WEIGHTS = "model.safetensors"
LLM_DIR = "llm"
ENCODER_DIR = "encoder"
TOKENIZER_DIR = "tokenizer"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
# Under FSDP2 the optimizer moments stay sharded: each rank writes its part here with
# torch.distributed.checkpoint, and any number of ranks can read them back.
SHARDED_OPTIMIZER = "optimizer_shards"
REQUIRED = (
    MANIFEST,
    WEIGHTS,
    f"{LLM_DIR}/config.json",
    f"{ENCODER_DIR}/config.json",
    f"{TOKENIZER_DIR}/tokenizer.json",
    f"{TOKENIZER_DIR}/tokenizer_config.json",  # without it the prompt's BOS / EOS could change
)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupt."""


# --------------------------------------------------------------------------- save


def save_checkpoint(
    model: SpeechLLM,
    path: str | Path,
    *,
    trainer_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optionally the training state) to the folder ``path``, atomically."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {path}: it is a file")
    with atomic_directory(path) as tmp:
        write_checkpoint(model, tmp, trainer_state=trainer_state,
                         optimizer_state=optimizer_state)
    return path


def write_checkpoint(
    model: SpeechLLM,
    folder: Path,
    *,
    trainer_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """The checkpoint's files into an existing (temporary) ``folder``; ``state_dict`` replaces
    the model's own weights (the full weights gathered from an FSDP2-sharded model)."""
    if trainer_state is not None:
        try:
            trainer_state_text = json.dumps(trainer_state, indent=2)
        except TypeError as err:
            raise TypeError(f"trainer_state must be JSON-serialisable: {err}") from err
    write_model(model, folder, state_dict=state_dict)
    if trainer_state is not None:
        (folder / TRAINER_STATE).write_text(trainer_state_text + "\n")
    if optimizer_state is not None:
        torch.save(optimizer_state, folder / OPTIMIZER)


def training_payload(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                     rng: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What ``optimizer.pt`` holds: the schedule, the RNG states ``rng`` and, unless FSDP2
    shards it, the optimizer state."""
    payload = {"scheduler": scheduler.state_dict(), **rng}
    if not distributed.is_sharded(model):
        payload["optimizer"] = optimizer.state_dict()
    return payload


def save_optimizer_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          folder: Path) -> None:
    """FSDP2 only (a no-op otherwise): every rank writes its optimizer shard into ``folder``."""
    if distributed.is_sharded(model):
        distributed.save_sharded_optimizer(model, optimizer, folder / SHARDED_OPTIMIZER)


def write_resume_files(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       trainer_state: dict[str, Any], payload: dict[str, Any]) -> None:
    """What a resume needs besides the weights, into the (temporary) ``folder`` of a
    :func:`shared_atomic_directory`: every rank its optimizer shard (FSDP2), rank 0
    ``trainer_state.json`` and ``optimizer.pt`` (``payload``, from :func:`training_payload`)."""
    save_optimizer_shards(model, optimizer, folder)
    if distributed.is_main():
        (folder / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        torch.save(payload, folder / OPTIMIZER)


def save_speech_checkpoint(model: torch.nn.Module, path: Path, *,
                           trainer_state: dict[str, Any] | None = None,
                           optimizer: torch.optim.Optimizer | None = None,
                           payload: dict[str, Any] | None = None) -> Path:
    """A checkpoint folder of a (possibly wrapped) speech-LLM, written once; with ``optimizer``
    and ``payload`` (:func:`training_payload`) a resumable one. Every rank calls it: rank 0
    writes the files; under FSDP2 all ranks first gather the weights and write their optimizer
    shards."""
    weights = distributed.full_state_dict(model) if distributed.is_sharded(model) else None
    with shared_atomic_directory(path) as tmp:
        if optimizer is not None:
            save_optimizer_shards(model, optimizer, tmp)
        if distributed.is_main():
            write_checkpoint(distributed.unwrap(model), tmp, trainer_state=trainer_state,
                             optimizer_state=payload, state_dict=weights)
    return path


def write_weights(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """``weights`` (every tensor once, plain) as the folder's ``model.safetensors``."""
    safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()},
                                str(folder / WEIGHTS))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; when the block ends without error, fsync
    it and rename it to ``path`` (replacing any previous folder), else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_in(tmp, path)
    except OSError as err:  # disk full, quota, permissions: say so, and what is left
        shutil.rmtree(tmp, ignore_errors=True)
        kept = (f"the previous checkpoint in {path} is unchanged" if path.exists()
                else f"nothing was written to {path}")
        raise CheckpointError(f"could not write the checkpoint {path}: {err}; {kept}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_model(model: SpeechLLM, folder: Path,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The model's files (everything but the training state) into an existing ``folder``;
    ``state_dict`` (every weight once, plain tensors) replaces the model's own when given."""
    manifest = {
        "format": FORMAT_VERSION,
        "model": to_dict(model.config),
        "prompt": {
            "tokens": model.tokenizer.prompt_tokens(),
            "instruction": model.config.instruction,
            "inference_layout": render_prompt(
                model.tokenizer,
                build_prompt(model.tokenizer, 3, instruction=model.config.instruction).ids,
            ),
        },
        "versions": {
            "speechrl": speechrl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _base_llm(model).config.save_pretrained(str(folder / LLM_DIR))
    model.encoder.save_config(folder / ENCODER_DIR)
    model.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    if state_dict is None:
        # save_model drops the duplicate names of tied tensors (embeddings shared with lm_head).
        safetensors.torch.save_model(model, str(folder / WEIGHTS), force_contiguous=True)
    else:
        write_weights(folder, state_dict)


@contextlib.contextmanager
def shared_atomic_directory(path: Path) -> Iterator[Path]:
    """:func:`atomic_directory` for all ranks together: rank 0 creates the temporary folder
    and, after every rank has written its part into it, renames it into place. Other ranks get
    the same temporary path (a shared file system is assumed, as for data)."""
    if not torch.distributed.is_initialized():
        with atomic_directory(path) as tmp:
            yield tmp
        return
    if distributed.is_main():
        with atomic_directory(path) as tmp:
            distributed.broadcast_object(str(tmp))
            yield tmp
            distributed.barrier()  # every rank's shard is written before the rename
    else:
        tmp = Path(distributed.broadcast_object(None))
        yield tmp
        distributed.barrier()
    distributed.barrier()  # nobody reads ``path`` before it is in place


def _base_llm(model: SpeechLLM) -> torch.nn.Module:
    llm = model.llm
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an existing ``path`` is kept aside until the rename is done."""
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        if old is not None:  # put the previous checkpoint back before reporting the failure
            os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)


def recover_swap(path: str | Path) -> bool:
    """Put back the previous checkpoint when a kill fell between the two renames of
    :func:`_swap_in` (``path`` gone, ``.<name>.old-<pid>`` still there); True if it did."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return False
    left = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not left:
        return False
    os.rename(left[-1], path)
    _fsync_dir(path.parent)
    return True


# --------------------------------------------------------------------------- load


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    *, trust_remote_code: bool = False,
) -> SpeechLLM:
    """The :class:`SpeechLLM` saved in ``path``, on ``device``, cast to ``dtype`` if given.

    ``trust_remote_code`` is the caller's to give (a run's ``model.trust_remote_code``): the
    value saved in the checkpoint never switches it on by itself. Any file of the folder that is
    missing, not JSON, truncated or at odds with the rest raises :class:`CheckpointError` naming
    it."""
    path = check_folder(path)
    manifest = _read_json(path / MANIFEST)
    for config_file in sorted(path.glob("*/*.json")):  # a clear message before HF's own
        _read_json(config_file)
    try:
        cfg = from_dict(ModelConfig, manifest["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / MANIFEST} holds no valid model config: {err}") from err
    # The architecture comes from the copies inside the checkpoint, never the original paths.
    inside = dataclasses.replace(
        cfg,
        encoder=dataclasses.replace(cfg.encoder, path=str(path / ENCODER_DIR)),
        llm=dataclasses.replace(cfg.llm, path=str(path / LLM_DIR)),
        tokenizer=str(path / TOKENIZER_DIR),
        trust_remote_code=trust_remote_code,
    )
    tokenizer = _load_tokenizer(path, manifest, trust_remote_code)
    try:
        model = SpeechLLM.from_config(inside, tokenizer, load_weights=False)
    except Exception as err:  # HF and torch raise many types for a config with bad values
        raise CheckpointError(
            f"cannot rebuild the model from {path / LLM_DIR / 'config.json'} and "
            f"{path / ENCODER_DIR / 'config.json'}: {type(err).__name__}: {err}") from err
    load_weights(model, path)
    model.config = cfg  # as the user wrote it: re-saving keeps the model's provenance
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def _load_tokenizer(path: Path, manifest: dict[str, Any],
                    trust_remote_code: bool) -> SpeechTokenizer:
    """The checkpoint's tokenizer, checked against the prompt tokens ``speechrl.json`` recorded
    (a changed tokenizer would give the prompt other ids than the model learned)."""
    folder = path / TOKENIZER_DIR
    try:
        tokenizer = SpeechTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as err:  # tokenizers raises bare Exceptions for a malformed file
        raise CheckpointError(f"cannot load the tokenizer in {folder}: {type(err).__name__}: "
                              f"{err}") from err
    recorded = (manifest.get("prompt") or {}).get("tokens")
    if recorded and tokenizer.prompt_tokens() != recorded:
        raise CheckpointError(
            f"the tokenizer in {folder} gives the prompt tokens {tokenizer.prompt_tokens()}, "
            f"but {path / MANIFEST} recorded {recorded}: its files were changed")
    return tokenizer


def is_resumable(path: str | Path) -> bool:
    """Whether the folder ``path`` holds a training state to resume from."""
    return (Path(path) / TRAINER_STATE).exists()


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                      payload: dict[str, Any]) -> None:
    """Load the optimizer state saved by :func:`training_payload` / :func:`save_optimizer_shards`
    (whatever the number of ranks then and now)."""
    shards = folder / SHARDED_OPTIMIZER
    if shards.is_dir():  # FSDP2's shards load into any number of ranks, sharded or not
        distributed.load_sharded_optimizer(model, optimizer, shards)
    elif distributed.is_sharded(model):
        raise ValueError(f"{folder} was saved by a DDP or one-process run, whose optimizer state "
                         "cannot be sharded on load; resume it with train.parallel=ddp")
    else:
        optimizer.load_state_dict(payload["optimizer"])


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy the weights of the folder ``path`` (a speechrl checkpoint, or a pre-training stage's
    ``last``) into ``model`` (same architecture), in place."""
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {WEIGHTS}")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{weights} is unreadable or does not fit the model: {err}") from err
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match the saved config: {len(missing)} missing tensors "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )


def load_training_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainer_state, optimizer_state) saved with the checkpoint; the latter None if absent."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"checkpoint {path} cannot be resumed: {TRAINER_STATE} is missing (it was saved "
            f"without trainer_state)"
        )
    trainer_state = _read_json(path / TRAINER_STATE)
    optimizer_file = path / OPTIMIZER
    if not optimizer_file.is_file():
        return trainer_state, None
    try:
        # weights_only: tensors and plain containers only; no arbitrary object is unpickled.
        optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise CheckpointError(
            f"cannot read {optimizer_file}: it is corrupt or truncated, or holds more than "
            f"tensors and plain containers (never unpickled): {_torch_load_error(err)}") from err
    if not isinstance(optimizer_state, dict):
        raise CheckpointError(
            f"{optimizer_file} holds a {type(optimizer_state).__name__}, "
            f"not an optimizer state dict"
        )
    return trainer_state, optimizer_state


def _torch_load_error(err: Exception) -> str:
    """The informative part of torch.load's message: its weights-only failures come wrapped in
    advice to retry unsafely, which is wrong for a corrupt file."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
    return " ".join(text.split())[:300]


def check_folder(path: str | Path) -> Path:
    """``path`` as a Path when it is a checkpoint folder with every required file; else
    :class:`CheckpointError` naming what is missing. Reads nothing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint folder at {path}")
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return path


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {file}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return data
