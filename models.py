"""Model zoo: `<base>_<backbone>_<method>` names, timm image towers, a CLIP text transformer
(text_transformer.py).

    >>> import models
    >>> models.list_models('CLIP_*')
    >>> model = models.create_model('CLIP_VITB16_CLIP', embed_dim=512)

Every name is parsed in `parse_model_name`; each part is looked up in its registry, which
raises `ValueError` listing the valid choices. Behaviour comes from the registered configs.
"""
import copy
import fnmatch
import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import clipa
import towers
import vpt
import vit_cvnets
from heads import HeadCfg, mlp, projector
from methods import METHODS, MethodSpec, check_flags
from text_transformer import SharedPrefixText, TextCfg, Transformer, trimmed_length
from utils import Registry


# ----------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class BackboneCfg:
    timm_name: str               # timm architecture built with pretrained=False ('' = `builder`)
    builder: Optional[Callable] = None  # non-timm tower: builder(image_size, **timm_kwargs) -> nn.Module
    image_size: int = 224        # native resolution
    timm_kwargs: dict = field(default_factory=dict)  # overrides passed to timm.create_model (or `builder`)
    no_stem_pool: bool = False   # drop the ResNet stem max-pool (small inputs)
    channels_last: bool = False  # convolutional towers run faster in NHWC on CPU and GPU
    takes_img_size: bool = False  # the timm constructor needs the input size (ViTs)
    text: TextCfg = TextCfg()    # default text tower paired with this backbone
    proj_type: str = 'linear'    # default image projection: 'linear' or 'mlp'
    embed_dim: int = 256         # default joint embedding size (upstream default 256)
    heads: dict = field(default_factory=dict)  # HeadCfg defaults for this preset (small heads)
    min_image_size: int = 1      # smallest input the tower takes (a ViT's patch, a CNN's stride)
    image_size_step: int = 1     # input sizes must be multiples of this (1: any size)
    proj_bias: bool = False      # the linear image projection has a bias (OpenAI's attention-pool c_proj)
    pool: str = ''               # ViTs: clipa.IMAGE_POOLS entry ('' = the timm model's own); a
                                 # builder tower with `pools`: one of them ('' = its first)
    pools: tuple = ()            # a builder tower's own poolings (builder(image_size, pool=...))
    train_pool: str = ''         # the pool main.py trains with when --image-pool is not given
                                 # (recorded in the checkpoint's args, so older ones rebuild as before)
    pool_heads: int = 8          # pool 'attn': heads (OpenCLIP's attn_pooler_heads default)
    builder_name: str = ''       # what the zoo table calls a `builder` tower

    @property
    def tower_name(self):
        return self.timm_name or self.builder_name

    @property
    def is_vit(self):
        """A ViT (timm's, or cvnets' on timm parts): patch tokens that --patch-dropout can drop."""
        return self.takes_img_size and self.tower_name.startswith(('vit_', 'cvnets_vit'))


