"""OpenAI CLIP / OpenCLIP mappings of interop.py: OpenCLIP model configs (a name, a JSON file,
or read off an OpenAI state dict), the ViT architecture specs on both sides (openclip_vit_spec,
timm_vit_spec, find_timm_vit), OpenCLIP/OpenAI state dicts into our models (flags_for_openclip,
load_openclip) and our models out to OpenCLIP (to_openclip, openclip_export_name, write_openclip).
docs/interop.md says what maps exactly and what is refused."""
import json
import os
import re

import torch
import torch.nn as nn

import checkpoint
import interop_resnet
import interop_clipa
import models

OPENAI_IGNORED = ('input_resolution', 'context_length', 'vocab_size')   # OpenAI's non-weight entries
MODIFIED_RESNET = ("OpenAI/OpenCLIP RN50-family image towers are ModifiedResNets (3-conv stem, "
                   "average-pool downsampling, attention pooling): use our RN*OAI backbones "
                   "(e.g. --model CLIP_RN50OAI_CLIP); timm's resnet50 (our R50) is another network")


# ----------------------------------------------------------------------------- OpenCLIP configs

def openclip_config(spec):
    """An OpenCLIP model config (dict with embed_dim, vision_cfg, text_cfg): a built-in model
    name (open_clip.list_models()), a JSON file (NAME.json or open_clip_config.json) or a
    directory holding open_clip_config.json."""
    if os.path.isdir(spec):
        spec = os.path.join(spec, 'open_clip_config.json')
    if os.path.isfile(spec):
        with open(spec) as f:
            cfg = json.load(f)
        cfg = cfg.get('model_cfg', cfg)
    else:
        import open_clip
        cfg = open_clip.get_model_config(spec)
        if cfg is None:
            raise ValueError(f"--openclip-model {spec!r}: not a file and not an OpenCLIP model "
                             f"(e.g. {', '.join(open_clip.list_models()[:4])}, ...)")
    if not all(k in cfg for k in ('embed_dim', 'vision_cfg', 'text_cfg')):
        raise ValueError(f"{spec}: an OpenCLIP config needs embed_dim, vision_cfg and text_cfg")
    return cfg


def openai_config(state):
    """The OpenCLIP config of an OpenAI CLIP state dict, from its shapes (heads = width / 64,
    QuickGELU, as OpenAI built them)."""
    def count(prefix):
        return len({k.split('.')[len(prefix.split('.')) - 1] for k in state if k.startswith(prefix)})
    width = state['ln_final.weight'].shape[0]
    text = {'context_length': state['positional_embedding'].shape[0],
            'vocab_size': state['token_embedding.weight'].shape[0],
            'width': width, 'heads': width // 64, 'layers': count('transformer.resblocks.')}
    if 'visual.proj' in state:
        vwidth, _, patch, _ = state['visual.conv1.weight'].shape
        grid = round((state['visual.positional_embedding'].shape[0] - 1) ** 0.5)
        vision = {'image_size': grid * patch, 'layers': count('visual.transformer.resblocks.'),
                  'width': vwidth, 'patch_size': patch, 'head_width': 64}
    else:                                                               # ModifiedResNet
        grid = round((state['visual.attnpool.positional_embedding'].shape[0] - 1) ** 0.5)
        vision = {'image_size': grid * 32, 'layers': [count(f'visual.layer{i}.') for i in range(1, 5)],
                  'width': state['visual.layer1.0.conv1.weight'].shape[0], 'patch_size': None}
    return {'embed_dim': state['text_projection'].shape[1], 'quick_gelu': True,
            'vision_cfg': vision, 'text_cfg': text}


def _cfg(cls, d, what):
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"OpenCLIP {what}: {e}") from None


def _vision_cfg(cfg):
    from open_clip.model import CLIPVisionCfg
    return _cfg(CLIPVisionCfg, cfg['vision_cfg'], 'vision_cfg')


