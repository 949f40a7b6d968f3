"""Train a tiny LoRA LLaMA for a few steps under ZeRO-3 at 2 ranks, then export and evaluate it.

Launched by tests/test_export.py as ``deepspeed --num_gpus 2 export_worker.py
--base DIR --out DIR``. Every parameter is partitioned (persistence threshold
0), so an export that forgot to gather would write shape-[0] tensors. Writes
under --out: the exported adapter, a DeepSpeed checkpoint, the trained model's
logits on a fixed batch (rank 0) and an evaluation run with the rows split
across the two ranks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

STEPS = 3
MICRO = 2
EVAL_ROWS = 5  # odd: the two ranks get 3 and 2 rows, so the lockstep dummies run


def ds_config(world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO * world,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_model_persistence_threshold": 0, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def train_rows(n: int) -> list[dict]:
    """Short rows (the tiny tokenizer spends many tokens on real questions)."""
    return [{"instruction": f"Pick one of {i % 4 + 1} and {i % 3 + 2}.", "input": "",
             "output": f"the correct answer is answer{i % 4 + 1}", "answer": f"answer{i % 4 + 1}"} for i in range(n)]


def probe_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two right-padded prompts: the batch whose logits must survive the export."""
    texts = ["Which factor will most likely cause a fever? the correct answer is answer2",
             "The quick brown fox"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()

    import deepspeed
    from transformers import AutoModelForCausalLM

    from reflora_ds.config import RunConfig
    from reflora_ds.data import EMBEDDED_TEST, PadCollator, tokenize_rows
    from reflora_ds.evaluate import evaluate, inference_mode, results_json
    from reflora_ds.export import export_adapter
    from reflora_ds.models import load_tokenizer, wrap_with_lora
    from reflora_ds.dist import start_deepspeed

    rank, world = start_deepspeed()
    out = Path(args.out)
    cfg = RunConfig(base_model=args.base, lora_r=4, lora_alpha=8, lora_dropout=0.0)

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    base.train()
    model = wrap_with_lora(base, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(world))

    rows = train_rows(STEPS * MICRO * world)
    columns, _ = tokenize_rows(rows, tokenizer, cutoff_len=128)
    samples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    collate = PadCollator(tokenizer.pad_token_id)
    for step in range(STEPS):
        start = (step * world + rank) * MICRO
        batch = collate(samples[start:start + MICRO])
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

    export_adapter(engine, out / "adapter", base_model=args.base)
    engine.save_checkpoint(str(out / "ckpt"), tag="final", exclude_frozen_parameters=True)

    probe = probe_batch(tokenizer)
    with inference_mode(engine.module):
        logits = engine.module(**probe).logits  # a collective under ZeRO-3: every rank runs it
    if rank == 0:
        torch.save({"logits": logits, **probe}, out / "reference.pt")

    result = evaluate(engine, tokenizer, EMBEDDED_TEST, modes=["generate", "likelihood"], limit=EVAL_ROWS,
                      batch_size=2, max_new_tokens=4, loss=True)
    if rank == 0:
        report = results_json([result], {"world": world})
        (out / "eval.json").write_text(json.dumps(report))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
