"""Model zoo: `<base>_<backbone>_<method>` names, timm image towers, a CLIP text transformer.

    >>> import models
    >>> models.list_models('CLIP_*')
    >>> model = models.create_model('CLIP_VITB16_CLIP', embed_dim=512)

Every name is parsed in `parse_model_name`; each part is looked up in its registry, which
raises `ValueError` listing the valid choices. Behaviour comes from the registered configs.
"""
import fnmatch
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from utils import Registry


# ----------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class TextCfg:
    vocab_size: int = 49408      # OpenAI CLIP BPE vocabulary
    context_length: int = 77     # tokens incl. SOT/EOT
    width: int = 512             # residual stream width
    heads: int = 8               # attention heads
    layers: int = 12             # transformer blocks (upstream --transformer-layers)
    act: str = 'gelu'            # 'gelu' or 'quick_gelu' (the OpenAI checkpoints' activation)


@dataclass(frozen=True)
class BackboneCfg:
    timm_name: str               # timm architecture built with pretrained=False ('' = `builder`)
    builder: Optional[Callable] = None  # non-timm tower: builder(image_size) -> nn.Module
    image_size: int = 224        # native resolution
    timm_kwargs: dict = field(default_factory=dict)  # overrides passed to timm.create_model
    no_stem_pool: bool = False   # drop the ResNet stem max-pool (small inputs)
    channels_last: bool = False  # convolutional towers run faster in NHWC on CPU and GPU
    takes_img_size: bool = False  # the timm constructor needs the input size (ViTs)
    text: TextCfg = TextCfg()    # default text tower paired with this backbone
    proj_type: str = 'linear'    # default image projection: 'linear' or 'mlp'
    embed_dim: int = 256         # default joint embedding size (upstream default 256)


@dataclass(frozen=True)
class MethodCfg:
    loss: str                    # key of losses.LOSSES
    bases: tuple                 # bases this method makes sense with
    why_not: str = ''            # explanation when used with another base


BASES = Registry('base')
BACKBONES = Registry('backbone')
METHODS = Registry('method')

_TINY_TEXT = TextCfg(width=128, heads=4, layers=2)
for _name, _cfg in {
    'R50': BackboneCfg('resnet50', channels_last=True),
    'CNEXTT': BackboneCfg('convnext_tiny', channels_last=True),
    'CNEXTS': BackboneCfg('convnext_small', channels_last=True),
    'VITS16': BackboneCfg('vit_small_patch16_224', takes_img_size=True),
    'VITS16MOCO': BackboneCfg('vit_small_patch16_224', takes_img_size=True, timm_kwargs={'num_heads': 12}),
    'VITS32': BackboneCfg('vit_small_patch32_224', takes_img_size=True),
    'VITB16': BackboneCfg('vit_base_patch16_224', takes_img_size=True),
    'VITB32': BackboneCfg('vit_base_patch32_224', takes_img_size=True),
    'VITL16': BackboneCfg('vit_large_patch16_224', takes_img_size=True),
    # small presets for the demo and the tests (see ENVIRONMENT.md's calibration note)
    'TINYCNN': BackboneCfg('', builder=lambda image_size: TinyCNN(), image_size=64,
                           channels_last=True, text=_TINY_TEXT, proj_type='mlp', embed_dim=128),
    'TINYVIT': BackboneCfg('vit_tiny_patch16_224', image_size=32, takes_img_size=True,
                           timm_kwargs={'patch_size': 8, 'embed_dim': 64, 'depth': 2,
                                        'num_heads': 2},
                           text=TextCfg(width=64, heads=2, layers=2), embed_dim=64),
}.items():
    BACKBONES.register(_name, _cfg)

METHODS.register('CLIP', MethodCfg(loss='CLIP', bases=('CLIP',)))


def parse_model_name(name):
    """'CLIP_VITB16_CLIP' -> ('CLIP', 'VITB16', 'CLIP'), each part validated."""
    parts = name.split('_')
    if len(parts) != 3:
        raise ValueError(f"model name {name!r} must be <base>_<backbone>_<method>, "
                         f"e.g. CLIP_VITB16_CLIP; see list_models()")
    base, backbone, method = parts
    BASES.get(base)
    BACKBONES.get(backbone)
    mcfg = METHODS.get(method)
    if base not in mcfg.bases:
        raise ValueError(f"method {method} does not go with base {base} "
                         f"(valid bases: {', '.join(mcfg.bases)}) {mcfg.why_not}".rstrip())
    return base, backbone, method


