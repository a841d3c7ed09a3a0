"""Per-sample augmentation: the image views and text views of CLIP and CL2L, turned into
the sample dict every reader returns (`image`, `text`; for CL2L also `image_views`
[V,3,h,w] and `text_views` [V,77]). Readers hand over (image, captions, seed).

    >>> build = SampleBuilder.from_args(args, tokenizer)
    >>> sample = build(pil_image, ['a caption', 'another'], seed=1234)
"""
import html
import random
import re
from contextlib import contextmanager
from functools import lru_cache

import torch
from torchvision.transforms import v2 as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


def _finish():
    """uint8 image -> CLIP-normalised float32."""
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)]


def weak_transform(size, min_scale=0.5):
    """The global view: RandomResizedCrop(scale min_scale..1), bicubic."""
    return T.Compose([T.ToImage(), T.RandomResizedCrop(size, scale=(min_scale, 1.0),
                                                       interpolation=BICUBIC, antialias=True),
                      *_finish()])


def plain_transform():
    """No geometric augmentation (captions describe position/size, as in `shapes`)."""
    return T.Compose([T.ToImage(), *_finish()])


def eval_transform(size):
    return T.Compose([T.ToImage(), T.Resize(size, interpolation=BICUBIC, antialias=True),
                      T.CenterCrop(size), *_finish()])


def strong_transform(size, max_scale=1.0, blur_prob=0.5, solarize_prob=0.0, grayscale_prob=0.2):
    """An augmented view (SimCLR/BYOL family): crop scale 0.08..max_scale, flip, colour
    jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale, Gaussian blur, solarize."""
    blur = T.GaussianBlur(kernel_size=max(3, (size // 10) | 1), sigma=(0.1, 2.0))
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=(0.08, max_scale), interpolation=BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=grayscale_prob),
        T.RandomApply([blur], p=blur_prob),
        T.RandomSolarize(128, p=solarize_prob),
        *_finish()])


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
        finally:
            random.setstate(state)
        return out if isinstance(out, str) and out.strip() else sentence


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

    @classmethod
    def from_args(cls, args, tokenizer, plain_images=False):
        transform = plain_transform() if plain_images else weak_transform(
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
        with one_thread(), torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also (lazily) reseed the CUDA
            # generators, which fork_rng(devices=[]) does not restore, and costs ~0.7 ms
            torch.default_generator.manual_seed(seed)
            sample = {'image': self.image_transform(image)}
            if self.view_transforms:
                sample['image_views'] = torch.stack([t(image) for t in self.view_transforms])
        caption = captions[rng.randrange(len(captions))]
        sample['text'] = self._tokenize_one(caption)
        if self.view_transforms:
            texts = [captions[rng.randrange(len(captions))] if self.caption_sampling == 'multi'
                     else caption for _ in self.view_transforms]
            if self.text_augment is not None:
                texts = [self.text_augment(t, rng.getrandbits(63)) for t in texts]
            sample['text_views'] = torch.stack([self._tokenize_one(t) for t in texts])
        return sample
