"""Training data: one reader per on-disk format behind a registry, image transforms, the
tokenizer, and a resumable sampler. A sample is a dict (`image` [3,H,W] float, `text` [77]
int64); batches are dicts of stacked tensors.

    >>> ds = build_train_dataset(args, Tokenizer())
"""
import math
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

import augment
import shapes
import utils

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- text

class Tokenizer:
    """OpenAI CLIP BPE (open_clip's packaged vocabulary): list[str] -> LongTensor [N, ctx]."""

    def __init__(self, context_length=77):
        from open_clip.tokenizer import SimpleTokenizer
        self.context_length = context_length
        self.bpe = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self.bpe.encoder)

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        return self.bpe(list(texts), context_length=self.context_length)

    def decode(self, tokens):
        ids = [int(t) for t in tokens if int(t) not in (0, self.bpe.sot_token_id, self.bpe.eot_token_id)]
        return self.bpe.decode(ids).strip()


def tokenize_unique(tokenizer, texts):
    """Tokenize each distinct string once: -> (tokens [U, ctx], index [len(texts)])."""
    uniq, index = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
    return tokenizer(uniq.tolist()), torch.from_numpy(index.astype(np.int64))


# ----------------------------------------------------------------------------- images

def train_transform(image_size, min_scale=0.5):
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(min_scale, 1.0),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def eval_transform(image_size):
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def normalize_uint8(images):
    """uint8 [..., 3, H, W] -> CLIP-normalised float32."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    return (images.float() - mean) / std


# ----------------------------------------------------------------------------- shapes

@lru_cache(maxsize=4)
def shapes_split(split, n, image_size, seed=0):
    """The generated shapes data, cached per process; images as uint8 [N, 3, H, W]."""
    data = shapes.generate(split, n=n, seed=seed, image_size=image_size, workers=2)
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
    return data, images


class ShapesCaptions(Dataset):
    """The embedded `shapes` training set: one of the image's captions per epoch, chosen by
    (seed, epoch, index) so that any epoch can be replayed exactly. Positions and sizes are
    part of the captions, so no crop/flip augmentation is applied."""

    def __init__(self, n, image_size, tokenizer, seed=0, builder=None):
        self.data, self.images = shapes_split('train', n, image_size)
        self.builder = builder if builder is not None and builder.view_transforms else None
        flat = [c for caps in self.data.captions for c in caps]
        self.tokens, index = tokenize_unique(tokenizer, flat)
        self.caption_index = index.view(len(self.data.captions), -1)     # [N, captions]
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        self.choice = torch.from_numpy(
            rng.integers(0, self.caption_index.shape[1], size=len(self))).long()

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        if self.builder is not None:      # CL2L views (the CLIP demo keeps the fast path)
            return self.builder(self.images[i], self.data.captions[i],
                                seed=(self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        return {'image': normalize_uint8(self.images[i]),
                'text': self.tokens[self.caption_index[i, self.choice[i]]]}


class ShapesLabels(Dataset):
    """The held-out shapes split for zero-shot classification: dicts (`image`, `label`)."""

    def __init__(self, n, image_size):
        self.data, self.images = shapes_split('val', n, image_size)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return {'image': normalize_uint8(self.images[i]), 'label': int(self.data.labels[i])}


DATASETS = utils.Registry('dataset')   # name -> builder(args, tokenizer) -> Dataset
DATASETS.register('shapes', lambda args, tokenizer: ShapesCaptions(
    args.shapes_num_train, args.image_size, tokenizer, seed=args.seed,
    builder=augment.SampleBuilder.from_args(args, tokenizer, plain_images=True)))


def build_train_dataset(args, tokenizer):
    return DATASETS.get(args.dataset)(args, tokenizer)


# ----------------------------------------------------------------------------- sampling

class ResumableSampler(Sampler):
    """Seeded per-epoch permutation, split across ranks, that can start mid-epoch.

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
        return iter(self.indices().tolist())

    def __len__(self):
        return self.per_rank - self.start
