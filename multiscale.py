"""Multi-scale variable-batch training (`--multiscale`), cvnets' VariableBatchSampler
(Mehta & Rastegari, "MobileViT", 2021, section "multi-scale sampler"; used by the cvnets CLIP
recipe of Mehta et al., "RangeAugment", 2022).

Each optimizer step draws one image size from `--multiscale-sizes`; the per-process batch at
that size keeps the pixels per batch of `--batch-size` at `--image-size` (cvnets' rule,
`batch_at`), or with `--multiscale-batch fixed` stays `--batch-size` (multi-resolution training:
the demo's default on `shapes`, main.py's DEMO_MULTISCALE). The draw is a pure function of
(seed, epoch, step of the epoch): every rank, every loader worker and a resumed run compute the
same sequence without talking to each other. All micro-batches of a step (`--update-freq`)
share its size, so cached accumulation stays exact.

An epoch has as many optimizer steps as without --multiscale (the learning-rate schedule is
unchanged); its steps take their samples in order from the epoch's permutation (each rank its
share), wrapping to the start (with fresh augmentation seeds) when the larger small-image batches
need more samples than the share holds -- as cvnets' sampler pads its last batch.

Data: the sample transforms produce the step's size directly (the random resized crop crops to
it; plain images, `shapes`, are resized), `SizedBuilder`. Map-style readers get the size with
each index (`BatchSampler`); streaming readers (wds, tarpairs, tfrecord) compute it per batch from the
same `Schedule`. CL2L views (`--multicrop-resize`) scale with the step by the same factor.
Model: timm ViTs switch to timm's dynamic image size (position embeddings resampled to the
step's patch grid, bit-identical at --image-size); CNNs take any size as they are.
"""
import argparse
import copy
import math

import numpy as np
import torch

import augment
import utils
from readers import collate, mix_seeds

SALT = 0x6D756C7469           # 'multi': keeps the size draw apart from the sample seeds
SCALES = 5                    # cvnets sampler.vbs.max_n_scales
LOW, HIGH = 160 / 224, 320 / 224   # cvnets' 160..320 px around its 224 px base, as fractions
BATCH_RULES = ('pixels', 'fixed')  # --multiscale-batch: cvnets' pixels per batch, or --batch-size


# ----------------------------------------------------------------------------- flags

def add_args(parser):
    g = parser.add_argument_group('multi-scale variable batch (docs/training-features.md)')
    g.add_argument('--multiscale', action=argparse.BooleanOptionalAction, default=None,
                   help="cvnets' multi-scale variable-batch sampler: each optimizer step draws an image "
                        "size; the batch scales to keep --batch-size x --image-size^2 pixels (default: "
                        "off; on for the demo's TINYCNN of the CLIP base on shapes, --no-multiscale turns "
                        "it off)")
    g.add_argument('--multiscale-sizes', type=int, nargs='+', default=None, metavar='PX',
                   help="the sizes drawn (default: cvnets' rule around --image-size, e.g. 160 192 224 "
                        "256 288 320 at 224; the demo: 0.75-1.25x --image-size, 48 56 64 72 80 at 64)")
    g.add_argument('--multiscale-batch', choices=BATCH_RULES, default=None,
                   help="the batch at each size: pixels (cvnets' rule, default) or fixed (--batch-size "
                        "at every size: multi-resolution training; the demo's)")
    return g


def enabled(args):
    return bool(getattr(args, 'multiscale', False))