def _openai_resnet(timm_name, image_size, text_width, embed_dim):
    """OpenAI's ModifiedResNet (timm's resnet*_clip: 3-conv stem, average-pool downsampling,
    attention pooling) with OpenAI's text width and embedding size. The attention pool's output
    projection (c_proj, with a bias) is our image projection, so its input, the pooled
    width*32 features, is the tower's output. Five halvings: sizes are multiples of 32."""
    return BackboneCfg(timm_name, image_size=image_size, takes_img_size=True, channels_last=True,
                       min_image_size=32, image_size_step=32, proj_bias=True, embed_dim=embed_dim,
                       text=TextCfg(width=text_width, heads=text_width // 64))


BASES = Registry('base')
BACKBONES = Registry('backbone')

_TINY_TEXT = TextCfg(width=128, heads=4, layers=2)
_TINY_HEADS = {'clip_hidden_dim': 512, 'barlip_hidden_dim': 512, 'barlip_proj_dim': 1024,
               'siamlip_hidden_dim': 512}
for _name, _cfg in {
    'R50': BackboneCfg('resnet50', channels_last=True),
    'CNEXTT': BackboneCfg('convnext_tiny', channels_last=True),
    'CNEXTS': BackboneCfg('convnext_small', channels_last=True),
    'VITS16': BackboneCfg('vit_small_patch16_224', takes_img_size=True, min_image_size=16),
    'VITS16MOCO': BackboneCfg('vit_small_patch16_224', takes_img_size=True, timm_kwargs={'num_heads': 12}, min_image_size=16),
    'VITS32': BackboneCfg('vit_small_patch32_224', takes_img_size=True, min_image_size=32),
    'VITB16': BackboneCfg('vit_base_patch16_224', takes_img_size=True, min_image_size=16),
    'VITB32': BackboneCfg('vit_base_patch32_224', takes_img_size=True, min_image_size=32),
    'VITL16': BackboneCfg('vit_large_patch16_224', takes_img_size=True, min_image_size=16),
    # OpenAI CLIP's ResNets (RN50 ... RN50x64: OpenAI's image size, width, depth, text width, embed dim)
    'RN50OAI': _openai_resnet('resnet50_clip', 224, 512, 1024),
    'RN101OAI': _openai_resnet('resnet101_clip', 224, 512, 512),
    'RN50X4OAI': _openai_resnet('resnet50x4_clip', 288, 640, 640),
    'RN50X16OAI': _openai_resnet('resnet50x16_clip', 384, 768, 768),
    'RN50X64OAI': _openai_resnet('resnet50x64_clip', 448, 1024, 1024),
    # OpenCLIP's ViT-*-CLIPA: timm's CLIP ViTs (LayerNorm eps 1e-5) without ln_pre, GAP after the final
    # LayerNorm, CLIPA's text tower (BERT WordPiece, 32 tokens, bidirectional, last-token pooling)
    **{name: BackboneCfg(timm_name, takes_img_size=True, min_image_size=14, pool='avg',
                         timm_kwargs={'pre_norm': False}, embed_dim=width,
                         text=TextCfg(32000, 32, width, heads, layers, mask='none', pool='last',
                                      hf_tokenizer='bert-base-uncased'))
       for name, timm_name, width, heads, layers in [
           ('VITL14CLIPA', 'vit_large_patch14_clip_224', 768, 12, 12),
           ('VITH14CLIPA', 'vit_huge_patch14_clip_224', 1024, 16, 24),
           ('VITBIGG14CLIPA', 'vit_gigantic_patch14_clip_224', 1280, 20, 32)]},
    # cvnets' CLIP image encoders (convolutional patch stem) with its recipes' text towers and
    # 512-d embeddings (examples/range_augment/clip/clip_vit_{base,huge}.yaml; interop.py import --from cvnets)
    'VITB16CV': BackboneCfg('', builder=partial(vit_cvnets.cvnets_vit, **vit_cvnets.MODES['base']),
                            builder_name='cvnets_vit_base', takes_img_size=True, min_image_size=16, embed_dim=512),
    'VITH16CV': BackboneCfg('', builder=partial(vit_cvnets.cvnets_vit, **vit_cvnets.MODES['huge']),
                            builder_name='cvnets_vit_huge', takes_img_size=True, min_image_size=16, embed_dim=512,
                            text=TextCfg(width=768, heads=12)),
    # small presets for the demo and the tests (sized so that `make demo` learns shape in ~5 CPU minutes)
    'TINYCNN': BackboneCfg('', builder=lambda image_size, pool='avg': TinyCNN(pool=pool), image_size=64,
                           min_image_size=16, builder_name='TinyCNN', channels_last=True, text=_TINY_TEXT,
                           proj_type='mlp', embed_dim=128, heads=_TINY_HEADS, pools=clipa.CNN_POOLS,
                           train_pool='avg-max'),
    'TINYVIT': BackboneCfg('vit_tiny_patch16_224', image_size=32, takes_img_size=True, min_image_size=8,
                           timm_kwargs={'patch_size': 8, 'embed_dim': 64, 'depth': 2,
                                        'num_heads': 2},
                           text=TextCfg(width=64, heads=2, layers=2), embed_dim=64,
                           heads={'clip_hidden_dim': 128, 'barlip_hidden_dim': 128,
                                  'barlip_proj_dim': 256, 'siamlip_hidden_dim': 128,
                                  'siamlip_proj_dim': 32}),
}.items():
    BACKBONES.register(_name, _cfg)

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


_TEXT_KEYS = {'transformer_width': 'width', 'transformer_heads': 'heads',
              'transformer_layers': 'layers', 'context_length': 'context_length',
              'text_act': 'act', 'text_mask': 'mask', 'text_vocab_size': 'vocab_size'}
_HEAD_KEYS = tuple(HeadCfg.__dataclass_fields__)


def create_model(name, **overrides):
    """Build a model by name. Overrides set to None are dropped, so defaults live in the configs.

    Accepted overrides: embed_dim, proj_type, image_size, the text keys (transformer_width,
    transformer_heads, transformer_layers, context_length, text_act), every HeadCfg field,
    logit_scale_init (initial exp(logit scale)), logit_bias_init (SigLIP), patch_dropout (ViTs),
    image_tower (a timm name replacing the backbone's), image_proj_bias (a bias in the linear image
    projection), text_tower + text_pooling (a Hugging Face encoder replacing the text transformer;
    see towers.py), image_pool (+ image_pool_heads), text_mask, text_vocab_size, text_pooling
    eot/last (the built-in towers' options; clipa.py).
    """
    base, backbone, method = parse_model_name(name)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = BACKBONES.get(backbone)
    if 'image_tower' in overrides:      # any timm model replaces the backbone (towers.py)
        cfg = replace(cfg, pool='', **towers.timm_backbone_fields(overrides.pop('image_tower')))
    if 'image_proj_bias' in overrides:  # a biased image projection (train-CLIP imports)
        cfg = replace(cfg, proj_bias=overrides.pop('image_proj_bias'))
    if 'image_pool' in overrides:       # clipa.py: GAP / attention-pooled ViTs; the TinyCNN's own
        cfg = replace(cfg, pool=clipa.check_pool(cfg, overrides.pop('image_pool'), 'image_pool'))
    if 'image_pool_heads' in overrides:
        cfg = replace(cfg, pool_heads=overrides.pop('image_pool_heads'))
    text_cfg = replace(cfg.text, **{_TEXT_KEYS[k]: overrides.pop(k)
                                    for k in list(overrides) if k in _TEXT_KEYS})
    text_tower = None
    if 'text_tower' in overrides:       # a Hugging Face encoder replaces the text transformer
        text_tower = towers.HFTextTower(overrides.pop('text_tower'), overrides.pop('text_pooling', 'mean'),
                                        text_cfg.context_length)
        text_cfg = replace(text_cfg, width=text_tower.width, vocab_size=text_tower.vocab_size)
    elif 'text_pooling' in overrides:
        if overrides['text_pooling'] not in clipa.TEXT_POOLS:
            raise ValueError(f"text_pooling {overrides['text_pooling']!r} goes with text_tower; the built-in "
                             f"text tower pools {' or '.join(clipa.TEXT_POOLS)}")
        text_cfg = replace(text_cfg, pool=overrides.pop('text_pooling'))
    head_cfg = replace(HeadCfg(**cfg.heads), **{k: overrides.pop(k)
                                                for k in list(overrides) if k in _HEAD_KEYS})
    check_flags(method, overrides)      # e.g. a logit bias only for a method that has one
    method_cfg = METHODS.get(method)
    method_cfg = replace(method_cfg, **{k: overrides.pop(k) for k in list(overrides)
                                        if k in ('logit_scale_init', 'logit_bias_init')})
    model = BASES.get(base)(
        backbone=cfg, text_cfg=text_cfg, head_cfg=head_cfg, method_cfg=method_cfg,
        embed_dim=overrides.pop('embed_dim', cfg.embed_dim),
        proj_type=overrides.pop('proj_type', cfg.proj_type),
        image_size=overrides.pop('image_size', cfg.image_size),
        patch_dropout=overrides.pop('patch_dropout', 0.0), text_tower=text_tower)
    if method_cfg.ema_teacher:
        model.attach_ema_teacher()
    if overrides:
        raise ValueError(f"unknown model overrides {sorted(overrides)}; valid: embed_dim, "
                         f"proj_type, image_size, {', '.join(_TEXT_KEYS)}, {', '.join(_HEAD_KEYS)}, "
                         f"logit_scale_init, logit_bias_init, patch_dropout, image_tower, "
                         f"image_proj_bias, text_tower, text_pooling, image_pool, image_pool_heads")
    model.model_name = name
    return model


def create_model_from_flags(name, flags):
    """Build from main.py's flags (a dict or Namespace, e.g. a checkpoint's `args`)."""
    flags = flags if isinstance(flags, dict) else vars(flags)
    keys = ['embed_dim', 'image_size', *_TEXT_KEYS, *_HEAD_KEYS, 'logit_scale_init', 'logit_bias_init',
            'patch_dropout', 'image_tower', 'image_proj_bias', 'text_tower', 'text_pooling', 'image_pool',
            'image_pool_heads']
    model = create_model(name, proj_type=flags.get('clip_proj_type'), **{k: flags.get(k) for k in keys})
    return vpt.add_from_flags(model, flags)     # --vpt-tokens: visual prompts in the image tower


# ----------------------------------------------------------------------------- towers

class TinyCNN(nn.Module):
    """The demo's image tower: a plain 4-stage CNN, globally pooled.

    timm has nothing this small; in the runs that sized the demo on a 2-core CPU it learned shape
    on `shapes` in a few CPU-minutes where a tiny ViT or a 1-block-per-stage ResNet learned too slowly.
    `pool`: 'avg' (the mean of the last feature map) or 'avg-max' (mean + max: a small shape
    fills one cell of the 4x4 map, which the mean dilutes; main.py trains with it, and it made the
    demo's slow seeds learn shape as fast as the others: bench/RESULTS.md).
    """
    POOLS = clipa.CNN_POOLS

    def __init__(self, widths=(16, 32, 64, 128), pool='avg'):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"unknown TinyCNN pool {pool!r}; valid: {', '.join(self.POOLS)}")
        self.pool = pool

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
        if self.pool == 'avg-max':
            return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))                # [B, C]
        return x.mean(dim=(2, 3))


