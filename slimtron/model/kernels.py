"""Compute kernels with optional fused implementations, chosen at import time.

Attention follows ``--attention-backend`` (Megatron's choices):

- ``flash``: flash-attn on CUDA half-precision tensors when importable, else PyTorch's SDPA
  (whose CPU kernel is also a flash kernel: tiled, online softmax, no s x s scores kept);
- ``fused``: PyTorch's SDPA (cuDNN / flash / memory-efficient kernels on CUDA);
- ``unfused`` and ``local``: bmm, masked softmax, bmm (slimtron.model.unfused_attention);
- ``auto`` (default): ``unfused`` for 16-bit tensors on CPU, where SDPA's kernel is 1.4-2x slower
  (bench/attention.py; in fp32 neither wins everywhere, and SDPA keeps no s x s), ``flash``
  everywhere else, where the s x s probabilities it keeps would cost memory for no gain.

apex's fused norms are used on CUDA when importable; otherwise ``F.layer_norm`` / ``F.rms_norm``.
Neither library is ever required.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from slimtron import blockwise
from slimtron.model.unfused_attention import unfused_causal_attention

try:  # pragma: no cover - depends on the machine
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None

try:  # pragma: no cover - depends on the machine
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine as _apex_layer_norm
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm
except Exception:  # noqa: BLE001
    _apex_layer_norm = _apex_rms_norm = None

HAVE_FLASH_ATTN = _flash_attn_func is not None
HAVE_APEX_NORM = _apex_layer_norm is not None


FLASH_MAX_HEAD_DIM = 256  # flash-attn 2's largest supported head dimension


@functools.lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:  # pragma: no cover - CUDA only
    """flash-attn 2 kernels run on Ampere (compute capability 8.0) or newer GPUs only."""
    return torch.cuda.get_device_capability(device_index)[0] >= 8


def _use_flash(q: torch.Tensor) -> bool:
    return (HAVE_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= FLASH_MAX_HEAD_DIM and _flash_capable(q.device.index))


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of packed documents: ``segment_ids`` ``[b, s]`` (equal ids = one
    document) -> bool ``[b, 1, s, s]``, True where query i may attend to key j: j <= i and both in
    the same document (SDPA's boolean ``attn_mask``)."""
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    return (same & causal).unsqueeze(1)


def attention_kernel(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """What ``--attention-backend`` runs for ``dtype`` tensors on ``device``: "unfused" or "flash"
    (flash-attn where usable, else SDPA). The meta device (the dry run) stands for a GPU."""
    if backend in ("unfused", "local"):
        return "unfused"
    if backend == "auto" and device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return "unfused"
    return "flash"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout_p: float = 0.0, segment_ids=None,
                     backend: str = "auto") -> torch.Tensor:
    """Causal softmax attention. q ``[s, b, heads, d]``; k, v ``[s, b, groups, d]`` where each
    group serves ``heads / groups`` consecutive query heads. Returns ``[s, b, heads * d]``.
    ``segment_ids`` ``[b, s]`` (optional): attention also stays within each document.
    ``backend``: ``--attention-backend`` (see the module's docstring)."""
    s, b, heads, d = q.shape
    if attention_kernel(backend, q.device, q.dtype) == "unfused":
        return _unfused(q, k, v, dropout_p, segment_ids)
    if segment_ids is not None:
        return torch_attention(q, k, v, attn_mask=document_causal_mask(segment_ids),
                               dropout_p=dropout_p)
    if _use_flash(q):  # pragma: no cover - CUDA only
        out = _flash_attn_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                               dropout_p=dropout_p, causal=True)
        return out.transpose(0, 1).reshape(s, b, heads * d)
    return torch_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


