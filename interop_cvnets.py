"""cvnets (apple/ml-cvnets, the RangeAugment CLIP recipes) mappings of interop.py: its CLIP
text transformer maps onto ours key for key (flags_for_cvnets, load_cvnets); its ViT image
encoders are refused (convolutional stem, see CVNETS_VIT_STEM). Read from cvnets' own
definitions (cvnets/text_encoders/transformer.py, cvnets/modules/transformer.py,
cvnets/layers/multi_head_attention.py, cvnets/models/classification/vit.py); docs/interop.md
says what maps and what is refused."""
import re

import torch

import models
from interop_openclip import _load

CVNETS_VIT_STEM = (
    "cvnets' ViT ({}) embeds patches with a convolutional stem (a 4x4 stride-4 convolution padded by "
    "1 pixel + BatchNorm + GELU, a 2x2/2 convolution + BatchNorm + GELU, a 2x2/2 convolution) where "
    "our ViTs (timm's) have one 16x16 stride-16 convolution, and timm's one ViT with that stem "
    "(vit_base_mci_224) does not pad: no exact mapping. Import the text tower only (--text-only)")
_VIT_MODES = {192: 'ViT-Ti/16', 384: 'ViT-S/16', 768: 'ViT-B/16', 1024: 'ViT-L/16', 1280: 'ViT-H/16'}
_T = 'text_encoder.'
_BLOCK = {'pre_norm_mha.0': 'ln_1', 'pre_norm_mha.1.qkv_proj.weight': 'attn.in_proj_weight',  # cvnets -> ours
          'pre_norm_mha.1.qkv_proj.bias': 'attn.in_proj_bias', 'pre_norm_mha.1.out_proj': 'attn.out_proj',
          'pre_norm_ffn.0': 'ln_2', 'pre_norm_ffn.1': 'mlp.c_fc', 'pre_norm_ffn.4': 'mlp.c_proj'}
# Recipe options our text tower computes (both published CLIP recipes, examples/range_augment/
# clip/clip_vit_*.yaml, have the first of each); cvnets' own defaults differ (_DEFAULTS).
RECIPE_TEXT = {'model.text.name': ('transformer',), 'model.text.transformer.causal_masking': (True,),
               'model.activation.name': ('gelu',),
               'model.text.transformer.norm_layer': ('layer_norm_fp32', 'layer_norm')}   # fp32 LN = LN in fp32
_DEFAULTS = {'model.text.name': None, 'model.text.transformer.causal_masking': False,
             'model.activation.name': 'relu', 'model.text.transformer.norm_layer': 'layer_norm'}


def read_recipe(path):
    """A cvnets config YAML as flat dotted options ({'model.text.transformer.n_heads_per_layer': 8, ...})."""
    import yaml
    try:
        with open(path) as f:
            tree = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--cvnets-config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--cvnets-config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"--cvnets-config {path}: not a cvnets config (a YAML mapping)")
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f'{prefix}{k}.')
            else:
                flat[f'{prefix}{k}'] = v
    walk(tree, '')
    return flat


def _text_settings(width, recipe):
    """-> (heads, notes): the text options the state dict does not hold, from the recipe (checked
    against what our text tower computes) or, without one, the published recipes' values."""
    if recipe is None:
        heads = width // 64
        return heads, [f"no --cvnets-config: the published CLIP recipes' text settings assumed (causal "
                       f"masking, GELU, {heads} heads = width / 64); pass the recipe YAML to read them"]
    got = {k: recipe.get(k, _DEFAULTS[k]) for k in RECIPE_TEXT}
    bad = [f"{k}={got[k]!r}" for k, ok in RECIPE_TEXT.items() if got[k] not in ok]
    if bad:
        raise ValueError(f"cvnets text encoder with {', '.join(bad)}: ours is the causal GELU transformer "
                         f"with LayerNorm ({', '.join(f'{k}={v[0]!r}' for k, v in RECIPE_TEXT.items())})")
    heads = recipe.get('model.text.transformer.n_heads_per_layer', 8)
    heads = set(heads) if isinstance(heads, (list, tuple)) else {heads}
    if len(heads) != 1:
        raise ValueError(f"cvnets text encoder with per-layer heads {sorted(heads)}: ours has one head count")
    return heads.pop(), []


