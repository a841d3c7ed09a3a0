"""Fine-tune a checkpoint's image tower on a classification ImageFolder (ImageNet-style),
starting from its zero-shot classifier.

    python finetune_classification.py --pretrained output/checkpoint_best.pt \
        --train-dir data/imagenet/train --val-dir data/imagenet/val --labels imagenet \
        --output-dir output/ft_imagenet
    # rerunning the same command resumes from output/ft_imagenet/checkpoint.pt

The classifier is image tower -> the head's projection (`--head z`, or `h` for CL2L) ->
L2-normalise -> linear layer whose weight is the zero-shot classifier (class names x prompt
templates through the text tower, zeroshot.build_classifier) times the checkpoint's logit
scale, bias 0: before the first step its predictions are exactly zero-shot classification.

Defaults follow RangeAugment's CLIP -> ImageNet fine-tuning (ml-cvnets
`examples/range_augment/clip_finetune_imagenet/clip_vit_base.yaml`): 10 epochs, AdamW
(betas 0.9/0.999, eps 1e-6, weight decay 0.05, none on biases and norms), cosine schedule
3e-5 -> 1e-6 after 500 warm-up steps from 1e-6, label smoothing 0.1, EMA of the weights
(decay 0.9995 = their momentum 5e-4), random-resized-crop + flip, batch 512 (8 x 64).
Two additions the brief of this script asked for, not in RangeAugment's file: mixup 0.2 /
cutmix 1.0 (timm.data.Mixup, DeiT's switch probability 0.5) and layer-wise learning-rate
decay 0.65 (BEiT / FT-CLIP; ViT: per block, CNN towers: per stage). RangeAugment's exact
recipe is `--mixup 0 --cutmix 0 --layer-decay 1`. Not reproduced: its learned augmentation
and variable-resolution batches.

Visual prompt tuning (`--vpt-tokens N`, vpt.py): only N prompt tokens in the ViT tower train
(with `--vpt-train-heads` the projection and the head too); no layer-wise decay then.

Every epoch evaluates top-1 (top-5 with >= 5 classes) of the model and of its EMA on
--val-dir, appends one JSON line to output-dir/log.txt (line `epoch 0`: the zero-shot start)
and writes output-dir/checkpoint.pt atomically (plus checkpoint_best.pt on a new best).
Resuming is at epoch boundaries; data order, crops and mixup draws are a function of
(--seed, epoch), so an interrupted run ends with the same weights as an uninterrupted one.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import augment
import checkpoint
import engine
import eval_linear
import models
import towers
import utils
import vpt
import zeroshot

KIND = checkpoint.FINETUNE_KIND


def get_args_parser():
    parser = argparse.ArgumentParser('vlp-baselines classification fine-tuning', add_help=False)
    g = parser.add_argument_group('model')
    g.add_argument('--pretrained', default='', help='checkpoint written by main.py (needed unless resuming)')
    g.add_argument('--head', default='z', choices=['z', 'h'],
                   help="projection the classifier sits on: z (CLIP's) or h (CL2L's view projector)")
    g.add_argument('--image-size', type=int, default=None, help='input resolution (default: the pre-training size)')
    g.add_argument('--head-init', default='zeroshot', choices=['zeroshot', 'random'],
                   help='linear head: the zero-shot classifier (default) or a random init (ablation)')
    g.add_argument('--head-scale', type=float, default=None,
                   help="scale of the zero-shot head (default: the checkpoint's logit scale, <= 100)")
    g.add_argument('--labels', default='',
                   help='class names: a key of labels.json (e.g. imagenet) or a JSON file holding a list '
                        '(sorted folder order) or a {folder: name} dict (default: folder names, _ -> space)')
    g.add_argument('--templates', default='imagenet',
                   help='prompt templates: a key of templates.json (default imagenet) or a JSON list file')
    g = parser.add_argument_group('data')
    g.add_argument('--train-dir', required=True, help='training ImageFolder (one sub-folder per class)')
    g.add_argument('--val-dir', required=True, help='evaluation ImageFolder with the same class folders')
    g.add_argument('--batch-size', type=int, default=64,
                   help='images per step (64; RangeAugment: 512 = 8 GPUs x 64); even with mixup/cutmix')
    g.add_argument('--eval-batch-size', type=int, default=100, help='images per evaluation batch (100)')
    g.add_argument('-j', '--workers', type=int, default=0, help='data-loading processes (0; 8 on a GPU node)')
    g.add_argument('--min-crop-scale', type=float, default=0.08, help='RandomResizedCrop minimum area (0.08)')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (0.5)')
    g = parser.add_argument_group('recipe (defaults: RangeAugment CLIP -> ImageNet, see the docstring)')
    g.add_argument('--epochs', type=int, default=10, help='epochs (10)')
    g.add_argument('--lr', type=float, default=3e-5, help='peak learning rate of the top layer (3e-5)')
    g.add_argument('--lr-end', type=float, default=1e-6, help='final cosine learning rate (1e-6)')
    g.add_argument('--warmup-steps', type=int, default=500, help='linear warm-up steps (500)')
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='learning rate at step 0 (1e-6)')
    g.add_argument('--wd', type=float, default=0.05,
                   help='AdamW weight decay; none on biases, norms, embeddings (0.05)')
    g.add_argument('--betas', type=float, nargs=2, default=[0.9, 0.999], help='AdamW betas (0.9 0.999)')
    g.add_argument('--eps', type=float, default=1e-6, help='AdamW epsilon (1e-6)')
    g.add_argument('--layer-decay', type=float, default=0.65,
                   help='layer-wise lr decay: layer l of L gets lr x decay^(L - l); ViT per block, '
                        'CNNs per stage; 1 = off (0.65)')
    g.add_argument('--label-smoothing', type=float, default=0.1, help='label smoothing (0.1)')
    g.add_argument('--mixup', type=float, default=0.2, help='mixup alpha, 0 = off (0.2)')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, 0 = off (1.0)')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixing a batch (1.0)')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5,
                   help='probability of cutmix instead of mixup when both are on (0.5)')
    g.add_argument('--ema-decay', type=float, default=0.9995, help='EMA decay per step; 0 = no EMA (0.9995)')
    g.add_argument('--clip-grad', type=float, default=0.0, help='gradient-norm clipping, 0 = off')
    g.add_argument('--precision', default='fp32', choices=['fp32', 'amp', 'bf16'],
                   help='fp32, amp (float16 + loss scaling, CUDA) or bf16 autocast')
    g = parser.add_argument_group('run')
    g.add_argument('--output-dir', default='./output_finetune', help='checkpoints and log.txt')
    g.add_argument('--resume', default='',
                   help='fine-tuning checkpoint (default: output-dir/checkpoint.pt if present)')
    g.add_argument('--exit-after-epochs', type=int, default=0,
                   help='checkpoint and stop after N epochs in this run (time-boxed jobs); rerun to resume')
    g.add_argument('--seed', type=int, default=0, help='seed: data order, crops, mixup draws (0)')
    g.add_argument('--print-freq', type=int, default=50, help='print every N steps')
    g.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto = cuda if available')
    vpt.add_args(parser)        # --vpt-tokens: tune prompts (and optionally the heads) only
    return parser


# ----------------------------------------------------------------------------- model

class ImageClassifier(nn.Module):
    """Image tower -> projection -> L2-normalise -> linear head: [B, 3, H, W] -> [B, C] logits."""

    def __init__(self, clip, head, num_classes):
        super().__init__()
        self.visual = clip.visual
        self.projection = image_projection(clip, head)
        self.channels_last = clip.backbone_cfg.channels_last
        self.head = nn.Linear(clip.embed_dim, num_classes)

    def embed(self, images):
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.projection(self.visual(images)), dim=-1)       # [B, D]

    def forward(self, images):
        return self.head(self.embed(images))


def image_projection(clip, head):
    """The module behind clip.project_image(feats, head) (CL2L's `h` without --separate-proj
    shares the `z` projector)."""
    if head not in zeroshot.model_heads(clip):
        raise ValueError(f"--head {head}: {clip.model_name} has heads {', '.join(zeroshot.model_heads(clip))}")
    if head == 'h' and getattr(clip, 'h_image_projection', None) is not None:
        return clip.h_image_projection
    return clip.image_projection


def logit_scale(ckpt, head='z'):
    """exp(the head's learnt logit scale), at most 100 (CL2L's `h` has its own with --separate-proj)."""
    scale = ckpt['model'].get('h_logit_scale' if head == 'h' else 'logit_scale', ckpt['model'].get('logit_scale'))
    return min(float(scale.exp()), models.CLIP.LOGIT_SCALE_MAX) if scale is not None else 100.0


def build_classifier(pre, head, image_size, num_classes, device='cpu'):
    """(ImageClassifier with a random head, the CLIP model it came from) for a main.py checkpoint."""
    clip = checkpoint.load_model(pre, image_size, device)
    return ImageClassifier(clip, head, num_classes).to(device), clip


def _json_file_or_catalog_key(flag, value, catalog_file):
    """A flag's value: the JSON in the file it names, else the entry of that key in the
    repository's `catalog_file` (read only then)."""
    if os.path.isfile(value):
        with open(value) as f:
            return json.load(f)
    known = zeroshot.read_json(None, catalog_file)
    if value not in known:
        raise ValueError(f"{flag} {value}: neither a file nor a key of {catalog_file} (keys: {', '.join(known)})")
    return known[value]