# torch.compile does not trace it (its blocks loop in Python and write scores in place): under
# --compile-layers attention runs eager between the layer's compiled halves, as SDPA's kernel does.
@torch.compiler.disable
def _unfused(q, k, v, dropout_p, segment_ids):
    return unfused_causal_attention(q, k, v, dropout_p=dropout_p, segment_ids=segment_ids)


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = False,
                    attn_mask=None, dropout_p: float = 0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on the layout of ``causal_attention`` (q ``[s, b, heads,
    d]``, k and v ``[len, b, groups, d]``); returns ``[s, b, heads * d]``."""
    s, b, heads, d = q.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads or groups, len, d]
    # enable_gqa: the kernel reads each group's k/v, with no copies expanded to every head
    gqa = {"enable_gqa": True} if heads > k.shape[1] else {}
    if q.device.type == "meta":
        # The dry run (slimtron.dry_run): on meta SDPA would trace the math kernel and its s x s
        # scores; count what the fused kernel a GPU runs keeps (q, k, v, output, logsumexp, and
        # a boolean mask turned into an additive one in q's dtype, as SDPA does).
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf"))
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, **gqa)
    return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    if HAVE_APEX_NORM and x.is_cuda:  # pragma: no cover - CUDA only
        return _apex_layer_norm(x, weight, bias, weight.shape, eps)
    return F.layer_norm(x, weight.shape, weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if HAVE_APEX_NORM and x.is_cuda:  # pragma: no cover - CUDA only
        return _apex_rms_norm(x, weight, weight.shape, eps)
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    """``F.rms_norm``'s arithmetic (fp32 inside, the input's dtype out) saving only the input and
    the fp32 1/rms per row, as apex's fused kernel does: torch's composite form keeps three fp32
    copies of the input for backward (12 bytes per element against 2 for a bf16 input)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()  # one fp32 copy (none for fp32 input), read twice
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_f = grad.float()  # a copy, free to overwrite, unless grad is already fp32
        grad_weight = (grad_f * normed).reshape(-1, x.shape[-1]).sum(0)
        weight_f = weight.float()
        grad_normed = grad_f.mul_(weight_f) if grad_f is not grad else grad_f * weight_f
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding over all of x's last dim: ``x * cos + [-x2, x1] * sin`` in
    fp32, returned in x's dtype. cos and sin (fp32, broadcast to x) take no gradient."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rotary: cos and sin are constants here; they must not require grad")
    return _Rotary.apply(x, cos, sin)


class _Rotary(torch.autograd.Function):
    """The arithmetic of the composite form, bit for bit, without its fp32 negation and
    concatenation in forward or their mirror images in backward: the two halves are written in
    place (a + (-b) * c rounds exactly as a - b * c)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        xf = x.float()
        first, second = xf.chunk(2, dim=-1)
        half = first.shape[-1]
        out = xf * cos
        out[..., :half].sub_(second * sin[..., :half])
        out[..., half:].add_(first * sin[..., half:])
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        grad_f = grad.float()
        by_sin = grad_f * sin
        first, second = by_sin.chunk(2, dim=-1)
        half = first.shape[-1]
        grad_x = grad_f * cos
        grad_x[..., :half].add_(second)
        grad_x[..., half:].sub_(first)
        return grad_x.to(grad.dtype), None, None


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate, up] along the last dim, keeping only x for backward (as
    Megatron's fused SwiGLU): autograd would also keep silu(gate), half of x's size again."""
    return _SwiGLU.apply(x)


class _SwiGLU(torch.autograd.Function):
    """In fp32 over blocks of rows (slimtron.blockwise), rounding once into the input's dtype."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        rows = x.reshape(-1, x.shape[-1])
        half = rows.shape[-1] // 2
        out = torch.empty(rows.shape[0], half, dtype=x.dtype, device=x.device)
        blocks = blockwise.row_blocks(rows.shape[0], rows.shape[-1], x.device)
        buffer = blockwise.row_buffer(blocks, rows.shape[-1], torch.float32, x.device)
        for start, end in blocks:
            xf = buffer[:end - start].copy_(rows[start:end])
            out[start:end] = F.silu(xf[:, :half]).mul_(xf[:, half:])
        return out.view(*x.shape[:-1], half)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        rows = x.reshape(-1, x.shape[-1])
        half = rows.shape[-1] // 2
        grad = grad.reshape(-1, half)
        out = torch.empty_like(rows)
        blocks = blockwise.row_blocks(rows.shape[0], rows.shape[-1], x.device)
        buffer = blockwise.row_buffer(blocks, rows.shape[-1] + half, torch.float32, x.device)
        for start, end in blocks:
            xf = buffer[:end - start, :2 * half].copy_(rows[start:end])
            gate, up = xf[:, :half], xf[:, half:]
            grad_f = buffer[:end - start, 2 * half:].copy_(grad[start:end])
            sig = torch.sigmoid(gate)
            # grad * up * sig * (1 + gate * (1 - sig)) and grad * gate * sig, in that order
            silu_grad = (1 - sig).mul_(gate).add_(1)
            out[start:end, :half] = (grad_f * up).mul_(sig).mul_(silu_grad)
            out[start:end, half:] = (grad_f * gate).mul_(sig)
        return out.view(x.shape)
