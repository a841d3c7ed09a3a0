"""Training data: the dataset registry (one reader per on-disk format), the resumable
sampler and the DataLoader (the tokenizer is in text.py). A sample is a dict built by
augment.SampleBuilder (`image` [3,H,W] uint8, `text` [77] int64, for CL2L also `image_views`
uint8, `text_views`); batches are dicts of stacked tensors plus `_data` (skip counts, see
readers.collate). The training loop normalises the uint8 images on its device
(engine.to_device); the zero-shot sets (`ShapesLabels`, evalsets.py) deliver normalised
float32 images.

    >>> dataset = build_train_dataset(args, Tokenizer())
    >>> sampler, loader = build_loader(dataset, args)

Formats: one `DatasetSpec` per `--dataset` name in `DATASETS` (its reader's builder, the
flags it needs and adds, its layout text); `python tools/data_formats.py` lists them. A new
format = its reader + `register_dataset(DatasetSpec(...))` + its fixture writer in
tests/datagen.py (the tests enumerate the registry and fail for a format without one).
"""
import argparse
import itertools
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

import augment
import multiscale
import readers
import shapes
import streaming
import tfrecord
import utils
from decode import DecodeOptions, draft_policy
from metadata import DataError
from readers import DataLog, collate, mix_seeds  # noqa: F401  (re-exported for engine/tests)
from text import PretokenizedTokenizer, Tokenizer, _fast_clean, tokenize_unique  # noqa: F401  (re-exported)

MERGE_SEP = '---'                            # upstream: --metadata a.npy---b.npy --root a---b


# ----------------------------------------------------------------------------- images

normalize_uint8 = augment.normalize_uint8        # uint8 [..., 3, H, W] -> CLIP-normalised float32


# ----------------------------------------------------------------------------- shapes

@lru_cache(maxsize=8)      # the training split and the held-out + shift splits validated on
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
    return (isinstance(builder, augment.SampleBuilder)          # not a multiscale.SizedBuilder
            and isinstance(builder.image_transform, augment.PlainImage)
            and not getattr(builder, 'view_transforms', None) and getattr(builder, 'text_augment', None) is None)


class ShapesLabels(Dataset):
    """A held-out shapes split for zero-shot classification ('val', or a shift split:
    shapes.SHIFT_SPLITS): dicts (`image` normalised float32, as every zero-shot set gives
    them, `label`)."""

    def __init__(self, n, image_size, split='val'):
        self.data, self.images = shapes_split(split, n, image_size)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return {'image': normalize_uint8(self.images[i]), 'label': int(self.data.labels[i])}


# ----------------------------------------------------------------------------- registry

def _metadata_file(args):
    return [args.metadata] if args.metadata else []


@dataclass(frozen=True)
class DatasetSpec:
    """One `--dataset` format: all that main.py, the error messages, the docs and the tests know
    about it. Register it with register_dataset()."""

    name: str
    build: Callable                     # (args, tokenizer) -> Dataset (map-style or StreamReader)
    summary: str                        # what the format is, in one line (the docs table)
    layout: str                         # the expected files and flags, as the error messages say it
    needs_root: bool = False            # --root is required
    needs_metadata: bool = False        # --metadata is required
    add_args: Optional[Callable] = None     # (argparse group) -> None: the format's own flags;
                                            # formats passing the same function share one group
    metadata_paths: Callable = _metadata_file   # args -> metadata files that must exist (or ValueError)
    aliases: tuple = ()                 # other accepted spellings (upstream names)

    def flags(self):
        """The format's own flags: [(option, help)]."""
        if self.add_args is None:
            return []
        group = argparse.ArgumentParser(add_help=False).add_argument_group(self.name)
        self.add_args(group)
        return [(a.option_strings[-1], a.help) for a in group._group_actions]


DATASETS = utils.Registry('dataset')   # name -> DatasetSpec


def register_dataset(spec):
    for alias in spec.aliases:
        if alias in DATASETS or aliases().get(alias, spec.name) != spec.name:
            raise ValueError(f"dataset alias {alias!r} is taken")
    return DATASETS.register(spec.name, spec)


def aliases():
    """{alias: registered name}."""
    return {a: spec.name for spec in DATASETS.values() for a in spec.aliases}


def dataset_help():
    """The --help text of --dataset."""
    alias = ', '.join(f'{a} = {n}' for a, n in aliases().items())
    return (f"training set (registered: {', '.join(DATASETS)}" + (f"; upstream alias {alias}" if alias else '')
            + "); layouts in docs/data.md")


