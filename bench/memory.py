"""Peak memory of a ViT-B/16 training step with and without --checkpoint-grad, plus step time.

    python bench/memory.py                # batch 16, 224 px; memory from fresh subprocesses
    python bench/memory.py --quick        # batch 4, 1 timed step

Memory: each setting runs in a fresh subprocess (model, fused AdamW, warm-up step, timed
steps) and reports its peak RSS (VmHWM: step_arms.peak_rss_mb), the RSS once the model exists
and the RSS after the first step (weights + AdamW state; both after malloc_trim), so
"activations etc." = peak - (weights + AdamW state) - gradient bytes = saved activations +
workspace, the part checkpointing can cut. Settings alternate A, B, A, B over `--rounds` subprocess rounds.
Time: one process holds both models and alternates steps with checkpointing off and on (the
same interleaving as train_step.py), so the time ratio is measured under the same load.
The step is train_step.py's (our real step: CLIPLoss, main.build_optimizer, engine.train_step).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_arms as ts  # noqa: E402  (the arms of train_step.py)


def rss_mb():
    """Current resident set size (MB), from /proc (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def trimmed_rss_mb():
    """RSS after handing freed heap memory back to the OS (glibc malloc_trim)."""
    import ctypes
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:
        pass
    return rss_mb()


def child(args):
    """One setting in this (fresh) process: print a JSON line with RSS and step times."""
    torch.set_num_threads(args.threads)
    batches = ts.make_batches(args.batch_size, args.image_size, 2)
    arm = ts.build_ours('CLIP_VITB16_CLIP', batches, checkpoint_grad=args.checkpoint_grad,
                        **ts.TEXT_B16)
    model_rss = trimmed_rss_mb()
    arm.step()                                        # allocates the AdamW state
    state_rss = trimmed_rss_mb()                      # weights + AdamW state, no gradients
    times = [arm.step() for _ in range(args.steps)]
    peak = ts.peak_rss_mb()
    grad_mb = sum(p.numel() * p.element_size() for p in arm.model.parameters()) / 2 ** 20
    print(json.dumps({'checkpoint_grad': args.checkpoint_grad, 'model_rss_mb': model_rss,
                      'state_rss_mb': state_rss, 'grad_mb': grad_mb, 'peak_rss_mb': peak,
                      'times': times}))


def run_child(args, checkpoint_grad):
    cmd = [sys.executable, os.path.abspath(__file__), '--child', '--batch-size', str(args.batch_size),
           '--image-size', str(args.image_size), '--steps', str(args.child_steps),
           '--threads', str(args.threads)] + (['--checkpoint-grad'] if checkpoint_grad else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def timed_pair(args):
    """Step times with checkpointing off / on, interleaved in one process."""
    batches = ts.make_batches(args.batch_size, args.image_size, 2)
    off = ts.build_ours('CLIP_VITB16_CLIP', batches, 'no checkpointing', **ts.TEXT_B16)
    on = ts.build_ours('CLIP_VITB16_CLIP', batches, '--checkpoint-grad', checkpoint_grad=True,
                       **ts.TEXT_B16)
    for arm in (off, on):
        arm.step()
    for r in range(args.steps):
        for arm in ((off, on) if r % 2 == 0 else (on, off)):
            arm.times.append(arm.step())
        print(f'  round {r + 1}/{args.steps}: off {off.times[-1]:.2f}s, on {on.times[-1]:.2f}s', flush=True)
    return off.times, on.times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--steps', type=int, default=6, help='interleaved timed steps per setting')
    p.add_argument('--child-steps', type=int, default=2, help='steps per memory subprocess')
    p.add_argument('--rounds', type=int, default=2, help='A/B subprocess rounds for memory')
    p.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument('--quick', action='store_true', help='batch 4, 1 round, 2 timed steps')
    p.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--checkpoint-grad', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.child_steps, args.rounds = 4, 2, 1, 1
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    print(f'# memory, ViT-B/16 batch {args.batch_size}, {args.image_size} px, fp32: '
          f'{ts.machine_note(args.threads)}')
    mem = {False: [], True: []}
    for r in range(args.rounds):
        for cg in ((False, True) if r % 2 == 0 else (True, False)):
            res = run_child(args, cg)
            mem[cg].append(res)
            print(f"  subprocess checkpoint_grad={cg}: model RSS {res['model_rss_mb']:.0f} MB, "
                  f"weights + AdamW state {res['state_rss_mb']:.0f} MB, peak RSS "
                  f"{res['peak_rss_mb']:.0f} MB", flush=True)
    t_off, t_on = timed_pair(args)
    print(f'\nafter: {ts.machine_note(args.threads)}')
    print('\n| setting | peak RSS (MB) | model RSS (MB) | weights + AdamW (MB) | activations etc. = '
          'peak - weights/AdamW - gradients (MB) | step min / median / max (s) |')
    print('|---|---|---|---|---|---|')
    stats = {}
    for cg, times in ((False, t_off), (True, t_on)):
        med = {k: statistics.median(m[k] for m in mem[cg])
               for k in ('peak_rss_mb', 'model_rss_mb', 'state_rss_mb', 'grad_mb')}
        act = med['peak_rss_mb'] - med['state_rss_mb'] - med['grad_mb']
        stats[cg] = (med['peak_rss_mb'], act, statistics.median(times))
        print(f"| {'--checkpoint-grad' if cg else 'default'} | {med['peak_rss_mb']:.0f} | "
              f"{med['model_rss_mb']:.0f} | {med['state_rss_mb']:.0f} | {act:.0f} | "
              f"{min(times):.2f} / {statistics.median(times):.2f} / {max(times):.2f} |")
    (p0, a0, t0), (p1, a1, t1) = stats[False], stats[True]
    print(f'\n--checkpoint-grad, ViT-B/16 batch {args.batch_size}: peak RSS {100 * (p1 / p0 - 1):+.0f} %, '
          f'activation memory {100 * (a1 / a0 - 1):+.0f} %, step time {100 * (t1 / t0 - 1):+.0f} % '
          f'(median of interleaved steps)')
    return stats


if __name__ == '__main__':
    main()
