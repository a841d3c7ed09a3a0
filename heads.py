"""Projection heads: one MLP builder, the CL2L `h` projectors and the method heads
(BarLIP projectors, SiamLIP projectors + cross-modal predictors). Each method head maps the
tower features to the extra outputs its loss reads."""
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class HeadCfg:
    separate_proj: bool = False        # CL2L: own h projectors (MLPs) + own logit scale
    separate_proj_child: bool = False  # method heads: separate heads for the augmented views
    clip_hidden_dim: int = 4096        # hidden width of the h projector MLPs
    cl2l_img_proj_type: str = 'mlp'    # h image projector: 'mlp' (3 layers) or 'linear'
    cl2l_txt_proj_type: str = 'mlp'    # h text projector: 'mlp' (3 layers) or 'linear'
    text_dropout_prob: float = 0.0     # dropout in the text tower for text views ("local" mode)
    text_drop_path_prob: float = 0.0   # stochastic depth in the text tower for text views
    barlip_proj_dim: int = 8192        # BarLIP projector output
    barlip_hidden_dim: int = 3000      # BarLIP projector hidden width (upstream default)
    siamlip_proj_dim: int = 128        # SiamLIP projector output
    siamlip_hidden_dim: int = 2048     # SiamLIP projector / predictor hidden width
    siamlip_no_last_bn: bool = False   # drop the final affine-free BN of the SiamLIP projector


def mlp(in_dim, hidden_dim, out_dim, layers=2, last_bn=False, last_bn_affine=True, bias=True):
    """(Linear-BN-ReLU) x (layers-1), then Linear (+ BN when last_bn)."""
    mods, dim = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                 nn.ReLU(inplace=True)]
        dim = hidden_dim
    mods.append(nn.Linear(dim, out_dim, bias=bias and not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*mods)


def projector(kind, in_dim, hidden_dim, out_dim):
    """A CLIP/CL2L projector: 'linear' (no bias) or a 3-layer 'mlp'."""
    if kind == 'linear':
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == 'mlp':
        return mlp(in_dim, hidden_dim, out_dim, layers=3)
    raise ValueError(f"unknown projector type {kind!r}; valid: linear, mlp")


class PairHead(nn.Module):
    """An image head and a text head, with optional separate copies for the views."""

    def __init__(self, build_image, build_text, separate_views):
        super().__init__()
        self.image, self.text = build_image(), build_text()
        self.image_views = build_image() if separate_views else None
        self.text_views = build_text() if separate_views else None

    def project(self, feats):
        """feats: image/text [B, C] and image_views/text_views [V, B, C] -> v_* outputs."""
        img_v = self.image if self.image_views is None else self.image_views
        txt_v = self.text if self.text_views is None else self.text_views
        return {'v_image': self.image(feats['image']), 'v_text': self.text(feats['text']),
                'v_image_views': _per_view(img_v, feats['image_views']),
                'v_text_views': _per_view(txt_v, feats['text_views'])}


def _per_view(module, x):
    """Apply a [N, C] module to [V, B, C] views with per-view batch statistics."""
    return [module(v) for v in x]


class BarLIPHead(nn.Module):
    """Barlow Twins projectors: 3 layers, final BN, wide output (8192)."""

    def __init__(self, image_dim, text_dim, cfg: HeadCfg):
        super().__init__()

        def build(dim):
            return lambda: mlp(dim, cfg.barlip_hidden_dim, cfg.barlip_proj_dim, layers=3, last_bn=True)
        self.proj = PairHead(build(image_dim), build(text_dim), cfg.separate_proj_child)

    def forward(self, feats):
        return self.proj.project(feats)


class SiamLIPHead(nn.Module):
    """SimSiam-style projectors (hidden 2048 -> 128, final BN without affine) and the
    image->text / text->image predictors."""

    def __init__(self, image_dim, text_dim, cfg: HeadCfg):
        super().__init__()
        hid, out = cfg.siamlip_hidden_dim, cfg.siamlip_proj_dim

        def build_proj(dim):
            return lambda: mlp(dim, hid, out, layers=2, bias=False,
                               last_bn=not cfg.siamlip_no_last_bn, last_bn_affine=False)

        def build_pred():
            return mlp(out, hid, out, layers=2)
        self.proj = PairHead(build_proj(image_dim), build_proj(text_dim), cfg.separate_proj_child)
        self.pred = PairHead(build_pred, build_pred, cfg.separate_proj_child)

    def forward(self, feats):
        v = self.proj.project(feats)
        p = self.pred.project({'image': v['v_image'], 'text': v['v_text'],
                               'image_views': v['v_image_views'], 'text_views': v['v_text_views']})
        return {**v, **{'p' + k[1:]: val for k, val in p.items()}}
