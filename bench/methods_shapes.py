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


def run(method, epochs, seed, args, out_dir):
    model = RUNS[method]
    cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--model', model, '--seed', str(seed),
           '--output-dir', out_dir, '--epochs', str(epochs),
           '--train-num-samples', str(args.train_num_samples), '--eval-freq', str(epochs)]
    cmd += FLAGS.get(method, []) + shlex.split(args.extra_flags)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, 'WANDB_MODE': 'offline'})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)       # main.py and its loader workers
    cpu_min = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / 60
    with open(os.path.join(out_dir, 'log.txt')) as f:
        last = [json.loads(line) for line in f][-1]
    splits = [last[f'{name}_top1'] for name in ['shapes', *SHIFTS]] + [last['shapes_shift_mean_top1']]
    return splits, last.get('ema_shapes_top1'), last['train_time_s'] / 60, cpu_min, last['train_samples_per_s']


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--methods', nargs='+', default=list(RUNS), choices=list(RUNS))
    parser.add_argument('--epochs', type=int, default=None, help="budget 1's epochs (default: the demo's)")
    parser.add_argument('--budgets', type=int, nargs='+', default=[1], help='multiples of the epochs (e.g. 1 3)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--train-num-samples', type=int, default=40000, help='samples per epoch (40000: the demo budget)')
    parser.add_argument('--extra-flags', default='', help="main.py flags added to every run, e.g. '--range-augment'")
    args = parser.parse_args()
    epochs = args.epochs or demo_epochs()
    columns = ['held-out', *(name.replace('shapes-', '') for name in SHIFTS), 'shift mean']
    print(f"| method | model | flags | budget (epochs) | seed | {' | '.join(columns)} | training min (wall) "
          f"| CPU min (all processes, incl. set-up and evaluation) | samples/s |")
    print('|---' * (len(columns) + 8) + '|')
    for method in args.methods:
        flags = ' '.join(FLAGS.get(method, []) + shlex.split(args.extra_flags)) or '(defaults)'
        for budget in args.budgets:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as out:
                    splits, ema_top1, minutes, cpu_min, speed = run(method, epochs * budget, seed, args, out)
                ema = '' if ema_top1 is None else f' (EMA weights {ema_top1:.1f})'
                cells = ' | '.join(f'{v:.1f}' for v in splits)
                print(f'| {method} | `{RUNS[method]}` | `{flags}` | {budget}x ({epochs * budget}) | {seed} '
                      f'| {cells}{ema} | {minutes:.1f} | {cpu_min:.1f} | {speed:.0f} |', flush=True)


if __name__ == '__main__':
    main()
