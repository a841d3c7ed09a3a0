"""Zero-shot evaluation of a checkpoint over dataset_catalog.json: classification, retrieval,
several resolutions, text features cached on disk, CLIP_benchmark-compatible result files.

    python eval_zeroshot.py --resume output/checkpoint_best.pt --data-root /datasets
    python eval_zeroshot.py --resume CKPT --datasets 'imagenet*' cifar10 --resolutions 160 192 224 256 288
    python eval_zeroshot.py clip_benchmark eval --model_type vlp_baselines --pretrained CKPT \
        --model z --dataset cifar10 --dataset_root data/cifar10     # CLIP_benchmark's own CLI

Every catalog entry present under --data-root is evaluated; a missing one is reported as
`skipped: not found at PATH` and the sweep continues. Writes one JSON per (model, dataset,
resolution) with CLIP_benchmark's keys (`python -m clip_benchmark.cli build DIR/*.json` merges them), a CSV,
and prints a summary table.
"""
import argparse
import csv
import json
import math
import os
import sys

import torch

import checkpoint
import engine
import evalsets
import towers
import utils
import zeroshot

CB_MODEL_TYPE = 'vlp_baselines'


def get_args_parser():
    parser = argparse.ArgumentParser('vlp-baselines zero-shot evaluation', add_help=False)
    parser.add_argument('--resume', required=True, help='checkpoint written by main.py')
    parser.add_argument('--use-ema', action='store_true',
                        help="evaluate the checkpoint's EMA weights (main.py --model-ema); result files "
                             "are named <checkpoint>-ema_..., the default --output-dir is zeroshot-ema/")
    parser.add_argument('--data-root', default=os.environ.get('VLP_EVAL_DATA', 'data'),
                        help='directory holding the catalog datasets (default: $VLP_EVAL_DATA or ./data)')
    parser.add_argument('--datasets', nargs='+', default=['*'],
                        help="catalog entries or shell patterns, e.g. 'imagenet*' cifar10 (default: all)")
    parser.add_argument('--path', action='append', default=[], metavar='NAME=PATH',
                        help='override the path of one entry, e.g. imagenet=/data/ILSVRC/val (repeatable)')
    parser.add_argument('--resolutions', type=int, nargs='+', default=None,
                        help='evaluation resolutions, e.g. 160 192 224 256 288 (default: the training size)')
    parser.add_argument('--image-size', type=int, default=None, help='one evaluation resolution (alias)')
    parser.add_argument('--batch-size', type=int, default=256, help='images per batch (256)')
    parser.add_argument('-j', '--workers', type=int, default=0, help='data-loading processes (0; 8 on a GPU node)')
    parser.add_argument('--classes-per-batch', type=int, default=zeroshot.CLASSES_PER_BATCH,
                        help='N: each text-tower call encodes N x (number of templates) prompts, sorted '
                             f'by token length; bounds memory (default {zeroshot.CLASSES_PER_BATCH})')
    parser.add_argument('--cache-dir', default=None,
                        help='on-disk text-feature cache keyed by (checkpoint hash, class names, templates, '
                             'context length); a second run skips the text tower '
                             '(default: $XDG_CACHE_HOME/vlp-baselines/text_cache, ~/.cache/... without it)')
    parser.add_argument('--no-cache', action='store_true', help='do not read or write the text-feature cache')
    parser.add_argument('--output-dir', default=None,
                        help='one JSON per (model, dataset, resolution) and results.csv go here '
                             '(default: zeroshot/ beside the checkpoint)')
    parser.add_argument('--output', default='', help='also write all results as one JSON file here')
    parser.add_argument('--catalog', default=None, help='catalog JSON (default: dataset_catalog.json)')
    parser.add_argument('--labels', default=None, help='class names JSON (default: labels.json)')
    parser.add_argument('--templates', default=None, help='prompt templates JSON (default: templates.json)')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto = cuda if available')
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'amp'],
                        help='fp32 (default: bit-comparable with CLIP_benchmark --no_amp); bf16: autocast to '
                             'bfloat16 (3.4x faster image pass on a CPU with AMX bf16 units, slower on CPUs '
                             'without them); amp: float16 autocast, CUDA only. Reduced precision can change '
                             'a few predictions; the text cache keeps its features apart')
    return parser


# ----------------------------------------------------------------------------- CLIP_benchmark

class ClipBenchmarkModel(torch.nn.Module):
    """Our model the way CLIP_benchmark calls models: `encode_image(images)` and
    `encode_text(tokens)` on one zero-shot head."""

    def __init__(self, model, head='z'):
        super().__init__()
        self.model, self.head = model, head

    def encode_image(self, images):
        return zeroshot.encode_image(self.model, images, self.head)

    def encode_text(self, tokens):
        return zeroshot.encode_text(self.model, tokens, self.head)


