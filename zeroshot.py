"""Zero-shot classification shared by training-time validation (main.py) and eval_zeroshot.py:
one classifier builder (class names x templates -> averaged normalised text embeddings),
the catalog of downstream datasets, and the metrics."""
import json
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _read_json(name):
    with open(os.path.join(HERE, name)) as f:
        return json.load(f)


def load_catalog():
    """(catalog, labels, templates) from dataset_catalog.json, labels.json, templates.json."""
    return _read_json('dataset_catalog.json'), _read_json('labels.json'), _read_json('templates.json')


def check_names(names):
    """Raise ValueError naming the valid choices if a dataset is not in the catalog."""
    catalog = _read_json('dataset_catalog.json')
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise ValueError(f"unknown zero-shot dataset(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(catalog)}")


def build_eval_dataset(entry, image_size):
    if entry['type'] == 'shapes':
        return datasets.ShapesLabels(entry['num_samples'], image_size)
    raise ValueError(f"catalog type {entry['type']!r} not supported yet; valid: shapes")


@torch.no_grad()
def build_classifier(model, classnames, templates, tokenizer, device, **encode_kwargs):
    """[C, D] class embeddings: each class's template embeddings, normalised, averaged,
    normalised again. A class may be a list of synonyms (all averaged)."""
    weights = []
    for name in classnames:
        names = name if isinstance(name, list) else [name]
        prompts = [t.format(n) for n in names for t in templates]
        emb = model.encode_text(tokenizer(prompts).to(device), **encode_kwargs)  # [P, D]
        weights.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    return torch.stack(weights)


def accuracy(logits, labels, topk=(1, 5)):
    """Percent of samples whose label is in the top-k predictions, for each k."""
    k_max = min(max(topk), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices                             # [N, k]
    hit = pred == labels[:, None]
    return {f'top{k}': hit[:, :min(k, k_max)].any(1).float().mean().item() * 100 for k in topk}


@torch.no_grad()
def evaluate_dataset(model, loader, classifier, device, desc='zero-shot', **encode_kwargs):
    logits, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2):
        image = model.encode_image(batch['image'].to(device, non_blocking=True), **encode_kwargs)
        logits.append(image @ classifier.t())
        labels.append(batch['label'].to(device))
    return accuracy(torch.cat(logits), torch.cat(labels))


@torch.no_grad()
def evaluate(model, names, tokenizer, device, image_size, batch_size=256, workers=0):
    """Zero-shot top-1/top-5 for each catalog dataset name -> {name: {'top1':…, 'top5':…}}."""
    catalog, labels, templates = load_catalog()
    was_training = model.training
    model.eval()
    results = {}
    for name in names:
        entry = catalog[name]
        loader = DataLoader(build_eval_dataset(entry, image_size), batch_size=batch_size,
                            num_workers=workers)
        classifier = build_classifier(model, labels[name], templates[name], tokenizer, device)
        results[name] = evaluate_dataset(model, loader, classifier, device, desc=name)
    model.train(was_training)
    return results
