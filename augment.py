"""Per-sample augmentation: the image views and text views of CLIP and CL2L, turned into
the sample dict every reader returns (`image` [3,H,W] uint8, `text` [77]; for CL2L also
`image_views` [V,3,h,w] uint8 and `text_views` [V,77]). Readers hand over (image, captions,
seed). Training images stay uint8 until the batch reaches its device, where
`normalize_uint8` (engine.to_device) makes them CLIP-normalised float32 in one op: 4x less
to collate, to pass between processes and to copy to the GPU, and no per-sample float work.

    >>> build = SampleBuilder.from_args(args, tokenizer)
    >>> sample = build(pil_image, ['a caption', 'another'], seed=1234)
    >>> pixels = normalize_uint8(collated['image'])          # on the device
"""
import html
import math
import random
import re
import warnings
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


def normalize_uint8(images, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 [..., 3, H, W] -> normalised float32 (x - 255 mean) / (255 std); the same
    values as ToDtype(scale=True) + Normalize(mean, std) within 1e-6 (tested)."""
    mean255, std255 = _scaled_mean_std(images.device, tuple(mean), tuple(std))
    return images.to(torch.float32).sub_(mean255).div_(std255)


@lru_cache(maxsize=16)
def _scaled_mean_std(device, mean, std):
    """255 mean, 255 std as [3, 1, 1] float32 on `device`, made once (no copy per batch)."""
    return tuple((torch.tensor(v).view(3, 1, 1) * 255).to(device) for v in (mean, std))


def _finish():
    """uint8 image -> CLIP-normalised float32 (evaluation, weak_transform)."""
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)]


def to_uint8(image):
    """PIL RGB image -> uint8 [3, H, W] *view* of its pixels in HWC memory order (channels-last
    strides: no transposing copy, and the layout torch's uint8 resize kernels want); a tensor
    is returned as it is. The view is read-only: callers copy before writing."""
    if isinstance(image, torch.Tensor):
        return image
    pixels = np.asarray(image)                                   # [H, W, 3], read-only bytes
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', UserWarning)             # "not writable": we never write
        return torch.from_numpy(pixels).permute(2, 0, 1)


class PlainImage:
    """No geometric augmentation (captions describe position/size, as in `shapes`):
    the image as a uint8 [3, H, W] tensor."""

    def __call__(self, image, generator=None):
        return to_uint8(image) if isinstance(image, torch.Tensor) else to_uint8(image).clone()


class RandomResizedCropU8(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop (the same parameter draw, antialiased bicubic resize of
    uint8 pixels: bit-identical output, tested) from a PIL image or a uint8 tensor to a uint8
    [3, size, size] tensor, ~4x faster on CPU: the crop is a view of the decoded pixels and
    the resize runs on channels-last memory (ToImage's CHW copy made torch convert back).
    `generator` draws the crop (default: torch's global generator)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__(size, scale=scale, ratio=ratio, interpolation=BICUBIC, antialias=True)

    def draw(self, height, width, generator=None):
        """-> (top, left, h, w): torchvision's RandomResizedCrop.make_params, same draws."""
        area, (lo, hi) = height * width, self._log_ratio
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            aspect_ratio = torch.exp(torch.empty(1).uniform_(lo, hi, generator=generator)).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
                left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
                return top, left, h, w
        in_ratio = width / height                                  # fallback: central crop
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def forward(self, image, generator=None):
        pixels = to_uint8(image)                                    # [3, H, W] uint8
        top, left, h, w = self.draw(*pixels.shape[-2:], generator)
        crop = pixels[..., top:top + h, left:left + w]
        if (h, w) == tuple(self.size):
            return crop.clone()                                     # never a view of the input
        if crop.dtype == torch.uint8 and crop.device.type == 'cpu':
            # torchvision's resize_image computes the same (its uint8 kernel) with more overhead
            # and channels-last output, which makes the batch stack slower
            return torch.nn.functional.interpolate(crop[None], size=list(self.size), mode='bicubic',
                                                   align_corners=False, antialias=True)[0]
        return F.resize_image(crop, list(self.size), interpolation=BICUBIC, antialias=True)


def weak_view(size, min_scale=0.5):
    """The global training view: RandomResizedCrop(scale min_scale..1), bicubic; uint8 out
    (SampleBuilder's; normalised per batch on the device)."""
    return RandomResizedCropU8(size, scale=(min_scale, 1.0))


def weak_transform(size, min_scale=0.5):
    """The same crop with CLIP-normalised float32 out, for callers that feed images to a
    model directly (finetune_classification.py); values as ToImage + RandomResizedCrop +
    ToDtype + Normalize gave them, bit for bit."""
    return T.Compose([weak_view(size, min_scale), *_finish()])


def plain_transform():
    return PlainImage()


def eval_transform(size):
    """Evaluation: bicubic resize of the short side, centre crop, CLIP-normalised float32."""
    return T.Compose([T.ToImage(), T.Resize(size, interpolation=BICUBIC, antialias=True),
                      T.CenterCrop(size), *_finish()])


def strong_transform(size, max_scale=1.0, blur_prob=0.5, solarize_prob=0.0, grayscale_prob=0.2):
    """An augmented view (SimCLR/BYOL family): crop scale 0.08..max_scale, flip, colour
    jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale, Gaussian blur, solarize; uint8 in and out
    (torchvision's colour ops run on uint8 as they always did here: normalising was the
    last step, now done per batch)."""
    blur = T.GaussianBlur(kernel_size=max(3, (size // 10) | 1), sigma=(0.1, 2.0))
    return T.Compose([
        RandomResizedCropU8(size, scale=(0.08, max_scale)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=grayscale_prob),
        T.RandomApply([blur], p=blur_prob),
        T.RandomSolarize(128, p=solarize_prob)])


def view_transforms(args):
    """The V augmented-view transforms; --byol-augment alternates BYOL's asymmetric pair."""
    size, scale = args.multicrop_resize, args.multicrop_max_scale
    if args.byol_augment:
        pair = [strong_transform(size, scale, 1.0, 0.0, args.grayscale_prob),
                strong_transform(size, scale, 0.1, 0.2, args.grayscale_prob)]
        return [pair[i % 2] for i in range(args.num_augs)]
    view = strong_transform(size, scale, args.blur_prob, args.solarize_prob, args.grayscale_prob)
    return [view] * args.num_augs


# ----------------------------------------------------------------------------- text

def clean_caption(text):
    """ftfy + HTML unescape + whitespace folding + lowercase (--clean-before-augment)."""
    import ftfy
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r'\s+', ' ', text).strip().lower()


def _stop_words():
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    return frozenset(ENGLISH_STOP_WORDS)


def require_wordnet():
    """Fail at start, in one line, when text augmentation cannot find WordNet."""
    from nltk.corpus import wordnet
    try:
        wordnet.ensure_loaded()
    except LookupError:
        raise ValueError("--text-augment needs NLTK's WordNet: run `python tools/setup_wordnet.py` "
                         "(offline: `apt-get install wordnet-base wordnet-sense-index` first)") from None


def fresh_wordnet_files(worker_id=None):
    """DataLoader worker_init_fn. NLTK's WordNet reader keeps its data files open and reads a
    synset with seek + readline; forked loader workers inherit the parent's open files *with
    their shared file offset*, so two workers' reads interleave and NLTK returns None synsets
    (measured: 13 of 1 020 lookups in 2 forked processes; it crashed textaugment's synonym
    replacement mid-run). Each worker drops the inherited handles; NLTK reopens its own."""
    import sys
    corpus = sys.modules.get('nltk.corpus')
    wordnet = getattr(corpus, '__dict__', {}).get('wordnet')
    if wordnet is not None and '_data_file_map' in vars(wordnet):    # loaded (not still lazy)
        wordnet._data_file_map = {}


class TextAugment:
    """Text views: optional cleaning, stop-word removal with probability p, then one EDA
    operation (synonym replacement / random swap / random deletion / none) drawn with
    weights. textaugment's EDA draws from the global `random` module, so each call runs
    under a seeded, restored `random` state: the output is a function of (text, seed)."""

    OPS = ('synonym', 'swap', 'deletion', 'none')

    def __init__(self, clean=False, no_augment_prob=0.0, remove_stopwords_prob=0.8,
                 weights=(0.4, 0.4, 0.2, 0.0)):
        from textaugment import EDA
        if sum(weights) <= 0:
            raise ValueError("text augmentation weights (synonym/swap/deletion/none) sum to 0")
        self.clean, self.no_augment_prob = clean, no_augment_prob
        self.remove_stopwords_prob, self.weights = remove_stopwords_prob, weights
        self.stop_words = _stop_words()
        # EDA's constructor downloads NLTK data and reseeds the global RNG: set its state by hand
        self.eda = EDA.__new__(EDA)
        self.eda.stopwords, self.eda.random_state = list(self.stop_words), 0
        self.eda.sentence = self.eda.p = self.eda.n = None

    def __call__(self, text, seed):
        rng = random.Random(seed)
        if self.clean:
            text = clean_caption(text)
        if rng.random() < self.no_augment_prob:
            return text
        words = text.split()
        if rng.random() < self.remove_stopwords_prob:
            kept = [w for w in words if w.lower() not in self.stop_words]
            words = kept or words
        if not words:
            return text
        op = rng.choices(self.OPS, weights=self.weights)[0]
        sentence = ' '.join(words)
        if op == 'none' or len(words) < 2 and op != 'synonym':
            return sentence
        state = random.getstate()
        random.seed(rng.random())
        try:
            if op == 'synonym':
                out = self.eda.synonym_replacement(sentence)
            elif op == 'swap':
                out = self.eda.random_swap(sentence)
            else:
                out = self.eda.random_deletion(sentence, p=0.2)
        except Exception as e:        # noqa: BLE001  a third-party augmenter never stops training
            # seen: textaugment's synonym lookup met a None synset from NLTK's WordNet reader
            # (AttributeError) in the 2nd hour of a run; the view keeps the unaugmented words
            _warn_augment_failure(op, sentence, e)
            out = sentence
        finally:
            random.setstate(state)
        return out if isinstance(out, str) and out.strip() else sentence


_AUGMENT_FAILURES = {'count': 0}


def _warn_augment_failure(op, sentence, error):
    """One warning per process for the first failure, then every 1 000th (with the count)."""
    _AUGMENT_FAILURES['count'] += 1
    n = _AUGMENT_FAILURES['count']
    if n == 1 or n % 1000 == 0:
        warnings.warn(f"text augmentation ({op}) failed {n} time(s) in this process, the view keeps "
                      f"its unaugmented words; first/latest: {type(error).__name__}: {error} on {sentence!r}")


# ----------------------------------------------------------------------------- samples

@contextmanager
def one_thread():
    """Per-sample image ops are tiny: on a busy CPU, intra-op threads make them ~20x slower
    (measured: a 64 px view 2.3 ms on one thread, 50 ms on two under load)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class SampleBuilder:
    """(image, captions, seed) -> sample dict. All randomness comes from `seed`, so a sample
    is a pure function of (dataset index, epoch, run seed): resumes replay it exactly."""

    def __init__(self, tokenizer, image_transform, caption_sampling='single',
                 view_transforms=(), text_augment=None):
        if caption_sampling not in ('single', 'multi'):
            raise ValueError(f"caption sampling {caption_sampling!r}; valid: single, multi")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.caption_sampling = caption_sampling
        self.view_transforms = list(view_transforms)
        self.text_augment = text_augment
        self._tokenize_one = lru_cache(maxsize=200_000)(lambda s: tokenizer([s])[0])
        self._generator = torch.Generator()

    @classmethod
    def from_args(cls, args, tokenizer, plain_images=False):
        transform = plain_transform() if plain_images else weak_view(
            args.image_size, getattr(args, 'weak_min_scale', 0.5))
        views, text_aug = [], None
        if getattr(args, 'base', 'CLIP') == 'CL2L' and args.num_augs > 0:
            views = view_transforms(args)
            if args.text_augment:
                text_aug = TextAugment(
                    args.clean_before_augment, args.no_text_augment_prob,
                    args.remove_stopwords_prob,
                    (args.synonym_replacement_prob, args.random_swap_prob,
                     args.random_deletion_prob, 1 - args.synonym_replacement_prob
                     - args.random_swap_prob - args.random_deletion_prob))
        return cls(tokenizer, transform, getattr(args, 'caption_sampling', 'single'),
                   views, text_aug)

    def __call__(self, image, captions, seed):
        rng = random.Random(seed)
        with one_thread():
            sample = self._images(image, seed)
        caption = captions[rng.randrange(len(captions))]
        sample['text'] = self._tokenize_one(caption)
        if self.view_transforms:
            texts = [captions[rng.randrange(len(captions))] if self.caption_sampling == 'multi'
                     else caption for _ in self.view_transforms]
            if self.text_augment is not None:
                texts = [self.text_augment(t, rng.getrandbits(63)) for t in texts]
            sample['text_views'] = torch.stack([self._tokenize_one(t) for t in texts])
        return sample

    def _images(self, image, seed):
        """The uint8 image (and views), their randomness drawn from torch generators seeded
        with `seed`. One view, ours: from a private generator (the same draws as the global
        one seeded alike, without saving and restoring the global state: ~0.1 ms). With views
        or another transform: the global CPU generator, forked."""
        if not self.view_transforms and isinstance(self.image_transform, (RandomResizedCropU8, PlainImage)):
            return {'image': self.image_transform(image, generator=self._generator.manual_seed(seed))}
        if self.view_transforms and not isinstance(image, torch.Tensor):
            image = to_uint8(image)                # PIL -> pixels once, not once per view
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also (lazily) reseed the CUDA
            # generators, which fork_rng(devices=[]) does not restore, and costs ~0.7 ms
            torch.default_generator.manual_seed(seed)
            sample = {'image': self.image_transform(image)}
            if self.view_transforms:
                sample['image_views'] = torch.stack([t(image) for t in self.view_transforms])
        return sample