def resolve_names(folders, labels):
    """Class names for sorted class folders: folder names, or --labels (labels.json key or file)."""
    if not labels:
        return [f.replace('_', ' ') for f in folders]
    names = _json_file_or_catalog_key('--labels', labels, 'labels.json')
    if isinstance(names, dict):
        missing = [f for f in folders if f not in names]
        if missing:
            raise ValueError(f"--labels {labels}: no name for folder(s) {', '.join(missing[:5])}")
        names = [names[f] for f in folders]
    if not isinstance(names, list) or len(names) != len(folders):
        raise ValueError(f"--labels {labels}: {len(names) if isinstance(names, list) else 'no list of'} "
                         f"names for {len(folders)} class folders")
    return names


def resolve_templates(templates):
    found = _json_file_or_catalog_key('--templates', templates, 'templates.json')
    if not (isinstance(found, list) and found and all(isinstance(t, str) and '{}' in t for t in found)):
        raise ValueError(f"--templates {templates}: expected a non-empty list of strings with '{{}}'")
    return found


@torch.no_grad()
def zeroshot_head(classifier, clip, pre, head, names, templates, device, scale=None):
    """Set the linear head to scale x the zero-shot classifier [C, D], bias 0 -> the classifier."""
    tokenizer = towers.tokenizer_for(pre['args'])   # CLIP BPE, or a --text-tower's / --text-tokenizer's own
    weights = zeroshot.cached_classifier(clip, head, names, templates, tokenizer, device)   # [C, D]
    scale = logit_scale(pre, head) if scale is None else scale
    classifier.head.weight.copy_(scale * weights)
    classifier.head.bias.zero_()
    return weights