def add_format_args(parser):
    """Each format's own flags, in an argument group per flag set ('data (--dataset csv)')."""
    users = {}
    for spec in DATASETS.values():
        if spec.add_args is not None:
            users.setdefault(spec.add_args, []).append(spec.name)
    for add_args, names in users.items():
        add_args(parser.add_argument_group(f"data (--dataset {', '.join(names)})"))


def _builder(args, tokenizer, plain=False):
    if multiscale.enabled(args):                 # a builder per size of the step (multiscale.py)
        return multiscale.SizedBuilder(args, tokenizer, plain_images=plain)
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


def _stream(name, layout, shards, num_samples, args, tokenizer, shard_reader=streaming.tar_samples):
    b = _builder(args, tokenizer)
    if num_samples < utils.get_world_size() * args.batch_size:
        raise DataError(f"{name}: an epoch of {num_samples} samples holds no full batch of "
                        f"{args.batch_size} x {utils.get_world_size()} process(es)")
    return streaming.StreamReader(
        name, layout, shards, num_samples, args.batch_size, b, _opts(args, b), args.seed,
        utils.get_rank(), utils.get_world_size(), args.wds_resampled, args.wds_shuffle_buffer, shard_reader)


def _counted_shards(name, layout, patterns, args):
    """img2dataset-style shards and the epoch length: --train-num-samples, else their
    *_stats.json / sizes.json."""
    shards = streaming.local_shards(name, args.root, layout, patterns)
    n = args.train_num_samples or streaming.count_samples(shards)
    if n is None:
        raise DataError(f"{name}: pass --train-num-samples (samples per epoch): no *_stats.json or "
                        "sizes.json beside the shards to count them")
    return shards, n


def _wds(args, tokenizer):
    shards, n = _counted_shards('wds', streaming.WDS_LAYOUT, streaming.TAR_PATTERNS, args)
    return _stream('wds', streaming.WDS_LAYOUT, shards, n, args, tokenizer)


def _tfrecord(args, tokenizer):
    shards, n = _counted_shards('tfrecord', streaming.TFRECORD_LAYOUT, streaming.TFRECORD_PATTERNS, args)
    remote = [s for s in shards if not os.path.isfile(s)]
    if remote:
        raise DataError(f"tfrecord: reads local files, got {remote[0]!r}: copy the shards or mount "
                        f"the bucket (e.g. gcsfuse); expected {streaming.TFRECORD_LAYOUT}")
    return _stream('tfrecord', streaming.TFRECORD_LAYOUT, shards, n, args, tokenizer, tfrecord.shard_samples)


def _tarpairs(args, tokenizer):
    archives, total = streaming.tarpairs_shards(args.root, args.metadata, args.allow_pickle)
    shards = streaming.local_shards('tarpairs', '::'.join(archives), streaming.TARPAIRS_LAYOUT)
    return _stream('tarpairs', streaming.TARPAIRS_LAYOUT, shards,
                   min(total, args.train_num_samples or total), args, tokenizer,
                   shard_reader=streaming.tarpairs_samples)


def _shapes_flags(group):
    group.add_argument('--shapes-num-train', type=int, default=40000, help='size of the generated shapes training set')


def _csv_flags(group):
    group.add_argument('--csv-img-key', default='filepath', help='csv: image-path column (filepath)')
    group.add_argument('--csv-caption-key', default='title', help='csv: caption column (title)')
    group.add_argument('--csv-separator', default='\t', help='csv: field separator (tab; "," for CSV)')


def _stream_flags(group):
    group.add_argument('--wds-shuffle-buffer', type=int, default=1000,
                       help='wds/tarpairs/tfrecord: samples in the shuffle buffer of each loader stream '
                            '(1000; 0 = off)')
    group.add_argument('--wds-resampled', action='store_true',
                       help='wds/tarpairs/tfrecord: draw shards with replacement (epochs are --train-num-samples long)')


def _merged_metadata(args):
    roots, metas = args.root.split(MERGE_SEP), args.metadata.split(MERGE_SEP)
    if len(roots) != len(metas):
        raise ValueError(f"--dataset merged: --root and --metadata need as many '{MERGE_SEP}'-separated "
                         f"entries, got {args.root!r} and {args.metadata!r}")
    return metas


MERGED_LAYOUT = (f"--root A{MERGE_SEP}B{MERGE_SEP}... and --metadata A.npy{MERGE_SEP}B.npy{MERGE_SEP}...: "
                 "(root, metadata) pairs, each a yfcc15m, cc3m or cc12m layout (recognised from its records)")
SHAPES_LAYOUT = "nothing on disk: --shapes-num-train images generated at start-up (shapes.py)"

register_dataset(DatasetSpec(
    'shapes', _shapes, 'generated 64 px shapes images with 4 captions each (the demo)', SHAPES_LAYOUT,
    add_args=_shapes_flags))
