"""Train a vision-language model.

    python main.py                                   # the demo: a small CLIP on `shapes`, CPU, ~8 min
    torchrun --nproc_per_node 2 main.py --model CLIP_VITB16_CLIP --dataset ... --output-dir runs/x

Every flag is documented in `python main.py --help` and in docs/flags.md.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time

import torch

import augment
import checkpoint
import clipa
import datasets
import engine
import features
import methods
import models
import rundir
import syncbn
from run_checkpoint import RunCheckpoints, load_finetune_weights, plain_args
import text_reduction
import towers
import utils
import zeroshot

# Defaults that depend on the dataset: the embedded `shapes` set trains the demo on a 2-core CPU
# in about 8 minutes (13-15 CPU-minutes; batch 64 learned shape in far fewer CPU-seconds than 256 or
# 128, and the TINYCNN trains with --image-pool avg-max: bench/RESULTS.md); every other dataset
# gets the upstream clip-rocket defaults.
# The demo validates on `shapes`' held-out split and on its shift splits (catalog `shift_of`).
DATASET_DEFAULTS = {
    'shapes': dict(model='CLIP_TINYCNN_CLIP', epochs=6, batch_size=64, lr=3e-3, wd=0.1,
                   warmup_epochs=0.25, lr_start=1e-6, lr_end=0.0,
                   zeroshot_datasets=['shapes', *zeroshot.shift_sets('shapes')]),
}
# The demo's multi-resolution training: on `shapes` the TINYCNN (the demo's tower, which takes any
# size) of the CLIP base trains each step at one of these fractions of --image-size (48 56 64 72
# 80 px at 64) with the batch fixed (--multiscale-batch fixed). Training images then show every
# shape at more pixel sizes, which lifted the demo's unseen-size split by 6-14 points at the same
# budget (bench/RESULTS.md); --no-multiscale trains at --image-size only, as before. Not for the
# CL2L base: at the demo's budget it learned far less with it (30-90 % held-out against 92-99 %).
DEMO_MULTISCALE = (0.75, 0.875, 1.0, 1.125, 1.25)
UPSTREAM_DEFAULTS = dict(model='CLIP_VITB16_CLIP', epochs=25, batch_size=64, lr=3e-3, wd=0.1,
                         warmup_epochs=1, lr_start=1e-6, lr_end=1e-5, zeroshot_datasets=['shapes'])


def get_args_parser():
    parser = argparse.ArgumentParser('vlp-baselines training', add_help=False)
    g = parser.add_argument_group('model')
    g.add_argument('--model', default=None,
                   help='<base>_<backbone>_<method>, e.g. CLIP_VITB16_CLIP (see models.list_models()); '
                        'default CLIP_TINYCNN_CLIP on shapes, CLIP_VITB16_CLIP otherwise')
    g.add_argument('--embed-dim', type=int, default=None,
                   help='joint embedding size (default: the backbone preset, 256 for real towers)')
    g.add_argument('--clip-proj-type', choices=['linear', 'mlp'], default=None,
                   help='image projection head (default: the preset; linear for real towers)')
    g.add_argument('--transformer-layers', type=int, default=None,
                   help='text transformer depth (default: the preset, 12 for real towers; paper CC3M: 6)')
    g.add_argument('--transformer-width', type=int, default=None, help='text width (default 512)')
    g.add_argument('--transformer-heads', type=int, default=None, help='text heads (default 8)')
    g.add_argument('--context-length', type=int, default=None,
                   help='text tokens incl. SOT/EOT (default: the preset; 77, CLIPA 32)')
    g.add_argument('--text-act', choices=['gelu', 'quick_gelu'], default=None,
                   help='text MLP activation (default gelu; quick_gelu = OpenAI CLIP / clip-rocket / SLIP)')
    g.add_argument('--logit-scale-init', type=float, default=None,
                   help='initial temperature exp(logit scale) (default: 1/0.07; SIGLIP 10)')
    g.add_argument('--patch-dropout', type=float, default=0.0,
                   help='ViTs: fraction of patch tokens dropped at random in training (FLIP/CLIPA), 0-1')
    g.add_argument('--text-reduction', choices=text_reduction.MODES, default='none',
                   help='CLIPA text token reduction of training captions to --text-context tokens')
    g.add_argument('--text-context', type=int, default=32,
                   help='tokens kept by --text-reduction, SOT/EOT included (32)')
    g.add_argument('--finetune', default='',
                   help='start from the weights of this checkpoint (main.py, interop.py import, or a plain '
                        'state dict; not its optimizer/step); ViT position embeddings resampled to --image-size')
    g.add_argument('--checkpoint-grad', action='store_true',
                   help='activation checkpointing in both towers: less memory, ~20%% slower')
    g.add_argument('--compile', action='store_true',
                   help='torch.compile the model for the training step (checkpoints and evaluation '
                        'stay eager); ViT-B/16 on CPU: ~1.5 min compiling, then 1.0-1.08x faster')
    towers.add_args(parser)     # --image-tower, --image-pretrained, --text-tower, --lock-image, ...
    clipa.add_args(parser)      # --image-pool, --text-tokenizer, --text-mask, --text-vocab-size

    g = parser.add_argument_group('CL2L base (CLIP🚀 and the methods on it)')
    g.add_argument('--num-augs', type=int, default=2,
                   help='CL2L: augmented image views and text views per sample (0 = exactly CLIP)')
    g.add_argument('--separate-proj', action='store_true',
                   help='CL2L: own 3-layer MLP projectors + logit scale for the views (paper: on)')
    g.add_argument('--separate-proj-child', action='store_true',
                   help='method heads: separate heads for the augmented views')
    g.add_argument('--clip-hidden-dim', type=int, default=None,
                   help='hidden width of the CL2L view projectors (4096; 512 on tiny presets)')
    g.add_argument('--cl2l-img-proj-type', choices=['mlp', 'linear'], default='mlp', help='view image projector')
    g.add_argument('--cl2l-txt-proj-type', choices=['mlp', 'linear'], default='mlp', help='view text projector')
    g.add_argument('--text-dropout-prob', type=float, default=0.0,
                   help='dropout in the text tower for text views (paper CC3M: 0.2)')
    g.add_argument('--text-drop-path-prob', type=float, default=0.0,
                   help='stochastic depth in the text tower for text views')
    methods.add_args(parser)    # each method's own flags, one group per method (methods.py)
    features.add_args(parser)   # each training feature's flags (features.py): --model-ema, ...

    g = parser.add_argument_group('augmentation (CL2L views)')
    g.add_argument('--multicrop-resize', type=int, default=None,
                   help='size of the augmented image views (default: --image-size; paper 224)')
    g.add_argument('--multicrop-max-scale', type=float, default=1.0, help='max crop scale of the views')
    g.add_argument('--weak-min-scale', type=float, default=0.5, help='min crop scale of the global view')
    g.add_argument('--blur-prob', type=float, default=0.5, help='Gaussian blur probability of the views')
    g.add_argument('--solarize-prob', type=float, default=0.0, help='solarize probability of the views')
    g.add_argument('--grayscale-prob', type=float, default=0.2, help='grayscale probability of the views')
    g.add_argument('--byol-augment', action='store_true', help="BYOL's asymmetric view pair")
    g.add_argument('--text-augment', action='store_true',
                   help='EDA text views: stop-word removal + one of synonym/swap/deletion (needs WordNet)')
    g.add_argument('--clean-before-augment', action='store_true', help='ftfy + HTML unescape + lowercase first')
    g.add_argument('--no-text-augment-prob', type=float, default=0.0, help='probability to leave a text view as is')
    g.add_argument('--remove-stopwords-prob', type=float, default=0.8, help='stop-word removal probability (0.8)')
    g.add_argument('--synonym-replacement-prob', type=float, default=0.4, help='EDA op weight (0.4)')
    g.add_argument('--random-swap-prob', type=float, default=0.4, help='EDA op weight (0.4)')
    g.add_argument('--random-deletion-prob', type=float, default=0.2, help='EDA op weight (0.2)')

    g = parser.add_argument_group('data')
    g.add_argument('--dataset', default='shapes', help=datasets.dataset_help())
    g.add_argument('--root', default='', help='dataset root directory (real datasets)')
    g.add_argument('--metadata', default='', help='dataset metadata file (real datasets)')
    g.add_argument('--train-num-samples', type=int, default=None,
                   help='cap the samples per epoch (quick runs); default: the whole dataset '
                        '(wds: the epoch length, unless *_stats.json / sizes.json give it)')
    g.add_argument('--image-size', type=int, default=None,
                   help='training/eval resolution (default: the backbone native size; 64 for TINYCNN)')
    g.add_argument('-j', '--workers', type=int, default=0,
                   help='data-loading processes per training process (0 = in-process; 8-10 on a GPU node)')
    g.add_argument('--prefetch-factor', type=int, default=2,
                   help='batches each loader worker prepares ahead (2; more if decoding is bursty)')
    g.add_argument('--caption-sampling', choices=['single', 'multi'], default='single',
                   help='single: one caption per sample for every text view; multi: each CL2L '
                        'text view draws its own caption (paper: multi on the merged 29M set)')
    g.add_argument('--allow-pickle', action='store_true',
                   help='read pickled metadata (upstream yfcc15m.pkl, cc3m.npy object arrays): '
                        'can run code, so off; convert once with make_dataset.py instead')
    g.add_argument('--max-bad-fraction', type=float, default=0.01,
                   help='stop when more than this fraction of an epoch\'s samples are unusable (0.01)')
    g.add_argument('--max-image-pixels', type=int, default=89_478_485,
                   help='refuse (skip) images with more pixels: decompression bombs (PIL default 89.5 M)')
    datasets.add_format_args(parser)   # each format's own flags: --shapes-num-train, --csv-*, --wds-*, ...

    g = parser.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=None, help='epochs (default 25, 6 on shapes)')
    g.add_argument('--batch-size', type=int, default=None,
                   help='batch per process (default 64, also on shapes; paper: 128 x 32 GPUs)')
    g.add_argument('--update-freq', type=int, default=1,
                   help='micro-batches per optimizer step (global batch = batch-size x update-freq x processes)')
    g.add_argument('--accum-mode', choices=['cached', 'simple'], default='cached',
                   help='with --update-freq > 1: cached = the update of one big batch (negatives from '
                        'all micro-batches; one extra forward each); simple = upstream, independent '
                        'micro-batch losses')
    g.add_argument('--lr', type=float, default=None, help='peak learning rate (default 3e-3)')
    g.add_argument('--lr-start', type=float, default=None, help='warm-up start learning rate (1e-6)')
    g.add_argument('--lr-end', type=float, default=None, help='final cosine learning rate (1e-5; 0 on shapes)')
    g.add_argument('--warmup-epochs', type=float, default=None, help='linear warm-up length in epochs (1; 0.25 on shapes)')
    g.add_argument('--wd', type=float, default=None, help='AdamW weight decay (0.1; paper CC3M 0.5)')
    g.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.98), help='AdamW betas (0.9 0.98)')
    g.add_argument('--eps', type=float, default=1e-8, help='AdamW epsilon (1e-8)')
    g.add_argument('--label-smoothing', type=float, default=0.0, help='contrastive label smoothing (paper: 0.1)')
    g.add_argument('--loss-avg-or-sum', choices=['avg', 'sum'], default='avg',
                   help='combine the two CLIP directions by their mean (avg) or sum')
    g.add_argument('--precision', choices=['auto', 'fp32', 'amp', 'bf16'], default='auto',
                   help='auto = amp (fp16 + GradScaler) on CUDA, fp32 on CPU')
    g.add_argument('--disable-amp', action='store_true', help='upstream alias of --precision fp32')
    g.add_argument('--seed', type=int, default=0, help='random seed')

    g = parser.add_argument_group('checkpoints, logging, evaluation')
    g.add_argument('--output-dir', default='./output', help='checkpoints, logs, plots')
    g.add_argument('--resume', default='', help='checkpoint to resume from (default: output-dir/checkpoint.pt if present)')
    g.add_argument('--save-freq-steps', type=int, default=0,
                   help='also checkpoint every N optimizer steps (0: epoch ends only)')
    g.add_argument('--keep-checkpoints', type=int, default=2,
                   help='checkpoints kept (checkpoint.pt, checkpoint.1.pt, ...), each with the SHA-256 '
                        'digest of its contents inside; a corrupted newest one falls back to the previous (2)')
    g.add_argument('--max-bad-steps', type=int, default=20,
                   help='stop (with a checkpoint) after this many non-finite steps in a row (20; 0: never)')
    g.add_argument('--exit-after-steps', type=int, default=0,
                   help='checkpoint and stop after N optimizer steps in this run (time-boxed jobs, tests)')
    g.add_argument('--eval-freq', type=int, default=1, help='zero-shot validation every N epochs')
    g.add_argument('--zeroshot-datasets', nargs='+', default=None,
                   help='catalog entries to validate on (dataset_catalog.json; default: shapes, and on '
                        '--dataset shapes also its shift splits shapes-colour, -size, -style, -render)')
    g.add_argument('--eval-data-root', default=os.environ.get('VLP_EVAL_DATA', 'data'),
                   help='where the zero-shot datasets live (default: $VLP_EVAL_DATA or ./data; '
                        'shapes needs none)')
    g.add_argument('--evaluate', action='store_true', help='only run zero-shot evaluation of the resumed model')
    g.add_argument('--allow-resume-changes', action='store_true',
                   help='resume even if flags that change the run (model, data, schedule, global '
                        'batch, seed, ...) differ from the checkpoint\'s; without it such a resume stops')
    g.add_argument('--print-freq', type=int, default=25, help='log every N optimizer steps')
    g.add_argument('--wandb', action='store_true', help='log to Weights & Biases')
    g.add_argument('--offline', action='store_true', help='wandb offline mode')
    g.add_argument('--name', default='vlp-baselines', help='wandb run name')
    g.add_argument('--ddp-bucket-cap-mb', type=float, default=25,
                   help='DDP gradient bucket size in MB (25; larger buckets, fewer all-reduces)')
    g.add_argument('--dist-backend', default='auto', choices=['auto', 'nccl', 'gloo'],
                   help='auto = nccl with CUDA, gloo without')
    return parser


def parse_args(argv=None):
    parser = utils.OneLineErrorParser('main.py', parents=[get_args_parser()],
                                      description='Train CLIP-family models.')
    args = parser.parse_args(argv)
    try:
        resolve_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


COUNTS = ['epochs', 'batch_size', 'update_freq', 'image_size', 'context_length', 'keep_checkpoints',
          'print_freq', 'eval_freq', 'shapes_num_train', 'train_num_samples', 'multicrop_resize',
          'embed_dim', 'transformer_layers', 'transformer_width', 'transformer_heads', 'clip_hidden_dim',
          'barlip_proj_dim', 'barlip_hidden_dim', 'siamlip_proj_dim', 'siamlip_hidden_dim', 'sk_iters',
          'text_context']
STEP_COUNTS = ['save_freq_steps', 'exit_after_steps', 'max_bad_steps', 'wds_shuffle_buffer']   # 0 = off
CXX_COMPILERS = [c for c in (os.environ.get('CXX'), 'g++', 'clang++', 'c++') if c]


def resolve_demo_multiscale(args):
    """--multiscale not given: on, with DEMO_MULTISCALE's sizes and a fixed batch, for the demo's
    TINYCNN of the CLIP base on `shapes` (sizes rounded to multiples of 4 px); off otherwise."""
    if args.multiscale is not None:
        return
    args.multiscale = (args.dataset == 'shapes' and args.base == 'CLIP' and args.backbone == 'TINYCNN'
                       and not args.image_tower)
    if args.multiscale:
        if args.multiscale_sizes is None:
            args.multiscale_sizes = [4 * round(f * args.image_size / 4) for f in DEMO_MULTISCALE]
        args.multiscale_batch = args.multiscale_batch or 'fixed'


def resolve_args(args):
    """Fill dataset-dependent defaults and reject impossible values before any work starts."""
    defaults = DATASET_DEFAULTS.get(args.dataset, UPSTREAM_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    datasets.resolve_data_args(args)
    models.parse_model_name(args.model)                     # the name as given is valid
    args.model = methods.resolve_model_name(args.model, args)   # upstream spellings: --momentum
    args.base, args.backbone, args.method = models.parse_model_name(args.model)
    preset = models.BACKBONES.get(args.backbone)
    if args.context_length is None:
        args.context_length = 77 if args.text_tower else preset.text.context_length
    towers.resolve_args(args)   # tower flags; --image-size from an --image-tower
    clipa.resolve_args(args, preset)    # --image-pool, --text-tokenizer, ...
    if args.image_size is None:
        args.image_size = models.BACKBONES.get(args.backbone).image_size
    resolve_demo_multiscale(args)
    resolve_method_args(args)
    features.resolve(args)
    if args.disable_amp:
        args.precision = 'fp32'
    if args.precision == 'auto':
        args.precision = 'amp' if torch.cuda.is_available() else 'fp32'
    engine.check_precision(args.precision, cuda=torch.cuda.is_available())
    for key, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{key.replace('_', '-')} must be a finite number, got {value}")
    if args.batch_size is not None and args.batch_size == 1:
        raise ValueError("--batch-size must be >= 2: a contrastive loss needs negatives in the batch "
                         "(and BatchNorm needs two samples)")
    if args.patch_dropout and not models.BACKBONES.get(args.backbone).is_vit \
            and not getattr(args, 'image_tower', None):
        raise ValueError(f"--patch-dropout drops ViT patch tokens; {args.backbone} is not a ViT "
                         f"(use a VIT* backbone)")
    backbone = models.BACKBONES.get(args.backbone)
    min_size, step = backbone.min_image_size, backbone.image_size_step
    if not getattr(args, 'image_tower', None):
        sizes = [('--image-size', args.image_size)]
        if args.base == 'CL2L' and args.num_augs > 0:
            sizes.append(('--multicrop-resize', args.multicrop_resize))
        for flag, size in sizes:
            if size is not None and 0 < size < min_size:
                raise ValueError(f"{flag} {size} is smaller than the {args.backbone} tower takes "
                                 f"(>= {min_size} px)")
            if size is not None and size > 0 and size % step:
                raise ValueError(f"{flag} {size}: the {args.backbone} tower takes multiples of {step} px")
    utils.check_counts(args, positive=COUNTS, non_negative=STEP_COUNTS)
    if not 0 <= args.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.lr <= 0 or args.wd < 0 or args.warmup_epochs < 0:
        raise ValueError("--lr must be > 0, --wd and --warmup-epochs >= 0")
    zeroshot.check_names(args.zeroshot_datasets, data_root=args.eval_data_root)
    if not 0 <= args.patch_dropout < 1:
        raise ValueError(f"--patch-dropout must be in [0, 1), got {args.patch_dropout}")
    if args.text_reduction != 'none' and not 3 <= args.text_context <= args.context_length:
        raise ValueError(f"--text-context must be in [3, --context-length {args.context_length}], "
                         f"got {args.text_context}")
    for flag, path in (('--finetune', args.finetune), ('--resume', args.resume)):
        if path and os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is a directory; pass a checkpoint file (e.g. {path}/checkpoint.pt)")
        if path and not os.path.isfile(path):
            raise ValueError(f"{flag}: no such file {path!r}")
    if not args.evaluate:                       # --evaluate writes nothing there
        utils.check_output_path(args.output_dir, '--output-dir', is_dir=True)
    if args.compile and not any(shutil.which(c) for c in CXX_COMPILERS):
        raise ValueError("--compile needs a C++ compiler for torch.compile's generated kernels "
                         f"(none of {', '.join(CXX_COMPILERS)} on PATH); install g++ or drop --compile")


def resolve_method_args(args):
    """The CL2L/method flags: shared checks here, each method's own in methods.py."""
    if args.logit_scale_init is not None and args.logit_scale_init <= 0:
        raise ValueError(f"--logit-scale-init must be > 0 (it is exp(logit scale)), got {args.logit_scale_init}")
    utils.check_counts(args, non_negative=['num_augs'])
    methods.resolve(args)
    weights = [args.synonym_replacement_prob, args.random_swap_prob, args.random_deletion_prob]
    if min(weights) < 0 or sum(weights) > 1 + 1e-9:
        raise ValueError("--synonym-replacement-prob, --random-swap-prob, --random-deletion-prob "
                         "must be >= 0 and sum to <= 1 (the rest is 'no operation')")
    if args.multicrop_resize is None:
        args.multicrop_resize = args.image_size
    if args.base == 'CL2L' and args.num_augs > 0 and args.text_augment:
        augment.require_wordnet()