# ----------------------------------------------------------------------------- optimizer

def tinycnn_stages(tower):
    """TinyCNN parameter -> stage (a new stage after each max-pool; the stem joins stage 0)."""
    ids, stage = {}, 0
    for i, module in enumerate(tower.features):
        stage += isinstance(module, nn.MaxPool2d)
        ids.update({f'features.{i}.{n}': stage for n, _ in module.named_parameters()})
    return ids


def tower_layers(tower):
    """{parameter name: layer id} of the image tower (0 = the stem), or None when unknown."""
    from timm.models import group_parameters
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(tower, models.TinyCNN):
        return tinycnn_stages(tower)
    if hasattr(tower, 'group_matcher'):                       # timm: ViT per block, CNNs per stage
        coarse = not isinstance(tower, VisionTransformer)
        return group_parameters(tower, tower.group_matcher(coarse=coarse), reverse=True)
    return None


def param_groups(classifier, wd, layer_decay=1.0):
    """AdamW groups with `lr_scale` (layer-wise decay: the head and projection are the top layer)
    and no weight decay on 1-d parameters and the tower's no_weight_decay() names."""
    tower = classifier.visual
    skip = {f'visual.{n}' for n in getattr(tower, 'no_weight_decay', set)()}
    layers = tower_layers(tower) if layer_decay != 1.0 else None
    if layer_decay != 1.0 and layers is None:
        print(f"--layer-decay {layer_decay}: no layer grouping known for the {type(tower).__name__} "
              f"tower; layer-wise decay disabled")
    top = max(layers.values()) + 1 if layers else 0
    groups = {}
    for name, p in classifier.named_parameters():
        if not p.requires_grad:
            continue
        layer = layers.get(name[len('visual.'):], top - 1) if layers and name.startswith('visual.') else top
        decay = 0.0 if p.ndim < 2 or name in skip else wd
        group = groups.setdefault((layer, decay), {'params': [], 'weight_decay': decay,
                                                   'lr_scale': layer_decay ** (top - layer), 'layer': layer})
        group['params'].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(classifier, args):
    layer_decay = 1.0 if args.vpt_tokens else args.layer_decay     # prompts: no layer stack to decay
    groups = param_groups(classifier, args.wd, layer_decay)
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps)


