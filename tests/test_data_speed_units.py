"""The fast data path keeps the augmentations exactly: uint8 crops bit-identical to
torchvision's RandomResizedCrop (same parameter draws, same bicubic), CL2L views identical to
the stock torchvision chain, per-batch normalisation equal to the per-sample float path
within 1e-6, torchvision's JPEG decode giving PIL's pixels, the array-filling tokenizer equal
to open_clip's, and samples that stay a pure function of their seed."""
import argparse
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torchvision.transforms import v2 as T

import augment
import datagen
import datasets
import engine
import main as train
from decode import DecodeOptions, Skip, decode_image, draft_policy, jpeg_header

BICUBIC = T.InterpolationMode.BICUBIC
SIZES = [(500, 375), (200, 150), (64, 64), (40, 300), (1000, 60)]    # incl. upsampling, fallback crops


def _pil(w, h, seed=0):
    return Image.open(io.BytesIO(datagen.jpeg(seed, w, h, quality=92))).convert('RGB')


def _stock_crop(size, scale):
    """The reference: torchvision's own RandomResizedCrop on a uint8 image tensor."""
    return T.Compose([T.ToImage(), T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC, antialias=True)])


def _stock_view(size, blur_prob, solarize_prob, grayscale_prob=0.2):
    """augment.strong_transform as it was: the stock chain on uint8 (normalising came last)."""
    blur = T.GaussianBlur(kernel_size=max(3, (size // 10) | 1), sigma=(0.1, 2.0))
    return T.Compose([
        T.ToImage(), T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=BICUBIC, antialias=True),
        T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=grayscale_prob), T.RandomApply([blur], p=blur_prob),
        T.RandomSolarize(128, p=solarize_prob)])


def _float_reference(pipeline):
    return T.Compose([pipeline, T.ToDtype(torch.float32, scale=True), T.Normalize(augment.CLIP_MEAN, augment.CLIP_STD)])


# ----------------------------------------------------------------------------- crops

@pytest.mark.parametrize('size, scale', [(64, (0.5, 1.0)), (224, (0.5, 1.0)), (32, (0.08, 1.0))])
def test_crop_is_torchvision_bit_for_bit(size, scale):
    """Same crop boxes (hence the same scale/ratio/position statistics) and the same
    antialiased bicubic pixels as torchvision, from PIL images and from uint8 tensors."""
    ours, stock = augment.RandomResizedCropU8(size, scale=scale), _stock_crop(size, scale)
    with augment.one_thread():
        for k, (w, h) in enumerate(SIZES):
            image = _pil(w, h, k)
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
            for seed in range(20):
                torch.manual_seed(seed)
                want = stock(image)
                torch.manual_seed(seed)
                params = stock.transforms[1].make_params([pixels])
                g = torch.Generator().manual_seed(seed)
                assert ours.draw(h, w, torch.Generator().manual_seed(seed)) == \
                    (params['top'], params['left'], params['height'], params['width'])
                got = ours(image, generator=g)
                assert got.dtype == torch.uint8 and got.shape == (3, size, size)
                assert torch.equal(got, want), (w, h, seed)
                torch.manual_seed(seed)
                assert torch.equal(ours(pixels), want)                   # global generator, tensor input


def test_weak_transform_still_gives_normalised_floats_bit_for_bit():
    """augment.weak_transform keeps its float32 contract for callers that feed a model
    directly (finetune_classification.py): the old stock pipeline's values exactly."""
    ours, stock = augment.weak_transform(64, 0.5), _float_reference(_stock_crop(64, (0.5, 1.0)))
    with augment.one_thread():
        for seed in range(10):
            image = _pil(*SIZES[seed % 3], seed)
            torch.manual_seed(seed)
            want = stock(image)
            torch.manual_seed(seed)
            got = ours(image)
            assert got.dtype == torch.float32 and torch.equal(got, want)


def test_crop_never_returns_a_view_of_its_input():
    """A crop that needs no resize (the whole image at the output size) is still a copy:
    the decoded pixels may be read-only, and a dataset's images must not be written to."""
    pixels = augment.to_uint8(_pil(64, 64))
    whole = augment.RandomResizedCropU8(64, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = whole(pixels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, pixels) and out.data_ptr() != pixels.data_ptr()


@pytest.mark.parametrize('blur, solarize', [(0.5, 0.0), (1.0, 0.2)])
def test_views_equal_the_stock_uint8_chain(blur, solarize):
    """CL2L strong views: colour jitter, grayscale, blur and solarize run on uint8 exactly as
    before (they always did: normalising was the last step)."""
    ours, stock = augment.strong_transform(48, 1.0, blur, solarize, 0.2), _stock_view(48, blur, solarize)
    with augment.one_thread():                   # as SampleBuilder runs them (tiny ops; a busy CPU)
        for k, (w, h) in enumerate(SIZES[:3]):
            image = _pil(w, h, k)
            for seed in range(20):
                torch.manual_seed(seed)
                want = stock(image)
                torch.manual_seed(seed)
                assert torch.equal(ours(image), want)
                torch.manual_seed(seed)
                assert torch.equal(ours(augment.to_uint8(image)), want)


# ----------------------------------------------------------------------------- normalisation

def _cl2l_args(**kw):
    return argparse.Namespace(image_size=64, base='CL2L', weak_min_scale=0.5, num_augs=2, multicrop_resize=32,
                              multicrop_max_scale=1.0, byol_augment=False, blur_prob=0.5, solarize_prob=0.0,
                              grayscale_prob=0.2, text_augment=False, **kw)


def test_uint8_batches_normalise_to_the_float_path(tokenizer):
    """Per-sample float (ToDtype + Normalize in the worker, as before) vs uint8 samples
    collated and normalised by engine.to_device: the same values within 1e-6, CL2L views
    included; text and float tensors pass unchanged."""
    build = augment.SampleBuilder.from_args(_cl2l_args(), tokenizer)
    weak = _float_reference(_stock_crop(64, (0.5, 1.0)))
    view = _float_reference(_stock_view(32, 0.5, 0.0))
    images = [_pil(w, h, k) for k, (w, h) in enumerate(SIZES)]
    samples, want_image, want_views = [], [], []
    for k, image in enumerate(images):
        samples.append(build(image, [f'caption {k}'], 100 + k))
        torch.manual_seed(100 + k)
        want_image.append(weak(image))
        want_views.append(torch.stack([view(image), view(image)]))
    batch = datasets.collate(samples)
    batch.pop('_data')
    assert batch['image'].dtype == torch.uint8 and batch['image_views'].dtype == torch.uint8
    out = engine.to_device(batch, torch.device('cpu'))
    assert out['image'].dtype == torch.float32 and out['image'].shape == (5, 3, 64, 64)
    assert (out['image'] - torch.stack(want_image)).abs().max() < 1e-6
    assert (out['image_views'] - torch.stack(want_views)).abs().max() < 1e-6
    assert torch.equal(out['text'], batch['text']) and torch.equal(out['text_views'], batch['text_views'])
    floats = {'image': torch.randn(2, 3, 8, 8), 'text': torch.zeros(2, 77, dtype=torch.long)}
    again = engine.to_device(floats, torch.device('cpu'))
    assert all(torch.equal(again[k], floats[k]) for k in floats)          # already normalised: untouched


def test_normalize_uint8_is_the_old_shapes_formula_bit_for_bit():
    """The demo's shapes images were normalised per sample as (x - 255 mean) / (255 std);
    per batch it is the same arithmetic, so the demo's numbers do not move."""
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mean = torch.tensor(augment.CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(augment.CLIP_STD).view(3, 1, 1) * 255
    assert torch.equal(augment.normalize_uint8(x), (x.float() - mean) / std)
    assert torch.equal(augment.normalize_uint8(x)[1], augment.normalize_uint8(x[1]))


# ----------------------------------------------------------------------------- determinism

def test_samples_are_a_function_of_the_seed_and_leave_the_global_rng_alone(tokenizer):
    for args in (argparse.Namespace(image_size=64, base='CLIP', weak_min_scale=0.5), _cl2l_args()):
        build = augment.SampleBuilder.from_args(args, tokenizer)
        image = _pil(200, 150)
        torch.manual_seed(1)
        state = torch.get_rng_state()
        a = build(image, ['x', 'y'], 7)
        assert torch.equal(torch.get_rng_state(), state)                 # the caller's stream is untouched
        torch.manual_seed(2)
        b = build(augment.to_uint8(image), ['x', 'y'], 7)                # PIL or tensor, any global state
        c = build(image, ['x', 'y'], 8)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not torch.equal(a['image'], c['image'])


# ----------------------------------------------------------------------------- decoding

def test_fast_jpeg_decode_gives_pils_pixels():
    data = datagen.jpeg(3, 500, 375, quality=92)
    fast, note = decode_image(data, 'p', DecodeOptions(fast_jpeg=True))
    assert isinstance(fast, torch.Tensor) and fast.dtype == torch.uint8 and note is None
    assert fast.shape == (3, 375, 500)
    pil = np.asarray(Image.open(io.BytesIO(data)).convert('RGB')).astype(int)
    diff = np.abs(fast.permute(1, 2, 0).numpy().astype(int) - pil)
    assert diff.max() <= 2 and diff.mean() < 0.05                        # identical with the pinned builds


def test_jpeg_header_reads_what_pil_reads():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 51, 3), np.uint8))
    cases = [datagen.jpeg(0, 500, 375), datagen.image_bytes('cmyk'), datagen.image_bytes('gray'),
             datagen.encode(rgb, 'JPEG', progressive=True),
             datagen.encode(rgb, 'JPEG', exif=Image.Exif().tobytes(), icc_profile=b'x' * 70_000)]
    for data in cases:
        pil = Image.open(io.BytesIO(data))
        assert jpeg_header(data) == (*pil.size, len(pil.getbands()))
    for kind in ('garbage', 'zero', 'bomb_png') + tuple(k for k in datagen.CONVERTED if k not in ('cmyk', 'gray')):
        assert jpeg_header(datagen.image_bytes(kind) or b'') is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 700))
