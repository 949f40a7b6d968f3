"""The training loop: one RunConfig in; an adapter, checkpoints and metrics out.

It reads top to bottom, like a recipe:

    1. the distributed world and the DeepSpeed config
    2. tokenizer and data, tokenized once per node then read from the cache
    3. where to start: fresh, or the newest complete checkpoint
    4. model, optimizer, schedule, DeepSpeed engine, the LoRA method
    5. the loop: accumulate, step, log, evaluate, checkpoint; stop on SIGTERM
    6. final evaluation, checkpoint, adapter and loss curve

Evaluation. Before training, every eval_steps and at the end: the loss of the
evaluation set and, when the rows carry answer labels, the accuracy on them
(evaluate.evaluate, likelihood or generate mode). With metric_for_best_model
every evaluation also saves a checkpoint, and the best one is kept (best.py).

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

from . import checkpoint, data, export, models
from .best import BEST_ADAPTER, BestCheckpoint, read_record
from .config import ConfigError, RunConfig, deepspeed_config, dump_config
from .data import IGNORE_INDEX, DataError
from .methods import MethodConfig
from .optim import param_groups

# What `deepspeed: null` runs: DeepSpeed's engine without ZeRO partitioning.
DEFAULT_DS_PRESET = "zero0"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss.png"
# Tokens generated per row when accuracy is scored in generate mode (as `reflora-ds eval`).
EVAL_MAX_NEW_TOKENS = 32


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
    labelled_rows = accuracy_rows(cfg, eval_set)
    scored = f"{cfg.eval_accuracy_mode}, {len(labelled_rows)} rows" if labelled_rows is not None else None
    if scored is not None:
        log(f"accuracy: {cfg.eval_accuracy_mode} scoring of {len(labelled_rows)} evaluation rows at each evaluation")
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
            return _already_finished(saved, resume, output_dir, log, scored)

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
    accuracy = {"before": None, "after": None}
    tracker = (BestCheckpoint(cfg.metric_for_best_model, cfg.greater_is_better)
               if cfg.metric_for_best_model else None)
    if resume is not None:
        client = checkpoint.load(engine, resume)
        try:
            refl.load_state_dict(client["reflora"])
        except ValueError as err:
            raise ConfigError(f"resume_from_checkpoint: {err}") from None
        position = Position(**client["trainer"]["position"])
        losses.update(before=client["trainer"]["loss_before"])
        accuracy.update(before=client["trainer"].get("accuracy_before"))
        if tracker is not None:
            tracker = _resume_best(client["trainer"].get("best"), cfg, output_dir, rank, log)
        log(f"resumed from {resume} at step {position.global_step}/{total_steps}")

    metrics = MetricsLog(output_dir, enabled=rank == 0, tensorboard="tensorboard" in cfg.report_to,
                         resume_step=position.global_step if resume else None)

    def evaluate_now() -> dict:
        """eval_loss, and eval_accuracy when it is on, of the weights as they are (all ranks)."""
        scores = {"eval_loss": evaluate(engine, eval_set, cfg.micro_batch_size, collate)}
        if labelled_rows is not None:
            scores["eval_accuracy"] = evaluate_accuracy(engine, tokenizer, labelled_rows, cfg)
        return scores

    if resume is None and eval_set is not None:
        scores = evaluate_now()
        losses["before"], accuracy["before"] = scores["eval_loss"], scores.get("eval_accuracy")
        metrics.write({"step": 0, **scores})
        log(f"eval before training: {_describe_scores(scores)}")

    def save() -> Path:
        trainer_state = {
            "position": asdict(position), "total_steps": total_steps, "world_size": world,
            "global_batch_size": global_batch, "optimizer": cfg.optimizer, "loss_before": losses["before"],
            "loss_after": losses["after"], "loss_kind": losses["kind"], "accuracy_before": accuracy["before"],
            "accuracy_after": accuracy["after"], "best": tracker.state() if tracker is not None else None,
        }
        client_state = {"trainer": trainer_state, "reflora": refl.state_dict()}
        path = checkpoint.save(engine, output_dir, position.global_step, client_state, trainer_state)
        log(f"saved checkpoint {path}")
        if tracker is not None and tracker.step == position.global_step:
            _publish_best(engine, tracker, output_dir, source, cfg, rank, log)
        # Only now, with the best record pointing at its checkpoint, may older ones go.
        if rank == 0:
            checkpoint.prune(output_dir, cfg.save_total_limit, protect=tracker.checkpoint if tracker else None)
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
                path = last_saved if _is_at(last_saved, position.global_step) else save()
                log(f"stopped by SIGTERM at step {position.global_step}/{total_steps}; "
                    f"checkpoint {path}; run the same command again to resume")
                metrics.close()
                return _summary("preempted", position, total_steps, losses, accuracy, _best_of(tracker),
                                output_dir, path, started)

            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            tic = time.perf_counter()
            loss, tokens = _optimizer_step(engine, refl, batches, n_targets, cfg.gradient_accumulation_steps * world)
            window.add(loss, tokens, time.perf_counter() - tic)
            position.global_step += 1
            position.step_in_epoch += 1
            step = position.global_step

            record = {"step": step}
            if step % cfg.logging_steps == 0 or step == total_steps:
                record.update(window.flush(engine.device))
                record.update(epoch=round(position.epoch + position.step_in_epoch / steps_per_epoch, 4),
                              lr=lr, refactor_fallbacks=refl.stats.get("fallbacks", 0))
                if losses["kind"] == "train":
                    losses["before"] = record["loss"] if losses["before"] is None else losses["before"]
                    losses["after"] = record["loss"]
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            periodic = cfg.eval_steps > 0 and step % cfg.eval_steps == 0
            evaluated = eval_set is not None and (periodic or step == total_steps)
            if evaluated:
                scores = evaluate_now()
                record.update(scores)
                if step == total_steps:
                    losses["after"], accuracy["after"] = scores["eval_loss"], scores.get("eval_accuracy")
                if tracker is not None:
                    tracker.consider(step, scores.get(tracker.metric))
            if len(record) > 1:
                metrics.write(_ordered(record))
            bar.update(1)

            # Tracking the best model saves at every evaluation, so that each one can be kept.
            due = (cfg.save_steps and step % cfg.save_steps == 0) or (tracker is not None and evaluated)
            if due and step < total_steps:
                last_saved = save()
    bar.close()

    # 6. the end: save, export, draw (the final step was logged and evaluated) ---------
    final = save()
    adapter = export.export_adapter(engine, output_dir / checkpoint.ADAPTER, base_model=source, run_config=cfg)
    summary = _summary("finished", position, total_steps, losses, accuracy, _best_of(tracker), output_dir, final,
                       started)
    if rank == 0:
        plot_loss(metrics.records(), output_dir / LOSS_PLOT)
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    metrics.close()
    log(f"adapter saved to {adapter}")
    log(_before_after(losses, accuracy, scored))
    if tracker is not None and tracker.step is not None:
        log(f"best checkpoint by {tracker.metric}: step {tracker.step} ({tracker.value:.4f}), "
            f"{output_dir / tracker.checkpoint}; its adapter in {output_dir / BEST_ADAPTER}")
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


def accuracy_rows(cfg: RunConfig, eval_set) -> list[dict] | None:
    """The evaluation rows to score for accuracy, or None when accuracy is off.

    They are the rows behind the tokenized evaluation samples (source_row), in
    the same order, the first eval_accuracy_limit of them. With eval_accuracy
    null, accuracy is on when every one carries an answer label evaluate knows.
    """
    if eval_set is None or cfg.eval_accuracy is False:
        return None
    own_file = cfg.eval_data_path is not None
    source = cfg.eval_data_path if own_file else cfg.data_path
    rows = data.read_rows(source, "auto" if own_file else cfg.data_format,
                          skip_malformed=cfg.skip_malformed_rows).rows
    picked = [(i, rows[i]) for i in eval_set["source_row"]][:cfg.eval_accuracy_limit]
    for index, row in picked:
        problem = _label_problem(row)
        if problem is None:
            continue
        if cfg.eval_accuracy or cfg.metric_for_best_model == "eval_accuracy":
            raise DataError(f"eval_accuracy: {source or data.EMBEDDED_TRAIN}: row {index}: {problem} "
                            "(set eval_accuracy: false to evaluate the loss only)")
        return None
    return [row for _, row in picked]


def _label_problem(row: dict) -> str | None:
    """Why a row cannot be scored for accuracy, or None if it can."""
    from .evaluate import EvalError, label_format

    if not row.get("answer"):
        return "no answer label"
    try:
        label_format(row["answer"])
    except EvalError as err:
        return str(err)
    return None


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


def _resume_best(state: dict | None, cfg: RunConfig, output_dir: Path, rank: int, log) -> BestCheckpoint:
    """The best record as of the checkpoint resumed from, with output_dir's best files brought in line.

    The files can disagree with it after a crash between a save and their
    update, or after resuming from an older checkpoint than the newest: the
    record in the checkpoint wins. (From a stage-0 bf16 checkpoint the
    re-exported adapter holds the bf16 weights: no fp32 master is stored by name.)
    """
    tracker = BestCheckpoint.restore(state, cfg.metric_for_best_model, cfg.greater_is_better)
    if tracker.step is None:
        return tracker
    if not checkpoint.is_complete(output_dir / tracker.checkpoint):
        log(f"the best checkpoint {tracker.checkpoint} is gone; the best is chosen afresh from here on")
        return BestCheckpoint(cfg.metric_for_best_model, cfg.greater_is_better)
    if rank == 0 and read_record(output_dir) != tracker.record():
        export.export_from_checkpoint(output_dir / tracker.checkpoint, output_dir / BEST_ADAPTER, cfg)
        tracker.write(output_dir)
    return tracker


def _already_finished(saved: dict, path: Path, output_dir: Path, log, scored: str | None) -> dict:
    position = Position(**saved["position"])
    losses = {"before": saved["loss_before"], "after": saved["loss_after"], "kind": saved["loss_kind"]}
    accuracy = {"before": saved.get("accuracy_before"), "after": saved.get("accuracy_after")}
    best = BestCheckpoint(**saved["best"]) if saved.get("best") else None
    log(f"{output_dir} already holds a finished run ({path}, step {position.global_step}); "
        "raise max_steps to train further, or choose another output_dir to start over")
    log(_before_after(losses, accuracy, scored))
    return _summary("already_finished", position, saved["total_steps"], losses, accuracy, _best_of(best),
                    output_dir, path, time.time())


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


def evaluate_accuracy(engine, tokenizer, rows: list[dict], cfg: RunConfig) -> float:
    """Accuracy on labelled rows (evaluate.evaluate in eval_accuracy_mode), all ranks together.

    Each rank scores its stride of the rows and all get the total; under
    ZeRO-3 the ranks run their forwards in lockstep. Every module's mode is
    restored afterwards, so training goes on in train mode (and 4-bit layers
    never leave it: see evaluate.inference_mode).
    """
    from .evaluate import evaluate as score_rows

    result = score_rows(engine, tokenizer, rows, modes=[cfg.eval_accuracy_mode], loss=False,
                        batch_size=cfg.micro_batch_size, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                        template=cfg.prompt_template)
    return result.accuracy[cfg.eval_accuracy_mode]


def _describe_scores(scores: dict) -> str:
    return ", ".join(f"{key.removeprefix('eval_')} {value:.4f}" for key, value in scores.items())


def _publish_best(engine, tracker: BestCheckpoint, output_dir: Path, base_source: str, cfg: RunConfig,
                  rank: int, log) -> None:
    """A new best checkpoint: its adapter into best_adapter/, then best_checkpoint.json (call on all ranks)."""
    export.export_adapter(engine, output_dir / BEST_ADAPTER, base_model=base_source, run_config=cfg)
    if rank == 0:
        tracker.write(output_dir)
    log(f"new best {tracker.metric} {tracker.value:.4f} at step {tracker.step}")


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


_KEY_ORDER = ("step", "epoch", "loss", "eval_loss", "eval_accuracy", "lr", "tokens_per_s", "refactor_fallbacks")


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
                    tag = f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, record["step"])
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


def _before_after(losses: dict, accuracy: dict, scored: str | None) -> str:
    """The closing lines: loss (and accuracy, with how it was scored) before and after training."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    text = f"{losses['kind']} loss before → after: {fmt(losses['before'])} → {fmt(losses['after'])}"
    if accuracy["before"] is not None or accuracy["after"] is not None:
        how = f" ({scored})" if scored else ""
        text += f"\neval accuracy{how} before → after: {fmt(accuracy['before'])} → {fmt(accuracy['after'])}"
    return text


def _best_of(tracker: BestCheckpoint | None) -> dict | None:
    return tracker.record() if tracker is not None and tracker.step is not None else None


def _is_at(path: Path | None, step: int) -> bool:
    return path is not None and path.name == f"step-{step}"


def _summary(status: str, position: Position, total_steps: int, losses: dict, accuracy: dict, best: dict | None,
             output_dir: Path, ckpt: Path | None, started: float) -> dict:
    return {
        "status": status,
        "global_step": position.global_step,
        "total_steps": total_steps,
        "loss_kind": losses["kind"],
        "loss_before": losses["before"],
        "loss_after": losses["after"],
        "accuracy_before": accuracy["before"],
        "accuracy_after": accuracy["after"],
        "best": best,
        "output_dir": str(output_dir),
        "checkpoint": str(ckpt) if ckpt else None,
        "adapter": str(output_dir / checkpoint.ADAPTER) if status != "preempted" else None,
        "wall_time_s": round(time.time() - started, 1)
    }
