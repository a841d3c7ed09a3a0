"""cvnets (apple/ml-cvnets, the RangeAugment CLIP recipes) mappings of interop.py: its CLIP maps
onto ours key for key (flags_for_cvnets, load_cvnets): the text transformer onto our text tower,
its ViT image encoders onto the VITB16CV / VITH16CV towers (vit_cvnets.py: its convolutional
stem). Read from cvnets' own definitions (cvnets/text_encoders/transformer.py,
cvnets/modules/transformer.py, cvnets/layers/multi_head_attention.py,
cvnets/models/classification/vit.py, cvnets/image_projection_layers/simple_projection_head.py);
docs/interop.md says what maps and what is refused."""
import math
import re


import models
import vit_cvnets
from interop_openclip import _load

_T, _I = 'text_encoder.', 'image_encoder.'
_BLOCK = {'pre_norm_mha.0': 'ln_1', 'pre_norm_mha.1.qkv_proj.weight': 'attn.in_proj_weight',  # cvnets -> ours
          'pre_norm_mha.1.qkv_proj.bias': 'attn.in_proj_bias', 'pre_norm_mha.1.out_proj': 'attn.out_proj',
          'pre_norm_ffn.0': 'ln_2', 'pre_norm_ffn.1': 'mlp.c_fc', 'pre_norm_ffn.4': 'mlp.c_proj'}
_VIT_BLOCK = {'pre_norm_mha.0': 'norm1', 'pre_norm_mha.1.qkv_proj': 'attn.qkv',      # cvnets -> timm
              'pre_norm_mha.1.out_proj': 'attn.proj', 'pre_norm_ffn.0': 'norm2', 'pre_norm_ffn.1': 'mlp.fc1',
              'pre_norm_ffn.4': 'mlp.fc2'}
_STEM_KEYS = {'patch_emb.0.block.conv': 'conv1', 'patch_emb.0.block.norm': 'bn1', 'patch_emb.1.block.conv': 'conv2',
              'patch_emb.1.block.norm': 'bn2', 'patch_emb.2.block.conv': 'conv3'}
_VIT_REST = {**{c: f'patch_embed.backbone.{o}' for c, o in _STEM_KEYS.items()}, 'post_transformer_norm': 'norm',
             'cls_token': 'cls_token'}
_STEM = f'{_I}patch_emb.2.block.conv.weight'        # [width, stem channels, 2, 2]: cvnets' ViT
_POS = f'{_I}pos_embed.pos_embed.pos_embed'          # [1, 1, 196, width]: 14 x 14 at 224 px
_AUGMENTOR = f'{_I}neural_augmentor.'               # RangeAugment's magnitudes: training only
_VIT_MODES = {192: 'ViT-Ti/16', 384: 'ViT-S/16', 768: 'ViT-B/16', 1024: 'ViT-L/16', 1280: 'ViT-H/16'}
# Recipe options our text tower computes (both published CLIP recipes, examples/range_augment/
# clip/clip_vit_*.yaml, have the first of each); cvnets' own defaults differ (_DEFAULTS).
RECIPE_TEXT = {'model.text.name': ('transformer',), 'model.text.transformer.causal_masking': (True,),
               'model.activation.name': ('gelu',),
               'model.text.transformer.norm_layer': ('layer_norm_fp32', 'layer_norm')}   # fp32 LN = LN in fp32
# ... and image options our cvnets ViT computes (at evaluation: dropout / stochastic depth do not count)
RECIPE_IMAGE = {'model.classification.name': ('vit',), 'model.classification.vit.no_cls_token': (False,),
                'model.classification.vit.norm_layer': ('layer_norm_fp32', 'layer_norm'),
                'model.classification.vit.use_simple_fpn': (False,),
                'model.normalization.name': ('batch_norm', 'sync_batch_norm'),   # the same at evaluation
                'model.image_projection_head.name': ('simple_projection_nc2nc',),
                'model.image_projection_head.simple_projection_nc2nc.identity_if_same_size': (False,)}
