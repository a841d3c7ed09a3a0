"""Checkpoint interop: OpenAI CLIP, OpenCLIP, clip-rocket and SLIP weights into our models, and
our models out to OpenCLIP (and to the clip-rocket / SLIP layouts).

    python interop.py import --from openai --checkpoint ViT-B-32.pt --model CLIP_VITB32_CLIP --out ours.pt
    python interop.py import --from openclip --checkpoint open_clip_pytorch_model.bin \
        --openclip-model ViT-B-32 --model CLIP_VITB32_CLIP --out ours.pt
    python interop.py import --from cliprocket --checkpoint checkpoint_best.pt --out ours.pt
    python interop.py export --checkpoint output/checkpoint_best.pt --out exported/
    python -c "import open_clip; open_clip.create_model('local-dir:exported')"

An imported checkpoint holds `model`, `model_name` and `args` (the model flags), which is what
`eval_zeroshot.py --resume` and `main.py --finetune` read. Files are read without running code:
torch files with weights_only=True (argparse.Namespace allowed: upstream checkpoints keep their
args in one), OpenAI's TorchScript archives by an unpickler that only rebuilds tensors.
docs/interop.md says what maps exactly and what is refused.
"""
import argparse
import collections
import json
import os
import pickle
import re
import sys
import zipfile

import torch
import torch.nn as nn

import checkpoint
import models
import utils

OPENAI_IGNORED = ('input_resolution', 'context_length', 'vocab_size')   # OpenAI's non-weight entries
MODIFIED_RESNET = ("OpenAI/OpenCLIP RN50-family image towers are ModifiedResNets (3-conv stem, "
                   "average-pool downsampling, attention pooling with its own biased output "
                   "projection); our R50 is timm's resnet50 (1-conv stem, strided convolutions, "
                   "average pooling): no exact mapping. Import the text tower only (--text-only) or "
                   "use a ViT checkpoint")
WEIGHT_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
                'open_clip_pytorch_model.bin', 'open_clip_pytorch_model.pth', 'model.safetensors',
                'pytorch_model.bin')


# ----------------------------------------------------------------------------- reading files

_STORAGES = {'FloatStorage': torch.float32, 'HalfStorage': torch.float16, 'DoubleStorage': torch.float64,
             'BFloat16Storage': torch.bfloat16, 'LongStorage': torch.int64, 'IntStorage': torch.int32,
             'ShortStorage': torch.int16, 'CharStorage': torch.int8, 'ByteStorage': torch.uint8,
             'BoolStorage': torch.bool}


class _ScriptObject:
    """A TorchScript object of an archive's data.pkl: its attributes are kept, its code never runs."""

    def __setstate__(self, state):
        self.state = state


