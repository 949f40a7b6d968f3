"""The DeepSpeed internals zero.py relies on exist in the installed DeepSpeed, and their absence is named.

One process (a world of one): each stage's engine is built in-process, the way
the trainer builds it, and zero.check_internals inspects it.
"""

from __future__ import annotations

import pytest
import torch

from reflora_ds import dist
from reflora_ds.methods import MethodConfig
from reflora_ds.zero import ZeroStepper, check_internals

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def engine(stage: int, bf16: bool = False):
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    dist.start_deepspeed()
    base, _ = tiny_llama(seed=0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9}
    eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return eng


@pytest.mark.parametrize("stage,bf16", [(0, False), (0, True), (1, False), (2, True), (3, False)])
def test_installed_deepspeed_has_what_zero_py_uses(stage, bf16):
    eng = engine(stage, bf16)
    check_internals(eng)
    ZeroStepper(eng, MethodConfig("reflora_s"))  # its constructor checks too
    if stage in (1, 2):
        assert all(hasattr(p, "_hp_mapping") for p in eng.module.parameters() if p.requires_grad)


def test_a_missing_internal_is_named_with_the_versions_it_was_written_for(monkeypatch):
    eng = engine(1)
    monkeypatch.delattr(type(eng.optimizer), "_lazy_init_hp_params_optimizer_state")
    with pytest.raises(RuntimeError, match=r"lacks .*_lazy_init_hp_params_optimizer_state.*written for DeepSpeed "
                                           r"0\.16 to 0\.19"):
        check_internals(eng)
    with pytest.raises(RuntimeError, match="_lazy_init_hp_params_optimizer_state"):
        ZeroStepper(eng, MethodConfig("reflora"))
