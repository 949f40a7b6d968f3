"""Suite ``peer``: training throughput of ``reflora-ds train`` against the Hugging Face Trainer with PEFT LoRA.

Three contenders on the same base, LoRA configuration, tokenized data,
micro-batch and sequence length, all in this one process:

* ``reflora_ds lora`` and ``reflora_ds reflora``: ``reflora_ds.train.train``
  (the loop behind ``reflora-ds train``: DeepSpeed engine, ZeRO-0, one rank);
* ``hf_trainer lora``: ``transformers.Trainer`` on the same PEFT model and
  the same ``PadCollator``, AdamW (torch), same clipping, no evaluation and
  no saving.

Every sample is truncated to exactly ``cutoff_len`` tokens (the texts are
longer), so a step is ``batch × cutoff_len`` tokens in every contender and
padding plays no part.  Throughput is measured per optimizer step, around
forward, backward and the optimizer step (the trainer's own ``tokens_per_s``
log with ``logging_steps: 1``; a callback between ``on_step_begin`` and
``on_step_end`` for the HF Trainer), first steps dropped.  Rounds run the
three in a rotating order; the per-round ratio to the HF Trainer is the
measurement.

A second part, ``mix``, trains on real variable-length data, the commonsense
training mix (ARC-Easy, ARC-Challenge, BoolQ, OpenBookQA, shuffled), at
cutoff 256: ``reflora-ds train`` with ``sample_packing`` (micro-batches of
packed sequences holding about as many samples as the HF Trainer's batch)
against the HF Trainer with PEFT and its default dynamic padding. Both see
the same samples once; the measure is target tokens (response tokens, the
ones the loss is on) per second of training steps, and the evaluation loss
on the same held-out rows afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from .common import (
    bbc_dir,
    machine,
    payload,
    print_table,
    print_targets,
    pyplot,
    quartiles,
    save_figure,
    target,
    write_json,
)

CONTENDERS = ("reflora_ds lora", "reflora_ds reflora", "hf_trainer lora")
RANK = 32
LR = 1e-4
DROP_FIRST = 2  # steps before the timing starts (allocation, first-step caches)


def training_rows(n: int, min_chars: int) -> list[dict]:
    """Alpaca rows whose outputs are long real texts (BBC articles, else ARC-Easy questions joined)."""
    if bbc_dir() is not None:
        from .common import bbc_articles

        texts = [text for _, text in bbc_articles()]
    else:
        from reflora_ds.data import EMBEDDED_TRAIN, read_rows

        rows = [r["instruction"] for r in read_rows(EMBEDDED_TRAIN).rows]
        texts = [" ".join(rows[i:i + 4]) for i in range(0, len(rows), 4)]
    texts = [t for t in texts if len(t) >= min_chars]
    return [{"instruction": "Continue this news article.", "input": "", "output": t} for t in texts[:n]]


def run_config(tmp: Path, name: str, base_model: str | None, data: Path, shape: dict, seed: int, dtype: str):
    from reflora_ds.config import RunConfig

    method = name.split()[1]
    return RunConfig(
        base_model=base_model, data_path=str(data), torch_dtype=dtype, cutoff_len=shape["seq_len"], lora_r=RANK, lora_alpha=2 * RANK,
        lora_dropout=0.05, method=method, refactor_warmup=1, learning_rate=LR, lr_scheduler="constant",
        warmup_steps=0, micro_batch_size=shape["batch"], gradient_accumulation_steps=1, max_steps=shape["steps"],
        logging_steps=1, eval_steps=0, save_steps=0, report_to=["jsonl"], resume_from_checkpoint=None,
        output_dir=str(tmp / f"{name.replace(' ', '_')}_{seed}"), seed=seed,
    )


def reflora_ds_run(cfg) -> list[float]:
    """Tokens/s of each optimizer step of one ``train`` run."""
    from reflora_ds.metrics import METRICS_FILE
    from reflora_ds.train import train

    train(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / METRICS_FILE).read_text().splitlines()]
    return [r["tokens_per_s"] for r in records if "tokens_per_s" in r]


@contextlib.contextmanager
def single_process_env():
    """Hide the launcher variables ``train`` set: with them the HF Trainer would wrap the model in DDP."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def hf_trainer_run(cfg, tokens_per_step: int, return_model: bool = False):
    """Tokens/s of each optimizer step of the HF Trainer on the same model, data and batch
    (with ``return_model``: each step's seconds, and the trained model)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from reflora_ds import models
    from reflora_ds.data import PadCollator, preprocess

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self._tic = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._tic = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._tic)

    torch.manual_seed(cfg.seed)
    model, tokenizer = models.load_base_model(cfg)
    model = models.wrap_with_lora(model, cfg)
    data = preprocess(cfg.data_path, tokenizer, cutoff_len=cfg.cutoff_len).dataset
    clock = StepClock()
    with single_process_env():
        args = TrainingArguments(
            output_dir=cfg.output_dir, per_device_train_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=1, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
            lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
            max_grad_norm=cfg.max_grad_norm, logging_steps=10 ** 6, save_strategy="no", eval_strategy="no",
            report_to=[], use_cpu=not torch.cuda.is_available(), bf16=cfg.torch_dtype == "bfloat16",
            dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(tokenizer.pad_token_id),
                          callbacks=[clock])
        trainer.train()
    if return_model:
        return clock.seconds, model
    return [tokens_per_step / s for s in clock.seconds]


def check_fixed_length(cfg) -> int:
    """Every training sample must be exactly cutoff_len tokens: then a step's tokens are known."""
    from reflora_ds import models
    from reflora_ds.data import preprocess

    tokenizer = models.load_tokenizer(models.resolve_base(cfg))
    lengths = {len(ids) for ids in preprocess(cfg.data_path, tokenizer, cutoff_len=cfg.cutoff_len).dataset["input_ids"]}
    if lengths != {cfg.cutoff_len}:
        raise RuntimeError(f"peer data: samples of lengths {sorted(lengths)[:5]}..., not all {cfg.cutoff_len}")
    return cfg.micro_batch_size * cfg.cutoff_len


