"""Visual prompt tuning (VPT; Jia et al., "Visual Prompt Tuning", ECCV 2022) of a pretrained
CLIP: `--vpt-tokens N` learnable tokens inserted after the class token of the ViT image tower's
token sequence, both towers locked.

    shallow: block 0 reads [CLS, P, patches]; the prompts' outputs flow on through the blocks
    deep:    block i reads fresh prompts P_i in place of what block i-1 made of the prompts

Prompts carry no position embedding, and their outputs are dropped after the last block, so
the final norm, the pooling (class token, or the mean over the patches) and the projection see
the usual sequence. Initialisation as in VPT: uniform in +-sqrt(6 / (3 * patch area + width))
(xavier, with a patch as the fan-in); `--vpt-dropout` drops prompt entries in training.

The prompts are a parameter of the model (`visual.vpt.prompts`, [1 or depth, N, width]): saved
and resumed with the weights, and rebuilt from a checkpoint's flags by every reader of it
(models.create_model_from_flags: eval_zeroshot.py, demo_zeroshot.py, eval_linear.py,
finetune_classification.py). interop.py export refuses a prompted model (OpenCLIP has no place
for prompts). Two routes use this module: main.py (a training feature, features.py) with the
CLIP loss, and finetune_classification.py with the zero-shot classifier as the head.
"""
import functools
import math

import torch
import torch.nn as nn

MODES = ('shallow', 'deep')
DEFAULT_MODE = 'deep'          # the paper's best variant


# ----------------------------------------------------------------------------- flags

def add_args(parser):
    g = parser.add_argument_group('visual prompt tuning (ViT image towers; docs/training-features.md)')
    g.add_argument('--vpt-tokens', type=int, default=0, metavar='N',
                   help='learn N prompt tokens inserted after the class token of the ViT image tower; '
                        'both towers locked (0: off)')
    g.add_argument('--vpt-mode', choices=MODES, default=None,
                   help=f'shallow: prompts at the input only; deep: fresh prompts at every block '
                        f'(default {DEFAULT_MODE})')
    g.add_argument('--vpt-dropout', type=float, default=0.0, metavar='P',
                   help='dropout on the prompt tokens in training (0)')
    g.add_argument('--vpt-train-heads', action='store_true',
                   help='also train what sits on the towers: main.py the projections, logit scales and '
                        'method heads; finetune_classification.py the image projection and the classifier')


def check_values(args):
    """ValueError (one line) for impossible --vpt-* values; fills --vpt-mode's default."""
    if args.vpt_tokens < 0:
        raise ValueError(f"--vpt-tokens must be >= 0 (0: off), got {args.vpt_tokens}")
    if not 0 <= args.vpt_dropout < 1:
        raise ValueError(f"--vpt-dropout must be in [0, 1), got {args.vpt_dropout}")
    if not args.vpt_tokens:
        if args.vpt_mode or args.vpt_dropout or args.vpt_train_heads:
            raise ValueError("--vpt-mode, --vpt-dropout and --vpt-train-heads go with --vpt-tokens N")
        return
    args.vpt_mode = args.vpt_mode or DEFAULT_MODE


def resolve(args):
    """main.py's checks: the values, a pretrained start, no partial locks, a ViT image tower."""
    check_values(args)
    if not args.vpt_tokens:
        return
    if not (args.finetune or args.resume or args.evaluate):
        raise ValueError("--vpt-tokens tunes prompts for a pretrained model: pass --finetune CKPT "
                         "(a main.py or interop.py import checkpoint)")
    if args.lock_image_unlocked_groups or args.lock_text_unlocked_layers:
        raise ValueError("--vpt-tokens locks both towers whole: drop --lock-image-unlocked-groups / "
                         "--lock-text-unlocked-layers")
    require_vit(image_tower_on_meta(args.model, args), f"the image tower of {args.model}")


def image_tower_on_meta(name, flags):
    """The image tower model `name` with these flags has, built without memory or compute (meta
    tensors): checks run before any real work."""
    import dataclasses
    import models      # here: models imports this module
    import towers
    flags = flags if isinstance(flags, dict) else vars(flags)
    cfg = models.BACKBONES.get(models.parse_model_name(name)[1])
    if flags.get('image_tower'):
        cfg = dataclasses.replace(cfg, **towers.timm_backbone_fields(flags['image_tower']))
    with torch.device('meta'):
        return models.build_image_tower(cfg, flags.get('image_size') or cfg.image_size)