def build_mixup(args, num_classes):
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                 switch_prob=args.mixup_switch_prob, label_smoothing=args.label_smoothing,
                 num_classes=num_classes)


# ----------------------------------------------------------------------------- data

class TrainTransform:
    """RandomResizedCrop (bicubic) + horizontal flip, CLIP-normalised float32 [3, S, S]."""

    def __init__(self, size, min_scale=0.08, hflip=0.5):
        self.crop = augment.weak_transform(size, min_scale)             # crop, bicubic, normalised
        self.hflip = hflip

    def __call__(self, image):
        pixels = self.crop(image)                                       # float32 [3, S, S]
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            pixels = pixels.flip(-1)
        return pixels


def build_loaders(args, image_size):
    train, val, folders = eval_linear.folder_pair(
        args.train_dir, args.val_dir, image_size, TrainTransform(image_size, args.min_crop_scale, args.hflip))
    if len(train) < args.batch_size:
        raise ValueError(f"--train-dir has {len(train)} images, fewer than --batch-size {args.batch_size}")
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                              persistent_workers=False)
    val_loader = DataLoader(val, batch_size=args.eval_batch_size, num_workers=args.workers)
    return train_loader, val_loader, folders


# ----------------------------------------------------------------------------- loops

@torch.no_grad()
def evaluate(model, loader, device, precision='fp32', desc='eval'):
    """{'top1', 'top5' (>= 5 classes), 'loss'} in percent / nats over the loader."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2):
        with engine.autocast(device, precision):
            logits.append(model(batch['image'].to(device, non_blocking=True)).float().cpu())
        labels.append(batch['label'])
    model.train(was_training)
    logits, labels = torch.cat(logits), torch.cat(labels)
    acc1, acc5 = zeroshot.topk_accuracy(logits, labels)
    out = {'top1': 100 * acc1, 'loss': float(F.cross_entropy(logits, labels))}
    if not math.isnan(acc5):
        out['top5'] = 100 * acc5
    return out


def train_one_epoch(model, ema, loader, optimizer, scaler, mixup, lr_at, state, args, device):
    """One pass over the loader -> {'loss', 'lr'} averages; state['step'] advances."""
    model.train()
    logger = utils.MetricLogger()
    header = f"epoch {state['epoch'] + 1}/{args.epochs}"
    for _, batch in logger.log_every(loader, len(loader), args.print_freq, header):
        lr = lr_at(state['step'])
        for group in optimizer.param_groups:
            group['lr'] = lr * group['lr_scale']
        images, labels = batch['image'].to(device, non_blocking=True), batch['label'].to(device)
        if mixup is not None:
            images, targets = mixup(images, labels)                       # soft targets [B, C]
        with engine.autocast(device, args.precision):
            logits = model(images)
            if mixup is not None:
                loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            else:
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        if not torch.isfinite(loss):
            raise SystemExit(f"finetune_classification.py: error: loss is {loss.item()} at step "
                             f"{state['step']}; lower --lr or use --precision fp32")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        state['step'] += 1
        if ema is not None:
            ema.update(model)
        logger.update(loss=loss.detach(), lr=lr)
    return logger.averages()


# ----------------------------------------------------------------------------- checkpoints

def load_finetune_checkpoint(path):
    ckpt = checkpoint.load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get('kind') != KIND:
        raise ValueError(f"--resume {path}: not a fine-tuning checkpoint (finetune_classification.py) but "
                         f"{checkpoint.describe(ckpt)}; a main.py checkpoint goes to --pretrained")
    return ckpt


def load_classifier(path, device='cpu', ema=True):
    """(ImageClassifier with the fine-tuned weights (the EMA's by default), class folders)
    from a checkpoint this script wrote."""
    ckpt = load_finetune_checkpoint(path)
    pre = {'model': {}, 'model_name': ckpt['model_name'], 'args': ckpt['pretrained_args']}
    clip = models.create_model_from_flags(ckpt['model_name'], dict(pre['args'], image_size=ckpt['image_size']))
    model = ImageClassifier(clip, ckpt['args']['head'], len(ckpt['classes']))
    model.load_state_dict(ckpt['ema'] if ema and ckpt.get('ema') is not None else ckpt['model'])
    return model.to(device).eval(), ckpt['classes']


def save(path, model, ema, optimizer, scaler, state, args, pre_name, pre_args, classes, image_size):
    """Write a fine-tuning checkpoint (atomically, with its digest); a failed write stops the
    run with one line, the previous checkpoint intact."""
    try:
        _save(path, model, ema, optimizer, scaler, state, args, pre_name, pre_args, classes, image_size)
    except checkpoint.CheckpointWriteError as e:
        raise SystemExit(f"finetune_classification.py: error: {e}; free some space and rerun the "
                         f"same command to resume") from None


def _save(path, model, ema, optimizer, scaler, state, args, pre_name, pre_args, classes, image_size):
    checkpoint.save({
        'kind': KIND, 'model': model.state_dict(), 'ema': ema.module.state_dict() if ema else None,
        'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
        'epoch': state['epoch'], 'step': state['step'], 'best': state['best'],
        'args': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        'model_name': pre_name, 'pretrained_args': pre_args, 'classes': list(classes),
        'image_size': image_size, 'rng': utils.rng_state()}, path)


# ----------------------------------------------------------------------------- main

def check_args(args):
    utils.check_counts(args, positive=['batch_size', 'eval_batch_size', 'epochs', 'print_freq', 'image_size'],
                       non_negative=['workers', 'warmup_steps', 'exit_after_epochs'])
    utils.check_output_path(args.output_dir, '--output-dir', is_dir=True)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ValueError(f"--batch-size {args.batch_size}: mixup/cutmix need an even batch "
                         f"(or --mixup 0 --cutmix 0)")
    if not 0 < args.layer_decay <= 1:
        raise ValueError("--layer-decay must be in (0, 1] (1 = off)")
    if not 0 <= args.ema_decay < 1:
        raise ValueError("--ema-decay must be in [0, 1) (0 = no EMA)")
    vpt.check_values(args)


def setup(args, device):
    """-> (model, loaders, classes, resume checkpoint or None, pretraining name/args, image size)."""
    resume = args.resume or os.path.join(args.output_dir, 'checkpoint.pt')
    ck = load_finetune_checkpoint(resume) if (args.resume or os.path.isfile(resume)) else None
    if ck is None and not args.pretrained:
        raise ValueError("--pretrained is required (a checkpoint written by main.py) unless resuming")
    pre = checkpoint.load_model_checkpoint(args.pretrained, '--pretrained') if args.pretrained else None
    if ck is not None and pre is not None and pre['model_name'] != ck['model_name']:
        raise ValueError(f"{resume} fine-tunes a {ck['model_name']}, not the {pre['model_name']} of "
                         f"--pretrained; use another --output-dir")
    vpt.check_finetune_start(args, pre, ck['args'] if ck else None)
    image_size = ck['image_size'] if ck else (args.image_size or pre['args']['image_size'])
    train_loader, val_loader, folders = build_loaders(args, image_size)
    if ck is not None:
        if ck['classes'] != folders:
            raise ValueError(f"{resume} was trained on other classes than --train-dir; use another --output-dir")
        pre = {'model': ck['model'], 'model_name': ck['model_name'], 'args': ck['pretrained_args']}
        clip = models.create_model_from_flags(pre['model_name'], dict(pre['args'], image_size=image_size))
        model = ImageClassifier(clip, ck['args']['head'], len(folders)).to(device)
        model.load_state_dict(ck['model'])
    else:
        model, clip = build_classifier(pre, args.head, image_size, len(folders), device)
        if args.head_init == 'zeroshot':
            names, templates = resolve_names(folders, args.labels), resolve_templates(args.templates)
            zeroshot_head(model, clip, pre, args.head, names, templates, device, args.head_scale)
        if args.vpt_tokens:     # model.visual is clip.visual: the classifier gets the prompts
            vpt.add_prompts(clip, args.vpt_tokens, args.vpt_mode, args.vpt_dropout)
            pre = dict(pre, args=vpt.with_flags(pre['args'], args))    # rebuilt with them
    if args.vpt_tokens:
        print(vpt.describe(clip, *vpt.lock_all_but_prompts(model, args.vpt_train_heads), args.vpt_train_heads))
    return model, train_loader, val_loader, folders, ck, pre['model_name'], pre['args'], image_size


def main(argv=None):
    parser = utils.OneLineErrorParser('finetune_classification.py', parents=[get_args_parser()])
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    device = torch.device('cuda' if args.device == 'cuda' or (
        args.device == 'auto' and torch.cuda.is_available()) else 'cpu')
    utils.seed_everything(args.seed)
    try:
        check_args(args)
        model, train_loader, val_loader, classes, ck, pre_name, pre_args, image_size = setup(args, device)
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.error(str(e))
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"git: {utils.git_sha()}")
    print(json.dumps(vars(args), sort_keys=True))
    optimizer = build_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'amp')
    ema = None
    if args.ema_decay > 0:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.ema_decay)
    mixup = build_mixup(args, len(classes))
    state = {'epoch': 0, 'step': 0, 'best': None}
    log_path = os.path.join(args.output_dir, 'log.txt')
    if ck is not None:
        optimizer.load_state_dict(ck['optimizer'])
        scaler.load_state_dict(ck['scaler'])
        if ema is not None and ck.get('ema') is not None:
            ema.module.load_state_dict(ck['ema'])
        state = {'epoch': ck['epoch'], 'step': ck['step'], 'best': ck['best']}
        print(f"resumed from {args.resume or os.path.join(args.output_dir, 'checkpoint.pt')}: "
              f"epoch {state['epoch']}, step {state['step']}")
    else:
        start = evaluate(model, val_loader, device, args.precision, 'zero-shot head')
        print(f"epoch 0 (zero-shot-initialised head): top-1 {start['top1']:.1f}%")
        utils.append_json(log_path, {'epoch': 0, 'step': 0, **{f'val_{k}': v for k, v in start.items()}})
    steps_per_epoch = len(train_loader)
    total_steps, warmup = steps_per_epoch * args.epochs, args.warmup_steps
    if warmup >= total_steps:
        print(f"note: --warmup-steps {warmup} >= {total_steps} training steps: the run never leaves warm-up")

    def lr_at(step):
        return engine.cosine_lr(step, total_steps, warmup, args.lr, args.warmup_lr, args.lr_end)

    print(f"fine-tuning {pre_name} ({args.head} head, {image_size} px) on {len(classes)} classes: "
          f"{args.epochs} epochs x {steps_per_epoch} steps of {args.batch_size}")
    epochs_this_run, log = 0, {}
    while state['epoch'] < args.epochs:
        t0 = time.time()
        utils.seed_everything(args.seed + state['epoch'])      # order, crops, mixup: f(seed, epoch)
        stats = train_one_epoch(model, ema, train_loader, optimizer, scaler, mixup, lr_at, state, args, device)
        state['epoch'] += 1
        train_time = time.time() - t0
        val = evaluate(model, val_loader, device, args.precision, 'eval')
        log = {'epoch': state['epoch'], 'step': state['step'], 'train_loss': stats['loss'],
               'lr': stats['lr'], 'train_time_s': train_time,
               'samples_per_s': steps_per_epoch * args.batch_size / max(train_time, 1e-9),
               **{f'val_{k}': v for k, v in val.items()}}
        top1 = val['top1']
        if ema is not None:
            ema_val = evaluate(ema.module, val_loader, device, args.precision, 'eval EMA')
            log.update({f'ema_{k}': v for k, v in ema_val.items()})
            top1 = max(top1, ema_val['top1'])
        ckpt_args = (model, ema, optimizer, scaler, state, args, pre_name, pre_args, classes, image_size)
        if state['best'] is None or top1 > state['best']:
            state['best'] = top1
            save(os.path.join(args.output_dir, 'checkpoint_best.pt'), *ckpt_args)
        save(os.path.join(args.output_dir, 'checkpoint.pt'), *ckpt_args)
        utils.append_json(log_path, log)
        print(f"epoch {state['epoch']}: top-1 {val['top1']:.1f}%" +
              (f", EMA {log['ema_top1']:.1f}%" if ema is not None else '') + f" ({train_time:.0f} s)")
        epochs_this_run += 1
        if args.exit_after_epochs and epochs_this_run >= args.exit_after_epochs and state['epoch'] < args.epochs:
            print(f"stopping after {epochs_this_run} epoch(s) as asked (--exit-after-epochs); "
                  f"rerun the same command to resume")
            return dict(log, stopped=True)
    print(f"best top-1 {state['best']:.1f}%; outputs in {args.output_dir}")
    return dict(log, best_top1=state['best'])


if __name__ == '__main__':
    main()
