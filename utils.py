"""Distributed init and rank helpers (safe without a process group), seeding and RNG state,
the graceful stop on SIGTERM / SIGUSR1 (and loader workers that leave those signals to it),
small logging helpers (checkpoints: checkpoint.py)."""
import argparse
import builtins
import datetime
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
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


# ----------------------------------------------------------------------------- host memory

def keep_freed_memory(limit=1 << 30):
    """Let glibc reuse freed blocks up to `limit` bytes instead of returning them to the OS.
    By default every allocation above 32 MiB (a float32 batch of 64 images at 224 px is
    38.5 MB; a ViT-B/16's activations at batch 16 are many such tensors) is a fresh mmap whose
    pages fault in on first touch: normalising a 64 x 224 px uint8 batch took 21 ms that way
    and 4 ms with this (bench/RESULTS.md). Peak RSS is unchanged; memory freed after the peak
    stays with the process. No-op (False) off glibc or with MALLOC_MMAP_THRESHOLD_ set."""
    if os.environ.get('MALLOC_MMAP_THRESHOLD_') or not sys.platform.startswith('linux'):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        m_trim_threshold, m_mmap_threshold = -1, -3           # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, limit) and libc.mallopt(m_trim_threshold, 2 * limit))
    except (OSError, AttributeError):                         # musl, macOS: leave the allocator alone
        return False


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


def all_rng_states():
    """Every process's rng_state(), in rank order (a collective when distributed)."""
    if get_world_size() == 1:
        return [rng_state()]
    states = [None] * get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


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


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's warning before the time limit) ask the run to stop after the
    current step. `requested()` is collective: every process stops at the same step if any
    process got the signal. `restore()` puts the previous handlers back."""
    SIGNALS = ('SIGTERM', 'SIGUSR1')

    def __init__(self, device):
        self.device, self.signum, self.previous = device, None, {}
        if threading.current_thread() is not threading.main_thread():
            return                                    # handlers only in the main thread
        for sig in stop_signal_numbers():
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum is not None else None

    def requested(self):
        flag = self.signum is not None
        if get_world_size() > 1:
            t = torch.tensor([self.signum or 0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if int(t) and self.signum is None:
                self.signum = int(t)
            flag = bool(int(t))
        return flag

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def stop_signal_numbers():
    """The StopSignals.SIGNALS this platform has, as signal numbers."""
    return {getattr(signal, name) for name in StopSignals.SIGNALS if hasattr(signal, name)}


class StopSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes leave SIGTERM / SIGUSR1 to the main process.

    scancel, a preemption and `kill -- -PGID` signal every process of the job, loader workers
    included. PyTorch's worker handler dies on a SIGTERM that its parent did not send, and the
    main process then raises "DataLoader worker ... is killed by signal" inside the step: no
    checkpoint (StopSignals never gets to finish the step). Here a worker ignores the stop
    signals, so StopSignals finishes the step and checkpoints, and the workers end with the
    loader as usual. A worker still exits on its *parent's* SIGTERM (the loader's terminate() of
    a worker that does not stop in time), like PyTorch's handler, and exits when its parent dies
    (PyTorch's watchdog): none is left hung or orphaned. Workers are forked with the signals
    blocked, so no signal reaches one before it has set this up."""

    def __init__(self, *args, worker_init_fn=None, **kwargs):
        super().__init__(*args, worker_init_fn=functools.partial(_worker_leaves_stop_signals, worker_init_fn),
                         **kwargs)

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, 'pthread_sigmask'):
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signal_numbers())
        try:
            return super().__iter__()           # starts the workers (once, if persistent)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)   # a pending one arrives now


def _worker_leaves_stop_signals(init_fn, worker_id):
    """worker_init_fn: keep the stop signals blocked (already so when forked by StopSafeLoader)
    and take them with a thread that exits only on the parent's SIGTERM; then `init_fn`."""
    if hasattr(signal, 'pthread_sigmask'):
        signals = stop_signal_numbers()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        threading.Thread(target=_exit_on_parent_sigterm, args=(signals, os.getppid()), daemon=True,
                         name='stop_signals').start()
    if init_fn is not None:
        init_fn(worker_id)


def _exit_on_parent_sigterm(signals, parent):
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)                         # what PyTorch's worker handler does on it


# ----------------------------------------------------------------------------- CLI, logs

class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the problem (and valid choices)."""

    def error(self, message):
        sys.stderr.write(f'{self.prog}: error: {message}\n')
        raise SystemExit(2)

    def _get_values(self, action, arg_strings):
        # argparse drops a '--' given as a flag's value (`--epochs=--`) and returns [] for a
        # one-value flag, which then breaks every check downstream: refuse it here
        if action.option_strings and '--' in arg_strings:
            self.error(f"argument {'/'.join(action.option_strings)}: '--' is not a value")
        return super()._get_values(action, arg_strings)


def check_counts(args, positive=(), non_negative=()):
    """ValueError naming the flag unless every listed count is > 0 (`positive`) or >= 0
    (`non_negative`); a None value (flag not given, no default) is left alone."""
    for keys, low, rule in ((positive, 1, '> 0'), (non_negative, 0, '>= 0')):
        for key in keys:
            value = getattr(args, key)
            if value is not None and value < low:
                raise ValueError(f"--{key.replace('_', '-')} must be {rule}, got {value}")


def check_output_path(path, flag, is_dir=False):
    """ValueError (one line, naming `flag`) unless `path` can be written as a file (or, with
    `is_dir`, as a directory): checked before any work starts, nothing is created. Finds a
    directory given for a file, a file given for a directory, and read-only or forbidden
    parents by writing (and removing) a probe file, which also works for root."""
    path = os.path.abspath(path)
    if is_dir and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory; give a directory")
    if not is_dir and os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    where = path if is_dir else os.path.dirname(path)
    while not os.path.exists(where):                 # created later, under the nearest existing one
        where = os.path.dirname(where)
    if not os.path.isdir(where):
        raise ValueError(f"{flag} {path}: {where} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=where, prefix='.write-test-'):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {where} ({e.strerror or e})") from None


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