def _text_cfg(cfg):
    from open_clip.model import CLIPTextCfg
    t = _cfg(CLIPTextCfg, cfg['text_cfg'], 'text_cfg')
    unsupported = {'hf_model_name': None, 'ls_init_value': None, 'embed_cls': False,
                   'proj_bias': False, 'proj_type': 'linear', 'mlp_ratio': 4.0,
                   'act_kwargs': None, 'block_type': None, 'qk_norm': False, 'scaled_cosine_attn': False,
                   'scale_heads': False, 'scale_attn_inner': False, 'scale_attn': False, 'scale_fc': False}
    bad = [f"{k}={getattr(t, k)!r}" for k, v in unsupported.items() if getattr(t, k) != v]
    if (t.norm_kwargs or {}).get('eps', 1e-5) != 1e-5:
        bad.append(f"norm_kwargs={t.norm_kwargs}")
    if bad:
        raise ValueError(f"OpenCLIP text tower with {', '.join(bad)}: ours is the OpenAI "
                         f"transformer (linear projection) with CLIPA's options only")
    interop_clipa.text_options(t)           # the mask / pooling / tokenizer options it has
    return t


def _square(size):
    size = (size, size) if isinstance(size, int) else tuple(size)
    if size[0] != size[1]:
        raise ValueError(f"non-square image size {size}")
    return size[0]


def openclip_vit_spec(cfg):
    """The architecture an OpenCLIP VisionTransformer config builds, in timm_vit_spec's terms."""
    v = _vision_cfg(cfg)
    if isinstance(v.layers, (tuple, list)):
        raise ValueError(MODIFIED_RESNET)
    unsupported = {'ls_init_value': None, 'pos_embed_type': 'learnable',
                   'act_kwargs': None, 'block_type': None, 'qk_norm': False,
                   'scaled_cosine_attn': False, 'scale_heads': False, 'scale_attn_inner': False,
                   'scale_attn': False, 'scale_fc': False}
    bad = [f"{k}={getattr(v, k)!r}" for k, val in unsupported.items() if getattr(v, k) != val]
    if set(v.norm_kwargs or {}) - {'eps'}:
        bad.append(f"norm_kwargs={v.norm_kwargs}")
    if bad:
        raise ValueError(f"OpenCLIP ViT with {', '.join(bad)}: no timm ViT we build has it")
    pool, heads = interop_clipa.openclip_pool(v)
    return {'pool': pool, 'pool_heads': heads, 'width': v.width, 'layers': v.layers,
            'heads': v.width // v.head_width,
            'mlp_width': int(v.width * v.mlp_ratio), 'patch_size': v.patch_size,
            'image_size': _square(v.image_size), 'ln_pre': not v.no_ln_pre,
            'eps': (v.norm_kwargs or {}).get('eps', 1e-5),
            'act': 'quick_gelu' if cfg.get('quick_gelu') else 'gelu'}


def timm_vit_spec(tower):
    """A timm VisionTransformer's architecture as OpenCLIP's VisionTransformer sees it, or
    ValueError naming what OpenCLIP's ViT cannot express."""
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(tower, VisionTransformer):
        raise ValueError(f"{type(tower).__name__} is not a timm VisionTransformer")
    blk = tower.blocks[0]
    act = type(blk.mlp.act).__name__
    checks = [(tower.cls_token is not None, 'a class token'),
              (not tower.no_embed_class and getattr(tower, 'num_reg_tokens', 0) == 0, 'no register tokens'),
              (tower.pos_embed is not None and not tower.dynamic_img_size, 'a learned fixed-size position embedding'),
              (isinstance(getattr(tower.patch_embed, 'proj', None), nn.Conv2d),   # not a convolutional stem
               'a one-convolution patch embedding'),
              (isinstance(getattr(tower.patch_embed, 'norm', nn.Identity()), nn.Identity), 'no patch-embedding norm'),
              (all(isinstance(getattr(b, n), nn.Identity) for b in tower.blocks for n in ('ls1', 'ls2'))
               and all(isinstance(getattr(b.attn, n, nn.Identity()), nn.Identity) for b in tower.blocks
                       for n in ('q_norm', 'k_norm', 'norm')), 'plain blocks (no layer scale, qk-norm)'),
              (blk.attn.qkv.bias is not None, 'a qkv bias'),
              (act == 'QuickGELU' or (act == 'GELU' and blk.mlp.act.approximate == 'none'), 'GELU or QuickGELU'),
              (isinstance(blk.norm1, nn.LayerNorm) and isinstance(tower.norm_pre, (nn.LayerNorm, nn.Identity)),
               'LayerNorm')]
    missing = [what for ok, what in checks if not ok]
    if missing:
        raise ValueError(f"this timm ViT lacks what OpenCLIP's ViT has: {', '.join(missing)}")
    pool, heads = interop_clipa.tower_pool(tower)
    return {'pool': pool, 'pool_heads': heads, 'width': tower.embed_dim, 'layers': len(tower.blocks),
            'heads': blk.attn.num_heads,
            'mlp_width': blk.mlp.fc1.out_features, 'patch_size': tower.patch_embed.patch_size[0],
            'image_size': _square(tower.patch_embed.img_size),
            'ln_pre': isinstance(tower.norm_pre, nn.LayerNorm), 'eps': blk.norm1.eps,
            'act': 'quick_gelu' if act == 'QuickGELU' else 'gelu'}


