"""A reference of apple/ml-cvnets' CLIP (the RangeAugment recipes) for tests/test_interop.py,
written from cvnets' source: the same module names (so the state dict has cvnets' exact keys)
and the same forward arithmetic. The PyPI package named `cvnets` is an unrelated library, and
ml-cvnets itself is not on PyPI, hence this file.

    cvnets/models/multi_modal_img_text/clip.py     CLIP: image_encoder, text_encoder, logit_scale
    cvnets/text_encoders/transformer.py            TextTransformer.encode_text
    cvnets/modules/transformer.py                  TransformerEncoder (pre-norm)
    cvnets/layers/multi_head_attention.py          MultiHeadAttention.forward_default
    cvnets/layers/positional_embedding.py          LearnablePositionalEmbedding ([1, 1, N, C], resized)
    cvnets/layers/conv_layer.py                    ConvLayer2d (block.conv/norm/act, padding (k-1)//2)
    cvnets/models/classification/vit.py            VisionTransformer (conv stem, cls token w/o position,
                                                   LayerNorm eps 1e-6, 1-D resized position embeddings)
    cvnets/models/classification/base_image_encoder.py   neural_augmentor (RangeAugment, training only)
    cvnets/neural_augmentor/neural_aug.py          DistributionNeuralAugmentor: brightness, contrast, noise
    cvnets/image_projection_layers/simple_projection_head.py   classifier.proj, L2-normalised
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearLayer(nn.Module):
    def __init__(self, cin, cout, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MultiHeadAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.qkv_proj, self.out_proj = LinearLayer(dim, 3 * dim), LinearLayer(dim, dim)
        self.attn_dropout = nn.Dropout(0.0)
        self.softmax = nn.Softmax(dim=-1)
        self.num_heads, self.scaling = heads, (dim // heads) ** -0.5

    def forward(self, x_q, attn_mask=None):                     # forward_default, self-attention
        b, s, _ = x_q.shape
        qkv = self.qkv_proj(x_q).reshape(b, s, 3, self.num_heads, -1).transpose(1, 3).contiguous()
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = torch.matmul(query * self.scaling, key.transpose(-1, -2))
        if attn_mask is not None:                                # [B, S, T], additive
            attn = attn + attn_mask.unsqueeze(1)
        attn = self.attn_dropout(self.softmax(attn.float()).to(attn.dtype))
        return self.out_proj(torch.matmul(attn, value).transpose(1, 2).reshape(b, s, -1))


class TransformerEncoder(nn.Module):
    def __init__(self, dim, heads, ffn, eps=1e-5):
        super().__init__()
        self.pre_norm_mha = nn.Sequential(nn.LayerNorm(dim, eps=eps), MultiHeadAttention(dim, heads), nn.Dropout(0.0))
        self.pre_norm_ffn = nn.Sequential(nn.LayerNorm(dim, eps=eps), LinearLayer(dim, ffn), nn.GELU(),
                                          nn.Dropout(0.0), LinearLayer(ffn, dim), nn.Dropout(0.0))

    def forward(self, x, attn_mask=None):
        x = x + self.pre_norm_mha[2](self.pre_norm_mha[1](self.pre_norm_mha[0](x), attn_mask=attn_mask))
        return x + self.pre_norm_ffn(x)


class LearnablePositionalEmbedding(nn.Module):
    def __init__(self, n, dim):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, 1, n, dim))
        nn.init.trunc_normal_(self.pos_embed, std=dim ** -0.5)
        self.num_embeddings, self.embedding_dim = n, dim

    def forward(self, seq_len):                                 # padding_idx None (see interop_cvnets)
        pos = self.pos_embed
        if seq_len != self.num_embeddings:
            pos = F.interpolate(pos, size=(seq_len, self.embedding_dim), mode='bilinear')
        return pos.reshape(1, seq_len, self.embedding_dim)


class PositionalEmbedding(nn.Module):
    def __init__(self, n, dim):
        super().__init__()
        self.pos_embed = LearnablePositionalEmbedding(n, dim)

    def forward(self, seq_len):
        return self.pos_embed(seq_len)


class TextTransformer(nn.Module):
    def __init__(self, width, heads, layers, proj_dim, vocab=49408, context=77):
        super().__init__()
        self.embedding_layer = nn.Embedding(vocab, width)
        self.positional_embedding = PositionalEmbedding(context, width)
        self.embedding_dropout = nn.Dropout(0.0)
        ffn = int(math.ceil(width * 4.0 / 16.0) * 16.0)
        self.transformer = nn.ModuleList(TransformerEncoder(width, heads, ffn) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(width)
        self.projection_layer = nn.Parameter(torch.randn(width, proj_dim) * width ** -0.5)

    def forward(self, text_tokens):                             # encode_text with causal_masking
        x = self.embedding_dropout(self.embedding_layer(text_tokens) +
                                   self.positional_embedding(text_tokens.shape[1]))
        b, n = text_tokens.shape
        mask = torch.empty(n, n).fill_(float('-inf')).triu_(1).unsqueeze(0).expand(b, -1, -1)
        for layer in self.transformer:
            x = layer(x, attn_mask=mask)
        x = self.final_layer_norm(x)
        x = x[torch.arange(b), text_tokens.argmax(dim=-1)] @ self.projection_layer
        return F.normalize(x, dim=-1)


class ConvLayer2d(nn.Module):
    def __init__(self, cin, cout, k, stride, bias, use_norm):
        super().__init__()
        self.block = nn.Sequential()
        self.block.add_module('conv', nn.Conv2d(cin, cout, k, stride, padding=int((k - 1) / 2), bias=bias))
        if use_norm:
            self.block.add_module('norm', nn.BatchNorm2d(cout))
            self.block.add_module('act', nn.GELU())

    def forward(self, x):
        return self.block(x)


class SimpleImageProjectionHead(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Parameter(cin ** -0.5 * torch.randn(cin, cout))

    def forward(self, x):
        return F.normalize(x @ self.proj, dim=-1)


class UniformSampler(nn.Module):
    def __init__(self, low, high):
        super().__init__()
        self._low = nn.Parameter(torch.tensor(low, dtype=torch.float))
        self._high = nn.Parameter(torch.tensor(high, dtype=torch.float))


class DistributionNeuralAugmentor(nn.Module):
    """RangeAugment's learned ranges (the recipes' learn_augmentation mode: distribution); they
    augment training images only, so the encoders below do not use them."""

    def __init__(self):
        super().__init__()
        self.brightness, self.contrast, self.noise = UniformSampler(0.5, 1.5), UniformSampler(0.5, 1.5), \
            UniformSampler(0.0, 0.1)


class VisionTransformer(nn.Module):
    """cvnets' ViT; its modes are 64-wide heads (base: 768 wide, 12 layers, 12 heads; huge: 1280,
    32, 20); small widths / depths for tests. forward = the CLIP image encoder in eval mode."""

    def __init__(self, width, heads, layers, proj_dim, range_augment=False):
        super().__init__()
        self.neural_augmentor = DistributionNeuralAugmentor() if range_augment else None
        stem = max(32, width // 4)
        self.patch_emb = nn.Sequential(ConvLayer2d(3, stem, 4, 4, False, True),
                                       ConvLayer2d(stem, stem, 2, 2, False, True),
                                       ConvLayer2d(stem, width, 2, 2, True, False))
        self.transformer = nn.Sequential(*[TransformerEncoder(width, heads, 4 * width, eps=1e-6)
                                           for _ in range(layers)])
        self.post_transformer_norm = nn.LayerNorm(width, eps=1e-6)
        self.classifier = SimpleImageProjectionHead(width, proj_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos_embed = PositionalEmbedding((224 // 16) ** 2, width)

    def forward(self, x):
        x = self.patch_emb(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x + self.pos_embed(x.shape[1])], dim=1)
        for layer in self.transformer:
            x = layer(x)
        return self.classifier(self.post_transformer_norm(x)[:, 0])


class CLIP(nn.Module):
    def __init__(self, vit_width=128, vit_heads=2, vit_layers=2, text_width=64, text_heads=2, text_layers=2,
                 proj_dim=32, range_augment=False):
        super().__init__()
        self.image_encoder = VisionTransformer(vit_width, vit_heads, vit_layers, proj_dim, range_augment)
        self.text_encoder = TextTransformer(text_width, text_heads, text_layers, proj_dim)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