def build_image_tower(cfg: BackboneCfg, image_size: int, patch_dropout: float = 0.0, embed_dim: int = 0):
    """The image tower; `patch_dropout` (ViTs only): fraction of patch tokens dropped at random
    in training (FLIP / CLIPA image token reduction, timm's PatchDropout); `embed_dim`: the
    width of an attention pool (cfg.pool 'attn', OpenCLIP's: the joint embedding size)."""
    if patch_dropout and not cfg.is_vit:
        raise ValueError(f"--patch-dropout drops ViT patch tokens; {cfg.tower_name or 'this backbone'} "
                         f"is not a ViT (use a VIT* backbone)")
    if image_size % cfg.image_size_step:
        step = cfg.image_size_step
        raise ValueError(f"image size {image_size}: the {cfg.timm_name} tower takes multiples of {step} px "
                         f"(e.g. {max(step, image_size // step * step)})")
    kwargs = dict(cfg.timm_kwargs)
    if patch_dropout:
        kwargs['patch_drop_rate'] = patch_dropout
    if cfg.pool and cfg.pools:          # a builder tower's own pooling (the TinyCNN)
        kwargs['pool'] = cfg.pool
    elif cfg.pool:
        kwargs.update(clipa.timm_pool_kwargs(cfg.pool))
    if cfg.builder is not None:
        return cfg.builder(image_size, **kwargs)
    if cfg.takes_img_size:
        kwargs['img_size'] = image_size
    tower = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0, **kwargs)
    if cfg.pool == 'attn':
        clipa.attach_attention_pool(tower, embed_dim, cfg.pool_heads)
    if cfg.no_stem_pool:
        tower.maxpool = nn.Identity()
    return tower


