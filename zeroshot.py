"""Zero-shot evaluation shared by training-time validation (main.py) and eval_zeroshot.py.

    >>> results = zeroshot.evaluate(model, ['shapes', 'cifar10'], tokenizer, device, 224,
    ...                             data_root='data')
    >>> results['cifar10']['top1']

One classifier builder (class names x templates -> averaged normalised text embeddings, cached
on disk when a cache is given), one loop per task (classification, retrieval), the metrics
(top-1/5, mean per-class recall, ROC-AUC, recall@k), computed for every zero-shot head of the
model (`z`; `h` and the z/h logit ensembles for CL2L). The numbers follow CLIP_benchmark's
definitions exactly (`acc1`, `acc5`, `mean_per_class_recall`, `image_retrieval_recall@k`,
`text_retrieval_recall@k`, fractions); `evaluate` reports them in percent for main.py
(`top1`, `top5`, ...). The dataset readers live in evalsets.py.
"""
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import evalsets

HERE = os.path.dirname(os.path.abspath(__file__))
ENSEMBLE_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(1, 10))   # w on z, 1 - w on h
CLASSES_PER_BATCH = 16


# ----------------------------------------------------------------------------- catalog

def read_json(path, default):
    """A user-given path as is; else the repository's file `default`."""
    with open(path or os.path.join(HERE, default)) as f:
        return json.load(f)


def load_catalog(catalog=None, labels=None, templates=None):
    """(catalog, labels, templates) dicts; defaults: the repository's three JSON files."""
    return (read_json(catalog, 'dataset_catalog.json'), read_json(labels, 'labels.json'),
            read_json(templates, 'templates.json'))


def check_names(names, data_root=None, catalog=None, paths=None):
    """Raise ValueError naming the valid choices if a dataset is not in the catalog, or, when
    `data_root` is given, naming the path where a dataset's files were looked for."""
    cat = read_json(catalog, 'dataset_catalog.json')
    unknown = [n for n in names if n not in cat]
    if unknown:
        raise ValueError(f"unknown zero-shot dataset(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(cat)}")
    if data_root is not None:
        for n in names:
            source, path = evalsets.locate(n, cat[n], data_root, paths)
            if source is None:
                raise ValueError(f"zero-shot dataset {n}: not found at {path} "
                                 f"(set --eval-data-root)")


def shift_sets(base, catalog=None):
    """Catalog entries that are distribution shifts of `base` (their `shift_of`), catalog order."""
    cat = catalog if catalog is not None else read_json(None, 'dataset_catalog.json')
    return [n for n, entry in cat.items() if entry.get('shift_of') == base]


def shift_groups(names, catalog):
    """{base: [its shift sets among `names`]} for each base in `names` with at least one."""
    groups = {base: [n for n in names if catalog[n].get('shift_of') == base] for base in names}
    return {base: shifts for base, shifts in groups.items() if shifts}


def shift_mean(per_set, shifts):
    """Mean top-1 (percent) over the shift sets `shifts` of one result dict {name: metrics}."""
    return sum(per_set[n]['top1'] for n in shifts) / len(shifts)


def expand_names(patterns, catalog):
    """Catalog names matching the given names or shell patterns ('imagenet*'), catalog order."""
    import fnmatch
    chosen = [n for n in catalog if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in catalog)]
    if unmatched:
        raise ValueError(f"unknown zero-shot dataset(s) {', '.join(unmatched)}; "
                         f"valid: {', '.join(catalog)}")
    return chosen


# ----------------------------------------------------------------------------- heads

def model_heads(model):
    """The model's zero-shot heads: ('z',) for CLIP, ('z', 'h') for CL2L."""
    return tuple(getattr(model, 'zeroshot_heads', ('z',)))


def _head_kwargs(model, head):
    return {'head': head} if len(model_heads(model)) > 1 else {}


def encode_image(model, images, head='z'):
    return model.encode_image(images, normalize=True, **_head_kwargs(model, head))


def encode_text(model, tokens, head='z'):
    return model.encode_text(tokens, normalize=True, **_head_kwargs(model, head))


# ----------------------------------------------------------------------------- text side

