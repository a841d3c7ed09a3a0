"""Map-style readers, one per on-disk layout: yfcc15m (zip tree), cc3m / cc12m / csv / coco
(image files + captions in metadata), folder (image + .txt pairs), merged (a union).

Every reader turns (index, seed) into a sample through `augment.SampleBuilder`. A sample
that cannot be used (see decode.SKIP_REASONS) is replaced by another one, chosen from the
seed, so batch shapes hold and the epoch stays a pure function of the seed; the sample
carries the counts (`_events`) to the training loop, which logs them per epoch.
"""
import bisect
import csv
import json
import os
import zipfile
import zlib
from collections import OrderedDict, defaultdict

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

import utils
from decode import EVENTS, NOTES, SKIP_REASONS, Skip, clean_captions, decode_image, read_bytes
from metadata import DataError, build_records, load_records

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
PROBE = 16                  # samples decoded at start; more than half bad stops the run
MAX_RETRIES = 64            # replacements tried for one unusable sample
PRINT_FIRST = 5             # skipped samples printed per process (all are counted)


# ----------------------------------------------------------------------------- seeds

def _splitmix(x):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mix_seeds(*parts):
    """Hash integers / integer arrays (broadcast) into seeds in [0, 2**63): the per-sample
    seed is mix_seeds(run_seed, epoch, index)."""
    with np.errstate(over='ignore'):
        h = np.asarray(0x9E3779B97F4A7C15, np.uint64)
        for p in parts:
            h = _splitmix(h ^ np.asarray(p, np.int64).astype(np.uint64))
        return (h >> np.uint64(1)).astype(np.int64)


def mix_seed(*parts):
    return int(mix_seeds(*parts))


def unpack(item, run_seed=0):
    """A sampler item (index, seed, epoch) -> (index, seed, epoch); a bare index gets the
    seed of epoch 0."""
    if isinstance(item, tuple):
        return item[0], item[1], item[2] if len(item) > 2 else 0
    return item, mix_seed(run_seed, 0, item), 0


# ----------------------------------------------------------------------------- batches

def collate(samples):
    """Stack the samples; their skip/note events become one count vector `_data['counts']`
    over decode.EVENTS (so the counts survive DataLoader worker processes)."""
    counts, errors = dict.fromkeys(EVENTS, 0), []
    for sample in samples:
        for event in sample.pop('_events', ('drawn',)):
            counts[event] += 1
        error = sample.pop('_error', None)
        if error:
            errors.append(error)
    batch = default_collate(samples)
    batch['_data'] = {'counts': torch.tensor([counts[e] for e in EVENTS]), 'errors': errors[:1]}
    return batch


class DataLog:
    """Per-epoch data health from the batches' `_data`: samples drawn, skipped by reason,
    notes. Stops the run (one line naming the first failing file) once more than
    `max_bad_fraction` of the drawn samples were unusable, checked every batch after
    `check_after` samples and at the end of the epoch."""

    def __init__(self, max_bad_fraction=1.0, check_after=1000):
        self.max_bad_fraction, self.check_after = max_bad_fraction, check_after
        self.counts = torch.zeros(len(EVENTS), dtype=torch.long)
        self.first_error = None

    def update(self, report):
        if report is None:
            return
        self.counts += report['counts']
        if self.first_error is None and report['errors']:
            self.first_error = report['errors'][0]
        if self.counts[0] >= self.check_after:
            self.check()

    def _named(self):
        return dict(zip(EVENTS, self.counts.tolist()))

    def check(self):
        c = self._named()
        skipped = sum(c[r] for r in SKIP_REASONS)
        if c['drawn'] and skipped > self.max_bad_fraction * c['drawn']:
            reasons = ', '.join(f'{r} {c[r]}' for r in SKIP_REASONS if c[r])
            raise SystemExit(f"main.py: error: {skipped} of {c['drawn']} samples drawn this epoch were "
                             f"unusable ({skipped / c['drawn']:.1%} > --max-bad-fraction "
                             f"{self.max_bad_fraction:g}; {reasons}); first: {self.first_error}")

    def summary(self):
        """All ranks' counts summed -> {'data_drawn', 'data_skipped', 'data_skipped_<reason>',
        'data_<note>'}; prints one line when anything was skipped or noted."""
        if utils.is_dist():
            counts = self.counts.cuda() if torch.distributed.get_backend() == 'nccl' else self.counts.clone()
            torch.distributed.all_reduce(counts)
            self.counts = counts.cpu()
        c = self._named()
        skipped = sum(c[r] for r in SKIP_REASONS)
        if skipped or any(c[n] for n in NOTES):
            parts = [f'{r} {c[r]}' for r in SKIP_REASONS + NOTES if c[r]]
            print(f"data: {c['drawn']} samples drawn, {skipped} skipped "
                  f"({skipped / max(c['drawn'], 1):.2%}): {', '.join(parts)}"
                  + (f"; first: {self.first_error}" if self.first_error else ''))
        self.check()
        return {'data_drawn': c['drawn'], 'data_skipped': skipped,
                **{f'data_skipped_{r}': c[r] for r in SKIP_REASONS}, **{f'data_{n}': c[n] for n in NOTES}}