def _rebuild_tensor(storage, offset, size, stride, *_):
    if storage.numel() == 0:
        return torch.zeros(tuple(size), dtype=storage.dtype)
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript data.pkl: tensors, dicts, lists and stand-ins for the scripted
    classes; any other global is refused, so no code from the file can run."""
    SAFE = {('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
            ('collections', 'OrderedDict'): collections.OrderedDict,
            **{('torch.jit._pickle', f'build_{k}list'): list for k in ('int', 'double', 'bool', 'tensor')}}

    def __init__(self, file, archive, root):
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module, name):
        if module == '__torch__' or module.startswith('__torch__.'):
            return _ScriptObject
        if module == 'torch' and name in _STORAGES:
            return _STORAGES[name]
        if (module, name) in self.SAFE:
            return self.SAFE[module, name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _, _ = pid                        # ('storage', dtype, key, location, numel)
        data = self.archive.read(f'{self.root}/data/{key}')
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)


def is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any('/code/' in n or n.endswith('/constants.pkl') for n in z.namelist())


def read_torchscript(path):
    """{name: tensor} of every tensor attribute of a TorchScript archive (its state dict, plus
    tensor attributes such as OpenAI's attention masks), without torch.jit.load."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
        if not pkl:
            raise ValueError(f"{path}: a TorchScript archive without data.pkl")
        root = pkl[0][:-len('/data.pkl')]
        if f'{root}/byteorder' in z.namelist() and z.read(f'{root}/byteorder') != b'little':
            raise ValueError(f"{path}: big-endian archive")
        with z.open(pkl[0]) as f:
            try:
                obj = _ArchiveUnpickler(f, z, root).load()
            except Exception as e:                  # a refused global, or a malformed archive
                raise ValueError(f"{path}: TorchScript archive: {e}") from None

    def walk(o, prefix):
        for k, v in (getattr(o, 'state', None) or {}).items():
            if torch.is_tensor(v):
                yield prefix + k, v
            elif isinstance(v, _ScriptObject):
                yield from walk(v, f'{prefix}{k}.')
    return dict(walk(obj, ''))


def read_checkpoint(path):
    """-> (state, meta): the weights of a supported file, 'module.' prefixes dropped, floats as
    fp32; meta: 'args' (upstream args as a dict), 'momentum' (clip-rocket's momentum model),
    'config' (an OpenCLIP directory's model config)."""
    meta = {'args': None, 'momentum': None, 'config': None}
    if os.path.isdir(path):
        cfg_path = os.path.join(path, 'open_clip_config.json')
        if os.path.isfile(cfg_path):
            meta['config'] = openclip_config(cfg_path)
        files = [os.path.join(path, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(path, f))]
        if not files:
            raise ValueError(f"{path}: no weights file ({', '.join(WEIGHT_FILES[:3])}, ...)")
        path = files[0]
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        obj = load_file(path)
    elif is_torchscript(path):
        obj = read_torchscript(path)
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot load {path} safely (weights_only): {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):    # clip-rocket, SLIP, OpenCLIP training
        args = obj.get('args')
        meta['args'] = vars(args) if isinstance(args, argparse.Namespace) else args
        meta['momentum'] = obj.get('momentum_state_dict')
        obj = obj['state_dict']
    elif isinstance(obj, dict) and 'model_name' in obj and isinstance(obj.get('model'), dict):
        raise ValueError(f"{path} is one of our checkpoints already (model {obj['model_name']})")
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: not a state dict")
    state = _clean(obj)
    if meta['momentum'] is not None:
        meta['momentum'] = _clean(meta['momentum'])
    return state, meta


def _clean(state):
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


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
        vision = {'layers': [count(f'visual.layer{i}.') for i in range(1, 5)], 'width': 64}
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
    unsupported = {'hf_model_name': None, 'hf_tokenizer_name': None, 'ls_init_value': None,
                   'embed_cls': False, 'no_causal_mask': False,
                   'pool_type': 'argmax', 'proj_bias': False, 'proj_type': 'linear', 'mlp_ratio': 4.0,
                   'act_kwargs': None, 'block_type': None, 'qk_norm': False, 'scaled_cosine_attn': False,
                   'scale_heads': False, 'scale_attn_inner': False, 'scale_attn': False, 'scale_fc': False}
    bad = [f"{k}={getattr(t, k)!r}" for k, v in unsupported.items() if getattr(t, k) != v]
    if (t.norm_kwargs or {}).get('eps', 1e-5) != 1e-5:
        bad.append(f"norm_kwargs={t.norm_kwargs}")
    if bad:
        raise ValueError(f"OpenCLIP text tower with {', '.join(bad)}: ours is the OpenAI causal "
                         f"transformer (EOT pooling, linear projection) only")
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
    unsupported = {'ls_init_value': None, 'attentional_pool': False, 'pos_embed_type': 'learnable',
                   'pool_type': 'tok', 'act_kwargs': None, 'block_type': None, 'qk_norm': False,
                   'scaled_cosine_attn': False, 'scale_heads': False, 'scale_attn_inner': False,
                   'scale_attn': False, 'scale_fc': False}
    bad = [f"{k}={getattr(v, k)!r}" for k, val in unsupported.items() if getattr(v, k) != val]
    if set(v.norm_kwargs or {}) - {'eps'}:
        bad.append(f"norm_kwargs={v.norm_kwargs}")
    if bad:
        raise ValueError(f"OpenCLIP ViT with {', '.join(bad)}: no timm ViT we build has it")
    return {'width': v.width, 'layers': v.layers, 'heads': v.width // v.head_width,
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
    checks = [(tower.cls_token is not None and tower.global_pool == 'token', 'class-token pooling'),
              (not tower.no_embed_class and getattr(tower, 'num_reg_tokens', 0) == 0, 'no register tokens'),
              (tower.pos_embed is not None and not tower.dynamic_img_size, 'a learned fixed-size position embedding'),
              (isinstance(tower.fc_norm, nn.Identity) and tower.attn_pool is None, 'no fc_norm / attention pool'),
              (isinstance(tower.patch_embed.norm, nn.Identity), 'no patch-embedding norm'),
              (all(isinstance(getattr(b, n), nn.Identity) for b in tower.blocks for n in ('ls1', 'ls2'))
               and all(isinstance(getattr(b.attn, n, nn.Identity()), nn.Identity) for b in tower.blocks
                       for n in ('q_norm', 'k_norm', 'norm')), 'plain blocks (no layer scale, qk-norm)'),
              (blk.attn.qkv.bias is not None, 'a qkv bias'),
              (act == 'QuickGELU' or (act == 'GELU' and blk.mlp.act.approximate == 'none'), 'GELU or QuickGELU'),
              (isinstance(tower.norm, nn.LayerNorm) and isinstance(tower.norm_pre, (nn.LayerNorm, nn.Identity)),
               'LayerNorm')]
    missing = [what for ok, what in checks if not ok]
    if missing:
        raise ValueError(f"this timm ViT lacks what OpenCLIP's ViT has: {', '.join(missing)}")
    return {'width': tower.embed_dim, 'layers': len(tower.blocks), 'heads': blk.attn.num_heads,
            'mlp_width': blk.mlp.fc1.out_features, 'patch_size': tower.patch_embed.patch_size[0],
            'image_size': _square(tower.patch_embed.img_size),
            'ln_pre': isinstance(tower.norm_pre, nn.LayerNorm), 'eps': tower.norm.eps,
            'act': 'quick_gelu' if act == 'QuickGELU' else 'gelu'}


def _spec_diff(want, have):
    return [f"{k} {want[k]} (OpenCLIP) vs {have[k]} (ours)" for k in want if want[k] != have[k]]


def find_timm_vit(want):
    """The timm model name whose ViT is exactly `want` (an openclip_vit_spec), or None."""
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
            if timm_vit_spec(tower) == want:
                return name
        except Exception:                       # another family of ViT (no such kwargs, other layout)
            continue
    return None


# ----------------------------------------------------------------------------- OpenCLIP -> ours

def _is_text_key(k):
    return k.startswith('transformer.') or k in (
        'token_embedding.weight', 'positional_embedding', 'ln_final.weight', 'ln_final.bias', 'text_projection')


def flags_for_openclip(name, cfg, text_only=False):
    """create_model flags that rebuild the OpenCLIP architecture of `cfg` under our model `name`
    -> (flags, notes). When the preset's image tower is not the same function (e.g. VITB16's
    timm vit_base_patch16_224 has no ln_pre and LayerNorm eps 1e-6), the matching timm model
    becomes the image tower (image_tower flag, main.py --image-tower)."""
    _, backbone, _ = models.parse_model_name(name)
    t = _text_cfg(cfg)
    if t.vocab_size != models.TextCfg.vocab_size:
        raise ValueError(f"text vocabulary {t.vocab_size}: ours is fixed at {models.TextCfg.vocab_size}")
    flags = {'embed_dim': cfg['embed_dim'], 'transformer_width': t.width, 'transformer_heads': t.heads,
             'transformer_layers': t.layers, 'context_length': t.context_length,
             'text_act': 'quick_gelu' if cfg.get('quick_gelu') else 'gelu', 'clip_proj_type': 'linear'}
    if text_only:
        return flags, [f"text tower only: the {backbone} image tower keeps its initialisation"]
    v = _vision_cfg(cfg)
    preset = models.BACKBONES.get(backbone)
    if v.timm_model_name:
        import timm
        with torch.device('meta'):
            tower = timm.create_model(v.timm_model_name, pretrained=False, num_classes=0)
        if not _timm_pool_is_default(v.timm_pool, tower) or v.timm_proj != 'linear' or v.timm_proj_bias:
            raise ValueError(f"OpenCLIP timm tower with timm_pool={v.timm_pool!r}, timm_proj={v.timm_proj!r}, "
                             f"timm_proj_bias={v.timm_proj_bias}: ours keeps timm's own pooling and a "
                             f"bias-free linear projection (timm_pool '', timm_proj 'linear')")
        flags['image_size'] = _square(v.image_size)
        if (preset.timm_name, preset.timm_kwargs, preset.no_stem_pool) != (v.timm_model_name, {}, False):
            flags['image_tower'] = v.timm_model_name
            return flags, [f"image tower: timm {v.timm_model_name} (image_tower; main.py --image-tower)"]
        return flags, []
    want = openclip_vit_spec(cfg)
    flags['image_size'] = want['image_size']
    with torch.device('meta'):
        tower = models.build_image_tower(preset, want['image_size'])
    try:
        diff = _spec_diff(want, timm_vit_spec(tower))
    except ValueError as e:
        diff = [str(e)]
    if not diff:
        return flags, []
    match = find_timm_vit(want)
    if match is None:
        raise ValueError(f"the {backbone} tower differs from this OpenCLIP ViT ({'; '.join(diff)}) "
                         f"and no timm ViT matches it exactly")
    flags['image_tower'] = match
    return flags, [f"image tower: timm {match} (image_tower; main.py --image-tower {match}): the "
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
    ignored = OPENAI_IGNORED + (('visual.',) if text_only else ())
    leftover = sorted(k for k in state if k not in used and not k.startswith(ignored)
                      and not k.endswith('attn_mask'))
    if leftover:
        raise ValueError(f"{len(leftover)} checkpoint tensors have no place in our model: {leftover[:6]}")
    keep = ('h_', 'method_head.', 'teacher.') + (('visual.', 'image_projection.') if text_only else ())
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
    if diff:
        raise ValueError(f"text towers differ: {'; '.join(diff)}")


def _openclip_visual_to_ours(model, state, cfg):
    v = _vision_cfg(cfg)
    if any(k.startswith('visual.attnpool.') for k in state) or isinstance(v.layers, (tuple, list)):
        raise ValueError(MODIFIED_RESNET)
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
           'pos_embed': oc['positional_embedding'].unsqueeze(0),
           'norm.weight': oc['ln_post.weight'], 'norm.bias': oc['ln_post.bias']}
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

def to_openclip(model):
    """-> (config, state dict, notes): an OpenCLIP CLIP model of the same function as our `model`'s
    z head. ViTs map to OpenCLIP's own VisionTransformer (patch-embedding bias folded into the
    position embedding, no_ln_pre / norm eps set as needed); other timm towers to OpenCLIP's
    timm adapter (TimmModel, timm_pool '', linear projection)."""
    if getattr(model, 'text_tower', None) is not None:
        raise ValueError("a Hugging Face text tower has no OpenCLIP CLIP layout")
    if not isinstance(model.image_projection, nn.Linear):
        raise ValueError("our MLP image projection (--clip-proj-type mlp) has no OpenCLIP equivalent")
    c = model.text_cfg
    quick = c.act == 'quick_gelu'
    cfg = {'embed_dim': model.embed_dim, 'quick_gelu': quick,
           'vision_cfg': {}, 'text_cfg': {'context_length': c.context_length, 'vocab_size': c.vocab_size,
                                          'width': c.width, 'heads': c.heads, 'layers': c.layers}}
    sd = model.state_dict()
    state = {k: v for k, v in sd.items() if _is_text_key(k)}
    state['logit_scale'] = sd['logit_scale']
    if 'logit_bias' in sd:
        state['logit_bias'] = sd['logit_bias']
        cfg['init_logit_bias'] = float(sd['logit_bias'])
    why_not_vit = _vit_export_problem(model, quick)
    if why_not_vit is None:
        spec = timm_vit_spec(model.visual)
        cfg['vision_cfg'] = {'image_size': spec['image_size'], 'layers': spec['layers'], 'width': spec['width'],
                             'head_width': spec['width'] // spec['heads'],
                             'mlp_ratio': spec['mlp_width'] / spec['width'], 'patch_size': spec['patch_size']}
        if not spec['ln_pre']:
            cfg['vision_cfg']['no_ln_pre'] = True
        if spec['eps'] != 1e-5:
            cfg['vision_cfg']['norm_kwargs'] = {'eps': spec['eps']}
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
                                                                         'h_logit_scale', 'method_head', 'teacher')})
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
    if b.timm_kwargs or b.no_stem_pool:
        return f"TimmModel builds {b.timm_name} with timm's defaults, ours with {b.timm_kwargs or 'no stem pool'}"
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
           'positional_embedding': pos, 'ln_post.weight': tower_sd['norm.weight'],
           'ln_post.bias': tower_sd['norm.bias']}
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