class TextCache:
    """Class embeddings keyed by (model key, head, class names, templates, context length):
    kept in memory, and on disk under `directory` when one is given. `model_key` must
    identify the weights (eval_zeroshot.py uses the checkpoint file's SHA-256)."""

    def __init__(self, model_key, directory=None):
        self.model_key, self.directory, self.memory = model_key, directory, {}
        self.hits = self.misses = 0

    def key(self, head, classnames, templates, context_length):
        blob = json.dumps([self.model_key, head, classnames, templates, context_length])
        return hashlib.sha256(blob.encode()).hexdigest()

    def _file(self, key):
        return os.path.join(self.directory, f'{key}.pt')

    def get(self, key):
        if key not in self.memory and self.directory and os.path.isfile(self._file(key)):
            self.memory[key] = torch.load(self._file(key), map_location='cpu', weights_only=True)
        found = self.memory.get(key)
        self.hits, self.misses = self.hits + (found is not None), self.misses + (found is None)
        return found

    def put(self, key, weights):
        self.memory[key] = weights.cpu()
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
            tmp = f'{self._file(key)}.tmp.{os.getpid()}'
            torch.save(weights.cpu(), tmp)
            os.replace(tmp, self._file(key))


def token_lengths(tokens):
    """[P] tokens up to and including the last non-padding one (padding is id 0; CLIP's
    EOT and BERT's [SEP] are non-zero, so a '!' (id 0 in CLIP's BPE) inside a prompt counts)."""
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return ((tokens != 0) * positions).amax(dim=-1)


def common_prefix_length(tokens):
    """Leading positions that every row of `tokens` [P, L] shares, short of each row's last
    token (every row keeps at least its EOT)."""
    same = (tokens == tokens[:1]).all(dim=0)
    return min(int(same.long().cumprod(dim=0).sum()), int(token_lengths(tokens).min()) - 1)


@torch.no_grad()
def build_classifier(model, classnames, templates, tokenizer, device,
                     classes_per_batch=CLASSES_PER_BATCH, **encode_kwargs):
    """[C, D] class embeddings: each class's prompt embeddings (templates x synonyms),
    normalised, averaged, normalised again. A class may be a list of synonyms.
    `classes_per_batch` x len(templates) prompts go through the text tower per call (bounds
    memory), two savings that leave each prompt's embedding the same up to float rounding:
    - prompts are batched by token length: a causal tower runs only up to the longest prompt
      of its call (models.CLIP.encode_text), so 1.6x fewer tokens than whole classes per call
      (ImageNet's 80 templates);
    - with our own causal text transformer (model.shares_text_prefix), the prompts of one
      template run from its shared prefix ("a photo of a"), computed once
      (models.CLIP.encode_text_after_prefix): half of those tokens again."""
    prompts, counts = [], []
    for name in classnames:
        names = name if isinstance(name, list) else [name]
        prompts += [t.format(n) for n in names for t in templates]
        counts.append(len(names) * len(templates))
    per_call = max(1, classes_per_batch) * max(1, len(templates))
    embeddings = prompt_embeddings(model, tokenizer(prompts), len(templates), per_call, device, **encode_kwargs)
    weights = []
    for part in embeddings.split(counts):
        mean = part.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights)


def prompt_embeddings(model, tokens, num_templates, per_call, device, **encode_kwargs):
    """[P, D] normalised text embeddings of tokens [P, L] (prompt i uses template i % num_templates),
    per_call prompts of similar length per text-tower call."""
    shares = getattr(model, 'shares_text_prefix', None)
    prefixes = None
    if shares is not None and shares():
        prefixes, starts, which, tokens = template_prefixes(tokens, num_templates)
        prefixes = model.text_prefixes(prefixes.to(device), starts.to(device))
        which = which.to(device)
    order = torch.argsort(token_lengths(tokens), stable=True)
    embeddings = None
    for start in range(0, len(order), per_call):
        pick = order[start:start + per_call]
        batch = tokens[pick].to(device)
        if prefixes is None:
            emb = model.encode_text(batch, **encode_kwargs)
        else:
            emb = model.encode_text_after_prefix(prefixes, which[pick.to(device)], batch, **encode_kwargs)
        emb = F.normalize(emb.float(), dim=-1)
        if embeddings is None:
            embeddings = emb.new_empty(len(tokens), emb.shape[1])
        embeddings[pick.to(emb.device)] = emb
    return embeddings