def require_vit(tower, what):
    from timm.models.vision_transformer import VisionTransformer
    if not isinstance(tower, VisionTransformer):
        raise ValueError(f"--vpt-tokens inserts prompt tokens into a ViT's token sequence; {what} is a "
                         f"{type(tower).__name__}, not a timm VisionTransformer (use a VIT* backbone or "
                         f"a ViT --image-tower)")


def enabled(args):
    return args.vpt_tokens > 0


def flags_of(flags):
    """(tokens, mode, dropout) recorded in a run's flags (a dict or Namespace); tokens 0: none."""
    flags = flags if isinstance(flags, dict) else vars(flags)
    return (int(flags.get('vpt_tokens') or 0), flags.get('vpt_mode') or DEFAULT_MODE,
            float(flags.get('vpt_dropout') or 0.0))


# ----------------------------------------------------------------------------- the prompts

class VisualPrompts(nn.Module):
    """The prompt tokens of one ViT and the two steps that use them, run as forward pre-hooks
    of its blocks and of its final norm (so timm's own forward, gradient checkpointing and
    patch dropout stay as they are)."""

    def __init__(self, vit, tokens, mode, dropout=0.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown --vpt-mode {mode!r}; valid: {', '.join(MODES)}")
        self.tokens, self.mode = tokens, mode
        self.start = vit.num_prefix_tokens           # after the class (and register) tokens
        width = vit.embed_dim
        patch = getattr(vit.patch_embed, 'patch_size', (1, 1))
        device = vit.pos_embed.device if vit.pos_embed is not None else None
        self.prompts = nn.Parameter(torch.empty(len(vit.blocks) if mode == 'deep' else 1, tokens, width,
                                                device=device))
        bound = math.sqrt(6.0 / (3 * math.prod(patch) + width))
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    def layer_prompts(self, layer, x):
        """[B, N, width] prompts of block `layer` for the batch `x` (dropout per sample, as VPT)."""
        return self.dropout(self.prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1))

    def enter_block(self, layer, block, args):
        """Before block `layer`: insert the prompts (block 0) or replace the previous ones (deep)."""
        x, s = args[0], self.start
        rest = x[:, s:] if layer == 0 else x[:, s + self.tokens:]
        return (torch.cat([x[:, :s], self.layer_prompts(layer, x), rest], dim=1), *args[1:])

    def leave_blocks(self, norm, args):
        """Before the final norm: drop the prompt tokens' outputs."""
        x, s = args[0], self.start
        return (torch.cat([x[:, :s], x[:, s + self.tokens:]], dim=1), *args[1:])


def attach(vit, prompts):
    """Make `prompts` (VisualPrompts) part of `vit`: parameter `vpt.prompts`, hooks registered.
    The hooks hold the module itself, so a deepcopy of the model (EMA, teacher) uses its copy."""
    vit.vpt = prompts
    for layer, block in enumerate(vit.blocks):
        if layer == 0 or prompts.mode == 'deep':
            block.register_forward_pre_hook(functools.partial(VisualPrompts.enter_block, prompts, layer))
    vit.norm.register_forward_pre_hook(prompts.leave_blocks)


def add_prompts(model, tokens, mode=DEFAULT_MODE, dropout=0.0):
    """Give the CLIP `model`'s ViT image tower N prompt tokens (an EMA teacher a copy of them)
    -> model; ValueError for a non-ViT tower or a tower that has prompts already."""
    require_vit(model.visual, f"the image tower of {getattr(model, 'model_name', 'this model')}")
    if hasattr(model.visual, 'vpt'):
        raise ValueError("the image tower has visual prompts already")
    prompts = VisualPrompts(model.visual, tokens, mode, dropout)
    attach(model.visual, prompts)
    teacher = getattr(model, 'teacher', None)
    if teacher is not None:
        import copy
        attach(teacher.visual, copy.deepcopy(prompts).requires_grad_(False))
    return model


