"""--model-ema: the average follows its formula step by step (one process and 2 gloo processes),
resumes bit-identically, is validated beside the live weights, and --use-ema reads it in
eval_zeroshot.py / demo_zeroshot.py / interop.py export."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import demo_zeroshot
import eval_zeroshot
import interop
import main as train
import model_ema
import models
import towers
import zeroshot

TINY = ['--shapes-num-train', '256', '--batch-size', '64', '--print-freq', '1',
        '--zeroshot-datasets', 'shapes']
EMA = ['--model-ema', '--model-ema-decay', '0.7']
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(out, *extra):
    return train.main([*TINY, '--output-dir', str(out), *extra])


def _load(path):
    return torch.load(path, weights_only=True)


def _check_formula(ckpts, decay):
    """Consecutive per-step checkpoints: ema_t = d * ema_{t-1} + (1 - d) * live_t, exactly
    (integer buffers copied)."""
    assert len(ckpts) >= 3
    for before, after in zip(ckpts, ckpts[1:]):
        assert after['step'] == before['step'] + 1
        prev, now = before['features']['model_ema'], after['features']['model_ema']
        assert now['updates'] == prev['updates'] + 1
        for name, live in after['model'].items():
            want = (live if not live.is_floating_point()
                    else torch.add(prev['weights'][name] * decay, live, alpha=1 - decay))
            assert torch.equal(now['weights'][name], want), name


def _per_step_checkpoints(out, keep):
    """The rotated checkpoints of a --save-freq-steps 1 run, one per step (the epoch end saves
    its last step again)."""
    names = ['checkpoint.pt'] + [f'checkpoint.{i}.pt' for i in range(1, keep)]
    by_step = {c['step']: c for c in (_load(os.path.join(out, n)) for n in names)}
    return [by_step[s] for s in sorted(by_step)]


def test_ema_follows_its_formula_every_step(tmp_path):
    out = tmp_path / 'run'
    _train(out, '--model', 'CL2L_TINYCNN_BARLIP', '--epochs', '1', *EMA,   # BatchNorm buffers too
           '--save-freq-steps', '1', '--keep-checkpoints', '5')
    ckpts = _per_step_checkpoints(out, 5)
    _check_formula(ckpts, 0.7)
    assert any(not torch.equal(ckpts[-1]['features']['model_ema']['weights'][k], v)
               for k, v in ckpts[-1]['model'].items())           # an average, not a copy


def test_warmup_ramps_the_decay():
    model = torch.nn.Linear(3, 2)
    ema = model_ema.ModelEMA(model, decay=0.99, warmup_steps=10)
    expected = model.weight.detach().clone()
    for t in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        d = min(0.99, (1 + t) / (10 + t))
        expected = expected * d + model.weight.detach() * (1 - d)
        ema.after_step(model, t)
    assert torch.equal(ema.model.weight, expected)
    assert ema.step_log() == {'model_ema_decay': min(0.99, 5 / 14)}


def test_ema_resumes_bit_identically(tmp_path):
    flags = ['--epochs', '2', *EMA, '--model-ema-warmup-steps', '3']
    _train(tmp_path / 'straight', *flags)
    _train(tmp_path / 'killed', *flags, '--exit-after-steps', '3')      # mid-epoch 1 (4 steps/epoch)
    _train(tmp_path / 'killed', *flags)
    a, b = _load(tmp_path / 'straight' / 'checkpoint.pt'), _load(tmp_path / 'killed' / 'checkpoint.pt')
    assert a['features']['model_ema']['updates'] == b['features']['model_ema']['updates'] == 8
    for name, v in a['features']['model_ema']['weights'].items():
        assert torch.equal(v, b['features']['model_ema']['weights'][name]), name
    for name, v in a['model'].items():
        assert torch.equal(v, b['model'][name]), name


def test_validation_reports_both_and_best_records_which(tmp_path):
    out = tmp_path / 'run'
    results = _train(out, '--epochs', '2', *EMA)
    logs = [json.loads(line) for line in open(out / 'log.txt')]
    assert {'shapes_top1', 'ema_shapes_top1'} <= set(logs[-1])
    assert logs[-1]['shapes_top1'] == results['shapes']['top1']
    best = _load(out / 'checkpoint_best.pt')
    scores = {'live': [log['shapes_top1'] for log in logs], 'ema': [log['ema_shapes_top1'] for log in logs]}
    assert best['best_top1'] == max(max(v) for v in scores.values())
    assert best['best_weights'] in scores and best['best_top1'] in scores[best['best_weights']]
    steps = [json.loads(line) for line in open(out / 'log_steps.txt')]
    assert all(s['model_ema_decay'] == 0.7 for s in steps)


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('ema') / 'run'
    _train(out, '--model', 'CLIP_TINYVIT_CLIP', '--epochs', '1', '--model-ema', '--model-ema-decay', '0.5')
    return out


def _direct_top1(weights, args):
    model = models.create_model_from_flags(args['model'], dict(args))
    model.load_state_dict(weights)
    tokenizer = towers.tokenizer_for(args)
    return zeroshot.evaluate(model.eval(), ['shapes'], tokenizer, torch.device('cpu'),
                             args['image_size'])['shapes']['top1']


def test_eval_zeroshot_use_ema_evaluates_the_average(ema_run, tmp_path, monkeypatch):
    ckpt = _load(ema_run / 'checkpoint.pt')
    weights = ckpt['features']['model_ema']['weights']
    assert any(not torch.equal(v, ckpt['model'][k]) for k, v in weights.items())
    used = []
    real_load = checkpoint.load_model
    monkeypatch.setattr(checkpoint, 'load_model', lambda c, *a, **k: used.append(c['model']) or real_load(c, *a, **k))
    common = ['--resume', str(ema_run / 'checkpoint.pt'), '--datasets', 'shapes',
              '--cache-dir', str(tmp_path / 'cache')]
    live = eval_zeroshot.main([*common, '--output-dir', str(tmp_path / 'live')])['shapes']['top1']
    assert used and all(u is not weights and torch.equal(u[k], v) for u in used for k, v in ckpt['model'].items())
    used.clear()
    ema = eval_zeroshot.main([*common, '--use-ema'])['shapes']['top1']
    assert used and all(torch.equal(u[k], v) for u in used for k, v in weights.items())
    assert ema == _direct_top1(weights, ckpt['args'])
    assert live == _direct_top1(ckpt['model'], ckpt['args'])
    records = os.listdir(ema_run / 'zeroshot-ema')
    assert any(n.endswith('.json') and '-ema_' in n for n in records)


def test_demo_and_export_use_ema(ema_run, tmp_path, capsys):
    ckpt = _load(ema_run / 'checkpoint.pt')
    weights = ckpt['features']['model_ema']['weights']
    model, _ = interop.load_ours(str(ema_run / 'checkpoint.pt'), use_ema=True)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for which, extra in (('ema', ['--use-ema']), ('live', [])):
        interop.main(['export', '--checkpoint', str(ema_run / 'checkpoint.pt'), *extra,
                      '--out', str(tmp_path / which)])
    a, b = (_load(next((tmp_path / w).glob('*.bin'))) for w in ('ema', 'live'))
    assert a.keys() == b.keys() and any(not torch.equal(v, b[k]) for k, v in a.items())
    from PIL import Image
    Image.new('RGB', (64, 64), 'red').save(tmp_path / 'x.png')
    demo = ['--checkpoint', str(ema_run / 'checkpoint.pt'), '--img-path', str(tmp_path / 'x.png'),
            '--labels-from', 'shapes']
    live_out, ema_out = demo_zeroshot.main(demo), demo_zeroshot.main([*demo, '--use-ema'])
    assert live_out != ema_out


@pytest.mark.parametrize('cli', ['eval_zeroshot', 'demo_zeroshot', 'interop'])
def test_use_ema_without_an_average_is_one_line(cli, tmp_path, capsys):
    out = tmp_path / 'plain'
    _train(out, '--epochs', '1', '--train-num-samples', '128')
    path = str(out / 'checkpoint.pt')
    capsys.readouterr()                                   # the training's own output
    argv = {'eval_zeroshot': ['--resume', path, '--datasets', 'shapes', '--use-ema'],
            'demo_zeroshot': ['--checkpoint', path, '--img-path', ROOT, '--use-ema'],
            'interop': ['export', '--checkpoint', path, '--use-ema', '--out', str(tmp_path / 'x')]}[cli]
    with pytest.raises(SystemExit) as stop:
        {'eval_zeroshot': eval_zeroshot.main, 'demo_zeroshot': demo_zeroshot.main,
         'interop': interop.main}[cli](argv)
    err = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err.strip()
    assert 'no EMA weights' in err and '--model-ema' in err and len(err.splitlines()) == 1


def test_bad_decay_is_one_line(capsys):
    for argv in (['--model-ema', '--model-ema-decay', '1.0'], ['--model-ema-decay', '0.9']):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert 'model-ema' in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_keep_the_same_average(tmp_path):
    """Under torchrun every rank updates the average after the synchronised step: rank 0's
    checkpoint follows the formula from the live weights (what one process computes)."""
    out = tmp_path / 'out'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
         '--master_port', str(29300 + os.getpid() % 100), os.path.join(ROOT, 'main.py'),
         '--shapes-num-train', '256', '--batch-size', '32', '--epochs', '1', '--output-dir', str(out),
         '--model', 'CL2L_TINYCNN_BARLIP', *EMA, '--save-freq-steps', '1', '--keep-checkpoints', '5'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_formula(_per_step_checkpoints(out, 5), 0.7)
    assert checkpoint.load_checkpoint(str(out / 'checkpoint.pt'))['best_weights'] in ('live', 'ema')