# ----------------------------------------------------------------------------- clip-rocket, SLIP

_MLP3 = {0: 'layer1', 1: 'bn1', 3: 'layer2', 4: 'bn2', 6: 'layer3'}   # our 3-layer projector -> upstream _build_mlp
_SIDE = {'image': ('image', 'global'), 'text': ('text', 'global'),
         'image_views': ('image', 'local'), 'text_views': ('text', 'local')}
_PRED = {'image': 'image_text_predictor', 'text': 'text_image_predictor'}


def upstream_key(model, key, layout='cliprocket'):
    """Our key -> (upstream key, transpose, bias key folded into this BatchNorm running mean)
    in clip-rocket's (or SLIP's) model layout; None when upstream has no such tensor."""
    if key.startswith('visual.') or (_is_text_key(key) and key != 'text_projection') or key == 'logit_scale':
        return key, False, None
    if layout == 'slip':
        return {'image_projection.weight': ('image_projection', True, None),
                'text_projection': ('text_projection', False, None)}.get(key)
    if key == 'image_projection.weight' and isinstance(model.image_projection, nn.Linear):
        return 'image_projector.weight', False, None
    if key == 'text_projection':
        return 'text_projector.weight', True, None
    if key == 'h_logit_scale':
        return 'l2l_logit_scale', False, None
    m = re.match(r'h_(image|text)_projection\.(?:(\d+)\.)?(\w+)$', key)
    if m:
        side, i, param = m.groups()
        base = f'l2l_{side}_projector'
        if i is None:
            return f'{base}.{param}', False, None
        fold = f'{base}.{_MLP3[int(i) - 1]}.bias' if int(i) in (1, 4) and param == 'running_mean' else None
        return f'{base}.{_MLP3[int(i)]}.{param}', False, fold
    m = re.match(r'method_head\.(proj|pred)\.(image_views|text_views|image|text)\.(\d+)\.(\w+)$', key)
    if m:
        return _head_key(model.method_head, *m.groups())
    return None


