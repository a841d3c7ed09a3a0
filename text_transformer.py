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

    def forward(self, x, past=None):
        """`past`: (keys, values, allowed) of prefixes that the rows of x continue (causal only):
        keys / values [B, H, Lp, W/H] (`keys_values`), allowed [B, 1, L, Lp + L] which prefix
        and own positions each position attends to (Transformer.continue_prefix)."""
        B, L, W = x.shape
        q, k, v = self._qkv(x)
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)   # [B, H, L, W/H]
        else:
            keys, values, allowed = past
            y = F.scaled_dot_product_attention(q, torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2),
                                               attn_mask=allowed)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))

    def _qkv(self, x):
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)      # [B, L, 3W]
        return qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)

    def keys_values(self, x):
        """-> (keys, values) [B, H, L, W/H] of x's positions: what a continuation attends to."""
        _, k, v = self._qkv(x)
        return k, v


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

    def forward(self, x, local=False, past=None):
        if local:
            x = self.dropout(x)
            x = x + self.drop_path(self.attn(self.ln_1(x)))
            return x + self.drop_path(self.mlp(self.ln_2(x)))
        x = x + self.attn(self.ln_1(x), past)
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

    @torch.no_grad()
    def prefix_cache(self, x):
        """x: [N, Lp, width], N prefixes shared by many sequences (causal blocks only; a
        shorter prefix padded at its end) -> each block's (keys, values) of them."""
        cache = []
        for block in self.resblocks:
            cache.append(block.attn.keys_values(block.ln_1(x)))
            x = block(x)
        return cache

    @torch.no_grad()
    def continue_prefix(self, x, cache, which, lengths):
        """x: [B, L, width], sequences that continue prefix which[b] of `cache` (whose first
        lengths[b] positions are real; x's positional embeddings already offset by them) ->
        [B, L, width]: what the blocks give these positions of prefix + x, without running the
        prefixes again."""
        B, L, _ = x.shape
        prefix_len = cache[0][0].shape[2]
        real = torch.arange(prefix_len, device=x.device) < lengths[:, None]             # [B, Lp]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        allowed = torch.cat([real[:, None].expand(B, L, prefix_len), causal.expand(B, L, L)], dim=-1)[:, None]
        for block, (keys, values) in zip(self.resblocks, cache):
            x = block(x, past=(keys[which], values[which], allowed))
        return x


@torch.compiler.disable
def trimmed_length(eot):
    """Tokens to keep: up to the last EOT of the batch. A data-dependent size, so under
    --compile it runs eagerly (one clean graph break)."""
    return int(eot.max()) + 1


class SharedPrefixText:
    """Zero-shot prompts from cached template beginnings, for models.CLIP (its token_embedding,
    positional_embedding, transformer, ln_final, project_text and text_cfg)."""

    def shares_text_prefix(self):
        """True when prompts that begin with the same tokens can be encoded from one cached
        prefix (`encode_text_after_prefix`): our own causal, EOT-pooled text transformer."""
        return self.text_tower is None and (self.text_cfg.mask, self.text_cfg.pool) == ('causal', 'eot')

    @torch.no_grad()
    def text_prefixes(self, prefixes, lengths):
        """Beginnings shared by many prompts (zero-shot templates: "a photo of a"), run through
        the text tower once: prefixes [N, Lp] tokens, SOT first, row n's first lengths[n] real
        (the rest padding) -> a cache for `encode_text_after_prefix`."""
        if not self.shares_text_prefix():
            raise ValueError('text_prefixes needs a causal, EOT-pooled text transformer')
        x = self.token_embedding(prefixes) + self.positional_embedding[:prefixes.shape[1]]
        return {'keys_values': self.transformer.prefix_cache(x), 'lengths': lengths}

    @torch.no_grad()
    def encode_text_after_prefix(self, prefixes, which, rest, normalize=True, head='z'):
        """= encode_text(prefix which[b] + rest[b]) for each row b, up to float rounding:
        causal attention makes the prefix's positions the same in every prompt, so they come
        from the cache (`text_prefixes`). rest: [B, L] each prompt's remaining tokens, its EOT
        included, padded with 0."""
        starts = prefixes['lengths'][which]                             # [B]
        eot = rest.argmax(dim=-1)                                       # EOT has the top id
        length = trimmed_length(eot)
        positions = starts[:, None] + torch.arange(length, device=rest.device)
        x = self.token_embedding(rest[:, :length]) + self.positional_embedding[positions]
        x = self.transformer.continue_prefix(x, prefixes['keys_values'], which, starts)
        z = self.project_text(self.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot], head)
        return F.normalize(z, dim=-1) if normalize else z
