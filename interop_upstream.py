"""clip-rocket / SLIP mappings of interop.py: our keys <-> upstream's (upstream_key,
upstream_aliases), our models out to their layout (to_upstream) and their checkpoints into ours
(flags_for_upstream, load_upstream), BatchNorm-preceding biases folded into running means."""
import re

import torch
import torch.nn as nn

import models
from interop_openclip import _is_text_key, _load

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