def _head_key(head, part, side, i, param):
    from heads import BarLIPHead
    mod, where = _SIDE[side]
    i = int(i)
    if isinstance(head, BarLIPHead):
        base = f'barlip_{mod}_projector_{where}'
        fold = f'{base}.{i - 1}.bias' if i in (1, 4, 7) and param == 'running_mean' else None
        return f'{base}.{i}.{param}', False, fold
    if part == 'pred':
        return f'{_PRED[mod]}_{where}.{i}.{param}', False, None
    base = f'siamlip_{mod}_projector_{where}'
    if len(getattr(head.proj, side)) == 5:                  # with the final affine-free BN
        return (f'{base}.0.{i}.{param}' if i < 4 else f'{base}.1.{param}'), False, None
    return f'{base}.{i}.{param}', False, None


def upstream_aliases(model):
    """(alias prefix, canonical prefix, shared) of upstream modules that ours have once: shared
    = the same upstream module under two names; not shared = upstream's own copy (dropped on
    import: the local SiamLIP projectors' final BatchNorm when heads are shared)."""
    from heads import BarLIPHead, SiamLIPHead
    out = []
    if isinstance(model, models.CL2L) and not model.head_cfg.separate_proj:
        out += [('l2l_image_projector.', 'image_projector.', True), ('l2l_text_projector.', 'text_projector.', True)]
    head = getattr(model, 'method_head', None)
    if head is None or model.head_cfg.separate_proj_child:
        return out
    for mod in ('image', 'text'):
        if isinstance(head, BarLIPHead):
            out.append((f'barlip_{mod}_projector_local.', f'barlip_{mod}_projector_global.', True))
        elif isinstance(head, SiamLIPHead):
            g, loc = f'siamlip_{mod}_projector_global', f'siamlip_{mod}_projector_local'
            if len(getattr(head.proj, mod)) == 5:
                out += [(f'{loc}.0.', f'{g}.0.', True), (f'{loc}.1.', f'{g}.1.', False)]
            else:
                out.append((f'{loc}.', f'{g}.', True))
            out.append((f'{_PRED[mod]}_local.', f'{_PRED[mod]}_global.', True))
    return out


