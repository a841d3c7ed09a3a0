"""--multiscale (multiscale.py, cvnets' VariableBatchSampler): cvnets' size / batch rule, a size
sequence that is a pure function of (seed, epoch, step) -- the same on every rank and after a
resume --, map-style and streaming loaders producing batches of the planned size and count,
ViTs through timm's dynamic image size (= resampling, bit-identical at the native size), and
training through size changes that resumes bit-identically."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import datagen
import datasets
import engine
import main as train
import methods
import models
import multiscale
from test_methods import METHOD_CASES

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--batch-size', '8', '--epochs', '1',
        '--zeroshot-datasets', 'shapes', '--print-freq', '1', '--multiscale']


# ----------------------------------------------------------------------------- the rule

def test_default_sizes_and_batches_are_cvnets_clip_recipe():
    """cvnets' CLIP ViT-B/16 config: base 224 px, 160..320 px, 5 scales, check_scale 32,
    batch 256 at 224. Its image_batch_pairs gives these (h, w, batch) pairs (worked by hand
    from data/sampler/utils.py: round(256 * 224^2 / s^2, 2), truncated)."""
    sizes = multiscale.default_sizes(224, patch=16)
    assert sizes == [160, 192, 224, 256, 288, 320]
    assert [multiscale.batch_at(s, 224, 256) for s in sizes] == [501, 348, 256, 196, 154, 125]
    assert multiscale.make_divisible(200, 32) == 192 and multiscale.make_divisible(40, 32) == 64


@pytest.mark.parametrize('image_size,batch,patch', [(224, 256, 16), (64, 16, 1), (32, 4, 8), (384, 64, 16)])
def test_pixels_per_batch_stay_within_the_rule(image_size, batch, patch):
    budget = batch * image_size ** 2
    sizes = multiscale.default_sizes(image_size, patch)
    assert image_size in sizes and len(sizes) >= 4 and all(s % patch == 0 for s in sizes)
    for s in sizes:
        b = multiscale.batch_at(s, image_size, batch)
        assert budget - s * s < b * s * s <= budget + 0.005 * s * s, (s, b)   # floor of the 2-decimal round


def test_size_sequence_is_a_function_of_seed_epoch_and_step():
    make = lambda seed, k=2: multiscale.Schedule([16, 24, 32, 40], 32, 8, seed, update_freq=k)  # noqa: E731
    sizes, counts = make(3).plan(5, 400)
    again, _ = make(3).plan(5, 600)                  # another object, a longer epoch: same prefix
    assert np.array_equal(sizes, again[:400])
    assert np.array_equal(sizes[0::2], sizes[1::2])  # the micro-batches of a step share its size
    assert set(sizes.tolist()) == {16, 24, 32, 40}
    assert not np.array_equal(sizes, make(3).plan(6, 400)[0]) and not np.array_equal(sizes, make(4).plan(5, 400)[0])
    assert np.array_equal(counts, [multiscale.batch_at(s, 32, 8) for s in sizes])


# ----------------------------------------------------------------------------- flags

def _args(*flags):
    return train.parse_args([*TINY, *flags])


def test_flags_resolve_defaults_and_reject_bad_sizes_in_one_line(capsys):
    assert _args().multiscale_sizes == multiscale.default_sizes(32, 8) == [24, 32, 40, 48]
    assert _args('--multiscale-sizes', '40', '16', '40').multiscale_sizes == [16, 40]
    assert _args().multiscale_batch == 'pixels'
    vit = ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32']
    assert train.parse_args(vit).multiscale is False                         # off by default
    assert train.parse_args(vit).multiscale_sizes is None
    for flags, words in [(['--multiscale-sizes', '20'], 'multiples of the 8 px patch'),
                         (['--multiscale-sizes', '4', '16'], '>= 8 px'),
                         (['--multiscale-sizes', '64', '--batch-size', '2'], 'needs >= 2')]:
        with pytest.raises(SystemExit):
            _args(*flags)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith('main.py: error: ') and words in err, err
    for flags in (['--multiscale-sizes', '32'], ['--multiscale-batch', 'fixed'], ['--no-multiscale', '--multiscale-sizes', '32']):
        with pytest.raises(SystemExit):
            train.parse_args([*vit, *flags])
        assert 'goes with --multiscale' in capsys.readouterr().err


def test_the_demo_trains_at_five_sizes_with_a_fixed_batch_unless_told_otherwise():
    """main.py with no flags (the demo's TINYCNN on shapes, CLIP base): 0.75-1.25x --image-size,
    the batch fixed; --no-multiscale, another tower, the CL2L base or explicit flags: as given."""
    demo = train.parse_args([])
    assert (demo.multiscale, demo.multiscale_sizes, demo.multiscale_batch) == (True, [48, 56, 64, 72, 80], 'fixed')
    assert train.parse_args(['--image-size', '32']).multiscale_sizes == [24, 28, 32, 36, 40]
    assert train.parse_args(['--no-multiscale']).multiscale is False
    own = train.parse_args(['--multiscale-sizes', '64', '40', '--multiscale-batch', 'pixels'])
    assert (own.multiscale, own.multiscale_sizes, own.multiscale_batch) == (True, [40, 64], 'pixels')
    assert train.parse_args(['--model', 'CLIP_TINYVIT_CLIP']).multiscale is False
    for name, *flags in METHOD_CASES.values():    # the CLIP base only: it hurt CL2L at this budget
        args = train.parse_args(['--model', name.replace('TINYVIT', 'TINYCNN'), *flags])
        assert args.multiscale is (args.base == 'CLIP'), name
    sizes, batches = multiscale.Schedule.from_args(demo).plan(0, 50)
    assert set(batches.tolist()) == {64} and set(sizes.tolist()) == {48, 56, 64, 72, 80}


# ----------------------------------------------------------------------------- loaders

def _loader(flags, tokenizer):
    args = _args(*flags)
    return args, datasets.build_loader(datasets.build_train_dataset(args, tokenizer), args)


def _epoch(sampler, loader, epoch, start=0):
    sampler.set_epoch(epoch, start=start)
    return [(b['image'], b['text']) for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _check_plan(args, batches, epoch):
    sizes, counts = multiscale.Schedule.from_args(args).plan(epoch, len(batches))
    assert [tuple(im.shape) for im, _ in batches] == [(n, 3, s, s) for s, n in zip(sizes, counts)]
    assert len(set(sizes.tolist())) > 1


@pytest.mark.parametrize('fmt', list(datasets.DATASETS))
def test_loader_batches_follow_the_plan_and_resume_mid_epoch(tmp_path, tokenizer, fmt):
    """Every registered format (map-style and streaming), 2 loader workers, --update-freq 2."""
    assert fmt in datagen.WRITERS, f"format {fmt} has no fixture writer in tests/datagen.py"
    specs = datagen.specs(n_good=48, seed=2)
    flags = [*datagen.WRITERS[fmt](str(tmp_path / 'data'), specs), '-j', '2', '--train-num-samples', '48',
             '--update-freq', '2', '--batch-size', '4', '--multiscale-sizes', '16', '32', '40']
    args, (sampler, loader) = _loader(flags, tokenizer)
    first, second = _epoch(sampler, loader, 0), _epoch(sampler, loader, 1)
    assert len(first) == 12 == len(second)                       # as many micro-batches as without
    _check_plan(args, first, 0)
    _check_plan(args, second, 1)
    _, (sampler2, loader2) = _loader(flags, tokenizer)           # a fresh process, resumed
    assert _same(_epoch(sampler2, loader2, 1, start=5 * 4), second[5:])   # start as main.py gives it
    assert _same(_epoch(sampler2, loader2, 0), first)


def test_cl2l_views_scale_with_the_step(tokenizer):
    args, (sampler, loader) = _loader(['--model', 'CL2L_TINYVIT_CL2L', '--multicrop-resize', '16',
                                       '--shapes-num-train', '64', '--train-num-samples', '32'], tokenizer)
    sampler.set_epoch(0)
    shapes = {(b['image'].shape[-1], b['image_views'].shape[-1]) for b in loader}
    assert shapes == {(s, multiscale.view_size(args, s)) for s, _ in shapes} and len(shapes) > 1
    assert multiscale.view_size(args, 32) == 16 and multiscale.view_size(args, 48) == 24


def test_two_ranks_draw_the_same_sizes_from_disjoint_samples():
    """The map-style sampler of rank 0 and rank 1 (world 2): same size and batch per
    micro-batch, each rank its own share (disjoint until a share wraps)."""
    schedule = multiscale.Schedule([16, 24, 32, 40], 32, 4, seed=7)
    ranks = [multiscale.BatchSampler(datasets.ResumableSampler(200, seed=7, rank=r, world_size=2), schedule, 4)
             for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    a, b = (list(s) for s in ranks)
    assert len(a) == len(b) == 25
    assert [(len(x), x[0][3]) for x in a] == [(len(y), y[0][3]) for y in b]
    seen_a, seen_b = {i for x in a for i, *_ in x}, {i for y in b for i, *_ in y}
    assert not seen_a & seen_b and len(seen_a) == len(seen_b) == 100      # each share used, wrapped


@pytest.mark.slow
def test_two_processes_see_the_same_size_sequence(tmp_path):
    """torchrun, 2 gloo processes, wds with loader workers: each rank records its batch shapes."""
    specs = datagen.specs(n_good=48, seed=2)
    flags = datagen.write_wds(str(tmp_path / 'data'), specs)
    out = str(tmp_path / 'shapes.json')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
           '--master_port', str(29300 + os.getpid() % 100), os.path.join(HERE, 'dist_multiscale.py'), out,
           *TINY, *flags, '-j', '2', '--train-num-samples', '48', '--batch-size', '4',
           '--multiscale-sizes', '16', '32', '40']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        rank0, rank1 = json.load(f)
    assert rank0['shapes'] == rank1['shapes'] and len(rank0['shapes']) == 6
    assert len({s[-1] for s in rank0['shapes']}) > 1                      # the size changes
    assert rank0['pixels'] != rank1['pixels']                             # each rank its own samples


# ----------------------------------------------------------------------------- models

def test_vit_dynamic_size_equals_timms_and_is_bit_identical_at_the_native_size():
    """enable_dynamic_size on a built ViT = timm's dynamic_img_size=True model (position
    embeddings resampled to the input's grid), and changes nothing at the built size."""
    torch.manual_seed(0)
    kw = dict(pretrained=False, num_classes=0, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    vit = timm.create_model('vit_tiny_patch16_224', **kw).eval()
    ref = timm.create_model('vit_tiny_patch16_224', dynamic_img_size=True, **kw).eval()
    ref.load_state_dict(vit.state_dict())
    x32 = torch.randn(3, 3, 32, 32)
    before = vit(x32)
    assert multiscale.enable_dynamic_size(vit) == 1
    assert torch.equal(vit(x32), before) and torch.equal(ref(x32), before)
    for size in (16, 48, 56):
        x = torch.randn(2, 3, size, size)
        assert torch.equal(vit(x), ref(x)), size
    resampled = timm.layers.resample_abs_pos_embed(vit.pos_embed, [6, 6], num_prefix_tokens=1)
    assert not torch.equal(resampled[:, 1:], vit.pos_embed[:, 1:6 * 6 + 1])   # a real resampling


def test_a_tower_that_cannot_take_a_size_stops_in_one_line(capsys):
    args = train.parse_args(['--model', 'CLIP_TINYCNN_CLIP', '--image-tower', 'vit_tiny_patch16_224',
                             '--image-size', '32', '--multiscale', '--multiscale-sizes', '24', '32',
                             '--batch-size', '16'])
    model = models.create_model_from_flags(args.model, args)
    with pytest.raises(SystemExit) as stop:
        multiscale.build(args, model, torch.device('cpu'))
    assert str(stop.value).startswith('main.py: error: --multiscale: the image tower cannot take 24 px')
    assert model.visual.training                                     # the probe left the mode alone


def _batch(tokenizer, size, n, views, seed):
    g = torch.Generator().manual_seed(seed)
    batch = {'image': torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
             'text': tokenizer([f'caption {i} {seed} ' + 'word ' * (i % 4) for i in range(n)])}
    if views:
        batch['image_views'] = torch.randint(0, 256, (n, views, 3, size, size), generator=g, dtype=torch.uint8)
        batch['text_views'] = tokenizer([f'view {i}' for i in range(n * views)]).view(n, views, -1)
    return engine.to_device(batch, torch.device('cpu'))


@pytest.mark.parametrize('method', list(methods.METHODS))
def test_every_method_trains_through_size_changes(method, tokenizer):
    """Every registered method: an optimizer step at each size with its cvnets batch, two
    cached-accumulation micro-batches each (CL2L views at the step's size too)."""
    assert method in METHOD_CASES, f"method {method} has no case in METHOD_CASES (tests/test_methods.py)"
    args = train.parse_args(['--model', *METHOD_CASES[method], '--multiscale', '--image-size', '16',
                             '--multiscale-sizes', '8', '16', '24', '--batch-size', '6', '--update-freq', '2'])
    torch.manual_seed(0)
    model = models.create_model_from_flags(args.model, args)
    feature = multiscale.build(args, model, torch.device('cpu'))
    optimizer = train.build_optimizer(model, args)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    views = args.num_augs if args.base == 'CL2L' else 0
    for size in args.multiscale_sizes:
        n = multiscale.batch_at(size, 16, 6)
        micro = [_batch(tokenizer, size, n, views, seed) for seed in (0, 1)]
        terms, stepped = engine.train_step(model, methods.build_loss(args), micro, optimizer, scaler,
                                           torch.device('cpu'), 'fp32', engine.accumulate_cached,
                                           methods.step_hook(args))
        assert stepped and torch.isfinite(terms['loss']), (size, terms)
        assert feature.step_log() == {'multiscale_image_size': size, 'multiscale_batch_size': n}


# ----------------------------------------------------------------------------- main.py

def _weights(out):
    return torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)['model']


@pytest.mark.slow
@pytest.mark.parametrize('model,fmt,extra', [('CLIP_TINYVIT_CLIP', 'wds', []),
                                             ('CLIP_TINYCNN_CLIP', 'shapes', ['--model-ema'])])
def test_training_through_size_changes_resumes_bit_identically(tmp_path, model, fmt, extra):
    """A ViT on wds shards and a CNN on shapes (with model EMA), loader workers, cached
    accumulation: a run killed mid-epoch (--exit-after-steps) and resumed by the same command
    ends with the weights of the uninterrupted run; log_steps.txt shows the sizes and their
    cvnets batches."""
    flags = datagen.WRITERS[fmt](str(tmp_path / 'data'), datagen.specs(n_good=48, seed=2))
    argv = [*TINY, '--model', model, *flags, '--epochs', '2', '--train-num-samples', '48', '-j', '2',
            '--batch-size', '4', '--multiscale-sizes', '16', '32', '40', '--update-freq', '2', *extra]
    straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
    train.main([*argv, '--output-dir', straight])
    assert train.main([*argv, '--output-dir', split, '--exit-after-steps', '3']) is None   # mid-epoch 0
    train.main([*argv, '--output-dir', split])
    a, b = _weights(straight), _weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(os.path.join(straight, 'log_steps.txt')) as f:
        steps = [json.loads(line) for line in f]
    assert [s['step'] for s in steps] == list(range(1, 13))             # 6 steps an epoch, as without
    seen = {(s['multiscale_image_size'], s['multiscale_batch_size']) for s in steps}
    assert len(seen) > 1 and all(n == multiscale.batch_at(size, 32, 4) for size, n in seen)