def list_models(pattern='*'):
    names = [f'{b}_{bb}_{m}' for b in BASES for bb in BACKBONES for m in METHODS
             if b in METHODS[m].bases]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def create_model(name, **overrides):
    """Build a model by name. Overrides set to None are dropped, so defaults live in the configs.

    Accepted overrides: embed_dim, proj_type, image_size, transformer_width,
    transformer_heads, transformer_layers, context_length, text_act.
    """
    base, backbone, _ = parse_model_name(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = BACKBONES.get(backbone)
    text_keys = {'transformer_width': 'width', 'transformer_heads': 'heads',
                 'transformer_layers': 'layers', 'context_length': 'context_length',
                 'text_act': 'act'}
    text_cfg = replace(cfg.text, **{text_keys[k]: overrides.pop(k)
                                    for k in list(overrides) if k in text_keys})
    model = BASES.get(base)(
        backbone=cfg, text_cfg=text_cfg,
        embed_dim=overrides.pop('embed_dim', cfg.embed_dim),
        proj_type=overrides.pop('proj_type', cfg.proj_type),
        image_size=overrides.pop('image_size', cfg.image_size))
    if overrides:
        raise ValueError(f"unknown model overrides {sorted(overrides)}; valid: "
                         f"embed_dim, proj_type, image_size, {', '.join(text_keys)}")
    model.model_name = name
    return model


def create_model_from_flags(name, flags):
    """Build from main.py's flags (a dict or Namespace, e.g. a checkpoint's `args`)."""
    flags = flags if isinstance(flags, dict) else vars(flags)
    return create_model(
        name, embed_dim=flags.get('embed_dim'), proj_type=flags.get('clip_proj_type'),
        image_size=flags.get('image_size'), transformer_layers=flags.get('transformer_layers'),
        transformer_width=flags.get('transformer_width'),
        transformer_heads=flags.get('transformer_heads'),
        context_length=flags.get('context_length'))


# ----------------------------------------------------------------------------- towers

class TinyCNN(nn.Module):
    """The demo's image tower: a plain 4-stage CNN with global average pooling.

    timm has nothing this small; measured here (ENVIRONMENT.md), it learns shape on `shapes`
    in a few CPU-minutes where a tiny ViT or a 1-block-per-stage ResNet learn too slowly.
    """

    def __init__(self, widths=(16, 32, 64, 128)):
        super().__init__()

        def conv_bn(cin, cout, k=3, stride=1, pad=1):
            return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True)]
        layers = conv_bn(3, widths[0], k=4, stride=2, pad=1)             # [B, 16, H/2, W/2]
        cin = widths[0]
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))                           # H/4, H/8, H/16
            layers += conv_bn(cin, w) + conv_bn(w, w)
            cin = w
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward(self, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = checkpoint(self.features, x, use_reentrant=False)
        else:
            x = self.features(x)
        return x.mean(dim=(2, 3))                                         # [B, C]


def build_image_tower(cfg: BackboneCfg, image_size: int):
    if cfg.builder is not None:
        return cfg.builder(image_size)
    kwargs = dict(cfg.timm_kwargs)
    if cfg.takes_img_size:
        kwargs['img_size'] = image_size
    tower = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, **kwargs)
    if cfg.no_stem_pool:
        tower.maxpool = nn.Identity()
    return tower


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names, run through SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, L, W = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)      # [B, L, 3W]
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # [B, H, L, W/H]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, W))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ('c_fc', nn.Linear(width, 4 * width)),
            ('gelu', QuickGELU() if act == 'quick_gelu' else nn.GELU()),
            ('c_proj', nn.Linear(4 * width, width))]))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextCfg):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"text width {cfg.width} is not divisible by {cfg.heads} heads")
        if cfg.act not in ('gelu', 'quick_gelu'):
            raise ValueError(f"unknown text activation {cfg.act!r}; valid: gelu, quick_gelu")
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.act) for _ in range(cfg.layers))
        self.grad_checkpointing = False

    def forward(self, x):
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def mlp(in_dim, hidden_dim, out_dim, layers=2, last_bn=False, last_bn_affine=True):
    """Projector MLP: (Linear-BN-ReLU) x (layers-1), Linear, optional final BN."""
    mods, dim = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                 nn.ReLU(inplace=True)]
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*mods)