def to_upstream(model, layout='cliprocket'):
    """Our model -> {'state_dict': ..., 'momentum_state_dict'?: ...} in clip-rocket's (or SLIP's)
    layout, 'module.' prefixed as their DDP checkpoints; upstream biases before a BatchNorm are
    zero and the running means ours (exact)."""
    if isinstance(model, models.CL2L) and layout == 'slip':
        raise ValueError("SLIP has no CL2L models")
    student = {k: v for k, v in model.state_dict().items() if not k.startswith('teacher.')}
    out = {'state_dict': _upstream_state(model, student, layout)}
    if getattr(model, 'teacher', None) is not None:
        out['momentum_state_dict'] = _upstream_state(model.teacher, model.teacher.state_dict(), layout)
    return out


def _upstream_state(model, sd, layout):
    up = {}
    for k, v in sd.items():
        rule = upstream_key(model, k, layout)
        if rule is None:
            raise ValueError(f"{k} has no {layout} equivalent")
        name, transpose, fold = rule
        up[name] = v.t().contiguous() if transpose else v
        if fold:
            up[fold] = torch.zeros_like(v)
    for alias, canon, _ in upstream_aliases(model):
        up.update({alias + k[len(canon):]: v for k, v in list(up.items()) if k.startswith(canon)})
    return {'module.' + k: v for k, v in up.items()}


