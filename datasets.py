"""Training data: the dataset registry (one reader per on-disk format), the tokenizer, the
resumable sampler and the DataLoader. A sample is a dict built by augment.SampleBuilder
(`image` [3,H,W] uint8, `text` [77] int64, for CL2L also `image_views` uint8, `text_views`);
batches are dicts of stacked tensors plus `_data` (skip counts, see readers.collate). The
training loop normalises the uint8 images on its device (engine.to_device); the zero-shot
sets (`ShapesLabels`, evalsets.py) deliver normalised float32 images.

    >>> dataset = build_train_dataset(args, Tokenizer())
    >>> sampler, loader = build_loader(dataset, args)

Formats: shapes (generated), yfcc15m, cc3m, cc12m, merged (alias merged_opendata), wds,
tarpairs, csv, coco, folder -- layouts in docs/data.md.
"""
import itertools
import math
import os
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

import augment
import readers
import shapes
import streaming
import utils
from decode import DecodeOptions, draft_policy
from metadata import DataError
from readers import DataLog, collate, mix_seeds  # noqa: F401  (re-exported for engine/tests)

ALIASES = {'merged_opendata': 'merged'}      # upstream clip-rocket spelling
MERGE_SEP = '---'                            # upstream: --metadata a.npy---b.npy --root a---b


# ----------------------------------------------------------------------------- text

