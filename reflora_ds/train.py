"""The training loop: one RunConfig in; an adapter, checkpoints and metrics out.

It reads top to bottom, like a recipe:

    1. the distributed world and the DeepSpeed config
    2. tokenizer and data, tokenized once per node then read from the cache
    3. where to start: fresh, or the newest complete checkpoint
    4. model, optimizer, schedule, DeepSpeed engine, the LoRA method
    5. the loop: accumulate, step, log, evaluate, checkpoint; stop on SIGTERM
    6. final evaluation, checkpoint, adapter and loss curve

Everything runs on the DeepSpeed engine; ``deepspeed: null`` is the zero0
preset on however many ranks were launched (one, without a launcher).

Loss normalisation. Every micro-batch's loss is the *sum* of its token losses
divided by the number of target tokens in the whole global batch (all
accumulation steps, all ranks). The gradient is then that of the global batch's
token-mean loss however the batch is split, so one rank with accumulation 4
and four ranks without accumulation train the same model.

Data order. Epoch e visits the training set in the order ``shuffle(seed + e)``;
rank r takes rows r, r + W, ... of it, and optimizer step s consumes the
contiguous block s of ``micro_batch_size × accumulation × W`` rows. Rows that
do not fill a last global batch are left out of that epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, data, models
from .config import ConfigError, RunConfig, deepspeed_config, dump_config
from .data import IGNORE_INDEX, DataError
from .methods import MethodConfig
from .optim import param_groups

# What `deepspeed: null` runs: DeepSpeed's engine without ZeRO partitioning.
DEFAULT_DS_PRESET = "zero0"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss.png"


@dataclass
class Position:
    """Where the loop is; with the seed it fixes the next batch exactly."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in this epoch
    global_step: int = 0  # optimizer steps done in all