def template_prefixes(tokens, num_templates):
    """Split each prompt (tokens [P, L], prompt i from template i % num_templates) into the
    prefix its template's prompts all share and the rest -> (prefixes [T, Lp] padded with 0,
    their lengths [T], template of each prompt [P], rest [P, L] shifted left, padded with 0)."""
    which = torch.arange(len(tokens)) % num_templates
    starts = torch.tensor([common_prefix_length(tokens[t::num_templates]) for t in range(num_templates)])
    prefixes = torch.zeros(num_templates, int(starts.max()), dtype=tokens.dtype)
    for t, n in enumerate(starts.tolist()):
        prefixes[t, :n] = tokens[t, :n]
    columns = starts[which][:, None] + torch.arange(tokens.shape[1])
    rest = tokens.gather(1, columns.clamp(max=tokens.shape[1] - 1))
    return prefixes, starts, which, rest.masked_fill(columns >= tokens.shape[1], 0)


def cached_classifier(model, head, classnames, templates, tokenizer, device, cache=None,
                      classes_per_batch=CLASSES_PER_BATCH):
    key = None
    if cache is not None:
        key = cache.key(head, classnames, templates, getattr(tokenizer, 'context_length', None))
        found = cache.get(key)
        if found is not None:
            return found.to(device)
    weights = build_classifier(model, classnames, templates, tokenizer, device,
                               classes_per_batch, **_head_kwargs(model, head))
    if cache is not None:
        cache.put(key, weights)
    return weights


# ----------------------------------------------------------------------------- metrics

def topk_accuracy(logits, labels):
    """CLIP_benchmark's acc1/acc5 (fractions); acc5 is NaN with fewer than 5 classes."""
    n, num_classes = logits.shape
    k = 5 if num_classes >= 5 else 1
    correct = logits.topk(k, dim=1).indices == labels[:, None]               # [N, k]
    acc1 = float(correct[:, :1].sum()) / n
    acc5 = float(correct[:, :5].sum()) / n if k == 5 else float('nan')
    return acc1, acc5


def classification_metrics(logits, labels, auc=False):
    """{acc1, acc5, mean_per_class_recall[, roc_auc]} as fractions, from [N, C] logits."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score
    acc1, acc5 = topk_accuracy(logits, labels)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')           # classes predicted but absent from labels
        recall = float(balanced_accuracy_score(labels.numpy(), logits.argmax(dim=1).numpy()))
    out = {'acc1': acc1, 'acc5': acc5, 'mean_per_class_recall': recall}
    if auc:
        if logits.shape[1] != 2 or len(labels.unique()) < 2:
            out['roc_auc'] = float('nan')
        else:
            out['roc_auc'] = float(roc_auc_score(labels.numpy(), (logits[:, 1] - logits[:, 0]).numpy()))
    return out


def recall_at_k(scores, positives, k):
    """Fraction of rows with at least one positive column among their top-k scores."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices                 # [R, k]
    return positives.gather(1, top).any(dim=1).float().mean().item()


def retrieval_metrics(text_to_image, text_image_index, ks=(1, 5, 10)):
    """Recall@k both ways from [T, I] text-image scores; CLIP_benchmark's names: `image_
    retrieval` ranks images for each caption, `text_retrieval` captions for each image."""
    positives = torch.zeros_like(text_to_image, dtype=torch.bool)
    positives[torch.arange(len(text_image_index)), text_image_index] = True
    out = {}
    for k in ks:
        out[f'image_retrieval_recall@{k}'] = recall_at_k(text_to_image, positives, k)
        out[f'text_retrieval_recall@{k}'] = recall_at_k(text_to_image.t(), positives.t(), k)
    return out


def head_scores(scores):
    """{z: S, h: S} -> also {'zh0.1': 0.1 S_z + 0.9 S_h, ..., 'zh0.9': ...} for two heads."""
    if not {'z', 'h'} <= set(scores):
        return dict(scores)
    out = dict(scores)
    for w in ENSEMBLE_WEIGHTS:
        out[f'zh{w}'] = w * scores['z'] + (1 - w) * scores['h']
    return out


def prefixed(variant, metrics):
    return {(k if variant == 'z' else f'{variant}_{k}'): v for k, v in metrics.items()}


PERCENT_NAMES = {'acc1': 'top1', 'acc5': 'top5'}


