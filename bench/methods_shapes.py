"""Train every method on the embedded `shapes` set with a small CPU budget and print a
markdown table (the robustness table): method, budget, seed, zero-shot top-1 on the held-out
split and on each shift split of `shapes` (catalog `shift_of`) and their mean, training minutes
(wall) and CPU minutes (user + system of main.py and its loader workers: the cost measure that
other jobs on a shared machine disturb least).

    python bench/methods_shapes.py [--methods CLIP CL2L ...] [--budgets 1 3] [--seeds 0 1 2]
    python bench/methods_shapes.py --methods CLIP --extra-flags="--model-ema"   # a training feature

Budget 1 = the demo's: its epochs (main.py's shapes defaults) of --train-num-samples samples;
budget 3 trains three times as many epochs. Each run is `python main.py --dataset shapes --model
<BASE>_TINYCNN_<METHOD> ...` in a fresh output directory, with the demo's defaults plus the
flags in FLAGS (printed in the table).

A 3x run of a CL2L-based method takes 2-3 hours on one core. With --runs-dir DIR each run
keeps its directory (DIR/<METHOD>_<budget>x_seed<seed>): SIGTERM or Ctrl-C stops main.py after
its current step with a checkpoint, and rerunning the same command resumes it (main.py's exact
resume) and reprints finished rows without training. CPU and wall minutes then add up every
invocation of the run (bench_usage.txt in its directory).
"""
import argparse
import contextlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import methods  # noqa: E402
from plots import read_jsonl  # noqa: E402
import zeroshot  # noqa: E402

SHIFTS = zeroshot.shift_sets('shapes')

RUNS = {name: f'{spec.bases[0]}_TINYCNN_{name}' for name, spec in methods.METHODS.items()}

# CL2L-based methods: 2 views, separate projectors, EDA; their per-sample augmentations are
# the CPU cost, so 2 loader workers. SIGLIP: the paper's bias init -10 is for a 32k batch (one
# positive per 32k pairs); at batch 256 the demo stayed at chance with it (bench/RESULTS.md),
# -5 (about -log 256) learns.
_VIEWS = ['--separate-proj', '--text-augment', '--num-augs', '2', '--workers', '2']
# BARLIP: with the paper's loss scale 0.025 the Barlow term (~16 against a CLIP term of ~5)
# held the contrastive part back (train clip_acc at step 50: 2.7 % vs 11.3 % at 0.0025) and
# the demo ended at chance (13.3 %, bench/RESULTS.md); on the current `shapes` 0.0025 stayed near
# chance too (14.9 % shift mean), 0.00078125 (upstream's effective weight at 32 processes,
# docs/zoo.md) learned (71.5 %).
FLAGS = {'SIGLIP': ['--logit-bias-init=-5'], **{m: _VIEWS for m in RUNS if RUNS[m].startswith('CL2L')},
         'BARLIP': _VIEWS + ['--barlip-scale-loss', '0.00078125']}


def demo_epochs():
    import main as train            # torch and the model zoo: imported only when needed
    return train.DATASET_DEFAULTS['shapes']['epochs']


USAGE = 'bench_usage.txt'   # one JSON line per invocation of main.py: CPU and wall seconds, exit code


def run(method, epochs, seed, args, out_dir):
    """(accuracies, EMA top-1, training minutes, CPU minutes, samples/s, invocations) of one
    run in `out_dir`: trained (or resumed) unless its log already ends with the evaluation."""
    model = RUNS[method]
    cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--model', model, '--seed', str(seed),
           '--output-dir', out_dir, '--epochs', str(epochs),
           '--train-num-samples', str(args.train_num_samples), '--eval-freq', str(epochs)]
    cmd += FLAGS.get(method, []) + shlex.split(args.extra_flags)
    if not _finished(read_jsonl(os.path.join(out_dir, 'log.txt')), epochs):
        code = _train_and_record_usage(cmd, out_dir)
        if code != 0:
            hint = ('rerun the same command to resume' if args.runs_dir
                    else 'pass --runs-dir to keep runs that can resume')
            raise SystemExit(f"methods_shapes.py: error: {method} seed {seed}: main.py exited with "
                             f"{code} (its output: {out_dir}); {hint}")
    last = read_jsonl(os.path.join(out_dir, 'log.txt'))[-1]
    usage = read_jsonl(os.path.join(out_dir, USAGE))
    cpu_min = sum(u['cpu_s'] for u in usage) / 60
    # one invocation: main.py's own training time; resumed: the invocations' wall time, set-up included
    minutes = last['train_time_s'] / 60 if len(usage) == 1 else sum(u['wall_s'] for u in usage) / 60
    splits = [last[f'{name}_top1'] for name in ['shapes', *SHIFTS]] + [last['shapes_shift_mean_top1']]
    return splits, last.get('ema_shapes_top1'), minutes, cpu_min, last['train_samples_per_s'], len(usage)