def train(cfg: RunConfig) -> dict:
    """Fine-tune as configured; returns a summary (status, step, loss before and after, paths)."""
    started = time.time()
    cfg = cfg.resolved()

    # 1. the world --------------------------------------------------------------
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from .zero import ZeroRefLoRA, ensure_distributed_env

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    quiet_libraries()
    ensure_distributed_env()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    log = _printer(rank)
    ds_config = build_ds_config(cfg, world)
    _seed_everything(cfg.seed)

    # 2. tokenizer and data; failing here leaves nothing behind --------------------
    source = _local_zero_first(lambda: models.resolve_base(cfg))
    tokenizer = models.load_tokenizer(source, trust_remote_code=cfg.trust_remote_code)
    train_set, eval_set, stats = _local_zero_first(lambda: tokenize_datasets(cfg, tokenizer))
    log(_describe_data(stats, train_set, eval_set))
    steps_per_epoch, total_steps = _schedule_length(cfg, len(train_set), world)
    global_batch = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world

    # 3. where to start ------------------------------------------------------------
    output_dir = Path(cfg.output_dir)
    resume = checkpoint.resolve_resume(cfg.resume_from_checkpoint, output_dir)
    if resume is None and checkpoint.list_complete(output_dir):
        raise ConfigError(
            f"output_dir {output_dir} holds checkpoints of an earlier run but resume_from_checkpoint is null: "
            "resume it (resume_from_checkpoint: auto), or choose another output_dir"
        )
    saved = checkpoint.read_trainer_state(resume) if resume else None
    if saved is not None:
        _check_resumable(saved, world, global_batch, cfg)
        if saved["position"]["global_step"] >= total_steps:
            return _already_finished(saved, resume, output_dir, log)

    # 4. model, optimizer, engine, method -------------------------------------------
    model, _ = models.load_base_model(cfg)  # in train mode: see models.load_base_model
    model = models.wrap_with_lora(model, cfg)
    method = MethodConfig(name=cfg.optimizer, warmup=cfg.refactor_warmup, interval=cfg.refactor_interval,
                          loraplus_lr_ratio=cfg.loraplus_lr_ratio, scaledgd_delta=cfg.scaledgd_delta)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.learning_rate, method, cfg.weight_decay),
                                  lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total_steps))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config, model_parameters=None)
    refl = ZeroRefLoRA(engine, method)
    collate = data.PadCollator(tokenizer.pad_token_id)

    # Only now, with config, data and model known good, is anything written.
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_stale(output_dir)
        dump_config(cfg, output_dir / "config.yaml")
    dist.barrier()

    position = Position()
    losses = {"before": None, "after": None, "kind": "eval" if eval_set is not None else "train"}
    if resume is not None:
        client = checkpoint.load(engine, resume)
        try:
            refl.load_state_dict(client["reflora"])
        except ValueError as err:
            raise ConfigError(f"resume_from_checkpoint: {err}") from None
        position = Position(**client["trainer"]["position"])
        losses.update(before=client["trainer"]["loss_before"])
        log(f"resumed from {resume} at step {position.global_step}/{total_steps}")

    metrics = MetricsLog(output_dir, enabled=rank == 0, tensorboard="tensorboard" in cfg.report_to,
                         resume_step=position.global_step if resume else None)
    evaluate_now = lambda: evaluate(engine, eval_set, cfg.micro_batch_size, collate)  # noqa: E731
    if resume is None and eval_set is not None:
        losses["before"] = evaluate_now()
        metrics.write({"step": 0, "eval_loss": losses["before"]})
        log(f"eval loss before training: {losses['before']:.4f}")

    def save(step_losses: dict) -> Path:
        trainer_state = {
            "position": asdict(position), "total_steps": total_steps, "world_size": world,
            "global_batch_size": global_batch, "optimizer": cfg.optimizer, "loss_before": step_losses["before"],
            "loss_after": step_losses["after"], "loss_kind": step_losses["kind"],
        }
        client_state = {"trainer": trainer_state, "reflora": refl.state_dict()}
        path = checkpoint.save(engine, output_dir, position.global_step, client_state, trainer_state,
                               keep=cfg.save_total_limit)
        log(f"saved checkpoint {path}")
        return path

    # 5. the loop -----------------------------------------------------------------------
    bar = _progress_bar(rank, total_steps, position.global_step)
    window = _Window()
    last_saved = resume
    shard, shard_epoch = None, None
    with checkpoint.PreemptionGuard() as guard:
        while position.global_step < total_steps:
            if position.step_in_epoch >= steps_per_epoch:
                position.epoch, position.step_in_epoch = position.epoch + 1, 0
            if shard_epoch != position.epoch:
                shard, shard_epoch = epoch_shard(train_set, cfg.seed, position.epoch, rank, world), position.epoch
            batches = _step_batches(shard, position.step_in_epoch, cfg, collate)

            # One small all-reduce per step: the global target-token count, and
            # whether any rank was asked to stop (so all stop at the same step).
            local_targets = sum(_target_count(b["labels"]) for b in batches)
            n_targets, stop = _all_reduce_sum([local_targets, float(guard.requested)], engine.device)
            if stop:
                bar.close()
                path = last_saved if _is_at(last_saved, position.global_step) else save(losses)
                log(f"stopped by SIGTERM at step {position.global_step}/{total_steps}; "
                    f"checkpoint {path}; run the same command again to resume")
                metrics.close()
                return _summary("preempted", position, total_steps, losses, output_dir, path, started)

            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            tic = time.perf_counter()
            loss, tokens = _optimizer_step(engine, refl, batches, n_targets, cfg.gradient_accumulation_steps * world)
            window.add(loss, tokens, time.perf_counter() - tic)
            position.global_step += 1
            position.step_in_epoch += 1
            step = position.global_step

            if step % cfg.logging_steps == 0 or step == total_steps:
                record = window.flush(engine.device)
                record.update(step=step, epoch=round(position.epoch + position.step_in_epoch / steps_per_epoch, 4),
                              lr=lr, refactor_fallbacks=refl.stats.get("fallbacks", 0))
                if losses["kind"] == "train":
                    losses["before"] = record["loss"] if losses["before"] is None else losses["before"]
                    losses["after"] = record["loss"]
                if eval_set is not None and (step == total_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)):
                    record["eval_loss"] = evaluate_now()
                    if step == total_steps:
                        losses["after"] = record["eval_loss"]
                metrics.write(_ordered(record))
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            elif eval_set is not None and cfg.eval_steps and step % cfg.eval_steps == 0:
                metrics.write({"step": step, "eval_loss": evaluate_now()})
            bar.update(1)

            if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
                last_saved = save(losses)
    bar.close()

    # 6. the end: save, export, draw (the final step was logged and evaluated) ---------
    final = save(losses)
    adapter = checkpoint.save_adapter(engine, output_dir)
    summary = _summary("finished", position, total_steps, losses, output_dir, final, started)
    if rank == 0:
        plot_loss(metrics.records(), output_dir / LOSS_PLOT)
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    metrics.close()
    log(f"adapter saved to {adapter}")
    log(_before_after(losses))
    return summary