def load_upstream(model, state, momentum=None, layout='cliprocket'):
    """Load a clip-rocket (or SLIP) state dict ('module.' already stripped) into our model -> notes.
    Linear biases followed by a BatchNorm are folded into its running mean (BN(Wx + b) with
    running mean m equals BN(Wx) with m - b; in training the batch mean cancels b either way)."""
    new, notes = _from_upstream(model, state, layout, 'state_dict')
    if getattr(model, 'teacher', None) is not None and momentum is not None:
        teacher, tnotes = _from_upstream(model.teacher, momentum, layout, 'momentum_state_dict')
        new.update({'teacher.' + k: v for k, v in teacher.items()})
        notes += tnotes
    elif momentum is not None:
        notes.append("momentum_state_dict ignored: this model has no EMA teacher (method BYOLIP has)")
    return notes + _load(model, new)


def _from_upstream(model, state, layout, what):
    new, used = {}, set()
    for k in (k for k in model.state_dict() if not k.startswith('teacher.')):
        rule = upstream_key(model, k, layout)
        if rule is None:
            raise ValueError(f"{k} has no {layout} equivalent")
        name, transpose, fold = rule
        if name not in state:
            if k.endswith('num_batches_tracked'):
                continue
            raise ValueError(f"{what} lacks {name} (for our {k}); another model or other flags?")
        v = state[name].t() if transpose else state[name]
        if fold:
            v = v - state[fold]
            used.add(fold)
        new[k] = v.contiguous()
        used.add(name)
    notes = []
    for alias, canon, shared in upstream_aliases(model):
        for k in [k for k in state if k.startswith(alias)]:
            if shared and not torch.equal(state[k], state.get(canon + k[len(alias):], torch.empty(0))):
                raise ValueError(f"{what}: {k} differs from {canon + k[len(alias):]}: upstream's heads "
                                 f"were not shared (pass --separate-proj / --separate-proj-child)")
            used.add(k)
        if not shared:
            notes.append(f"{what}: dropped upstream's separate {alias}* (running statistics of the local "
                         f"views' final BatchNorm); ours shares {canon}*")
    left = sorted(k for k in state if k not in used)
    droppable = [k for k in left if k.startswith('image_mlp.')]
    if droppable:
        notes.append(f"{what}: dropped SLIP's SimCLR head image_mlp.* ({len(droppable)} tensors)")
    left = [k for k in left if k not in droppable]
    if left:
        raise ValueError(f"{what}: {len(left)} upstream tensors have no place in our model: {left[:6]}")
    return new, notes