def _spec_diff(want, have):
    return [f"{k} {want[k]} (OpenCLIP) vs {have[k]} (ours)" for k in want if want[k] != have[k]]


def find_timm_vit(want):
    """The timm model name whose ViT is exactly `want` (an openclip_vit_spec) but for the
    pooling, or None."""
    import timm

    import towers
    pattern = f"vit_*_patch{want['patch_size']}_*"
    names = [n for n in timm.list_models(pattern) if ('clip' in n) == want['ln_pre']
             and ('quickgelu' in n) == (want['act'] == 'quick_gelu')][:60]
    names.sort(key=lambda n: (towers.native_image_size(n) != want['image_size'], n))
    for name in names:
        try:
            with torch.device('meta'):
                tower = timm.create_model(name, pretrained=False, num_classes=0, img_size=want['image_size'])
            have = timm_vit_spec(tower)
            if all(have[k] == want[k] for k in want if k not in ('pool', 'pool_heads')):
                return name         # the pooling is --image-pool's
        except Exception:                       # another family of ViT (no such kwargs, other layout)
            continue
    return None


# ----------------------------------------------------------------------------- OpenCLIP -> ours

def _is_text_key(k):
    return k.startswith('transformer.') or k in (
        'token_embedding.weight', 'positional_embedding', 'ln_final.weight', 'ln_final.bias', 'text_projection')


def flags_for_openclip(name, cfg, text_only=False, tokenizer_dir=None):
    """create_model flags that rebuild the OpenCLIP architecture of `cfg` under our model `name`
    -> (flags, notes). When the preset's image tower is not the same function (e.g. VITB16's
    timm vit_base_patch16_224 has no ln_pre and LayerNorm eps 1e-6), the matching timm model
    becomes the image tower (image_tower flag, main.py --image-tower); a pooling other than the
    preset's is --image-pool's. `tokenizer_dir`: the local tokenizer of a CLIPA text tower."""
    _, backbone, _ = models.parse_model_name(name)
    preset = models.BACKBONES.get(backbone)
    t = _text_cfg(cfg)
    flags = {'embed_dim': cfg['embed_dim'], 'transformer_width': t.width, 'transformer_heads': t.heads,
             'transformer_layers': t.layers, 'context_length': t.context_length,
             'text_act': 'quick_gelu' if cfg.get('quick_gelu') else 'gelu', 'clip_proj_type': 'linear',
             **interop_clipa.text_flags(t, preset.text, tokenizer_dir)}
    if text_only:
        return flags, [f"text tower only: the {backbone} image tower keeps its initialisation"]
    v = _vision_cfg(cfg)
    if v.timm_model_name:
        import timm
        with torch.device('meta'):
            tower = timm.create_model(v.timm_model_name, pretrained=False, num_classes=0)
        if not _timm_pool_is_default(v.timm_pool, tower) or v.timm_proj != 'linear' or v.timm_proj_bias:
            raise ValueError(f"OpenCLIP timm tower with timm_pool={v.timm_pool!r}, timm_proj={v.timm_proj!r}, "
                             f"timm_proj_bias={v.timm_proj_bias}: ours keeps timm's own pooling and a "
                             f"bias-free linear projection (timm_pool '', timm_proj 'linear')")
        flags['image_size'] = _square(v.image_size)
        ours = (preset.timm_name, preset.timm_kwargs, preset.no_stem_pool, preset.pool)
        if ours != (v.timm_model_name, {}, False, ''):
            flags['image_tower'] = v.timm_model_name
            return flags, [f"image tower: timm {v.timm_model_name} (image_tower; main.py --image-tower)"]
        return flags, []
    if interop_resnet.is_resnet_cfg(v):
        flags['image_size'] = _square(v.image_size)
        interop_resnet.check_preset(backbone, interop_resnet.openclip_resnet_spec(v, flags['image_size']))
        return flags, []
    want = openclip_vit_spec(cfg)
    flags['image_size'] = want['image_size']
    pool, pooled = interop_clipa.pool_flags(want, preset)
    with torch.device('meta'):
        tower = models.build_image_tower(pooled, want['image_size'], embed_dim=cfg['embed_dim'])
    try:
        diff = _spec_diff(want, timm_vit_spec(tower))
    except ValueError as e:
        diff = [str(e)]
    if not diff:
        return {**flags, **pool}, []
    match = find_timm_vit(want)
    if match is None:
        presets = interop_clipa.find_preset(want, want['image_size'])
        raise ValueError(f"the {backbone} tower differs from this OpenCLIP ViT ({'; '.join(diff)}) "
                         f"and no timm ViT matches it exactly" +
                         (f"; our preset {' / '.join(presets)} does: --model {name.replace(backbone, presets[0])}"
                          if presets else ''))
    flags['image_tower'] = match
    pool, _ = interop_clipa.pool_flags(want, models.BackboneCfg(match))   # --image-tower: timm's own pooling
    return {**flags, **pool}, [f"image tower: timm {match} (image_tower; main.py --image-tower {match}): the "
                               f"{backbone} preset differs ({'; '.join(diff)})"]


