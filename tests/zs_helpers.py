"""Shared fixtures for the zero-shot tests: a model whose embeddings are constructed from the
pixels and the prompt text, so every metric's exact value is known, and generators of the
catalog's on-disk formats."""
import io
import json
import re
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import augment

STEP = 20          # class k is drawn as channel value STEP * k + STEP // 2


def coded_image(p, q, size=16):
    """An image the coded model reads as 'first choice p, second choice q'."""
    return Image.new('RGB', (size, size), (STEP * p + STEP // 2, STEP * q + STEP // 2, 0))


class CodedModel(torch.nn.Module):
    """encode_image: 1.0 on class p (red channel), 0.5 on class q (green channel), plus a
    small filler decreasing with the class index (so top-5 is fully determined); the `h` head
    swaps the roles of p and q. encode_text: one-hot of the class `clsK` named in the prompt.
    Counts text-tower calls."""

    def __init__(self, num_classes, tokenizer, heads=('z',), filler=0.01):
        super().__init__()
        self.k, self.tokenizer, self.filler = num_classes, tokenizer, filler
        if heads != ('z',):
            self.zeroshot_heads = heads
        self.text_calls = 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def _pixels(self, x, channel):
        mean, std = augment.CLIP_MEAN[channel], augment.CLIP_STD[channel]
        value = (x[:, channel].mean(dim=(1, 2)) * std + mean) * 255
        return (value.round() // STEP).long()

    def encode_image(self, x, normalize=True, head='z'):
        assert head in getattr(self, 'zeroshot_heads', ('z',))
        p, q = self._pixels(x, 0), self._pixels(x, 1)
        if head == 'h':
            p, q = q, p
        emb = self.filler * (self.k - torch.arange(self.k, dtype=torch.float)) / self.k
        emb = emb.repeat(len(x), 1)
        rows = torch.arange(len(x))
        emb[rows, q] = 0.5
        emb[rows, p] = 1.0                               # p wins when p == q
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens, normalize=True, head='z'):
        self.text_calls += 1
        ids = [int(re.search(r'cls(\d+)', self.tokenizer.decode(t).replace(' ', '')).group(1))
               for t in tokens]
        emb = F.one_hot(torch.tensor(ids), self.k).float()
        return F.normalize(emb, dim=-1) if normalize else emb


# (label, p, q): z top-1 right for a b e g i (5/9), top-5 right also for c h (7/9);
# h (q first) top-1 right for c h (2/9); per-class recall 1,1,0,1,0,1,.5,0 -> 0.5625
SAMPLES = [(0, 0, 1), (1, 1, 0), (2, 3, 2), (7, 0, 1), (6, 6, 7), (6, 5, 4), (3, 3, 0),
           (4, 2, 4), (5, 5, 6)]
NUM_CLASSES = 8
EXPECTED = {'acc1': 5 / 9, 'acc5': 7 / 9, 'mean_per_class_recall': 4.5 / 8, 'h_acc1': 2 / 9}


def write_catalog(tmp, entries, num_classes=NUM_CLASSES, templates=('a photo of a {}.', 'art of {}.')):
    """Catalog, labels and templates files for `entries` with classes cls0..clsK-1."""
    names = [f'cls{i}' for i in range(num_classes)]
    files = {}
    for kind, obj in (('catalog', entries),
                      ('labels', {n: names for n in entries}),
                      ('templates', {n: list(templates) for n in entries})):
        files[kind] = str(tmp / f'{kind}.json')
        with open(files[kind], 'w') as f:
            json.dump(obj, f)
    return files


def make_imagefolder(root, samples=SAMPLES, num_classes=NUM_CLASSES):
    for i, (y, p, q) in enumerate(samples):
        d = root / f'cls{y}'
        d.mkdir(parents=True, exist_ok=True)
        coded_image(p, q).save(d / f'{i}.png')
    return root


def make_filelist(root, split='val', npy=False, samples=SAMPLES):
    root.mkdir(parents=True, exist_ok=True)
    (root / 'img').mkdir(exist_ok=True)
    paths, labels = [], []
    for i, (y, p, q) in enumerate(samples):
        coded_image(p, q).save(root / 'img' / f'{i}.png')
        paths.append(f'img/{i}.png')
        labels.append(f'count_{y}')
    if npy:
        np.save(root / f'{split}_images.npy', np.array(paths))
        np.save(root / f'{split}_labels.npy', np.array([int(v.split('_')[1]) for v in labels]))
    else:
        (root / f'{split}.txt').write_text(''.join(f'{p} {y}\n' for p, y in zip(paths, labels)))
    return root


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_wds(root, samples=SAMPLES, num_classes=NUM_CLASSES, per_shard=4, retrieval=None):
    """CLIP_benchmark's export layout; `retrieval` = [(p, q, [captions])] makes a retrieval set."""
    (root / 'test').mkdir(parents=True, exist_ok=True)
    items = retrieval if retrieval is not None else samples
    shards = [items[i:i + per_shard] for i in range(0, len(items), per_shard)]
    for s, shard in enumerate(shards):
        with tarfile.open(root / 'test' / f'{s}.tar', 'w') as tar:
            for j, item in enumerate(shard):
                key = f's{s:03d}{j:04d}'
                buf = io.BytesIO()
                if retrieval is not None:
                    p, q, caps = item
                    coded_image(p, q).save(buf, format='png')
                    _add(tar, f'{key}.png', buf.getvalue())
                    _add(tar, f'{key}.txt', '\n'.join(caps).encode())
                else:
                    y, p, q = item
                    coded_image(p, q).save(buf, format='png')
                    _add(tar, f'{key}.png', buf.getvalue())
                    _add(tar, f'{key}.cls', str(y).encode())
    (root / 'test' / 'nshards.txt').write_text(f'{len(shards)}\n')
    if retrieval is not None:
        (root / 'dataset_type.txt').write_text('retrieval\n')
    else:
        (root / 'classnames.txt').write_text(''.join(f'cls{i}\n' for i in range(num_classes)))
        (root / 'zeroshot_classification_templates.txt').write_text('a photo of a {c}.\n')
    return root


def make_tfds(root, samples=SAMPLES, num_classes=NUM_CLASSES, name='toyset', version='1.0.0',
              split='validation', shards=2, label_names=True):
    """TensorFlow Datasets' on-disk layout: root/<name>/<version>/dataset_info.json,
    <name>-<split>.tfrecord-0000k-of-0000N (Examples: `image` PNG bytes, int64 `label`,
    `file_name`), label.labels.txt; written with tests/datagen.py's own TFRecord encoder."""
    from datagen import example_bytes, write_records
    folder = root / name / version
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(samples) // shards)
    lengths = []
    for k in range(shards):
        payloads = []
        for i, (y, p, q) in list(enumerate(samples))[k * per:(k + 1) * per]:
            buf = io.BytesIO()
            coded_image(p, q).save(buf, format='png')
            payloads.append(example_bytes({'image': buf.getvalue(), 'label': y, 'file_name': f'{i}.png'}))
        write_records(folder / f'{name}-{split}.tfrecord-{k:05d}-of-{shards:05d}', payloads)
        lengths.append(str(len(payloads)))
    features = {'image': {'pythonClassName': 'tensorflow_datasets.core.features.image_feature.Image',
                          'image': {'shape': {'dimensions': ['-1', '-1', '3']}, 'dtype': 'uint8',
                                    'encodingFormat': 'png'}},
                'label': {'pythonClassName': 'tensorflow_datasets.core.features.class_label_feature.ClassLabel',
                          'classLabel': {'numClasses': str(num_classes)}},
                'file_name': {'pythonClassName': 'tensorflow_datasets.core.features.text_feature.Text', 'text': {}}}
    info = {'name': name, 'version': version, 'fileFormat': 'tfrecord', 'moduleName': f'{name}.{name}',
            'splits': [{'name': split, 'numBytes': '0', 'shardLengths': lengths,
                        'filepathTemplate': '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'}],
            'features': {'pythonClassName': 'tensorflow_datasets.core.features.features_dict.FeaturesDict',
                         'featuresDict': {'features': features}}}
    (folder / 'dataset_info.json').write_text(json.dumps(info, indent=2))
    if label_names:
        (folder / 'label.labels.txt').write_text(''.join(f'cls{i}\n' for i in range(num_classes)))
    return folder


def make_mnist(root, samples=SAMPLES):
    """torchvision MNIST raw files (idx format): test images coded p (greyscale: q = p)."""
    raw = root / 'MNIST' / 'raw'
    raw.mkdir(parents=True, exist_ok=True)

    def idx(path, array, magic):
        with open(path, 'wb') as f:
            f.write(np.array([0, 0, 8, magic], dtype=np.uint8).tobytes())
            f.write(np.array(array.shape, dtype='>i4').tobytes())
            f.write(array.astype(np.uint8).tobytes())
    images = np.stack([np.full((28, 28), STEP * p + STEP // 2) for _, p, _ in samples])
    labels = np.array([y for y, _, _ in samples])
    for prefix in ('train', 't10k'):
        idx(raw / f'{prefix}-images-idx3-ubyte', images, 3)
        idx(raw / f'{prefix}-labels-idx1-ubyte', labels, 1)
    return root


# Retrieval: (p, q, captions). Text->image recall@1 = 4/5, image->text recall@1 = 3/4.
RETRIEVAL = [(0, 1, ['cls0', 'cls2']), (1, 0, ['cls1']), (2, 3, ['cls3']), (4, 0, ['cls4'])]


def make_coco(root, items=RETRIEVAL):
    (root / 'images').mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (p, q, caps) in enumerate(items):
        coded_image(p, q).save(root / 'images' / f'{i}.png')
        images.append({'id': 100 + i, 'file_name': f'{i}.png'})
        annotations += [{'image_id': 100 + i, 'id': len(annotations) + j, 'caption': c}
                        for j, c in enumerate(caps)]
    (root / 'ann.json').write_text(json.dumps({'images': images, 'annotations': annotations}))
    return root


def make_flickr(root, items=RETRIEVAL):
    root.mkdir(parents=True, exist_ok=True)
    lines = ['image,caption']
    for i, (p, q, caps) in enumerate(items):
        coded_image(p, q).save(root / f'{i}.jpg', format='png')
        lines += [f'{i}.jpg,{c}' for c in caps]
    (root / 'test.txt').write_text('\n'.join(lines) + '\n')
    return root


def tiny_checkpoint(path, name='CLIP_TINYVIT_CLIP', image_size=32, seed=0):
    import models
    import checkpoint
    torch.manual_seed(seed)
    model = models.create_model(name, image_size=image_size)
    checkpoint.save({'model': model.state_dict(), 'model_name': name,
                     'args': {'image_size': image_size, 'context_length': 77}}, str(path))
    return str(path)
