"""The CUDA paths: bf16 autocast on a GPU, the CUDA generator's state in a training checkpoint,
and NCCL set-up under torchrun. Marked ``gpu`` (``make test`` leaves them out; run them with
``pytest -m gpu tests/test_gpu.py``) and skipped where no CUDA device is visible.

This file is also the script the NCCL test starts under torchrun (see the end of the file).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechrl import distributed
from speechrl.checkpoint import OPTIMIZER, TRAINER_STATE, load_training_state
from speechrl.model import token_logprobs
from speechrl.runtime import autocast, resolve_precision
from speechrl.train.resume import TrainerState, capture_rng, restore_rng

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_precision_auto_is_bf16_autocast_on_cuda():
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda).name == "bf16"
    a, b = torch.randn(8, 16, device=cuda), torch.randn(16, 4, device=cuda)
    with autocast(cuda, "auto"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cuda, "fp32"):
        assert (a @ b).dtype == torch.float32


def test_speech_llm_under_cuda_autocast_scores_in_bf16_close_to_fp32(tiny_model, random_fbank):
    cuda = torch.device("cuda")
    model = tiny_model.to(cuda)
    feats, lengths = random_fbank([30, 21])
    eos, pad = model.tokenizer.eos_id, model.tokenizer.pad_id
    targets = torch.tensor([[7, 8, 9, eos], [10, 11, eos, pad]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    with torch.no_grad():
        fp32 = token_logprobs(model(feats, lengths, targets, mask).logits, targets.to(cuda),
                              mask.to(cuda))
        with autocast(cuda, "auto"):
            logits = model(feats, lengths, targets, mask).logits
        assert logits.dtype == torch.bfloat16  # the LLM ran under autocast
        bf16 = token_logprobs(logits, targets.to(cuda), mask.to(cuda))
    # token_logprobs works in float32 whatever the logits; bf16 keeps ~3 significant digits of
    # log-probs near log(V) = -5.7.
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.2)
    assert not torch.equal(bf16, fp32)


def test_training_checkpoint_restores_the_cuda_generator(tmp_path):
    # What a checkpoint saves (training_payload -> optimizer.pt) and what a resume restores
    # (load_training_state -> restore_rng): the CUDA draws after the resume are those after
    # the save, so dropout on a GPU continues exactly.
    torch.cuda.manual_seed(1234)
    torch.rand(5, device="cuda")
    state = TrainerState()
    payload = capture_rng(state)
    assert "cuda_rng" in payload
    expected = torch.rand(16, device="cuda")
    torch.save(payload, tmp_path / OPTIMIZER)
    (tmp_path / TRAINER_STATE).write_text(json.dumps(state.to_json()))

    torch.rand(1000, device="cuda")  # the generator moves on, as a run does until it stops
    trainer_state, loaded = load_training_state(tmp_path)
    restore_rng(TrainerState.from_json(trainer_state), loaded)
    assert torch.equal(torch.rand(16, device="cuda"), expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL with two ranks needs two GPUs")
def test_torchrun_ranks_join_nccl_each_on_its_own_gpu(tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc_per_node", "2", __file__, str(tmp_path)]
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, seen in enumerate(ranks):
        assert seen == {"backend": "nccl", "device": f"cuda:{r}", "current_device": r,
                        "world_size": 2, "sum": 3.0, "gathered": [0, 1]}, r


# --------------------------------------------------------------------------- torchrun worker


def nccl_worker(out: Path) -> None:
    """One rank of the NCCL test: join through distributed.setup, then record what it got."""
    import torch.distributed as dist

    world = distributed.setup("auto")
    try:
        seen = {"backend": dist.get_backend(), "device": str(world.device),
                "current_device": torch.cuda.current_device(), "world_size": world.world_size,
                # NCCL moves CUDA tensors only: the helpers must put their numbers on the GPU.
                "sum": distributed.all_reduce_sum([world.rank + 1.0])[0],
                "gathered": distributed.all_gather_objects(world.rank)}
        (out / f"rank{world.rank}.json").write_text(json.dumps(seen))
    except BaseException:
        distributed.teardown()
        raise
    distributed.teardown(synchronize=True)


if __name__ == "__main__":
    nccl_worker(Path(sys.argv[1]))
