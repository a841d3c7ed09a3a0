"""Training features that work with every base and method (model EMA, ...): one `FeatureSpec`
each, registered in `FEATURES`; each feature's code lives in its own module. main.py builds the
enabled ones after the model and calls their hooks (a `Feature`'s methods) at fixed points:
optimizer groups, after every taken optimizer step, per-step logs, checkpoints, validation.

Adding a feature: write its module (its argparse group, its checks, a Feature subclass), register
its FeatureSpec at the end of this file, document its flags (docs/flags.md) and its section in
docs/training-features.md, and test it in tests/test_<feature>.py.
"""
from dataclasses import dataclass
from typing import Callable, Protocol

from utils import Registry


@dataclass(frozen=True)
class FeatureSpec:
    name: str            # key in checkpoint['features'] and prefix of its log entries
    add_args: Callable   # add_args(parser): its own argparse group
    resolve: Callable    # resolve(args): one-line ValueError on bad values, fills derived defaults
    enabled: Callable    # enabled(args) -> bool (every feature is off by default)
    build: Callable      # build(args, model, device) -> Feature, after the model, before DDP
    doc: str             # one line: what it is (docs/training-features.md has the rest)


class Feature(Protocol):
    """The hooks main.py calls. A feature implements the ones it needs: a missing hook does
    nothing (feature modules need not import this one, which imports them)."""

    def param_groups(self):
        """Extra optimizer groups; a group's 'lr_scale' (default 1) multiplies the schedule's lr."""
        return []

    def after_step(self, core, step):
        """After every taken optimizer step (`core`: the unwrapped model, `step`: steps done)."""

    def step_log(self):
        """{name: float} added to each logged step of log_steps.txt (and wandb)."""
        return {}

    def state_dict(self):
        """What resume needs, saved in checkpoint['features'][name]."""
        return {}

    def load_state_dict(self, state):
        """Restore state_dict() on resume; `state` is None when the checkpoint was written
        without this feature (a run that turns it on at resume): start it from here."""

    def eval_models(self, core):
        """Extra weights that validation reports beside the live ones, e.g. {'ema': module}."""
        return {}

    def set_total_steps(self, total_steps):
        """Before training: the run's length in optimizer steps (for schedules, e.g. a curriculum)."""

    def loss_terms(self, outputs):
        """{name: 0-d tensor} added to the method's loss (and logged as terms), computed from the
        model's training outputs."""
        return {}


FEATURES = Registry('training feature')


def add_args(parser):
    for spec in FEATURES.values():
        spec.add_args(parser)


def resolve(args):
    for spec in FEATURES.values():
        spec.resolve(args)


def build(args, model, device):
    """{name: Feature} of the features enabled by the flags, in registry order."""
    return {name: spec.build(args, model, device) for name, spec in FEATURES.items()
            if spec.enabled(args)}


def _hooks(feats, hook):
    return [getattr(f, hook) for f in feats.values() if hasattr(f, hook)]


def param_groups(feats):
    return [g for groups in _hooks(feats, 'param_groups') for g in groups()]


def after_step(feats, core, step):
    for hook in _hooks(feats, 'after_step'):
        hook(core, step)


def step_log(feats):
    return {k: v for hook in _hooks(feats, 'step_log') for k, v in hook().items()}


def state_dicts(feats):
    return {name: f.state_dict() for name, f in feats.items() if hasattr(f, 'state_dict')}


def load_state_dicts(feats, states):
    """Restore each enabled feature from a checkpoint's 'features' entry (None if it has none)."""
    for name, f in feats.items():
        if hasattr(f, 'load_state_dict'):
            f.load_state_dict(states.get(name))


def eval_models(feats, core):
    return {k: m for hook in _hooks(feats, 'eval_models') for k, m in hook(core).items()}


def set_total_steps(feats, total_steps):
    for hook in _hooks(feats, 'set_total_steps'):
        hook(total_steps)


def with_loss_terms(feats, loss_fn):
    """`loss_fn` plus the features' own loss terms: each is added to 'loss' and logged by name."""
    hooks = _hooks(feats, 'loss_terms')
    if not hooks:
        return loss_fn

    def loss(outputs):
        terms = loss_fn(outputs)
        for hook in hooks:
            extra = hook(outputs)
            terms = {**terms, **extra, 'loss': terms['loss'] + sum(extra.values())}
        return terms
    return loss


def _register_all():
    import model_ema            # the feature modules (here: they need not import this one)
    import multiscale
    import range_augment
    import vpt
    FEATURES.register('model_ema', FeatureSpec(
        'model_ema', model_ema.add_args, model_ema.resolve, lambda args: args.model_ema,
        model_ema.build, 'exponential moving average of the weights, validated beside them'))
    FEATURES.register('range_augment', FeatureSpec(
        'range_augment', range_augment.add_args, range_augment.resolve, range_augment.enabled,
        range_augment.build, 'learned magnitude ranges of on-device image augmentations (RangeAugment)'))
    FEATURES.register('multiscale', FeatureSpec(
        'multiscale', multiscale.add_args, multiscale.resolve, multiscale.enabled, multiscale.build,
        "cvnets' multi-scale variable-batch sampler: an image size per step, the batch keeping the pixels"))
    FEATURES.register('vpt', FeatureSpec(
        'vpt', vpt.add_args, vpt.resolve, vpt.enabled, vpt.build,
        'visual prompt tuning: prompt tokens in a pretrained ViT image tower, the towers locked'))


_register_all()
