"""Fused LM head + cross entropy: the loss and its gradients in one chunked pass, without full logits.

The plain path, `cross_entropy(lm_head(x).float(), y)`, keeps [N, V] fp32 logits and their log-softmax for
backward: at the official micro-batch (32 × 2048 tokens, vocabulary 32768) that is ≈ 8.6 GB of logits alone.
Checkpointing the head in chunks saves the memory but recomputes every logit.

Here each chunk of tokens computes its logits once, takes the loss, turns the logits *in place* into
∂loss/∂logits = softmax − one-hot, and immediately contracts that with the weight and the hidden states. Only
∂loss/∂hidden [N, D] and ∂loss/∂W [V, D] outlive the chunk, and backward merely scales them by the incoming
gradient. Same matmuls as the plain path (one forward, two backward), no recompute, peak extra memory one
chunk of logits; on CPU as fast as the plain head (`python benchmarks/op_speed.py head`), so the gain is memory.
The gradient is computed even when backward never runs, so eval calls (no grad) take the loss-only path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
# Logits held at once (elements; 32 Mi fp32 = 128 MiB). Large on purpose: every chunk adds its ∂W into the
# [V, D] accumulator, so small chunks multiply that traffic (`python benchmarks/op_speed.py head`, CPU, V = 32,768:
# 2 Mi elements per chunk made the head 1.36–1.44× slower than unchunked; 32 Mi matches it, 0.97–1.02×).
CHUNK_ELEMENTS = 1 << 25


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_elements: int | None = None) -> Tensor:
    """Mean cross entropy of `hidden @ weight.T` against `labels`, over labels ≠ IGNORE_INDEX (0 if none).

    hidden [..., D], weight [V, D], labels [...] (same leading shape). Logits are computed in fp32 from the
    matmul's output dtype (bf16 under autocast), as `F.cross_entropy(logits.float(), …)` would see them.
    """
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    chunk = max(1, (chunk_elements or CHUNK_ELEMENTS) // weight.shape[0])
    valid = flat_labels != IGNORE_INDEX
    if bool(((flat_labels < 0) | (flat_labels >= weight.shape[0]))[valid].any()):
        raise IndexError(f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}.")
    count = valid.sum().clamp(min=1)
    if flat_labels.shape[0] <= chunk:  # one chunk: the plain head is as fast and autograd's own numerics
        return mean_cross_entropy(F.linear(flat_hidden, weight).float(), flat_labels)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(flat_hidden, weight, flat_labels, chunk)
    else:
        total = sum(
            (_chunk_loss(F.linear(flat_hidden[s : s + chunk], weight).float(), flat_labels[s : s + chunk])[0]
             for s in range(0, flat_labels.shape[0], chunk)),
            flat_hidden.new_zeros((), dtype=torch.float32),
        )  # fmt: skip
    return total / count


def mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross entropy of logits [..., V] over labels ≠ IGNORE_INDEX (0 when there are none)."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _chunk_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Summed CE of one chunk of fp32 logits; also (log-sum-exp, valid mask, safe targets) for its gradient."""
    valid = labels != IGNORE_INDEX
    targets = torch.where(valid, labels, 0)
    log_normaliser = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    return ((log_normaliser - target_logits) * valid).sum(), log_normaliser, valid, targets


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed CE over tokens; forward leaves the gradients of both inputs ready for backward to scale."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        # Accumulated over chunks in fp32 even when the matmuls run in bf16, as autograd would accumulate.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        rows = torch.arange(chunk, device=hidden.device)
        for start in range(0, labels.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            projected = F.linear(h, weight)  # autocast's dtype, if any
            logits = projected.float()
            loss, log_normaliser, valid, targets = _chunk_loss(logits, y)
            total += loss
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
        # Held on ctx rather than saved: backward then owns the only reference and can scale in place and hand
        # the buffers to autograd without copying them (a [V, D] copy per step, 100 MB at 140M).
        ctx.grads = (grad_hidden, grad_weight, weight.dtype)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        if ctx.grads is None:
            raise RuntimeError(
                "linear_cross_entropy: its gradients were handed over by the first backward; recompute the loss "
                "for another backward (retain_graph is not supported)."
            )
        grad_hidden, grad_weight, weight_dtype = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None
