"""RangeAugment (`--range-augment`, range_augment.py): the auxiliary loss against the PSNR
formula, gradients into every op's range, ranges that move toward the target, exact cached
accumulation, the model's state_dict untouched, and training through main.py (every method,
an on-disk format, bit-identical resume, two processes)."""
import json
import math
import os
import sys

import pytest
import torch

import augment
import engine
import features
import main as train
import methods
import models
import range_augment as ra
from dist_step import global_batch, has_batchnorm   # tests/ is on sys.path under pytest
from test_methods import METHOD_CASES

CPU = torch.device('cpu')


def _args(*flags, model='CLIP_TINYVIT_CLIP'):
    return train.parse_args(['--model', model, '--range-augment', *flags])


def _augmenter(ops=tuple(ra.OPS)):
    return ra.RangeAugmenter(ops)


def _pixels(n=8, size=32, seed=0):
    """Images in [0.1, 0.9] with some structure (smooth gradients plus a square)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.1, 0.9, size)
    base = 0.5 * (ramp.view(1, 1, 1, -1) + ramp.view(1, 1, -1, 1))
    x = base * torch.rand(n, 3, 1, 1, generator=g) + 0.1
    x[:, :, size // 4:size // 2, size // 4:size // 2] = torch.rand(n, 3, 1, 1, generator=g) * 0.8 + 0.1
    return x.clamp(0, 1)


def _normalize(pixels):
    mean = torch.tensor(augment.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(augment.CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


# ----------------------------------------------------------------------------- the loss

def test_mse_and_auxiliary_loss_match_a_direct_psnr_formula():
    torch.manual_seed(0)
    aug = _augmenter()
    pixels = _pixels()
    with torch.no_grad():
        out, mse = aug.augment_normalized(_normalize(pixels))
    augmented = out * torch.tensor(augment.CLIP_STD).view(3, 1, 1) + torch.tensor(augment.CLIP_MEAN).view(3, 1, 1)
    for i in range(len(pixels)):
        direct = float(((augmented[i] * 255 - pixels[i] * 255) ** 2).mean())
        assert mse[i].item() == pytest.approx(direct, rel=1e-4, abs=1e-6)
        if direct > 1e-3:                       # an image none of the ops picked has MSE 0
            psnr = 20 * math.log10(255) - 10 * math.log10(direct)
            assert 10 * math.log10(255 ** 2 / mse[i].item()) == pytest.approx(psnr, rel=1e-4)
    target_psnr = 30.0
    target = 10 ** ((20 * math.log10(255) - target_psnr) / 10)        # cvnets' formula
    assert ra.psnr_to_mse(target_psnr) == pytest.approx(target)
    d = (mse - target).abs()
    smooth_l1 = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    assert float(ra.auxiliary_loss(mse, target, 100.0)) == pytest.approx(float(smooth_l1) * 100 / 65025, rel=1e-6)


def test_curriculum_goes_from_start_to_end_psnr():
    psnr, total = (40.0, 20.0), 100
    cosine = [ra.target_mse(t, total, psnr) for t in range(0, total + 20)]
    assert cosine[0] == pytest.approx(ra.psnr_to_mse(40))
    assert all(a <= b for a, b in zip(cosine, cosine[1:]))        # MSE grows: PSNR falls
    # cvnets' cosine table: end + (start - end)(1 + cos(pi t / (T + 1))) / 2, then its last entry
    start, end = ra.psnr_to_mse(40), ra.psnr_to_mse(20)
    assert cosine[total] == pytest.approx(end + 0.5 * (start - end) * (1 + math.cos(math.pi * total / (total + 1))))
    assert cosine[-1] == cosine[total]
    assert ra.target_mse(total, total, psnr, 'linear') == pytest.approx(end)
    assert ra.target_mse(50, total, (25.0,)) == pytest.approx(ra.psnr_to_mse(25))


# ----------------------------------------------------------------------------- the ops

@pytest.mark.parametrize('op', list(ra.OPS))
def test_gradients_reach_both_ends_of_every_range(op):
    torch.manual_seed(1)
    aug = _augmenter((op,))
    out = aug(_pixels(n=16))
    ((out - 0.5) ** 2).mean().backward()
    for name, p in aug.named_parameters():
        assert p.grad is not None and p.grad.abs() > 0 and torch.isfinite(p.grad), (op, name)


def test_ops_transform_half_the_batch_and_clip():
    torch.manual_seed(2)
    aug = _augmenter(('brightness',))
    pixels = _pixels(n=10)
    out = aug(pixels)
    changed = (out - pixels).flatten(1).abs().amax(1) > 0
    assert int(changed.sum()) == 5 and out.min() >= 0 and out.max() <= 1


def _train_on_auxiliary_loss(aug, x, target_psnr, steps=60):
    """-> median PSNR of fresh draws before and after `steps` Adam steps on the auxiliary loss
    alone (its per-image L1 pulls the median image's MSE to the target)."""
    def psnr():
        with torch.no_grad():
            mses = torch.cat([aug.augment_normalized(x)[1] for _ in range(8)])
        return 10 * math.log10(65025 / float(mses.median()))

    before = psnr()
    opt = torch.optim.Adam(aug.parameters(), lr=0.05)
    for _ in range(steps):
        loss = ra.auxiliary_loss(aug.augment_normalized(x)[1], ra.psnr_to_mse(target_psnr), 100.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, psnr()


def test_wide_initial_ranges_shrink_toward_a_mild_target():
    """cvnets' initial ranges (brightness up to 8.4x, noise std up to 0.5) are far stronger than
    the 40 dB start of the CLIP curriculum: every range's upper end comes down, PSNR goes up."""
    torch.manual_seed(3)
    aug = _augmenter(ra.CVNETS_CLIP_OPS)
    before = aug.magnitudes()
    psnr_before, psnr_after = _train_on_auxiliary_loss(aug, _normalize(_pixels(n=16, size=16)), 40.0)
    after = aug.magnitudes()
    assert all(after[f'{op}_max'] < before[f'{op}_max'] for op in ra.CVNETS_CLIP_OPS), (before, after)
    assert psnr_after > psnr_before + 5, (psnr_before, psnr_after)


def test_narrow_ranges_widen_toward_a_strong_target():
    torch.manual_seed(3)
    aug = _augmenter(ra.CVNETS_CLIP_OPS)
    with torch.no_grad():                       # near-identity ranges: about 35 dB
        for r in aug.ranges.values():
            r.a.fill_(4.0), r.b.fill_(-4.0)
    before = aug.magnitudes()
    psnr_before, psnr_after = _train_on_auxiliary_loss(aug, _normalize(_pixels(n=16, size=16)), 15.0)
    after = aug.magnitudes()
    assert after['noise_max'] > before['noise_max'] and after['contrast_max'] > before['contrast_max']
    assert psnr_before > 30 and psnr_after < psnr_before - 10, (psnr_before, psnr_after)


# ----------------------------------------------------------------------------- in the model

def _model_with_feature(*flags, model='CLIP_TINYVIT_CLIP', dtype=torch.float32):
    args = _args(*flags, model=model)
    torch.manual_seed(0)
    net = models.create_model_from_flags(args.model, args)
    feats = features.build(args, net, CPU)
    return args, net.to(dtype), feats


def test_model_state_dict_exports_and_eval_do_not_see_it(tokenizer):
    args = _args()
    torch.manual_seed(0)
    plain = models.create_model_from_flags(args.model, args)
    torch.manual_seed(0)
    net = models.create_model_from_flags(args.model, args)
    old = net.state_dict()
    feats = features.build(args, net, CPU)
    assert list(net.state_dict()) == list(old)                 # checkpoints and exports unchanged
    net.load_state_dict(plain.state_dict())                     # an old checkpoint loads (strict)
    plain.load_state_dict(net.state_dict())
    batch = global_batch(net, tokenizer, 0)
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    net.eval(), plain.eval()
    with torch.no_grad():
        out, ref = net(batch), plain(batch)
    assert ra.MSE_KEY not in out and torch.equal(out['image_embed'], ref['image_embed'])
    assert not {id(p) for g in models.param_groups(net, 0.1) for p in g['params']} & \
        {id(p) for p in feats['range_augment'].augmenter.parameters()}
    net.train()
    assert net(batch)[ra.MSE_KEY].shape == (len(batch['text']), 1)


@pytest.mark.parametrize('case', [c for c in METHOD_CASES if not has_batchnorm(c)])
def test_cached_accumulation_equals_one_big_batch_with_the_same_draws(case, tokenizer):
    """Cached accumulation over 2 micro-batches gives the loss and gradients (ranges included)
    of one batch made of the same augmented micro-batches."""
    name, *flags = METHOD_CASES[case]
    args, net, feats = _model_with_feature(*flags, model=name, dtype=torch.float64)
    loss_fn = features.with_loss_terms(feats, methods.build_loss(args))
    views = args.num_augs if args.base == 'CL2L' else 0
    batch = global_batch(net, tokenizer, views)
    micro = [{k: v[j * 4:(j + 1) * 4] for k, v in batch.items()} for j in range(2)]
    torch.manual_seed(7)
    terms = engine.accumulate_cached(net, loss_fn, micro, torch.amp.GradScaler('cpu', enabled=False), CPU, 'fp32')
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    torch.manual_seed(7)                                        # the same draws, one batch
    augmented = [net.range_augment.augment_batch(m) for m in micro]
    big = {k: torch.cat([a[k] for a in augmented]) for k in augmented[0]}
    out = type(net).forward(net, big)                           # no hooks: already augmented
    ref = loss_fn({**out, ra.MSE_KEY: big[ra.MSE_KEY]})
    ref['loss'].backward()
    assert 'range_augment' in terms and torch.allclose(terms['loss'], ref['loss'].detach(), rtol=1e-10, atol=0)
    assert got.keys() == {n for n, p in net.named_parameters() if p.grad is not None}
    assert any(n.startswith('range_augment.') for n in got)
    for n, p in net.named_parameters():
        if p.grad is not None:
            assert (got[n] - p.grad).norm() <= 1e-9 * p.grad.norm().clamp_min(1e-12), n


# ----------------------------------------------------------------------------- through main.py

TINY = ['--shapes-num-train', '64', '--batch-size', '16', '--print-freq', '1', '--zeroshot-datasets', 'shapes']


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _checkpoint(out, name='checkpoint.pt'):
    return torch.load(os.path.join(out, name), weights_only=True)


def _initial_ranges(ops=ra.CVNETS_CLIP_OPS):
    return ra.RangeAugmenter(ops).state_dict()


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_every_method_trains_with_it_on_shapes(method, tmp_path):
    out = str(tmp_path / method)
    assert train.main(['--model', *METHOD_CASES[method], '--range-augment', *TINY, '--exit-after-steps', '2',
                       '--output-dir', out]) is None
    steps = _read_jsonl(os.path.join(out, 'log_steps.txt'))
    assert [s['step'] for s in steps] == [1, 2]
    for s in steps:
        assert math.isfinite(s['range_augment']) and s['range_augment'] > 0
        assert {f'range_augment_{op}_{end}' for op in ra.CVNETS_CLIP_OPS for end in ('min', 'max')} <= set(s)
        assert s['range_augment_target_psnr'] <= 40 and math.isfinite(s['range_augment_psnr'])
    ckpt = _checkpoint(out)
    assert not any(ra.NAME in k for k in ckpt['model'])                     # exports see no trace
    ranges = ckpt['features']['range_augment']['ranges']
    assert ckpt['features']['range_augment']['step'] == 2
    assert all(not torch.equal(ranges[k], v) for k, v in _initial_ranges().items())   # they trained


def _ranges_from_log(out):
    return [{k: v for k, v in s.items() if k.startswith('range_augment_') and k[-4:] in ('_min', '_max')}
            for s in _read_jsonl(os.path.join(out, 'log_steps.txt'))]


@pytest.mark.slow
def test_mid_epoch_resume_is_bit_identical_and_ranges_are_logged_and_plotted(tmp_path):
    """A CL2L run (views augmented too) with the geometric op stopped mid-epoch and resumed
    equals an uninterrupted one: weights, optimizer state, ranges, curriculum step."""
    flags = ['--model', 'CL2L_TINYCNN_CL2L', '--num-augs', '1', '--range-augment', '--range-augment-ops',
             'brightness', 'contrast', 'noise', 'scale', *TINY, '--epochs', '2', '--eval-freq', '2']
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    train.main([*flags, '--output-dir', straight])
    assert train.main([*flags, '--output-dir', split, '--exit-after-steps', '3']) is None
    train.main([*flags, '--output-dir', split])
    a, b = _checkpoint(straight), _checkpoint(split)
    assert a['step'] == b['step'] == 8
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for i in a['optimizer']['state']:
        for k in a['optimizer']['state'][i]:
            assert torch.equal(a['optimizer']['state'][i][k], b['optimizer']['state'][i][k]), (i, k)
    fa, fb = a['features']['range_augment'], b['features']['range_augment']
    assert fa['step'] == fb['step'] == 8
    assert all(torch.equal(fa['ranges'][k], fb['ranges'][k]) for k in fa['ranges'])
    logged = _ranges_from_log(straight)
    assert len(logged) == 8 and logged[0] != logged[-1] and 'range_augment_scale_max' in logged[0]
    assert _ranges_from_log(split) == logged
    assert os.path.isfile(os.path.join(straight, 'curves.png'))


def test_it_trains_on_an_on_disk_format(tmp_path):
    import datagen
    flags = datagen.WRITERS['csv'](str(tmp_path / 'data'), datagen.specs(n_good=13))
    out = str(tmp_path / 'out')
    results = train.main(['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--batch-size', '4', '--epochs', '1',
                          '--train-num-samples', '8', '--zeroshot-datasets', 'shapes', '--print-freq', '1',
                          '--range-augment', *flags, '--output-dir', out])
    assert 0 <= results['shapes']['top1'] <= 100
    steps = _read_jsonl(os.path.join(out, 'log_steps.txt'))
    assert len(steps) == 2 and all(math.isfinite(s['range_augment']) for s in steps)


def test_it_trains_a_timm_image_tower(tmp_path):
    """--image-tower (a timm model; TINYVIT and TINYCNN are covered above): the ranges train."""
    out = str(tmp_path / 'out')
    train.main(['--image-tower', 'test_resnet', '--image-size', '32', '--range-augment', *TINY,
                '--exit-after-steps', '1', '--output-dir', out])
    ranges = _checkpoint(out)['features']['range_augment']['ranges']
    assert all(not torch.equal(ranges[k], v) for k, v in _initial_ranges().items())


def test_plot_has_a_range_panel(tmp_path):
    import plots
    rows = [{'step': i, 'loss': 1.0 / i, 'range_augment_noise_min': 1e-5, 'range_augment_noise_max': 0.5 / i}
            for i in range(1, 4)]
    with open(tmp_path / 'log_steps.txt', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    import matplotlib.pyplot as plt
    created = []
    real = plt.subplots
    plt.subplots = lambda *a, **k: created.append(real(*a, **k)) or created[-1]
    try:
        plots.training_curves(str(tmp_path))
    finally:
        plt.subplots = real
    (fig, axes), = created
    assert len(axes) == 3 and axes[2].get_title() == 'RangeAugment ranges' and len(axes[2].lines) == 2


@pytest.mark.parametrize('argv, fragment', [
    (['--range-augment-alpha', '5'], '--range-augment-alpha goes with --range-augment'),
    (['--range-augment', '--range-augment-target-psnr', '40', '20', '10'], 'takes START [END]'),
    (['--range-augment', '--range-augment-target-psnr', '-3'], 'each > 0 dB'),
    (['--range-augment', '--range-augment-ops', 'noise', 'noise'], 'lists an op twice'),
    (['--range-augment', '--range-augment-ops', 'hue'], "invalid choice: 'hue'"),
    (['--range-augment', '--range-augment-lr-mult', '0'], 'must be > 0'),
])
def test_bad_flags_are_one_line_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and err.startswith('main.py: error:'), err


# ----------------------------------------------------------------------------- processes

DIST_CASES = {'CLIP': METHOD_CASES['CLIP'], 'CL2L_ACCUM': [*METHOD_CASES['CL2L'], '--update-freq', '2']}


@pytest.mark.slow
@pytest.mark.parametrize('case', list(DIST_CASES))
def test_two_processes_equal_one_pass_with_each_ranks_draws(case, tmp_path):
    """Under torchrun (2 gloo processes) the ranges' gradients are all-reduced with the model's:
    loss and every gradient equal one process computing the whole batch with the draws each
    rank makes (tests/dist_step.py), with cached accumulation too."""
    from test_distributed import assert_same_loss_and_grads, one_and_two_processes
    model, *flags = DIST_CASES[case]
    ref, got = one_and_two_processes(model, [*flags, '--range-augment'], tmp_path, 29700)
    assert_same_loss_and_grads(ref, got)
    assert any(n.startswith('range_augment.') for n in ref['grads'])
