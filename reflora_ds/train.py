"""The training recipe: one RunConfig in; an adapter, checkpoints and metrics out.

    setup   the world and its DeepSpeed config; tokenizer and data (tokenized
            once per node, then read from the cache); where to start (fresh,
            or the newest complete checkpoint); model, optimizer, schedule,
            engine and the LoRA method. Nothing is written before all of it
            is known to work.
    loop    accumulate, step, log, evaluate, checkpoint; stop on SIGTERM.
    finish  the last checkpoint, and for a finished run the adapter, the
            loss curve and summary.json.

Everything runs on the DeepSpeed engine; ``deepspeed: null`` is the zero0
preset on however many ranks were launched (one, without a launcher).

Loss normalisation. Every micro-batch's loss is the *sum* of its token losses
divided by the number of target tokens in the whole global batch (all
accumulation steps, all ranks). The gradient is then that of the global batch's
token-mean loss however the batch is split, so one rank with accumulation 4
and four ranks without accumulation train the same model.

Data order: data.epoch_shard and data.step_batches; packing: packing.py. Early stops: stops.py.
Evaluation: before training, every eval_steps and at the end (evaluate.py);
with metric_for_best_model each one saves a checkpoint, the best kept (best.py).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic, best, builders, checkpoint, data, dist, ds_config, evaluate, export, metrics, stops
from .checkpoint import TrainerState
from .config import ConfigError, RunConfig, check_files, dump_config

@dataclass
class Run:
    """What the loop works with, made once by ``setup`` (source: the base model's folder)."""

    cfg: RunConfig
    log: object
    source: str
    tokenizer: object
    train_set: object
    eval_set: object
    accuracy_rows: list | None
    steps_per_epoch: int
    output_dir: Path
    engine: object
    stepper: object
    scheduler: object
    state: TrainerState
    tracker: best.BestCheckpoint | None
    metrics: metrics.MetricsLog
    last_saved: Path | None
    started: float
    skipped_steps: int = 0  # steps with a micro-batch left out for a non-finite loss
    fallbacks_seen: int = 0  # refactor fallbacks already reported

    @property
    def scored(self) -> str | None:
        """How accuracy is scored, for the log ("likelihood, 16 rows"), or None without accuracy."""
        rows = self.accuracy_rows
        return None if rows is None else f"{self.cfg.eval_accuracy_mode}, {len(rows)} rows"


def train(cfg: RunConfig) -> dict:
    """Fine-tune as configured; returns a summary (status, step, loss before and after, paths).

    One run per output_dir (OutputLock). SIGTERM is held off from the first
    step to the last file: the loop saves and stops at a step boundary, and the
    ending, once begun, completes.
    """
    started = time.time()
    cfg, ds, log = prepare(cfg)
    data_of_run = builders.load_data(cfg, log)
    with checkpoint.OutputLock(cfg.output_dir), stops.PreemptionGuard() as guard:
        run = setup(cfg, ds, log, data_of_run, started)
        if isinstance(run, dict):
            return run  # the run had finished already
        return finish(run, loop(run, guard))


# --- setup ----------------------------------------------------------------------------------------


def prepare(cfg: RunConfig):
    """The checked, resolved configuration, the world, the DeepSpeed config and the log (nothing written)."""
    check_files(cfg)
    ds_config.check(cfg)
    cfg = cfg.resolved(ds_config.zero_stage(cfg))
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    metrics.quiet_libraries()
    rank, world = dist.start_deepspeed()
    ds = ds_config.resolve(cfg, world)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # also seeds every CUDA device
    return cfg, ds, metrics.printer(rank)


def setup(cfg: RunConfig, ds: dict, log, loaded: dict, started: float) -> Run | dict:
    """Where to start, the engine, and the first evaluation; the summary instead if the run is finished.

    Nothing in output_dir changes until the run is known to resume (or start) cleanly.
    """
    state, output_dir, rank = loaded["state"], Path(cfg.output_dir), dist.rank()
    resume = checkpoint.resolve_resume(cfg.resume_from_checkpoint, output_dir, warn=log)
    if resume is None and checkpoint.list_complete(output_dir):
        raise ConfigError(
            f"output_dir {output_dir} holds checkpoints of an earlier run but resume_from_checkpoint is null: "
            "resume it (resume_from_checkpoint: auto), or choose another output_dir"
        )
    if resume is not None:
        saved = checkpoint.read_trainer_state(resume)
        checkpoint.check_compatible(saved, state)
        if saved.global_step >= state.total_steps:
            return _already_finished(cfg, saved, resume, loaded, log, started)

    engine, stepper, scheduler = builders.build_engine(cfg, ds, state.total_steps)
    tracker = best.BestCheckpoint(cfg.metric_for_best_model, cfg.greater_is_better) if cfg.metric_for_best_model \
        else None
    if resume is not None:
        restored, method_state = checkpoint.load(engine, resume)
        try:
            stepper.load_state_dict(method_state)
        except ValueError as err:
            raise ConfigError(f"resume_from_checkpoint: {err}") from None
        for key in ("epoch", "step_in_epoch", "global_step", "loss_before", "accuracy_before"):
            setattr(state, key, getattr(restored, key))
    # Only now, with config, data, model and checkpoint known good, is anything written.
    if rank == 0:
        checkpoint.remove_stale(output_dir)
        dump_config(cfg, output_dir / "config.yaml")
    dist.barrier()
    if resume is not None:
        if tracker is not None:
            tracker = best.resume(restored.best, cfg, output_dir, log)
        log(f"resumed from {resume} at step {state.global_step}/{state.total_steps}")
    run = Run(cfg, log, loaded["source"], loaded["tokenizer"], loaded["train_set"], loaded["eval_set"],
              loaded["rows"], loaded["steps_per_epoch"], output_dir, engine, stepper, scheduler, state, tracker,
              metrics.MetricsLog(output_dir, enabled=rank == 0, tensorboard="tensorboard" in cfg.report_to,
                                 resume_step=state.global_step if resume else None),
              resume, started)
    if resume is None and run.eval_set is not None:
        scores = evaluate_now(run)
        state.loss_before, state.accuracy_before = scores["eval_loss"], scores.get("eval_accuracy")
        run.metrics.write({"step": 0, **scores})
        log(f"eval before training: {metrics.describe_scores(scores)}")
    return run


# --- the loop ---------------------------------------------------------------------------------------


def loop(run: Run, guard) -> str:
    """Train to total_steps ("finished") or until SIGTERM ("preempted")."""
    cfg, state, engine = run.cfg, run.state, run.engine
    rank, world = dist.rank_and_world()
    collate = data.PadCollator(run.tokenizer.pad_token_id)
    bar = metrics.progress_bar(rank, state.total_steps, state.global_step)
    window = metrics.Window()
    shard, shard_epoch = None, None
    try:
        while state.global_step < state.total_steps:
            if state.step_in_epoch >= run.steps_per_epoch:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if shard_epoch != state.epoch:
                group = state.global_batch_size if cfg.group_by_length else None
                shard, shard_epoch = data.epoch_shard(run.train_set, cfg.seed, state.epoch, rank, world, group), state.epoch
            batches = data.step_batches(shard, state.step_in_epoch, cfg.micro_batch_size,
                                        cfg.gradient_accumulation_steps, collate)
            # One small all-reduce per step: the global target-token count, and
            # whether any rank was asked to stop (so all stop at the same step).
            local_targets = sum(data.target_count(b["labels"]) for b in batches)
            n_targets, stop = dist.all_reduce([local_targets, float(guard.requested)], engine.device)
            if stop:
                return "preempted"
            lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
            tic = time.perf_counter()
            loss, tokens = optimizer_step(run, batches, n_targets, cfg.gradient_accumulation_steps * world)
            window.add(loss, tokens, time.perf_counter() - tic, local_targets)
            state.global_step += 1
            state.step_in_epoch += 1
            record = log_step(run, window, lr, bar)
            evaluated = maybe_evaluate(run, record)
            if len(record) > 1:
                run.metrics.write(metrics.ordered(record))
            bar.update(1)
            # Tracking the best model saves at every evaluation, so that each one can be kept.
            step = state.global_step
            due = (cfg.save_steps and step % cfg.save_steps == 0) or (run.tracker is not None and evaluated)
            if due and step < state.total_steps:
                save(run)
    finally:
        bar.close()  # also when the run stops with an error: the message starts a line
    return "finished"


def optimizer_step(run: Run, batches: list[dict], n_targets: float, ddp_scale: int) -> tuple[float, int]:
    """Forward and backward each micro-batch; the method steps the engine at the boundary.

    Returns this rank's share of the step's loss (the global token mean is the
    sum over ranks) and the number of tokens it processed. A non-finite loss
    on any rank stops the run before its gradient reaches the weights, unless
    skip_nonfinite_steps allows leaving that micro-batch out (on every rank).
    """
    engine, cfg = run.engine, run.cfg
    loss_sum, tokens, skipped = 0.0, 0, False
    for batch in batches:
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**data.model_inputs(batch), num_items_in_batch=n_targets).loss  # token-loss sum / n_targets
        (bad,) = dist.all_reduce([0.0 if torch.isfinite(loss) else 1.0], engine.device)
        if bad and run.skipped_steps >= cfg.skip_nonfinite_steps:
            raise stops.Diverged(run.state.global_step + 1, f"the training loss is {loss.item()} on a micro-batch",
                                 run.output_dir)
        if not bad:
            # DeepSpeed averages gradients over accumulation steps and ranks: undo both.
            engine.backward(loss * ddp_scale)
            loss_sum += loss.item()
        skipped = skipped or bool(bad)
        run.stepper.step()  # engine.step(), with the method's edits at the boundary
        tokens += int(batch["attention_mask"].sum())
    if skipped:
        run.skipped_steps += 1
        run.log(f"warning: step {run.state.global_step + 1}: a micro-batch with a non-finite loss was left out "
                f"({run.skipped_steps} of skip_nonfinite_steps {cfg.skip_nonfinite_steps})")
    norm = engine.get_global_grad_norm()
    if norm is not None and not math.isfinite(float(norm)):
        raise stops.Diverged(run.state.global_step + 1, f"the gradient norm is {float(norm)}", run.output_dir)
    return loss_sum, tokens