_DEFAULTS = {'model.text.name': None, 'model.text.transformer.causal_masking': False,
             'model.activation.name': 'relu', 'model.text.transformer.norm_layer': 'layer_norm',
             'model.classification.name': None, 'model.classification.vit.no_cls_token': False,
             'model.classification.vit.norm_layer': 'layer_norm', 'model.classification.vit.use_simple_fpn': False,
             'model.normalization.name': 'batch_norm', 'model.image_projection_head.name': None,
             'model.image_projection_head.simple_projection_nc2nc.identity_if_same_size': False}


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
    """create_model flags that rebuild a cvnets CLIP checkpoint under our model `name` (its text
    tower only with text_only) -> (flags, notes); ValueError for what has no exact equivalent."""
    if not any(k.startswith(_T) for k in state):
        raise ValueError("not a cvnets CLIP state dict (no text_encoder.* tensors)")
    if f'{_T}positional_embedding.pos_embed.pos_embed' not in state:
        raise ValueError("cvnets text encoder without a position embedding (no_pos_embedding): ours adds one")
    vocab, width = state[f'{_T}embedding_layer.weight'].shape
    if vocab != models.TextCfg.vocab_size:
        raise ValueError(f"text vocabulary {vocab}: ours is fixed at {models.TextCfg.vocab_size} (CLIP's BPE)")
    layers = _depth(state, f'{_T}transformer')
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
    if text_only:
        return flags, notes + [f"text tower only: the {backbone} image tower and the image projection keep "
                               f"their initialisation"]
    flags['image_size'], image_notes = _image_settings(backbone, state, recipe)
    return flags, notes + image_notes


def _depth(state, prefix):
    return len({int(m.group(1)) for k in state for m in [re.match(rf'{re.escape(prefix)}\.(\d+)\.', k)] if m})


