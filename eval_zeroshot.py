"""Zero-shot evaluation of a checkpoint over entries of dataset_catalog.json.

    python eval_zeroshot.py --resume output/checkpoint_best.pt --datasets shapes
"""
import argparse
import json
import os

import torch

import datasets
import models
import utils
import zeroshot


def get_args_parser():
    parser = argparse.ArgumentParser('vlp-baselines zero-shot evaluation', add_help=False)
    parser.add_argument('--resume', required=True, help='checkpoint written by main.py')
    parser.add_argument('--datasets', nargs='+', default=['shapes'],
                        help='catalog entries to evaluate (dataset_catalog.json)')
    parser.add_argument('--image-size', type=int, default=None,
                        help='evaluation resolution (default: the training resolution)')
    parser.add_argument('--batch-size', type=int, default=256, help='images per batch')
    parser.add_argument('-j', '--workers', type=int, default=0, help='data-loading processes')
    parser.add_argument('--output', default='', help='write the results as JSON here')
    return parser


def main(argv=None):
    parser = utils.OneLineErrorParser('eval_zeroshot.py', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        zeroshot.check_names(args.datasets)
        ckpt = utils.load_checkpoint(args.resume)
        model = models.create_model_from_flags(ckpt['model_name'], ckpt['args'])
    except (ValueError, FileNotFoundError, KeyError) as e:
        parser.error(str(e))
    model.load_state_dict(ckpt['model'])
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model.to(device)
    image_size = args.image_size or ckpt['args']['image_size']
    tokenizer = datasets.Tokenizer(ckpt['args'].get('context_length', 77))
    results = zeroshot.evaluate(model, args.datasets, tokenizer, device, image_size,
                                batch_size=args.batch_size, workers=args.workers)
    print(f"{'dataset':<24}{'top-1':>8}{'top-5':>8}")
    for name, r in results.items():
        print(f"{name:<24}{r['top1']:>8.1f}{r['top5']:>8.1f}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, 'w') as f:
            json.dump({'checkpoint': args.resume, 'model': ckpt['model_name'],
                       'results': results}, f, indent=2)
    return results


if __name__ == '__main__':
    main()