def log_step(run: Run, window: metrics.Window, lr: float, bar) -> dict:
    """The metrics record of the step just taken (train loss and throughput at logging steps)."""
    cfg, state = run.cfg, run.state
    step = state.global_step
    record = {"step": step}
    if step % cfg.logging_steps == 0 or step == state.total_steps:
        record.update(window.flush(run.engine.device))
        record.update(epoch=round(state.epoch + state.step_in_epoch / run.steps_per_epoch, 4), lr=lr,
                      refactor_fallbacks=run.stepper.stats.get("fallbacks", 0))
        if state.loss_kind == "train":
            state.loss_before = record["loss"] if state.loss_before is None else state.loss_before
            state.loss_after = record["loss"]
        warning = metrics.fallback_warning(record["refactor_fallbacks"] - run.fallbacks_seen, state.global_step,
                                           cfg.refactor_warmup, len(run.stepper.pairs))
        run.fallbacks_seen = record["refactor_fallbacks"]
        if warning:
            run.log(warning)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
    return record


def maybe_evaluate(run: Run, record: dict) -> bool:
    """Evaluate at eval_steps and at the last step; the scores go into ``record``."""
    cfg, state = run.cfg, run.state
    step = state.global_step
    periodic = cfg.eval_steps > 0 and step % cfg.eval_steps == 0
    if run.eval_set is None or not (periodic or step == state.total_steps):
        return False
    scores = evaluate_now(run)
    record.update(scores)
    if step == state.total_steps:
        state.loss_after, state.accuracy_after = scores["eval_loss"], scores.get("eval_accuracy")
    if run.tracker is not None:
        run.tracker.consider(step, scores.get(run.tracker.metric))
    return True


