"""Suite ``zero``: optimizer-state bytes per rank under ZeRO 0-3, and what RefLoRA gathers under ZeRO-3.

The suite launches ``deepspeed --num_gpus W --module benchmarks.zero
--worker`` for W = 1 and 2 (CPU ranks, gloo).  One launch trains every case
(stage × method × persistence threshold) a few steps with RefLoRA attached
through ``ZeroStepper`` and reads on each rank:

* the Adam moments the client optimizer keeps (exp_avg, exp_avg_sq, step),
* the parameters it updates: the fp32 masters, which ZeRO 1-3 hold as flat
  partitions (in stage 0 with an fp32 model they are the LoRA factors),
* ``ZeroStepper.last_comm_bytes``: the bytes of LoRA factors each rank
  gathered for the last refactor.  Under ZeRO-3 factors smaller than
  ``stage3_param_persistence_threshold`` (default 1e5 elements) stay gathered
  after the first step, so they cost nothing; threshold 0 releases every
  factor after use and shows the full price.

fp32 throughout (DeepSpeed's bf16 path adds its own fp32 copies; the ZeRO
partitioning arithmetic is the same).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import machine, payload, print_table, print_targets, pyplot, save_figure, target, write_json

RANK_FULL, RANK_QUICK = 32, 8
MICRO, SEQ = 2, 32
STEPS = 3  # refactor warm-up 1: steps 2 and 3 gather
MB = 2 ** 20


def cases() -> list[dict]:
    out = [{"stage": s, "method": "reflora"} for s in (0, 1, 2, 3)]
    out += [{"stage": 3, "method": "reflora", "persistence_threshold": 0},
            {"stage": 3, "method": "lora", "persistence_threshold": 0}]
    return out


# --- inside each rank ------------------------------------------------------------------------------


def build_model(quick: bool):
    from .common import base_model, with_lora

    base, _ = base_model(quick)
    return with_lora(base, RANK_QUICK if quick else RANK_FULL, private=False)


def ds_config(stage: int, world: int, threshold: int | None) -> dict:
    zero = {"stage": stage, "overlap_comm": False}
    if threshold is not None:
        zero["stage3_param_persistence_threshold"] = threshold
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
            "train_batch_size": MICRO * world, "gradient_clipping": 1.0, "bf16": {"enabled": False},
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10 ** 9}


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def run_case(case: dict, quick: bool, world: int, rank: int) -> dict:
    import deepspeed
    import torch

    from reflora_ds.methods import MethodConfig
    from reflora_ds.optim import param_groups
    from reflora_ds.zero import ZeroStepper, client_optimizer

    torch.manual_seed(0)
    model = build_model(quick)
    method = MethodConfig(name=case["method"], warmup=1)
    lora_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(param_groups(model, 1e-4, method), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=ds_config(case["stage"], world, case.get("persistence_threshold")))
    refl = ZeroStepper(engine, method)
    g = torch.Generator().manual_seed(1 + rank)
    vocab = engine.module.config.vocab_size
    tic = time.perf_counter()
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (MICRO, SEQ), generator=g)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        refl.step()
    seconds = (time.perf_counter() - tic) / STEPS
    client = client_optimizer(engine)
    moments = sum(tensor_bytes(v) for state in client.state.values() for v in state.values()
                  if isinstance(v, torch.Tensor))
    if case["stage"] == 3:
        # Stage 3 hands the client optimizer its flat fp32 partition only for the step itself.
        masters = sum(tensor_bytes(t) for t in engine.optimizer.fp32_partitioned_groups_flat)
    else:
        masters = sum(tensor_bytes(p) for group in client.param_groups for p in group["params"])
    zero_cfg = engine._config.zero_config
    result = {
        "rank": rank, "adam_moment_bytes": moments, "master_param_bytes": masters,
        "optimizer_state_bytes": moments + masters, "lora_param_bytes": lora_numel * 4,
        "last_comm_bytes": refl.last_comm_bytes, "comm_bytes_total": refl.comm_bytes,
        "refactored_steps": refl.stats["refactored_steps"], "step_seconds": round(seconds, 3),
        "engine_persistence_threshold": int(zero_cfg.param_persistence_threshold) if case["stage"] == 3 else None,
        "engine_optimizer": type(engine.optimizer).__name__,
    }
    engine.destroy()
    return result


def worker() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import torch.distributed as dist

    from reflora_ds.dist import start_deepspeed
    from reflora_ds.metrics import quiet_libraries

    quiet_libraries()
    rank, world = start_deepspeed(backend="gloo")
    results = []
    for case in cases():
        try:
            mine = run_case(case, args.quick, world, rank)
        except Exception as exc:  # report and go on: one launch measures every case
            import traceback

            traceback.print_exc()
            mine = {"rank": rank, "error": f"{type(exc).__name__}: {exc}"}
        ranks: list = [None] * world
        dist.all_gather_object(ranks, mine)
        results.append({"case": case, "ranks": ranks})
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world": world, "results": results}))
    dist.barrier()


# --- the suite ---------------------------------------------------------------------------------------


def launch(world: int, quick: bool, tmp: Path) -> dict:
    from reflora_ds.dist import free_port

    out = tmp / f"world{world}.json"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(world), "--master_port", str(free_port()),
           "--module", "benchmarks.zero", "--worker", "--out", str(out)] + (["--quick"] if quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"deepspeed launch (world {world}) failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def case_name(case: dict) -> str:
    name = f"stage {case['stage']} {case['method']}"
    if "persistence_threshold" in case:
        name += f" (threshold {case['persistence_threshold']})"
    return name


def run(out, quick: bool, argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        launches = {w: launch(w, quick, Path(tmp)) for w in (1, 2)}
    rows = []
    for w, res in launches.items():
        for item in res["results"]:
            for r in item["ranks"]:
                rows.append({"world": w, "case": case_name(item["case"]), **item["case"], **r})
    errors = [r for r in rows if "error" in r]

    def get(world, stage, method="reflora", threshold="default"):
        want = lambda r: (r["world"] == world and r["stage"] == stage and r["method"] == method  # noqa: E731
                          and r.get("persistence_threshold", "default") == threshold and "error" not in r)
        return [r for r in rows if want(r)]

    summary = {}
    for stage in (0, 1, 2, 3):
        one, two = get(1, stage), get(2, stage)
        if one and two:
            summary[f"stage{stage}"] = {
                "world1_bytes": one[0]["optimizer_state_bytes"],
                "world2_bytes_per_rank": [r["optimizer_state_bytes"] for r in two],
                "world2_vs_world1": max(r["optimizer_state_bytes"] for r in two) / one[0]["optimizer_state_bytes"],
            }
    z3_default, z3_zero = get(2, 3), get(2, 3, threshold=0)
    lora_bytes = (z3_default or z3_zero or [{"lora_param_bytes": None}])[0]["lora_param_bytes"]
    comm = {
        "lora_param_bytes": lora_bytes,
        "lora_adam_state_bytes": 2 * lora_bytes if lora_bytes else None,
        "default_threshold": {"persistence_threshold": z3_default[0]["engine_persistence_threshold"]
                              if z3_default else None,
                              "per_rank_bytes_per_step": [r["last_comm_bytes"] for r in z3_default]},
        "threshold_0": {"per_rank_bytes_per_step": [r["last_comm_bytes"] for r in z3_zero]},
        "lora_method_threshold_0": [r["last_comm_bytes"] for r in get(2, 3, "lora", 0)],
    }
    if z3_zero and lora_bytes:
        comm["threshold_0"]["vs_lora_param_bytes"] = max(r["last_comm_bytes"] for r in z3_zero) / lora_bytes
    targets = []
    for stage in (1, 2, 3):
        s = summary.get(f"stage{stage}")
        targets.append(target(f"ZeRO-{stage}: optimizer state per rank, world 2 / world 1",
                              s["world2_vs_world1"] if s else None, 0.55,
                              note="partitioned: ideal 0.5 (the check this suite makes, not a published number)"))
    config = {"model": "tiny random LLaMA" if quick else "SmolLM2-135M-Instruct",
              "r": RANK_QUICK if quick else RANK_FULL, "targets": "q,k,v,up,down", "micro_batch": MICRO,
              "seq_len": SEQ, "steps": STEPS, "refactor_warmup": 1, "dtype": "float32", "backend": "gloo (CPU)",
              "optimizer": "torch AdamW (client optimizer)"}
    record = payload("zero", quick, config, {"rows": rows, "summary": summary, "comm": comm, "errors": len(errors)},
                     targets, started, info)
    write_json(out, "zero", record)
    plot(rows, comm, out)
    report(rows, comm, targets)
    if errors:
        raise RuntimeError(f"{len(errors)} zero cases failed: {errors[0]['error']}")
    return record


def show(record: dict) -> None:
    """Print the tables of a finished run from its JSON record."""
    report(record["results"]["rows"], record["results"]["comm"], record["targets"])


def traffic(comm: dict) -> list[tuple[str, int]]:
    """RefLoRA's ZeRO-3 gather per rank and step beside the LoRA state it moves, in bytes."""
    return [("LoRA parameters (fp32)", comm["lora_param_bytes"] or 0),
            ("LoRA Adam state", comm["lora_adam_state_bytes"] or 0),
            ("RefLoRA gather per rank and step, default persistence threshold",
             max(comm["default_threshold"]["per_rank_bytes_per_step"], default=0)),
            ("RefLoRA gather per rank and step, threshold 0",
             max(comm["threshold_0"]["per_rank_bytes_per_step"], default=0)),
            ("LoRA, threshold 0 (nothing gathered by the method)", max(comm["lora_method_threshold_0"], default=0))]


