"""One output directory, one run.

`claim(DIR)` holds an advisory lock on DIR/.lock for the whole run, so that a second main.py
started in the same directory (twice the same command, a duplicated Slurm job) stops with one
line naming the first, instead of interleaving its logs, resuming its checkpoint and deleting its
half-written files. The lock is a POSIX record lock (fcntl): the kernel drops it when the holding
process ends in any way (exit, crash, SIGKILL, OOM kill), so a relaunched or requeued run is
never blocked by a dead one. NFS carries these locks (NLM, NFSv4); Lustre only when mounted with
`-o flock` (`localflock`: node-local). Where the file system refuses locks, one warning line says
so and the run goes on unprotected.

`check_resume_args(ckpt, args, path, parser)` refuses to resume a checkpoint under flags that
change what the run computes (model, method, data, schedule, global batch, seed), listing every
difference, unless --allow-resume-changes.
"""
import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import time

import torch

import utils

LOCK_FILE = '.lock'
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}   # no lock support here
_held = set()     # directories this process holds: POSIX locks are per process, a 2nd claim would pass


class InUse(Exception):
    """The directory's lock is held by another process (its description is the message)."""


class RunLock:
    """The run lock of `directory` as held by this process: `exclusive` when this process holds
    it (no other run writes there), not when it does not lock (other ranks, --evaluate, a file
    system without locks)."""

    def __init__(self, directory, fd=None):
        self.directory, self.fd = directory, fd

    @property
    def exclusive(self):
        return self.fd is not None

    def release(self):
        """Unlock. The lock file stays (removing it would race with a process opening it)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)          # the holder details of a finished run are stale
        except OSError:                       # they only inform a refused process: never fatal
            pass
        os.close(self.fd)                     # closing any fd of the file releases the lock
        _held.discard(os.path.realpath(self.directory))
        self.fd = None


def lock(directory):
    """Hold the run lock of `directory` (which exists) -> RunLock; InUse if another process
    holds it. Keeps its fd open until release(): closing any fd of the lock file in this process
    would release the lock, so nothing else here may open it."""
    key = os.path.realpath(directory)
    if key in _held:
        raise InUse(f"this process (pid {os.getpid()})")
    path = os.path.join(directory, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)                          # not holding it: closing releases nothing
        if e.errno in NO_LOCKS:
            print(f"warning: {directory}: this file system does not support locks ({e.strerror}): two runs "
                  f"in this directory cannot be prevented, and leftover *.tmp.* files are kept")
            return RunLock(directory)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise InUse(holder(path)) from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_details()).encode() + b'\n', 0)
        os.fsync(fd)                          # visible to a process on another NFS client
    except OSError:
        os.close(fd)                          # (disk full) unlocked again: the caller stops
        raise
    _held.add(key)
    return RunLock(directory, fd)


def holder_details():
    return {'host': socket.gethostname(), 'pid': os.getpid(),
            'slurm_job': os.environ.get('SLURM_JOB_ID'),
            'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}


def holder(path, tries=20):
    """'pid P on host H (Slurm job J, since T)' from the lock file of a held lock."""
    info = None
    for _ in range(tries):                    # the holder writes its details just after locking
        try:
            with open(path) as f:
                info = json.loads(f.read() or 'null')
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            job = f"Slurm job {info['slurm_job']}, " if info.get('slurm_job') else ''
            return f"pid {info.get('pid')} on host {info.get('host')} ({job}since {info.get('since')})"
        time.sleep(0.05)
    return "another process (it has not written its details to .lock)"


@contextlib.contextmanager
def claim(directory, prog='main.py', exclusive=True):
    """Create `directory` and, if `exclusive`, hold its run lock for the `with` block. Rank 0
    locks; every rank stops with the same line if the directory is taken or cannot be made."""
    run_lock, error = RunLock(directory), None
    if utils.is_main_process():
        try:
            os.makedirs(directory, exist_ok=True)
            if exclusive:
                run_lock = lock(directory)
        except InUse as e:
            error = (f"{prog}: error: {directory} is in use by {e}; wait for it, stop it, "
                     f"or use another --output-dir")
        except OSError as e:
            error = f"{prog}: error: --output-dir {directory}: {e.strerror or e}"
    if utils.is_dist():                       # the other ranks learn rank 0's answer
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise SystemExit(error)
    try:
        yield run_lock
    finally:
        run_lock.release()


# ----------------------------------------------------------------------------- resume

NOT_COMPARED = {
    # where things go, how often, how fast, safety limits: the run computes the same
    'output_dir', 'resume', 'evaluate', 'allow_resume_changes', 'save_freq_steps', 'keep_checkpoints',
    'exit_after_steps', 'max_bad_steps', 'print_freq', 'eval_freq', 'zeroshot_datasets',
    'eval_data_root', 'wandb', 'offline', 'name', 'ddp_bucket_cap_mb', 'dist_backend', 'compile',
    'checkpoint_grad', 'workers', 'prefetch_factor', 'wds_shuffle_buffer', 'allow_pickle',
    'max_bad_fraction', 'max_image_pixels', 'precision', 'disable_amp',
    # starting weights, replaced by the checkpoint's
    'finetune', 'image_pretrained',
    # spellings resolved into other flags (compared there): --momentum -> --model, --momentum-tau;
    # --avg-word-embs -> --text-pooling; batch x update-freq x processes -> the global batch
    'momentum', 'avg_word_embs', 'batch_size', 'update_freq',
}


def resume_differences(ckpt, args, parser):
    """['--flag: checkpoint value → now value', ...] for the flags of `parser` that change the
    run's meaning; the global batch (batch x update-freq x processes) as one entry."""
    saved = ckpt.get('args')
    if not isinstance(saved, dict):
        return []
    now = vars(args)
    plain = lambda v: list(v) if isinstance(v, tuple) else v      # noqa: E731  (saved as lists)
    diffs = [f"--{k.replace('_', '-')}: {saved[k]!r} → {plain(now[k])!r}"
             for k in sorted(vars(parser.parse_args([])))
             if k not in NOT_COMPARED and k in saved and k in now and plain(saved[k]) != plain(now[k])]
    if all(k in saved for k in ('batch_size', 'update_freq')):
        then = (saved['batch_size'], saved['update_freq'], len(ckpt.get('rng_ranks') or []) or 1)
        here = (args.batch_size, args.update_freq, utils.get_world_size())
        if then[0] * then[1] * then[2] != here[0] * here[1] * here[2]:
            show = lambda b: f"{b[0]} x {b[1]} x {b[2]} = {b[0] * b[1] * b[2]}"   # noqa: E731
            diffs.append(f"global batch (--batch-size x --update-freq x processes): {show(then)} → {show(here)}")
    return diffs


def check_resume_args(ckpt, args, path, parser):
    """Stop (one line listing the differences) if `args` would continue the checkpoint's run
    with another meaning; with --allow-resume-changes, warn and go on. --evaluate only reads
    the weights: not compared."""
    if args.evaluate:
        return
    diffs = resume_differences(ckpt, args, parser)
    if not diffs:
        return
    if args.allow_resume_changes:
        print(f"warning: resuming {path} with changed settings (--allow-resume-changes): {'; '.join(diffs)}")
        return
    raise SystemExit(f"main.py: error: {path} was trained with other settings: {'; '.join(diffs)}; "
                     f"rerun with the checkpoint's values, use another --output-dir, or pass "
                     f"--allow-resume-changes to continue with the new ones")
