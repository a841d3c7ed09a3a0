"""Linear probe: logistic regression on a checkpoint's frozen image features (CLIP, SLIP,
CLIP_benchmark's `linear_probe`).

    python eval_linear.py --resume output/checkpoint_best.pt --train-dir data/imagenet/train \
        --val-dir data/imagenet/val --head backbone --output linear.json
    python eval_linear.py --resume CKPT --dataset cifar10 --data-root data   # a catalog entry
    python eval_linear.py --resume output/checkpoint_best.pt --dataset shapes # no download

Features of the training set and of the evaluation set (`--val-dir`, ImageNet's `val`) are
extracted once with the evaluation transform (no augmentation) and standardised with the
training set's mean and std. A multinomial logistic regression (mean cross-entropy +
wd/2 ||W||^2, bias not decayed) is fit full-batch with L-BFGS for every weight decay of
`--wd-grid` on the training set minus a stratified held-out split (`--holdout-fraction`);
the weight decay with the best held-out top-1 (ties: the largest) is refit on the whole
training set and evaluated once on the evaluation set. Results (percent) go to stdout and,
with `--output`, to a JSON file.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import checkpoint
import datasets
import evalsets
import utils
import zeroshot

HEADS = ('z', 'h', 'backbone')
DEFAULT_WD_GRID = tuple(10.0 ** k for k in range(-6, 1))   # 1e-6 ... 1


def get_args_parser():
    parser = argparse.ArgumentParser('vlp-baselines linear probe', add_help=False)
    g = parser.add_argument_group('model')
    g.add_argument('--resume', '--checkpoint', dest='resume', required=True,
                   help='checkpoint written by main.py')
    g.add_argument('--head', default='backbone', choices=HEADS,
                   help='features: backbone = pooled image-tower output before any projection '
                        '(CLIP / SLIP linear probes); z = the CLIP embedding; h = the CL2L view '
                        'embedding (CL2L checkpoints only). z/h are L2-normalised as zero-shot uses them')
    g.add_argument('--image-size', type=int, default=None, help='input resolution (default: the training size)')
    g = parser.add_argument_group('data')
    g.add_argument('--train-dir', default='', help='ImageFolder the classifier is trained on (e.g. imagenet/train)')
    g.add_argument('--val-dir', default='', help='ImageFolder the probe is evaluated on (e.g. imagenet/val); '
                                                 'the same class folders as --train-dir')
    g.add_argument('--dataset', default='', help='instead of the two folders: a catalog entry with a known '
                                                 'training split (shapes, cifar10, imagenet, ...)')
    g.add_argument('--data-root', default=os.environ.get('VLP_EVAL_DATA', 'data'),
                   help='root of the catalog datasets (default: $VLP_EVAL_DATA or ./data)')
    g.add_argument('--shapes-num-train', type=int, default=10000, help='training images of --dataset shapes (10000)')
    g.add_argument('--batch-size', type=int, default=256, help='images per feature-extraction batch (256)')
    g.add_argument('-j', '--workers', type=int, default=0, help='data-loading processes (0; 8 on a GPU node)')
    g = parser.add_argument_group('classifier')
    g.add_argument('--wd-grid', type=float, nargs='+', default=list(DEFAULT_WD_GRID),
                   help='weight decays (L2 on W, per sample) tried on the held-out split '
                        '(default 1e-6 1e-5 ... 1)')
    g.add_argument('--holdout-fraction', type=float, default=0.2,
                   help='fraction of each training class held out to choose the weight decay (0.2)')
    g.add_argument('--max-iter', type=int, default=1000, help='L-BFGS iterations per fit (1000)')
    g.add_argument('--seed', type=int, default=0, help='seed of the held-out split')
    g.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'],
                   help='feature extraction and fits (auto = cuda if available)')
    g.add_argument('--output', default='', help='write the results as JSON here')
    return parser


# ----------------------------------------------------------------------------- model

def check_head(model, head):
    valid = (*zeroshot.model_heads(model), 'backbone')
    if head not in valid:
        raise ValueError(f"--head {head}: {getattr(model, 'model_name', 'this model')} has heads "
                         f"{', '.join(valid)}")


# ----------------------------------------------------------------------------- data

def image_folder(path, image_size, flag, transform=None):
    """ImageFolder as {'image', 'label'} samples (evaluation transform by default); `.classes`
    are the folder names in sorted order."""
    if not path or not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r}: not a directory (an ImageFolder: one sub-folder per class)")
    try:
        folder = evalsets.image_folder(path, transform or evalsets.RGBTransform(image_size))
    except (FileNotFoundError, RuntimeError) as e:
        raise ValueError(f"{flag} {path}: {str(e).splitlines()[0]}") from None
    dataset = evalsets.Labeled(folder)
    dataset.classes = list(folder.classes)
    return dataset


def folder_pair(train_dir, val_dir, image_size, train_transform=None):
    """(train, test, class folder names); both folders must hold the same classes."""
    train = image_folder(train_dir, image_size, '--train-dir', train_transform)
    test = image_folder(val_dir, image_size, '--val-dir')
    if train.classes != test.classes:
        only = sorted(set(train.classes) ^ set(test.classes))
        raise ValueError(f"--train-dir and --val-dir have different class folders "
                         f"(e.g. {', '.join(only[:5]) or 'another order'})")
    return train, test, train.classes


class ShapesTrain(Dataset):
    """Labelled images of the shapes *training* split (the catalog's `shapes` is the held-out one)."""

    def __init__(self, n, image_size):
        self.data, self.images = datasets.shapes_split('train', n, image_size)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return {'image': datasets.normalize_uint8(self.images[i]), 'label': int(self.data.labels[i])}


def _train_source(source):
    """The training-split counterpart of a catalog source, or None when unknown."""
    kind, kwargs = source['type'], source.get('kwargs', {})
    if kind == 'torchvision' and kwargs.get('train') is False:
        return dict(source, kwargs=dict(kwargs, train=True))
    if kind == 'torchvision' and kwargs.get('split') in ('test', 'val'):
        return dict(source, kwargs=dict(kwargs, split='train'))
    if kind in ('filelist', 'wds') and source.get('split', 'test') in ('test', 'val'):
        return dict(source, split='train')
    if kind == 'tfds' and source.get('split', 'validation') in ('validation', 'test'):
        return dict(source, split='train')
    path = source.get('path', '').rstrip('/')
    if kind == 'imagefolder' and os.path.basename(path) in ('val', 'test'):
        return dict(source, path=os.path.join(os.path.dirname(path), 'train'))
    return None


def catalog_pair(name, data_root, image_size, shapes_num_train=10000):
    """(train, test, class names) for a catalog entry whose training split is known."""
    catalog, labels, templates = zeroshot.load_catalog()
    if name not in catalog:
        raise ValueError(f"--dataset {name}: unknown; valid: {', '.join(catalog)}")
    entry, task = catalog[name], evalsets.task_of(catalog[name])
    if task != 'zeroshot_classification':
        raise ValueError(f"--dataset {name}: a retrieval set; the linear probe needs class labels")
    if entry['type'] == 'shapes':
        test, classes, _ = evalsets.build(name, entry, image_size, task, labels.get(name), templates.get(name))
        return ShapesTrain(shapes_num_train, image_size), test, classes
    train_sources = [s for s in map(_train_source, evalsets.sources(entry)) if s]
    if not train_sources:
        raise ValueError(f"--dataset {name}: no known training split in the catalog; "
                         f"pass --train-dir and --val-dir")
    pair = []
    for split, e in (('train', dict(train_sources[0], fallbacks=train_sources[1:])), ('test', entry)):
        source, path = evalsets.locate(name, e, data_root)
        if source is None:
            raise ValueError(f"--dataset {name}: {split} split not found at {path} (set --data-root)")
        pair.append(evalsets.build(name, source, image_size, task, labels.get(name), templates.get(name)))
    (train, classes, _), (test, _, _) = pair
    return train, test, classes


# ----------------------------------------------------------------------------- features

def image_features(model, images, head):
    """[B, D] features of one head: 'backbone' = pooled tower output, 'z'/'h' = normalised embeddings."""
    if head == 'backbone':
        return model.image_features(images)
    return zeroshot.encode_image(model, images, head)


@torch.no_grad()
def extract_features(model, dataset, head, device, batch_size=256, workers=0, desc='features'):
    """(features [N, D] float32 on the CPU, labels [N] int64) of a dataset of {'image', 'label'}."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=evalsets.collate,
                        pin_memory=device.type == 'cuda')
    feats, labels = [], []
    try:
        for batch in tqdm(loader, desc=desc, mininterval=2, leave=False):
            feats.append(image_features(model, batch['image'].to(device, non_blocking=True), head).float().cpu())
            labels.append(batch['label'].cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError(f"{desc}: no images")
    return torch.cat(feats), torch.cat(labels).long()


def standardize(train, *others, eps=1e-6):
    """Train-set mean/std standardisation applied to every tensor given."""
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(eps)
    return [(x - mean) / std for x in (train, *others)]


# ----------------------------------------------------------------------------- classifier

def logreg_loss(x, y, weight, bias, wd):
    """mean cross-entropy + wd / 2 ||W||^2 (bias not decayed)."""
    return F.cross_entropy(x @ weight.t() + bias, y) + 0.5 * wd * weight.pow(2).sum()


def fit_logreg(x, y, num_classes, wd, max_iter=1000, init=None):
    """Multinomial logistic regression by full-batch L-BFGS -> (weight [C, D], bias [C]).
    `init` (weight, bias) warm-starts the fit."""
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    if init is not None:
        weight.copy_(init[0])
        bias.copy_(init[1])
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = logreg_loss(x, y, weight, bias, wd)
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def predict(x, weight, bias):
    return x @ weight.t() + bias                                           # [N, C] logits


def holdout_split(labels, fraction, seed=0):
    """Stratified split -> (fit indices, held-out indices): round(fraction * n_c) samples of
    each class held out, at least one kept for fitting."""
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        held.append(idx[:k])
        fit.append(idx[k:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def top1(logits, labels):
    return float((logits.argmax(dim=1) == labels).float().mean()) if len(labels) else float('nan')


def sweep_wd(x, y, num_classes, grid, fraction=0.2, seed=0, max_iter=1000):
    """Fit on the training split for every weight decay (largest first, warm-started), score
    on the held-out split -> (best wd, {wd: held-out top-1}, fit state of the best)."""
    fit_idx, held_idx = holdout_split(y, fraction, seed)
    if len(held_idx) == 0:
        raise ValueError("the held-out split is empty: too few training images per class "
                         "(raise --holdout-fraction or give one weight decay in --wd-grid)")
    scores, state, states = {}, None, {}
    for wd in sorted(set(grid), reverse=True):
        state = fit_logreg(x[fit_idx], y[fit_idx], num_classes, wd, max_iter, init=state)
        scores[wd] = top1(predict(x[held_idx], *state), y[held_idx])
        states[wd] = state
    best = max(scores, key=lambda wd: (scores[wd], wd))             # ties: the largest decay
    return best, scores, states[best]


def linear_probe(train_x, train_y, test_x, test_y, num_classes, grid=DEFAULT_WD_GRID,
                 fraction=0.2, seed=0, max_iter=1000):
    """Standardise, choose the weight decay on a held-out split (skipped for a one-value grid),
    refit on all training features, evaluate -> dict (metrics in percent)."""
    if min(grid) < 0:
        raise ValueError("--wd-grid values must be >= 0")
    train_x, test_x = standardize(train_x, test_x)
    grid = sorted(set(float(w) for w in grid))
    if len(grid) > 1:
        best, scores, init = sweep_wd(train_x, train_y, num_classes, grid, fraction, seed, max_iter)
    else:
        best, scores, init = grid[0], {}, None
    weight, bias = fit_logreg(train_x, train_y, num_classes, best, max_iter, init=init)
    logits = predict(test_x, weight, bias).cpu()
    metrics = zeroshot.to_percent(zeroshot.classification_metrics(logits, test_y.cpu()),
                                  'zeroshot_classification')
    return {'best_wd': best, 'holdout_top1': {str(k): 100 * v for k, v in sorted(scores.items())},
            'train_top1': 100 * top1(predict(train_x, weight, bias), train_y), **metrics,
            'weight': weight, 'bias': bias}


# ----------------------------------------------------------------------------- main

def resolve_data(args, image_size):
    if args.dataset and (args.train_dir or args.val_dir):
        raise ValueError("give either --dataset or --train-dir/--val-dir, not both")
    if args.dataset:
        return catalog_pair(args.dataset, args.data_root, image_size, args.shapes_num_train)
    if not (args.train_dir and args.val_dir):
        raise ValueError("give --train-dir and --val-dir (ImageFolders), or --dataset NAME")
    return folder_pair(args.train_dir, args.val_dir, image_size)


def main(argv=None):
    parser = utils.OneLineErrorParser('eval_linear.py', parents=[get_args_parser()])
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        utils.check_counts(args, positive=['batch_size', 'max_iter', 'image_size', 'shapes_num_train'],
                           non_negative=['workers'])
        if not 0 <= args.holdout_fraction < 1:
            raise ValueError("--holdout-fraction must be in [0, 1)")
        if args.output:
            utils.check_output_path(args.output, '--output')
        ckpt = checkpoint.load_model_checkpoint(args.resume)
        image_size = args.image_size or ckpt['args']['image_size']
        device = torch.device('cuda' if args.device == 'cuda' or (
            args.device == 'auto' and torch.cuda.is_available()) else 'cpu')
        model = checkpoint.load_model(ckpt, image_size, device)
        check_head(model, args.head)
        train_set, test_set, classes = resolve_data(args, image_size)
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.error(str(e))
    t0 = time.time()
    train_x, train_y = extract_features(model, train_set, args.head, device, args.batch_size,
                                        args.workers, 'train features')
    test_x, test_y = extract_features(model, test_set, args.head, device, args.batch_size,
                                      args.workers, 'test features')
    t_feat = time.time() - t0
    print(f"features ({args.head}): train {tuple(train_x.shape)}, test {tuple(test_x.shape)} in {t_feat:.0f} s")
    num_classes = len(classes)
    result = linear_probe(train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device),
                          num_classes, args.wd_grid, args.holdout_fraction, args.seed, args.max_iter)
    result.pop('weight'), result.pop('bias')
    for wd, acc in result['holdout_top1'].items():
        print(f"wd {float(wd):.0e}: held-out top-1 {acc:.1f}%")
    print(f"linear probe top-1 {result['top1']:.1f}% (wd {result['best_wd']:.0e}, {num_classes} classes, "
          f"{len(test_y)} test images; train top-1 {result['train_top1']:.1f}%)")
    record = {'checkpoint': args.resume, 'model': ckpt['model_name'], 'head': args.head,
              'image_size': image_size, 'dataset': args.dataset or None,
              'train_dir': args.train_dir or None, 'val_dir': args.val_dir or None,
              'num_classes': num_classes, 'num_train': len(train_y), 'num_test': len(test_y),
              'feature_dim': train_x.shape[1], 'wd_grid': sorted(args.wd_grid),
              'holdout_fraction': args.holdout_fraction, 'seed': args.seed,
              'feature_time_s': t_feat, 'total_time_s': time.time() - t0,
              **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result.items()}}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, 'w') as f:
            json.dump(record, f, indent=2)
    return record


if __name__ == '__main__':
    main()