# ----------------------------------------------------------------------------- base

class CaptionReader(Dataset):
    """Base of the map-style readers. Subclasses give `__len__`, `captions_of(i)` ->
    (raw captions, where) and `image_bytes(i)` -> (bytes, where); both may raise Skip."""

    name = 'reader'
    layout = ''                 # the expected layout, for error messages
    note_dropped_captions = True

    def __init__(self, builder, opts, seed=0):
        self.builder, self.opts, self.seed = builder, opts, seed
        self._printed = 0

    def load(self, i, seed):
        """-> (sample, notes) or raise Skip. Captions are checked before the image is read."""
        raw, where = self.captions_of(i)
        captions, notes = clean_captions(raw, where)
        if not self.note_dropped_captions and 'caption_dropped' in notes:
            notes.remove('caption_dropped')
        data, where = self.image_bytes(i)
        image, note = decode_image(data, where, self.opts)
        return self.builder(image, captions, seed), notes + ([note] if note else [])

    def __getitem__(self, item):
        index, seed, _ = unpack(item, self.seed)
        events, error = ['drawn'], None
        start = mix_seed(seed, 1) % len(self)
        for attempt in range(MAX_RETRIES + 1):
            try:
                sample, notes = self.load(index, seed if attempt == 0 else mix_seed(seed, attempt))
            except Skip as e:
                if attempt == 0:
                    events.append(e.reason)
                    error = str(e)
                    self._print(e)
                else:
                    events.append('retry_failed')
                index = (start + attempt) % len(self)      # replacement: probe from a seeded start
                continue
            sample['_events'] = events + (notes if attempt == 0 else [])   # notes: the drawn sample's
            sample['_error'] = error
            return sample
        raise RuntimeError(f"{self.name}: {MAX_RETRIES} replacement samples in a row were unusable "
                           f"(first: {error}); the data source is mostly bad")

    def _print(self, e):
        self._printed += 1
        if self._printed <= PRINT_FIRST:
            more = ' (further skips are counted, not printed)' if self._printed == PRINT_FIRST else ''
            print(f"data: skipped {e}{more}")

    def probe(self):
        """Decode up to PROBE samples spread over the dataset; stop when most fail."""
        n = len(self)
        if n == 0:
            raise DataError(f"{self.name}: no samples found; expected {self.layout}")
        picks = sorted({int(i) for i in np.linspace(0, n - 1, min(PROBE, n))})
        failures = []
        for i in picks:
            try:
                raw, where = self.captions_of(i)
                clean_captions(raw, where)
                data, where = self.image_bytes(i)
                decode_image(data, where, self.opts)
            except Skip as e:
                failures.append(e)
        if 2 * len(failures) > len(picks):
            raise DataError(f"{self.name}: {len(failures)} of {len(picks)} probed samples are unusable "
                            f"(first: {failures[0]}); expected {self.layout}")
        return len(failures), len(picks)


def _zip_cache(owner):
    """Open ZipFile handles of this process (a forked worker must not share its parent's)."""
    if getattr(owner, '_zips_pid', None) != os.getpid():
        owner._zips, owner._zips_pid = OrderedDict(), os.getpid()
    return owner._zips


# ----------------------------------------------------------------------------- yfcc15m