def build_optimizer(model, args, extra_groups=()):
    groups = models.param_groups(model, args.wd) + list(extra_groups)
    kwargs = dict(lr=args.lr, betas=tuple(args.betas), eps=args.eps)
    try:  # fused AdamW: one kernel per step instead of a loop over tensors (3x on CPU)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def compile_for_training(model):
    """torch.compile'd view of `model` (same parameters) for the training step only: the
    checkpoint saves the eager module's state_dict (no `_orig_mod.` keys), evaluation runs eager.
    Compiling happens at the first step (and once more when text lengths first change)."""
    print("--compile: the first training steps compile the model (ViT-B/16 on CPU: ~1.5 min)")
    return torch.compile(model)


def build_loader(dataset, args):
    """-> (sampler with set_epoch(epoch, start), DataLoader); see datasets.build_loader."""
    return datasets.build_loader(dataset, args)


def report_zeroshot(results):
    """One line per dataset and weights; the live weights' lines come last (the demo's last line).
    A set validated with its shift splits comes after them and a line with their mean, so the
    demo ends: `... (shapes shift splits, mean of 4): NN.N%`, `... (shapes held-out): NN.N%`."""
    catalog = zeroshot.load_catalog()[0]
    for weights in sorted(results, key=lambda w: w == 'live'):
        suffix = '' if weights == 'live' else f', {weights} weights'
        print('\n'.join(report_lines(results[weights], catalog, suffix)))


