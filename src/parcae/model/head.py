"""Fused LM head + cross entropy, chunked: the plain `cross_entropy(lm_head(x).float(), y)` keeps [N, V] fp32 logits for
backward (≈ 8.6 GB at 32 × 2048 tokens, V 32768). Each chunk's logits become ∂loss/∂logits *in place*, contracted at
once: backward merely scales ∂loss/∂hidden and ∂loss/∂W, no recompute (as fast on CPU: `benchmarks/op_speed.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# Logits held at once (32 Mi fp32 = 128 MiB), large on purpose: every chunk adds its ∂W into the [V, D] accumulator
# (`benchmarks/op_speed.py head`, CPU, V 32,768: 2 Mi per chunk is 1.36–1.44× slower than unchunked, 32 Mi 0.97–1.02×).
CHUNK_ELEMENTS = 1 << 25


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_elements: int | None = None) -> Tensor:
    """Mean CE of `hidden @ weight.T` ([..., D] × [V, D]) against `labels` [...] ≠ IGNORE_INDEX (0 if none); logits are
    the matmul's output (bf16 under autocast) in fp32, as `F.cross_entropy(logits.float(), …)` sees them."""
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk = max(1, (chunk_elements or CHUNK_ELEMENTS) // weight.shape[0])
    valid = flat_labels != IGNORE_INDEX
    if bool(((flat_labels < 0) | (flat_labels >= weight.shape[0]))[valid].any()):
        raise IndexError(f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}.")
    if flat_labels.shape[0] <= chunk:  # one chunk: the plain head is as fast and autograd's own numerics
        return mean_cross_entropy(F.linear(flat_hidden, weight).float(), flat_labels)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(flat_hidden, weight, flat_labels, chunk)
    else:
        total = _chunked_loss(flat_hidden, weight, flat_labels, chunk, (False, False))[0]
    return total / valid.sum().clamp(min=1)


def mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross entropy of logits [..., V] over labels ≠ IGNORE_INDEX (0 when there are none)."""
    total = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _chunked_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, needs_grad: tuple[bool, ...]
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Summed CE over chunks of tokens and, where `needs_grad` asks, its gradients for hidden and weight."""
    total = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
    # Accumulated over chunks in fp32 even when the matmuls run in bf16, as autograd would accumulate.
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad[1] else None
    rows = torch.arange(chunk, device=hidden.device)
    for start in range(0, labels.shape[0], chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        projected = F.linear(h, weight)  # autocast's dtype, if any
        logits = projected.float()
        valid = y != IGNORE_INDEX
        targets = torch.where(valid, y, 0)
        log_normaliser = torch.logsumexp(logits, dim=-1)
        total += ((log_normaliser - logits.gather(1, targets[:, None]).squeeze(1)) * valid).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        # ∂(summed CE)/∂logits = softmax − one-hot on valid rows, 0 on ignored ones; built in place.
        probs = logits.sub_(log_normaliser[:, None]).exp_()
        probs[rows[: y.shape[0]], targets] -= 1.0
        probs.mul_(valid[:, None])
        grad_logits = probs.to(projected.dtype)
        if grad_hidden is not None:
            grad_hidden[start : start + chunk] = grad_logits @ weight.to(grad_logits.dtype)
        if grad_weight is not None and grad_logits.dtype == grad_weight.dtype:
            grad_weight.addmm_(grad_logits.t(), h)  # in place: no [V, D] temporary per chunk
        elif grad_weight is not None:  # low-precision matmul (autocast), accumulated in fp32
            grad_weight += grad_logits.t() @ h.to(grad_logits.dtype)
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE over tokens; forward leaves the gradients of both inputs ready for backward to scale."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        total, grad_hidden, grad_weight = _chunked_loss(hidden, weight, labels, chunk, ctx.needs_input_grad)
        # Held on ctx rather than saved: backward then owns the only reference and can scale in place and hand
        # the buffers to autograd without copying them (a [V, D] copy per step, 100 MB at 140M).
        ctx.grads = (grad_hidden, grad_weight, weight.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        if ctx.grads is None:
            raise RuntimeError("recompute linear_cross_entropy for another backward (retain_graph is not supported).")
        grad_hidden, grad_weight, weight_dtype = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None
