"""The zero-shot text classifier (class names x prompt templates through the text tower), three
ways on the same model, interleaved round by round in one process:

  per class:          the prompts of --classes-per-batch classes per call, in class order, each call
                      trimmed to its longest prompt (what zeroshot.build_classifier did before);
  sorted:             the prompts sorted by token length, the same number per call
                      (zeroshot.build_classifier for a tower without shared prefixes);
  sorted + prefixes:  as sorted, each template's shared beginning run once and cached
                      (zeroshot.build_classifier on our causal text transformer: the default).

    python bench/text_classifier.py [--model CLIP_VITB32_CLIP] [--classes 100] [--templates 80] [--rounds 3]
    python bench/text_classifier.py --quick      # smoke run: the tiny CLIP, 10 classes x 8 templates

Prints wall and CPU seconds (min / median / max), the speed-up of the medians against `per class`,
the tokens each way runs through the tower, and the largest difference of the class embeddings
from `per class` (float rounding only).
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

import models  # noqa: E402
import text  # noqa: E402
import zeroshot  # noqa: E402
from loader_common import Clock, spread  # noqa: E402

WAYS = ('per class', 'sorted', 'sorted + prefixes')


@torch.no_grad()
def per_class(model, names, templates, tokenizer, classes_per_batch):
    """The reference: whole classes per call, in class order."""
    weights = []
    for start in range(0, len(names), classes_per_batch):
        prompts = [t.format(n) for n in names[start:start + classes_per_batch] for t in templates]
        emb = F.normalize(model.encode_text(tokenizer(prompts)).float(), dim=-1)
        for part in emb.split(len(templates)):
            mean = part.mean(dim=0)
            weights.append(mean / mean.norm())
    return torch.stack(weights)


def count_tokens(model):
    """-> a list that records the tokens of every text-tower call (rows x the longest prompt)."""
    encode, after_prefix, tokens_seen = model.encode_text, model.encode_text_after_prefix, []

    def encode_counted(tokens, **kwargs):
        tokens_seen.append(len(tokens) * int(zeroshot.token_lengths(tokens).max()))
        return encode(tokens, **kwargs)

    def after_prefix_counted(prefixes, which, rest, **kwargs):
        tokens_seen.append(len(rest) * int(zeroshot.token_lengths(rest).max()))
        return after_prefix(prefixes, which, rest, **kwargs)
    model.encode_text, model.encode_text_after_prefix = encode_counted, after_prefix_counted
    return tokens_seen


def build(way, model, names, templates, tokenizer, a):
    if way == 'per class':
        return per_class(model, names, templates, tokenizer, a.classes_per_batch)
    model.shares_text_prefix = (lambda: way == 'sorted + prefixes')
    return zeroshot.build_classifier(model, names, templates, tokenizer, 'cpu', a.classes_per_batch)


def main(argv=None):
    a = get_args(argv)
    torch.manual_seed(0)
    model = models.create_model(a.model).eval()
    if not model.shares_text_prefix():
        raise SystemExit(f"{a.model}: its text tower is not our causal transformer; choose a CLIP_* model")
    seen = count_tokens(model)
    names = json.load(open(os.path.join(ROOT, 'labels.json')))['imagenet'][:a.classes]
    templates = json.load(open(os.path.join(ROOT, 'templates.json')))['imagenet'][:a.templates]
    tokenizer = text.Tokenizer()
    times, tokens, weights = {w: [] for w in WAYS}, {}, {}
    for _ in range(a.rounds):
        for way in WAYS:
            seen.clear()
            clock = Clock()
            with clock(way):
                weights[way] = build(way, model, names, templates, tokenizer, a)
            times[way].append(clock.phases[way])
            tokens[way] = sum(seen)
    report(a, times, tokens, weights)
    return times, tokens, weights


def report(a, times, tokens, weights):
    print(f"\n{a.model} text tower, {a.classes} ImageNet classes x {a.templates} templates, "
          f"{a.classes_per_batch} x {a.templates} prompts per call, {a.rounds} rounds, "
          f"{torch.get_num_threads()} threads\n")
    print("| way | wall s (min / median / max) | CPU s (min / median / max) | speed-up (wall) "
          "| tokens through the tower | max abs difference from per class |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(w for w, _ in times['per class'])
    for way in WAYS:
        wall, cpu = [w for w, _ in times[way]], [c for _, c in times[way]]
        diff = (weights[way] - weights['per class']).abs().max().item()
        print(f"| {way} | {spread(wall, '{:.2f}')} | {spread(cpu, '{:.2f}')} | "
              f"{base / statistics.median(wall):.2f}x | {tokens[way]} | {diff:.1e} |", flush=True)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='CLIP_VITB32_CLIP', help='a CLIP_* model (random weights)')
    p.add_argument('--classes', type=int, default=100, help="the first N of ImageNet's class names")
    p.add_argument('--templates', type=int, default=80, help="the first N of ImageNet's 80 templates")
    p.add_argument('--classes-per-batch', type=int, default=zeroshot.CLASSES_PER_BATCH,
                   help="eval_zeroshot.py's --classes-per-batch")
    p.add_argument('--rounds', type=int, default=3, help='interleaved rounds (min / median / max)')
    p.add_argument('--quick', action='store_true', help='smoke run: CLIP_TINYCNN_CLIP, 10 classes x 8 templates, 1 round')
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.classes, a.templates, a.rounds = 'CLIP_TINYCNN_CLIP', 10, 8, 1
    if not 1 <= a.classes <= 1000 or not 1 <= a.templates <= 80 or min(a.classes_per_batch, a.rounds) < 1:
        p.error("--classes must be in 1..1000, --templates in 1..80 (ImageNet's), "
                "--classes-per-batch and --rounds >= 1")
    return a


if __name__ == '__main__':
    main()