def _image_settings(backbone, state, recipe):
    """-> (image size, notes) for loading the cvnets ViT in `state` into our `backbone`; ValueError
    naming what differs (another image encoder, another ViT size, another projection head)."""
    if _STEM not in state:
        raise ValueError("this cvnets image encoder is not its ViT (no image_encoder.patch_emb.*): only its "
                         "ViTs map (onto VITB16CV / VITH16CV). Import the text tower only (--text-only)")
    width, depth = state[_STEM].shape[0], _depth(state, f'{_I}transformer')
    if f'{_I}cls_token' not in state:
        raise ValueError("cvnets ViT without a class token (no_cls_token: mean pooling): ours pools the class token")
    if f'{_I}classifier.proj' not in state:
        raise ValueError("cvnets image projection head other than simple_projection_nc2nc's `proj` matrix: "
                         "ours is a bias-free linear projection")
    ffn = {state[f'{_I}transformer.{i}.pre_norm_ffn.1.weight'].shape[0] for i in range(depth)}
    if ffn != {4 * width}:
        raise ValueError(f"cvnets ViT FFN widths {sorted(ffn)}: ours is 4 x width = {4 * width}")
    notes = _check_image_recipe(recipe)
    got = dict(embed_dim=width, depth=depth, num_heads=width // 64)      # every cvnets ViT mode: 64-wide heads
    if _cvnets_vit_size(backbone) != got:
        fits = [b for b in models.BACKBONES if _cvnets_vit_size(b) == got]
        mode = _VIT_MODES.get(width, f'{width} wide')
        raise ValueError(f"cvnets {mode} ({width} wide, {depth} layers, {width // 64} heads) does not fit "
                         f"{backbone} ({_tower_text(backbone)}): "
                         + (f"use the {' / '.join(fits)} backbone" if fits else
                            "no backbone of ours has that size; import the text tower only (--text-only)"))
    grid = math.isqrt(state[_POS].shape[-2])
    if grid * grid != state[_POS].shape[-2]:
        raise ValueError(f"cvnets ViT with {state[_POS].shape[-2]} position embeddings: not a square grid")
    notes.append(f"image tower: cvnets' ViT at {16 * grid} px, its native size (cvnets resizes its position "
                 f"embeddings for other sizes as one 1-D sequence, ours as a {grid}x{grid} grid)")
    if any(k.startswith(_AUGMENTOR) for k in state):
        notes.append("RangeAugment's learned magnitudes (image_encoder.neural_augmentor.*) are not imported: "
                     "they augment training images only")
    return 16 * grid, notes


def _cvnets_vit_size(backbone):
    """{'embed_dim', 'depth', 'num_heads'} of a backbone built by vit_cvnets.cvnets_vit, else None."""
    cfg = models.BACKBONES.get(backbone)
    if getattr(cfg.builder, 'func', None) is not vit_cvnets.cvnets_vit:
        return None
    size = {**cfg.builder.keywords, **cfg.timm_kwargs}
    return {k: size[k] for k in ('embed_dim', 'depth', 'num_heads')}


def _tower_text(backbone):
    size = _cvnets_vit_size(backbone)
    if size is None:
        return (f"{models.BACKBONES.get(backbone).tower_name or 'not a ViT'}: no convolutional stem, "
                f"so no exact mapping")
    return f"{size['embed_dim']} wide, {size['depth']} layers, {size['num_heads']} heads"


def _check_image_recipe(recipe):
    """-> notes; ValueError for a recipe whose image encoder ours does not compute."""
    if recipe is None:
        return ["no --cvnets-config: the published CLIP recipes' image settings assumed (GELU, class token, "
                "LayerNorm, simple projection head); pass the recipe YAML to check them"]
    got = {k: recipe.get(k, _DEFAULTS[k]) for k in RECIPE_IMAGE}
    # cvnets builds its image encoder with model.classification.activation when the recipe sets it
    act = recipe.get('model.classification.activation.name') or recipe.get('model.activation.name', 'relu')
    bad = [f"{k}={got[k]!r}" for k, ok in RECIPE_IMAGE.items() if got[k] not in ok]
    bad += [f"image activation {act!r}"] if act != 'gelu' else []
    if bad:
        raise ValueError(f"cvnets image encoder with {', '.join(bad)}: ours is its ViT with a class token, GELU, "
                         f"LayerNorm, BatchNorm in the stem and the simple projection head")
    return []


def _renamed(rest, table):
    """`rest` with its cvnets prefix from `table` replaced by ours, or None."""
    return next((ours + rest[len(c):] for c, ours in table.items() if rest == c or rest.startswith(c + '.')), None)


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
        ours = _renamed(m.group(2), _BLOCK)
        if ours is None:
            raise ValueError(f"{k}: not a tensor of cvnets' pre-norm TransformerEncoder")
        out[f'transformer.resblocks.{m.group(1)}.{ours}'] = v
        used.add(k)
    return out, used


def cvnets_image_to_ours(state):
    """cvnets ViT image encoder + its projection head -> (our keys, the cvnets keys used): timm's
    ViT names (vit_cvnets.py), the position embedding [1, 1, N, W] -> [1, N, W] (patch tokens
    only, as cvnets: timm's no_embed_class), `classifier.proj` [W, E] -> our projection's weight."""
    out = {'visual.pos_embed': state[_POS][0], 'image_projection.weight': state[f'{_I}classifier.proj'].t()}
    used = {_POS, f'{_I}classifier.proj'}
    for k, v in state.items():
        if not k.startswith(_I) or k in used or k.startswith(_AUGMENTOR):
            continue
        rest = k[len(_I):]
        m = re.match(r'transformer\.(\d+)\.(.+)$', rest)
        if m:
            block = _renamed(m.group(2), _VIT_BLOCK)
            ours = block and f'blocks.{m.group(1)}.{block}'
        else:
            ours = _renamed(rest, _VIT_REST)
        if ours is None:
            raise ValueError(f"{k}: not a tensor of cvnets' ViT (the one that maps: conv stem, pre-norm "
                             f"blocks, class token, simple projection head)")
        out[f'visual.{ours}'] = v
        used.add(k)
    return out, used


def load_cvnets(model, state, text_only=False):
    """Load a cvnets CLIP state dict (its text encoder and logit scale only with text_only) into our
    `model` (built with flags_for_cvnets' flags) -> notes. Exact: the same functions, up to float
    rounding."""
    if getattr(model, 'text_tower', None) is not None:
        raise ValueError("this model has a Hugging Face text tower; cvnets' is a CLIP-style transformer")
    new, used = cvnets_text_to_ours(state)
    if not text_only:
        image, image_used = cvnets_image_to_ours(state)
        new.update(image)
        used |= image_used
    left = sorted(k for k in state if k not in used and not k.startswith(_I if text_only else _AUGMENTOR))
    if left:
        raise ValueError(f"{len(left)} cvnets tensors have no place in our model: {left[:6]}")
    keep = ('h_', 'method_head.', 'teacher.', 'logit_bias') + (('visual.', 'image_projection.') if text_only else ())
    return _load(model, new, keep)