def _timm_pool_is_default(pool, tower):
    """OpenCLIP's TimmModel resets the classifier with global_pool=pool ('' keeps timm's own)."""
    if not pool:
        return True
    gp = getattr(tower, 'global_pool', None) or getattr(getattr(tower, 'head', None), 'global_pool', None)
    return (gp if isinstance(gp, str) else getattr(gp, 'pool_type', None)) == pool


def load_openclip(model, state, cfg, text_only=False):
    """Load an OpenCLIP/OpenAI state dict into our `model` (whose architecture must match `cfg`;
    see flags_for_openclip) -> notes. Exact: the same functions, up to float rounding."""
    state = {k[len('text.'):] if k.startswith('text.') else k: v for k, v in state.items()}  # CustomTextCLIP
    if text_only and model.embed_dim != cfg['embed_dim']:
        raise ValueError(f"embed dim {model.embed_dim} vs {cfg['embed_dim']} (OpenCLIP)")
    _check_text(model, cfg)
    new = {k: v for k, v in state.items() if _is_text_key(k)}
    new['logit_scale'] = state['logit_scale'].reshape(())
    used = set(new)
    notes = []
    if 'logit_bias' in state:
        if not hasattr(model, 'logit_bias'):
            raise ValueError("the checkpoint has a logit bias (SigLIP-style): use method SIGLIP")
        new['logit_bias'] = state['logit_bias'].reshape(())
        used.add('logit_bias')
    elif hasattr(model, 'logit_bias'):
        notes.append("no logit bias in the checkpoint: logit_bias keeps its initial value")
    if not text_only:
        visual, vused = _openclip_visual_to_ours(model, state, cfg)
        new.update(visual)
        used |= vused
        queries = state.get('visual.attn_pool.query', torch.zeros(1)).shape[0]
        if queries > 1:
            notes.append(f"attention pool: its first of {queries} queries kept, the only one that reaches "
                         f"the image embedding (queries do not interact)")
    ignored = OPENAI_IGNORED + (('visual.',) if text_only else ())
    leftover = sorted(k for k in state if k not in used and not k.startswith(ignored)
                      and not k.endswith('attn_mask'))
    if leftover:
        raise ValueError(f"{len(leftover)} checkpoint tensors have no place in our model: {leftover[:6]}")
    keep = ('h_', 'method_head.', 'teacher.', 'sd_logit_scale') + (('visual.', 'image_projection.') if text_only else ())
    return notes + _load(model, new, keep)


def _check_text(model, cfg):
    t, c = _text_cfg(cfg), model.text_cfg
    if getattr(model, 'text_tower', None) is not None:
        raise ValueError("this model has a Hugging Face text tower; OpenCLIP's is the CLIP transformer")
    have = {'width': c.width, 'heads': c.heads, 'layers': c.layers, 'context_length': c.context_length,
            'quick_gelu': c.act == 'quick_gelu'}
    want = {'width': t.width, 'heads': t.heads, 'layers': t.layers, 'context_length': t.context_length,
            'quick_gelu': bool(cfg.get('quick_gelu'))}
    diff = [f"{k} {want[k]} (OpenCLIP) vs {have[k]} (ours)" for k in want if want[k] != have[k]]
    diff += interop_clipa.text_differences(model, t)
    if diff:
        raise ValueError(f"text towers differ: {'; '.join(diff)}")


