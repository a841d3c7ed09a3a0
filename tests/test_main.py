"""Integration: main([...]) trains on generated `shapes`, checkpoints, resumes exactly,
and rejects bad input with one-line errors before doing any work."""
import json
import os

import pytest
import torch

import checkpoint
import clipa
import engine
import eval_zeroshot
import main as train
import methods
import models

TINY = ['--shapes-num-train', '512', '--batch-size', '64', '--print-freq', '1',
        '--zeroshot-datasets', 'shapes']


def run(tmp_path, *extra, name='run'):
    out = str(tmp_path / name)
    return out, train.main([*TINY, '--output-dir', out, *extra])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_training_reduces_loss_and_writes_outputs(tmp_path):
    out, results = run(tmp_path, '--epochs', '3', '--lr', '2e-3')
    steps = read_jsonl(os.path.join(out, 'log_steps.txt'))
    assert len(steps) == 24
    first, last = sum(s['loss'] for s in steps[:4]) / 4, sum(s['loss'] for s in steps[-4:]) / 4
    assert last < first - 0.3, (first, last)
    epochs = read_jsonl(os.path.join(out, 'log.txt'))
    assert [e['epoch'] for e in epochs] == [1, 2, 3]
    assert all('shapes_top1' in e and e['train_samples_per_s'] > 0 for e in epochs)
    assert 0 <= results['shapes']['top1'] <= 100
    for f in ['checkpoint.pt', 'checkpoint_best.pt', 'args.json', 'command.txt', 'curves.png']:
        assert os.path.isfile(os.path.join(out, f)), f


def test_checkpoint_round_trip_and_eval(tmp_path, capsys):
    out, results = run(tmp_path, '--epochs', '1')
    ckpt = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)
    assert {'model', 'optimizer', 'scaler', 'epoch', 'step', 'args', 'model_name', 'rng'} <= set(ckpt)
    assert ckpt['epoch'] == 1 and ckpt['step'] == 8 and ckpt['model_name'] == 'CLIP_TINYCNN_CLIP'
    model = models.create_model_from_flags(ckpt['model_name'], ckpt['args'])
    model.load_state_dict(ckpt['model'])
    ev = eval_zeroshot.main(['--resume', os.path.join(out, 'checkpoint.pt'), '--datasets', 'shapes',
                             '--output', str(tmp_path / 'res.json')])
    assert ev['shapes']['top1'] == pytest.approx(results['shapes']['top1'])
    assert json.load(open(tmp_path / 'res.json'))['results']['shapes']['top1'] == ev['shapes']['top1']
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('shapes')


def _state(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt['model'], ckpt['optimizer']['state'], ckpt['step']


@pytest.mark.parametrize('stop_at', [5, 8])        # mid-epoch, and exactly at an epoch end
def test_interrupted_training_resumes_bit_identically(tmp_path, stop_at):
    args = ['--epochs', '2', '--eval-freq', '1']
    straight, _ = run(tmp_path, *args, name='straight')
    split, partial = run(tmp_path, *args, '--exit-after-steps', str(stop_at), name='split')
    assert partial is None
    assert _state(os.path.join(split, 'checkpoint.pt'))[2] == stop_at
    run(tmp_path, *args, name='split')                                     # same command again
    (m1, o1, s1), (m2, o2, s2) = _state(os.path.join(straight, 'checkpoint.pt')), \
        _state(os.path.join(split, 'checkpoint.pt'))
    assert s1 == s2 == 16
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k
    for i in o1:
        for k in o1[i]:
            assert torch.equal(o1[i][k], o2[i][k]), (i, k)


@pytest.mark.needs('cxx')
@pytest.mark.slow
@pytest.mark.parametrize('pool', clipa.CNN_POOLS)
def test_compiled_step_matches_eager(pool):
    """--compile's model: same parameters (state_dict keys unchanged), same loss and gradients
    as the eager model on a batch, to float rounding, for each of the TinyCNN's pools."""
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINYCNN_CLIP', image_pool=pool)
    keys = list(model.state_dict())
    compiled = train.compile_for_training(model)
    assert engine.unwrap(compiled) is model and list(model.state_dict()) == keys
    loss_fn = methods.build_loss(train.parse_args([]))
    text = torch.zeros(8, 77, dtype=torch.long)
    text[:, 0], text[:, 1:6] = 49406, torch.randint(1, 49000, (8, 5))
    text[torch.arange(8), torch.randint(6, 20, (8,))] = 49407
    batch = {'image': torch.randn(8, 3, 64, 64), 'text': text}
    grads = []
    for m in (model, compiled):
        model.zero_grad()
        loss = loss_fn(m(batch))['loss']
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, rtol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), g0, g1):
        assert (a - b).norm() <= 1e-4 * a.norm() + 1e-9, name


