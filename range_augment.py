"""RangeAugment (`--range-augment`): augmentations whose magnitude ranges are learned with the
model, kept in a target image-similarity range by an auxiliary loss (Mehta et al., "RangeAugment:
Efficient Online Augmentation with Range Learning", 2022; cvnets' neural augmentor, the recipe
of its CLIP models).

Each op draws a magnitude m ~ U[low, high] per image. Its range is two parameters a, b:
low = lo_min + sigmoid(a) (lo_max - lo_min), high = hi_min + sigmoid(b) (hi_max - hi_min) (cvnets'
`distribution` mode, bounds and initial values). In training, for each op in a random order, a
random half of the batch is transformed, then the pixels are clipped to [0, 1]; evaluation sees
the images as they are. The auxiliary loss per image is

    alpha / 255^2 * smooth_l1(MSE_255(augmented, original), target MSE),  MSE_255 on the 0-255 scale,
    target MSE = 255^2 / 10^(PSNR / 10),  PSNR from START to END over training (cosine or linear)

averaged over the images (cvnets: alpha 100, PSNR 40 -> 20, cosine; CLIP ViT-B/16 recipe).

How it plugs in: the augmenter is a submodule of the model (`model.range_augment`) so that DDP
all-reduces its gradients with the model's; a forward pre-hook augments `image` (and each CL2L
view of `image_views`) inside the model's training forward, so cached accumulation replays the
same draws, and a forward hook returns the per-image MSE [B, 1 + views] among the outputs (per
sample, so micro-batches concatenate exactly). The model's state_dict never shows the submodule:
exports, evaluation and old checkpoints are unchanged; the ranges live in checkpoint['features'].
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from augment import CLIP_MEAN, CLIP_STD

NAME = 'range_augment'
MSE_KEY = 'range_augment_mse'           # the per-image MSE among the model's training outputs
MAX_MSE = 255.0 ** 2
CVNETS_CLIP_OPS = ('brightness', 'contrast', 'noise')


def _brightness(x, m):
    return x * m


def _contrast(x, m):
    return (1 - m) * x.mean(dim=(-2, -1), keepdim=True) + m * x


def _noise(x, m):
    return x + torch.randn_like(x) * m


def _scale(x, m):
    """Zoom about the centre by m (m > 1 magnifies, m < 1 shrinks within black borders):
    bilinear resampling, differentiable in m."""
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], dtype=x.dtype, device=x.device)
    theta = eye / m.view(-1, 1, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


# op -> (function, low bounds, high bounds, initial (a, b)); cvnets' values for the photometric
# ops; `scale` (a geometric op) is our addition in the same form, identity (1) inside its range
OPS = {
    'brightness': (_brightness, (0.1, 0.9), (1.1, 10.0), (0.5, 1.5)),
    'contrast': (_contrast, (0.1, 0.9), (1.1, 10.0), (0.5, 1.5)),
    'noise': (_noise, (0.0, 5e-5), (1e-4, 1.0), (0.0, 0.1)),
    'scale': (_scale, (0.5, 0.95), (1.05, 2.0), (0.5, 1.5)),
}


class LearnedRange(nn.Module):
    """A magnitude range [low, high] with each end a sigmoid of a parameter between its bounds."""

    def __init__(self, low_bounds, high_bounds, init):
        super().__init__()
        self.low_bounds, self.high_bounds = low_bounds, high_bounds
        self.a = nn.Parameter(torch.tensor(float(init[0])))
        self.b = nn.Parameter(torch.tensor(float(init[1])))

    def ends(self):
        (l0, l1), (h0, h1) = self.low_bounds, self.high_bounds
        return l0 + torch.sigmoid(self.a) * (l1 - l0), h0 + torch.sigmoid(self.b) * (h1 - h0)

    def sample(self, n, like):
        """n magnitudes [n, 1, 1, 1] uniform in [low, high], in `like`'s dtype and device."""
        low, high = self.ends()
        u = torch.rand(n, 1, 1, 1, dtype=like.dtype, device=like.device)
        return low.to(like.dtype) + u * (high - low).to(like.dtype)


