"""Naive reference implementations, written independently of the library for the tests to compare against.

Everything here is deliberately slow and explicit: attention as softmax(QKᵀ/√D + mask)·V, rotary as a
complex multiplication, the loop executed the official way (every row runs the batch maximum and is
frozen with a mask), truncated backprop by an explicit `torch.no_grad()` block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from parcae import DepthPlan, Parcae
from parcae.model.layers import Block


def rms(x: Tensor, weight: Tensor | None = None, eps: float | None = None) -> Tensor:
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def rotate(x: Tensor, base: float) -> Tensor:
    """Rotary embedding on [B, L, H, D]: channels (i, i + D/2) form the complex number rotated by pos·θ_i."""
    seq_len, dim = x.shape[1], x.shape[-1]
    half = dim // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / dim)
    angle = torch.arange(seq_len, dtype=torch.float64)[:, None] * theta[None, :]
    rotation = torch.polar(torch.ones_like(angle), angle).to(torch.complex64)[None, :, None, :]
    z = torch.complex(x[..., :half].float(), x[..., half:].float()) * rotation
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def block_forward(block: Block, x: Tensor, base: float, eps: float, value_embed: Tensor | None) -> Tensor:
    attn = block.attn
    batch, seq_len, _ = x.shape
    xn = rms(x, block.attn_norm.weight, eps)
    q = (xn @ attn.q_proj.weight.T).view(batch, seq_len, attn.n_heads, attn.head_dim)
    k = (xn @ attn.k_proj.weight.T).view(batch, seq_len, attn.n_kv_heads, attn.head_dim)
    v = (xn @ attn.v_proj.weight.T).view(batch, seq_len, attn.n_kv_heads, attn.head_dim)
    if value_embed is not None:
        gate = 2 * torch.sigmoid(xn[..., :32] @ attn.ve_gate.weight.T)
        v = v + gate[..., None] * value_embed.view_as(v)
    if attn.qk_norm:
        q, k = rms(q), rms(k)
    q, k = rotate(q, base), rotate(k, base)
    group = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(attn.head_dim)
    future = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq_len, -1)
    x = x + out @ attn.out_proj.weight.T
    xn = rms(x, block.mlp_norm.weight, eps)
    mlp = block.mlp
    if mlp.gate_proj is not None:
        hidden = F.silu(xn @ mlp.gate_proj.weight.T) * (xn @ mlp.up_proj.weight.T)
    else:
        hidden = 0.5 * torch.relu(xn @ mlp.up_proj.weight.T) ** 2
    return x + hidden @ mlp.down_proj.weight.T


def inject(model: Parcae, h: Tensor, e: Tensor) -> Tensor:
    """Āh + B̄e, written from the paper's formulas."""
    inj, kind = model.injection, model.config.injection
    if kind == "add":
        return h + e
    if kind == "linear":
        return torch.cat([h, e], dim=-1) @ inj.weight.T
    dt = F.softplus(inj.dt_bias)
    a = torch.exp(inj.A_log)
    gain = (1 - torch.exp(-dt * a)) / a if kind == "diagonal-zoh" else dt
    return torch.exp(-dt * a) * h + gain * (e @ inj.B.T)


def forward(
    model: Parcae,
    ids: Tensor,
    plan: DepthPlan | None,
    h0: Tensor | None,
    labels: Tensor | None = None,
    truncate: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The whole model, official-style: masked loop over the batch maximum. Returns (logits, loss)."""
    cfg = model.config
    ve = {int(i): table.weight[ids] for i, table in model.value_embeds.items()}
    x = model.embed.weight[ids]
    for i, block in enumerate(model.prelude):
        x = block_forward(block, x, cfg.rope_base, cfg.norm_eps, ve.get(i))
    if cfg.is_looped:
        e = rms(x, model.prelude_norm.weight, cfg.norm_eps) if model.prelude_norm is not None else x

        def core(h: Tensor) -> Tensor:
            y = inject(model, h, e)
            for j, block in enumerate(model.core):
                y = block_forward(block, y, cfg.rope_base, cfg.norm_eps, ve.get(cfg.n_prelude + j))
            return y

        def active(counts: Tensor, step: int) -> Tensor:
            mask = counts > step
            return mask[:, None, None] if mask.dim() == 1 else mask[..., None]

        h = h0
        with torch.set_grad_enabled(not truncate and torch.is_grad_enabled()):
            for step in range(int(plan.no_grad.max())):
                h = torch.where(active(plan.no_grad, step), core(h), h)
        for step in range(int(plan.grad.max())):
            h = torch.where(active(plan.grad, step), core(h), h)
        x = h @ model.readout.weight.T
    offset = cfg.n_prelude + cfg.n_core
    for j, block in enumerate(model.coda):
        x = block_forward(block, x, cfg.rope_base, cfg.norm_eps, ve.get(offset + j))
    logits = rms(x, model.final_norm.weight, cfg.norm_eps) @ model.lm_head.weight.T
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return logits, loss