register_dataset(DatasetSpec(
    'yfcc15m', _records('yfcc15m'), 'zip tree of YFCC100M + (index, title, description) metadata',
    readers.YFCCZipReader.layout, needs_root=True, needs_metadata=True))
register_dataset(DatasetSpec(
    'cc3m', _records('cc3m'), 'image files + records with captions', readers.CC_LAYOUT['cc3m'],
    needs_root=True, needs_metadata=True))
register_dataset(DatasetSpec(
    'cc12m', _records('cc12m'), 'image files + records with captions', readers.CC_LAYOUT['cc12m'],
    needs_root=True, needs_metadata=True))
register_dataset(DatasetSpec(
    'merged', _merged, f"several yfcc15m / cc3m / cc12m sets joined: '{MERGE_SEP}'-separated pairs",
    MERGED_LAYOUT, needs_root=True, needs_metadata=True, metadata_paths=_merged_metadata,
    aliases=('merged_opendata',)))                      # the upstream clip-rocket spelling
register_dataset(DatasetSpec(
    'wds', _wds, 'WebDataset tar shards as img2dataset writes them', streaming.WDS_LAYOUT,
    needs_root=True, add_args=_stream_flags))
register_dataset(DatasetSpec(
    'tarpairs', _tarpairs, "RangeAugment .tar.gz archives of ID_image / ID_text + cvnets' start id -> archive dict",
    streaming.TARPAIRS_LAYOUT, needs_root=True, needs_metadata=True, add_args=_stream_flags))
register_dataset(DatasetSpec(
    'tfrecord', _tfrecord, 'TFRecord shards of tf.train.Example (jpg, txt) as img2dataset writes them; gzip too',
    streaming.TFRECORD_LAYOUT, needs_root=True, add_args=_stream_flags))
register_dataset(DatasetSpec(
    'csv', _csv, 'OpenCLIP CSV/TSV: image-path and caption columns (--root optional)',
    readers.csv_layout('\t', 'filepath', 'title'), needs_metadata=True, add_args=_csv_flags))  # the flag defaults
register_dataset(DatasetSpec(
    'coco', _coco, 'MS-COCO captions JSON + image folder, five captions per image', readers.COCO_LAYOUT,
    needs_root=True, needs_metadata=True))
register_dataset(DatasetSpec(
    'folder', _folder, 'train-CLIP: x.jpg pairs with x.txt anywhere under the root', readers.FolderReader.layout,
    needs_root=True))

def resolve_data_args(args):
    """Check the data flags before any work starts (ValueError = one-line usage error)."""
    args.dataset = aliases().get(args.dataset, args.dataset)
    spec = DATASETS.get(args.dataset)
    if not 0 <= args.max_bad_fraction <= 1:
        raise ValueError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}")
    utils.check_counts(args, positive=['max_image_pixels', 'prefetch_factor'], non_negative=['workers'])
    if spec.needs_root and not args.root:
        raise ValueError(f"--dataset {args.dataset} needs --root (see docs/data.md)")
    if spec.needs_metadata and not args.metadata:
        raise ValueError(f"--dataset {args.dataset} needs --metadata (see docs/data.md)")
    for meta in spec.metadata_paths(args):
        if not os.path.isfile(meta):
            raise ValueError(f"--metadata: no such file {meta!r}")


def build_train_dataset(args, tokenizer):
    """The registered reader for args.dataset, checked on a few samples: a data source that is
    mostly unusable (wrong --root, wrong --metadata) stops here with one line."""
    try:
        dataset = DATASETS.get(args.dataset).build(args, tokenizer)
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
    (samples get their seed from the sampler, so nothing in a worker goes stale) and leave
    SIGTERM / SIGUSR1 to the main process (utils.StopSafeLoader: a scancel checkpoints)."""
    workers = args.workers
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=workers > 0,
                  prefetch_factor=args.prefetch_factor if workers > 0 else None,
                  worker_init_fn=augment.fresh_wordnet_files if workers > 0 else None)
    if isinstance(dataset, streaming.StreamReader):
        if multiscale.enabled(args):
            dataset.schedule = multiscale.Schedule.from_args(args)
        return StreamControl(dataset), utils.StopSafeLoader(dataset, batch_size=None, **common)
    sampler = ResumableSampler(len(dataset), seed=args.seed, num_samples=args.train_num_samples)
    if multiscale.enabled(args):
        return multiscale.map_loader(dataset, sampler, args, common)
    loader = utils.StopSafeLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
        generator=torch.Generator().manual_seed(args.seed), **common)
    return sampler, loader
