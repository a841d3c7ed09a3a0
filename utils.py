"""Distributed init and rank helpers (safe without a process group), seeding and RNG state,
atomic checkpoint save and safe load, small logging helpers."""
import argparse
import builtins
import datetime
import json
import os
import random
import subprocess
import sys
import time
import warnings
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist


class Registry(dict):
    """A name -> entry dict that fails loudly, naming the valid choices."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def register(self, name, entry):
        if name in self:
            warnings.warn(f"{self.kind} {name!r} registered twice; the last one wins")
        self[name] = entry
        return entry

    def get(self, name):
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self)}")
        return self[name]


# ----------------------------------------------------------------------------- ranks

def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def _master_from_slurm():
    nodes = os.environ.get('SLURM_JOB_NODELIST', os.environ.get('SLURM_NODELIST', ''))
    if not nodes:
        return '127.0.0.1'
    try:
        out = subprocess.run(['scontrol', 'show', 'hostnames', nodes], capture_output=True,
                             text=True, check=True).stdout
        return out.split()[0]
    except (OSError, subprocess.CalledProcessError):
        return nodes.split(',')[0]


def init_distributed(backend='auto'):
    """Join a process group from torchrun or Slurm variables; else run as one process.

    Returns the torch.device this process computes on (cuda:LOCAL_RANK or cpu).
    """
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:                      # torchrun
        rank, world, local = int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', 1)) > 1:
        rank, world, local = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS']), int(env['SLURM_LOCALID'])
        env.setdefault('MASTER_ADDR', _master_from_slurm())
        env.setdefault('MASTER_PORT', str(29500 + int(env.get('SLURM_JOB_ID', 0)) % 1000))
    else:
        rank, world, local = 0, 1, 0
    cuda = torch.cuda.is_available()
    device = torch.device('cuda', local) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_dist():
        if backend == 'auto':
            backend = 'nccl' if cuda else 'gloo'
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        dist.barrier()
    setup_for_distributed(rank == 0)
    return device


def setup_for_distributed(is_master):
    """Silence print() on non-master ranks (force=True overrides)."""
    builtin_print = builtins.__dict__.setdefault('_vlp_print', builtins.print)

    def print_(*args, **kwargs):
        if kwargs.pop('force', False) or is_master:
            builtin_print(*args, **kwargs)
    builtins.print = print_ if not is_master else builtin_print


# ----------------------------------------------------------------------------- seeds, RNG

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG this process draws from, as tensors/plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            'python': _tuples_to_lists(random.getstate())}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    kind, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_lists_to_tuples(state['python']))


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temp file in the same directory, fsync, then os.replace."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_on_master(obj, path):
    if is_main_process():
        save_atomic(obj, path)


def load_checkpoint(path, map_location='cpu'):
    """Load without executing pickled code; a clear one-line error otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling refused, truncated file, not a checkpoint
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load checkpoint {path} safely: {first}") from None


# ----------------------------------------------------------------------------- CLI, logs

class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the problem (and valid choices)."""

    def error(self, message):
        sys.stderr.write(f'{self.prog}: error: {message}\n')
        raise SystemExit(2)


def git_sha():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


def append_json(path, record):
    if is_main_process():
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')


class SmoothedValue:
    """Tracks a window of values and the global average."""

    def __init__(self, window=20):
        self.values, self.total, self.count = deque(maxlen=window), 0.0, 0

    def update(self, value, n=1):
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self):
        return float(np.median(self.values)) if self.values else 0.0

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)


class MetricLogger:
    def __init__(self):
        self.meters = defaultdict(SmoothedValue)

    def update(self, **kwargs):
        for k, v in kwargs.items():
            self.meters[k].update(float(v.item() if torch.is_tensor(v) else v))

    def averages(self):
        return {k: m.global_avg for k, m in self.meters.items()}

    def log_every(self, iterable, total, print_freq, header, start=0):
        """Yield (index, item) from `iterable`, printing ETA, data time and meters every print_freq items."""
        t_end = time.time()
        data_time = SmoothedValue()
        iter_time = SmoothedValue()
        for i, obj in enumerate(iterable, start=start):
            data_time.update(time.time() - t_end)
            yield i, obj
            iter_time.update(time.time() - t_end)
            t_end = time.time()
            if i % print_freq == 0 or i == total - 1:
                eta = iter_time.global_avg * (total - i - 1)
                meters = '  '.join(f'{k}: {m.median:.4f}' for k, m in self.meters.items())
                print(f'{header} [{i}/{total}] eta: {datetime.timedelta(seconds=int(eta))}  '
                      f'{meters}  time: {iter_time.median:.3f}s  data: {data_time.median:.3f}s')