def resolve(args):
    """Fill --multiscale-sizes and --multiscale-batch and check them (ValueError: one line)."""
    if not enabled(args):
        for flag in ('multiscale_sizes', 'multiscale_batch'):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} goes with --multiscale")
        return
    args.multiscale_batch = args.multiscale_batch or 'pixels'
    import models
    cfg = models.BACKBONES.get(args.backbone)
    low = 1 if getattr(args, 'image_tower', None) else cfg.min_image_size
    if args.image_size < low or args.batch_size < 2:
        return                                 # main.py's own checks name the flag
    vit_patch = _vit_patch(args)
    if args.multiscale_sizes is None:
        args.multiscale_sizes = default_sizes(args.image_size, vit_patch)
    sizes = args.multiscale_sizes = sorted(set(args.multiscale_sizes))
    bad = [s for s in sizes if s < low or s % vit_patch]
    if bad:
        rule = f">= {low} px" + (f" and multiples of the {vit_patch} px patch" if vit_patch > 1 else '')
        raise ValueError(f"--multiscale-sizes {' '.join(map(str, bad))}: the {args.backbone} tower takes "
                         f"sizes {rule}")
    small = [s for s in sizes if batch_at(s, args.image_size, args.batch_size) < 2]
    if small and args.multiscale_batch == 'pixels':
        raise ValueError(f"--multiscale-sizes {small[0]} gets a batch of "
                         f"{batch_at(small[0], args.image_size, args.batch_size)} (the pixels of "
                         f"--batch-size {args.batch_size} at {args.image_size} px); a contrastive loss "
                         f"needs >= 2: raise --batch-size or drop the size")


def _vit_patch(args):
    """The patch size of a ViT preset (its sizes must be multiples of it), else 1. (An
    --image-tower is checked by running it at every size: multiscale.build.)"""
    import models
    cfg = models.BACKBONES.get(args.backbone)
    return cfg.min_image_size if cfg.takes_img_size and not getattr(args, 'image_tower', None) else 1


# ----------------------------------------------------------------------------- cvnets' rule

