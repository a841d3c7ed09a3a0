"""Checkpoint interop: OpenAI CLIP, OpenCLIP, clip-rocket, SLIP, train-CLIP and cvnets CLIP weights
into our models, and our models out to OpenCLIP (and to the clip-rocket / SLIP layouts).

    python interop.py import --from openai --checkpoint ViT-B-32.pt --model CLIP_VITB32_CLIP --out ours.pt
    python interop.py import --from openclip --checkpoint open_clip_pytorch_model.bin \
        --openclip-model ViT-B-32 --model CLIP_VITB32_CLIP --out ours.pt
    python interop.py import --from cliprocket --checkpoint checkpoint_best.pt --out ours.pt
    python interop.py import --from cvnets --checkpoint clip_vit_base_16.pt --model CLIP_VITB16CV_CLIP \
        --cvnets-config clip_vit_base.yaml --out ours.pt
    python interop.py import --from trainclip --checkpoint epoch=31.ckpt --model CLIP_RN50OAI_CLIP --out ours.pt
    python interop.py export --checkpoint output/checkpoint_best.pt --out exported/
    python -c "import open_clip; open_clip.create_model('local-dir:exported')"

An imported checkpoint holds `model`, `model_name` and `args` (the model flags), which is what
`eval_zeroshot.py --resume` and `main.py --finetune` read. Files are read without running code:
torch files with weights_only=True (argparse.Namespace allowed: upstream checkpoints keep their
args in one), OpenAI's TorchScript archives by an unpickler that only rebuilds tensors.
docs/interop.md says what maps exactly and what is refused.
"""
import argparse
import os
import sys

import torch

import checkpoint
import interop_trainclip
import interop_clipa
import models
import utils
import vpt
from interop_cvnets import flags_for_cvnets, load_cvnets, read_recipe
from interop_openclip import (flags_for_openclip, load_openclip, openai_config, openclip_config,
                              openclip_export_name, to_openclip, write_openclip)
from interop_torchscript import is_torchscript, read_torchscript
from interop_upstream import flags_for_upstream, load_upstream, to_upstream

WEIGHT_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
                'open_clip_pytorch_model.bin', 'open_clip_pytorch_model.pth', 'model.safetensors',
                'pytorch_model.bin')


# ----------------------------------------------------------------------------- reading files

def read_checkpoint(path):
    """-> (state, meta): the weights of a supported file, 'module.' prefixes dropped, floats as
    fp32; meta: 'args' (upstream args as a dict), 'momentum' (clip-rocket's momentum model),
    'config' (an OpenCLIP directory's model config), 'hparams' (a Lightning checkpoint's)."""
    meta = {'args': None, 'momentum': None, 'config': None, 'hparams': None}
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
        meta['hparams'] = obj.get('hyper_parameters')                   # Lightning (train-CLIP)
        obj = obj['state_dict']
    elif isinstance(obj, dict) and isinstance(obj.get('model_state_dict'), dict):   # cvnets' training checkpoint.pt
        obj = obj['model_state_dict']
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


# ----------------------------------------------------------------------------- our checkpoints

def save_ours(path, model, name, flags, source):
    """A weights-only checkpoint of ours: model, model_name, args (the model flags, image size
    and context length included), epoch/step 0 and where it came from."""
    args = {'model': name, **flags, 'image_size': model.image_size,
            'context_length': model.text_cfg.context_length}
    checkpoint.save({'model': model.state_dict(), 'model_name': name, 'args': args,
                     'epoch': 0, 'step': 0, 'interop': source}, path)


def load_ours(path, use_ema=False):
    """(model, checkpoint) of one of our checkpoints, verified, weights loaded (its EMA weights
    with use_ema), eval mode."""
    ckpt = checkpoint.load_model_checkpoint(path, '--checkpoint', use_ema)
    vpt.refuse_export(ckpt, path)                   # prompts have no place in the other layouts
    return checkpoint.load_model(ckpt), ckpt