def _openclip_visual_to_ours(model, state, cfg):
    v = _vision_cfg(cfg)
    if interop_resnet.is_resnet_cfg(v):
        want = interop_resnet.openclip_resnet_spec(v, _square(v.image_size))
        return interop_resnet.visual_to_ours(model, state, want)
    if v.timm_model_name:
        if v.timm_model_name != model.backbone_cfg.timm_name or not _timm_pool_is_default(v.timm_pool, model.visual):
            raise ValueError(f"OpenCLIP timm tower {v.timm_model_name} (timm_pool {v.timm_pool!r}) vs ours "
                             f"{model.backbone_cfg.timm_name} (timm's own pooling)")
        out = {'visual.' + k[len('visual.trunk.'):]: val for k, val in state.items() if k.startswith('visual.trunk.')}
        out['image_projection.weight'] = state['visual.head.proj.weight']
        return out, set(k for k in state if k.startswith('visual.trunk.')) | {'visual.head.proj.weight'}
    diff = _spec_diff(openclip_vit_spec(cfg), timm_vit_spec(model.visual))
    if diff:
        raise ValueError(f"image towers differ: {'; '.join(diff)} (see flags_for_openclip)")
    if not isinstance(model.image_projection, nn.Linear):
        raise ValueError("our image projection is an MLP; OpenCLIP's ViT projects with one matrix")
    oc = {k[len('visual.'):]: val for k, val in state.items() if k.startswith('visual.')}
    out = {'visual.' + k: val for k, val in _vit_from_openclip(oc, model.visual).items()}
    out['image_projection.weight'] = oc['proj'].t()
    return out, {'visual.' + k for k in oc}


def _vit_from_openclip(oc, tower):
    """OpenCLIP VisionTransformer keys (no 'visual.') -> timm ViT keys."""
    out = {'patch_embed.proj.weight': oc['conv1.weight'], 'cls_token': oc['class_embedding'].view(1, 1, -1),
           'pos_embed': oc['positional_embedding'].unsqueeze(0), **interop_clipa.head_from_openclip(oc, tower)}
    if tower.patch_embed.proj.bias is not None:
        out['patch_embed.proj.bias'] = torch.zeros_like(tower.patch_embed.proj.bias)
    if 'ln_pre.weight' in oc:
        out['norm_pre.weight'], out['norm_pre.bias'] = oc['ln_pre.weight'], oc['ln_pre.bias']
    for i in range(len(tower.blocks)):
        for ours, theirs in _BLOCK_KEYS:
            out[f'blocks.{i}.{ours}'] = oc[f'transformer.resblocks.{i}.{theirs}']
    return out


_BLOCK_KEYS = [(f'{a}.{p}', f'{b}.{p}')                               # timm ViT block -> OpenCLIP resblock
               for a, b in [('norm1', 'ln_1'), ('norm2', 'ln_2'), ('attn.proj', 'attn.out_proj'),
                            ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj')]
               for p in ('weight', 'bias')] + [('attn.qkv.weight', 'attn.in_proj_weight'),
                                               ('attn.qkv.bias', 'attn.in_proj_bias')]


def _load(model, new, keep_prefixes=()):
    """Load `new` (strict, except keys under keep_prefixes, which keep their init) -> notes;
    a BYOL teacher starts as a copy of the loaded student."""
    own = model.state_dict()
    missing = [k for k in own if k not in new and not k.endswith('num_batches_tracked')]
    bad = [k for k in missing if not k.startswith(keep_prefixes)]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in new.items()
              if k in own and v.shape != own[k].shape]
    extra = [k for k in new if k not in own]
    if bad or shapes or extra:
        parts = [f"{what}: {items[:4]}" for what, items in (('missing', bad), ('shape (checkpoint vs model)', shapes),
                                                            ('unexpected', extra)) if items]
        raise ValueError(f"checkpoint does not fit {getattr(model, 'model_name', 'the model')}: {'; '.join(parts)}")
    model.load_state_dict(new, strict=False)
    notes = []
    kept = sorted({k.split('.')[0] for k in missing if not k.startswith('teacher.')})
    if kept:
        notes.append(f"kept at initialisation (not in the checkpoint): {', '.join(kept)}")
    if getattr(model, 'teacher', None) is not None and not any(k.startswith('teacher.') for k in new):
        model.teacher.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('teacher.')})
        notes.append("EMA teacher initialised as a copy of the loaded model")
    return notes