def flags_for_upstream(state, args, layout='cliprocket', name=None):
    """(our model name, create_model flags) of a clip-rocket / SLIP checkpoint, from its args
    (when saved) and its tensor shapes."""
    args = args or {}
    upstream = args.get('model')
    if name is None:
        if not upstream:
            raise ValueError("the checkpoint holds no args.model: pass --model")
        name = _our_name(upstream, args, layout)
    if 'image_projector.layer1.weight' in state:
        raise ValueError("upstream --clip-proj-type mlp (3-layer z projectors, also for text) has no "
                         "equivalent: our mlp z projection is 2 layers of width vision_width, image only")
    if any(k.startswith('swalip_') or k.endswith('_prototypes.weight_v') for k in state):
        raise ValueError("upstream SWALIPV1 (prototypes on a CLIP base) has no equivalent in our zoo")
    proj = state['image_projection'].t() if layout == 'slip' else state['image_projector.weight']
    width = state['ln_final.weight'].shape[0]
    heads = args.get('transformer_heads') or (8 if width == 512 else width // 64)   # upstream: 512 wide, 8 heads
    flags = {'embed_dim': proj.shape[0], 'transformer_width': width, 'transformer_heads': heads,
             'transformer_layers': len({k.split('.')[2] for k in state if k.startswith('transformer.resblocks.')}),
             'context_length': state['positional_embedding'].shape[0], 'text_act': 'quick_gelu',
             'clip_proj_type': 'linear'}
    if 'visual.pos_embed' in state:
        grid = round((state['visual.pos_embed'].shape[1] - 1) ** 0.5)
        flags['image_size'] = grid * state['visual.patch_embed.proj.weight'].shape[-1]
    if layout == 'cliprocket':
        flags.update(_head_flags(state, args))
    return name, flags


def _our_name(upstream, args, layout):
    parts = upstream.split('_')
    if layout == 'slip':
        if parts[0] == 'SIMCLR' or len(parts) != 2:
            raise ValueError(f"SLIP model {upstream}: only CLIP_* and SLIP_* models have a text tower")
        backbone = {'VITS16': 'VITS16MOCO'}.get(parts[1], parts[1])   # SLIP's ViT-S/16 is MoCo v3's (12 heads)
        return f'CLIP_{backbone}_CLIP'
    if len(parts) != 3:
        raise ValueError(f"clip-rocket model {upstream!r}: expected <base>_<backbone>_<method>")
    if parts[2] == 'SIAMLIP' and args.get('momentum'):
        parts[2] = 'BYOLIP'
    return '_'.join(parts)


def _head_flags(state, args):
    f = {k: args[k] for k in ('text_dropout_prob', 'text_drop_path_prob', 'separate_proj_child') if k in args}
    f['separate_proj'] = 'l2l_logit_scale' in state
    if 'separate_proj_child' not in f:                  # no args: separate heads differ from the global ones
        pairs = [(f'{h}_local.0.weight', f'{h}_global.0.weight') for h in
                 ('barlip_image_projector', 'image_text_predictor')]
        f['separate_proj_child'] = any(a in state and not torch.equal(state[a], state[b]) for a, b in pairs)
    for side in ('img', 'txt'):
        long = 'image' if side == 'img' else 'text'
        f[f'cl2l_{side}_proj_type'] = 'mlp' if f'l2l_{long}_projector.layer1.weight' in state else 'linear'
        if f'l2l_{long}_projector.layer1.weight' in state:
            f['clip_hidden_dim'] = state[f'l2l_{long}_projector.layer1.weight'].shape[0]
    if 'barlip_image_projector_global.0.weight' in state:
        f['barlip_hidden_dim'] = state['barlip_image_projector_global.0.weight'].shape[0]
        f['barlip_proj_dim'] = state['barlip_image_projector_global.6.weight'].shape[0]
    siam = [k for k in state if k.startswith('siamlip_image_projector_global.')]
    if siam:
        f['siamlip_no_last_bn'] = 'siamlip_image_projector_global.0.0.weight' not in state
        inner = 'siamlip_image_projector_global.' + ('' if f['siamlip_no_last_bn'] else '0.')
        f['siamlip_hidden_dim'] = state[inner + '0.weight'].shape[0]
        f['siamlip_proj_dim'] = state[inner + '3.weight'].shape[0]
    return f


# ----------------------------------------------------------------------------- our checkpoints

def save_ours(path, model, name, flags, source):
    """A weights-only checkpoint of ours: model, model_name, args (the model flags, image size
    and context length included), epoch/step 0 and where it came from."""
    args = {'model': name, **flags, 'image_size': model.image_size,
            'context_length': model.text_cfg.context_length}
    checkpoint.save({'model': model.state_dict(), 'model_name': name, 'args': args,
                     'epoch': 0, 'step': 0, 'interop': source}, path)


def load_ours(path):
    """(model, checkpoint) of one of our checkpoints, verified, weights loaded, eval mode."""
    ckpt = checkpoint.load_model_checkpoint(path, '--checkpoint')
    return checkpoint.load_model(ckpt), ckpt


def import_checkpoint(source, path, name=None, openclip_model=None, text_only=False):
    """-> (model, name, flags, notes) for a checkpoint of `source` (openai, openclip, cliprocket, slip)."""
    state, meta = read_checkpoint(path)
    if source in ('openai', 'openclip'):
        if source == 'openai':
            cfg = openai_config(state)
        else:
            cfg = openclip_config(openclip_model) if openclip_model else meta['config']
            if cfg is None:
                raise ValueError("--from openclip needs --openclip-model (a name or config JSON) unless "
                                 "--checkpoint is a directory with open_clip_config.json")
        if name is None:
            raise ValueError(f"--from {source} needs --model (e.g. CLIP_VITB16_CLIP)")
        flags, notes = flags_for_openclip(name, cfg, text_only)
        model = models.create_model(name, **_create_kwargs(flags))
        notes += load_openclip(model, state, cfg, text_only)
    else:
        layout = 'slip' if source == 'slip' else 'cliprocket'
        name, flags = flags_for_upstream(state, meta['args'], layout, name)
        model = models.create_model(name, **_create_kwargs(flags))
        notes = load_upstream(model, state, meta['momentum'], layout)
    if flags.get('text_act') == 'quick_gelu' and models.BACKBONES.get(name.split('_')[1]).text.act != 'quick_gelu':
        notes.append("QuickGELU text tower (text_act in the checkpoint's args; eval_zeroshot.py reads it): "
                     "fine-tune with main.py --finetune ... --text-act quick_gelu (without it main.py builds GELU)")
    model.model_name = name
    return model.eval(), name, flags, notes


def _create_kwargs(flags):
    return {('proj_type' if k == 'clip_proj_type' else k): v for k, v in flags.items()}


# ----------------------------------------------------------------------------- CLI

def get_args_parser():
    parser = utils.OneLineErrorParser(description=__doc__.split('\n\n')[0],
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    imp = sub.add_parser('import', help='a foreign checkpoint -> one of ours')
    imp.add_argument('--from', dest='source', required=True, choices=['openai', 'openclip', 'cliprocket', 'slip'],
                     help='openai: TorchScript archive or state dict; openclip: state dict or an exported '
                          'directory; cliprocket / slip: their checkpoint_best.pt')
    imp.add_argument('--checkpoint', required=True, help='the file (or OpenCLIP directory) to import')
    imp.add_argument('--model', default=None,
                     help='our model name (needed for openai/openclip; default for cliprocket/slip: from its args)')
    imp.add_argument('--openclip-model', default=None,
                     help='OpenCLIP model name (e.g. ViT-B-32-quickgelu) or config JSON of --from openclip')
    imp.add_argument('--text-only', action='store_true',
                     help='load the text tower, text projection and logit scale only (any image tower)')
    imp.add_argument('--out', required=True,
                     help='our checkpoint to write (eval_zeroshot.py --resume, main.py --finetune)')
    exp = sub.add_parser('export', help='one of our checkpoints -> OpenCLIP (or clip-rocket / SLIP layout)')
    exp.add_argument('--checkpoint', required=True, help='a checkpoint written by main.py or interop.py import')
    exp.add_argument('--to', default='openclip', choices=['openclip', 'cliprocket', 'slip'])
    exp.add_argument('--out', required=True, help='openclip: a directory; cliprocket / slip: a .pt file')
    exp.add_argument('--name', default=None, help="OpenCLIP config name (default: our model name, 'SIGLIP' "
                                                  "written 'SIG-LIP' so that open_clip.get_tokenizer gives "
                                                  "the CLIP BPE tokenizer)")
    return parser


def check_paths(args):
    """ValueError for an input or output path that cannot work, before any conversion."""
    if args.command == 'export' and os.path.isdir(args.checkpoint):
        inside = os.path.join(args.checkpoint, 'checkpoint.pt')
        raise ValueError(f"--checkpoint {args.checkpoint} is a directory; export reads a checkpoint file" +
                         (f", e.g. {inside}" if os.path.isfile(inside) else ''))
    utils.check_output_path(args.out, '--out', is_dir=args.command == 'export' and args.to == 'openclip')


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        check_paths(args)
        if args.command == 'import':
            model, name, flags, notes = import_checkpoint(args.source, args.checkpoint, args.model,
                                                          args.openclip_model, args.text_only)
            source = {'from': args.source, 'checkpoint': os.path.abspath(args.checkpoint)}
            save_ours(args.out, model, name, flags, source)
            print(f"wrote {args.out}: {name} with {flags}")
        else:
            model, ckpt = load_ours(args.checkpoint)
            if args.to == 'openclip':
                name = openclip_export_name(ckpt['model_name'], args.name)
                cfg, state, notes = to_openclip(model)
                if args.name is None and name != ckpt['model_name']:
                    notes.append(f"named {name}, not {ckpt['model_name']}: open_clip.get_tokenizer gives names "
                                 f"containing 'siglip' SigLIP's tokenizer; this model reads CLIP's BPE")
                path = write_openclip(args.out, name, cfg, state, model.image_size)
                print(f"wrote {path}, {args.out}/{name}.json and {args.out}/open_clip_config.json\n"
                      f"  open_clip.create_model('local-dir:{args.out}')\n"
                      f"  open_clip.add_model_config('{args.out}/{name}.json'); "
                      f"open_clip.create_model('{name}', pretrained='{path}')")
            else:
                out = to_upstream(model, args.to)
                out.update({'epoch': ckpt.get('epoch', 0), 'args': {'model': ckpt['model_name'], **ckpt['args']}})
                checkpoint.save_atomic(out, args.out)     # their layout, as they read it
                notes = []
                print(f"wrote {args.out} ({args.to} layout)")
    except (ValueError, KeyError, checkpoint.CheckpointWriteError) as e:
        sys.exit(f"interop.py {args.command}: error: {e}")
    except OSError as e:                        # a missing input, a full disk: what and where
        where = f": {e.filename}" if e.filename else ''
        sys.exit(f"interop.py {args.command}: error: {e.strerror or e}{where}")
    for note in notes:
        print(f"  note: {note}")


if __name__ == '__main__':
    main()