class RangeAugmenter(nn.Module):
    """The learned ranges of `ops` and the batch transform (pixels in [0, 1])."""

    def __init__(self, ops=CVNETS_CLIP_OPS):
        super().__init__()
        self.ops = tuple(ops)
        self.ranges = nn.ModuleDict({op: LearnedRange(*OPS[op][1:]) for op in self.ops})

    def forward(self, x):
        """[N, 3, H, W] in [0, 1] -> augmented, clipped to [0, 1]. Every op transforms a random
        half of the batch (at least one image), the ops in a random order (torch's generator:
        cached accumulation replays it)."""
        n = x.shape[0]
        for i in torch.randperm(len(self.ops)).tolist():
            op = self.ops[i]
            ids = torch.randperm(n, device=x.device)[:max(1, n // 2)]
            picked = x.index_select(0, ids)
            x = x.index_copy(0, ids, OPS[op][0](picked, self.ranges[op].sample(len(ids), picked)))
        return x.clamp(0.0, 1.0)

    def augment_normalized(self, images):
        """CLIP-normalised [N, 3, H, W] -> (augmented, normalised again; per-image MSE [N] on the
        0-255 scale between the augmented and the original pixels)."""
        mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
        pixels = images * std + mean
        out = self(pixels)
        diff = (out - pixels).to(torch.promote_types(out.dtype, torch.float32))
        mse = (diff * 255.0).square().mean(dim=(1, 2, 3))
        return (out - mean) / std, mse

    def augment_batch(self, batch):
        """The batch with `image` and each view of `image_views` augmented (each view its own
        draws) and MSE_KEY: the per-image MSE [B, 1 + views]."""
        out = dict(batch)
        out['image'], mse = self.augment_normalized(batch['image'])
        mses = [mse[:, None]]
        views = batch.get('image_views')
        if views is not None and views.shape[1] > 0:
            augmented = [self.augment_normalized(views[:, v]) for v in range(views.shape[1])]
            out['image_views'] = torch.stack([a for a, _ in augmented], dim=1)
            mses += [m[:, None] for _, m in augmented]
        out[MSE_KEY] = torch.cat(mses, dim=1)
        return out

    def magnitudes(self):
        """{'<op>_min': low, '<op>_max': high} as floats."""
        out = {}
        with torch.no_grad():
            for op, r in self.ranges.items():
                low, high = r.ends()
                out[f'{op}_min'], out[f'{op}_max'] = float(low), float(high)
        return out


# ----------------------------------------------------------------------------- the loss

def psnr_to_mse(psnr):
    """PSNR (dB, 0-255 scale) -> MSE: PSNR = 20 log10(255) - 10 log10(MSE)."""
    return MAX_MSE / 10.0 ** (psnr / 10.0)


def target_mse(step, total_steps, psnr, curriculum='cosine'):
    """The target MSE at optimizer step `step` of `total_steps`: one PSNR value is constant; two
    (START END) go from START to END in MSE over the run as cvnets' curricula (cosine:
    end + (start - end)(1 + cos(pi t / (T + 1))) / 2; linear: t / T), then stay at END."""
    if len(psnr) == 1 or not total_steps:
        return psnr_to_mse(psnr[0])
    start, end = psnr_to_mse(psnr[0]), psnr_to_mse(psnr[1])
    t = min(step, total_steps)
    if curriculum == 'linear':
        return start + (end - start) * t / total_steps
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / (total_steps + 1)))


def auxiliary_loss(mse, target, alpha):
    """alpha / 255^2 * mean over images of smooth_l1(MSE, target) (cvnets' PSNR criterion)."""
    return F.smooth_l1_loss(mse, torch.full_like(mse, target)) * (alpha / MAX_MSE)


# ----------------------------------------------------------------------------- the model hooks

def attach(model, augmenter):
    """Make `augmenter` the model's `range_augment` submodule, applied in its training forward.
    The submodule stays out of the model's state_dict (and may be absent from what it loads)
    and out of models.param_groups (it has its own group): see the module docstring."""
    model.add_module(NAME, augmenter)
    model.feature_modules = (*getattr(model, 'feature_modules', ()), NAME)
    model.register_forward_pre_hook(_augment_inputs)
    model.register_forward_hook(_return_mse)
    model.register_state_dict_post_hook(_drop_own_keys)
    model.register_load_state_dict_post_hook(_allow_missing_own_keys)
    return model


def _augment_inputs(model, args):
    if model.training:
        return (model.range_augment.augment_batch(args[0]), *args[1:])
    return None


def _return_mse(model, args, output):
    if model.training and isinstance(output, dict) and MSE_KEY in args[0]:
        return {**output, MSE_KEY: args[0][MSE_KEY]}
    return None


def _own_key(key):
    return key.startswith(NAME + '.') or f'.{NAME}.' in key


def _drop_own_keys(model, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + NAME + '.')]:
        del state_dict[key]
    metadata = getattr(state_dict, '_metadata', {})
    for key in [k for k in metadata if k == prefix + NAME or k.startswith(prefix + NAME + '.')]:
        del metadata[key]


def _allow_missing_own_keys(model, incompatible_keys):
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _own_key(k)]


# ----------------------------------------------------------------------------- the feature