def load_for_clip_benchmark(model_name='z', pretrained='', cache_dir=None, device='cpu'):
    """CLIP_benchmark loader: `--model HEAD[@SIZE] --pretrained CKPT` -> (model, transform,
    tokenizer), with the same transform and tokenizer as eval_zeroshot.py."""
    head, _, size = (model_name or 'z').partition('@')
    ckpt = checkpoint.load_model_checkpoint(pretrained, '--pretrained')
    image_size = int(size) if size else ckpt['args']['image_size']
    model = checkpoint.load_model(ckpt, image_size, device)
    if head not in zeroshot.model_heads(model):
        raise ValueError(f"head {head!r} not in {zeroshot.model_heads(model)}")
    return (ClipBenchmarkModel(model, head), evalsets.RGBTransform(image_size),
            towers.tokenizer_for(ckpt['args']))


def register_clip_benchmark():
    """Make `--model_type vlp_baselines` available to CLIP_benchmark in this process."""
    from clip_benchmark import models as cb_models
    cb_models.TYPE2FUNC[CB_MODEL_TYPE] = load_for_clip_benchmark
    if CB_MODEL_TYPE not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(CB_MODEL_TYPE)


def clip_benchmark_main(argv):
    register_clip_benchmark()
    from clip_benchmark import cli
    sys.argv = ['clip_benchmark', *argv]
    return cli.main()


# ----------------------------------------------------------------------------- outputs

def result_record(r, ckpt_path, ckpt, sha, image_size, heads):
    """One result as CLIP_benchmark writes it, plus our keys."""
    return {'dataset': r.name, 'model': ckpt['model_name'], 'pretrained': ckpt_path,
            'task': r.task, 'metrics': r.metrics, 'language': 'en', 'resolution': image_size,
            'num_samples': r.num_samples, 'num_unreadable': len(r.unreadable), 'heads': list(heads),
            'checkpoint_sha256': sha,
            'source': {'type': r.source.get('type'), 'path': r.source.get('path')}}


def json_name(r, ckpt_path, model_name, image_size, ema=False):
    slug = os.path.splitext(os.path.basename(ckpt_path))[0] + ('-ema' if ema else '')
    return f'{r.name}_{slug}_{model_name}_{image_size}px_{r.task}.json'


def fmt(x):
    return '   n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:6.1f}'


def summary_table(rows, catalog):
    """Rows (image_size, Result) -> printable table of the primary metric, top-1, top-5."""
    lines = [f"{'dataset':<22}{'res':>5}  {'metric':<22}{'value':>7}{'top-1':>7}{'top-5':>7}"]
    reported = set()
    for image_size, r in rows:
        if r.skipped:
            if r.name not in reported:                    # once, not per resolution
                lines.append(f"{r.name:<22}{'':>5}  skipped: {r.skipped}")
            reported.add(r.name)
            continue
        p = r.percent()
        metric = zeroshot.primary_metric(catalog[r.name])
        lines.append(f"{r.name:<22}{image_size:>5}  {metric:<22}{fmt(p.get(metric)):>7}"
                     f"{fmt(p.get('top1')):>7}{fmt(p.get('top5')):>7}")
        for variant in ('h', 'zh0.5'):
            if f'{variant}_top1' in p:
                lines.append(f"{'  ' + variant:<22}{'':>5}  {'':<22}"
                             f"{fmt(p.get(f'{variant}_{metric}')):>7}{fmt(p[f'{variant}_top1']):>7}"
                             f"{fmt(p.get(f'{variant}_top5')):>7}")
    return '\n'.join(lines)


def write_csv(path, rows, catalog):
    keys = []
    for _, r in rows:
        keys += [k for k in r.percent() if k not in keys]
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['dataset', 'display', 'resolution', 'task', 'status', 'metric', 'value', *keys])
        for image_size, r in rows:
            p = {} if r.skipped else r.percent()
            metric = zeroshot.primary_metric(catalog[r.name])
            writer.writerow([r.name, catalog[r.name].get('display', r.name), image_size, r.task,
                             r.skipped and f'skipped: {r.skipped}' or 'ok', metric,
                             p.get(metric, ''), *[p.get(k, '') for k in keys]])


# ----------------------------------------------------------------------------- main

def parse_paths(items):
    paths = {}
    for item in items:
        name, sep, path = item.partition('=')
        if not sep or not name or not path:
            raise ValueError(f"--path expects NAME=PATH, got {item!r}")
        paths[name] = path
    return paths


def default_cache_dir():
    """$XDG_CACHE_HOME/vlp-baselines/text_cache: it works for a checkpoint in a read-only
    directory and serves every checkpoint (the cache keys hold the checkpoint's SHA-256)."""
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'vlp-baselines', 'text_cache')


