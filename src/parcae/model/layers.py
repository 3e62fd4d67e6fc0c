"""Transformer building blocks: RMSNorm, rotary embeddings, attention, MLP and the pre-norm block.

Every block is the plain pre-norm residual block of the paper (Table 18):
`x ← x + Attn(norm₁(x)); x ← x + MLP(norm₂(x))`. Attention uses PyTorch's
`scaled_dot_product_attention` (causal, GQA-capable), parameter-free QK-norm and optional gated
value embeddings (nanochat style).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import VE_GATE_CHANNELS

if TYPE_CHECKING:
    from .cache import LayerKV


# Cached attention on CUDA avoids cuDNN's SDPA: it builds an execution plan for every new key length, i.e. every
# decode step (≈ 5 ms of CPU per call on an H200, more than the whole step's GPU work); these need no plan.
_CACHED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_Forward = TypeVar("_Forward", bound=Callable[..., Any])


def without_cudnn_attention(forward: _Forward) -> _Forward:
    """Run a cached forward (`forward(self, input_ids, ...)`) with `_CACHED_SDPA` on CUDA: the backends are set once
    per forward, not per attention call (a decode step makes layers × iterations of them)."""

    @functools.wraps(forward)
    def wrapped(self: Any, input_ids: Tensor, *args: Any, **kwargs: Any) -> Any:
        context = sdpa_kernel(_CACHED_SDPA) if input_ids.is_cuda else contextlib.nullcontext()
        with context:
            return forward(self, input_ids, *args, **kwargs)

    return wrapped  # type: ignore[return-value]


class RMSNorm(nn.Module):
    """RMS normalisation with a learnable gain (init 1); statistics in fp32 for low-precision inputs."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight.type_as(x)


class Rotary(nn.Module):
    """Rotary position embedding tables (cos, sin), computed once for `max_seq_len` positions.

    Layout: *rotate-half* — channel i is paired with channel i + D/2 and rotated by angle
    pos·θ^(−2i/D). The official code uses the interleaved (GPT-J) layout, pairing (2i, 2i+1); the two
    are the same function up to a fixed permutation of each head's q/k channels, which
    `parcae.interop` applies to imported weights. Rotate-half needs no interleave/stack per call.
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        # Not persistent: derived from the config, so checkpoints never carry it.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def tables(self, seq_len: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        """(cos, sin) of shape [seq_len, head_dim/2] for positions offset … offset+seq_len−1."""
        return self.cos[offset : offset + seq_len], self.sin[offset : offset + seq_len]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, L, H, D] by the (cos, sin) tables [L, D/2] or, per row, [B, L, D/2] (rotate-half layout).

    Per-row tables serve left-padded batches, where a column holds a different position in each row.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with QK-norm, GQA and an optional value-embedding gate."""

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm: bool, value_gate: bool
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qk_norm = qk_norm
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        # gate = 2·sigmoid(W·x[:32]) per kv-head, in (0, 2): 1 at W = 0, so the gate starts neutral-ish.
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, n_kv_heads, bias=False) if value_gate else None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, value_embed: Tensor | None = None, kv: LayerKV | None = None
    ) -> Tensor:
        """Causal attention over x; with `kv`, x is a chunk appended to the cached keys/values (inference)."""
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        if value_embed is not None:
            assert self.ve_gate is not None, "value embedding given to a layer without a gate"
            gate = 2.0 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embed.view_as(v)
        if self.qk_norm:
            # Parameter-free and rotation-invariant, so its order relative to RoPE does not matter.
            q = F.rms_norm(q, (self.head_dim,))
            k = F.rms_norm(k, (self.head_dim,))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask, causal = None, True
        if kv is not None:  # write this chunk into the cache, attend over everything cached so far
            k, v = kv.update(k, v)
            mask, causal = kv.attn_mask, kv.is_causal
        gqa = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, **gqa)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class HalfReluSquare(torch.autograd.Function):
    """0.5·relu(z)² (the official ReLU², ½ included) with a one-pass backward: ∂/∂z = relu(z).

    Autograd's chain for the composite (relu → pow → mul) makes three passes over the widest activation
    in the block going backward; this makes one, and two in-place passes forward. Saving z (not relu(z))
    keeps double backward and forward-mode AD exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor) -> Tensor:
        r = F.relu(z)
        return r.mul_(r).mul_(0.5)

    @staticmethod
    def setup_context(ctx, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return grad * F.relu(z)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        return tangent * F.relu(z)


class MLP(nn.Module):
    """`relu2`: down(½·relu(up(x))²) — the official ReLU² keeps the ½. `swiglu`: down(silu(gate(x))·up(x))."""

    def __init__(self, d_model: int, d_hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False) if kind == "swiglu" else None
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is not None:
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif torch.compiler.is_compiling():  # the compiler fuses the composite; dynamo cannot trace a custom jvp
            hidden = 0.5 * F.relu(self.up_proj(x)).square()
        else:
            hidden = HalfReluSquare.apply(self.up_proj(x))
        return self.down_proj(hidden)


class Block(nn.Module):
    """Pre-norm transformer block: no layer scales, no sandwich norm."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        d_mlp: int,
        *,
        mlp: str,
        qk_norm: bool,
        value_gate: bool,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads, head_dim, qk_norm, value_gate)
        self.mlp_norm = RMSNorm(d_model, norm_eps)
        self.mlp = MLP(d_model, d_mlp, mlp)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, value_embed: Tensor | None = None, kv: LayerKV | None = None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, value_embed, kv)
        return x + self.mlp(self.mlp_norm(x))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Paper init: σ-scaled orthogonal inputs, zero output projections, unit norm gains."""
        for linear in (
            self.attn.q_proj,
            self.attn.k_proj,
            self.attn.v_proj,
            self.mlp.up_proj,
            self.mlp.gate_proj,
        ):
            if linear is not None:
                scaled_orthogonal_(linear.weight, std)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.mlp.down_proj.weight)
        if self.attn.ve_gate is not None:
            self.attn.ve_gate.reset_parameters()  # torch default (Kaiming-uniform), as the official code
        self.attn_norm.weight.fill_(1.0)
        self.mlp_norm.weight.fill_(1.0)


def scaled_orthogonal_(weight: Tensor, std: float) -> Tensor:
    """Orthogonal init with every singular value σ·√max(rows, cols), so the per-entry std is ≈ σ.

    This is the official `init_orthogonal` scheme (docs/official-format.md). No-op on the meta device.
    """
    if weight.is_meta:
        return weight
    return nn.init.orthogonal_(weight, gain=std * math.sqrt(max(weight.shape)))
