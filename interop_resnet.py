"""OpenAI's ModifiedResNet (RN50 ... RN50x64) in interop.py: our RN*OAI towers (timm's
resnet*_clip: 3-conv stem, average-pool downsampling, attention pooling) <-> the OpenAI /
OpenCLIP layout, key by key. The attention pool's output projection (`attnpool.c_proj`, with
its bias) is our image projection; the tower outputs the pooled width*32 features it reads.
docs/interop.md says what maps and what is refused."""
import re

import torch

import models

# our key -> OpenAI's: (pattern, replacement) applied in order, the first match wins
_RULES = [(re.compile(p), r) for p, r in [
    (r'^visual\.stem\.conv(\d)\.conv\.', r'visual.conv\1.'),
    (r'^visual\.stem\.conv(\d)\.bn\.', r'visual.bn\1.'),
    (r'^visual\.stages\.(\d+)\.(\d+)\.conv(\d)_(?:1x1|kxk)\.conv\.', lambda m: _layer(m) + f'conv{m[3]}.'),
    (r'^visual\.stages\.(\d+)\.(\d+)\.conv(\d)_(?:1x1|kxk)\.bn\.', lambda m: _layer(m) + f'bn{m[3]}.'),
    (r'^visual\.stages\.(\d+)\.(\d+)\.shortcut\.conv\.conv\.', lambda m: _layer(m) + 'downsample.0.'),
    (r'^visual\.stages\.(\d+)\.(\d+)\.shortcut\.conv\.bn\.', lambda m: _layer(m) + 'downsample.1.'),
    (r'^visual\.head\.pos_embed$', 'visual.attnpool.positional_embedding'),
    (r'^visual\.head\.([qkv])\.', r'visual.attnpool.\1_proj.'),
    (r'^image_projection\.', 'visual.attnpool.c_proj.'),
]]


def _layer(m):
    return f'visual.layer{int(m[1]) + 1}.{m[2]}.'


def openai_key(key):
    """Our image-side key (visual.*, image_projection.*) -> the OpenAI/OpenCLIP ModifiedResNet
    key, or None for another key."""
    for pattern, repl in _RULES:
        new, n = pattern.subn(repl, key)
        if n:
            return new
    return None


def is_resnet_cfg(vision_cfg):
    """An OpenCLIP vision config builds a ModifiedResNet when its `layers` is a list."""
    return isinstance(vision_cfg.layers, (tuple, list))


def openclip_resnet_spec(vision_cfg, image_size):
    """The architecture an OpenCLIP ModifiedResNet config builds, in resnet_spec's terms."""
    return {'layers': tuple(vision_cfg.layers), 'width': vision_cfg.width,
            'heads': vision_cfg.width * 32 // vision_cfg.head_width, 'image_size': image_size}


def resnet_spec(model):
    """Our model's ModifiedResNet architecture, or ValueError when its tower is not one."""
    from timm.layers import AttentionPool2d
    from timm.models.byobnet import ByobNet
    tower = model.visual
    if not (isinstance(tower, ByobNet) and isinstance(getattr(tower, 'head', None), AttentionPool2d)
            and tower.head.q is not None and isinstance(tower.head.proj, torch.nn.Identity)):
        raise ValueError(f"our {model.backbone_cfg.timm_name or type(tower).__name__} tower is not an "
                         f"OpenAI ModifiedResNet (use an RN*OAI backbone, e.g. CLIP_RN50OAI_CLIP)")
    return {'layers': tuple(len(stage) for stage in tower.stages), 'width': tower.stem.conv3.conv.out_channels,
            'heads': tower.head.num_heads, 'image_size': model.image_size}


def _preset_spec(backbone, image_size):
    cfg = models.BACKBONES.get(backbone)
    if not (cfg.proj_bias and cfg.timm_name.startswith('resnet')):
        return None
    with torch.device('meta'):                      # shapes only
        tower = models.build_image_tower(cfg, image_size)
    return {'layers': tuple(len(s) for s in tower.stages), 'width': tower.stem.conv3.conv.out_channels,
            'heads': tower.head.num_heads, 'image_size': image_size}


def check_preset(backbone, want):
    """ValueError unless our `backbone` preset builds the ModifiedResNet `want`
    (openclip_resnet_spec), naming the preset that does."""
    have = _preset_spec(backbone, want['image_size'])
    if have == want:
        return
    match = [b for b in models.BACKBONES if b != backbone and _preset_spec(b, want['image_size']) == want]
    arch = f"ModifiedResNet layers {list(want['layers'])}, width {want['width']}, {want['heads']} heads"
    if match:
        raise ValueError(f"the checkpoint's image tower is a {arch}: our {match[0]} backbone "
                         f"(--model with {match[0]}, e.g. CLIP_{match[0]}_CLIP), not {backbone}")
    raise ValueError(f"the checkpoint's image tower is a {arch}; no backbone of ours builds it "
                     f"(ours: RN50OAI, RN101OAI, RN50X4OAI, RN50X16OAI, RN50X64OAI)")


def visual_to_ours(model, state, want):
    """Our visual.* and image_projection.* tensors from an OpenAI/OpenCLIP ModifiedResNet state
    dict -> (tensors, the checkpoint keys used)."""
    have = resnet_spec(model)
    diff = [f"{k} {want[k]} (checkpoint) vs {have[k]} (ours)" for k in want if want[k] != have[k]]
    if diff:
        raise ValueError(f"image towers differ: {'; '.join(diff)}")
    if not isinstance(model.image_projection, torch.nn.Linear) or model.image_projection.bias is None:
        raise ValueError("OpenAI's attention pool projects with a biased matrix (c_proj); our image "
                         "projection here is not one (--clip-proj-type mlp?)")
    out, used = {}, set()
    for key in model.state_dict():
        theirs = openai_key(key)
        if theirs is None:
            continue
        if theirs not in state:
            if key.endswith('num_batches_tracked'):
                continue
            raise ValueError(f"the checkpoint lacks {theirs} (for our {key})")
        out[key] = state[theirs]
        used.add(theirs)
    return out, used | {k for k in state if k.startswith('visual.') and k.endswith('num_batches_tracked')}


def visual_to_openclip(model):
    """-> (OpenCLIP vision_cfg, {OpenCLIP key: tensor}) of our ModifiedResNet tower."""
    spec = resnet_spec(model)
    if spec['width'] * 32 // spec['heads'] != 64:
        raise ValueError(f"OpenCLIP's ModifiedResNet has 64-wide attention-pool heads; ours "
                         f"{spec['width'] * 32 // spec['heads']}")
    if not isinstance(model.image_projection, torch.nn.Linear) or model.image_projection.bias is None:
        raise ValueError("OpenCLIP's ModifiedResNet projects with its attention pool's biased c_proj; "
                         "our image projection is not one (--clip-proj-type mlp?)")
    state = {openai_key(k): v for k, v in model.state_dict().items()
             if k.startswith(('visual.', 'image_projection.'))}
    cfg = {'image_size': spec['image_size'], 'layers': list(spec['layers']), 'width': spec['width'],
           'patch_size': None}
    return cfg, state
