"""fp32 against bf16 autocast for one SFT-sized training step of the tiny LLM on the CPU.

The demo trains on a CPU; where the CPU has native bf16 dot products (AVX512-BF16, AMX), bf16
autocast (fp32 master weights, as on a GPU) roughly halves the step. This times the LLM's
forward and backward on a batch shaped like an SFT batch of the demo (11 utterances of 117
positions, of which 27 are predicted) and a plain matmul of the same shape, fp32 and bf16.

    .venv/bin/python benchmarks/cpu_bf16.py [--threads N] [--repeats R]
"""

from __future__ import annotations

import argparse

import torch
from _common import best_time
from transformers import LlamaForCausalLM

from speechrl.model import llm_config_for_preset

CPU = torch.device("cpu")


def warm_best_time(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    return best_time(fn, CPU, repeats)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=11)
    parser.add_argument("--length", type=int, default=117)
    parser.add_argument("--targets", type=int, default=27)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llm_config_for_preset("tiny", 2000))
    embeds = torch.randn(args.batch, args.length, model.config.hidden_size)
    tokens = args.batch * args.length
    a = torch.randn(tokens, model.config.hidden_size)
    w = torch.randn(model.config.intermediate_size, model.config.hidden_size)

    rows = []
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        def step(dtype=dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = model(inputs_embeds=embeds, logits_to_keep=args.targets).logits
            logits.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

        aa, ww = a.to(dtype), w.to(dtype)
        matmul = warm_best_time(lambda aa=aa, ww=ww: [aa @ ww.T for _ in range(20)],
                                args.repeats) / 20
        rows.append({"precision": name, "step_s": warm_best_time(step, args.repeats),
                     "matmul_gflops": 2 * a.shape[0] * a.shape[1] * w.shape[0] / matmul / 1e9})
    print(f"tiny LLM, batch {args.batch} x {args.length} positions ({args.targets} predicted), "
          f"{args.threads} thread(s)")
    print("| precision | forward+backward (ms) | speed-up | matmul (GFLOP/s) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['precision']} | {1e3 * row['step_s']:.1f} | "
              f"{rows[0]['step_s'] / row['step_s']:.2f}x | {row['matmul_gflops']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
