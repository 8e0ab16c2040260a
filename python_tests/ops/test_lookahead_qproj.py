"""lookahead_qproj against the float64 reference (docs/ops.md §1)."""

import pytest
import torch
from op_testing import DTYPES, backend_cases, randn, require, tf32_like

import lookaheadkv_kernels as lk
from lookaheadkv_kernels.backends import reference

# (T, hidden, num_heads, D, rank, bias, norm)
CASES = [
    (1, 64, 1, 64, 0, False, False),  # one row, no extras
    (5, 96, 3, 64, 8, True, False),  # Qwen2-like bias + LoRA
    (32, 256, 2, 128, 8, False, True),  # Qwen3-like q_norm + LoRA, 32 lookahead rows
    (7, 200, 4, 32, 4, True, True),  # everything, hidden not a multiple of 64
]
# Few rows (LAQ projects one row per call): the CPU kernel takes its GEMV path for T <= 4.
FEW_ROWS = [
    (3, 200, 4, 32, 4, True, True),  # everything, hidden not a multiple of 32
]


def tolerance(backend, device, dtype):
    """One rounding of the float32 result to the output dtype, plus float32 accumulation error."""
    if dtype == torch.bfloat16:
        return dict(rtol=1.6e-2, atol=1.6e-2)
    if dtype == torch.float16:
        return dict(rtol=2e-3, atol=2e-3)
    if tf32_like(backend, device, dtype):
        return dict(rtol=5e-3, atol=5e-3)
    return dict(rtol=2e-5, atol=2e-5)


def rope_tables(T, D, positions_from=100):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    angles = torch.arange(positions_from, positions_from + T).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def make_inputs(case, dtype, device, seed, x_layout="contiguous"):
    T, hidden, H, D, rank, with_bias, with_norm = case
    g = torch.Generator().manual_seed(seed)
    x = randn(T, hidden, dtype=dtype, device=device, generator=g)
    if x_layout == "padded":  # rows of a wider buffer: row stride > hidden
        wide = torch.zeros(T, hidden + 16, dtype=dtype, device=device)
        wide[:, :hidden] = x
        x = wide[:, :hidden]
    weight = randn(H * D, hidden, dtype=dtype, device=device, generator=g, scale=hidden**-0.5)
    cos, sin = (t.to(device) for t in rope_tables(T, D))
    args = dict(
        bias=randn(H * D, device=device, generator=g) if with_bias else None,
        lora_a=randn(rank, hidden, device=device, generator=g, scale=hidden**-0.5) if rank else None,
        lora_b=randn(H * D, rank, device=device, generator=g, scale=0.1) if rank else None,
        lora_scale=4.0 if rank else 1.0,
        norm_weight=(1 + 0.1 * randn(D, device=device, generator=g)) if with_norm else None,
        eps=1e-6,
    )
    return x, weight, cos, sin, H, args


def reference_q(x, weight, cos, sin, H, args):
    d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    return reference.lookahead_qproj(
        d(x),
        d(weight),
        d(args["bias"]),
        d(args["lora_a"]),
        d(args["lora_b"]),
        args["lora_scale"],
        d(cos),
        d(sin),
        H,
        d(args["norm_weight"]),
        args["eps"],
    )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + FEW_ROWS, ids=lambda c: "x".join(map(str, c)))
def test_against_float64_reference(backend, device, dtype, case):
    require(backend, device)
    x, weight, cos, sin, H, args = make_inputs(case, dtype, device, seed=sum(case[:5]))
    q = lk.lookahead_qproj(x, weight, cos, sin, H, backend=backend, **args)
    assert q.dtype == dtype and q.shape == (case[0], H, case[3])
    torch.testing.assert_close(
        q,
        reference_q(x, weight, cos, sin, H, args),
        **tolerance(backend, device, dtype),
        check_dtype=False,
        check_device=False,
    )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("case", [CASES[3], FEW_ROWS[0]], ids=lambda c: "x".join(map(str, c)))
def test_non_contiguous_rows_and_bf16_lora_params(backend, device, case):
    require(backend, device)
    x, weight, cos, sin, H, args = make_inputs(case, torch.float32, device, seed=1, x_layout="padded")
    weight = torch.cat([weight, weight], dim=1)[:, : weight.shape[1]]  # row stride 2*hidden
    args["lora_a"] = args["lora_a"].to(torch.bfloat16)
    assert not x.is_contiguous() and not weight.is_contiguous()
    q = lk.lookahead_qproj(x, weight, cos, sin, H, backend=backend, **args)
    torch.testing.assert_close(
        q,
        reference_q(x, weight, cos, sin, H, args),
        **tolerance(backend, device, torch.float32),
        check_dtype=False,
        check_device=False,
    )


@pytest.mark.parametrize("backend,device", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 4, 5])
def test_few_rows_at_smollm2_shapes(backend, device, dtype, T):
    """SmolLM2-135M's query projection (9 heads of 64, hidden 576) with a LoRA, for a few rows: the
    CPU kernel's GEMV path (T <= 4) and the lanes path just above it."""
    require(backend, device)
    case = (T, 576, 9, 64, 8, True, False)
    x, weight, cos, sin, H, args = make_inputs(case, dtype, device, seed=T)
    q = lk.lookahead_qproj(x, weight, cos, sin, H, backend=backend, **args)
    assert q.dtype == dtype and q.shape == (T, H, 64)
    torch.testing.assert_close(
        q,
        reference_q(x, weight, cos, sin, H, args),
        **tolerance(backend, device, dtype),
        check_dtype=False,
        check_device=False,
    )


BAD_INPUTS = [
    (dict(x=(4,)), "x must have 2 dims"),
    (dict(weight=(64, 32)), "x's hidden size"),
    (dict(num_heads=3, weight=(64, 64)), "not a multiple of num_heads"),
    (dict(weight=(2 * 7, 64), num_heads=2, D=7), "must be even"),
    (dict(bias=(10,)), "bias must have shape"),
    (dict(lora_a=(8, 64)), "lora_a and lora_b must be given together"),
    (dict(cos=(3, 32)), "cos must have shape"),
    (dict(norm_weight=(16,)), "norm_weight must have shape"),
    (dict(weight_dtype=torch.float16), "weight must have x's dtype"),
    (dict(eps=-1.0), "eps must be >= 0"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=lambda x: str(x)[:40])
def test_bad_inputs_raise_naming_the_argument(change, message):
    T, hidden = 4, 64
    H, D = change.get("num_heads", 2), change.get("D", 32)
    x = torch.randn(*change.get("x", (T, hidden)))
    weight = torch.randn(*change.get("weight", (H * D, hidden))).to(change.get("weight_dtype", torch.float32))
    cos, sin = rope_tables(T, D)
    if "cos" in change:
        cos = torch.randn(*change["cos"])
    kwargs = dict(eps=change.get("eps", 1e-6))
    for name in ("bias", "lora_a", "norm_weight"):
        if name in change:
            kwargs[name] = torch.randn(*change[name])
    with pytest.raises((ValueError, TypeError), match=message):
        lk.lookahead_qproj(x, weight, cos, sin, H, **kwargs)
