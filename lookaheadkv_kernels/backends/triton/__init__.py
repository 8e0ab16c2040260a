"""Triton backend: the ops as Triton kernels (one module per op kernel), tuned for sm_90.

CUDA tensors run compiled kernels; CPU tensors run only under TRITON_INTERPRET=1 (Triton's
interpreter, for testing without a GPU), which must be set before this package is imported.
Arguments arrive validated and normalised by the ops layer (docs/ops.md); no function here
synchronises the host with the GPU, so every op can be captured in a CUDA graph once its kernels
have been autotuned (the first call of each shape class benchmarks the configs).
"""

from __future__ import annotations

import importlib.util

import torch

if importlib.util.find_spec("triton") is None:
    _IMPORT_ERROR: str | None = "triton is not installed"
else:
    _IMPORT_ERROR = None
    # The kernel modules share the op names; the functions defined below replace the submodule
    # attributes these imports create on the package.
    from . import attention_scores as _attention_kernels
    from . import lookahead_qproj as _qproj_kernels
    from . import select_compact as _select_kernels
    from ._common import INTERPRETING


def available(device: torch.device | None = None) -> tuple[bool, str | None]:
    """Whether the kernels can run on `device` (None: on some device of this machine)."""
    if _IMPORT_ERROR is not None:
        return False, _IMPORT_ERROR
    if device is None:
        if INTERPRETING or torch.cuda.is_available():
            return True, None
        return False, "triton needs a CUDA device, or TRITON_INTERPRET=1 to run on CPU tensors"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "triton: no CUDA device is available"
        return True, None
    if device.type == "cpu":
        if INTERPRETING:
            return True, None
        return False, "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return False, f"triton does not run on {device.type} tensors"


def lookahead_qproj(x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps):
    return _qproj_kernels.lookahead_qproj(
        x, weight, bias, lora_a, lora_b, lora_scale, cos, sin, num_heads, norm_weight, eps
    )


def attention_scores(q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    return _attention_kernels.attention_scores(
        q, k, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce
    )


def lookahead_attention(q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce):
    return _attention_kernels.lookahead_attention(
        q, k, v, num_scored, scale, gqa_reduce, pool_kernel, pool_type, query_reduce
    )


def select_compact(scores, k, v, budget, num_sink):
    return _select_kernels.select_compact(scores, k, v, budget, num_sink)


def paged_attention_scores(
    q,
    q_offsets,
    k_cache,
    block_table,
    seq_lens,
    num_scored,
    scale,
    gqa_reduce,
    pool_kernel,
    pool_type,
    query_reduce,
    layout,
):
    return _attention_kernels.paged_attention_scores(
        q,
        q_offsets,
        k_cache,
        block_table,
        seq_lens,
        num_scored,
        scale,
        gqa_reduce,
        pool_kernel,
        pool_type,
        query_reduce,
        layout,
    )


def paged_lookahead_attention(
    q,
    q_offsets,
    k_cache,
    v_cache,
    block_table,
    seq_lens,
    num_scored,
    scale,
    gqa_reduce,
    pool_kernel,
    pool_type,
    query_reduce,
    layout,
):
    return _attention_kernels.paged_lookahead_attention(
        q,
        q_offsets,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        num_scored,
        scale,
        gqa_reduce,
        pool_kernel,
        pool_type,
        query_reduce,
        layout,
    )


def paged_select_compact(scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout):
    return _select_kernels.paged_select_compact(
        scores, k_cache, v_cache, block_table, seq_lens, num_scored, budgets, num_sink, layout
    )