def split_variant(key):
    """'h_acc1' -> ('h', 'acc1'); 'zh0.3_acc5' -> ('zh0.3', 'acc5'); 'acc1' -> ('', 'acc1')."""
    variant, sep, name = key.partition('_')
    return (variant, name) if sep and (variant == 'h' or variant.startswith('zh')) else ('', key)


def to_percent(metrics, task):
    """CLIP_benchmark-style fractions -> percent with main.py's names (`top1`, `top5`, ...).
    Retrieval also gets `top1` / `top5`: the mean of both directions' recall@1 / @5."""
    out = {}
    for key, value in metrics.items():
        variant, name = split_variant(key)
        name = PERCENT_NAMES.get(name, name)
        out[f'{variant}_{name}' if variant else name] = 100 * value
    if task == 'zeroshot_retrieval':
        for variant in dict.fromkeys(split_variant(k)[0] for k in metrics):
            pre = f'{variant}_' if variant else ''
            for k in (1, 5):
                out[f'{pre}top{k}'] = (out[f'{pre}image_retrieval_recall@{k}'] +
                                       out[f'{pre}text_retrieval_recall@{k}']) / 2
    return out


# ----------------------------------------------------------------------------- loops

@dataclass
class Result:
    name: str
    task: str = 'zeroshot_classification'
    metrics: dict = field(default_factory=dict)      # CLIP_benchmark names, fractions
    skipped: str = ''                                 # reason when not evaluated
    source: dict = field(default_factory=dict)        # the catalog source used, with its path
    num_samples: int = 0
    unreadable: list = field(default_factory=list)    # damaged samples skipped: one reason each

    def percent(self):
        return to_percent(self.metrics, self.task)


@torch.no_grad()
def run_classification(model, loader, classifiers, device, desc='zero-shot', unreadable=None):
    """{head: [N, C] logits} (100 x cosine, CLIP_benchmark's scale), [N] labels; the reasons
    of damaged samples (skipped) are appended to `unreadable`."""
    logits, labels = {h: [] for h in classifiers}, []
    for batch in _readable(loader, desc, unreadable):
        images = batch['image'].to(device, non_blocking=True)
        for head, weights in classifiers.items():                       # weights [D, C]
            features = F.normalize(encode_image(model, images, head), dim=-1)
            logits[head].append((100. * features @ weights).float().cpu())
        labels.append(batch['label'].cpu())
    if not labels:                                      # nothing readable
        return {h: torch.empty(0, w.shape[1]) for h, w in classifiers.items()}, torch.empty(0, dtype=torch.long)
    return {h: torch.cat(v) for h, v in logits.items()}, torch.cat(labels)


def _readable(loader, desc, unreadable):
    """The loader's batches with a progress bar, batches of only damaged samples left out;
    every damaged sample's reason goes to `unreadable` (a list, or dropped if None)."""
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=2):
        if unreadable is not None:
            unreadable += batch.get('unreadable', [])
        if 'image' in batch:
            yield batch


@torch.no_grad()
def run_retrieval(model, loader, tokenizer, device, heads, desc='retrieval', unreadable=None):
    """{head: [T, I] caption-image scores}, [T] index of each caption's image."""
    images = {h: [] for h in heads}
    texts = {h: [] for h in heads}
    owner, seen = [], 0
    for batch in _readable(loader, desc, unreadable):
        pixels = batch['image'].to(device, non_blocking=True)
        captions = [c for caps in batch['captions'] for c in caps]
        owner += [seen + i for i, caps in enumerate(batch['captions']) for _ in caps]
        seen += len(batch['captions'])
        tokens = tokenizer(captions).to(device)
        for h in heads:
            images[h].append(F.normalize(encode_image(model, pixels, h), dim=-1).float().cpu())
            texts[h].append(F.normalize(encode_text(model, tokens, h), dim=-1).float().cpu())
    if not owner:                                       # nothing readable
        return {h: torch.empty(0, 0) for h in heads}, torch.empty(0, dtype=torch.long)
    scores = {h: torch.cat(texts[h]) @ torch.cat(images[h]).t() for h in heads}
    return scores, torch.tensor(owner)


