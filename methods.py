"""Training methods: one `MethodSpec` per method, registered in `METHODS`. A method is its
registry entry: the bases it goes with, its loss (math in losses.py), its hyper-parameters
(a dataclass whose fields are its command-line flags), the heads it adds, its flag checks and
its per-step hook. main.py, models.py, the engine, the tests and the method table of docs/zoo.md read it here.

Adding a method: write its loss class (losses.py), register a MethodSpec below, add its case
to tests/test_methods.py (METHOD_CASES, plus a test of its loss formula).
"""
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Callable, Optional

import losses
import model_ema
from heads import BarLIPHead, SiamLIPHead
from utils import Registry


def flag(default, help, only_with=None, check=None, **argparse_kw):
    """A hyper-parameter field and its flag `--<name-with-dashes>`: `help` as in --help;
    `only_with`: the flag is an error with other methods (this text says which); `check`:
    (what, predicate) on the value, checked whatever the method (e.g. ('in (0, 1)', ...));
    `argparse_kw`: extra add_argument keywords (nargs, const, metavar)."""
    return field(default=default, metadata={'help': help, 'only_with': only_with, 'check': check,
                                            'argparse': argparse_kw})


@dataclass(frozen=True)
class NoParams:
    """A method without flags of its own."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    bases: tuple                 # bases this method makes sense with
    loss: Callable               # loss(args, params) -> nn.Module: model outputs -> named terms
    why_not: str = ''            # explanation when used with another base
    params: type = NoParams      # dataclass of its own flags (`flag` fields): its argparse group
    head: Optional[Callable] = None      # head(image_dim, text_dim, HeadCfg) -> nn.Module (CL2L)
    ema_teacher: bool = False    # the model keeps an EMA teacher of itself (BYOLIP, SDCLIP)
    logit_scale_init: float = 1 / 0.07   # initial exp(logit_scale)
    logit_bias_init: Optional[float] = None  # learnable logit bias (SigLIP)
    distill_scale_init: Optional[float] = None  # initial exp(sd_logit_scale): a distillation temperature (SDCLIP)
    selected_by: Optional[tuple] = None  # (method, predicate(args)): an upstream spelling of this one
    resolve: Optional[Callable] = None   # resolve(args): derived values of its flags (in parse_args)
    validate: Optional[Callable] = None  # validate(args): ValueError on bad flag combinations
    after_step: Optional[Callable] = None  # after_step(model, params) after every optimizer step
    idea: str = ''               # docs/zoo.md method table: idea, paper, loss (class and flags)
    paper: str = ''
    loss_doc: str = ''

    def params_of(self, args):
        """This method's hyper-parameters, read from the parsed flags."""
        return self.params(**{f.name: getattr(args, f.name) for f in dataclasses.fields(self.params)})


METHODS = Registry('method')


# ----------------------------------------------------------------------------- the registry

def _common(args):
    return dict(label_smoothing=args.label_smoothing, avg_or_sum=args.loss_avg_or_sum)


@dataclass(frozen=True)
class SigLIPParams:
    logit_bias_init: Optional[float] = flag(
        None, 'initial logit bias of SIGLIP (default -10)',
        only_with='goes with *_SIGLIP (the only method with a logit bias)')


@dataclass(frozen=True)
class SiamLIPParams:
    siamlip_proj_dim: Optional[int] = flag(None, 'SiamLIP projector output (128)')
    siamlip_hidden_dim: Optional[int] = flag(None, 'SiamLIP hidden width (2048)')
    siamlip_no_last_bn: bool = flag(False, 'SiamLIP: no final BN in the projector')


@dataclass(frozen=True)
class BYOLIPParams(SiamLIPParams):
    momentum: Optional[str] = flag(
        None, 'EMA teacher (BYOL): turns *_SIAMLIP into *_BYOLIP (upstream spelling); an optional '
              'value sets --momentum-tau',
        only_with='(EMA teacher) goes with *_SIAMLIP / *_BYOLIP', nargs='?', const='on', metavar='TAU')
    momentum_tau: float = flag(0.99, 'BYOLIP teacher EMA rate (0.99)',
                               check=('in (0, 1)', lambda v: 0 < v < 1))


