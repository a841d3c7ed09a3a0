"""Readers for the on-disk formats of the zero-shot catalog (dataset_catalog.json).

A catalog entry names a primary source (`type`, `path`, type options) and optional
`fallbacks` (other layouts of the same data, e.g. CLIP_benchmark's webdataset export); the
first source whose files are present is read. Paths are relative to the data root unless
absolute. Samples are dicts: {'image', 'label'} for classification, {'image', 'captions'}
for retrieval.

| type | layout under `path` |
|---|---|
| `shapes` | none: generated in memory (datasets.ShapesLabels; `split`: val or a shift split of shapes.py) |
| `imagefolder` | one folder per class; label = position of the folder in sorted order (torchvision ImageFolder), or in `folders`, or the folder name itself with `int_folders` |
| `torchvision` | what `torchvision.datasets.<class>(root=path, download=False, **kwargs)` reads |
| `filelist` | `<split>_images.npy` + `<split>_labels.npy` (upstream SLIP), or `<split>.txt` lines `image label`; string labels are looked up in `label_names` |
| `wds` | CLIP_benchmark's export: `<split>/nshards.txt`, `<split>/0.tar`…, `classnames.txt`, `zeroshot_classification_templates.txt`, `dataset_type.txt` |
| `tfds` | TensorFlow Datasets' layout: `dataset_info.json`, `<name>-<split>.tfrecord-NNNNN-of-MMMMM` (Examples with an encoded `image` and an int64 `label`), `label.labels.txt`; `path` is the version folder or the dataset folder above it (newest version) |
| `retrieval` | `images` folder + `annotation`: COCO captions JSON, Karpathy JSON (`split`), a JSON list of {image, captions}, or CLIP_benchmark's Flickr `image,caption` text |
"""
import glob
import io
import json
import os
import re
from collections import OrderedDict, defaultdict
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

import augment
import tfrecord

IMAGE_KEYS = 'webp;png;jpg;jpeg'


# ----------------------------------------------------------------------------- locating

def task_of(entry):
    return 'zeroshot_retrieval' if entry['type'] == 'retrieval' else 'zeroshot_classification'


def sources(entry):
    return [entry] + list(entry.get('fallbacks', []))


def source_path(source, data_root):
    path = os.path.expanduser(source.get('path', ''))
    return path if os.path.isabs(path) else os.path.join(data_root or '.', path)


def present(source, path):
    kind = source['type']
    if kind == 'shapes':
        return True
    if kind == 'wds':
        return os.path.isfile(os.path.join(path, source.get('split', 'test'), 'nshards.txt'))
    if kind == 'filelist':
        split = source.get('split', 'test')
        return any(os.path.isfile(os.path.join(path, f)) for f in
                   (f'{split}_images.npy', f'{split}.txt'))
    if kind == 'tfds':
        return bool(tfds_shards(path, source.get('split', 'validation'))[1])
    if kind == 'retrieval':
        return (os.path.isfile(os.path.join(path, source['annotation']))
                and os.path.isdir(os.path.join(path, source.get('images', '.'))))
    return os.path.isdir(path)


def locate(name, entry, data_root, paths=None):
    """(source with its resolved `path`, path) for the first source present, else
    (None, the primary path). `paths` {name: path} overrides the primary source's path."""
    if entry['type'] == 'shapes':
        return dict(entry), None
    primary = None
    for i, source in enumerate(sources(entry)):
        path = (paths[name] if i == 0 and paths and name in paths
                else source_path(source, data_root))
        primary = primary or path
        if present(source, path):
            return dict(source, path=path), path
    return None, primary


# ----------------------------------------------------------------------------- readers

# what reading one damaged sample raises: PIL (OSError, SyntaxError, DecompressionBombError),
# numpy/our parsers (ValueError), a TFRecord whose checksum fails (tfrecord.ShardError)
UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, tfrecord.ShardError)


class SkipUnreadable(Dataset):
    """A map-style evaluation set whose damaged samples become {'unreadable': reason} (dropped
    and counted by `collate`) instead of stopping the evaluation."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        try:
            return self.base[i]
        except UNREADABLE as e:
            return {'unreadable': f"sample {i}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def collate(batch):
    """Samples -> a batch; damaged ones (SkipUnreadable) leave only their reasons, in
    'unreadable' (a batch of nothing but damaged samples has no 'image')."""
    unreadable = [b['unreadable'] for b in batch if 'unreadable' in b]
    batch = [b for b in batch if 'unreadable' not in b]
    out = _collate(batch) if batch else {}
    if unreadable:
        out['unreadable'] = unreadable
    return out


def _collate(batch):
    if 'captions' in batch[0]:
        return {'image': torch.stack([b['image'] for b in batch]),
                'captions': [b['captions'] for b in batch]}
    return default_collate(batch)


def pil_rgb(path):
    with open(path, 'rb') as f:
        return Image.open(f).convert('RGB')


class Labeled(Dataset):
    """(image, label) dataset -> {'image', 'label'} samples."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return {'image': image, 'label': int(label)}


