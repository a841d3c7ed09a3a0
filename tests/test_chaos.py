"""Chaos: SIGKILL a small `shapes` training at random moments (the whole process group, or
only a data-loader worker), restart the same command each time, and check the final weights
and optimizer state are bit-identical to an uninterrupted run. Prints the figures recorded in
docs/reliability.md: kills survived, kills that landed inside a checkpoint write, steps recomputed.

    CHAOS_KILLS=20 python -m pytest -q tests/test_chaos.py -s
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ['--shapes-num-train', '768', '--batch-size', '32', '--epochs', '2', '--print-freq', '1',
         '--save-freq-steps', '1', '--workers', '1', '--eval-freq', '2', '--zeroshot-datasets', 'shapes']
STEPS = 2 * 768 // 32                                   # 48 steps, a checkpoint after each
KILLS = int(os.environ.get('CHAOS_KILLS', 20))


def _start(out):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline'}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *FLAGS, '--output-dir', str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _children(pid):
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _logged_steps(out):
    try:
        with open(os.path.join(out, 'log_steps.txt')) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)['step'])
        except ValueError:                               # a line cut by the kill
            steps.append(0)
    return steps


def _last_step(out, since=0):
    """The last step logged (by the runs after the first `since` log lines)."""
    return max(_logged_steps(out)[since:], default=0)


def _checkpoint_step(out):
    """The step a restart resumes from (the newest verifiable checkpoint)."""
    if not os.path.isdir(out):
        return 0
    ckpt, _ = checkpoint.load_latest_good(os.path.join(out, 'checkpoint.pt'), keep=2)
    return ckpt['step'] if ckpt else 0


@pytest.mark.slow
def test_sigkill_anywhere_loses_nothing(tmp_path):
    ref = tmp_path / 'ref'
    assert _start(ref).wait(timeout=900) == 0
    rng = random.Random(0)
    out = tmp_path / 'chaos'
    kills = in_write = worker_kills = recomputed = 0
    while kills < KILLS:
        resume_step, logged = _checkpoint_step(out), len(_logged_steps(out))
        proc = _start(out)
        deadline = time.time() + 600                     # kill once training runs: after the
        while _last_step(out, logged) <= resume_step and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)                             # first new step, at a random moment
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:                      # finished before the kill: start over
            assert proc.returncode == 0
            break
        workers = _children(proc.pid)
        if workers and rng.random() < 0.3:               # a data-loader worker dies
            os.kill(rng.choice(workers), signal.SIGKILL)
            worker_kills += 1
            try:
                proc.wait(timeout=120)                   # the main process fails: loader error
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)          # the whole job dies at once
        except ProcessLookupError:                       # already gone (loader error exit)
            pass
        proc.wait()
        kills += 1
        leftovers = [n for n in os.listdir(out) if '.tmp.' in n] if out.exists() else []
        in_write += bool(leftovers)
        recomputed += max(0, _last_step(out, logged) - _checkpoint_step(out))   # done, not saved
    final = _start(out)
    assert final.wait(timeout=900) == 0
    a = torch.load(ref / 'checkpoint.pt', weights_only=True)
    b = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert a['step'] == b['step'] == STEPS
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    for i, state in a['optimizer']['state'].items():
        for key in state:
            assert torch.equal(state[key], b['optimizer']['state'][i][key]), (i, key)
    print(f"\nchaos: {kills} SIGKILLs survived ({worker_kills} of a loader worker first, "
          f"{in_write} inside a checkpoint write); steps recomputed: {recomputed}; final state "
          f"bit-identical to the uninterrupted run")