# ----------------------------------------------------------------------------- CLIP

class CLIP(SharedPrefixText, nn.Module):
    """Image tower + projection, text transformer + projection, a learnable logit scale.

    Text parameters use the OpenAI CLIP state-dict names (`token_embedding`,
    `positional_embedding`, `transformer.resblocks.N.*`, `ln_final`, `text_projection`).
    """
    LOGIT_SCALE_MAX = 100.0
    zeroshot_heads = ('z',)

    def __init__(self, backbone: BackboneCfg, text_cfg: TextCfg, embed_dim: int,
                 head_cfg: HeadCfg = HeadCfg(), method_cfg: Optional[MethodSpec] = None,
                 proj_type: str = 'linear', image_size: int = 224, patch_dropout: float = 0.0,
                 text_tower: Optional[nn.Module] = None):
        super().__init__()
        if proj_type not in ('linear', 'mlp'):
            raise ValueError(f"unknown projection type {proj_type!r}; valid: linear, mlp")
        method_cfg = method_cfg or METHODS.get('CLIP')
        self.backbone_cfg, self.text_cfg, self.head_cfg = backbone, text_cfg, head_cfg
        self.embed_dim, self.image_size = embed_dim, image_size
        self.visual = build_image_tower(backbone, image_size, patch_dropout, embed_dim)
        self.vision_width = vision_width = self.visual.num_features
        self.image_projection = (nn.Linear(vision_width, embed_dim, bias=backbone.proj_bias)
                                 if proj_type == 'linear' else
                                 mlp(vision_width, vision_width, embed_dim, layers=2))
        self.text_tower = text_tower    # towers.HFTextTower (--text-tower), else the built-in one
        if text_tower is None:
            self.token_embedding = nn.Embedding(text_cfg.vocab_size, text_cfg.width)
            self.positional_embedding = nn.Parameter(
                torch.empty(text_cfg.context_length, text_cfg.width))
            self.transformer = Transformer(text_cfg, head_cfg.text_dropout_prob,
                                           head_cfg.text_drop_path_prob)
            self.ln_final = nn.LayerNorm(text_cfg.width)
        self.text_projection = nn.Parameter(torch.empty(text_cfg.width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(method_cfg.logit_scale_init)))
        if method_cfg.logit_bias_init is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(method_cfg.logit_bias_init)))
        if method_cfg.distill_scale_init is not None:    # clamped like the logit scale (after_step)
            self.sd_logit_scale = nn.Parameter(torch.tensor(math.log(method_cfg.distill_scale_init)))
        self.teacher = None             # an EMA teacher: create_model attaches it (attach_ema_teacher)
        self._init_text()
        if backbone.channels_last:
            self.visual.to(memory_format=torch.channels_last)

    def _init_text(self):
        cfg = self.text_cfg
        if self.text_tower is None:     # a Hugging Face tower keeps its own (pretrained) init
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

    def text_features(self, text, local=False):
        if self.text_tower is not None:
            return self.text_tower(text)                                # [B, width]
        if (self.text_cfg.mask, self.text_cfg.pool) != ('causal', 'eot'):   # CLIPA: every position counts
            x = self.token_embedding(text) + self.positional_embedding[:text.shape[1]]
            x = self.ln_final(self.transformer(x, local))               # [B, L, width]
            return x[:, -1] if self.text_cfg.pool == 'last' else x[torch.arange(x.shape[0]), text.argmax(-1)]
        # Causal attention + EOT pooling: nothing after the last EOT can change the pooled
        # feature, so trimming the padding is exact and saves most of the text compute.
        eot = text.argmax(dim=-1)                                       # EOT has the top id
        length = trimmed_length(eot)
        x = self.token_embedding(text[:, :length]) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, local))                   # [B, L, width]
        return x[torch.arange(x.shape[0], device=x.device), eot]        # [B, width]

    # -- projections: head 'z' (CLIP) and, for CL2L, 'h' (the views' projectors)
    def project_image(self, feats, head='z'):
        self._check_head(head)
        return self.image_projection(feats)

    def project_text(self, feats, head='z'):
        self._check_head(head)
        return feats @ self.text_projection

    def _check_head(self, head):
        if head not in self.zeroshot_heads:
            raise ValueError(f"unknown head {head!r}; valid: {', '.join(self.zeroshot_heads)}")

    def encode_image(self, image, normalize=True, head='z'):
        z = self.project_image(self.image_features(image), head)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, text, normalize=True, head='z'):
        z = self.project_text(self.text_features(text), head)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, batch):
        out = {'image_embed': self.encode_image(batch['image']),
               'text_embed': self.encode_text(batch['text']),
               'logit_scale': self.logit_scale.exp()}
        if hasattr(self, 'logit_bias'):
            out['logit_bias'] = self.logit_bias
        if hasattr(self, 'sd_logit_scale'):
            out['sd_logit_scale'] = self.sd_logit_scale.exp()
        if self.teacher is not None:    # SDCLIP: the EMA teacher embeds the same batch
            with torch.no_grad():
                out['image_embed_teacher'] = self.teacher.encode_image(batch['image'])
                out['text_embed_teacher'] = self.teacher.encode_text(batch['text'])
        return out

    def attach_ema_teacher(self):
        """Give the model an EMA teacher (methods with `ema_teacher`): a frozen copy of the
        whole model, made once every part of it is built; the method's step hook updates it
        (methods.ema_teacher_update)."""
        teacher = copy.deepcopy(self)
        teacher.requires_grad_(False)
        self.teacher = teacher

    # -- training hooks
    @torch.no_grad()
    def after_step(self):
        """Called after each optimizer step (then the method's hook): clamp exp(logit scales)
        to [1, 100]."""
        for name, p in self.named_parameters():
            if name.endswith('logit_scale') and p.requires_grad:
                p.clamp_(0, math.log(self.LOGIT_SCALE_MAX))

    def set_grad_checkpointing(self, enable=True):
        self.visual.set_grad_checkpointing(enable)
        if self.text_tower is not None:
            self.text_tower.set_grad_checkpointing(enable)
        else:
            self.transformer.grad_checkpointing = enable

    def train(self, mode=True):
        """Modules named in `frozen_modules` (locked BatchNorm, towers.lock_image) stay in eval mode."""
        super().train(mode)
        for name in getattr(self, 'frozen_modules', ()):
            self.get_submodule(name).eval()
        return self

    def no_weight_decay(self):
        """Names of matrices that are embeddings (no weight decay), besides 1-d params."""
        names = {'token_embedding.weight', 'positional_embedding', 'logit_scale'}
        names |= {f'visual.{n}' for n in getattr(self.visual, 'no_weight_decay', set)()}
        if self.text_tower is not None:
            names |= {f'text_tower.{n}' for n in self.text_tower.no_weight_decay()}
        return names


