"""finetune_classification.py: the head starts as the zero-shot classifier (predictions equal
zero-shot's), a few epochs on generated colour classes lift top-1 far above that start, an
interrupted run resumed at an epoch boundary ends bit-identical to an uninterrupted one,
layer-wise lr decay groups, one-line errors."""
import json
import shutil

import pytest
import torch

import checkpoint
import datasets
import eval_linear
import finetune_classification as ft
import models
import zeroshot
from test_eval_linear import make_colour_folder
from zs_helpers import tiny_checkpoint

TEMPLATES = ['a photo of a {} thing.', 'something {}.']


pytestmark = pytest.mark.usefixtures('one_thread')   # tiny models: one thread (conftest.py)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('colours4')
    templates = root / 'templates.json'
    templates.write_text(json.dumps(TEMPLATES))
    return (make_colour_folder(root / 'train', 32, 0, classes=4),
            make_colour_folder(root / 'val', 12, 1, classes=4), str(templates))


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tinyvit.pt')       # CLIP_TINYVIT_CLIP, 32 px


def run_args(ckpt, data, out, *extra):
    train_dir, val_dir, templates = data
    return ['--pretrained', ckpt, '--train-dir', str(train_dir), '--val-dir', str(val_dir),
            '--templates', templates, '--output-dir', str(out), '--batch-size', '16', '--epochs', '3',
            '--lr', '1e-3', '--warmup-steps', '2', '--ema-decay', '0.9', '--print-freq', '100', *extra]


def read_log(out):
    return [json.loads(line) for line in open(out / 'log.txt')]


@pytest.mark.parametrize('name, head', [('CLIP_TINYVIT_CLIP', 'z'), ('CL2L_TINYVIT_CL2L', 'h')])
def test_head_is_the_zeroshot_classifier(tmp_path, data, name, head):
    torch.manual_seed(0)
    clip = models.create_model(name, image_size=32, separate_proj=True if head == 'h' else None)
    pre = {'model': clip.state_dict(), 'model_name': name,
           'args': {'image_size': 32, 'context_length': 77, 'separate_proj': head == 'h'}}
    model, clip = ft.build_classifier(pre, head, 32, 4, 'cpu')
    names = ['red', 'green', 'blue', 'yellow']
    ft.zeroshot_head(model, clip, pre, head, names, TEMPLATES, 'cpu')
    kwargs = {'head': head} if head == 'h' else {}
    direct = zeroshot.build_classifier(clip, names, TEMPLATES, datasets.Tokenizer(), 'cpu', **kwargs)
    scale = ft.logit_scale(pre, head)
    assert scale == pytest.approx(1 / 0.07 if head == 'z' else 1 / 0.1, rel=1e-5)   # h: its own scale
    assert torch.allclose(model.head.weight, scale * direct, atol=1e-6) and not model.head.bias.any()
    images = torch.randn(6, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        embed = clip.encode_image(images, normalize=True, **kwargs)
        assert torch.allclose(model.embed(images), embed, atol=1e-5)
        assert torch.allclose(model(images), scale * embed @ direct.t(), atol=1e-4)


def test_finetune_learns_and_resumes_bit_identically(tmp_path, data, ckpt, capsys):
    full = tmp_path / 'full'
    result = ft.main(run_args(ckpt, data, full))
    log = read_log(full)
    assert [r['epoch'] for r in log] == [0, 1, 2, 3]
    start, end = log[0]['val_top1'], log[-1]
    assert start <= 50 and end['val_top1'] >= 90 and end['ema_top1'] >= 90, (start, end)
    assert result['best_top1'] >= 90 and {'train_loss', 'lr', 'val_loss', 'ema_loss'} <= set(end)
    assert 'epoch 0 (zero-shot-initialised head)' in capsys.readouterr().out

    parts = tmp_path / 'parts'
    stopped = ft.main(run_args(ckpt, data, parts, '--exit-after-epochs', '1'))
    assert stopped['stopped'] and [r['epoch'] for r in read_log(parts)] == [0, 1]
    ft.main(run_args(ckpt, data, parts))                            # the same command resumes
    assert 'resumed from' in capsys.readouterr().out
    assert [r['epoch'] for r in read_log(parts)] == [0, 1, 2, 3]
    a = checkpoint.load_checkpoint(str(full / 'checkpoint.pt'))
    b = checkpoint.load_checkpoint(str(parts / 'checkpoint.pt'))
    for key in ('model', 'ema'):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a['step'] == b['step'] == 24 and a['classes'] == ['blue', 'green', 'red', 'yellow']

    model, classes = ft.load_classifier(str(full / 'checkpoint.pt'))  # usable on its own
    val = eval_linear.image_folder(str(data[1]), 32, '--val-dir')
    images = torch.stack([val[i]['image'] for i in range(0, len(val), 12)])
    with torch.no_grad():
        assert model(images).argmax(dim=1).tolist() == [0, 1, 2, 3]


def test_no_mixup_random_head_and_finished_run(tmp_path, data, ckpt, capsys):
    out = tmp_path / 'plain'
    args = run_args(ckpt, data, out, '--mixup', '0', '--cutmix', '0', '--head-init', 'random',
                    '--ema-decay', '0', '--epochs', '1', '--layer-decay', '1')
    ft.main(args)
    log = read_log(out)
    assert len(log) == 2 and 'ema_top1' not in log[1] and log[1]['step'] == 8
    ft.main(args)                                                   # finished: nothing left to do
    assert len(read_log(out)) == 2 and 'resumed from' in capsys.readouterr().out


def test_layer_decay_groups():
    clip = models.create_model('CLIP_TINYVIT_CLIP', image_size=32)
    model = ft.ImageClassifier(clip, 'z', 5)
    groups = ft.param_groups(model, 0.05, layer_decay=0.5)
    scale = {id(p): (g['lr_scale'], g['weight_decay']) for g in groups for p in g['params']}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)                                 # every parameter, once
    expect = {'visual.patch_embed.proj.weight': (0.5 ** 3, 0.05), 'visual.pos_embed': (0.5 ** 3, 0.0),
              'visual.blocks.0.attn.qkv.weight': (0.5 ** 2, 0.05), 'visual.blocks.1.mlp.fc1.bias': (0.5, 0.0),
              'visual.norm.weight': (0.5, 0.0), 'projection.weight': (1.0, 0.05), 'head.weight': (1.0, 0.05),
              'head.bias': (1.0, 0.0)}
    for name, value in expect.items():
        assert scale[id(named[name])] == value, name
    assert all(g['lr_scale'] == 1.0 for g in ft.param_groups(model, 0.05, layer_decay=1.0))

    cnn = ft.ImageClassifier(models.create_model('CLIP_TINYCNN_CLIP', image_size=32), 'z', 5)
    stages = sorted({g['lr_scale'] for g in ft.param_groups(cnn, 0.05, layer_decay=0.5)})
    assert stages == [0.5 ** k for k in (4, 3, 2, 1, 0)]            # 4 stages (stem in the 1st) + head