def image_folder(path, transform, folders=None, int_folders=False):
    from torchvision.datasets import ImageFolder

    class Folder(ImageFolder):
        def find_classes(self, directory):
            names = sorted(d.name for d in os.scandir(directory) if d.is_dir())
            if folders:
                return list(folders), {f: i for i, f in enumerate(folders)}
            if int_folders:
                return sorted(names, key=int), {n: int(n) for n in names}
            return names, {n: i for i, n in enumerate(names)}
    return Folder(path, transform=transform, loader=pil_rgb)


class FileList(Dataset):
    """Images listed in `<split>_images.npy` / `<split>_labels.npy` or `<split>.txt`."""

    def __init__(self, path, split, transform, label_names=None):
        npy = os.path.join(path, f'{split}_images.npy')
        if os.path.isfile(npy):
            images = np.load(npy, allow_pickle=False).tolist()
            labels = np.load(os.path.join(path, f'{split}_labels.npy'), allow_pickle=False).tolist()
        else:
            with open(os.path.join(path, f'{split}.txt')) as f:
                rows = [line.rstrip('\n').rsplit(None, 1) for line in f if line.strip()]
            images, labels = [r[0] for r in rows], [r[1] for r in rows]
        index = {n: i for i, n in enumerate(label_names or [])}
        self.labels = [index[str(y)] if label_names else int(y) for y in labels]
        self.images = [os.path.join(path, p) for p in images]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {'image': self.transform(pil_rgb(self.images[i])), 'label': self.labels[i]}


class Captions(Dataset):
    """Retrieval set: (image file, [captions]) pairs from one annotation file."""

    def __init__(self, root, images, annotation, transform, split='test'):
        self.root, self.transform = os.path.join(root, images), transform
        self.items = read_captions(os.path.join(root, annotation), split)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image, captions = self.items[i]
        return {'image': self.transform(pil_rgb(os.path.join(self.root, image))),
                'captions': list(captions)}


def read_captions(path, split='test'):
    """[(image, [captions])] from COCO / Karpathy / list JSON or `image,caption` text."""
    if not path.endswith('.json'):
        grouped = OrderedDict()
        with open(path) as f:
            next(f)                                                       # header line
            for line in f:
                if line.strip():
                    image, _, caption = line.strip().partition(',')
                    grouped.setdefault(image, []).append(caption)
        return list(grouped.items())
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        return [(d.get('image') or d['filename'], d['captions']) for d in data]
    if 'annotations' in data:                                             # COCO captions
        files = {im['id']: im['file_name'] for im in data['images']}
        caps = defaultdict(list)
        for a in data['annotations']:
            caps[a['image_id']].append(a['caption'])
        return [(files[i], caps[i]) for i in sorted(files)]
    return [(os.path.join(im.get('filepath', ''), im['filename']),        # Karpathy
             [s['raw'] for s in im['sentences']])
            for im in data['images'] if im.get('split', split) == split]


def _labeled(transform, sample):
    image, label = sample
    return {'image': transform(image), 'label': int(label)}


def _captioned(transform, sample):
    image, text = sample
    return {'image': transform(image), 'captions': text.splitlines()}


def wds_reader(path, split, transform):
    """CLIP_benchmark's webdataset export -> (iterable dataset, class names or None,
    templates or None, 'classification' | 'retrieval')."""
    import webdataset as wds

    def read(name):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return None
        with open(file) as f:
            return [line.strip() for line in f.read().splitlines() if line.strip()]
    with open(os.path.join(path, split, 'nshards.txt')) as f:
        shards = int(f.read())
    kind = (read('dataset_type.txt') or ['classification'])[0].lower()
    urls = [os.path.join(path, split, f'{i}.tar') for i in range(shards)]
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda s: s,
                        empty_check=False).decode('pil')
    if kind == 'retrieval':
        ds = ds.to_tuple(IMAGE_KEYS, 'txt').map(partial(_captioned, transform))
    else:
        ds = ds.to_tuple(IMAGE_KEYS, 'cls').map(partial(_labeled, transform))
    templates = read('zeroshot_classification_templates.txt')
    return ds, read('classnames.txt'), templates and [t.replace('{c}', '{}') for t in templates], kind


