"""Suite ``overhead``: what RefLoRA costs per training step, and what batching the refactor buys.

Part 1, whole training steps.  LoRA, RefLoRA and RefLoRA-S models (r = 32 on
q/k/v/up/down of SmolLM2-135M) train side by side in one process, one step
each in a rotating order per round, on the same batch.  The per-round ratio
RefLoRA/LoRA is the measurement; its median and quartiles are reported.  On a
shared machine the step time itself wanders by more than the overhead, so the
RefLoRA work is also timed on its own (plan refresh, the gradient hooks'
r×r products, RefLoRA-S's rescale) and divided by the LoRA step time.

Part 2, the refactor computation alone at LLaMA-7B shapes (32 layers × q, k,
v 4096×4096, up 4096→11008, down 11008→4096; r = 32; fp32 factors):
``refactor`` (one batched solve) against ``refactor_layerwise`` (a loop), each
split into its two phases, the Gram products and the r×r solve.  A third
contender, ``grams_stacked``, is the earlier Gram routine of the math module,
which stacked (copied) every factor of a shape group for one ``bmm``; the
module now forms each Gram straight from its factor.
"""

from __future__ import annotations

import time

import torch

from reflora_ds.methods import apply_multiplier
from reflora_ds.refactor import factor_grams, refactor, refactor_from_grams, refactor_layerwise
from .common import (
    attach_method,
    base_model,
    headline_clock,
    interleave,
    machine,
    payload,
    print_table,
    print_targets,
    pyplot,
    quartiles,
    ratio_stats,
    save_figure,
    synchronizer,
    target,
    with_lora,
    write_json,
)

METHODS = ("lora", "reflora", "reflora_s")
RANK = 32
LR = 1e-4
REFACTOR_WARMUP = 1  # B starts at zero; steady state is what is timed


# --- part 1: training steps ---------------------------------------------------------------------


def step_times(base, *, batch: int, seq: int, rounds: int, repeats: int) -> dict:
    """Interleaved whole training steps of LoRA, RefLoRA and RefLoRA-S on copies of ``base``."""
    device = next(base.parameters()).device
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    runs = {}
    for name in METHODS:
        torch.manual_seed(0)
        model = with_lora(base, RANK)
        opt, stepper = attach_method(model, name, LR, warmup=REFACTOR_WARMUP)
        runs[name] = (model, opt, stepper)

    def step(name):
        model, opt, _ = runs[name]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    tasks = {name: (lambda n=name: step(n)) for name in METHODS}
    for _ in range(REFACTOR_WARMUP + 1):  # past the refactor warm-up, Adam state allocated
        for name in METHODS:
            step(name)
    sync = synchronizer(device)
    times = interleave(tasks, rounds, warmup=0, sync=sync)
    clock = headline_clock(device)
    lora_step = quartiles(times["lora"][clock])["median"]
    components = {name: method_components(*runs[name][1:], repeats=repeats, device=device) for name in METHODS[1:]}
    pairs = len(runs["reflora"][2].pairs)
    return {
        "batch": batch, "seq_len": seq, "tokens_per_step": batch * seq, "rounds": rounds, "lora_pairs": pairs,
        "clock": clock, "device": str(device), "dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
        "step_seconds": {c: {name: quartiles(t[c]) for name, t in times.items()} for c in ("wall", "cpu")},
        "raw_step_seconds": times,
        "ratio": {c: {name: ratio_stats(times[name][c], times["lora"][c]) for name in METHODS[1:]}
                  for c in ("wall", "cpu")},
        "components_seconds": components,
        "component_ratio": {name: 1.0 + sum(c.values()) / lora_step for name, c in components.items()},
    }