def evaluate_now(run: Run) -> dict:
    """eval_loss, and eval_accuracy when it is on, of the weights as they are (all ranks)."""
    return evaluate.run_scores(run.engine, run.tokenizer, run.eval_set, run.accuracy_rows, run.cfg)


def save(run: Run) -> Path:
    """A checkpoint of this step (all ranks); a new best is published; older checkpoints pruned."""
    state, tracker = run.state, run.tracker
    state.best = tracker.state() if tracker is not None else None
    trainable = export.trainable_state_dict(run.engine)  # a collective: the fp32 masters, for export
    path = checkpoint.save(run.engine, run.output_dir, state, run.stepper.state_dict(), trainable)
    run.log(f"saved checkpoint {path}")
    if tracker is not None and tracker.step == state.global_step:
        best.publish(run.engine, tracker, run.output_dir, run.source, run.cfg, run.log)
    # Only now, with the best record pointing at its checkpoint, may older ones go.
    if dist.is_main():
        checkpoint.prune(run.output_dir, run.cfg.save_total_limit, protect=tracker.checkpoint if tracker else None)
    run.last_saved = path
    return path


# --- the end ------------------------------------------------------------------------------------------


def finish(run: Run, status: str) -> dict:
    """The last checkpoint; for a finished run the adapter, loss curve and summary.json. Returns the summary.

    summary.json comes last: a run is finished when it and the adapter exist.
    """
    state, log = run.state, run.log
    if status == "preempted":
        at_step = run.last_saved is not None and run.last_saved.name == f"step-{state.global_step}"
        path = run.last_saved if at_step else save(run)
        log(f"stopped by SIGTERM at step {state.global_step}/{state.total_steps}; "
            f"checkpoint {path}; run the same command again to resume")
    else:
        path = save(run)
        adapter = export.export_adapter(run.engine, run.output_dir / checkpoint.ADAPTER, base_model=run.source,
                                        run_config=run.cfg)
        log(f"adapter saved to {adapter}")
    summary = metrics.summary(status, state, run.tracker, run.output_dir, path, run.started)
    if status == "finished" and dist.is_main():
        metrics.plot_loss(run.metrics.records(), run.output_dir / metrics.LOSS_PLOT)
        atomic.write_json(run.output_dir / metrics.SUMMARY_FILE, summary)
    run.metrics.close()
    if status == "finished":
        log(metrics.before_after(state, run.scored))
        if run.tracker is not None and run.tracker.step is not None:
            t = run.tracker
            log(f"best checkpoint by {t.metric}: step {t.step} ({t.value:.4f}), {run.output_dir / t.checkpoint}; "
                f"its adapter in {run.output_dir / best.BEST_ADAPTER}")
    return summary