def tfds_shards(path, split):
    """(folder holding dataset_info.json, its `split` shards in order) for `path` = that folder
    or the dataset folder above its version folders (TFDS writes <name>/<version>/: the newest
    is taken); (None, []) when there is none."""
    folder = path
    if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
        versions = [d for d in (os.listdir(path) if os.path.isdir(path) else [])
                    if re.fullmatch(r'\d+(\.\d+)*', d) and os.path.isfile(os.path.join(path, d, 'dataset_info.json'))]
        if not versions:
            return None, []
        folder = os.path.join(path, max(versions, key=lambda v: tuple(map(int, v.split('.')))))
    try:
        with open(os.path.join(folder, 'dataset_info.json')) as f:
            name = json.load(f).get('name')
    except (ValueError, AttributeError):          # unreadable: any <name>-<split> shards will do
        name = None
    pattern = f"{glob.escape(name) if name else '*'}-{split}.tfrecord-*-of-*"
    return folder, sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))


class TFDSSplit(Dataset):
    """One split of a TFDS classification set: records located once from their headers,
    each read, CRC-checked and parsed on access (tfrecord.py); {'image', 'label'}."""

    def __init__(self, path, split, transform):
        self.folder, shards = tfds_shards(path, split)
        self.transform, self.index, self._open = transform, [], (None, None)
        for shard in shards:
            with tfrecord.open_shard(shard) as f:
                self.index += [(shard, n, offset) for n, offset in enumerate(tfrecord.record_offsets(f, shard))]
        names = os.path.join(self.folder, 'label.labels.txt')
        self.classnames = None
        if os.path.isfile(names):
            with open(names) as f:
                self.classnames = [line.strip() for line in f if line.strip()]

    def __len__(self):
        return len(self.index)

    def _file(self, shard):
        """The shard's open file, kept while consecutive items come from it."""
        if self._open[0] != shard:
            if self._open[1] is not None:
                self._open[1].close()
            self._open = (shard, tfrecord.open_shard(shard))
        return self._open[1]

    def __getitem__(self, i):
        shard, n, offset = self.index[i]
        f = self._file(shard)
        f.seek(offset)
        data, intact = next(tfrecord.records(f, shard))
        if not intact:
            raise tfrecord.ShardError(f"{shard}: record #{n}: data CRC mismatch")
        features = tfrecord.parse_example(data)
        image = Image.open(io.BytesIO(features['image'][0])).convert('RGB')
        return {'image': self.transform(image), 'label': int(features['label'][0])}


class RGBTransform:
    """The evaluation transform (augment.eval_transform) on RGB images (MNIST is greyscale)."""

    def __init__(self, image_size):
        self.transform = augment.eval_transform(image_size)

    def __call__(self, image):
        return self.transform(image.convert('RGB') if isinstance(image, Image.Image) else image)


def build(name, source, image_size, task, classnames=None, templates=None):
    """-> (dataset, class names, templates) for a located source; class names and templates
    come from labels.json / templates.json (a wds export's own files take precedence)."""
    kind = source['type']
    transform = RGBTransform(image_size)
    path = source.get('path')
    if kind == 'shapes':
        import datasets
        dataset = datasets.ShapesLabels(source['num_samples'], image_size, source.get('split', 'val'))
    elif kind == 'imagefolder':
        dataset = Labeled(image_folder(path, transform, source.get('folders'),
                                       source.get('int_folders', False)))
    elif kind == 'torchvision':
        import torchvision.datasets
        cls = getattr(torchvision.datasets, source['class'])
        dataset = Labeled(cls(root=path, transform=transform, download=False,
                              **source.get('kwargs', {})))
    elif kind == 'filelist':
        dataset = FileList(path, source.get('split', 'test'), transform, source.get('label_names'))
    elif kind == 'wds':
        dataset, wds_names, wds_templates, _ = wds_reader(path, source.get('split', 'test'), transform)
        classnames, templates = wds_names or classnames, wds_templates or templates
    elif kind == 'tfds':
        dataset = TFDSSplit(path, source.get('split', 'validation'), transform)
        if classnames and dataset.classnames and len(classnames) != len(dataset.classnames):
            raise ValueError(f"{name}: labels.json has {len(classnames)} class names, "
                             f"{dataset.folder}/label.labels.txt {len(dataset.classnames)}")
        classnames = classnames or dataset.classnames          # labels.json first: TFDS's may be ids
    elif kind == 'retrieval':
        dataset = Captions(path, source.get('images', '.'), source['annotation'], transform,
                           source.get('split', 'test'))
    else:
        raise ValueError(f"{name}: unknown catalog type {kind!r}; valid: shapes, imagefolder, "
                         f"torchvision, filelist, wds, tfds, retrieval")
    if task == 'zeroshot_classification' and not (classnames and templates):
        raise ValueError(f"{name}: no class names / templates (labels.json, templates.json)")
    if not isinstance(dataset, torch.utils.data.IterableDataset):
        dataset = SkipUnreadable(dataset)
    return dataset, classnames, templates