def make_divisible(value, divisor):
    """cvnets' (TensorFlow's) rounding: the nearest multiple of `divisor`, never 10 % below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def default_sizes(image_size, patch=1):
    """cvnets' create_intervallic_integer_list around `image_size`: SCALES sizes evenly from
    160/224 to 320/224 of it plus itself, rounded to multiples of a divisor (32 at 224 px,
    proportionally smaller below; a multiple of the ViT patch). At 224: 160 192 224 256 288 320,
    the cvnets CLIP recipe's sizes."""
    divisor = 2 ** max(0, int(math.log2(image_size / 7)))
    divisor = patch * max(1, divisor // patch)
    values = set(np.linspace(image_size * LOW, image_size * HIGH, SCALES).tolist()) | {image_size}
    return sorted({make_divisible(v, divisor) for v in values})


def batch_at(size, image_size, batch_size):
    """cvnets' image_batch_pairs: the batch at `size` x `size` holding the pixels of
    `batch_size` images at `image_size` (rounded to 2 decimals, then truncated; at least 1)."""
    return max(1, int(round(batch_size * image_size * image_size / (size * size), 2)))


class Schedule:
    """(seed, epoch, micro-batch) -> the image size and per-process batch of that micro-batch
    (`fixed`: --batch-size at every size, --multiscale-batch fixed)."""

    def __init__(self, sizes, image_size, batch_size, seed, update_freq=1, fixed=False):
        self.sizes = np.asarray(sizes, np.int64)
        self.batches = np.asarray([batch_size if fixed else batch_at(s, image_size, batch_size)
                                   for s in sizes], np.int64)
        self.seed, self.update_freq = seed, update_freq

    @classmethod
    def from_args(cls, args):
        return cls(args.multiscale_sizes, args.image_size, args.batch_size, args.seed, args.update_freq,
                   fixed=args.multiscale_batch == 'fixed')

    def plan(self, epoch, micro_batches):
        """-> (image size, batch) arrays over the epoch's first `micro_batches` micro-batches;
        the size of optimizer step t (of the epoch) is drawn from hash(seed, epoch, t)."""
        steps = np.arange(micro_batches, dtype=np.int64) // self.update_freq
        pick = mix_seeds(self.seed, epoch, steps, SALT) % len(self.sizes)
        return self.sizes[pick], self.batches[pick]

    @staticmethod
    def use_size(size):
        """The size the next batch of this process is built at (streaming readers, per batch)."""
        use_size(size)

    def describe(self):
        return ', '.join(f'{s} px x {b}' for s, b in zip(self.sizes.tolist(), self.batches.tolist()))


# ----------------------------------------------------------------------------- samples

_STEP = {'size': None}        # the size of the batch this process builds now (None: --image-size)


def use_size(size):
    """Set the size the SizedBuilders of this process produce (per batch, before its samples)."""
    _STEP['size'] = None if size is None else int(size)


class ResizeU8:
    """Plain images (no crop, `shapes`) to `size` x `size`: antialiased bicubic on uint8, as
    augment.RandomResizedCropU8 resizes its crops."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, generator=None):
        pixels = augment.to_uint8(image)
        if pixels.shape[-2:] == (self.size, self.size):
            return pixels.clone()
        return torch.nn.functional.interpolate(pixels[None], size=[self.size, self.size], mode='bicubic',
                                               align_corners=False, antialias=True)[0]


def view_size(args, size):
    """The CL2L view size at image size `size`: --multicrop-resize scaled like the image
    (= the step's size when --multicrop-resize is --image-size, the default), rounded to a
    multiple of a ViT preset's patch."""
    patch = _vit_patch(args)
    return patch * max(1, round(args.multicrop_resize * size / args.image_size / patch))


class SizedBuilder:
    """augment.SampleBuilder for every size of --multiscale-sizes (and --image-size): calls go
    to the one of the current use_size(). Its transforms, as decode.draft_policy reads them,
    are the largest size's (JPEG draft decoding stays large enough for every size)."""

    def __init__(self, args, tokenizer, plain_images=False):
        self.image_size = args.image_size
        self.builders = {}
        for size in sorted({*args.multiscale_sizes, args.image_size}):
            sized = copy.copy(args)
            sized.image_size, sized.multicrop_resize = size, view_size(args, size)
            builder = augment.SampleBuilder.from_args(sized, tokenizer, plain_images=plain_images)
            if plain_images:
                builder.image_transform = ResizeU8(size)
            if self.builders:                  # one caption cache for all sizes
                builder._tokenize_one = next(iter(self.builders.values()))._tokenize_one
            self.builders[size] = builder
        largest = self.builders[max(self.builders)]
        self.tokenizer = tokenizer
        self.image_transform, self.view_transforms = largest.image_transform, largest.view_transforms

    def __call__(self, image, captions, seed):
        return self.builders[_STEP['size'] or self.image_size](image, captions, seed)


class SizedItems(torch.utils.data.Dataset):
    """A map-style reader taking (index, seed, epoch, size) items: builds the sample at `size`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed, epoch, size = item
        use_size(size)
        return self.dataset[(index, seed, epoch)]


class BatchSampler(torch.utils.data.Sampler):
    """Batches of (index, seed, epoch, size) for SizedItems, from a datasets.ResumableSampler's
    share of each epoch: micro-batch m takes the next `batch` indices of the share (wrapping
    to its start with seeds of the next lap). `set_epoch(epoch, start)` as main.py calls it
    (`start` = micro-batches done x --batch-size) resumes at micro-batch start // batch_size."""

    def __init__(self, base, schedule, batch_size):
        self.base, self.schedule, self.batch_size = base, schedule, batch_size
        self.micro_batches = base.per_rank // batch_size      # as many as without --multiscale
        self.epoch, self.first = 0, 0

    def set_epoch(self, epoch, start=0):
        self.base.set_epoch(epoch, 0)
        self.epoch, self.first = epoch, start // self.batch_size

    def __len__(self):
        return self.micro_batches - self.first

    def __iter__(self):
        epoch, order = self.epoch, self.base.indices().numpy()
        sizes, counts = self.schedule.plan(epoch, self.micro_batches)
        ends = np.cumsum(counts)
        for m in range(self.first, self.micro_batches):
            at = np.arange(ends[m] - counts[m], ends[m])
            index, lap = order[at % len(order)], at // len(order)
            seeds = np.where(lap == 0, mix_seeds(self.base.seed, epoch, index),
                             mix_seeds(self.base.seed, epoch, index, lap))
            yield [(i, s, epoch, int(sizes[m])) for i, s in zip(index.tolist(), seeds.tolist())]


class Control:
    """The sampler-like handle main.py drives (set_epoch; len = samples per process)."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def set_epoch(self, epoch, start=0):
        self.batch_sampler.set_epoch(epoch, start)

    def __len__(self):
        return self.batch_sampler.base.per_rank


def map_loader(dataset, base_sampler, args, loader_kwargs):
    """-> (Control, DataLoader) of a map-style reader under --multiscale (datasets.build_loader)."""
    batches = BatchSampler(base_sampler, Schedule.from_args(args), args.batch_size)
    loader = utils.StopSafeLoader(SizedItems(dataset), batch_sampler=batches, collate_fn=collate,
                                  generator=torch.Generator().manual_seed(args.seed), **loader_kwargs)
    return Control(batches), loader


# ----------------------------------------------------------------------------- model

def enable_dynamic_size(model):
    """Switch every timm VisionTransformer in `model` to timm's dynamic image size (what
    `dynamic_img_size=True` builds: patch embedding without the size check, NHWC out, position
    embeddings resampled to each input's patch grid; at the built size they are used as they
    are, bit-identical). -> the number of towers switched."""
    from timm.layers import Format
    switched = 0
    for module in model.modules():
        embed = getattr(module, 'patch_embed', None)
        if hasattr(module, 'dynamic_img_size') and hasattr(embed, 'strict_img_size'):
            if not module.dynamic_img_size:
                module.dynamic_img_size = True
                embed.strict_img_size, embed.flatten, embed.output_fmt = False, False, Format.NHWC
            switched += 1
    return switched


def probe_sizes(model, sizes, device):
    """Run the image tower once at every size (eval mode, no gradient: nothing changes);
    SystemExit naming the size when the tower cannot take it."""
    visual = model.visual
    modes = [(m, m.training) for m in visual.modules()]     # locked BatchNorm may stay in eval
    visual.eval()
    try:
        with torch.no_grad():
            for size in sizes:
                try:
                    visual(torch.zeros(1, 3, size, size, device=device))
                except (RuntimeError, AssertionError, ValueError) as e:
                    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
                    raise SystemExit(f"main.py: error: --multiscale: the image tower cannot take "
                                     f"{size} px inputs ({first}); pass other --multiscale-sizes") from None
    finally:
        for m, training in modes:
            m.training = training


class MultiScale:
    """The training-feature hooks (features.Feature): logs the image size and batch of the last
    training forward; the other hooks have nothing to do."""

    def __init__(self, model):
        self.last = (0, 0)
        model.register_forward_pre_hook(self._seen)

    def _seen(self, module, inputs):
        image = inputs[0].get('image') if inputs and isinstance(inputs[0], dict) else None
        if module.training and image is not None:
            self.last = (image.shape[-1], image.shape[0])

    def step_log(self):
        return {'multiscale_image_size': float(self.last[0]), 'multiscale_batch_size': float(self.last[1])}

    def state_dict(self):
        return {}             # the sizes are a function of (seed, epoch, step): nothing to save


def build(args, model, device):
    """After the model is built: ViTs take any size; every size the tower will see is tried."""
    enable_dynamic_size(model)
    views = [view_size(args, s) for s in args.multiscale_sizes] if args.base == 'CL2L' and args.num_augs else []
    probe_sizes(model, sorted({*args.multiscale_sizes, *views}), device)
    kind = 'fixed batch' if args.multiscale_batch == 'fixed' else 'variable batch'
    print(f"multi-scale, {kind}: {Schedule.from_args(args).describe()} per process and step")
    return MultiScale(model)
