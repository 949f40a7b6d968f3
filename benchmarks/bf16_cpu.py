"""bf16 linear layers on a CPU that has no bf16 GEMM kernel.

The study keeps its frozen base weights in bf16.  On a CPU with AVX-512
or AMX, torch runs a bf16 matmul through oneDNN; on one without (an
AVX2-only x86, say) it falls back to a scalar loop, and a linear layer's
backward pass becomes 30-50x slower than in fp32 (SmolLM2's tied output
layer, 512 tokens: 75 s against 1.4 s), which turns a 300-step run into a
day's work.

A bf16 GEMM multiplies bf16 numbers (each product exact in fp32), adds the
products in fp32 and rounds the sum to bf16.  Upcasting the operands, calling
the fp32 GEMM and rounding its output to bf16 does the same arithmetic in
another order of additions: the kind of difference two CPUs' native kernels
already show.  Autograd differentiates through the casts, so the input's
gradient is rounded to bf16 just as the native backward rounds it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def has_bf16_gemm() -> bool:
    """Whether torch has a native (oneDNN) bf16 GEMM on this CPU."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else True


class Bf16LinearInFp32(TorchFunctionMode):
    """Every ``F.linear`` on bf16 CPU tensors runs as an fp32 GEMM whose output is rounded to bf16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu":
                out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
                return out.to(torch.bfloat16)
        return func(*args, **kwargs)


def needs_fp32_linears(dtype: str, device: str) -> bool:
    """Whether bf16 linear layers here would take torch's scalar path (then train under ``Bf16LinearInFp32``)."""
    return dtype == "bfloat16" and device == "cpu" and not has_bf16_gemm()