@pytest.mark.needs('cxx')
@pytest.mark.slow
def test_compile_trains_saves_eager_keys_and_resumes(tmp_path):
    """--compile end to end: the step really runs through torch.compile, the checkpoint holds the
    eager module's keys (loads strictly into a fresh model), a compiled run stopped mid-epoch
    resumes compiled to the end. Its first two losses follow the eager run's; later ones drift
    (Adam turns float-rounding differences of tiny gradients into full steps, the max half of
    the TinyCNN's avg-max pool routes gradients to few positions, and this tiny high-lr run is
    chaotic: 2e-3 apart by the third step), so the step itself is compared in the test above."""
    args = ['--epochs', '2', '--eval-freq', '1']
    straight, _ = run(tmp_path, *args, name='straight')
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    split, partial = run(tmp_path, *args, '--compile', '--exit-after-steps', '5', name='split')
    assert partial is None and torch._dynamo.utils.counters['stats']['unique_graphs'] > 0
    m, _, step = _state(os.path.join(split, 'checkpoint.pt'))
    assert step == 5 and not any('_orig_mod' in k for k in m)
    ckpt = torch.load(os.path.join(split, 'checkpoint.pt'), weights_only=True)
    models.create_model_from_flags(ckpt['model_name'], ckpt['args']).load_state_dict(m)  # strict
    run(tmp_path, *args, '--compile', name='split')                       # resume, compiled
    assert _state(os.path.join(split, 'checkpoint.pt'))[2] == 16
    eager = [s['loss'] for s in read_jsonl(os.path.join(straight, 'log_steps.txt'))]
    compiled = [s['loss'] for s in read_jsonl(os.path.join(split, 'log_steps.txt'))]
    assert len(eager) == len(compiled) == 16
    assert max(abs(a - b) for a, b in zip(eager[:2], compiled[:2])) < 1e-4, (eager, compiled)


@pytest.mark.parametrize('argv, fragment', [
    (['--model', 'CLIP_NOPE_CLIP'], 'valid: R50'),
    (['--model', 'CLIP'], '<base>_<backbone>_<method>'),
    (['--batch-size', '0'], '--batch-size must be > 0'),
    (['--precision', 'fp8'], "choose from"),
    (['--label-smoothing', '1.5'], 'label-smoothing'),
    (['--zeroshot-datasets', 'nope'], 'valid: shapes'),
    (['--dataset', 'nope'], 'valid: shapes'),
    (['--resume', '/no/such/checkpoint.pt'], 'no such file'),
])
def test_bad_input_fails_with_one_line(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main([*argv, '--output-dir', str(tmp_path / 'never')])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert not os.path.exists(tmp_path / 'never')                          # no work started


def test_checkpoint_of_another_model_is_refused(tmp_path):
    out, _ = run(tmp_path, '--epochs', '1')
    with pytest.raises(SystemExit, match='holds a CLIP_TINYCNN_CLIP model, not CLIP_TINYVIT_CLIP'):
        run(tmp_path, '--epochs', '1', '--model', 'CLIP_TINYVIT_CLIP')


def test_unsafe_checkpoint_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path}/pwned',))
    path = str(tmp_path / 'evil.pt')
    torch.save({'model': Evil()}, path)
    with pytest.raises(ValueError, match='cannot load checkpoint'):
        checkpoint.load_checkpoint(path)
    assert not os.path.exists(tmp_path / 'pwned')


@pytest.mark.slow          # wandb's service start-up takes ~10-60 s on a busy 2-core machine
def test_wandb_offline_logging(tmp_path):
    out, _ = run(tmp_path, '--epochs', '1', '--wandb', '--offline', '--name', 'test-run')
    runs = [d for d in os.listdir(os.path.join(out, 'wandb')) if d.startswith('offline-run')]
    assert len(runs) == 1


def test_compile_without_a_compiler_fails_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(train, 'CXX_COMPILERS', ['no-such-c++-compiler'])
    with pytest.raises(SystemExit):
        train.parse_args(['--compile'])
    assert 'needs a C++ compiler' in capsys.readouterr().err
