"""Zero-shot predictions for your own images: top-5 classes per image, optionally a figure.

    python demo_zeroshot.py --checkpoint output/checkpoint_best.pt --img-dir my_photos --show-prediction
    python demo_zeroshot.py --checkpoint CKPT --img-path cat.jpg --classes cat,dog,truck

Class names default to CIFAR-100's (labels.json) with its prompt templates; `--classes a,b,c`
uses your own names with the same templates. With --show-prediction a PNG is saved: one row
per image, the image beside a bar chart of its top-5 class probabilities.
"""
import argparse
import os

import torch

import augment
import checkpoint
import evalsets
import towers
import utils
import zeroshot

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
ROW_INCHES, WIDTH_INCHES, DPI = 2.0, 8.0, 100


def get_args_parser():
    parser = argparse.ArgumentParser('vlp-baselines zero-shot demo', add_help=False)
    parser.add_argument('--checkpoint', required=True, help='checkpoint written by main.py')
    parser.add_argument('--use-ema', action='store_true',
                        help="use the checkpoint's EMA weights (main.py --model-ema)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument('--img-path', nargs='+', help='one or more image files')
    where.add_argument('--img-dir', help='every image file in this folder (sorted)')
    parser.add_argument('--classes', default='', help="comma-separated class names (default: CIFAR-100's)")
    parser.add_argument('--labels-from', default='cifar100',
                        help='labels.json / templates.json entry for the default classes and the templates (cifar100)')
    parser.add_argument('--template', action='append', default=[],
                        help="prompt template with {} for the class, e.g. 'a photo of a {}.' (repeatable; "
                             "default: the templates of --labels-from)")
    parser.add_argument('--image-size', type=int, default=None, help='resolution (default: the training size)')
    parser.add_argument('--head', default='z', help="zero-shot head ('z'; CL2L also 'h')")
    parser.add_argument('--topk', type=int, default=5, help='classes shown per image (5)')
    parser.add_argument('--show-prediction', action='store_true', help='save the figure as a PNG')
    parser.add_argument('--output', default='zeroshot_demo.png', help='figure path (zeroshot_demo.png)')
    return parser


def image_paths(args):
    if args.img_path:
        return list(args.img_path)
    return sorted(os.path.join(args.img_dir, f) for f in os.listdir(args.img_dir)
                  if f.lower().endswith(IMAGE_EXTS))


@torch.no_grad()
def predict(model, head, images, classnames, templates, tokenizer, image_size, topk):
    """[(probabilities [k], class indices [k])] per PIL image, softmax over all classes."""
    weights = zeroshot.cached_classifier(model, head, classnames, templates, tokenizer, 'cpu')
    pixels = torch.stack([augment.eval_transform(image_size)(im) for im in images])
    features = zeroshot.encode_image(model, pixels, head)
    scale = model.logit_scale.exp() if hasattr(model, 'logit_scale') else torch.tensor(100.)
    probs = (scale * features @ weights.t()).softmax(dim=-1)                     # [N, C]
    top = probs.topk(min(topk, len(classnames)), dim=-1)
    return list(zip(top.values, top.indices))


def label(name):
    return name[0] if isinstance(name, list) else name


def save_figure(path, images, predictions, classnames):
    """One row per image: the image, then a horizontal bar chart of its top-k probabilities."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n = len(images)
    fig, axes = plt.subplots(n, 2, figsize=(WIDTH_INCHES, ROW_INCHES * n), dpi=DPI,
                             squeeze=False, gridspec_kw={'width_ratios': [1, 1.6]})
    for row, (image, (p, idx)) in enumerate(zip(images, predictions)):
        axes[row, 0].imshow(image)
        axes[row, 0].axis('off')
        names = [label(classnames[i]) for i in idx.tolist()]
        ax = axes[row, 1]
        ax.barh(range(len(names)), p.tolist(), color='tab:blue')
        for y, q in enumerate(p.tolist()):
            ax.text(q, y, f' {100 * q:.1f}%', va='center', fontsize=8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlim(0, min(1.0, 1.25 * max(float(p.max()), 1e-3)))
        ax.set_xlabel('probability')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    panels = len(fig.axes)
    plt.close(fig)
    return panels


def main(argv=None):
    parser = utils.OneLineErrorParser('demo_zeroshot.py', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    _, labels, templates = zeroshot.load_catalog()
    try:
        if args.labels_from not in labels:
            raise ValueError(f"--labels-from {args.labels_from!r} not in labels.json; valid: {', '.join(labels)}")
        classnames = ([c.strip() for c in args.classes.split(',') if c.strip()] if args.classes
                      else labels[args.labels_from])
        prompts = args.template or templates[args.labels_from]
        if not classnames or any('{}' not in t for t in prompts):
            raise ValueError('need at least one class, and templates holding {}')
        paths = image_paths(args)
        if not paths:
            raise ValueError(f'no image files in {args.img_dir}')
        ckpt = checkpoint.load_model_checkpoint(args.checkpoint, '--checkpoint', use_ema=args.use_ema)
        image_size = args.image_size or ckpt['args']['image_size']
        model = checkpoint.load_model(ckpt, image_size)
        if args.head not in zeroshot.model_heads(model):
            raise ValueError(f"--head {args.head!r}; valid: {', '.join(zeroshot.model_heads(model))}")
        images = [evalsets.pil_rgb(p) for p in paths]
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        parser.error(str(e))
    tokenizer = towers.tokenizer_for(ckpt['args'])     # CLIP BPE, or the --text-tower's own
    predictions = predict(model, args.head, images, classnames, prompts, tokenizer, image_size, args.topk)
    out = []
    for path, (p, idx) in zip(paths, predictions):
        ranked = [(label(classnames[i]), float(q)) for q, i in zip(p.tolist(), idx.tolist())]
        out.append({'image': path, 'top': ranked})
        print(f"{path}: " + '  '.join(f"{k + 1}. {name} {100 * q:.1f}%" for k, (name, q) in enumerate(ranked)))
    result = {'predictions': out}
    if args.show_prediction:
        result['panels'] = save_figure(args.output, images, predictions, classnames)
        result['figure'] = args.output
        print(f"figure: {args.output}")
    return result


if __name__ == '__main__':
    main()
