"""cvnets' ViT (apple/ml-cvnets, cvnets/models/classification/vit.py: the image encoders of its
RangeAugment CLIP recipes) built from timm pieces: timm's VisionTransformer whose patch
embedding is cvnets' convolutional stem (timm's HybridEmbed around ConvStem, no projection).

What it computes, as cvnets does: stem -> + position embedding (patch tokens only) -> class
token prepended -> pre-norm blocks (LayerNorm eps 1e-6, GELU, MLP 4x) -> final LayerNorm ->
class token. interop_cvnets.py maps cvnets' state dicts onto it exactly at 224 px.

At another resolution our position embeddings are resampled as a 2-D grid (as for every ViT of
ours); cvnets resizes its 196 as one flattened sequence (1-D bilinear), so the two agree at
224 px only.
"""
from collections import OrderedDict
from functools import partial

import torch.nn as nn

MODES = {'base': dict(embed_dim=768, depth=12, num_heads=12),      # cvnets' vit config, mode -> size
         'huge': dict(embed_dim=1280, depth=32, num_heads=20)}


class ConvStem(nn.Sequential):
    """cvnets' patch embedding (16 px per token): a 4x4 stride-4 convolution padded by 1 pixel +
    BatchNorm + GELU, a 2x2/2 convolution + BatchNorm + GELU, a 2x2/2 convolution with bias.
    `max(32, width // 4)` channels inside, as cvnets. timm's vit_base_mci_224 has this stem
    without the padding (its first token then sees other pixels)."""

    def __init__(self, width, in_chans=3):
        inner = max(32, width // 4)
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(in_chans, inner, 4, 4, padding=1, bias=False),
            bn1=nn.BatchNorm2d(inner), act1=nn.GELU(),
            conv2=nn.Conv2d(inner, inner, 2, 2, bias=False),
            bn2=nn.BatchNorm2d(inner), act2=nn.GELU(),
            conv3=nn.Conv2d(inner, width, 2, 2, bias=True)))


def cvnets_vit(image_size, embed_dim=768, depth=12, num_heads=12, **timm_kwargs):
    """cvnets' ViT for `image_size` px (models.BackboneCfg.builder); `timm_kwargs` go to timm's
    VisionTransformer (patch_drop_rate, drop_path_rate, ...)."""
    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer
    embed = partial(HybridEmbed, backbone=ConvStem(embed_dim, timm_kwargs.get('in_chans', 3)), proj=False)
    return VisionTransformer(img_size=image_size, patch_size=1, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=4.0, class_token=True, no_embed_class=True,
                             global_pool='token', num_classes=0, embed_layer=embed, **timm_kwargs)