@dataclass(frozen=True)
class BarLIPParams:
    barlip_proj_dim: Optional[int] = flag(None, 'BarLIP projector output (8192)')
    barlip_hidden_dim: Optional[int] = flag(None, 'BarLIP projector hidden width (3000)')
    barlip_lamb: float = flag(5e-3, 'BarLIP off-diagonal weight (5e-3)')
    barlip_scale_loss: float = flag(0.025, 'BarLIP loss scale (0.025)')


@dataclass(frozen=True)
class SinkhornParams:
    sk_iters: int = flag(3, 'SWALIP / SDCLIP Sinkhorn-Knopp iterations (3)')
    target_epsilon: float = flag(0.05, 'SWALIP / SDCLIP Sinkhorn entropy epsilon (0.05)')


@dataclass(frozen=True)
class SwALIPParams(SinkhornParams):
    swalip_weight: float = flag(0.2, 'SwALIP loss weight (0.2)')


@dataclass(frozen=True)
class SDCLIPParams(SinkhornParams):
    kl_coeff: float = flag(1.0, 'SDCLIP weight of the self-distillation KL term (1.0)',
                           check=('>= 0', lambda v: v >= 0))
    sdclip_momentum_tau: float = flag(0.999, 'SDCLIP teacher EMA rate (0.999)',
                                      check=('in (0, 1)', lambda v: 0 < v < 1))

    @property
    def momentum_tau(self):
        """The rate under the name the EMA teacher's update reads (BYOLIP's flag; its 0.99 default
        is not SDCLIP's 0.999, hence a flag of its own)."""
        return self.sdclip_momentum_tau


def _momentum_sets_tau(args):
    """Upstream `--momentum TAU` is `--momentum-tau TAU`."""
    if args.momentum not in (None, 'on'):
        try:
            args.momentum_tau = float(args.momentum)
        except ValueError:
            raise ValueError(f"--momentum takes an optional EMA rate, got {args.momentum!r}") from None


def ema_teacher_update(model, params):
    """BYOL's teacher: t <- tau * t + (1 - tau) * s for every parameter; buffers copied."""
    model_ema.ema_update_(model.teacher, model, params.momentum_tau, average_buffers=False)


def _swalip_checks(args):
    if args.label_smoothing:
        raise ValueError("*_SWALIP needs --label-smoothing 0 (its codes are soft targets already)")
    if args.num_augs == 0:
        raise ValueError("*_SWALIP needs augmented views: --num-augs >= 1")