class RangeAugment:
    """The training feature (features.py hooks): the augmenter's optimizer group, its loss term,
    the curriculum's position, per-step logs and the checkpointed state."""

    def __init__(self, augmenter, args):
        self.augmenter = augmenter
        self.psnr, self.curriculum = tuple(args.range_augment_target_psnr), args.range_augment_curriculum
        self.alpha, self.lr_scale, self.wd = args.range_augment_alpha, args.range_augment_lr_mult, args.wd
        self.total_steps, self.step = None, 0
        self.last_mse = None

    def param_groups(self):
        # cvnets decays the (0-d) range parameters like weights: its no-decay filter takes 1-d ones only
        return [{'params': list(self.augmenter.parameters()), 'weight_decay': self.wd,
                 'lr_scale': self.lr_scale}]

    def set_total_steps(self, total_steps):
        self.total_steps = total_steps

    def target_mse(self):
        return target_mse(self.step, self.total_steps, self.psnr, self.curriculum)

    def loss_terms(self, outputs):
        """{'range_augment': the auxiliary loss} of the model's training outputs."""
        mse = outputs[MSE_KEY]
        self.last_mse = mse.detach()
        return {NAME: auxiliary_loss(mse, self.target_mse(), self.alpha)}

    def after_step(self, core, step):
        self.step = step + 1                     # `step`: the index of the step just taken

    def step_log(self):
        log = {f'{NAME}_{k}': v for k, v in self.augmenter.magnitudes().items()}
        log[f'{NAME}_target_psnr'] = 10 * math.log10(MAX_MSE / self.target_mse())
        if self.last_mse is not None:           # PSNR of the last batch's mean MSE
            log[f'{NAME}_psnr'] = 10 * math.log10(MAX_MSE / max(float(self.last_mse.mean()), 1e-10))
        return log

    def state_dict(self):
        return {'ranges': self.augmenter.state_dict(), 'step': self.step}

    def load_state_dict(self, state):
        if state is None:
            print("note: the checkpoint has no RangeAugment ranges; they start from their initial values")
            return
        self.augmenter.load_state_dict(state['ranges'])
        self.step = int(state['step'])


# ----------------------------------------------------------------------------- flags

DEFAULTS = dict(range_augment_ops=list(CVNETS_CLIP_OPS), range_augment_target_psnr=[40.0, 20.0],
                range_augment_curriculum='cosine', range_augment_alpha=100.0, range_augment_lr_mult=1.0)


def add_args(parser):
    g = parser.add_argument_group('RangeAugment (any base and method)')
    g.add_argument('--range-augment', action='store_true',
                   help='learn the magnitude ranges of on-device image augmentations with the model '
                        '(Mehta et al. 2022, the cvnets CLIP recipe)')
    g.add_argument('--range-augment-ops', nargs='+', choices=list(OPS), default=DEFAULTS['range_augment_ops'],
                   metavar='OP', help=f"ops with learned ranges, of {', '.join(OPS)} "
                                      f"(default: cvnets CLIP's {' '.join(CVNETS_CLIP_OPS)})")
    g.add_argument('--range-augment-target-psnr', nargs='+', type=float, metavar='DB',
                   default=DEFAULTS['range_augment_target_psnr'],
                   help='target PSNR of augmented vs original images: START END over training, or '
                        'one constant value (40 20)')
    g.add_argument('--range-augment-curriculum', choices=['cosine', 'linear'],
                   default=DEFAULTS['range_augment_curriculum'], help='START -> END schedule (cosine)')
    g.add_argument('--range-augment-alpha', type=float, default=DEFAULTS['range_augment_alpha'],
                   help='auxiliary loss weight; the loss is alpha / 255^2 * smooth-L1 of the MSE (100)')
    g.add_argument('--range-augment-lr-mult', type=float, default=DEFAULTS['range_augment_lr_mult'],
                   help='learning-rate multiplier of the ranges (1)')


def resolve(args):
    if not args.range_augment:
        changed = [k for k, v in DEFAULTS.items() if getattr(args, k) != v]
        if changed:
            raise ValueError(f"--{changed[0].replace('_', '-')} goes with --range-augment; add it or drop the flag")
        return
    psnr = args.range_augment_target_psnr
    if len(psnr) > 2 or min(psnr) <= 0:
        raise ValueError(f"--range-augment-target-psnr takes START [END], each > 0 dB, got {' '.join(map(str, psnr))}")
    if len(set(args.range_augment_ops)) != len(args.range_augment_ops):
        raise ValueError(f"--range-augment-ops lists an op twice: {' '.join(args.range_augment_ops)}")
    if args.range_augment_alpha <= 0 or args.range_augment_lr_mult <= 0:
        raise ValueError("--range-augment-alpha and --range-augment-lr-mult must be > 0")


def enabled(args):
    return args.range_augment


def build(args, model, device):
    augmenter = RangeAugmenter(args.range_augment_ops).to(device)
    attach(model, augmenter)
    return RangeAugment(augmenter, args)
