"""Train a tiny LoRA LLaMA under DeepSpeed for many (stage, method, accumulation) cases.

Launched by tests/test_zero.py as ``deepspeed --num_gpus 2 equivalence_worker.py
--out FILE``; one launch runs every case, and rank 0 writes per case the loss
curve, the final ΔW = scale·B·A of every LoRA layer and the gathered bytes.
The same ``build_model`` / ``batches`` feed the single-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

DEFAULT_STEPS = 6
MICRO = 2
SEQ = 12
LR = 5e-3
EPS = 1e-6  # Adam's ε: keeps near-zero gradients from turning fp32 round-off into full steps
WARMUP = 2


def method_config(method: str):
    """The method as both the DeepSpeed runs and the reference use it.

    A well-conditioned problem keeps fp32 round-off from growing into the
    comparison: LoRA+ with a moderate ratio, ScaledGD with a moderate damping.
    """
    from reflora_ds import MethodConfig

    return MethodConfig(name=method, warmup=WARMUP, loraplus_lr_ratio=4.0, scaledgd_delta=1e-2)


def build_model(seed: int = 0, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    from tests.tiny_models import tiny_llama

    base, _ = tiny_llama(seed=seed, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    model = model.to(dtype)
    model.train()
    return model


def batches(steps: int, global_batch: int, seed: int = 1) -> torch.Tensor:
    """Token ids [steps, global_batch, SEQ]; step t uses row block t."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (steps, global_batch, SEQ), generator=g)


def micro_slices(global_batch: int, world: int, accum: int, rank: int):
    """Rows of one step's global batch that micro-batch j of this rank takes."""
    for j in range(accum):
        start = (j * world + rank) * MICRO
        yield slice(start, start + MICRO)


def delta_weights(model) -> dict[str, list]:
    from reflora_ds.lora_pairs import find_lora_pairs

    return {p.name: (p.scaling * (p.B.detach().double() @ p.A.detach().double())).tolist()
            for p in find_lora_pairs(model)}


def ds_config(stage: int, accum: int, world: int, *, bf16=False, offload=False, clip=0.0) -> dict:
    zero = {"stage": stage, "overlap_comm": False}
    if stage == 3:
        # Release every parameter after use, so the refactor must really gather A and B.
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": accum,
        "train_batch_size": MICRO * accum * world,
        "gradient_clipping": clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def run_case(case: dict, world: int, rank: int) -> dict:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    from reflora_ds import param_groups
    from reflora_ds.zero import ZeroStepper

    stage, method, accum = case["stage"], case["method"], case["accum"]
    steps = case.get("steps", DEFAULT_STEPS)
    bf16 = case.get("bf16", False)
    model = build_model()
    cfg = method_config(method)
    opt = torch.optim.AdamW(param_groups(model, LR, cfg, weight_decay=0.01), lr=LR, eps=EPS)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=ds_config(stage, accum, world, bf16=bf16,
                                                       offload=case.get("offload", False), clip=case.get("clip", 0.0)))
    refl = ZeroStepper(engine, cfg)
    global_batch = MICRO * accum * world
    data = batches(steps, global_batch)
    losses = []
    for t in range(steps):
        total = torch.zeros((), dtype=torch.float64)
        for rows in micro_slices(global_batch, world, accum, rank):
            ids = data[t, rows]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            refl.step()
            total += loss.detach().double()
        dist.all_reduce(total)
        losses.append(total.item() / (world * accum))
    params = [q for pair in refl.pairs for q in (pair.A, pair.B)]
    with GatheredParameters(params if stage == 3 else [], modifier_rank=None):
        delta = delta_weights(engine.module)
    result = {"losses": losses, "delta": delta, "comm_bytes": refl.comm_bytes,
              "last_comm_bytes": refl.last_comm_bytes, "stats": refl.stats,
              "lora_bytes": sum(q.ds_numel if hasattr(q, "ds_numel") else q.numel() for q in params) * 4,
              "engine_optimizer": type(engine.optimizer).__name__}
    if bf16 and method == "reflora_s":
        result["model_matches_master"] = _model_copy_matches_master(engine, refl)
    engine.destroy()
    return result


def _model_copy_matches_master(engine, refl) -> bool:
    """After a RefLoRA-S step, the bf16 working copy is the rounded fp32 master."""
    from reflora_ds.dist import gathered
    from reflora_ds.zero import full_fp32_master

    ok = True
    for pair in refl.pairs:
        for q in (pair.A, pair.B):
            master = full_fp32_master(engine, q)
            with gathered([q]):
                ok &= bool(torch.equal(q.detach(), master.to(q.dtype)))
    return ok


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of cases")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    import torch.distributed as dist

    from reflora_ds.dist import start_deepspeed

    rank, world = start_deepspeed(backend="gloo")
    results = []
    for case in json.loads(open(args.cases).read()):
        try:
            results.append({"case": case, **run_case(case, world, rank)})
        except Exception as exc:  # report, keep going: one launch checks many cases
            import traceback

            traceback.print_exc()
            results.append({"case": case, "error": f"{type(exc).__name__}: {exc}"})
    if rank == 0:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"world": world, "results": results}, f)
        os.replace(tmp, args.out)
    dist.barrier()


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    main()