def report_lines(per_set, catalog, suffix=''):
    """The lines of one weights' {dataset: metrics}: the sets without shift splits in the order
    given, then for each set with shift splits: those, their mean, the set itself."""
    def line(name):
        return f"zero-shot top-1 ({catalog[name].get('display', name)}{suffix}): {per_set[name]['top1']:.1f}%"
    groups = zeroshot.shift_groups(per_set, catalog)
    grouped = {n for base, shifts in groups.items() for n in (base, *shifts)}
    lines = [line(n) for n in per_set if n not in grouped]
    for base, shifts in groups.items():
        lines += [line(n) for n in shifts]
        lines += [f"zero-shot top-1 ({base} shift splits, mean of {len(shifts)}{suffix}): "
                  f"{zeroshot.shift_mean(per_set, shifts):.1f}%", line(base)]
    return lines


def main(argv=None, args=None):
    """Train. `argv`: command-line flags (default sys.argv); `args`: an already parsed Namespace
    from a parser built on get_args_parser() (e.g. run_with_submitit.py), resolved here."""
    if args is None:
        args = parse_args(argv)
    elif not hasattr(args, 'method'):
        resolve_args(args)
    if clipa.missing_tokenizer(vars(args)):     # before any work: a CLIPA preset needs its vocabulary
        raise SystemExit(f"main.py: error: {clipa.missing_tokenizer(vars(args))}")
    device = utils.init_distributed(args.dist_backend)
    utils.keep_freed_memory()                   # big batches/activations reuse freed memory
    with rundir.claim(args.output_dir, exclusive=not args.evaluate) as run_lock:   # one run per directory
        return run(args, argv, device, run_lock)


