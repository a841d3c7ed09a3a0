"""Train every method on the embedded `shapes` set with a small CPU budget and print a
markdown table: method, zero-shot top-1 on the held-out split (z head), training minutes (wall)
and CPU minutes (user + system of main.py and its loader workers: the cost measure that other
jobs on a shared machine disturb least).

    python bench/methods_shapes.py [--epochs 5 --train-num-samples 40000] [--methods CLIP CL2L ...]
    python bench/methods_shapes.py --methods CLIP --extra-flags="--model-ema"   # a training feature

Each run is `python main.py --dataset shapes --model <BASE>_TINYCNN_<METHOD> ...` in a fresh
output directory, with the demo's defaults plus the flags in FLAGS (printed in the table).
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import methods  # noqa: E402

RUNS = {name: f'{spec.bases[0]}_TINYCNN_{name}' for name, spec in methods.METHODS.items()}

# CL2L-based methods: 2 views, separate projectors, EDA; their per-sample augmentations are
# the CPU cost, so 2 loader workers. SIGLIP: the paper's bias init -10 is for a 32k batch (one
# positive per 32k pairs); at batch 256 the demo stayed at chance with it (bench/RESULTS.md),
# -5 (about -log 256) learns.
_VIEWS = ['--separate-proj', '--text-augment', '--num-augs', '2', '--workers', '2']
# BARLIP: with the paper's loss scale 0.025 the Barlow term (~16 against a CLIP term of ~5)
# held the contrastive part back (train clip_acc at step 50: 2.7 % vs 11.3 % at 0.0025) and
# the demo ended at chance (13.3 %, bench/RESULTS.md).
FLAGS = {'SIGLIP': ['--logit-bias-init=-5'], **{m: _VIEWS for m in RUNS if RUNS[m].startswith('CL2L')},
         'BARLIP': _VIEWS + ['--barlip-scale-loss', '0.0025']}


def run(method, args, out_dir):
    model = RUNS[method]
    cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--model', model,
           '--output-dir', out_dir, '--epochs', str(args.epochs),
           '--train-num-samples', str(args.train_num_samples), '--eval-freq', str(args.epochs)]
    cmd += FLAGS.get(method, []) + shlex.split(args.extra_flags)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, 'WANDB_MODE': 'offline'})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)       # main.py and its loader workers
    cpu_min = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60
    with open(os.path.join(out_dir, 'log.txt')) as f:
        last = [json.loads(line) for line in f][-1]
    return (last['shapes_top1'], last.get('ema_shapes_top1'), last['train_time_s'] / 60, cpu_min,
            last['train_samples_per_s'])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--methods', nargs='+', default=list(RUNS), choices=list(RUNS))
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--train-num-samples', type=int, default=40000, help='samples per epoch (40000: the demo budget)')
    parser.add_argument('--extra-flags', default='', help="main.py flags added to every run, e.g. '--range-augment'")
    args = parser.parse_args()
    print('| method | model | flags | zero-shot top-1 (shapes held-out) | training min (wall) | CPU min '
          '(all processes, incl. set-up and evaluation) | samples/s |')
    print('|---|---|---|---|---|---|---|')
    for method in args.methods:
        with tempfile.TemporaryDirectory() as out:
            top1, ema_top1, minutes, cpu_min, speed = run(method, args, out)
        flags = ' '.join(FLAGS.get(method, []) + shlex.split(args.extra_flags)) or '(defaults)'
        ema = '' if ema_top1 is None else f' (EMA weights {ema_top1:.1f} %)'
        print(f'| {method} | `{RUNS[method]}` | `{flags}` | {top1:.1f} %{ema} | {minutes:.1f} | {cpu_min:.1f} '
              f'| {speed:.0f} |', flush=True)


if __name__ == '__main__':
    main()