# --- 1. the world ----------------------------------------------------------------------


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config of a run (zero0 when none is named); refuses fp16."""
    ds = deepspeed_config(cfg if cfg.deepspeed else cfg.model_copy(update={"deepspeed": DEFAULT_DS_PRESET}),
                          world_size)
    if ds.get("fp16", {}).get("enabled") not in (None, False):
        raise ConfigError("deepspeed: fp16 is not supported (loss scaling may skip steps); use bf16 or fp32")
    if bool(ds.get("bf16", {}).get("enabled")) != (cfg.torch_dtype == "bfloat16"):
        raise ConfigError(f"deepspeed: bf16.enabled disagrees with torch_dtype {cfg.torch_dtype}; "
                          "set it to \"auto\" in the DeepSpeed config")
    return ds


def quiet_libraries() -> None:
    """One progress bar (ours): no per-library bars for cache writes and weight loading."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _printer(rank: int):
    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)

    return log


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _local_zero_first(fn):
    """Run fn on each node's first rank, then on the others (which then read its cache).

    If the first rank fails, the others still run fn and meet the same error
    rather than waiting forever at a barrier.
    """
    from deepspeed.accelerator import get_accelerator

    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    result, error = None, None
    if first:
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the others were told
            error = err
    _all_reduce_sum([float(error is not None)], get_accelerator().current_device_name())
    if error is not None:
        raise error
    return result if first else fn()


# --- 2. data -----------------------------------------------------------------------------


def tokenize_datasets(cfg: RunConfig, tokenizer):
    """(train, eval or None, stats): the training data tokenized (cached), and its evaluation set.

    The evaluation set is eval_data_path if given, else val_set_size rows held
    out of the training data, else none.
    """
    options = dict(template=cfg.prompt_template, cutoff_len=cfg.cutoff_len, skip_malformed=cfg.skip_malformed_rows)
    train_data = data.preprocess(cfg.data_path, tokenizer, data_format=cfg.data_format, **options)
    train_set, eval_set = train_data.dataset, None
    stats = {"train": train_data.stats, "cache": str(train_data.path)}
    if cfg.eval_data_path is not None:
        eval_data = data.preprocess(cfg.eval_data_path, tokenizer, **options)
        eval_set, stats["eval"] = eval_data.dataset, eval_data.stats
    elif cfg.val_set_size:
        train_set, eval_set = data.split_validation(train_set, cfg.val_set_size, cfg.seed)
    return train_set, eval_set, stats


def _describe_data(stats: dict, train_set, eval_set) -> str:
    s = stats["train"]
    text = (f"data: {len(train_set)} training samples from {s['source']} "
            f"({s['truncated']} truncated, {s['dropped_no_target']} without target dropped, "
            f"{s['skipped_malformed']} malformed skipped)")
    return text + (f"; {len(eval_set)} evaluation samples" if eval_set is not None else "; no evaluation set")


