"""Transformer blocks: the paper's pre-norm `x ← x + Attn(norm₁(x)); x ← x + MLP(norm₂(x))` (Table 18), with RMSNorm,
rotary embeddings, parameter-free QK-norm, GQA and optional gated value embeddings (nanochat style)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VE_GATE_CHANNELS, ParcaeConfig

if TYPE_CHECKING:
    from .cache import LayerKV


class RMSNorm(nn.Module):
    """RMS normalisation with a learnable gain (init 1); statistics in fp32 for low-precision inputs."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight.type_as(x)


class Rotary(nn.Module):
    """Rotary tables (cos, sin), *rotate-half* layout: channel i pairs with i + D/2 at angle pos·θ^(−2i/D); the official
    interleaved layout differs by a fixed permutation of q/k channels, which `parcae.interop` applies on import."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)  # from the config: never in checkpoints
        self.register_buffer("sin", angles.sin(), persistent=False)

    def tables(self, seq_len: int, offset: int | Tensor = 0) -> tuple[Tensor, Tensor]:
        """(cos, sin) [seq_len, D/2] from position `offset`, or [B, L, D/2] at per-token positions `offset` [B, L]."""
        index = offset if isinstance(offset, Tensor) else slice(offset, offset + seq_len)
        return self.cos[index], self.sin[index]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, L, H, D] by tables [L, D/2], or per row [B, L, D/2] (left-padded batches), rotate-half layout."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with QK-norm, GQA and an optional value-embedding gate."""

    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm: bool, value_gate: bool
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.qk_norm = n_heads, n_kv_heads, head_dim, qk_norm
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, n_kv_heads, bias=False) if value_gate else None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, value_embed: Tensor | None = None, kv: LayerKV | None = None
    ) -> Tensor:
        """Causal attention over x; with `kv`, x is a chunk appended to the cached keys/values (inference)."""
        batch, seq_len, _ = x.shape
        q, k, v = (proj(x).view(batch, seq_len, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if value_embed is not None:
            assert self.ve_gate is not None, "value embedding given to a layer without a gate"
            gate = 2.0 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # per kv-head, in (0, 2): 1 at W = 0
            v = v + gate.unsqueeze(-1) * value_embed.view_as(v)
        if self.qk_norm:  # parameter-free and rotation-invariant: its order relative to RoPE does not matter
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask, causal = None, True
        if kv is not None:  # write this chunk into the cache, attend over everything cached so far
            k, v = kv.update(k, v)
            mask, causal = kv.chunk.attn_mask, kv.chunk.is_causal
        gqa = self.n_kv_heads != self.n_heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class HalfReluSquare(torch.autograd.Function):
    """0.5·relu(z)² (the official ReLU²) with a one-pass backward ∂/∂z = relu(z), where autograd's relu → pow → mul
    makes three over the widest activation. Saving z (not relu(z)) keeps double backward and forward-mode AD exact."""

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

    jvp = backward  # a tangent is scaled by ∂/∂z = relu(z) exactly as a gradient is


class MLP(nn.Module):
    """`relu2`: down(½·relu(up(x))²) — the official ReLU² keeps the ½. `swiglu`: down(silu(gate(x))·up(x))."""

    def __init__(self, d_model: int, d_hidden: int, kind: str) -> None:
        super().__init__()
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
    """Pre-norm transformer block (no layer scales, no sandwich norm) of the core (width d_state) or prelude/coda."""

    def __init__(self, cfg: ParcaeConfig, *, core: bool, value_gate: bool) -> None:
        super().__init__()
        width = cfg.d_state if core else cfg.d_model
        heads, kv_heads = (cfg.core_heads, cfg.core_kv_heads) if core else (cfg.n_heads, cfg.n_kv_heads)
        self.attn_norm = RMSNorm(width, cfg.norm_eps)
        self.attn = Attention(width, heads, kv_heads, cfg.head_dim, cfg.qk_norm, value_gate)
        self.mlp_norm = RMSNorm(width, cfg.norm_eps)
        self.mlp = MLP(width, cfg.core_d_mlp if core else cfg.d_mlp, cfg.mlp)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, value_embed: Tensor | None = None, kv: LayerKV | None = None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, value_embed, kv)
        return x + self.mlp(self.mlp_norm(x))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Paper init: σ-scaled orthogonal inputs, zero output projections, unit norm gains."""
        attn, mlp = self.attn, self.mlp
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.up_proj, mlp.gate_proj):
            if linear is not None:
                scaled_orthogonal_(linear.weight, std)
        nn.init.zeros_(attn.out_proj.weight)
        nn.init.zeros_(mlp.down_proj.weight)
        if attn.ve_gate is not None:
            attn.ve_gate.reset_parameters()  # torch default (Kaiming-uniform), as the official code
        self.attn_norm.weight.fill_(1.0)
        self.mlp_norm.weight.fill_(1.0)


def scaled_orthogonal_(weight: Tensor, std: float) -> Tensor:
    """Orthogonal init, singular values σ·√max(rows, cols): entry std ≈ σ (official `init_orthogonal`); meta: no-op."""
    return weight if weight.is_meta else nn.init.orthogonal_(weight, gain=std * math.sqrt(max(weight.shape)))
