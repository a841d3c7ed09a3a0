"""Per-sample augmentation: the image views and text views of CLIP and CL2L, turned into
the sample dict every reader returns (`image`, `text`; for CL2L also `image_views`,
`text_views`). Readers hand over (image, captions, seed); `SampleBuilder` does the rest.

    >>> build = SampleBuilder.from_args(args, tokenizer)
    >>> sample = build(pil_image, ['a caption', 'another'], seed=1234)
"""
import random
from functools import lru_cache

import torch
from torchvision.transforms import v2 as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_float():
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)]


def weak_transform(size, min_scale=0.5):
    """The global view: RandomResizedCrop(scale min_scale..1), bicubic."""
    return T.Compose([T.ToImage(), T.RandomResizedCrop(size, scale=(min_scale, 1.0),
                                                       interpolation=T.InterpolationMode.BICUBIC,
                                                       antialias=True), *_to_float()[1:]])


def plain_transform():
    """No geometric augmentation (captions describe position/size, as in `shapes`)."""
    return T.Compose(_to_float())


def eval_transform(size):
    return T.Compose([T.ToImage(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC,
                                            antialias=True),
                      T.CenterCrop(size), *_to_float()[1:]])


class SampleBuilder:
    """(image, captions, seed) -> sample dict. All randomness comes from `seed`, so a sample
    is a pure function of (dataset index, epoch, run seed): resumes replay it exactly."""

    def __init__(self, tokenizer, image_transform, caption_sampling='single'):
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.caption_sampling = caption_sampling
        self._tokenize_one = lru_cache(maxsize=200_000)(lambda s: tokenizer([s])[0])

    @classmethod
    def from_args(cls, args, tokenizer, plain_images=False):
        transform = plain_transform() if plain_images else weak_transform(
            args.image_size, getattr(args, 'weak_min_scale', 0.5))
        return cls(tokenizer, transform, getattr(args, 'caption_sampling', 'single'))

    def __call__(self, image, captions, seed):
        rng = random.Random(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image = self.image_transform(image)
        caption = captions[rng.randrange(len(captions))]
        return {'image': image, 'text': self._tokenize_one(caption)}