def test_one_line_errors(tmp_path, data, ckpt, capsys):
    train_dir, val_dir, templates = data
    done = tmp_path / 'done'
    ft.main(run_args(ckpt, data, done, '--epochs', '1', '--ema-decay', '0'))
    other = tiny_checkpoint(tmp_path / 'other.pt', name='CLIP_TINYCNN_CLIP')
    bad_labels = tmp_path / 'labels.json'
    bad_labels.write_text(json.dumps(['a', 'b']))
    shutil.copytree(val_dir, tmp_path / 'five' / 'val')
    (tmp_path / 'five' / 'val' / 'zzz').mkdir()
    shutil.copy(next((tmp_path / 'five' / 'val' / 'red').iterdir()), tmp_path / 'five' / 'val' / 'zzz')
    base = run_args(ckpt, data, tmp_path / 'new')
    capsys.readouterr()
    cases = [
        (base + ['--pretrained', str(done / 'checkpoint.pt')], 'a fine-tuned classifier (finetune_classification.py)'),
        (base + ['--resume', ckpt], 'not a fine-tuning checkpoint'),
        (base + ['--train-dir', str(tmp_path / 'nope')], 'not a directory'),
        (base + ['--val-dir', str(tmp_path / 'five' / 'val')], 'different class folders'),
        (base + ['--batch-size', '15'], 'mixup/cutmix need an even batch'),
        (base + ['--labels', str(bad_labels)], '2 names for 4 class folders'),
        (base + ['--labels', 'nope'],
         f"neither a file nor a key of labels.json (keys: {', '.join(list(zeroshot.load_catalog()[1])[:3])}"),
        (base + ['--templates', 'nope'], 'neither a file nor a key of templates.json'),
        (base + ['--head', 'h'], 'has heads z'),
        (base + ['--batch-size', '1000'], 'fewer than --batch-size 1000'),
        (run_args(other, data, done), 'fine-tunes a CLIP_TINYVIT_CLIP, not the CLIP_TINYCNN_CLIP'),
        ([a for a in base if a not in ('--pretrained', ckpt)], '--pretrained is required'),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            ft.main(argv)
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv[-2:], err)