_VIEWS = "it needs the CL2L base's augmented views (use CL2L_<backbone>_{m}; --num-augs 0 keeps global pairs only)"
_FINI = 'Fini et al. 2023 (after {})'
for _spec in [
    MethodSpec('CLIP', ('CLIP',), lambda a, p: losses.CLIPLoss(**_common(a)),
               why_not="with the CL2L base use method CL2L (--num-augs 0 makes it exactly CLIP)",
               idea='symmetric InfoNCE between images and captions', paper='Radford et al. 2021',
               loss_doc='`CLIPLoss` (`--label-smoothing`, `--loss-avg-or-sum`)'),
    MethodSpec('CL2L', ('CL2L',), lambda a, p: losses.CL2LLoss(**_common(a)), why_not=_VIEWS.format(m='CL2L'),
               idea='CLIP on the global pair + CLIP on all V×V (image view, text view) pairs, per side '
                    '(global + V·mean(local))/(1+V)',
               paper='Fini et al., TMLR 2023 (CLIP🚀)', loss_doc='`CL2LLoss` (smoothing on the view terms only)'),
    MethodSpec('SIAMLIP', ('CL2L',), lambda a, p: losses.SiamLIPLoss(**_common(a)),
               why_not=_VIEWS.format(m='SIAMLIP'), params=SiamLIPParams, head=SiamLIPHead,
               idea='CL2L + SimSiam across modalities: 2−2·cos(prediction, stop-grad target), '
                    'image→text and text→image predictors',
               paper=_FINI.format('Chen & He 2021'), loss_doc='`SiamLIPLoss`'),
    MethodSpec('BYOLIP', ('CL2L',), lambda a, p: losses.SiamLIPLoss(**_common(a)),
               why_not=_VIEWS.format(m='BYOLIP'), params=BYOLIPParams, head=SiamLIPHead, ema_teacher=True,
               selected_by=('SIAMLIP', lambda args: args.momentum is not None),
               resolve=_momentum_sets_tau, after_step=ema_teacher_update,
               idea='SIAMLIP whose targets come from an EMA teacher (`--momentum-tau` 0.99; upstream '
                    '`--momentum` selects it)',
               paper=_FINI.format('Grill et al. 2020'), loss_doc='`SiamLIPLoss`'),
    MethodSpec('BARLIP', ('CL2L',),
               lambda a, p: losses.BarLIPLoss(**_common(a), lamb=p.barlip_lamb, scale=p.barlip_scale_loss),
               why_not=_VIEWS.format(m='BARLIP'), params=BarLIPParams, head=BarLIPHead,
               idea='CL2L + Barlow Twins between image and text projections (8192-d, cross-correlation '
                    'averaged across ranks, off-diagonal 5e-3, scale 0.025: on several processes upstream\'s gradient '
                    'was 1/W of that, [see below](#barlips-loss-scale-upstreams-gradient-shrinks-with-the-number-of-processes))',
               paper=_FINI.format('Zbontar et al. 2021'), loss_doc='`BarLIPLoss`'),
    MethodSpec('SWALIP', ('CL2L',),
               lambda a, p: losses.SwALIPLoss(**_common(a), weight=p.swalip_weight,
                                              epsilon=p.target_epsilon, iters=p.sk_iters),
               why_not=_VIEWS.format(m='SWALIP'), params=SwALIPParams, validate=_swalip_checks,
               idea='CL2L + swapped prediction of Sinkhorn-Knopp codes (3 iterations, ε 0.05) with the '
                    "other modality's gathered batch as prototypes, weight 0.2; needs `--label-smoothing 0`",
               paper=_FINI.format('Caron et al. 2020'), loss_doc='`SwALIPLoss`'),
    MethodSpec('SIGLIP', ('CLIP',), lambda a, p: losses.SigLIPLoss(), params=SigLIPParams,
               why_not="the sigmoid loss replaces CLIP's softmax on single pairs; CL2L's view losses are softmax-based",
               logit_scale_init=10.0, logit_bias_init=-10.0,
               idea='pairwise sigmoid loss, learnable temperature and bias initialised at log 10 and −10 '
                    '(our addition)',
               paper='Zhai et al., ICCV 2023', loss_doc='`SigLIPLoss`'),
    MethodSpec('SDCLIP', ('CLIP',),
               lambda a, p: losses.SDCLIPLoss(**_common(a), kl_coeff=p.kl_coeff, epsilon=p.target_epsilon,
                                              iters=p.sk_iters),
               why_not="its teacher targets are defined on the global image-caption pairs: use "
                       "CLIP_<backbone>_SDCLIP",
               params=SDCLIPParams, ema_teacher=True, distill_scale_init=1 / 0.07,
               after_step=ema_teacher_update,
               idea='CLIP + `--kl-coeff` (1) × KL(targets ‖ softmax(τ·cos)), image→text and text→image; '
                    'targets: the Sinkhorn-Knopp plan (3 iterations, ε 0.05) of an EMA teacher\'s '
                    '(`--sdclip-momentum-tau` 0.999) cost −(S_ii + S_tt + S_it) over the gathered batch; τ '
                    'learnable from 1/0.07 ([differences from train-CLIP](#sdclip-and-train-clip))',
               paper='Cheng et al. 2021 (train-CLIP\'s `CustomCLIPWrapper`)', loss_doc='`SDCLIPLoss`'),
]:
    METHODS.register(_spec.name, _spec)