def report(rows: list[dict], comm: dict, targets: list[dict]) -> None:
    table = [[r["world"], r["case"], r["rank"], r["adam_moment_bytes"] / MB, r["master_param_bytes"] / MB,
              r["optimizer_state_bytes"] / MB, r["last_comm_bytes"] / MB, r["engine_optimizer"]]
             for r in rows if "error" not in r]
    print_table("optimizer state per rank (MiB) and LoRA bytes gathered for the last refactor",
                ["world", "case", "rank", "Adam moments", "fp32 masters", "total", "gathered/step", "engine optimizer"],
                table)
    gathered = [[label, value / MB] for label, value in traffic(comm)]
    print_table("ZeRO-3, world size 2: RefLoRA's extra traffic against the LoRA state (MiB)", ["what", "MiB"], gathered)
    print_targets(targets)


def plot(rows: list[dict], comm: dict, out) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    stages = [0, 1, 2, 3]
    for i, world in enumerate((1, 2)):
        vals = []
        for s in stages:
            rs = [r for r in rows if r["world"] == world and r["stage"] == s and r["method"] == "reflora"
                  and "persistence_threshold" not in r and "error" not in r]
            vals.append(max((r["optimizer_state_bytes"] for r in rs), default=0) / MB)
        ax1.bar([s + 0.4 * i for s in stages], vals, 0.4, label=f"world size {world}", color=f"C{i}")
    ax1.set_xticks([s + 0.2 for s in stages], [f"ZeRO-{s}" for s in stages])
    ax1.set_ylabel("MiB per rank (Adam moments + fp32 masters)")
    ax1.set_title("LoRA optimizer state per rank", fontsize=10)
    ax1.legend(fontsize=8)
    labels = ["LoRA factors\n(fp32)", "their Adam\nstate", "RefLoRA gather\nthreshold default",
              "RefLoRA gather\nthreshold 0"]
    vals = [value for _, value in traffic(comm)[:4]]
    bars = ax2.bar(range(4), [v / MB for v in vals], color=["C7", "C7", "C2", "C3"])
    ax2.bar_label(bars, [f"{v / MB:.1f}" for v in vals], fontsize=8)
    ax2.set_xticks(range(4), labels, fontsize=8)
    ax2.set_ylabel("MiB (gather: per rank per step)")
    ax2.set_title("ZeRO-3, world size 2: RefLoRA's extra traffic", fontsize=10)
    save_figure(fig, out, "zero")


if __name__ == "__main__":
    worker()