def flags_for_cvnets(name, state, text_only=False, recipe=None):
    """create_model flags that rebuild a cvnets CLIP checkpoint's text tower under our model `name`
    -> (flags, notes); ValueError for what has no exact equivalent (every cvnets image encoder)."""
    if not any(k.startswith(_T) for k in state):
        raise ValueError("not a cvnets CLIP state dict (no text_encoder.* tensors)")
    if not text_only:
        stem = state.get('image_encoder.patch_emb.2.block.conv.weight')
        if stem is not None:
            raise ValueError(CVNETS_VIT_STEM.format(_VIT_MODES.get(stem.shape[0], f'{stem.shape[0]} wide')))
        raise ValueError("this cvnets image encoder is not a timm model of ours: no exact mapping. "
                         "Import the text tower only (--text-only)")
    if f'{_T}positional_embedding.pos_embed.pos_embed' not in state:
        raise ValueError("cvnets text encoder without a position embedding (no_pos_embedding): ours adds one")
    vocab, width = state[f'{_T}embedding_layer.weight'].shape
    if vocab != models.TextCfg.vocab_size:
        raise ValueError(f"text vocabulary {vocab}: ours is fixed at {models.TextCfg.vocab_size} (CLIP's BPE)")
    layers = len({int(m.group(1)) for k in state for m in [re.match(rf'{_T}transformer\.(\d+)\.', k)] if m})
    ffn = {state[f'{_T}transformer.{i}.pre_norm_ffn.1.weight'].shape[0] for i in range(layers)}
    if ffn != {4 * width}:
        raise ValueError(f"cvnets text FFN widths {sorted(ffn)}: ours is 4 x width = {4 * width} in every layer")
    heads, notes = _text_settings(width, recipe)
    if width % heads:
        raise ValueError(f"text width {width} is not divisible by {heads} heads")
    flags = {'embed_dim': state[f'{_T}projection_layer'].shape[1], 'transformer_width': width,
             'transformer_heads': heads, 'transformer_layers': layers,
             'context_length': state[f'{_T}positional_embedding.pos_embed.pos_embed'].shape[-2],
             'text_act': 'gelu', 'clip_proj_type': 'linear'}
    _, backbone, _ = models.parse_model_name(name)
    return flags, notes + [f"text tower only: the {backbone} image tower and the image projection keep "
                           f"their initialisation"]


def cvnets_text_to_ours(state):
    """cvnets text encoder + logit scale -> (our keys, the cvnets keys used). The position
    embedding is used as stored: cvnets' training and evaluation build the dataset first, which
    sets dataset.padding_index to None, so no row of it is zeroed at run time."""
    pos = state[f'{_T}positional_embedding.pos_embed.pos_embed']        # [1, 1, context, width]
    names = {'token_embedding.weight': f'{_T}embedding_layer.weight', 'ln_final.weight': f'{_T}final_layer_norm.weight',
             'ln_final.bias': f'{_T}final_layer_norm.bias', 'text_projection': f'{_T}projection_layer'}
    out = {ours: state[theirs] for ours, theirs in names.items()}
    out.update({'positional_embedding': pos.reshape(pos.shape[-2:]), 'logit_scale': state['logit_scale'].reshape(())})
    used = set(names.values()) | {f'{_T}positional_embedding.pos_embed.pos_embed', 'logit_scale'}
    for k, v in state.items():
        m = re.match(rf'{_T}transformer\.(\d+)\.(.+)$', k)
        if not m:
            continue
        i, rest = m.groups()
        ours = next((o + rest[len(c):] for c, o in _BLOCK.items() if rest == c or rest.startswith(c + '.')), None)
        if ours is None:
            raise ValueError(f"{k}: not a tensor of cvnets' pre-norm TransformerEncoder")
        out[f'transformer.resblocks.{i}.{ours}'] = v
        used.add(k)
    return out, used


def load_cvnets(model, state):
    """Load a cvnets CLIP state dict's text encoder and logit scale into our `model` (built with
    flags_for_cvnets' flags) -> notes. Exact: the same functions, up to float rounding."""
    if getattr(model, 'text_tower', None) is not None:
        raise ValueError("this model has a Hugging Face text tower; cvnets' is a CLIP-style transformer")
    new, used = cvnets_text_to_ours(state)
    left = sorted(k for k in state if k not in used and not k.startswith('image_encoder.'))
    if left:
        raise ValueError(f"{len(left)} cvnets tensors have no place in our model: {left[:6]}")
    keep = ('h_', 'method_head.', 'teacher.', 'visual.', 'image_projection.', 'logit_bias')
    return _load(model, new, keep)
