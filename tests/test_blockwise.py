"""slimtron.blockwise: the same results as whole-tensor ops, block by block."""
import pytest
import torch
import torch.nn.functional as F

from slimtron import blockwise
from slimtron.model import kernels


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(blockwise, "CPU_BLOCK_BYTES", 4 * 40)  # 40 fp32 values per block


def test_row_blocks_cover_every_row_once(small_blocks):
    cpu = torch.device("cpu")
    assert blockwise.row_blocks(7, 16, cpu) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert blockwise.row_blocks(3, 1000, cpu) == [(0, 1), (1, 2), (2, 3)]  # at least one row
    assert blockwise.row_blocks(0, 16, cpu) == []
    assert blockwise.row_blocks(7, 16, torch.device("meta")) == [(0, 7)]  # one block off the CPU


def test_add_converts_in_blocks_exactly(small_blocks):
    g = torch.Generator().manual_seed(0)
    accumulator = torch.randn(13, 11, generator=g)
    addend = torch.randn(13, 11, generator=g).bfloat16()
    expected = accumulator + addend.float()
    assert blockwise.add_(accumulator, addend) is accumulator
    assert torch.equal(accumulator, expected)  # bf16 -> fp32 is exact: bitwise the same sum
    same = torch.randn(5, generator=g)
    torch.testing.assert_close(blockwise.add_(same.clone(), same), same * 2, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_in_blocks_equals_the_composite_form(small_blocks, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 2 * 8, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(5, 3, 8, generator=g).to(dtype)
    out = kernels.swiglu(x)
    out.backward(grad)
    reference = x.detach().double().requires_grad_()
    gate, up = reference.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    expected.backward(grad.double())
    assert out.dtype == x.grad.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-3)
    torch.testing.assert_close(out.double(), expected, **tol)  # fp32 math, one rounding
    torch.testing.assert_close(x.grad.double(), reference.grad, **tol)