def _already_finished(cfg: RunConfig, saved: TrainerState, path: Path, loaded: dict, log, started: float) -> dict:
    """A run whose last step is done: reported, or, if its ending was cut short, completed from the checkpoint."""
    output_dir = Path(cfg.output_dir)
    tracker = best.BestCheckpoint(**saved.best) if saved.best else None
    rows = loaded["rows"]
    scored = None if rows is None else f"{cfg.eval_accuracy_mode}, {len(rows)} rows"
    if metrics.is_finished(output_dir):
        log(f"{output_dir} already holds a finished run ({path}, step {saved.global_step}); "
            "raise max_steps to train further, or choose another output_dir to start over")
        log(metrics.before_after(saved, scored))
        return metrics.summary("already_finished", saved, tracker, output_dir, path, time.time())
    log(f"{output_dir}: the last step was saved in {path} but the run's ending was cut short; completing it")
    summary = metrics.summary("finished", saved, tracker, output_dir, path, started)
    if dist.is_main():  # the run's own checkpoint: resume trusts it too
        export.export_from_checkpoint(path, output_dir / checkpoint.ADAPTER, cfg, trust_checkpoint=True)
        metrics.plot_loss(metrics.read_records(output_dir), output_dir / metrics.LOSS_PLOT)
        atomic.write_json(output_dir / metrics.SUMMARY_FILE, summary)
    dist.barrier()
    log(f"adapter saved to {output_dir / checkpoint.ADAPTER}")
    log(metrics.before_after(saved, scored))
    return summary