def test_jpeg_header_never_raises(noise, cut):
    """Any prefix of a JPEG, with any bytes after it: a header or None, never an exception."""
    data = datagen.jpeg(1, 40, 30)[:cut] + noise
    header = jpeg_header(data)
    assert header is None or (len(header) == 3 and min(header) > 0)


def test_fast_jpeg_keeps_draft_modes_and_skips(tokenizer):
    build = augment.SampleBuilder.from_args(argparse.Namespace(image_size=64, base='CLIP'), tokenizer)
    opts = DecodeOptions(draft=draft_policy(build), fast_jpeg=True)
    small, _ = decode_image(datagen.jpeg(0, 500, 375, quality=92), 'p', opts)
    assert isinstance(small, Image.Image) and small.size == (125, 94)    # reduced-scale decode still wins
    for kind in ('cmyk', 'gray'):                                        # not RGB: PIL converts and notes it
        image, note = decode_image(datagen.image_bytes(kind, 3), kind, DecodeOptions(fast_jpeg=True))
        assert isinstance(image, Image.Image) and note == datagen.CONVERTED[kind]
    for kind, reason in datagen.BAD_IMAGES.items():
        if kind == 'missing':
            continue
        with pytest.raises(Skip) as e:
            decode_image(datagen.image_bytes(kind, 1), kind, DecodeOptions(fast_jpeg=True))
        assert e.value.reason == reason
    cut = datagen.jpeg(1, 200, 150)
    for data in (cut[:-2], cut[:int(len(cut) * 0.95)], cut[:400] + bytes(b ^ 0x5A for b in cut[400:600]) + cut[600:]):
        with pytest.raises(Skip, match='corrupt_image'):
            decode_image(data, 'cut', DecodeOptions(fast_jpeg=True))


