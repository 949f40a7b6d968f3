"""What the training recipe is built from: a run's data, and the model in its engine with the method attached."""

from __future__ import annotations

import torch

from . import data, dist, evaluate, models
from .checkpoint import TrainerState
from .config import RunConfig
from .methods import MethodConfig
from .optim import param_groups
from .schedule import lr_lambda


def load_data(cfg: RunConfig, log) -> dict:
    """Tokenizer, tokenized data (once per node, then from the cache), accuracy rows and the step count."""
    source = dist.local_rank_zero_first(lambda: models.resolve_base(cfg))
    tokenizer = models.load_tokenizer(source, trust_remote_code=cfg.trust_remote_code,
                                       chat_template=cfg.chat_template)
    train_set, eval_set, stats = dist.local_rank_zero_first(lambda: data.tokenize_datasets(cfg, tokenizer))
    log(data.describe_data(stats, train_set, eval_set))
    rows = evaluate.accuracy_rows(cfg, eval_set)
    if rows is not None:
        log(f"accuracy: {cfg.eval_accuracy_mode} scoring of {len(rows)} evaluation rows at each evaluation")
    world = dist.rank_and_world()[1]
    steps_per_epoch, total_steps = data.schedule_length(len(train_set), cfg.micro_batch_size,
                                                        cfg.gradient_accumulation_steps, world, cfg.max_steps,
                                                        cfg.num_epochs)
    state = TrainerState(total_steps=total_steps, world_size=world, method=cfg.method,
                         global_batch_size=cfg.micro_batch_size * cfg.gradient_accumulation_steps * world,
                         loss_kind="eval" if eval_set is not None else "train",
                         config=cfg.model_dump(mode="json"), data=stats["fingerprint"])
    return dict(source=source, tokenizer=tokenizer, train_set=train_set, eval_set=eval_set, rows=rows,
                steps_per_epoch=steps_per_epoch, state=state)


def build_engine(cfg: RunConfig, ds: dict, total_steps: int):
    """The PEFT model in a DeepSpeed engine, with AdamW, the schedule and the LoRA method attached."""
    import deepspeed

    from .zero import ZeroStepper

    model = models.wrap_with_lora(models.load_base_model(cfg)[0], cfg)  # in train mode: see load_base_model
    method = MethodConfig(name=cfg.method, warmup=cfg.refactor_warmup, interval=cfg.refactor_interval,
                          loraplus_lr_ratio=cfg.loraplus_lr_ratio, scaledgd_delta=cfg.scaledgd_delta)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.learning_rate, method, cfg.weight_decay),
                                  lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps,
                                                                       total_steps))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds, model_parameters=None)
    return engine, ZeroStepper(engine, method), scheduler