BASES.register('CLIP', CLIP)


class CL2L(CLIP):
    """CLIP🚀: the global image/caption pair goes through the CLIP projectors (`z`); the
    augmented image views and text views through a second pair (`h`: separate 3-layer MLPs
    with their own logit scale with --separate-proj, else the `z` projectors). A method head
    (BarLIP, SiamLIP) adds its outputs; BYOLIP keeps an EMA teacher of everything else."""
    zeroshot_heads = ('z', 'h')

    def __init__(self, backbone, text_cfg, embed_dim, head_cfg=HeadCfg(), method_cfg=None, **kw):
        super().__init__(backbone, text_cfg, embed_dim, head_cfg, method_cfg, **kw)
        method_cfg = method_cfg or METHODS.get('CL2L')
        cfg = head_cfg
        if cfg.separate_proj:
            self.h_image_projection = projector(cfg.cl2l_img_proj_type, self.vision_width,
                                                cfg.clip_hidden_dim, embed_dim)
            self.h_text_projection = projector(cfg.cl2l_txt_proj_type, text_cfg.width,
                                               cfg.clip_hidden_dim, embed_dim)
            self.h_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.1)))
        self.method_head = (method_cfg.head(self.vision_width, text_cfg.width, cfg)
                            if method_cfg.head else None)

    def project_image(self, feats, head='z'):
        if head == 'h' and self.head_cfg.separate_proj:
            return self.h_image_projection(feats)
        return super().project_image(feats, 'z' if head == 'h' else head)

    def project_text(self, feats, head='z'):
        if head == 'h' and self.head_cfg.separate_proj:
            return self.h_text_projection(feats)
        return super().project_text(feats, 'z' if head == 'h' else head)

    def features(self, batch):
        """Tower features: image/text [B, C]; image_views/text_views: V tensors [B, C]
        (all views go through each tower in one call)."""
        feats = {'image': self.image_features(batch['image']),
                 'text': self.text_features(batch['text']),
                 'image_views': [], 'text_views': []}
        views = batch.get('image_views')
        if views is not None and views.shape[1] > 0:
            B, V = views.shape[:2]                                          # [B, V, 3, h, w]
            img = self.image_features(views.transpose(0, 1).flatten(0, 1))  # [V*B, C]
            txt = self.text_features(batch['text_views'].transpose(0, 1).flatten(0, 1), local=True)
            feats['image_views'] = list(img.view(V, B, -1).unbind(0))
            feats['text_views'] = list(txt.view(V, B, -1).unbind(0))
        return feats

    def forward(self, batch):
        feats = self.features(batch)
        h_scale = self.h_logit_scale if self.head_cfg.separate_proj else self.logit_scale
        out = {'image_embed': F.normalize(self.project_image(feats['image']), dim=-1),
               'text_embed': F.normalize(self.project_text(feats['text']), dim=-1),
               'h_image_views': [F.normalize(self.project_image(f, 'h'), dim=-1)
                                 for f in feats['image_views']],
               'h_text_views': [F.normalize(self.project_text(f, 'h'), dim=-1)
                                for f in feats['text_views']],
               'logit_scale': self.logit_scale.exp(), 'h_logit_scale': h_scale.exp()}
        if self.method_head is not None:
            out.update(self.method_head(feats))
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher.method_head(self.teacher.features(batch))
            out.update({f'{k}_teacher': v for k, v in target.items() if k.startswith('v_')})
        return out

    def no_weight_decay(self):
        return super().no_weight_decay() | {'h_logit_scale'}


