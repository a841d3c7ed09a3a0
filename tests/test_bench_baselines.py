"""The benchmarks against other tools' pipelines (issue 22) run on tiny data, so they cannot rot:
bench/openclip_pipeline.py (our wds loader vs open_clip_train's webdataset pipeline) and
bench/eval_vs_clip_benchmark.py (eval_zeroshot.py vs CLIP_benchmark on an exported model), and
bench/text_classifier.py (the zero-shot text classifier per class, length-sorted, with shared prefixes)."""
import io
import os
import sys
import tarfile

import pytest
import torch
from PIL import Image

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench')
sys.path.insert(0, BENCH)

import loader_common  # noqa: E402
import loader_profile  # noqa: E402


def test_download_like_shards_mix_sizes_formats_and_captions(tmp_path):
    shards = loader_common.write_shards(str(tmp_path), 40, per_shard=20, realistic=True)
    assert len(shards['wds']) == 2 and shards['tfrecord'] == []
    kinds, sizes = set(), set()
    for path in shards['wds']:
        with tarfile.open(path) as tar:
            names = tar.getnames()
            for name in names:
                stem, ext = name.rsplit('.', 1)
                if ext != 'txt':
                    kinds.add(ext)
                    assert f'{stem}.txt' in names
                    with Image.open(io.BytesIO(tar.extractfile(name).read())) as im:
                        sizes.add(im.size)
                        assert im.format.lower() == {'jpg': 'jpeg'}.get(ext, ext)
    assert 'jpg' in kinds and kinds <= {'jpg', 'png', 'webp'}
    assert len(sizes) > 30 and all(256 <= s <= 640 for size in sizes for s in size)


def test_bad_sizes_are_one_line_errors(capsys):
    import eval_vs_clip_benchmark
    import openclip_pipeline
    for get_args, argv, message in ((openclip_pipeline.get_args, ['--images', '10'], '--images must be >= '),
                                    (eval_vs_clip_benchmark.get_args, ['--classes', '3'], '--classes must be in')):
        with pytest.raises(SystemExit):
            get_args(argv)
        assert message in capsys.readouterr().err


def test_openclip_pipeline_smoke(tmp_path, capsys):
    """Both arms deliver normalised 32 px batches, times and CPU times for both, the stage
    profile covers every stage of both sides."""
    import openclip_pipeline
    results = openclip_pipeline.main(['--images', '48', '--sizes', '32', '--batch-size', '8', '--workers', '1',
                                      '--rounds', '1', '--profile-images', '6', '--data-dir', str(tmp_path)])
    (speed_ours, cpu_ours), = results[32]['ours']
    (speed_oc, cpu_oc), = results[32]['openclip']
    assert speed_ours > 0 and speed_oc > 0 and cpu_ours > 0 and cpu_oc > 0
    out = capsys.readouterr().out
    for stage in loader_profile.STAGES:
        assert f'| {stage} |' in out
    assert '| torchvision decode_jpeg, full scale (ours) |' in out
    preprocess, tokenizer = openclip_pipeline.openclip_parts('ViT-B-16', 32)
    shards = loader_common.existing_shards(str(tmp_path))
    images, texts = next(iter(openclip_pipeline.openclip_loader(shards, 48, 8, 0, preprocess, tokenizer)))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and images.min() < 0
    assert texts.shape == (8, 77)


@pytest.fixture(scope='module')
def eval_inputs(tmp_path_factory):
    import eval_vs_clip_benchmark as ev
    folder = str(tmp_path_factory.mktemp('evalbench'))
    a = ev.get_args(['--quick', '--classes', '5', '--per-class', '3', '--templates', '3'])
    ev.make_imagefolder(os.path.join(folder, 'data'), a.classes, a.per_class)
    ckpt, export = ev.make_model(folder, a.model, a.image_size)
    files = ev.write_prompts(folder, a.classes, a.templates)
    return ev, a, folder, ckpt, export, files