class YFCCZipReader(CaptionReader):
    """YFCC15M: photo index 12345678 is member 678.jpg of root/images/12/345.zip. Zip
    handles stay open per worker (at most `max_open`); nothing is extracted to disk."""

    name = 'yfcc15m'
    layout = ("--root DIR holding images/XX/YYY.zip (photo 12345678 = 678.jpg in images/12/345.zip) "
              "and --metadata listing (index, title, description)")
    note_dropped_captions = False      # title *or* description is normal for YFCC
    max_open = 64

    def __init__(self, records, root, builder, opts, seed=0):
        super().__init__(builder, opts, seed)
        self.records, self.root = records, root

    def __len__(self):
        return len(self.records)

    def _locate(self, i):
        index = self.records.key(i)
        if index < 0:
            raise Skip('bad_record', f'metadata record #{i}', 'malformed')
        digits = f'{index:08d}'
        return os.path.join(self.root, 'images', digits[:2], digits[2:5] + '.zip'), digits[5:] + '.jpg'

    def captions_of(self, i):
        path, member = self._locate(i)
        return self.records.captions(i), f'{path}:{member}'

    def image_bytes(self, i):
        path, member = self._locate(i)
        where = f'{path}:{member}'
        try:
            data = self._zip(path).read(member)
        except KeyError:
            raise Skip('missing_file', where, 'no such zip member') from None
        except FileNotFoundError:
            raise Skip('missing_file', where, 'no such zip file') from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError) as e:
            raise Skip('corrupt_image', where, f'bad zip: {e}') from None
        if not data:
            raise Skip('empty_file', where)
        return data, where

    def _zip(self, path):
        zips = _zip_cache(self)
        if path in zips:
            zips.move_to_end(path)
            return zips[path]
        handle = zipfile.ZipFile(path)
        zips[path] = handle
        if len(zips) > self.max_open:
            zips.popitem(last=False)[1].close()
        return handle


# ----------------------------------------------------------------------------- files

class FileReader(CaptionReader):
    """Image files under `image_root`, captions from metadata: cc3m, cc12m, csv, coco."""

    def __init__(self, name, layout, records, image_root, builder, opts, seed=0):
        super().__init__(builder, opts, seed)
        self.name, self.layout = name, layout
        self.records, self.image_root = records, image_root

    def __len__(self):
        return len(self.records)

    def _path(self, i):
        rel = self.records.key(i)
        if not rel:
            raise Skip('bad_record', f'{self.name} metadata record #{i}', 'no image path')
        return os.path.join(self.image_root, rel)

    def captions_of(self, i):
        return self.records.captions(i), self._path(i)

    def image_bytes(self, i):
        path = self._path(i)
        return read_bytes(path), path


class FolderReader(CaptionReader):
    """train-CLIP layout: every image `a/b/x.jpg` pairs with `x.txt` anywhere under the
    root (sub-folders ignored); one caption per line of the text file."""

    name = 'folder'
    layout = "--root DIR where each image x.jpg/.png/... has a caption file x.txt (any sub-folder)"
    note_dropped_captions = False      # blank lines between captions are normal

    def __init__(self, root, builder, opts, seed=0):
        super().__init__(builder, opts, seed)
        images, texts = {}, {}
        dup_images = dup_texts = 0
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                stem, ext = os.path.splitext(fname)
                target = images if ext.lower() in IMAGE_SUFFIXES else texts if ext.lower() == '.txt' else None
                if target is None:
                    continue
                if stem in target:
                    dup_images += target is images
                    dup_texts += target is texts
                    continue
                target[stem] = os.path.join(dirpath, fname)
        stems = sorted(images.keys() & texts.keys())
        self.images = [images[s] for s in stems]
        self.texts = [texts[s] for s in stems]
        lone_images, lone_texts = len(images) - len(stems), len(texts) - len(stems)
        if lone_images or lone_texts or dup_images or dup_texts:
            print(f"folder {root}: {len(stems)} image/caption pairs; ignored: {lone_images} images "
                  f"without a .txt, {lone_texts} .txt without an image, {dup_images + dup_texts} "
                  f"files whose name repeats another's")

    def __len__(self):
        return len(self.images)

    def captions_of(self, i):
        path = self.texts[i]
        try:
            with open(path, 'rb') as f:
                data = f.read()
        except OSError:
            raise Skip('caption_missing', path, 'cannot read the caption file') from None
        try:
            text = data.decode('utf-8')
        except UnicodeDecodeError as e:
            raise Skip('caption_not_utf8', path, f'byte {e.start}') from None
        return text.split('\n'), path

    def image_bytes(self, i):
        return read_bytes(self.images[i]), self.images[i]


class ConcatReader(Dataset):
    """`merged`: several readers sampled as one (index i runs over their union)."""

    def __init__(self, readers):
        self.readers = readers
        self.ends = np.cumsum([len(r) for r in readers]).tolist()
        self.name = 'merged(' + ', '.join(r.name for r in readers) + ')'

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, item):
        index, seed, epoch = unpack(item, self.readers[0].seed)
        k = bisect.bisect_right(self.ends, index)
        return self.readers[k][(index - (self.ends[k - 1] if k else 0), seed, epoch)]

    def probe(self):
        return [r.probe() for r in self.readers]


# ----------------------------------------------------------------------------- builders