BASES.register('CL2L', CL2L)


def resample_position_embeddings(model, state):
    """`state` with every ViT absolute position embedding saved for another patch grid (another
    image size), and every attention-pool one (the RN*OAI towers) saved for another feature map,
    resampled to `model`'s grid; other entries as they are (a new dict)."""
    from timm.layers import AttentionPool2d, resample_abs_pos_embed
    own, state = model.state_dict(), dict(state)
    for key, value in state.items():
        if not (key.endswith('pos_embed') and key in own and own[key].shape != value.shape):
            continue
        module = model.get_submodule(key.rsplit('.', 1)[0]) if '.' in key else model
        if isinstance(module, AttentionPool2d):         # [1 + h*w, C], the mean token first
            state[key] = resample_abs_pos_embed(value.unsqueeze(0), new_size=list(module.feat_size),
                                                num_prefix_tokens=1, verbose=False)[0]
        if getattr(module, 'patch_embed', None) is None:
            continue
        prefix = 0 if getattr(module, 'no_embed_class', False) else module.num_prefix_tokens
        state[key] = resample_abs_pos_embed(value, new_size=list(module.patch_embed.grid_size),
                                            num_prefix_tokens=prefix, verbose=False)
    return state


def load_weights(model, state):
    """Load a state dict for fine-tuning (CLIPA: pre-train at low resolution, fine-tune at full):
    ViT position embeddings are resampled to the model's patch grid; tensors whose shape still
    differs and keys the model lacks are reported, not loaded. -> (loaded, skipped, missing)."""
    own = model.state_dict()
    loaded, skipped = {}, []
    for key, value in resample_position_embeddings(model, state).items():
        if key not in own or value.shape != own[key].shape:
            skipped.append(key)
            continue
        loaded[key] = value
    if not loaded:
        raise ValueError("no tensor of the checkpoint fits this model (another architecture?)")
    missing = sorted(set(own) - set(loaded))
    model.load_state_dict(loaded, strict=False)
    return sorted(loaded), skipped, missing


def param_groups(model, weight_decay):
    """AdamW groups: no decay for biases, norms (all 1-d params), embeddings, logit scale. A
    training feature's submodule (`model.feature_modules`, e.g. RangeAugment's) has its own group."""
    skip = model.no_weight_decay()
    own_group = tuple(f'{name}.' for name in getattr(model, 'feature_modules', ()))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name.startswith(own_group):
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