def import_checkpoint(source, path, name=None, openclip_model=None, text_only=False, tower_flags=None,
                      cvnets_config=None, text_tokenizer=None):
    """-> (model, name, flags, notes) for a checkpoint of `source` (openai, openclip, cliprocket,
    slip, trainclip, cvnets); `tower_flags`: image_tower, text_tower, text_pooling (train-CLIP's
    CustomCLIPWrapper); `text_tokenizer`: the local tokenizer directory of a CLIPA text tower
    (default: an OpenCLIP directory's own tokenizer files, as an export writes them)."""
    if cvnets_config and source != 'cvnets':
        raise ValueError(f"--cvnets-config goes with --from cvnets, not --from {source}")
    if text_tokenizer and source not in ('openai', 'openclip'):      # the others set their own tokenizer
        raise ValueError(f"--text-tokenizer goes with --from openclip (CLIPA text towers), not --from {source}")
    try:
        state, meta = read_checkpoint(path)
    except ValueError as e:
        if source == 'trainclip' and 'weights_only' in str(e):
            raise ValueError(f"{e}; {interop_trainclip.UNTRUSTED_HINT}") from None
        raise
    tower_flags = {k: v for k, v in (tower_flags or {}).items() if v is not None}
    if source == 'trainclip':
        layout, state = interop_trainclip.split_state(state)
        if layout == 'custom':
            return _import_custom_trainclip(state, meta, name, tower_flags)
        source = 'openai'                               # CLIPWrapper: OpenAI's CLIP under model.
    if tower_flags:
        raise ValueError(f"--{next(iter(tower_flags)).replace('_', '-')} is for train-CLIP's CustomCLIPWrapper "
                         f"checkpoints; this one has OpenAI's CLIP layout, whose towers it sets itself")
    if source == 'cvnets':
        if name is None:
            raise ValueError("--from cvnets needs --model (e.g. CLIP_VITB16CV_CLIP)")
        recipe = read_recipe(cvnets_config) if cvnets_config else None
        flags, notes = flags_for_cvnets(name, state, text_only, recipe)
        model = models.create_model(name, **_create_kwargs(flags))
        notes += load_cvnets(model, state, text_only)
    elif source in ('openai', 'openclip'):
        if source == 'openai':
            cfg = openai_config(state)
        else:
            cfg = openclip_config(openclip_model) if openclip_model else meta['config']
            if cfg is None:
                raise ValueError("--from openclip needs --openclip-model (a name or config JSON) unless "
                                 "--checkpoint is a directory with open_clip_config.json")
        if name is None:
            raise ValueError(f"--from {source} needs --model (e.g. CLIP_VITB16_CLIP)")
        if text_tokenizer is None and os.path.isdir(path) and (cfg['text_cfg'].get('hf_tokenizer_name')):
            text_tokenizer = path                   # an exported directory holds its tokenizer
        flags, notes = flags_for_openclip(name, cfg, text_only, text_tokenizer)
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
    if interop_clipa.finetune_note(flags):
        notes.append(interop_clipa.finetune_note(flags))
    model.model_name = name
    return model.eval(), name, flags, notes


def _import_custom_trainclip(state, meta, name, tower_flags):
    if name is None:
        raise ValueError("--from trainclip needs --model (e.g. CLIP_R50_CLIP with --image-tower resnet50)")
    flags, notes = interop_trainclip.custom_flags(name, state, *map(tower_flags.get, interop_trainclip.TOWER_FLAGS),
                                                  meta['hparams'])
    model = models.create_model(name, **_create_kwargs(flags))
    notes += interop_trainclip.load_custom(model, state)
    model.model_name = name
    return model.eval(), name, flags, notes


def _create_kwargs(flags):
    return {('proj_type' if k == 'clip_proj_type' else k): v for k, v in flags.items()
            if k != 'text_tokenizer'}           # the data's, not the model's


# ----------------------------------------------------------------------------- CLI

