"""The OpenAI-layout text transformer of our CLIP models (models.py): its config (TextCfg) and
pre-norm blocks (causal, or bidirectional as CLIPA's) with nn.MultiheadAttention's parameter
names, run through SDPA, so that OpenAI / OpenCLIP text towers load key for key (interop.py)."""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class TextCfg:
    vocab_size: int = 49408      # OpenAI CLIP BPE vocabulary
    context_length: int = 77     # tokens incl. SOT/EOT
    width: int = 512             # residual stream width
    heads: int = 8               # attention heads
    layers: int = 12             # transformer blocks (upstream --transformer-layers)
    act: str = 'gelu'            # 'gelu' or 'quick_gelu' (the OpenAI checkpoints' activation)
    mask: str = 'causal'         # attention: 'causal' or 'none' (CLIPA: bidirectional, padding included)
    pool: str = 'eot'            # pooled token: 'eot' (the CLIP BPE's end token, its top id) or 'last'
    hf_tokenizer: str = ''       # the Hugging Face tokenizer it was built for ('': the CLIP BPE; clipa.py)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names, run through SDPA
    (causal unless `causal=False`)."""

    def __init__(self, width, heads, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)      # [B, L, 3W]
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)   # [B, H, L, W/H]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block. In "local" mode (CL2L text views) the input gets dropout and the
    residual branches stochastic depth."""

    def __init__(self, width, heads, act, dropout=0.0, drop_path=0.0, causal=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ('c_fc', nn.Linear(width, 4 * width)),
            ('gelu', QuickGELU() if act == 'quick_gelu' else nn.GELU()),
            ('c_proj', nn.Linear(4 * width, width))]))
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, local=False):
        if local:
            x = self.dropout(x)
            x = x + self.drop_path(self.attn(self.ln_1(x)))
            return x + self.drop_path(self.mlp(self.ln_2(x)))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextCfg, dropout=0.0, drop_path=0.0):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"text width {cfg.width} is not divisible by {cfg.heads} heads")
        if cfg.act not in ('gelu', 'quick_gelu'):
            raise ValueError(f"unknown text activation {cfg.act!r}; valid: gelu, quick_gelu")
        if cfg.mask not in ('causal', 'none') or cfg.pool not in ('eot', 'last'):
            raise ValueError(f"text mask {cfg.mask!r} / pool {cfg.pool!r}; valid: causal, none / eot, last")
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.act, dropout, drop_path, cfg.mask == 'causal')
            for _ in range(cfg.layers))
        self.grad_checkpointing = False

    def forward(self, x, local=False):
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, local, use_reentrant=False)
            else:
                x = block(x, local)
        return x