# ----------------------------------------------------------------------------- ours -> OpenCLIP

def to_openclip(model, tokenizer_dir=None):
    """-> (config, state dict, notes): an OpenCLIP CLIP model of the same function as our `model`'s
    z head. ViTs map to OpenCLIP's own VisionTransformer (patch-embedding bias folded into the
    position embedding, no_ln_pre / norm eps / pooling set as needed); other timm towers to
    OpenCLIP's timm adapter (TimmModel, timm_pool '', linear projection). `tokenizer_dir`: the
    checkpoint's --text-tokenizer (CLIPA), named in the text config (interop_clipa.write_tokenizer)."""
    if getattr(model, 'text_tower', None) is not None:
        raise ValueError("a Hugging Face text tower has no OpenCLIP CLIP layout")
    if not isinstance(model.image_projection, nn.Linear):
        raise ValueError("our MLP image projection (--clip-proj-type mlp) has no OpenCLIP equivalent")
    c = model.text_cfg
    quick = c.act == 'quick_gelu'
    cfg = {'embed_dim': model.embed_dim, 'quick_gelu': quick,
           'vision_cfg': {}, 'text_cfg': {'context_length': c.context_length, 'vocab_size': c.vocab_size,
                                          'width': c.width, 'heads': c.heads, 'layers': c.layers,
                                          **interop_clipa.export_text_cfg(c, tokenizer_dir)}}
    sd = model.state_dict()
    state = {k: v for k, v in sd.items() if _is_text_key(k)}
    state['logit_scale'] = sd['logit_scale']
    if 'logit_bias' in sd:
        state['logit_bias'] = sd['logit_bias']
        cfg['init_logit_bias'] = float(sd['logit_bias'])
    why_not_vit = _vit_export_problem(model, quick)
    if model.backbone_cfg.proj_bias:                        # OpenAI's ModifiedResNet: its attnpool projects
        cfg['vision_cfg'], visual = interop_resnet.visual_to_openclip(model)
        state.update(visual)
    elif why_not_vit is None:
        spec = timm_vit_spec(model.visual)
        cfg['vision_cfg'] = {'image_size': spec['image_size'], 'layers': spec['layers'], 'width': spec['width'],
                             'head_width': spec['width'] // spec['heads'],
                             'mlp_ratio': spec['mlp_width'] / spec['width'], 'patch_size': spec['patch_size']}
        if not spec['ln_pre']:
            cfg['vision_cfg']['no_ln_pre'] = True
        if spec['eps'] != 1e-5:
            cfg['vision_cfg']['norm_kwargs'] = {'eps': spec['eps']}
        cfg['vision_cfg'].update(interop_clipa.openclip_pool_cfg(spec['pool'], spec['pool_heads']))
        tower = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
        state.update({'visual.' + k: v for k, v in _vit_to_openclip(tower, model.visual).items()})
        state['visual.proj'] = sd['image_projection.weight'].t().contiguous()
    else:
        problem = _timm_export_problem(model)
        if problem:
            raise ValueError(f"no OpenCLIP image tower reproduces ours: {why_not_vit}; {problem}")
        cfg['vision_cfg'] = {'timm_model_name': model.backbone_cfg.timm_name, 'timm_model_pretrained': False,
                             'timm_pool': '', 'timm_proj': 'linear', 'timm_proj_bias': False,
                             'image_size': model.image_size}
        state.update({'visual.trunk.' + k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')})
        state['visual.head.proj.weight'] = sd['image_projection.weight']
    dropped = sorted({k.split('.')[0] for k in sd if k.split('.')[0] in ('h_image_projection', 'h_text_projection',
                                                                         'h_logit_scale', 'method_head', 'teacher',
                                                                         'sd_logit_scale')})
    notes = [f"not exported (no OpenCLIP equivalent; zero-shot uses the z head): {', '.join(dropped)}"
             ] if dropped else []
    return cfg, state, notes


def _vit_export_problem(model, quick):
    try:
        spec = timm_vit_spec(model.visual)
    except ValueError as e:
        return str(e)
    if (spec['act'] == 'quick_gelu') != quick:
        return (f"OpenCLIP's quick_gelu sets both towers; ours: image {spec['act']}, text "
                f"{model.text_cfg.act}")
    return None


def _timm_export_problem(model):
    """Why OpenCLIP's TimmModel (timm.create_model(name) + reset_classifier(0)) would not build
    our image tower, or None."""
    b = model.backbone_cfg
    if b.builder is not None or not b.timm_name:
        return f"our {type(model.visual).__name__} tower is not a timm model"
    if b.timm_kwargs or b.no_stem_pool or b.pool:
        return (f"TimmModel builds {b.timm_name} with timm's defaults, ours with "
                f"{b.timm_kwargs or ('pool ' + b.pool if b.pool else 'no stem pool')}")
    import timm
    with torch.device('meta'):
        ref = timm.create_model(b.timm_name, pretrained=False)
    ref.reset_classifier(0)
    shapes = {k: v.shape for k, v in ref.state_dict().items()}
    if shapes != {k: v.shape for k, v in model.visual.state_dict().items()}:
        return f"TimmModel builds {b.timm_name} at its default size, ours at {model.image_size} px"
    return None


def _vit_to_openclip(tower_sd, tower):
    """timm ViT keys -> OpenCLIP VisionTransformer keys; a patch-embedding bias b is folded into
    the position embedding of the patch tokens: conv(x) + b + pos = conv(x) + (pos + b)."""
    pos = tower_sd['pos_embed'][0].clone()
    if tower_sd.get('patch_embed.proj.bias') is not None:
        pos[1:] += tower_sd['patch_embed.proj.bias']
    out = {'conv1.weight': tower_sd['patch_embed.proj.weight'], 'class_embedding': tower_sd['cls_token'].reshape(-1),
           'positional_embedding': pos, **interop_clipa.head_to_openclip(tower_sd, tower)}
    if 'norm_pre.weight' in tower_sd:
        out['ln_pre.weight'], out['ln_pre.bias'] = tower_sd['norm_pre.weight'], tower_sd['norm_pre.bias']
    for i in range(len(tower.blocks)):
        for ours, theirs in _BLOCK_KEYS:
            out[f'transformer.resblocks.{i}.{theirs}'] = tower_sd[f'blocks.{i}.{ours}']
    return out


def openclip_export_name(model_name, requested=None):
    """The name an OpenCLIP export is registered under (DIR/NAME.json). open_clip.get_tokenizer
    (3.x) gives a registered name containing 'siglip' (any case) SigLIP's sentencepiece
    tokenizer, reads 'hf-hub:' / 'local-dir:' as a source, and (never written by to_openclip)
    an HF tokenizer to a text_cfg with hf_tokenizer_name. Our models read CLIP's BPE, so our
    name is kept with 'SIGLIP' written 'SIG-LIP', and such a --name is refused."""
    if requested is None:
        return re.sub('siglip', lambda m: m.group()[:3] + '-' + m.group()[3:], model_name, flags=re.I)
    if 'siglip' in requested.lower() or re.search(r'[:/\\]', requested):
        raise ValueError(f"--name {requested!r}: open_clip.get_tokenizer gives a name containing 'siglip' "
                         f"SigLIP's tokenizer and reads ':' as a schema ('/' makes a folder), but our models "
                         f"use CLIP's BPE tokenizer; pick another name, e.g. {openclip_export_name(model_name)!r}")
    return requested


def write_openclip(out_dir, name, cfg, state, image_size):
    """DIR/NAME.json (open_clip.add_model_config), DIR/open_clip_config.json (local-dir:DIR) and
    DIR/open_clip_pytorch_model.bin (torch.save of the state dict) -> the weights path."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f'{name}.json'), 'w') as f:
        json.dump(cfg, f, indent=2)
    from augment import CLIP_MEAN, CLIP_STD
    preprocess = {'size': image_size, 'mean': list(CLIP_MEAN), 'std': list(CLIP_STD),
                  'interpolation': 'bicubic', 'resize_mode': 'shortest'}
    with open(os.path.join(out_dir, 'open_clip_config.json'), 'w') as f:
        json.dump({'model_cfg': cfg, 'preprocess_cfg': preprocess}, f, indent=2)
    path = os.path.join(out_dir, 'open_clip_pytorch_model.bin')
    checkpoint.save_atomic({k: v.contiguous() for k, v in state.items()}, path)   # plain: OpenCLIP reads it
    return path
