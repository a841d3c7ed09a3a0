"""System test: torchrun with 2 gloo processes of per-rank batch b gives the loss and the
gradients of one process with batch 2b (relative error <= 1e-5), for every method: the
BatchNorm-free configurations, and configurations with BatchNorm (BarLIP/SiamLIP heads, the
TinyCNN tower) whose statistics go over both processes (syncbn.sync_batchnorm; on CPU our
CPUSyncBatchNorm, since PyTorch's SyncBatchNorm needs CUDA)."""
import os
import subprocess
import sys

import pytest
import torch

import methods
from dist_step import CASES

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, 'dist_step.py')


def _run(cmd, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def one_and_two_processes(model, flags, tmp_path, port_base):
    """tests/dist_step.py's loss and gradients from one process with the whole batch and from
    torchrun with 2 gloo processes with half of it each: (one process's, two processes')."""
    one, two = str(tmp_path / 'one.pt'), str(tmp_path / 'two.pt')
    _run([sys.executable, SCRIPT, model, one, *flags], tmp_path)
    _run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
          '--master_port', str(port_base + os.getpid() % 200), SCRIPT, model, two, *flags], tmp_path)
    return torch.load(one, weights_only=True), torch.load(two, weights_only=True)


def assert_same_loss_and_grads(ref, got):
    assert torch.allclose(got['loss'], ref['loss'], rtol=1e-5, atol=0), (got['loss'], ref['loss'])
    assert ref['grads'].keys() == got['grads'].keys()
    # a gradient that is zero in exact arithmetic (a bias before a batch-normalising loss) is
    # ~1e-17 numerically: relative to the largest gradient, not to itself
    floor = 1e-9 * max(float(g.norm()) for g in ref['grads'].values())
    for name, g in ref['grads'].items():
        err = (got['grads'][name] - g).norm() / g.norm().clamp_min(floor)
        assert err <= 1e-5, (name, float(err))


@pytest.mark.slow
@pytest.mark.parametrize('case', [*methods.METHODS, *(c for c in CASES if c not in methods.METHODS)])
def test_two_processes_equal_one_big_batch(case, tmp_path):
    assert case in CASES, f"method {case} has no case in METHOD_CASES (tests/test_methods.py)"
    model, *flags = CASES[case]
    assert_same_loss_and_grads(*one_and_two_processes(model, flags, tmp_path, 29500))


MAIN_CASES = {   # main.py under torchrun: DDP settings, CPUSyncBatchNorm, accumulation, teacher
    'cl2l_no_views_accum': ['--model', 'CL2L_TINYCNN_CL2L', '--separate-proj', '--num-augs', '0',
                            '--update-freq', '2'],
    'byolip_views': ['--model', 'CL2L_TINYCNN_BYOLIP', '--separate-proj', '--num-augs', '1',
                     '--barlip-hidden-dim', '32', '--siamlip-hidden-dim', '32', '--siamlip-proj-dim', '16'],
    'clip_compile': ['--compile'],      # torch.compile around DDP, CPUSyncBatchNorm inside
}


@pytest.mark.slow
@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.needs('cxx')) if '--compile' in MAIN_CASES[c]
                                  else c for c in MAIN_CASES])
def test_torchrun_main_trains(case, tmp_path):
    import json
    out = str(tmp_path / 'out')
    _run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2',
          '--master_port', str(29400 + os.getpid() % 100), os.path.join(os.path.dirname(HERE), 'main.py'),
          '--shapes-num-train', '256', '--batch-size', '32', '--epochs', '1', '--print-freq', '1',
          '--output-dir', out, *MAIN_CASES[case]], tmp_path)
    with open(os.path.join(out, 'log_steps.txt')) as f:
        steps = [json.loads(line) for line in f]
    k = 2 if '--update-freq' in MAIN_CASES[case] else 1
    assert [s['step'] for s in steps] == list(range(1, 256 // (64 * k) + 1))
    assert all(torch.isfinite(torch.tensor(s['loss'])) for s in steps)
    ckpt = torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)
    assert ckpt['step'] == len(steps)
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
