"""Model EMA (`--model-ema`): an exponential moving average of the weights, updated after every
optimizer step, validated beside the live weights, saved in the checkpoint and resumed exactly
(as in cvnets' CLIP recipe, Mehta et al. 2022, and timm's ModelEma; Polyak & Juditsky 1992).

    ema <- d * ema + (1 - d) * w     for every floating-point parameter and buffer
    d    = decay, or with --model-ema-warmup-steps W: min(decay, (1 + t) / (W + t)) at update t

Integer buffers (BatchNorm's batch counter) are copied. Every process keeps the same average
(the weights are identical after each DDP step), so what rank 0 saves equals what one process
computes. Not the BYOLIP teacher, which is part of that method's loss.
"""
import copy

import torch


def add_args(parser):
    g = parser.add_argument_group('model EMA (any base and method)')
    g.add_argument('--model-ema', action='store_true',
                   help='keep an exponential moving average of the weights; validation reports both, '
                        'eval_zeroshot.py / interop.py export / demo_zeroshot.py take --use-ema')
    g.add_argument('--model-ema-decay', type=float, default=0.9995,
                   help='EMA decay per optimizer step (0.9995, cvnets CLIP: momentum 0.0005)')
    g.add_argument('--model-ema-warmup-steps', type=int, default=0,
                   help='ramp the decay up as min(decay, (1 + t) / (W + t)) over the first updates '
                        '(0: constant decay)')


def resolve(args):
    if not 0 < args.model_ema_decay < 1:
        raise ValueError(f"--model-ema-decay must be in (0, 1), got {args.model_ema_decay}")
    if args.model_ema_warmup_steps < 0:
        raise ValueError(f"--model-ema-warmup-steps must be >= 0, got {args.model_ema_warmup_steps}")
    if not args.model_ema and (args.model_ema_decay != 0.9995 or args.model_ema_warmup_steps):
        raise ValueError("--model-ema-decay / --model-ema-warmup-steps go with --model-ema")


@torch.no_grad()
def ema_update_(average, live, decay, average_buffers=True):
    """average <- decay * average + (1 - decay) * live, parameter by parameter (same names);
    buffers averaged too (integer ones copied), or all copied with average_buffers=False."""
    sources = dict(live.named_parameters())
    for name, p in average.named_parameters():
        p.mul_(decay).add_(sources[name], alpha=1 - decay)
    sources = dict(live.named_buffers())
    for name, b in average.named_buffers():
        if average_buffers and b.is_floating_point():
            b.mul_(decay).add_(sources[name], alpha=1 - decay)
        else:
            b.copy_(sources[name])


class ModelEMA:
    """The averaged copy of the model and its update count."""

    def __init__(self, model, decay, warmup_steps=0):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.live = model
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def decay_at(self, t):
        if not self.warmup_steps:
            return self.decay
        return min(self.decay, (1 + t) / (self.warmup_steps + t))

    def after_step(self, core, step):
        ema_update_(self.model, core, self.decay_at(self.updates))
        self.updates += 1

    def step_log(self):
        return {'model_ema_decay': self.decay_at(max(self.updates - 1, 0))}

    def state_dict(self):
        return {'weights': self.model.state_dict(), 'updates': self.updates}

    def load_state_dict(self, state):
        if state is None:        # resumed from a run without it: the average starts here
            print("note: the checkpoint has no model EMA; it starts from the resumed weights")
            self.model.load_state_dict(self.live.state_dict())
            return
        self.model.load_state_dict(state['weights'])
        self.updates = int(state['updates'])

    def eval_models(self, core):
        return {'ema': self.model}


def build(args, model, device):
    return ModelEMA(model, args.model_ema_decay, args.model_ema_warmup_steps)


def weights_of(ckpt, source):
    """The EMA weights stored in a main.py checkpoint; ValueError (one line) if it has none."""
    state = (ckpt.get('features') or {}).get('model_ema') if isinstance(ckpt, dict) else None
    if not state:
        raise ValueError(f"{source} has no EMA weights (it was trained without --model-ema); "
                         f"drop --use-ema")
    return state['weights']
