"""RefLoRA for a plain PyTorch optimizer (single process or DDP).

    model = get_peft_model(base, LoraConfig(r=16, ...))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    reflora = attach(model, opt, method="reflora", warmup=100)
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()          # RefLoRA runs inside, through optimizer hooks
        opt.zero_grad()
    torch.save({"opt": opt.state_dict(), "reflora": reflora.state_dict()}, ...)

Gradients are preconditioned by tensor hooks during backward, so under DDP
each rank preconditions its local gradient before the all-reduce.  Weight
edits run in the optimizer's step pre-hook, the plan for the next step in its
post-hook.  ``max_grad_norm`` clips *after* preconditioning, inside the step,
which is the order DeepSpeed uses; clipping yourself before ``opt.step()``
clips the preconditioned gradient too, but not RefLoRA-S's rescale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dist import unwrap
from .lora_pairs import find_lora_pairs
from .methods import MethodConfig, lora_param_groups
from .stepper import LoraStepper, local_factors


class TorchStepper(LoraStepper):
    """A LoRA method attached to a ``torch.optim`` optimizer. Use :func:`attach`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, method: MethodConfig,
                 max_grad_norm: float | None = None):
        pairs = find_lora_pairs(unwrap(model))
        _check_optimizer(optimizer, pairs, method)
        super().__init__(pairs, method)
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self._before_step()))
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.after_step()))
        self.refresh()

    def _before_step(self) -> None:
        self.apply_weight_edits()
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def _full_factors(self):
        return local_factors(self.pairs)

    @torch.no_grad()
    def _sq_norms(self) -> tuple[Tensor, Tensor]:
        sq = lambda t: t.detach().double().pow(2).sum()
        return torch.stack([sq(p.A) for p in self.pairs]), torch.stack([sq(p.B) for p in self.pairs])

    @torch.no_grad()
    def _scale_param(self, param, weight: float, exp_avg: float, exp_avg_sq: float) -> None:
        param.mul_(weight)
        state = self.optimizer.state.get(param, {})
        if not state:
            return  # before the first step there are no moments to rescale
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            raise TypeError(
                f"{self.method.name} rescales Adam moments, but {type(self.optimizer).__name__} keeps "
                f"{sorted(state)}: use Adam/AdamW, or method 'reflora'"
            )
        state["exp_avg"].mul_(exp_avg)
        state["exp_avg_sq"].mul_(exp_avg_sq)

    def _get_full_master(self, param) -> Tensor:
        return param.detach()

    @torch.no_grad()
    def _set_full_master(self, param, value: Tensor) -> None:
        param.copy_(value)

    @torch.no_grad()
    def _map_moments(self, param, first, second) -> None:
        state = self.optimizer.state.get(param, {})
        for key, mapping in (("exp_avg", first), ("exp_avg_sq", second)):
            if key in state:
                state[key].copy_(mapping(state[key].double()))


def _check_optimizer(optimizer: torch.optim.Optimizer, pairs, method: MethodConfig) -> None:
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [pair.name for pair in pairs if id(pair.A) not in owned or id(pair.B) not in owned]
    if missing:
        raise ValueError(f"the optimizer does not update these LoRA factors: {', '.join(missing[:5])}")
    stateless_sgd = isinstance(optimizer, torch.optim.SGD) and not optimizer.defaults.get("momentum")
    if method.spec.needs_adam_moments and "betas" not in optimizer.defaults and not stateless_sgd:
        raise TypeError(
            f"{method.name} rescales Adam moments (exp_avg, exp_avg_sq); {type(optimizer).__name__} has none: "
            "use Adam/AdamW, or method 'reflora'"
        )
    if method.spec.b_lr_ratio:
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        bad = [p.name for p in pairs if abs(lr_of[id(p.B)] - method.loraplus_lr_ratio * lr_of[id(p.A)]) > 1e-12 * lr_of[id(p.B)]]
        if bad:
            raise ValueError(
                f"{method.name} needs B's learning rate to be loraplus_lr_ratio × A's: build the optimizer "
                "from reflora_ds.param_groups(model, ...)"
            )


def param_groups(model: nn.Module, lr: float, method: MethodConfig | str = "lora", weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for a PEFT model's trainable parameters (LoRA+ aware)."""
    method = MethodConfig(name=method) if isinstance(method, str) else method
    model = unwrap(model)
    pairs = find_lora_pairs(model)
    in_pairs = {id(q) for p in pairs for q in (p.A, p.B)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
    return lora_param_groups(pairs, others, lr, method, weight_decay)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, method: str = "reflora", *,
           warmup: int = 0, interval: int = 1, max_grad_norm: float | None = None, **options) -> TorchStepper:
    """Attach a LoRA method to ``optimizer``; it then runs on every ``optimizer.step()``.

    ``options``: ``loraplus_lr_ratio``, ``scaledgd_delta``, ``rank_tol``.
    """
    cfg = MethodConfig(name=method, warmup=warmup, interval=interval, **options)
    return TorchStepper(model, optimizer, cfg, max_grad_norm=max_grad_norm)


RefLoRA = TorchStepper  # the name of earlier releases