def get_args_parser():
    parser = utils.OneLineErrorParser(description=__doc__.split('\n\n')[0],
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    imp = sub.add_parser('import', help='a foreign checkpoint -> one of ours')
    imp.add_argument('--from', dest='source', required=True,
                     choices=['openai', 'openclip', 'cliprocket', 'slip', 'trainclip', 'cvnets'],
                     help='openai: TorchScript archive or state dict; openclip: state dict or an exported '
                          'directory; cliprocket / slip: their checkpoint_best.pt; trainclip: a train-CLIP '
                          'Lightning .ckpt; cvnets: its CLIP weights (onto a VITB16CV / VITH16CV model, or '
                          '--text-only)')
    imp.add_argument('--checkpoint', required=True, help='the file (or OpenCLIP directory) to import')
    imp.add_argument('--model', default=None,
                     help='our model name (needed for openai/openclip/trainclip/cvnets; default for cliprocket/slip: '
                          'from its args)')
    imp.add_argument('--openclip-model', default=None,
                     help='OpenCLIP model name (e.g. ViT-B-32-quickgelu) or config JSON of --from openclip')
    imp.add_argument('--cvnets-config', default=None,
                     help='the cvnets recipe YAML of --from cvnets (text heads, causal masking, activation; '
                          'image encoder options checked); default: the published CLIP recipes\' values')
    imp.add_argument('--image-tower', default=None, metavar='TIMM_NAME',
                     help="trainclip CustomCLIPWrapper: the timm model of its image encoder (default: the "
                          "--model backbone's; torchvision's resnet50 is timm's resnet50)")
    imp.add_argument('--text-tower', default=None, metavar='DIR',
                     help='trainclip CustomCLIPWrapper: its Hugging Face text encoder (config and tokenizer; '
                          'the weights come from the checkpoint)')
    imp.add_argument('--text-pooling', default=None, choices=['mean', 'pooler'],
                     help="trainclip CustomCLIPWrapper: mean (its avg_word_embs=True) or pooler (its default)")
    imp.add_argument('--text-tokenizer', default=None, metavar='DIR',
                     help="CLIPA: a local copy of the text tower's Hugging Face tokenizer (bert-base-uncased; "
                          'nothing is downloaded), recorded in the checkpoint for eval_zeroshot.py / main.py')
    imp.add_argument('--text-only', action='store_true',
                     help='load the text tower, text projection and logit scale only (any image tower)')
    imp.add_argument('--out', required=True,
                     help='our checkpoint to write (eval_zeroshot.py --resume, main.py --finetune)')
    exp = sub.add_parser('export', help='one of our checkpoints -> OpenCLIP (or clip-rocket / SLIP layout)')
    exp.add_argument('--checkpoint', required=True, help='a checkpoint written by main.py or interop.py import')
    exp.add_argument('--use-ema', action='store_true',
                     help="export the checkpoint's EMA weights (main.py --model-ema) instead of the live ones")
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
            tower_flags = {k: getattr(args, k) for k in interop_trainclip.TOWER_FLAGS}
            model, name, flags, notes = import_checkpoint(args.source, args.checkpoint, args.model,
                                                          args.openclip_model, args.text_only, tower_flags,
                                                          args.cvnets_config, args.text_tokenizer)
            source = {'from': args.source, 'checkpoint': os.path.abspath(args.checkpoint)}
            save_ours(args.out, model, name, flags, source)
            print(f"wrote {args.out}: {name} with {flags}")
        else:
            model, ckpt = load_ours(args.checkpoint, args.use_ema)
            if args.to == 'openclip':
                name = openclip_export_name(ckpt['model_name'], args.name)
                tokenizer_dir = ckpt['args'].get('text_tokenizer')
                cfg, state, notes = to_openclip(model, tokenizer_dir)
                if tokenizer_dir:
                    interop_clipa.write_tokenizer(cfg, tokenizer_dir, args.out)
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