def evaluate_entry(model, name, entry, labels, templates, tokenizer, device, image_size,
                   batch_size=256, workers=0, data_root='data', paths=None, cache=None,
                   classes_per_batch=CLASSES_PER_BATCH, skip_missing=True):
    """Evaluate one catalog entry -> Result (metrics for every head and ensemble)."""
    task = evalsets.task_of(entry)
    source, path = evalsets.locate(name, entry, data_root, paths)
    if source is None:
        if not skip_missing:
            raise FileNotFoundError(f"zero-shot dataset {name}: not found at {path}")
        return Result(name, task, skipped=f'not found at {path}')
    try:
        dataset, classnames, prompts = evalsets.build(name, source, image_size, task,
                                                      labels.get(name), templates.get(name))
    except (FileNotFoundError, RuntimeError) as e:      # torchvision: "Dataset not found"
        if not skip_missing:
            raise
        return Result(name, task, skipped=f"not found at {path} ({str(e).splitlines()[0]})")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=evalsets.collate, pin_memory=torch.cuda.is_available())
    heads = model_heads(model)
    desc = f'{name}@{image_size}'
    unreadable = []
    if task == 'zeroshot_retrieval':
        scores, owner = run_retrieval(model, loader, tokenizer, device, heads, desc, unreadable)
        if not len(owner):
            return _no_readable_sample(name, task, path, unreadable)
        metrics = {}
        for variant, s in head_scores(scores).items():
            metrics.update(prefixed(variant, retrieval_metrics(s, owner)))
        count = int(owner.max()) + 1 if len(owner) else 0
        return _counted(Result(name, task, metrics, source=source, num_samples=count, unreadable=unreadable))
    classifiers = {h: cached_classifier(model, h, classnames, prompts, tokenizer, device, cache,
                                        classes_per_batch).t().contiguous() for h in heads}
    logits, target = run_classification(model, loader, classifiers, device, desc, unreadable)
    if not len(target):
        return _no_readable_sample(name, task, path, unreadable)
    metrics = {}
    for variant, lg in head_scores(logits).items():
        metrics.update(prefixed(variant, classification_metrics(
            lg, target, auc=entry.get('metric') == 'roc_auc')))
    return _counted(Result(name, task, metrics, source=source, num_samples=len(target), unreadable=unreadable))


def _no_readable_sample(name, task, path, unreadable):
    return Result(name, task, skipped=f"no readable sample at {path} ({len(unreadable)} unreadable"
                                      + (f", first: {unreadable[0]})" if unreadable else ')'))


def _counted(result):
    """`result`, after one line saying how many damaged samples it skipped (if any)."""
    if result.unreadable:
        print(f"{result.name}: {len(result.unreadable)} unreadable sample(s) skipped (scores are over the "
              f"{result.num_samples} read), first: {result.unreadable[0]}")
    return result


@torch.no_grad()
def run(model, names, tokenizer, device, image_size, batch_size=256, workers=0,
        data_root='data', paths=None, cache=None, classes_per_batch=CLASSES_PER_BATCH,
        skip_missing=True, catalog=None, labels=None, templates=None):
    """{name: Result} for catalog entries `names` at one resolution; the model is put in
    eval mode and restored."""
    cat, lab, tpl = load_catalog(catalog, labels, templates)
    was_training = model.training
    model.eval()
    try:
        return {name: evaluate_entry(model, name, cat[name], lab, tpl, tokenizer, device,
                                     image_size, batch_size, workers, data_root, paths, cache,
                                     classes_per_batch, skip_missing) for name in names}
    finally:
        model.train(was_training)


def evaluate(model, names, tokenizer, device, image_size, batch_size=256, workers=0,
             data_root='data', paths=None, cache=None, classes_per_batch=CLASSES_PER_BATCH,
             skip_missing=False, **catalog_files):
    """Zero-shot metrics in percent for each catalog name -> {name: {'top1', 'top5', ...}}.
    `top1` is the `z` head's top-1 (retrieval: mean recall@1 of both directions); CL2L models
    add `h_top1`, ... and the ensembles `zh0.1_top1` ... `zh0.9_top1`. A dataset whose files
    are missing raises FileNotFoundError, or with skip_missing gives {'skipped': reason}."""
    results = run(model, names, tokenizer, device, image_size, batch_size, workers, data_root,
                  paths, cache, classes_per_batch, skip_missing, **catalog_files)
    return {n: ({'skipped': r.skipped} if r.skipped else r.percent()) for n, r in results.items()}


def primary_metric(entry):
    """Name of the percent metric that summarises an entry (the catalog's `metric`)."""
    return entry.get('metric', 'top1')