def text_cache(sha, args):
    """The text-feature cache; in memory only (one warning line) if its directory is not writable."""
    if args.no_cache:
        return zeroshot.TextCache(sha, None)
    directory = os.path.expanduser(args.cache_dir or default_cache_dir())
    try:
        utils.check_output_path(directory, '--cache-dir', is_dir=True)
    except ValueError as e:
        print(f"warning: {e}; text features are not cached")
        directory = None
    return zeroshot.TextCache(sha, directory)


def check_outputs(args, parser):
    """A one-line parser error unless every result file can be written (fills --output-dir)."""
    default = '' if args.output_dir else ' (the default, beside the checkpoint; pass --output-dir DIR)'
    args.output_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.resume)),
                                                      'zeroshot-ema' if args.use_ema else 'zeroshot')
    try:
        utils.check_output_path(args.output_dir, '--output-dir', is_dir=True)
    except ValueError as e:
        parser.error(f"{e}{default}")
    try:
        if args.output:
            utils.check_output_path(args.output, '--output')
    except ValueError as e:
        parser.error(str(e))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['clip_benchmark']:
        return clip_benchmark_main(argv[1:])
    parser = utils.OneLineErrorParser('eval_zeroshot.py', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        utils.check_counts(args, positive=['batch_size', 'classes_per_batch', 'image_size'],
                           non_negative=['workers'])
        catalog, _, _ = zeroshot.load_catalog(args.catalog, args.labels, args.templates)
        names = zeroshot.expand_names(args.datasets, catalog)
        paths = parse_paths(args.path)
        ckpt = checkpoint.load_model_checkpoint(args.resume, use_ema=args.use_ema)
        resolutions = args.resolutions or [args.image_size or ckpt['args']['image_size']]
        if min(resolutions) <= 0 or args.batch_size <= 0 or args.classes_per_batch <= 0:
            raise ValueError('--resolutions, --batch-size and --classes-per-batch must be > 0')
        first_model = checkpoint.load_model(ckpt, resolutions[0])   # fails early on a bad checkpoint
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.error(str(e))
    device = torch.device('cuda' if args.device == 'cuda' or (
        args.device == 'auto' and torch.cuda.is_available()) else 'cpu')
    try:
        engine.check_precision(args.precision, cuda=device.type == 'cuda')
    except ValueError as e:
        parser.error(str(e))
    check_outputs(args, parser)                                 # before the evaluation, not after it
    sha = checkpoint.file_sha256(args.resume)
    # keyed by the weights and the arithmetic used (fp32 keys are those of earlier versions)
    cache = text_cache(sha + ('-ema' if args.use_ema else '') +
                       ('' if args.precision == 'fp32' else f'-{args.precision}'), args)
    tokenizer = towers.tokenizer_for(ckpt['args'])     # CLIP BPE, or the --text-tower's own
    os.makedirs(args.output_dir, exist_ok=True)
    rows, by_resolution = [], {}
    for i, image_size in enumerate(resolutions):
        if i == 0:                                  # built once above, not twice
            model, first_model = first_model.to(device), None
        else:
            model = checkpoint.load_model(ckpt, image_size, device)
        with engine.autocast(device, args.precision):
            results = zeroshot.run(model, names, tokenizer, device, image_size, args.batch_size,
                                   args.workers, args.data_root, paths, cache, args.classes_per_batch,
                                   skip_missing=True, catalog=args.catalog, labels=args.labels,
                                   templates=args.templates)
        for r in results.values():
            rows.append((image_size, r))
            if r.skipped:
                if image_size == resolutions[0]:
                    print(f"{r.name}: skipped: {r.skipped}")
                continue
            record = dict(result_record(r, args.resume, ckpt, sha, image_size, zeroshot.model_heads(model)),
                          weights='ema' if args.use_ema else 'live', precision=args.precision)
            name = json_name(r, args.resume, ckpt['model_name'], image_size, args.use_ema)
            with open(os.path.join(args.output_dir, name), 'w') as f:
                json.dump(record, f, indent=1)
        by_resolution[image_size] = {n: ({'skipped': r.skipped} if r.skipped else r.percent())
                                     for n, r in results.items()}
    if all(r.skipped for _, r in rows):
        raise SystemExit(f"eval_zeroshot.py: error: nothing was evaluated: all {len(names)} dataset(s) "
                         f"were skipped (see above); check --data-root {args.data_root} or pass --path NAME=PATH")
    write_csv(os.path.join(args.output_dir, 'results.csv'), rows, catalog)
    print(f"text features: {cache.hits} from cache, {cache.misses} computed")
    print(summary_table(rows, catalog))
    first = by_resolution[resolutions[0]]
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, 'w') as f:
            json.dump({'checkpoint': args.resume, 'model': ckpt['model_name'], 'results': first,
                       'by_resolution': {str(k): v for k, v in by_resolution.items()}}, f, indent=2)
    return first


if __name__ == '__main__':
    main()