CC_LAYOUT = {
    'cc3m': "--root DIR with the images and --metadata records {'image_id': path under DIR, 'captions': [...]}",
    'cc12m': "--root DIR with the images and --metadata records {'image_name': path under DIR, "
             "'image_id': ..., 'captions': [...]}",
}


def records_reader(kind, root, metadata, builder, opts, seed, allow_pickle):
    """yfcc15m / cc3m / cc12m (kind None = inferred from the metadata, for merged)."""
    records = load_records(metadata, kind, allow_pickle)
    if not os.path.isdir(root):
        raise DataError(f"{records.kind}: --root {root!r} is not a directory; expected "
                        f"{YFCCZipReader.layout if records.kind == 'yfcc15m' else CC_LAYOUT[records.kind]}")
    if records.kind == 'yfcc15m':
        if not os.path.isdir(os.path.join(root, 'images')):
            raise DataError(f"yfcc15m: no images/ folder in --root {root!r}; expected {YFCCZipReader.layout}")
        return YFCCZipReader(records, root, builder, opts, seed)
    return FileReader(records.kind, CC_LAYOUT[records.kind], records, root, builder, opts, seed)


def csv_reader(path, root, img_key, caption_key, separator, builder, opts, seed):
    """OpenCLIP-style CSV/TSV: a header row naming the image-path and caption columns."""
    if not os.path.isfile(path):
        raise DataError(f"csv: metadata file not found: {path!r} (pass --metadata FILE.csv)")
    keys, captions, bad = [], [], 0
    with open(path, newline='', encoding='utf-8', errors='surrogateescape') as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        for key, flag in ((img_key, '--csv-img-key'), (caption_key, '--csv-caption-key')):
            if key not in columns:
                raise DataError(f"csv {path}: no column {key!r} ({flag}); its columns with "
                                f"--csv-separator {separator!r}: {', '.join(map(repr, columns)) or 'none'}")
        for row in reader:
            image = row.get(img_key)
            bad += not image
            keys.append(image or '')
            captions.append([row.get(caption_key)])
    base = root or os.path.dirname(os.path.abspath(path))
    layout = csv_layout(separator, img_key, caption_key)
    return FileReader('csv', layout, build_records('csv', keys, captions, bad), base, builder, opts, seed)


def csv_layout(separator, img_key, caption_key):
    return (f"a {separator!r}-separated file with columns {img_key!r} (image path, relative to "
            f"--root or to the CSV's folder) and {caption_key!r}")


COCO_LAYOUT = ("--metadata captions_train2017.json ({'images': [{'id', 'file_name'}], 'annotations': "
               "[{'image_id', 'caption'}]}) and --root holding train2017/ (or the images directly)")


def coco_reader(path, root, builder, opts, seed):
    """MS-COCO captions: every image with its (usually five) captions."""
    if not os.path.isfile(path):
        raise DataError(f"coco: metadata file not found: {path!r}; expected {COCO_LAYOUT}")
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"coco {path}: not JSON ({e}); expected {COCO_LAYOUT}") from None
    anns = data.get('annotations') if isinstance(data, dict) else None
    if not isinstance(anns, list) or not anns or not isinstance(anns[0], dict) \
            or 'image_id' not in anns[0] or 'caption' not in anns[0]:
        raise DataError(f"coco {path}: wrong structure (got {type(data).__name__} with keys "
                        f"{sorted(data)[:5] if isinstance(data, dict) else '-'}); expected {COCO_LAYOUT}")
    files = {img['id']: img['file_name'] for img in data.get('images') or []
             if isinstance(img, dict) and 'id' in img and 'file_name' in img}
    by_image, bad = defaultdict(list), 0
    for ann in anns:
        if not isinstance(ann, dict) or not isinstance(ann.get('image_id'), int):
            bad += 1
            continue
        by_image[ann['image_id']].append(ann.get('caption'))
    if bad:
        print(f"coco {path}: {bad} annotations without an integer image_id were ignored")
    ids = sorted(by_image)
    keys = [files.get(i, f'{i:012d}.jpg') for i in ids]
    image_dir = os.path.join(root, 'train2017') if os.path.isdir(os.path.join(root, 'train2017')) else root
    if not os.path.isdir(image_dir):
        raise DataError(f"coco: --root {root!r} is not a directory; expected {COCO_LAYOUT}")
    records = build_records('coco', keys, [by_image[i] for i in ids])
    return FileReader('coco', COCO_LAYOUT, records, image_dir, builder, opts, seed)


def folder_reader(root, builder, opts, seed):
    if not os.path.isdir(root):
        raise DataError(f"folder: --root {root!r} is not a directory; expected {FolderReader.layout}")
    return FolderReader(root, builder, opts, seed)