@pytest.mark.filterwarnings('ignore::DeprecationWarning')           # inside CLIP_benchmark
def test_eval_phases_of_both_sides_give_identical_metrics(eval_inputs):
    ev, a, folder, ckpt, export, files = eval_inputs
    clocks = ev.Clock(), ev.Clock()
    data = os.path.join(folder, 'data')
    ours = ev.phases_ours(a, ckpt, data, files, os.path.join(folder, 'cache'), clocks[0])
    assert len(os.listdir(os.path.join(folder, 'cache'))) == 1            # the warm phase read it from disk
    theirs = ev.phases_cb(a, export, data, files, clocks[1])
    assert ours == theirs and 0 < theirs['acc5'] < 1
    phases = {'model load', 'text classifier, cold', 'image pass', 'metrics'}
    assert set(clocks[0].phases) == phases | {'text classifier, warm'} and set(clocks[1].phases) == phases
    with pytest.raises(AssertionError, match='ours warm'):
        ev.check_same_metrics({'ours cold': [ours], 'ours warm': [dict(ours, acc1=ours['acc1'] + 0.5)]})


def test_eval_bf16_lever_times_both_precisions_and_agrees(eval_inputs):
    ev, a, folder, ckpt, export, files = eval_inputs
    (image, f32, b16, same, _), (text, t32, t16, cos, _) = ev.bf16_lever(a, ckpt, os.path.join(folder, 'data'), files)
    n = a.classes * a.per_class                                           # spread over every class
    assert image == f'image pass, {len(range(0, n, n // a.lever_images))} images'
    assert text == f'text classifier, {a.lever_classes} classes x {a.templates} prompts'
    assert min(*f32, *b16, *t32, *t16) > 0 and 0 <= same <= 1
    assert 0.98 < cos <= 1.0001                # bf16 rounding, not another model


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::DeprecationWarning')
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_eval_vs_clip_benchmark_end_to_end(eval_inputs, capsys, precision):
    """Four fresh processes (ours cold / warm, CLIP_benchmark with and without --load_clfs)."""
    ev, a, folder, ckpt, export, files = eval_inputs
    times, metrics = ev.main(['--quick', '--classes', '5', '--per-class', '3', '--templates', '3',
                              '--no-phases', '--data-dir', folder, '--precision', precision])
    assert set(times) == set(ev.ARMS) and all(w > 0 and c > 0 for runs in times.values() for w, c in runs)
    out = capsys.readouterr().out
    if precision == 'fp32':
        assert 'identical acc1 / acc5 / mean per-class recall in all 4 runs' in out
    else:                  # each side agrees with itself; the two sides are printed side by side
        assert set(metrics) == {'ours', 'CLIP_benchmark'} and 'bf16: identical' in out
        assert all(0 <= m['acc1'] <= m['acc5'] <= 1 for m in metrics.values())


def test_eval_bf16_commands_and_per_side_check():
    import eval_vs_clip_benchmark as ev
    for precision, ours_flag, cb_no_amp in (('fp32', False, True), ('bf16', True, False)):
        a = ev.get_args(['--quick', '--precision', precision])
        runs = ev.commands(a, 'DATA', 'CKPT', 'EXPORT', {k: k for k in ('catalog', 'labels', 'templates', 'cb_names',
                                                                         'cb_templates')}, 'WORK')
        assert ('--precision' in runs['ours cold'][0]) == ours_flag
        assert ('--no_amp' in runs['CLIP_benchmark'][0]) == cb_no_amp
    assert not a.phases and a.lever_images == 0           # bf16 times the end-to-end runs only
    ours, theirs = {'acc1': 0.1}, {'acc1': 0.2}
    assert ev.check_same_metrics_per_side({'ours cold': [ours], 'ours warm': [ours], 'CLIP_benchmark': [theirs],
                                           'CLIP_benchmark --load_clfs': [theirs]}) == {'ours': ours,
                                                                                      'CLIP_benchmark': theirs}
    with pytest.raises(AssertionError, match='ours warm'):
        ev.check_same_metrics_per_side({'ours cold': [ours], 'ours warm': [theirs]})


def test_text_classifier_ways_agree_and_shared_prefixes_run_fewer_tokens(capsys):
    import text_classifier
    times, tokens, weights = text_classifier.main(['--quick'])
    assert set(times) == set(text_classifier.WAYS) and all(w > 0 for runs in times.values() for w, _ in runs)
    assert tokens['sorted + prefixes'] < tokens['sorted'] <= tokens['per class']
    for way in text_classifier.WAYS:
        assert weights[way].shape == (10, 128)
        assert torch.allclose(weights[way], weights['per class'], atol=1e-6), way
    assert '| sorted + prefixes |' in capsys.readouterr().out