def run(args, argv, device, run_lock):
    """main() inside its --output-dir, claimed by `run_lock` (not with --evaluate, which only reads)."""
    print(f"git: {utils.git_sha()}")
    print(json.dumps(plain_args(args), sort_keys=True))
    if run_lock.exclusive:                      # no live writer here: a *.tmp.<pid> is a dead run's
        checkpoint.remove_stale_temporaries(args.output_dir)   # from a run killed mid-write
    if utils.is_main_process() and not args.evaluate:
        with open(os.path.join(args.output_dir, 'args.json'), 'w') as f:
            json.dump(plain_args(args), f, indent=2)
        with open(os.path.join(args.output_dir, 'command.txt'), 'a') as f:
            f.write(' '.join([sys.executable, *sys.argv[:1], *(argv if argv is not None else sys.argv[1:])]) + '\n')
    utils.seed_everything(args.seed + utils.get_rank())

    model = models.create_model_from_flags(args.model, args).to(device)
    if args.finetune:
        loaded, skipped, missing = load_finetune_weights(model, args.finetune)
        print(f"fine-tuning from {args.finetune}: {len(loaded)} tensors loaded, {len(skipped)} "
              f"skipped {skipped[:5]}, {len(missing)} left at init {missing[:5]}")
    towers.prepare(model, args)     # --image-pretrained, then --lock-image / --lock-text
    if args.checkpoint_grad:
        model.set_grad_checkpointing(True)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    feats = features.build(args, model, device)     # --model-ema, ... (features.py)
    loss_fn = features.with_loss_terms(feats, methods.build_loss(args))   # + e.g. RangeAugment's term
    tokenizer = towers.tokenizer_for(args)      # the --text-tower's own, else the CLIP BPE
    optimizer = build_optimizer(model, args, features.param_groups(feats))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == 'amp')
    checkpoints = RunCheckpoints(args, model, optimizer, scaler, feats)
    state, best = checkpoints.resume(get_args_parser())
    after_step = step_hooks(args, feats, state)
    if utils.get_world_size() > 1:
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = syncbn.sync_batchnorm(model, device)   # statistics over the global batch
        unused = args.base == 'CL2L' and args.num_augs == 0   # the h heads see no view
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None,
            bucket_cap_mb=args.ddp_bucket_cap_mb, gradient_as_bucket_view=True,
            find_unused_parameters=unused, static_graph=not unused and args.update_freq == 1)
    wandb_run = init_wandb(args)

    if args.evaluate:
        results = validate(model, feats, args, tokenizer, device)
        report_zeroshot(results)
        return results['live']

    dataset = datasets.build_train_dataset(args, tokenizer)
    sampler, loader = build_loader(dataset, args)
    steps_per_epoch = len(loader) // args.update_freq
    if steps_per_epoch == 0:
        raise SystemExit(f"main.py: error: an epoch of {len(sampler)} samples per process is smaller "
                         f"than --batch-size x --update-freq = {args.batch_size * args.update_freq}")
    total_steps = steps_per_epoch * args.epochs
    features.set_total_steps(feats, total_steps)   # e.g. RangeAugment's PSNR curriculum
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step):
        return engine.cosine_lr(step, total_steps, warmup_steps, args.lr, args.lr_start, args.lr_end)

    ckpt_path = os.path.join(args.output_dir, 'checkpoint.pt')
    steps_at_start = state.step
    stop = utils.StopSignals(device)            # SIGTERM / SIGUSR1: finish the step, checkpoint, exit

    def save_latest():
        checkpoints.save(ckpt_path, state, best, args.keep_checkpoints)

    def on_step(terms):
        if args.save_freq_steps and state.step % args.save_freq_steps == 0:
            save_latest()
        if stop.requested():
            save_latest()
            print(f"received {stop.name}: checkpoint saved at step {state.step}; "
                  f"rerun the same command to resume")
            state.stop = True
        if args.max_bad_steps and state.bad_in_a_row >= args.max_bad_steps:
            save_latest()                        # skipped steps change nothing: the last good state
            raise SystemExit(f"main.py: error: {state.bad_in_a_row} steps in a row had a non-finite "
                             f"loss or gradient (--max-bad-steps {args.max_bad_steps}); the last good "
                             f"state is saved in {ckpt_path}; lower --lr or check the data, then rerun")
        if state.step % args.print_freq == 0:
            record = {'step': state.step, 'epoch': state.epoch,
                      **{k: float(v.detach()) for k, v in terms.items()}, **features.step_log(feats)}
            utils.append_json(os.path.join(args.output_dir, 'log_steps.txt'), record)
            if wandb_run is not None:
                wandb_run.log(record, step=state.step)
        if args.exit_after_steps and state.step - steps_at_start >= args.exit_after_steps:
            save_latest()
            print(f"stopping after {args.exit_after_steps} steps as asked (--exit-after-steps); "
                  f"rerun the same command to resume")
            state.stop = True

    step_model = compile_for_training(model) if args.compile else model
    reducer = None
    if args.text_reduction != 'none':
        reducer = text_reduction.TextReducer(args.text_reduction, args.text_context, tokenizer).apply
    results = {}
    print(f"training {args.epochs} epochs x {steps_per_epoch} steps, "
          f"{utils.get_world_size()} process(es), batch {args.batch_size} x {args.update_freq}")
    t_train, cpu_train = time.time(), 0.0      # CPU seconds of this process in training steps only
    try:
        while state.epoch < args.epochs and not state.stop:
            sampler.set_epoch(state.epoch, start=state.batch_in_epoch * args.batch_size)
            if hasattr(dataset, 'set_epoch'):
                dataset.set_epoch(state.epoch)
            cpu_start = time.process_time()
            stats = engine.train_one_epoch(step_model, loss_fn, loader, optimizer, scaler, lr_at, state,
                                           args, device, steps_per_epoch, on_step, reducer, after_step)
            cpu_train += time.process_time() - cpu_start
            if state.stop:
                break
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            log = {'epoch': state.epoch, 'step': state.step, 'train_time_s': time.time() - t_train,
                   'train_cpu_s': cpu_train,
                   **{f'train_{k}': v for k, v in stats.items()}}
            if state.epoch % args.eval_freq == 0 or state.epoch == args.epochs:
                results = validate(model, feats, args, tokenizer, device)
                log.update(validation_log(results))
                now = best_of(results, args.zeroshot_datasets[0])
                print(f"epoch {state.epoch}: zero-shot top-1 " + ', '.join(
                    f"{r[args.zeroshot_datasets[0]]['top1']:.1f}%" + ('' if w == 'live' else f' ({w} weights)')
                    for w, r in results.items()) + f" ({args.zeroshot_datasets[0]})")
                if best is None or now['top1'] > best['top1']:
                    best = now
                    checkpoints.save(os.path.join(args.output_dir, 'checkpoint_best.pt'), state, best)
            save_latest()
            utils.append_json(os.path.join(args.output_dir, 'log.txt'), log)
            if wandb_run is not None:
                wandb_run.log(log, step=state.step)
    finally:
        stop.restore()
    if stop.signum is not None:
        raise SystemExit(128 + stop.signum)     # stopped by a signal, checkpoint saved
    if state.stop:
        return None
    if not results:  # resumed a finished run, or eval-freq skipped the last epoch
        results = validate(model, feats, args, tokenizer, device)
    if utils.is_main_process():
        import plots
        plots.training_curves(args.output_dir)
    if wandb_run is not None:
        wandb_run.finish()
    print(f"training time {time.time() - t_train:.0f} s; outputs in {args.output_dir}")
    report_zeroshot(results)
    return results['live']