# ----------------------------------------------------------------------------- flags

def _own_fields(params, seen):
    """Fields of a params dataclass not already given a flag (subclasses share their base's)."""
    return [f for f in dataclasses.fields(params) if f.name not in seen]


def _argparse_kwargs(f):
    """add_argument keywords from a `flag` field: store_true for a False bool, else its type."""
    kw = {'default': f.default, 'help': f.metadata['help'], **f.metadata['argparse']}
    tp = f.type
    if typing.get_origin(tp) is typing.Union:                   # Optional[X] -> X
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp is bool:
        return {'action': 'store_true', 'help': kw['help']}
    if tp is not str:
        kw['type'] = tp
    return kw


def add_args(parser):
    """One argparse group per method with flags of its own (registry order; shared flags once)."""
    seen = set()
    for spec in METHODS.values():
        fields = _own_fields(spec.params, seen)
        if not fields:
            continue
        g = parser.add_argument_group(f'method {spec.name}')
        for f in fields:
            g.add_argument('--' + f.name.replace('_', '-'), **_argparse_kwargs(f))
            seen.add(f.name)


def _all_fields():
    seen, out = set(), []
    for spec in METHODS.values():
        for f in _own_fields(spec.params, seen):
            seen.add(f.name)
            out.append(f)
    return out


def check_flags(method, values):
    """Flags that belong to one method only (`only_with`) are an error with any other;
    `values`: a dict of flag values (parsed args or create_model overrides)."""
    own = {f.name for f in dataclasses.fields(METHODS.get(method).params)}
    for f in _all_fields():
        if f.metadata['only_with'] and f.name not in own and values.get(f.name) is not None:
            raise ValueError(f"--{f.name.replace('_', '-')} {f.metadata['only_with']}, not {method}")


def resolve_model_name(model, args):
    """`model` after upstream spellings: e.g. *_SIAMLIP with --momentum is *_BYOLIP."""
    prefix, method = model.rsplit('_', 1)
    for spec in METHODS.values():
        if spec.selected_by and spec.selected_by[0] == method and spec.selected_by[1](args):
            return f'{prefix}_{spec.name}'
    return model


def resolve(args):
    """Check and resolve the method flags of parsed `args` (args.method set): flags of other
    methods, the method's derived values, value ranges of every method flag, then the method's
    own combination checks. Raises ValueError with the message for the user."""
    spec = METHODS.get(args.method)
    check_flags(args.method, vars(args))
    if spec.resolve:
        spec.resolve(args)
    for f in _all_fields():
        if f.metadata['check']:
            what, ok = f.metadata['check']
            if not ok(getattr(args, f.name)):
                raise ValueError(f"--{f.name.replace('_', '-')} must be {what}, got {getattr(args, f.name)}")
    if spec.validate:
        spec.validate(args)


def build_loss(args):
    """The loss module of args.method, configured from the flags."""
    spec = METHODS.get(args.method)
    return spec.loss(args, spec.params_of(args))


def step_hook(args):
    """The method's hook after each optimizer step (model -> None), or None."""
    spec = METHODS.get(args.method)
    if spec.after_step is None:
        return None
    params = spec.params_of(args)
    return lambda model: spec.after_step(model, params)


# ----------------------------------------------------------------------------- docs

def markdown_table():
    """docs/zoo.md's method table, from the registry."""
    rows = ['| method | bases | idea | paper | loss |', '|---|---|---|---|---|']
    rows += [f"| `{s.name}` | {', '.join(s.bases)} | {s.idea} | {s.paper} | {s.loss_doc} |"
             for s in METHODS.values()]
    return '\n'.join(rows)
