"""Suite ``memory``: the same RefLoRA run on an fp32, a bf16 and an NF4 (bitsandbytes 4-bit) base.

Each base runs in its own child process (``python -m benchmarks.memory
--child``), so its peak resident memory is its own: load the base through
``models.load_base_model`` (the project's QLoRA path, model in train mode
before any forward), wrap it with LoRA r = 32 on q/k/v/up/down, AdamW with
RefLoRA attached, and train a few steps on a fixed batch.

Two measures:

* base weight bytes as stored: every non-LoRA parameter and buffer; for a
  4-bit linear its packed weight plus its quantization state (block absmax,
  double-quant state and code tables).  Split into the linear layers that
  NF4 quantizes and everything else (embeddings, norms), each beside its
  16-bit size.  The target: NF4 linears ≤ 0.35× their 16-bit size.
* peak resident set size of the process (``ru_maxrss``), and the RSS after
  imports (the baseline) and after loading.  Python's tracemalloc does not
  see tensor storage (torch allocates outside Python's allocator), so RSS is
  the honest measure on CPU; it includes the runtime, activations and the
  optimizer state, which are the same across the three runs apart from the
  base.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import machine, payload, print_table, print_targets, pyplot, save_figure, target, write_json

CONFIGS = {
    "fp32": {"torch_dtype": "float32"},
    "bf16": {"torch_dtype": "bfloat16"},
    "nf4": {"torch_dtype": "bfloat16", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True},
}
RANK = 32
MB = 2 ** 20


# --- inside the child -------------------------------------------------------------------------------


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def quant_state_bytes(state) -> int:
    """Bytes of the tensors a bitsandbytes QuantState keeps (absmax, code, nested state)."""
    import torch

    total = 0
    for name in ("absmax", "code", "offset"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += quant_state_bytes(nested)
    return total


def base_weight_bytes(model) -> dict:
    """Stored bytes of the base (non-LoRA) weights: quantizable linears vs the rest, and their 16-bit sizes."""
    import torch

    out = {"linear": 0, "linear_16bit": 0, "other": 0, "other_16bit": 0, "quantized_layers": 0,
           "other_dtypes": {}}
    linear_ids = set()
    for name, module in model.named_modules():
        if "lora_" in name or name.endswith("lm_head"):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit":
            if weight is None or id(weight) in linear_ids:
                continue
            linear_ids.add(id(weight))
            state = getattr(weight, "quant_state", None)
            if state is not None:
                out["quantized_layers"] += 1
                out["linear"] += weight.numel() * weight.element_size() + quant_state_bytes(state)
                out["linear_16bit"] += 2 * int(torch.Size(state.shape).numel())
            else:
                out["linear"] += weight.numel() * weight.element_size()
                out["linear_16bit"] += 2 * weight.numel()
    seen = set(linear_ids)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "lora_" in name or id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        out["other"] += t.numel() * t.element_size()
        out["other_16bit"] += 2 * t.numel()
        key = str(t.dtype).removeprefix("torch.")
        out["other_dtypes"][key] = out["other_dtypes"].get(key, 0) + t.numel()
    out["total"] = out["linear"] + out["other"]
    out["total_16bit"] = out["linear_16bit"] + out["other_16bit"]
    return out


def child(spec: dict) -> dict:
    """One base: load, wrap, train a few steps; report bytes and RSS."""
    baseline = rss_bytes()
    import torch

    from reflora_ds.config import RunConfig
    from reflora_ds.models import load_base_model
    from .common import attach_method, with_lora

    baseline = max(baseline, rss_bytes())
    cfg = RunConfig(base_model=spec["base_model"], **CONFIGS[spec["config"]])
    tic = time.perf_counter()
    base, _ = load_base_model(cfg, device="cpu")
    load_seconds = time.perf_counter() - tic
    after_load = rss_bytes()
    weights = base_weight_bytes(base)
    model = with_lora(base, RANK, private=False)
    opt, _ = attach_method(model, "reflora", 1e-4, warmup=1)
    ids = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq_len"]),
                        generator=torch.Generator().manual_seed(0))
    losses, grad_norms = [], []
    tic = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad_norms.append(float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters()
                                               if p.grad is not None))))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"config": spec["config"], "weights": weights, "lora_param_bytes": lora_bytes,
            "rss_baseline": baseline, "rss_after_load": after_load, "rss_after_steps": rss_bytes(),
            "peak_rss": peak_rss_bytes(), "losses": losses, "lora_grad_norms": grad_norms,
            "load_seconds": round(load_seconds, 1), "step_seconds": round((time.perf_counter() - tic) / spec["steps"], 2)}


# --- the suite ---------------------------------------------------------------------------------------


def run_child(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory child {spec['config']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run(out, quick: bool, argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        base_model = None
        if quick:
            from tests.tiny_models import tiny_llama

            # Wide enough for 4-bit blocks of 64, small enough to load in a second.
            tiny_llama(Path(tmp) / "tiny", seed=0, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
            base_model = str(Path(tmp) / "tiny")
        shape = dict(batch=2, seq_len=32, steps=2) if quick else dict(batch=4, seq_len=128, steps=3)
        runs = {name: run_child({"config": name, "base_model": base_model, **shape}) for name in CONFIGS}

    nf4, bf16 = runs["nf4"]["weights"], runs["bf16"]["weights"]
    results = {"runs": runs, "ratios": {
        "nf4_linear_vs_16bit": nf4["linear"] / nf4["linear_16bit"],
        "nf4_total_vs_bf16_total": nf4["total"] / bf16["total"],
        "nf4_total_vs_16bit_if_rest_kept_16bit": (nf4["linear"] + nf4["other_16bit"]) / nf4["total_16bit"],
        "nf4_peak_rss_vs_bf16": runs["nf4"]["peak_rss"] / runs["bf16"]["peak_rss"],
        "nf4_peak_rss_vs_fp32": runs["nf4"]["peak_rss"] / runs["fp32"]["peak_rss"],
    }}
    targets = [target("NF4 linear weights / their 16-bit size", results["ratios"]["nf4_linear_vs_16bit"], 0.35,
                      note=f"{nf4['quantized_layers']} quantized layers")]
    config = {"model": "tiny random LLaMA (hidden 256)" if quick else "SmolLM2-135M-Instruct", "r": RANK,
              "method": "reflora", "optimizer": "AdamW", **shape,
              "bases": {k: v for k, v in CONFIGS.items()}, "process": "one child process per base"}
    record = payload("memory", quick, config, results, targets, started, info)
    write_json(out, "memory", record)
    plot(runs, out)
    report(runs, results, targets)
    return record


def show(record: dict) -> None:
    """Print the tables of a finished run from its JSON record."""
    report(record["results"]["runs"], record["results"], record["targets"])


def report(runs: dict, results: dict, targets: list[dict]) -> None:
    rows = []
    for name, r in runs.items():
        w = r["weights"]
        rows.append([name, w["linear"] / MB, w["linear_16bit"] / MB, w["other"] / MB, w["total"] / MB,
                     r["rss_baseline"] / MB, r["rss_after_load"] / MB, r["peak_rss"] / MB,
                     (r["peak_rss"] - r["rss_baseline"]) / MB, f"{r['losses'][-1]:.3f}"])
    print_table("base weights as stored and resident memory (MiB)",
                ["base", "linears", "linears @16-bit", "other", "total", "RSS baseline", "RSS loaded", "peak RSS",
                 "peak − baseline", "last loss"], rows)
    print_table("ratios", ["ratio", "value"], [[k, round(v, 3)] for k, v in results["ratios"].items()])
    print_targets(targets)


def plot(runs: dict, out) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(runs)
    lin = [runs[n]["weights"]["linear"] / MB for n in names]
    oth = [runs[n]["weights"]["other"] / MB for n in names]
    ax1.bar(names, lin, label="linear layers (quantized in nf4)", color="C0")
    ax1.bar(names, oth, bottom=lin, label="embeddings, norms", color="C1")
    ax1.axhline(runs["bf16"]["weights"]["linear_16bit"] / MB, color="C3", ls="--", lw=0.8,
                label="linears at 16 bit")
    ax1.set_ylabel("MiB as stored")
    ax1.set_title("base weights", fontsize=10)
    ax1.legend(fontsize=8)
    base = [runs[n]["rss_baseline"] / MB for n in names]
    peak = [(runs[n]["peak_rss"] - runs[n]["rss_baseline"]) / MB for n in names]
    ax2.bar(names, base, label="after imports", color="C7")
    ax2.bar(names, peak, bottom=base, label="peak during training, above that", color="C2")
    ax2.set_ylabel("MiB resident")
    ax2.set_title("peak RSS of the training process", fontsize=10)
    ax2.legend(fontsize=8)
    save_figure(fig, out, "memory")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, help="JSON spec of one base")
    args = parser.parse_args()
    print(json.dumps(child(json.loads(args.child))), flush=True)


if __name__ == "__main__":
    main()