def run(out, quick: bool, argv: list[str] | None = None) -> dict:
    # The tiny tokenizer spends ~70 tokens on the prompt template: quick sequences are longer.
    shape = dict(batch=2, seq_len=96, steps=5) if quick else dict(batch=4, seq_len=128, steps=10)
    with tempfile.TemporaryDirectory() as tmp:
        base_model = None
        if quick:
            from tests.tiny_models import tiny_llama

            tiny_llama(Path(tmp) / "tiny", seed=0)
            base_model = str(Path(tmp) / "tiny")
        mix = mix_part(quick, base_model, "float32")
        return suite(out, "peer", quick, base_model, shape, rounds=1 if quick else 3, dtype="float32",
                     model_name="tiny random LLaMA" if quick else "SmolLM2-135M-Instruct (fp32)", mix=mix)


# --- the commonsense mix: packed reflora-ds train against the padded HF Trainer ----------------------------

MIX_CUTOFF = 256
MIX_BATCH = 8  # samples per optimizer step (the HF Trainer's batch; packed micro-batches hold about as many)


def mix_rows(quick: bool, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows of the commonsense training mix (the embedded ARC-Easy rows in quick mode)."""
    import numpy as np

    from reflora_ds.data import EMBEDDED_TRAIN, read_rows

    from .convergence import COMMONSENSE_DIR, COMMONSENSE_SETS

    if quick or not COMMONSENSE_DIR.is_dir():
        rows = read_rows(EMBEDDED_TRAIN).rows
    else:
        rows = [r for s in COMMONSENSE_SETS for r in read_rows(COMMONSENSE_DIR / s / "train.json").rows]
    order = np.random.default_rng(0).permutation(len(rows))
    return [rows[i] for i in order[n_eval:n_eval + n_train]], [rows[i] for i in order[:n_eval]]


def mix_part(quick: bool, base_model: str | None, dtype: str) -> dict:
    """Both contenders once over the same training rows; target tokens/s and the evaluation loss after."""
    import torch

    from reflora_ds import evaluate, models
    from reflora_ds.data import preprocess
    from reflora_ds.packing import pack_dataset

    n_train, n_eval = (96, 8) if quick else (320, 64)
    drop = 1 if quick else DROP_FIRST
    cutoff = 2 * MIX_CUTOFF if quick else MIX_CUTOFF  # the tiny tokenizer spends about twice the tokens
    train_rows, eval_rows = mix_rows(quick, n_train, n_eval)
    out: dict = {"train_rows": n_train, "eval_rows": n_eval, "cutoff_len": cutoff, "batch_samples": MIX_BATCH}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "train.json").write_text(json.dumps(train_rows))
        (tmp / "eval.json").write_text(json.dumps(eval_rows))
        cfg = run_config(tmp, "reflora_ds lora", base_model, tmp / "train.json",
                         dict(seq_len=cutoff, batch=MIX_BATCH, steps=n_train // MIX_BATCH), 0, dtype)
        cfg = cfg.model_copy(update=dict(eval_data_path=str(tmp / "eval.json"), lr_scheduler="linear",
                                         warmup_steps=2, learning_rate=5e-4))
        tokenizer = models.load_tokenizer(models.resolve_base(cfg))
        samples = preprocess(cfg.data_path, tokenizer, cutoff_len=cutoff).dataset
        targets = [sum(label != -100 for label in labels[1:]) for labels in samples["labels"]]
        packed = pack_dataset(samples, cutoff)
        per_sequence = len(samples) / len(packed)
        micro = max(1, round(MIX_BATCH / per_sequence))
        out["packing"] = {"samples": len(samples), "sequences": len(packed), "samples_per_sequence": per_sequence,
                          "micro_batch_sequences": micro}

        # HF Trainer: batches of MIX_BATCH samples padded to their longest, every sample once.
        hf_cfg = cfg.model_copy(update=dict(output_dir=str(tmp / "hf"), max_steps=len(samples) // MIX_BATCH))
        clock, model = hf_trainer_run(hf_cfg, 1, return_model=True)
        seconds = sum(clock[drop:])
        seen = hf_cfg.max_steps * MIX_BATCH
        eval_set = preprocess(cfg.eval_data_path, tokenizer, cutoff_len=cutoff).dataset
        with torch.no_grad():
            hf_eval = evaluate.dataset_loss(model, eval_set, batch_size=MIX_BATCH, pad_token_id=tokenizer.pad_token_id)
        # Which samples the timed steps held is the sampler's business: their share of the targets is the mean's.
        timed_share = (len(clock) - drop) / len(clock)
        out["hf_trainer"] = {"steps": hf_cfg.max_steps, "samples_seen": seen, "seconds": seconds,
                             "target_tokens_per_s": sum(targets[:seen]) * timed_share / seconds,
                             "eval_loss": hf_eval}
        del model

        # reflora-ds train with packing, one epoch.
        ours = cfg.model_copy(update=dict(output_dir=str(tmp / "ours"), sample_packing=True, micro_batch_size=micro,
                                          max_steps=len(packed) // micro))
        from reflora_ds.metrics import METRICS_FILE
        from reflora_ds.train import train

        train(ours)
        records = [json.loads(line) for line in (Path(ours.output_dir) / METRICS_FILE).read_text().splitlines()]
        steps = [r for r in records if "target_tokens_per_s" in r][drop:]
        seconds = sum(r["step_seconds"] for r in steps)
        out["reflora_ds_packed"] = {
            "steps": ours.max_steps, "samples_seen": round(ours.max_steps * micro * per_sequence),
            "seconds": seconds, "target_tokens_per_s": sum(r["target_tokens_per_s"] * r["step_seconds"]
                                                          for r in steps) / seconds,
            "eval_loss": records[-1]["eval_loss"]}
    out["ratio"] = out["reflora_ds_packed"]["target_tokens_per_s"] / out["hf_trainer"]["target_tokens_per_s"]
    out["eval_loss_difference"] = out["reflora_ds_packed"]["eval_loss"] - out["hf_trainer"]["eval_loss"]
    print(f"mix: packed reflora-ds {out['reflora_ds_packed']['target_tokens_per_s']:.1f} target tokens/s, "
          f"HF Trainer {out['hf_trainer']['target_tokens_per_s']:.1f} (ratio {out['ratio']:.2f}); eval loss "
          f"{out['reflora_ds_packed']['eval_loss']:.4f} vs {out['hf_trainer']['eval_loss']:.4f}", flush=True)
    return out


def suite(out, name: str, quick: bool, base_model: str | None, shape: dict, rounds: int, dtype: str,
          model_name: str, mix: dict | None = None) -> dict:
    """Interleaved rounds of the three contenders; writes ``name``.json / .png and prints the table."""
    from reflora_ds.metrics import quiet_libraries

    started = time.perf_counter()
    info = machine()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "peer.json"
        # Texts long enough to fill seq_len tokens after the prompt (about 4 characters a token).
        data.write_text(json.dumps(training_rows(shape["batch"] * shape["steps"] * 2, 6 * shape["seq_len"])))
        tokens = check_fixed_length(run_config(tmp, CONTENDERS[0], base_model, data, shape, 0, dtype))
        per_round: dict[str, list[float]] = {c: [] for c in CONTENDERS}
        all_steps: dict[str, list[float]] = {c: [] for c in CONTENDERS}
        for k in range(rounds):
            order = CONTENDERS[k % 3:] + CONTENDERS[:k % 3]
            for contender in order:
                cfg = run_config(tmp, contender, base_model, data, shape, k, dtype)
                steps = hf_trainer_run(cfg, tokens) if contender.startswith("hf") else reflora_ds_run(cfg)
                timed = steps[DROP_FIRST:]
                all_steps[contender] += timed
                per_round[contender].append(statistics.median(timed))
                print(f"round {k} {contender}: {statistics.median(timed):.1f} tokens/s", flush=True)
    hf = per_round["hf_trainer lora"]
    ratios = {c: [a / b for a, b in zip(per_round[c], hf)] for c in CONTENDERS[:2]}
    results = {
        "tokens_per_step": tokens, "rounds": rounds,
        "tokens_per_s": {c: quartiles(v) for c, v in all_steps.items()},
        "round_medians": per_round,
        "ratio_to_hf_trainer": {c: quartiles(v) for c, v in ratios.items()},
        "raw_step_tokens_per_s": all_steps,
    }
    targets = [target(f"{c} / HF Trainer tokens/s (median of rounds)", statistics.median(ratios[c]), 1.0,
                      at_most=False) for c in CONTENDERS[:2]]
    if mix is not None:
        results["mix"] = mix
        targets.append(target("commonsense mix: packed reflora-ds / padded HF Trainer target tokens/s",
                              mix["ratio"], 1.3, at_most=False))
    config = {"model": model_name, "dtype": dtype, "r": RANK,
              "lora_alpha": 2 * RANK, "lora_dropout": 0.05, "targets": "q,k,v,up,down", "lr": LR,
              "max_grad_norm": 1.0, "micro_batch": shape["batch"], "seq_len": shape["seq_len"],
              "steps_per_run": shape["steps"], "timed_steps_per_run": shape["steps"] - DROP_FIRST,
              "reflora_ds": "train.train, DeepSpeed ZeRO-0, one rank", "hf": "transformers.Trainer + PEFT LoRA",
              "data": "BBC News articles as Alpaca outputs, truncated to seq_len" if bbc_dir() else "ARC-Easy text"}
    record = payload(name, quick, config, results, targets, started, info)
    write_json(out, name, record)
    plot(results, out, name)
    report(results, targets)
    return record


def show(record: dict) -> None:
    """Print the tables of a finished run from its JSON record."""
    report(record["results"], record["targets"])


def report(results: dict, targets: list[dict]) -> None:
    rows = []
    for name in CONTENDERS:
        t = results["tokens_per_s"][name]
        r = results["ratio_to_hf_trainer"].get(name)
        rows.append([name, t["median"], f"{t['q25']:.1f}-{t['q75']:.1f}", t["n"],
                     f"{r['median']:.3f} ({r['q25']:.3f}-{r['q75']:.3f})" if r else "1"])
    print_table(f"training throughput, {results['tokens_per_step']} tokens per step, {results['rounds']} rounds",
                ["contender", "tokens/s (median step)", "quartiles", "steps", "ratio to HF Trainer (rounds)"], rows)
    mix = results.get("mix")
    if mix:
        print_table(f"commonsense mix, cutoff {mix['cutoff_len']}, {mix['train_rows']} rows once, "
                    f"{mix['batch_samples']} samples a step",
                    ["contender", "target tokens/s", "steps", "samples seen", "eval loss after"],
                    [[name, mix[key]["target_tokens_per_s"], mix[key]["steps"], mix[key]["samples_seen"],
                      mix[key]["eval_loss"]] for name, key in (("reflora-ds train, packed", "reflora_ds_packed"),
                                                              ("HF Trainer, padded", "hf_trainer"))])
    print_targets(targets)


def plot(results: dict, out, name: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    data = [results["raw_step_tokens_per_s"][n] for n in CONTENDERS]
    ax.boxplot(data, tick_labels=[n.replace(" ", "\n") for n in CONTENDERS])
    ax.set_ylabel("tokens/s per optimizer step")
    ax.set_title(f"{results['tokens_per_step']} tokens per step, {results['rounds']} interleaved rounds", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    save_figure(fig, out, name)