def step_hooks(args, feats, state):
    """The hook run after each taken optimizer step: the method's (e.g. BYOLIP's EMA teacher),
    then the training features' (e.g. the model EMA), told the index of the step just taken."""
    method_hook = methods.step_hook(args)
    if not feats:
        return method_hook

    def after_step(core):
        if method_hook is not None:
            method_hook(core)
        features.after_step(feats, core, state.step)
    return after_step


def validate(model, feats, args, tokenizer, device):
    """Zero-shot results of the live weights and of each training feature's extra weights
    (e.g. the model EMA) -> {'live': {dataset: metrics}, 'ema': ...}."""
    core = engine.unwrap(model)
    weights = {'live': core, **features.eval_models(feats, core)}
    return {w: zeroshot.evaluate(m, args.zeroshot_datasets, tokenizer, device, args.image_size,
                                 data_root=args.eval_data_root) for w, m in weights.items()}


def validation_log(results):
    """log.txt entries: `<dataset>_<metric>` for the live weights, `<weights>_<dataset>_<metric>` else;
    a set validated with its shift splits also `<dataset>_shift_mean_top1`."""
    catalog = zeroshot.load_catalog()[0]
    log = {}
    for w, per_set in results.items():
        prefix = '' if w == 'live' else f'{w}_'
        log.update({f'{prefix}{n}_{k}': v for n, r in per_set.items() for k, v in r.items()})
        for base, shifts in zeroshot.shift_groups(per_set, catalog).items():
            log[f'{prefix}{base}_shift_mean_top1'] = zeroshot.shift_mean(per_set, shifts)
    return log


def best_of(results, dataset):
    """{'top1', 'weights'}: the best top-1 on `dataset` among the weights validated (live first)."""
    return max(({'top1': r[dataset]['top1'], 'weights': w} for w, r in results.items()),
               key=lambda b: b['top1'])


def init_wandb(args):
    if not (args.wandb and utils.is_main_process()):
        return None
    import wandb
    if args.offline:
        os.environ['WANDB_MODE'] = 'offline'
    return wandb.init(project='vlp-baselines', name=args.name, config=plain_args(args),
                      dir=args.output_dir, resume='allow',
                      id=hashlib.md5(os.path.abspath(args.output_dir).encode()).hexdigest()[:12])


if __name__ == '__main__':
    main()
