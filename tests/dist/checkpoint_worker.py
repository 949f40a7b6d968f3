"""Train, checkpoint and resume a tiny LoRA LLaMA under DeepSpeed (tests/test_zero_checkpoint.py).

    --save-at K      save a checkpoint (frozen base excluded) after optimizer step K
    --hang-after-save   then wait to be killed (SIGKILL from the test)
    --resume TAG     load TAG from --ckpt first and continue from its step
    --universal      load a universal checkpoint (another world size)

The global batch is the same at any world size: accumulation = GLOBAL_MICROS / world.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import equivalence_worker as W  # noqa: E402

GLOBAL_MICROS = 2  # micro-batches per optimizer step, over all ranks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--save-at", type=int, default=-1)
    p.add_argument("--hang-after-save", action="store_true")
    p.add_argument("--resume", default=None)
    p.add_argument("--universal", action="store_true")
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()

    import deepspeed
    import torch.distributed as dist

    from reflora_ds import param_groups
    from reflora_ds.dist import start_deepspeed
    from reflora_ds.zero import ZeroStepper

    rank, world = start_deepspeed(backend="gloo")
    accum = GLOBAL_MICROS // world
    model = W.build_model()
    cfg = W.method_config(args.method)
    opt = torch.optim.AdamW(param_groups(model, W.LR, cfg, weight_decay=0.01), lr=W.LR, eps=W.EPS)
    ds = W.ds_config(args.stage, accum, world)
    if args.universal:
        ds["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    refl = ZeroStepper(engine, cfg)

    start = 0
    if args.resume:
        path, client = engine.load_checkpoint(args.ckpt, tag=args.resume, load_module_strict=False)
        assert path is not None, f"no checkpoint {args.resume} in {args.ckpt}"
        refl.load_state_dict(client["reflora"])
        start = client["step"]

    data = W.batches(args.steps, W.MICRO * GLOBAL_MICROS)
    losses = {}
    for t in range(start, args.steps):
        total = torch.zeros((), dtype=torch.float64)
        for rows in W.micro_slices(W.MICRO * GLOBAL_MICROS, world, accum, rank):
            ids = data[t, rows]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            refl.step()
            total += loss.detach().double()
        dist.all_reduce(total)
        losses[t] = total.item() / GLOBAL_MICROS
        if t + 1 == args.save_at:
            engine.save_checkpoint(args.ckpt, tag=f"step{t + 1}", exclude_frozen_parameters=True,
                                   client_state={"reflora": refl.state_dict(), "step": t + 1})
            dist.barrier()
            if args.hang_after_save:
                if rank == 0:
                    open(os.path.join(args.ckpt, "SAVED"), "w").close()
                while True:  # wait for SIGKILL
                    time.sleep(1)

    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    params = [q for pair in refl.pairs for q in (pair.A, pair.B)]
    with GatheredParameters(params if args.stage == 3 else [], modifier_rank=None):
        delta = W.delta_weights(engine.module)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "delta": delta, "steps_done": refl.steps_done}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
