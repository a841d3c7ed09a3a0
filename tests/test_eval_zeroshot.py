"""System tests of eval_zeroshot.py, demo_zeroshot.py and main.py's validation: result files
CLIP_benchmark can merge, several resolutions, the on-disk text cache, missing datasets,
bit-for-bit agreement with CLIP_benchmark's own evaluator, the demo figure."""
import csv
import json
import os
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import demo_zeroshot
import eval_zeroshot
import main as train
from zs_helpers import make_imagefolder, make_mnist, tiny_checkpoint, write_catalog


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny.pt')


def noise_imagefolder(root, classes=6, per_class=6, seed=0):
    """Varied images (so a random model's predictions spread over the classes)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f'c{c}').mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 256, size=3)
            noise = rng.integers(-60, 60, size=(24 + 4 * c, 30, 3))
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(root / f'c{c}' / f'{i}.png')
    return root


def test_sweep_writes_clip_benchmark_files_csv_and_skips_missing(tmp_path, ckpt, capsys):
    make_imagefolder(tmp_path / 'data' / 'gen')
    files = write_catalog(tmp_path, {'gen': {'type': 'imagefolder', 'path': 'gen', 'display': 'Gen'},
                                     'gone': {'type': 'imagefolder', 'path': 'gone/val', 'display': 'Gone'}})
    out = tmp_path / 'out'
    args = ['--resume', ckpt, '--data-root', str(tmp_path / 'data'), '--resolutions', '32', '40',
            '--output-dir', str(out), '--cache-dir', str(tmp_path / 'cache'), '--batch-size', '4',
            '--catalog', files['catalog'], '--labels', files['labels'], '--templates', files['templates']]
    results = eval_zeroshot.main(args)
    printed = capsys.readouterr().out
    assert f"gone: skipped: not found at {tmp_path / 'data'}/gone/val" in printed
    assert 'text features: 1 from cache, 1 computed' in printed       # 2nd resolution: cached
    assert 0 <= results['gen']['top1'] <= 100 and results['gone'] == {'skipped': printed.split(
        'gone: skipped: ')[1].splitlines()[0]}
    for res in (32, 40):                                              # one JSON per resolution
        record = json.load(open(out / f'gen_tiny_CLIP_TINYVIT_CLIP_{res}px_zeroshot_classification.json'))
        assert {'dataset', 'model', 'pretrained', 'task', 'metrics', 'language'} <= set(record)
        assert record['resolution'] == res and set(record['metrics']) >= {'acc1', 'acc5', 'mean_per_class_recall'}
    rows = list(csv.DictReader(open(out / 'results.csv')))
    assert [(r['dataset'], r['resolution'], r['status'][:7]) for r in rows] == [
        ('gen', '32', 'ok'), ('gone', '32', 'skipped'), ('gen', '40', 'ok'), ('gone', '40', 'skipped')]
    from clip_benchmark.cli import main_build                          # CLIP_benchmark merges them
    main_build(Namespace(files=[str(out)], output=str(tmp_path / 'bench.csv')))
    merged = list(csv.DictReader(open(tmp_path / 'bench.csv')))
    assert len(merged) == 2 and {r['dataset'] for r in merged} == {'gen'} and 'acc1' in merged[0]

    eval_zeroshot.main(args)                                          # second run: all from disk
    assert 'text features: 2 from cache, 0 computed' in capsys.readouterr().out


def test_bf16_evaluation_keeps_its_own_text_cache(tmp_path, ckpt, capsys):
    make_imagefolder(tmp_path / 'data' / 'gen')
    files = write_catalog(tmp_path, {'gen': {'type': 'imagefolder', 'path': 'gen', 'display': 'Gen'}})
    out = tmp_path / 'out'
    args = ['--resume', ckpt, '--data-root', str(tmp_path / 'data'), '--output-dir', str(out),
            '--cache-dir', str(tmp_path / 'cache'), '--batch-size', '4', '--catalog', files['catalog'],
            '--labels', files['labels'], '--templates', files['templates']]
    record = out / 'gen_tiny_CLIP_TINYVIT_CLIP_32px_zeroshot_classification.json'
    for precision, cached in (('fp32', 0), ('bf16', 0), ('bf16', 1)):  # bf16 never reads fp32 features
        results = eval_zeroshot.main(args + ['--precision', precision])
        assert f'text features: {cached} from cache, {1 - cached} computed' in capsys.readouterr().out
        assert json.load(open(record))['precision'] == precision and 0 <= results['gen']['top1'] <= 100
    assert len(os.listdir(tmp_path / 'cache')) == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            eval_zeroshot.main(args + ['--precision', 'amp'])
        assert '--precision amp needs CUDA; valid on CPU: fp32, bf16' in capsys.readouterr().err


@pytest.mark.filterwarnings('ignore::DeprecationWarning')           # inside CLIP_benchmark
def test_clip_benchmark_parity(tmp_path, ckpt, monkeypatch):
    """CLIP_benchmark's own CLI (model type registered by eval_zeroshot) and eval_zeroshot.py
    on the same weights and ImageFolder give identical metrics."""
    noise_imagefolder(tmp_path / 'root' / 'val')
    names = [f'thing number {c}' for c in range(6)]
    templates = ['a photo of a {}.', 'a blurry picture of the {}.', 'art of {}.']
    cb_names, cb_templates = tmp_path / 'cb_names.json', tmp_path / 'cb_templates.json'
    cb_names.write_text(json.dumps({'imagenet1k-unverified': names}))
    cb_templates.write_text(json.dumps({'imagenet1k-unverified': [t.replace('{}', '{c}') for t in templates]}))
    cb_out = tmp_path / 'cb.json'
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    eval_zeroshot.main(['clip_benchmark', 'eval', '--model_type', 'vlp_baselines', '--model', 'z',
                        '--pretrained', ckpt, '--dataset', 'imagenet1k-unverified',
                        '--dataset_root', str(tmp_path / 'root'), '--custom_classname_file', str(cb_names),
                        '--custom_template_file', str(cb_templates), '--no_amp', '--num_workers', '0',
                        '--batch_size', '16', '--output', str(cb_out), '--quiet'])
    theirs = json.load(open(cb_out))['metrics']
    files = write_catalog(tmp_path, {'gen': {'type': 'imagefolder', 'path': 'val'}}, templates=templates)
    json.dump({'gen': names}, open(files['labels'], 'w'))
    ours_dir = tmp_path / 'ours'
    eval_zeroshot.main(['--resume', ckpt, '--data-root', str(tmp_path / 'root'), '--batch-size', '16',
                        '--output-dir', str(ours_dir), '--no-cache', '--catalog', files['catalog'],
                        '--labels', files['labels'], '--templates', files['templates']])
    ours = json.load(open(ours_dir / 'gen_tiny_CLIP_TINYVIT_CLIP_32px_zeroshot_classification.json'))['metrics']
    assert 1 / 6 < theirs['acc5'] < 1                                 # a non-trivial comparison
    for key in ('acc1', 'acc5', 'mean_per_class_recall'):
        assert ours[key] == theirs[key], (key, ours[key], theirs[key])


def test_demo_figure(tmp_path, ckpt, capsys):
    for i, color in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250)]):
        Image.new('RGB', (40, 30), color).save(tmp_path / f'im{i}.png')
    fig = tmp_path / 'fig.png'
    result = demo_zeroshot.main(['--checkpoint', ckpt, '--img-dir', str(tmp_path),
                                 '--classes', 'red,green,blue,cat,dog,car,tree', '--show-prediction',
                                 '--output', str(fig)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.count('%') == 5 for line in lines[:3])
    assert result['panels'] == 6 and all(len(p['top']) == 5 for p in result['predictions'])
    with Image.open(fig) as im:
        im.verify()
    with Image.open(fig) as im:                                       # one 2-inch row per image
        assert im.format == 'PNG' and im.size == (800, 3 * 200)
    default = demo_zeroshot.main(['--checkpoint', ckpt, '--img-path', str(tmp_path / 'im0.png')])
    assert 'figure' not in default and len(default['predictions']) == 1   # CIFAR-100 names


def test_training_time_validation_on_a_catalog_subset(tmp_path, capsys):
    make_mnist(tmp_path / 'data' / 'mnist')
    out = tmp_path / 'run'
    results = train.main(['--shapes-num-train', '256', '--batch-size', '64', '--epochs', '1',
                          '--zeroshot-datasets', 'shapes', 'mnist', '--eval-data-root',
                          str(tmp_path / 'data'), '--output-dir', str(out)])
    assert set(results) == {'shapes', 'mnist'} and 0 <= results['mnist']['top1'] <= 100
    log = json.loads(open(out / 'log.txt').readline())
    assert 'mnist_top1' in log and 'mnist_mean_per_class_recall' in log
    assert 'zero-shot top-1 (MNIST):' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(['--zeroshot-datasets', 'cifar10', '--eval-data-root', str(tmp_path / 'data'),
                    '--output-dir', str(tmp_path / 'never')])
    assert f"cifar10: not found at {tmp_path / 'data'}/cifar10" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'never')


def test_cl2l_checkpoint_reports_both_heads_and_ensembles(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / 'cl2l.pt', name='CL2L_TINYVIT_CL2L')
    make_imagefolder(tmp_path / 'data' / 'gen')
    files = write_catalog(tmp_path, {'gen': {'type': 'imagefolder', 'path': 'gen', 'display': 'Gen'}})
    results = eval_zeroshot.main(['--resume', ckpt, '--data-root', str(tmp_path / 'data'), '--batch-size', '4',
                                  '--catalog', files['catalog'], '--labels', files['labels'],
                                  '--templates', files['templates']])
    keys = set(results['gen'])
    assert {'top1', 'h_top1', 'h_top5', 'zh0.1_top1', 'zh0.9_mean_per_class_recall'} <= keys
    record = json.load(open(tmp_path / 'zeroshot' / 'gen_cl2l_CL2L_TINYVIT_CL2L_32px_zeroshot_classification.json'))
    assert record['heads'] == ['z', 'h'] and 'zh0.5_acc1' in record['metrics']
    assert '\n  h ' in capsys.readouterr().out
    model, _, _ = eval_zeroshot.load_for_clip_benchmark('h', ckpt)
    assert model.head == 'h' and model.encode_image(torch.zeros(2, 3, 32, 32)).shape[0] == 2
