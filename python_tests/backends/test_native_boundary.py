"""The native modules' typed boundary (csrc/tensor_args.h, csrc/op_bindings.h): a direct call of any
native op with a wrong tensor raises a ValueError/TypeError naming the argument, never reads outside
a buffer. Both modules take the same arguments in the same order; the CUDA module runs in the host
emulator here."""

import cuda_emulator
import pytest
import torch

from lookaheadkv_kernels.backends._native import native_module
from lookaheadkv_kernels.ops import dispatch


def cpu_module():
    return native_module("_C_cpu"), ()


def emulated_cuda_module():
    reason = cuda_emulator.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    workspace = torch.empty(1 << 24, dtype=torch.uint8)
    return cuda_emulator.load(), (workspace, 4, 0)


MODULES = [pytest.param(cpu_module, id="cpu"), pytest.param(emulated_cuda_module, id="cuda-emulated")]


def launch_args(module_args, op):
    """The trailing launch arguments: CPU num_threads; CUDA workspace, num_sms, stream (select: no num_sms)."""
    if not module_args:
        return (1,)
    workspace, num_sms, stream = module_args
    return (workspace, stream) if op == "select_compact" else (workspace, num_sms, stream)


def attention_case():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 2, 16, generator=g)
    k = torch.randn(1, 2, 10, 16, generator=g)
    v = torch.randn(1, 2, 10, 16, generator=g)
    return dict(q=q, k=k, v=v, out=torch.empty(1, 4, 2, 16), scores=torch.empty(1, 2, 8))


def call_attention(module, launch, t):
    return module.lookahead_attention(
        t["q"], t["k"], t["v"], 8, 0.25, "mean", 1, "max", "mean", t["out"], t["scores"], *launch
    )


ATTENTION_MUTATIONS = {
    "short v": ("v", lambda t: t["v"][:, :, :5], ValueError),
    "v of another dtype": ("v", lambda t: t["v"].half(), TypeError),
    "k of another head_dim": ("k", lambda t: torch.randn(1, 2, 10, 8), ValueError),
    "small out": ("out", lambda t: torch.empty(1, 4, 1, 16), ValueError),
    "strided out": ("out", lambda t: torch.empty(1, 4, 16, 2).transpose(2, 3), ValueError),
    "small scores": ("scores", lambda t: torch.empty(1, 2, 4), ValueError),
    "float64 scores": ("scores", lambda t: torch.empty(1, 2, 8, dtype=torch.float64), TypeError),
    "q not a tensor": ("q", lambda t: 3, TypeError),
    "q with 3 dims": ("q", lambda t: t["q"][0], ValueError),
    "q's last dim strided": ("q", lambda t: torch.randn(1, 4, 2, 32)[..., ::2], ValueError),
    "sparse k": ("k", lambda t: t["k"].to_sparse(), ValueError),
    "k on meta": ("k", lambda t: t["k"].to("meta"), ValueError),
}


@pytest.mark.parametrize("make_module", MODULES)
@pytest.mark.parametrize("mutation", list(ATTENTION_MUTATIONS))
def test_attention_rejects(make_module, mutation):
    module, module_args = make_module()
    t = attention_case()
    name, change, error = ATTENTION_MUTATIONS[mutation]
    t[name] = change(t)
    with pytest.raises(error, match=name):
        call_attention(module, launch_args(module_args, "lookahead_attention"), t)


@pytest.mark.parametrize("make_module", MODULES)
def test_attention_accepts_the_valid_case(make_module):
    module, module_args = make_module()
    t = attention_case()
    call_attention(module, launch_args(module_args, "lookahead_attention"), t)
    assert torch.isfinite(t["scores"]).all() and torch.isfinite(t["out"]).all()


@pytest.mark.parametrize("make_module", MODULES)
@pytest.mark.parametrize(
    "mutation",
    ["short v", "budget below protected", "huge budget", "small kept", "int32 kept", "short k_out", "scores too wide"],
)
def test_select_compact_rejects(make_module, mutation):
    module, module_args = make_module()
    g = torch.Generator().manual_seed(3)
    scores, k, v = torch.randn(1, 2, 12, generator=g), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    budget, num_sink = 8, 2
    k_out, v_out, kept = torch.empty(1, 2, 8, 8), torch.empty(1, 2, 8, 8), torch.empty(1, 2, 8, dtype=torch.int64)
    if mutation == "short v":
        v = v[:, :, :4]
    elif mutation == "budget below protected":
        budget = 5
    elif mutation == "huge budget":
        budget = 2**63 - 1
    elif mutation == "small kept":
        kept = kept[..., :4]
    elif mutation == "int32 kept":
        kept = kept.int()
    elif mutation == "short k_out":
        k_out = k_out[:, :, :3]
    elif mutation == "scores too wide":
        scores = torch.randn(1, 2, 20)
    with pytest.raises((ValueError, TypeError)):
        module.select_compact(
            scores, k, v, budget, num_sink, k_out, v_out, kept, *launch_args(module_args, "select_compact")
        )


@pytest.mark.parametrize("make_module", MODULES)
def test_qproj_rejects_short_inputs(make_module):
    module, module_args = make_module()
    x, weight = torch.randn(3, 32), torch.randn(4 * 8, 32)
    cos, sin = torch.ones(3, 8), torch.zeros(3, 8)
    out = torch.empty(3, 4, 8)
    launch = launch_args(module_args, "lookahead_qproj")
    with pytest.raises(ValueError, match="weight"):
        module.lookahead_qproj(x, weight[:, :16], None, None, None, 1.0, cos, sin, 4, None, 1e-6, out, *launch)
    with pytest.raises(ValueError, match="cos"):
        module.lookahead_qproj(x, weight, None, None, None, 1.0, cos[:2], sin, 4, None, 1e-6, out, *launch)
    with pytest.raises(ValueError, match="lora"):
        module.lookahead_qproj(x, weight, None, torch.randn(2, 32), None, 1.0, cos, sin, 4, None, 1e-6, out, *launch)
    with pytest.raises(ValueError, match="lora_b"):
        module.lookahead_qproj(
            x, weight, None, torch.randn(2, 32), torch.randn(32, 1), 1.0, cos, sin, 4, None, 1e-6, out, *launch
        )
    module.lookahead_qproj(x, weight, None, None, None, 1.0, cos, sin, 4, None, 1e-6, out, *launch)


def test_cpu_and_cuda_modules_take_the_same_op_arguments():
    if cuda_emulator.unavailable_reason() is not None:
        pytest.skip(cuda_emulator.unavailable_reason())
    cpu, cuda = native_module("_C_cpu"), cuda_emulator.load()
    for op in dispatch.OPS:
        cpu_args = getattr(cpu, op).__doc__.split("(", 1)[1].split(")", 1)[0]
        cuda_args = getattr(cuda, op).__doc__.split("(", 1)[1].split(")", 1)[0]
        cpu_names = [a.split(":")[0].strip() for a in cpu_args.split(",")][:-1]  # all but num_threads
        cuda_names = [a.split(":")[0].strip() for a in cuda_args.split(",")]
        assert cuda_names[: len(cpu_names)] == cpu_names, op