def method_components(opt, stepper, repeats: int, device) -> dict:
    """Seconds of each piece of work a method adds to a step, timed on its own (median)."""
    clock = time.process_time if headline_clock(device) == "cpu" else time.perf_counter
    sync = synchronizer(device) or (lambda: None)

    def median_time(fn) -> float:
        samples = []
        for _ in range(repeats):
            sync()
            tic = clock()
            fn()
            sync()
            samples.append(clock() - tic)
        return sorted(samples)[len(samples) // 2]

    plan = stepper.plan
    grads = [(torch.randn_like(p.A), torch.randn_like(p.B)) for p in stepper.pairs]

    def hooks():
        for i, (ga, gb) in enumerate(grads):
            apply_multiplier(ga, plan.grad_A[i], "A")
            apply_multiplier(gb, plan.grad_B[i], "B")

    out = {"refresh_plan": median_time(stepper.refresh), "gradient_hooks": median_time(hooks)}
    if plan.rescale is not None:
        # The rescale by the current p; repeated, it only keeps re-balancing.
        out["weight_edits"] = median_time(stepper.apply_weight_edits)
    return out


# --- part 2: the refactor at LLaMA-7B shapes ---------------------------------------------------


def llama7b_factors(quick: bool, r: int = RANK, seed: int = 0, device="cpu"):
    """A and B factors of 32 layers × (q, k, v, up, down), fp32, with trained-like magnitudes.

    ``quick``: 2 layers at 1/16 of the width.
    """
    hidden, inter, layers = (256, 688, 2) if quick else (4096, 11008, 32)
    shapes = [(hidden, hidden)] * 3 + [(hidden, inter), (inter, hidden)]  # (in m, out n)
    g = torch.Generator().manual_seed(seed)
    As, Bs = [], []
    for _ in range(layers):
        for m, n in shapes:
            As.append((torch.randn(r, m, generator=g) / m ** 0.5).to(device))
            Bs.append((0.01 * torch.randn(n, r, generator=g)).to(device))
    return As, Bs, {"layers": layers, "hidden": hidden, "intermediate": inter, "modules": 5 * layers, "r": r}


def grams_stacked(As, Bs) -> tuple[torch.Tensor, torch.Tensor]:
    """The earlier Gram routine, for comparison: each shape group's factors stacked (a copy), one bmm."""
    r = As[0].shape[0]
    gram_a = torch.empty(len(As), r, r, dtype=torch.float64, device=As[0].device)
    gram_b = torch.empty_like(gram_a)
    groups: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(zip(As, Bs)):
        groups.setdefault((tuple(a.shape), tuple(b.shape)), []).append(i)
    for idx in groups.values():
        a = torch.stack([As[i] for i in idx]).float()
        b = torch.stack([Bs[i] for i in idx]).float()
        gram_a[idx] = torch.bmm(a, a.transpose(1, 2)).double()
        gram_b[idx] = torch.bmm(b.transpose(1, 2), b).double()
    return gram_a, gram_b


def refactor_times(As, Bs, shape: dict, rounds: int) -> dict:
    """Batched against per-layer refactor of the same factors, and each one's two phases."""
    device = As[0].device
    grams = factor_grams(As, Bs)
    solo = [(grams[0][i:i + 1], grams[1][i:i + 1]) for i in range(len(As))]
    tasks = {
        # the math module as it is
        "batched": lambda: refactor(As, Bs),
        "per_layer": lambda: refactor_layerwise(As, Bs),
        # the two phases of each
        "grams": lambda: factor_grams(As, Bs),
        "grams_stacked": lambda: grams_stacked(As, Bs),
        "solve_batched": lambda: refactor_from_grams(*grams),
        "solve_per_layer": lambda: [refactor_from_grams(ga, gb) for ga, gb in solo],
        # the earlier batched path: stacked Grams, then the batched solve
        "batched_stacked": lambda: refactor_from_grams(*grams_stacked(As, Bs)),
        "eigh_fp64_batched": lambda: torch.linalg.eigh(grams[0]),
        "eigh_fp32_batched": lambda: torch.linalg.eigh(grams[0].float()),
    }
    clock = headline_clock(device)
    times = {name: t[clock] for name, t in interleave(tasks, rounds, warmup=1, sync=synchronizer(device)).items()}
    # Both Gram routines must give the same refactor.
    ref, stacked = refactor(As, Bs), refactor_from_grams(*grams_stacked(As, Bs))
    rel = float(((ref.S - stacked.S).norm(dim=(1, 2)) / ref.S.norm(dim=(1, 2))).max())
    factor_bytes = sum(t.numel() * t.element_size() for t in As + Bs)
    return {
        "shape": shape, "rounds": rounds, "factor_bytes": factor_bytes, "clock": clock, "device": str(device),
        "seconds": {name: quartiles(t) for name, t in times.items()},
        "speedup": {
            "batched_vs_per_layer": ratio_stats(times["per_layer"], times["batched"]),
            "solve_batched_vs_per_layer": ratio_stats(times["solve_per_layer"], times["solve_batched"]),
            "grams_vs_stacked": ratio_stats(times["grams_stacked"], times["grams"]),
            "batched_vs_batched_stacked": ratio_stats(times["batched_stacked"], times["batched"]),
        },
        "max_rel_diff_S_vs_stacked": rel,
        "fallbacks": ref.fallbacks,
    }


# --- the suite -----------------------------------------------------------------------------------


def run(out, quick: bool, argv: list[str] | None = None) -> dict:
    base, _ = base_model(quick)
    batch, seq = (4, 32) if quick else (4, 128)
    return suite(out, "overhead", quick, base, batch=batch, seq=seq, rounds=3 if quick else 20,
                 factors=llama7b_factors(quick), refactor_rounds=3 if quick else 7,
                 model_name="tiny random LLaMA" if quick else "SmolLM2-135M-Instruct (fp32)")


def suite(out, name: str, quick: bool, base, *, batch: int, seq: int, rounds: int, factors, refactor_rounds: int,
          model_name: str) -> dict:
    """Measure both parts, write ``name``.json / .png, print the tables."""
    started = time.perf_counter()
    info = machine()
    steps = step_times(base, batch=batch, seq=seq, rounds=rounds, repeats=5 if quick else 20)
    ref = refactor_times(*factors, rounds=refactor_rounds)

    ratio, comp = steps["ratio"][steps["clock"]], steps["component_ratio"]
    speed = ref["speedup"]
    targets = [
        target(f"RefLoRA / LoRA step time (interleaved, median, {steps['clock']} clock)",
               ratio["reflora"]["median"], 1.03,
               note=f"quartiles {ratio['reflora']['q25']:.3f}-{ratio['reflora']['q75']:.3f}; published 1.13"),
        target("RefLoRA / LoRA step time (components timed alone)", comp["reflora"], 1.03),
        target(f"RefLoRA-S / LoRA step time (interleaved, median, {steps['clock']} clock)",
               ratio["reflora_s"]["median"], 1.01,
               note=f"quartiles {ratio['reflora_s']['q25']:.3f}-{ratio['reflora_s']['q75']:.3f}; published 1.01"),
        target("RefLoRA-S / LoRA step time (components timed alone)", comp["reflora_s"], 1.01),
        target("refactor batched speed-up over per-layer loop", speed["batched_vs_per_layer"]["median"], 5.0,
               at_most=False, note=f"Grams without the stacking copy: "
                                   f"{speed['grams_vs_stacked']['median']:.2f}x faster than stacked"),
    ]
    config = {"model": model_name, "r": RANK,
              "lora_alpha": 2 * RANK, "targets": "q,k,v,up,down", "optimizer": "AdamW", "lr": LR,
              "max_grad_norm": 1.0, "refactor_warmup": REFACTOR_WARMUP, "data": "random token ids (timing only)"}
    result = payload(name, quick, config, {"step": steps, "refactor": ref}, targets, started, info)
    write_json(out, name, result)
    plot(steps, ref, out, name)
    report(steps, ref, targets)
    return result


def show(record: dict) -> None:
    """Print the tables of a finished run from its JSON record."""
    report(record["results"]["step"], record["results"]["refactor"], record["targets"])


def report(steps: dict, ref: dict, targets: list[dict]) -> None:
    rows = []
    for name in METHODS:
        row = [name]
        for clock in ("wall", "cpu"):
            s = steps["step_seconds"][clock][name]
            r = steps["ratio"][clock].get(name)
            row += [s["median"], f"{r['median']:.3f} ({r['q25']:.3f}-{r['q75']:.3f})" if r else "1"]
        row.append(steps["component_ratio"].get(name, 1.0))
        rows.append(row)
    print_table(f"training step, {steps['batch']}×{steps['seq_len']} tokens, r={RANK}, {steps['rounds']} rounds "
                f"(median, quartiles)", ["method", "wall s", "wall ratio to LoRA", "cpu s", "cpu ratio to LoRA",
                                         "ratio from components"], rows)
    sec = ref["seconds"]
    print_table(f"refactor at {ref['shape']['modules']} modules, r={ref['shape']['r']} (median {ref['clock']} seconds)",
                ["contender", "seconds", "quartiles"],
                [[k, v["median"], f"{v['q25']:.4f}-{v['q75']:.4f}"] for k, v in sec.items()])
    print_targets(targets)


def plot(steps: dict, ref: dict, out, name: str) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(METHODS[1:])
    raw = steps["raw_step_seconds"]
    data, labels = [], []
    for n, label in zip(names, ("RefLoRA", "RefLoRA-S")):
        for clock in ("wall", "cpu"):
            data.append([a / b for a, b in zip(raw[n][clock], raw["lora"][clock])])
            labels.append(f"{label}\n{clock}")
    ax1.boxplot(data, tick_labels=labels)
    for i, n in enumerate(names):
        ax1.plot([2 * i + 1.5], [steps["component_ratio"][n]], "D", color="C2",
                 label="components timed alone" if i == 0 else None)
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.axhline(1.03, color="C3", ls="--", lw=0.8, label="target RefLoRA 1.03")
    ax1.axhline(1.01, color="C1", ls=":", lw=0.8, label="target RefLoRA-S 1.01")
    ax1.set_ylabel("step time ratio to LoRA (per round)")
    ax1.set_title(f"whole step, {steps['batch']}×{steps['seq_len']} tokens, {steps['rounds']} rounds", fontsize=10)
    ax1.legend(fontsize=8)

    sec = {k: v["median"] for k, v in ref["seconds"].items()}
    bars = [
        ("per-layer\nloop", sec["grams"], sec["solve_per_layer"]),
        ("batched\n(refactor)", sec["grams"], sec["solve_batched"]),
        ("batched,\nstacked Grams", sec["grams_stacked"], sec["solve_batched"]),
    ]
    x = range(len(bars))
    ax2.bar(x, [b[1] for b in bars], label="Gram products", color="C0")
    ax2.bar(x, [b[2] for b in bars], bottom=[b[1] for b in bars], label="r×r solve", color="C1")
    ax2.set_xticks(list(x), [b[0] for b in bars], fontsize=8)
    ax2.set_ylabel(f"{ref['clock']} seconds (median of phases)")
    shape = ref["shape"]
    ax2.set_title(f"refactor, {shape['modules']} modules (hidden {shape['hidden']}), r={shape['r']}", fontsize=10)
    ax2.legend(fontsize=8)
    save_figure(fig, out, name)
