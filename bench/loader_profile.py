"""Where a data loader's time goes: an in-process, one-thread profile of each per-image stage
(decode, crop/resize, to-tensor/normalise, tokenise) of our training loader and of a PIL +
torchvision pipeline (OpenCLIP's, the naive baseline's), and the cost of the JPEG decode
options at hand (the full-scale decoders and the levers tried on them).

    samples = read_samples(shards, 500)
    print_stages('224 px', samples, 3, {'ours': lambda: profile_ours(samples, 224, 0.5, tok, 64)})
"""
import argparse
import io
import os
import sys
import tarfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import augment  # noqa: E402
import decode  # noqa: E402
import engine  # noqa: E402
from loader_common import Clock  # noqa: E402

STAGES = ('decode', 'crop/resize', 'to-tensor/normalise', 'tokenise')


def read_samples(shards, limit):
    """[(key with extension, image bytes, caption)] from the tar shards, in order."""
    samples, parts = [], {}
    for path in shards['wds']:
        with tarfile.open(path) as tar:
            for member in tar:
                stem, ext = member.name.rsplit('.', 1)
                parts.setdefault(stem, {})[ext] = tar.extractfile(member).read()
                if 'txt' in parts[stem] and len(parts[stem]) == 2:
                    ext = next(e for e in parts[stem] if e != 'txt')
                    samples.append((f'{stem}.{ext}', parts[stem][ext], parts.pop(stem)['txt'].decode()))
                    if len(samples) >= limit:
                        return samples
    return samples


def profile_pil_pipeline(samples, preprocess, tokenizer, batch, decoder='pilrgb'):
    """A PIL + torchvision pipeline's per-sample work, stage by stage (OpenCLIP's: webdataset
    decode('pilrgb'), its preprocess Compose ending in ToTensor + Normalize, its tokenizer);
    the batching (a stack of float32 images) counts as to-tensor/normalise, as ours does."""
    import webdataset as wds
    handler = wds.autodecode.imagehandler(decoder)
    crop_ops, tensor_ops = preprocess.transforms[:-2], preprocess.transforms[-2:]   # ..., ToTensor, Normalize
    clock, images = Clock(), []
    for i, (key, data, text) in enumerate(samples):
        with clock('decode'):
            image = handler(key, data)
        with clock('crop/resize'):
            for op in crop_ops:
                image = op(image)
        with clock('to-tensor/normalise'):
            for op in tensor_ops:
                image = op(image)
            images.append(image)
            if len(images) == batch or i == len(samples) - 1:
                torch.stack(images)
                images = []
        with clock('tokenise'):
            tokenizer(text)[0]
    return clock


def profile_ours(samples, size, min_scale, tokenizer, batch):
    """Our per-sample work, stage by stage; the normalisation runs per batch (engine.to_device)
    and the tokenizer uncached (training captions rarely repeat)."""
    args = argparse.Namespace(image_size=size, base='CLIP', weak_min_scale=min_scale)
    builder = augment.SampleBuilder.from_args(args, tokenizer)
    opts = decode.DecodeOptions(draft=decode.draft_policy(builder), fast_jpeg=True)
    generator, clock, images = torch.Generator(), Clock(), []
    for i, (key, data, text) in enumerate(samples):
        with clock('decode'):
            image, _ = decode.decode_image(data, key, opts)
        with clock('crop/resize'):
            images.append(builder.image_transform(image, generator=generator.manual_seed(i)))
        with clock('tokenise'):
            tokenizer([text])[0]
        if len(images) == batch or i == len(samples) - 1:
            with clock('to-tensor/normalise'):
                engine.to_device({'image': torch.stack(images)}, torch.device('cpu'))
            images = []
    return clock