def add_from_flags(model, flags):
    """`model` with the prompts its flags (--vpt-*, a Namespace or a checkpoint's args) ask for."""
    tokens, mode, dropout = flags_of(flags)
    return add_prompts(model, tokens, mode, dropout) if tokens else model


def is_prompt(name):
    return name.startswith('visual.vpt.')


# ----------------------------------------------------------------------------- locking

def lock_all_but_prompts(model, train_heads=False, tower_names=()):
    """requires_grad only for the prompts and, with train_heads, what is neither the image tower
    (`visual.*`), nor a name in `tower_names` (the text tower), nor an EMA teacher.
    -> (trainable, total) parameter counts."""
    tower_names = set(tower_names)
    for name, p in model.named_parameters():
        head = not (name.startswith(('visual.', 'teacher.')) or name in tower_names)
        p.requires_grad_(is_prompt(name) or (train_heads and head))
    student = [p for n, p in model.named_parameters() if not n.startswith('teacher.')]
    return sum(p.numel() for p in student if p.requires_grad), sum(p.numel() for p in student)


def describe(model, trainable, total, train_heads):
    p = model.visual.vpt.prompts
    return (f"visual prompt tuning: {p.shape[1]} {model.visual.vpt.mode} prompt tokens "
            f"({' x '.join(map(str, p.shape))} = {p.numel()} parameters); trainable: "
            f"{trainable / 1e6:.4f} M of {total / 1e6:.3f} M (prompts{' and heads' if train_heads else ''})")


class PromptTuning:
    """main.py's training feature: the prompts are model weights (checkpointed with it), so no
    hook beyond the locking done at build."""


def build(args, model, device):
    """main.py, after the model (prompts included, models.create_model_from_flags) and its
    --finetune weights: lock everything but the prompts (and, with --vpt-train-heads, the heads)."""
    import towers
    text_names = [n for group in towers.text_groups(model) for n in group]
    trainable, total = lock_all_but_prompts(model, args.vpt_train_heads, text_names)
    print(describe(model, trainable, total, args.vpt_train_heads))
    return PromptTuning()


# ----------------------------------------------------------------------------- readers

def refuse_export(ckpt, path):
    """interop.py export: ValueError (one line) for a prompt-tuned checkpoint."""
    tokens, mode, _ = flags_of(ckpt.get('args') or {})
    if tokens:
        raise ValueError(f"{path} holds a prompt-tuned model ({tokens} {mode} visual prompt tokens, "
                         f"--vpt-tokens): OpenCLIP, clip-rocket and SLIP models have no place for them; "
                         f"evaluate it here (eval_zeroshot.py), or export the checkpoint it was tuned from")


def check_finetune_start(args, pre, resumed_args=None):
    """finetune_classification.py: ValueError when --vpt-* cannot apply: prompts on a model that
    is no ViT or has some already, or a resume under other --vpt-* flags than the checkpoint's."""
    if resumed_args is not None:
        then, now = flags_of(resumed_args), flags_of(args)
        if then != now or bool(resumed_args.get('vpt_train_heads')) != bool(args.vpt_train_heads):
            raise ValueError(f"the checkpoint to resume was tuned with --vpt-tokens {then[0]} --vpt-mode "
                             f"{then[1]} --vpt-dropout {then[2]}"
                             f"{' --vpt-train-heads' if resumed_args.get('vpt_train_heads') else ''}; "
                             f"rerun with those, or use another --output-dir")
    elif args.vpt_tokens and flags_of(pre['args'])[0]:
        raise ValueError(f"--pretrained has {flags_of(pre['args'])[0]} visual prompt tokens already "
                         f"(main.py --vpt-tokens); drop --vpt-tokens to fine-tune with them")
    elif args.vpt_tokens:
        tower = image_tower_on_meta(pre['model_name'], pre['args'])
        require_vit(tower, f"the image tower of {pre['model_name']}")


def with_flags(pre_args, args):
    """The pre-training flags the classifier's CLIP is rebuilt from, with the --vpt-* of `args`."""
    return dict(pre_args, vpt_tokens=args.vpt_tokens, vpt_mode=args.vpt_mode, vpt_dropout=args.vpt_dropout)