def _schedule_length(cfg: RunConfig, n_train: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = (n_train // world) // per_step
    if steps_per_epoch == 0:
        raise DataError(
            f"{n_train} training samples do not fill one global batch of {per_step * world} "
            f"(micro_batch_size {cfg.micro_batch_size} × gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} × {world} ranks)"
        )
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)
    return steps_per_epoch, total


def epoch_shard(train_set, seed: int, epoch: int, rank: int, world: int):
    """This rank's rows of epoch ``epoch``, in order."""
    return data.shard_for_rank(data.shuffle(train_set, seed + epoch), rank, world)


def _rows(dataset, start: int, count: int) -> list[dict]:
    columns = dataset[start:start + count]
    return [{"input_ids": ids, "labels": labels} for ids, labels in zip(columns["input_ids"], columns["labels"])]


def _step_batches(shard, step_in_epoch: int, cfg: RunConfig, collate) -> list[dict]:
    """This rank's micro-batches for optimizer step ``step_in_epoch`` of the epoch."""
    micro, accum = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    first = step_in_epoch * accum
    return [collate(_rows(shard, (first + j) * micro, micro)) for j in range(accum)]


def _target_count(labels: torch.Tensor) -> int:
    """Tokens the loss is computed on: labels after the causal shift, minus the masked ones."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# --- 3. resuming --------------------------------------------------------------------------


def _check_resumable(saved: dict, world: int, global_batch: int, cfg: RunConfig) -> None:
    if saved["world_size"] != world:
        raise ConfigError(
            f"resume_from_checkpoint: the checkpoint was written by {saved['world_size']} ranks, this run has "
            f"{world}; resume with {saved['world_size']} ranks, or convert it with DeepSpeed's universal "
            "checkpoint (python -m deepspeed.checkpoint.ds_to_universal)"
        )
    if saved["global_batch_size"] != global_batch:
        raise ConfigError(
            f"resume_from_checkpoint: the checkpoint used a global batch of {saved['global_batch_size']}, this "
            f"run {global_batch}; keep micro_batch_size × gradient_accumulation_steps × ranks the same to resume"
        )
    if saved["optimizer"] != cfg.optimizer:
        raise ConfigError(f"resume_from_checkpoint: the checkpoint was trained with optimizer "
                          f"{saved['optimizer']!r}, this run uses {cfg.optimizer!r}")


def _already_finished(saved: dict, path: Path, output_dir: Path, log) -> dict:
    position = Position(**saved["position"])
    losses = {"before": saved["loss_before"], "after": saved["loss_after"], "kind": saved["loss_kind"]}
    log(f"{output_dir} already holds a finished run ({path}, step {position.global_step}); "
        "raise max_steps to train further, or choose another output_dir to start over")
    log(_before_after(losses))
    return _summary("already_finished", position, saved["total_steps"], losses, output_dir, path, time.time())


# --- 4. schedule ----------------------------------------------------------------------------


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Learning-rate multiplier per optimizer step: linear warmup, then constant, linear or cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# --- 5. one optimizer step--------------------------------------------------------------


def _optimizer_step(engine, refl, batches: list[dict], n_targets: float, ddp_scale: int) -> tuple[float, int]:
    """Forward and backward each micro-batch; the method steps the engine at the boundary.

    Returns this rank's share of the step's loss (the global token mean is the
    sum over ranks) and the number of tokens it processed.
    """
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch, num_items_in_batch=n_targets).loss  # token-loss sum / n_targets
        # DeepSpeed averages gradients over accumulation steps and ranks: undo both.
        engine.backward(loss * ddp_scale)
        refl.step()  # engine.step(), with the method's edits at the boundary
        loss_sum += loss.item()
        tokens += int(batch["attention_mask"].sum())
    return loss_sum, tokens


# --- 5. evaluation and metrics---------------------------------------------------------


@contextlib.contextmanager
def eval_mode(engine):
    """Dropout off for evaluation, but bitsandbytes layers kept in train mode.

    bitsandbytes repacks 4-bit weights in place at an eval-mode no-grad forward
    on AVX512-BF16 CPUs, which breaks training afterwards (DESIGN §2); those
    layers have no dropout, so their mode changes nothing else.
    """
    engine.eval()
    for module in engine.module.modules():
        if type(module).__module__.startswith("bitsandbytes"):
            module.train()
    try:
        yield
    finally:
        engine.train()


@torch.no_grad()
def evaluate(engine, eval_set, micro_batch_size: int, collate) -> float:
    """Token-mean loss over the whole evaluation set, all ranks together.

    Ranks take strided rows; every rank runs the same number of forwards
    (ZeRO-3 gathers parameters collectively), padding with a repeated batch
    whose loss is ignored.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = data.shard_for_rank(eval_set, rank, world, even=False)
    own = math.ceil(len(shard) / micro_batch_size)
    (most,) = _all_reduce_max([own], engine.device)
    total, count = 0.0, 0
    with eval_mode(engine):
        for i in range(int(most)):
            real = i < own
            rows = _rows(shard, i * micro_batch_size, micro_batch_size) if real else _rows(eval_set, 0, 1)
            batch = {k: v.to(engine.device) for k, v in collate(rows).items()}
            loss_sum = engine(**batch, num_items_in_batch=1).loss  # the sum over target tokens
            if real:
                total += loss_sum.item()
                count += _target_count(batch["labels"])
    total, count = _all_reduce_sum([total, count], engine.device)
    return total / max(count, 1)


def _all_reduce_max(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


class _Window:
    """Training loss and throughput since the last logged step (this rank's share)."""

    def __init__(self):
        self.loss, self.steps, self.tokens, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    def flush(self, device) -> dict:
        loss, tokens = _all_reduce_sum([self.loss, self.tokens], device)
        (seconds,) = _all_reduce_max([self.seconds], device)
        record = {"loss": loss / max(self.steps, 1), "tokens_per_s": tokens / max(seconds, 1e-9)}
        self.__init__()
        return record


_KEY_ORDER = ("step", "epoch", "loss", "eval_loss", "lr", "tokens_per_s", "refactor_fallbacks")


def _ordered(record: dict) -> dict:
    return {k: record[k] for k in _KEY_ORDER if k in record} | record


class MetricsLog:
    """metrics.jsonl (always: the loss curve and the summary are drawn from it) and TensorBoard.

    Written by rank 0. A resumed run first drops the records past its
    checkpoint, so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path = output_dir / METRICS_FILE
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        kept = [r for r in self.records() if r["step"] <= resume_step] if resume_step is not None else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar("eval/loss" if key == "eval_loss" else f"train/{key}", value,
                                           record["step"])
            self.writer.flush()

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _progress_bar(rank: int, total: int, initial: int):
    import sys

    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, unit="step", disable=rank != 0, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30, desc="train")


# --- 6. the end ---------------------------------------------------------------------------


def plot_loss(records: list[dict], path: Path) -> Path:
    """Training loss per logged step, and evaluation loss where it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_pts = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss", lw=1.2)
    if eval_pts:
        ax.plot(*zip(*eval_pts), "o--", label="eval loss", ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (token mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _before_after(losses: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return f"{losses['kind']} loss before → after: {fmt(losses['before'])} → {fmt(losses['after'])}"


def _is_at(path: Path | None, step: int) -> bool:
    return path is not None and path.name == f"step-{step}"


def _summary(status: str, position: Position, total_steps: int, losses: dict, output_dir: Path,
             ckpt: Path | None, started: float) -> dict:
    return {
        "status": status,
        "global_step": position.global_step,
        "total_steps": total_steps,
        "loss_kind": losses["kind"],
        "loss_before": losses["before"],
        "loss_after": losses["after"],
        "output_dir": str(output_dir),
        "checkpoint": str(ckpt) if ckpt else None,
        "adapter": str(output_dir / checkpoint.ADAPTER) if status != "preempted" else None,
        "wall_time_s": round(time.time() - started, 1)
    }