class Tokenizer:
    """OpenAI CLIP BPE (open_clip's packaged vocabulary): list[str] -> LongTensor [N, ctx]."""

    def __init__(self, context_length=77):
        from open_clip.tokenizer import SimpleTokenizer
        self.context_length = context_length
        self.bpe = SimpleTokenizer(context_length=context_length)
        self.bpe.clean_fn = _fast_clean(self.bpe.clean_fn)
        self.vocab_size = len(self.bpe.encoder)

    def __call__(self, texts):
        """open_clip's SimpleTokenizer.__call__ (tested equal), filling one int64 array instead
        of a tensor row by row: ~0.04 ms less per caption, which is per-sample loader work."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        ctx, sot, eot = self.context_length, self.bpe.sot_token_id, self.bpe.eot_token_id
        out = np.zeros((len(texts), ctx), np.int64)
        for i, text in enumerate(texts):
            ids = [sot] + self.bpe.encode(text) + [eot]
            if len(ids) > ctx:
                ids = ids[:ctx - 1] + [eot]                  # truncated: EOT stays last
            out[i, :len(ids)] = ids
        return torch.from_numpy(out)

    def decode(self, tokens):
        ids = [int(t) for t in tokens if int(t) not in (0, self.bpe.sot_token_id, self.bpe.eot_token_id)]
        return self.bpe.decode(ids).strip()


def _fast_clean(clean):
    """open_clip's caption clean (ftfy, HTML unescape twice, white space, lower case) with a
    shortcut for printable ASCII without '&', where ftfy and unescaping change nothing
    (tested): per-sample loader work, ~0.02-0.04 ms of a ~0.07 ms caption."""
    def fast(text):
        if text.isascii() and text.isprintable() and '&' not in text:
            return ' '.join(text.split()).lower()
        return clean(text)
    return fast


def tokenize_unique(tokenizer, texts):
    """Tokenize each distinct string once: -> (tokens [U, ctx], index [len(texts)])."""
    uniq, index = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    return tokenizer(uniq.tolist()), torch.from_numpy(index.astype(np.int64))


class PretokenizedTokenizer:
    """A tokenizer that knows a fixed set of texts already (tokenized once, in one batch) and
    falls back to the real one for any other text (e.g. augmented text views)."""

    def __init__(self, tokenizer, texts):
        self.tokenizer = tokenizer
        uniq = sorted(set(texts))
        self.tokens = tokenizer(uniq)
        self.rows = {t: i for i, t in enumerate(uniq)}

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.rows.get(t) for t in texts]
        if None in rows:
            return self.tokenizer(texts)
        return self.tokens[rows]

    def __getattr__(self, name):          # context_length, vocab_size, decode, ...
        if name.startswith('__') or name == 'tokenizer':
            raise AttributeError(name)    # (unpickling in a spawned worker)
        return getattr(self.tokenizer, name)


# ----------------------------------------------------------------------------- images

normalize_uint8 = augment.normalize_uint8        # uint8 [..., 3, H, W] -> CLIP-normalised float32


# ----------------------------------------------------------------------------- shapes

@lru_cache(maxsize=4)
def shapes_split(split, n, image_size, seed=0):
    """The generated shapes data, cached per process; images as uint8 [N, 3, H, W]."""
    data = shapes.generate(split, n=n, seed=seed, image_size=image_size, workers=2)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
    return data, images


class ShapesCaptions(Dataset):
    """The embedded `shapes` training set (plain images: positions and sizes are part of the
    captions, so the CLIP view is not cropped).

    Plain CLIP (the demo): one caption per image and epoch, drawn by (run seed, epoch) as
    the demo always did (its 98.7 % is one draw: other caption streams gave 85-90 %), and
    the sample computed directly -- it equals SampleBuilder(image, [that caption], seed)
    (tested), without the builder's per-call overhead. Images are uint8, normalised per
    batch by the training loop.
    With views or text augmentation (CL2L) every sample goes through the builder."""

    name = 'shapes'

    def __init__(self, n, image_size, builder, seed=0):
        self.data, self.images = shapes_split('train', n, image_size)
        self.builder, self.seed = builder, seed
        self.fast = _is_plain_clip(builder)
        self._choice = (None, None)                  # (epoch, caption index per image)

    def __len__(self):
        return self.images.shape[0]

    def caption_choice(self, epoch):
        if self._choice[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._choice = (epoch, rng.integers(0, len(self.data.captions[0]), size=len(self)))
        return self._choice[1]

    def __getitem__(self, item):
        i, seed, epoch = readers.unpack(item, self.seed)
        captions = self.data.captions[i]
        if self.fast:                  # == builder(image, [caption], seed) for a plain CLIP builder
            caption = captions[self.caption_choice(epoch)[i]]
            sample = {'image': self.images[i], 'text': self.builder.tokenizer([caption])[0]}
        else:
            sample = self.builder(self.images[i], captions, seed)
        sample['_events'] = ('drawn',)
        return sample


def _is_plain_clip(builder):
    """True when builder(image, captions, seed) is just {uint8 image, one of the captions}
    (augment.plain_transform, no views, no text augmentation)."""
    return (isinstance(builder.image_transform, augment.PlainImage) and not getattr(builder, 'view_transforms', None)
            and getattr(builder, 'text_augment', None) is None)


class ShapesLabels(Dataset):
    """The held-out shapes split for zero-shot classification: dicts (`image` normalised
    float32, as every zero-shot set gives them, `label`)."""

    def __init__(self, n, image_size):
        self.data, self.images = shapes_split('val', n, image_size)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return {'image': normalize_uint8(self.images[i]), 'label': int(self.data.labels[i])}


# ----------------------------------------------------------------------------- registry

def _builder(args, tokenizer, plain=False):
    return augment.SampleBuilder.from_args(args, tokenizer, plain_images=plain)


def _opts(args, builder):
    return DecodeOptions(max_pixels=args.max_image_pixels, draft=draft_policy(builder), fast_jpeg=True)


def _shapes(args, tokenizer):
    data, _ = shapes_split('train', args.shapes_num_train, args.image_size)
    fast = PretokenizedTokenizer(tokenizer, [c for caps in data.captions for c in caps])
    return ShapesCaptions(args.shapes_num_train, args.image_size, _builder(args, fast, plain=True), args.seed)


def _records(kind):
    def build(args, tokenizer):
        b = _builder(args, tokenizer)
        return readers.records_reader(kind, args.root, args.metadata, b, _opts(args, b), args.seed,
                                      args.allow_pickle)
    return build


def _merged(args, tokenizer):
    b = _builder(args, tokenizer)
    roots, metas = args.root.split(MERGE_SEP), args.metadata.split(MERGE_SEP)
    return readers.ConcatReader([readers.records_reader(None, r, m, b, _opts(args, b), args.seed,
                                                       args.allow_pickle) for r, m in zip(roots, metas)])


def _csv(args, tokenizer):
    b = _builder(args, tokenizer)
    return readers.csv_reader(args.metadata, args.root, args.csv_img_key, args.csv_caption_key,
                              args.csv_separator, b, _opts(args, b), args.seed)


def _coco(args, tokenizer):
    b = _builder(args, tokenizer)
    return readers.coco_reader(args.metadata, args.root, b, _opts(args, b), args.seed)


def _folder(args, tokenizer):
    b = _builder(args, tokenizer)
    return readers.folder_reader(args.root, b, _opts(args, b), args.seed)


def _stream(name, layout, shards, num_samples, args, tokenizer, rename=None):
    b = _builder(args, tokenizer)
    if num_samples < utils.get_world_size() * args.batch_size:
        raise DataError(f"{name}: an epoch of {num_samples} samples holds no full batch of "
                        f"{args.batch_size} x {utils.get_world_size()} process(es)")
    return streaming.StreamReader(
        name, layout, shards, num_samples, args.batch_size, b, _opts(args, b), args.seed,
        utils.get_rank(), utils.get_world_size(), args.wds_resampled, args.wds_shuffle_buffer, rename)


def _wds(args, tokenizer):
    shards = streaming.local_shards('wds', args.root, streaming.WDS_LAYOUT)
    n = args.train_num_samples or streaming.count_samples(shards)
    if n is None:
        raise DataError("wds: pass --train-num-samples (samples per epoch): no *_stats.json or "
                        "sizes.json beside the shards to count them")
    return _stream('wds', streaming.WDS_LAYOUT, shards, n, args, tokenizer)


def _tarpairs(args, tokenizer):
    archives, total = streaming.tarpairs_shards(args.root, args.metadata, args.allow_pickle)
    shards = streaming.local_shards('tarpairs', '::'.join(archives), streaming.TARPAIRS_LAYOUT)
    return _stream('tarpairs', streaming.TARPAIRS_LAYOUT, shards,
                   min(total, args.train_num_samples or total), args, tokenizer,
                   rename=streaming.tarpairs_rename)


DATASETS = utils.Registry('dataset')   # name -> build(args, tokenizer) -> Dataset
DATASETS.register('shapes', _shapes)
DATASETS.register('yfcc15m', _records('yfcc15m'))
DATASETS.register('cc3m', _records('cc3m'))
DATASETS.register('cc12m', _records('cc12m'))
DATASETS.register('merged', _merged)
DATASETS.register('wds', _wds)
DATASETS.register('tarpairs', _tarpairs)
DATASETS.register('csv', _csv)
DATASETS.register('coco', _coco)
DATASETS.register('folder', _folder)
NEEDS = {'yfcc15m': 'rm', 'cc3m': 'rm', 'cc12m': 'rm', 'merged': 'rm', 'wds': 'r',
         'tarpairs': 'rm', 'csv': 'm', 'coco': 'rm', 'folder': 'r'}   # r: --root, m: --metadata


def resolve_data_args(args):
    """Check the data flags before any work starts (ValueError = one-line usage error)."""
    args.dataset = ALIASES.get(args.dataset, args.dataset)
    DATASETS.get(args.dataset)
    if not 0 <= args.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    for key in ('max_image_pixels', 'prefetch_factor'):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    needs = NEEDS.get(args.dataset, '')
    if 'r' in needs and not args.root:
        raise ValueError(f"--dataset {args.dataset} needs --root (see docs/data.md)")
    if 'm' in needs and not args.metadata:
        raise ValueError(f"--dataset {args.dataset} needs --metadata (see docs/data.md)")
    if args.dataset == 'merged' and len(args.root.split(MERGE_SEP)) != len(args.metadata.split(MERGE_SEP)):
        raise ValueError(f"--dataset merged: --root and --metadata need as many '{MERGE_SEP}'-separated "
                         f"entries, got {args.root!r} and {args.metadata!r}")
    metas = args.metadata.split(MERGE_SEP) if args.dataset == 'merged' else [args.metadata]
    for meta in (metas if args.metadata else []):
        if not os.path.isfile(meta):
            raise ValueError(f"--metadata: no such file {meta!r}")


def build_train_dataset(args, tokenizer):
    """The registered reader for args.dataset, checked on a few samples: a data source that is
    mostly unusable (wrong --root, wrong --metadata) stops here with one line."""
    try:
        dataset = DATASETS.get(args.dataset)(args, tokenizer)
        if hasattr(dataset, 'probe'):
            dataset.probe()
    except DataError as e:
        raise SystemExit(f"main.py: error: {e}") from None
    print(f"training data: {getattr(dataset, 'name', args.dataset)}, "
          + (f"{len(dataset)} batches of {args.batch_size} per epoch"
             if isinstance(dataset, streaming.StreamReader) else f"{len(dataset)} samples"))
    return dataset


# ----------------------------------------------------------------------------- sampling

class ResumableSampler(Sampler):
    """Seeded per-epoch permutation, split across ranks, that can start mid-epoch; yields
    (index, seed, epoch), the seed = mix_seeds(run seed, epoch, index) making every sample
    (augmentation, caption choice, replacement of a bad sample) a pure function of them.

    Each epoch draws `num_samples` indices (default: all) from a fresh permutation of the
    `n` samples. `set_epoch(epoch, start)` makes the next iteration yield this rank's share
    of that epoch from position `start` (in samples of this rank) on.
    """

    def __init__(self, n, seed=0, shuffle=True, num_samples=None, rank=None, world_size=None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.num_samples = n if num_samples is None else min(n, num_samples)
        self.rank = utils.get_rank() if rank is None else rank
        self.world = utils.get_world_size() if world_size is None else world_size
        self.per_rank = math.ceil(self.num_samples / self.world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)[:self.num_samples]
        else:
            order = torch.arange(self.num_samples)
        pad = self.per_rank * self.world - self.num_samples              # repeat to even out
        order = torch.cat([order, order[:pad]]) if pad else order
        return order[self.rank::self.world][self.start:]

    def __iter__(self):
        index, epoch = self.indices().numpy(), self.epoch
        for lo in range(0, len(index), 1 << 16):            # chunks: no 2 x N Python ints at once
            chunk = index[lo:lo + (1 << 16)]
            yield from zip(chunk.tolist(), mix_seeds(self.seed, epoch, chunk).tolist(),
                           itertools.repeat(epoch))

    def __len__(self):
        return self.per_rank - self.start


class StreamControl:
    """The sampler-like handle main.py drives for a streaming reader."""

    def __init__(self, dataset):
        self.dataset = dataset

    def set_epoch(self, epoch, start=0):
        self.dataset.set_position(epoch, start)

    def __len__(self):
        return len(self.dataset) * self.dataset.batch_size


def build_loader(dataset, args):
    """-> (sampler with set_epoch(epoch, start), DataLoader). Workers persist across epochs
    (samples get their seed from the sampler, so nothing in a worker goes stale)."""
    workers = args.workers
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=workers > 0,
                  prefetch_factor=args.prefetch_factor if workers > 0 else None,
                  worker_init_fn=augment.fresh_wordnet_files if workers > 0 else None)
    if isinstance(dataset, streaming.StreamReader):
        return StreamControl(dataset), torch.utils.data.DataLoader(dataset, batch_size=None, **common)
    sampler = ResumableSampler(len(dataset), seed=args.seed, num_samples=args.train_num_samples)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
        generator=torch.Generator().manual_seed(args.seed), **common)
    return sampler, loader