def print_stages(title, samples, rounds, arms, loader_ms=None):
    """arms: {name: () -> Clock of the STAGES over `samples`}; prints per-image ms of each stage, the least
    of `rounds` passes (arms interleaved pass by pass), and, from `loader_ms` {name: CPU ms per
    image of the whole loader}, what the loader spends outside these stages."""
    best = {arm: dict.fromkeys(STAGES, float('inf')) for arm in arms}
    for _ in range(rounds):
        for arm, run in arms.items():
            clock = run()
            for stage in STAGES:
                best[arm][stage] = min(best[arm][stage], 1e3 * clock.cpu(stage) / len(samples))
    print(f"\n{title}, CPU ms per image by stage ({len(samples)} images, one thread, least of {rounds}):\n")
    print("| stage | " + " | ".join(arms) + " |\n|---|" + "---|" * len(arms))
    for stage in STAGES + ('sum',):
        cells = [sum(best[arm].values()) if stage == 'sum' else best[arm][stage] for arm in arms]
        print(f"| {stage} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)
    if loader_ms and set(loader_ms) == set(arms):
        print("| whole loader (CPU ms/image, median of the rounds above) | "
              + " | ".join(f"{loader_ms[arm]:.3f}" for arm in arms) + " |")
        print("| outside these stages (whole loader - sum) | "
              + " | ".join(f"{loader_ms[arm] - sum(best[arm].values()):.3f}" for arm in arms) + " |", flush=True)


def decode_levers():
    """name -> JPEG bytes -> pixels: the full-scale decoders each side uses and the levers tried
    on the full-scale decode (levers that need simplejpeg are listed only where it is installed:
    it is no dependency of ours)."""
    def pil(data, reduce=1, mode='RGB'):
        image = Image.open(io.BytesIO(data))
        if reduce > 1 or mode != 'RGB':
            image.draft(mode, (image.width // reduce, image.height // reduce))
        return image.convert(mode)
    levers = {'torchvision decode_jpeg, full scale (ours)': decode.decode_jpeg_rgb,
              'PIL, full scale (OpenCLIP, naive)': pil,
              'PIL, luma only (draft L): full decode less the chroma work': lambda d: pil(d, mode='L'),
              'PIL draft 1/2 (ours where every crop allows it)': lambda d: pil(d, 2),
              'PIL draft 1/4': lambda d: pil(d, 4),
              # 1/8: DC coefficients only, no IDCT to speak of: ~ the entropy-decoding floor, which
              # any crop or scale decode pays for the whole image
              'PIL draft 1/8: ~ the entropy-decoding floor': lambda d: pil(d, 8)}
    try:
        import simplejpeg
    except ImportError:
        return levers
    levers.update({
        'simplejpeg, full scale': simplejpeg.decode_jpeg,
        'simplejpeg, fastdct + fastupsample': lambda d: simplejpeg.decode_jpeg(d, fastdct=True, fastupsample=True),
        # libjpeg-turbo's M/8 scaled IDCT: the smallest scale >= 7/8 of each side
        'simplejpeg, 7/8 scale (reduced IDCT)': lambda d: simplejpeg.decode_jpeg(
            d, min_height=simplejpeg.decode_jpeg_header(d)[0] * 7 // 8,
            min_width=simplejpeg.decode_jpeg_header(d)[1] * 7 // 8)})
    return levers


def print_decode_levers(samples, rounds=3):
    """ms per JPEG of each decode in decode_levers(), the least of `rounds` passes."""
    jpegs = [data for key, data, _ in samples if key.endswith('.jpg')]
    print(f"\nJPEG decode, CPU ms per image ({len(jpegs)} JPEGs, one thread, least of {rounds}):\n")
    print("| decode | ms |\n|---|---|")
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for name, fn in decode_levers().items():
            times = []
            for _ in range(rounds):
                t0 = time.process_time()
                for data in jpegs:
                    fn(data)
                times.append(1e3 * (time.process_time() - t0) / max(1, len(jpegs)))
            print(f"| {name} | {min(times):.3f} |")