def _finished(logs, epochs):
    return bool(logs) and logs[-1]['epoch'] == epochs and 'shapes_shift_mean_top1' in logs[-1]


def _train_and_record_usage(cmd, out_dir):
    """Run main.py in its own process group and append its CPU (user + system of it and its
    loader workers) and wall seconds to USAGE. SIGTERM / SIGINT to this script go to the whole
    group as SIGTERM, once: main.py finishes its step, checkpoints and exits (its workers leave
    the signal to it), and this invocation's usage is still recorded."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True,
                             env={**os.environ, 'WANDB_MODE': 'offline'})
    forward = lambda signum, frame: os.killpg(child.pid, signal.SIGTERM)   # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)      # main.py and its loader workers
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    with open(os.path.join(out_dir, USAGE), 'a') as f:
        f.write(json.dumps({'cpu_s': cpu_s, 'wall_s': time.time() - start, 'exit': code}) + '\n')
    return code


@contextlib.contextmanager
def _run_dir(runs_dir, name):
    if runs_dir is None:
        with tempfile.TemporaryDirectory() as out:
            yield out
    else:
        os.makedirs(os.path.join(runs_dir, name), exist_ok=True)
        yield os.path.join(runs_dir, name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--methods', nargs='+', default=list(RUNS), choices=list(RUNS))
    parser.add_argument('--epochs', type=int, default=None, help="budget 1's epochs (default: the demo's)")
    parser.add_argument('--budgets', type=int, nargs='+', default=[1], help='multiples of the epochs (e.g. 1 3)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--train-num-samples', type=int, default=40000, help='samples per epoch (40000: the demo budget)')
    parser.add_argument('--extra-flags', default='', help="main.py flags added to every run, e.g. '--range-augment'")
    parser.add_argument('--runs-dir', default=None, metavar='DIR',
                        help='keep each run in DIR/<METHOD>_<budget>x_seed<seed> so that a stopped run '
                             'resumes and a finished one is reprinted (default: temporary directories)')
    args = parser.parse_args(argv)
    epochs = args.epochs or demo_epochs()
    columns = ['held-out', *(name.replace('shapes-', '') for name in SHIFTS), 'shift mean']
    print(f"| method | model | flags | budget (epochs) | seed | {' | '.join(columns)} | training min (wall) "
          f"| CPU min (all processes, incl. set-up and evaluation) | samples/s |")
    print('|---' * (len(columns) + 8) + '|')
    for method in args.methods:
        flags = ' '.join(FLAGS.get(method, []) + shlex.split(args.extra_flags)) or '(defaults)'
        for budget in args.budgets:
            for seed in args.seeds:
                with _run_dir(args.runs_dir, f'{method}_{budget}x_seed{seed}') as out:
                    splits, ema_top1, minutes, cpu_min, speed, runs = run(method, epochs * budget, seed, args, out)
                ema = '' if ema_top1 is None else f' (EMA weights {ema_top1:.1f})'
                cells = ' | '.join(f'{v:.1f}' for v in splits)
                wall = f'{minutes:.1f}' + ('' if runs == 1 else f' ({runs} invocations, incl. set-up)')
                print(f'| {method} | `{RUNS[method]}` | `{flags}` | {budget}x ({epochs * budget}) | {seed} '
                      f'| {cells}{ema} | {wall} | {cpu_min:.1f} | {speed:.0f} |', flush=True)


if __name__ == '__main__':
    main()