def test_loader_batches_carry_uint8_images(tmp_path, tokenizer):
    """Through the real reader and DataLoader (64x48 JPEGs at 32 px: full-scale decode by
    torchvision): uint8 batches, normalised by the training loop's to_device."""
    flags = datagen.write_wds(str(tmp_path / 'data'), datagen.specs(n_good=8), shards=2)
    args = train.utils.OneLineErrorParser('main.py', parents=[train.get_args_parser()]).parse_args(
        ['--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--batch-size', '4', '--train-num-samples', '8', *flags])
    train.resolve_args(args)
    sampler, loader = datasets.build_loader(datasets.build_train_dataset(args, tokenizer), args)
    sampler.set_epoch(0)
    batch = next(iter(loader))
    assert batch['image'].dtype == torch.uint8 and batch['image'].shape == (4, 3, 32, 32)
    batch.pop('_data')
    assert engine.to_device(batch, torch.device('cpu'))['image'].dtype == torch.float32


# ----------------------------------------------------------------------------- text

def test_tokenizer_equals_open_clip(tokenizer):
    texts = ['a photo of a dog', '', 'Café  <b>naïve</b> &amp; 東京 ✓', 'word ' * 200, 'x ' * 75, 'x ' * 76]
    assert torch.equal(tokenizer(texts), tokenizer.bpe(texts, context_length=77))
    assert torch.equal(tokenizer('one text'), tokenizer.bpe(['one text'], context_length=77))
    assert tokenizer([]).shape == (0, 77)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=80)
       | st.sampled_from(['A  Photo\tof a DOG ', '&amp; fish', 'x\x1b[31mred', ' \r\n', '<b>bold</b>']))
def test_ascii_shortcut_cleans_as_open_clip(text):
    """The printable-ASCII shortcut in the tokenizer's clean is open_clip's clean exactly."""
    from open_clip.tokenizer import _clean_lower
    assert datasets._fast_clean(_clean_lower)(text) == _clean_lower(text)