# ----------------------------------------------------------------------------- CLIP

class CLIP(nn.Module):
    """Image tower + projection, text transformer + projection, a learnable logit scale.

    Text parameters use the OpenAI CLIP state-dict names (`token_embedding`,
    `positional_embedding`, `transformer.resblocks.N.*`, `ln_final`, `text_projection`).
    """
    LOGIT_SCALE_MAX = 100.0

    def __init__(self, backbone: BackboneCfg, text_cfg: TextCfg, embed_dim: int,
                 proj_type: str = 'linear', image_size: int = 224):
        super().__init__()
        if proj_type not in ('linear', 'mlp'):
            raise ValueError(f"unknown projection type {proj_type!r}; valid: linear, mlp")
        self.backbone_cfg, self.text_cfg, self.embed_dim = backbone, text_cfg, embed_dim
        self.image_size = image_size
        self.visual = build_image_tower(backbone, image_size)
        vision_width = self.visual.num_features
        self.image_projection = (nn.Linear(vision_width, embed_dim, bias=False)
                                 if proj_type == 'linear' else
                                 mlp(vision_width, vision_width, embed_dim, layers=2))
        self.token_embedding = nn.Embedding(text_cfg.vocab_size, text_cfg.width)
        self.positional_embedding = nn.Parameter(
            torch.empty(text_cfg.context_length, text_cfg.width))
        self.transformer = Transformer(text_cfg)
        self.ln_final = nn.LayerNorm(text_cfg.width)
        self.text_projection = nn.Parameter(torch.empty(text_cfg.width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._init_text()
        if backbone.channels_last:
            self.visual.to(memory_format=torch.channels_last)

    def _init_text(self):
        cfg = self.text_cfg
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = cfg.width ** -0.5 * (2 * cfg.layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=cfg.width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * cfg.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)
        if isinstance(self.image_projection, nn.Linear):
            nn.init.normal_(self.image_projection.weight, std=self.visual.num_features ** -0.5)

    # -- towers
    def image_features(self, image):
        if self.backbone_cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.visual(image)                                       # [B, vision_width]

    def text_features(self, text):
        # Causal attention + EOT pooling: nothing after the last EOT can change the pooled
        # feature, so trimming the padding is exact and saves most of the text compute.
        eot = text.argmax(dim=-1)                                       # EOT has the top id
        length = int(eot.max()) + 1
        x = self.token_embedding(text[:, :length]) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x))                          # [B, L, width]
        return x[torch.arange(x.shape[0], device=x.device), eot]        # [B, width]

    def encode_image(self, image, normalize=True):
        z = self.image_projection(self.image_features(image))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, text, normalize=True):
        z = self.text_features(text) @ self.text_projection
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, batch):
        return {'image_embed': self.encode_image(batch['image']),
                'text_embed': self.encode_text(batch['text']),
                'logit_scale': self.logit_scale.exp()}

    # -- training hooks
    @torch.no_grad()
    def clamp_logit_scale(self):
        """Called after each optimizer step: keep exp(logit_scale) in [1, 100]."""
        for name, p in self.named_parameters():
            if name.endswith('logit_scale'):
                p.clamp_(0, math.log(self.LOGIT_SCALE_MAX))

    def set_grad_checkpointing(self, enable=True):
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def no_weight_decay(self):
        """Names of matrices that are embeddings (no weight decay), besides 1-d params."""
        names = {'token_embedding.weight', 'positional_embedding', 'logit_scale'}
        names |= {f'visual.{n}' for n in getattr(self.visual, 'no_weight_decay', set)()}
        return names


BASES.register('CLIP', CLIP)


def param_groups(model, weight_decay):
    """AdamW groups: no decay for biases, norms (all 1-d params), embeddings, logit scale."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
