"""Zero-shot library: the catalog and its label/template data, every reader on generated data,
every metric on a model whose answers are known exactly, heads and ensembles, the cache."""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

import evalsets
import shapes
import zeroshot
from zs_helpers import (EXPECTED, NUM_CLASSES, RETRIEVAL, SAMPLES, CodedModel, make_coco,
                        make_filelist, make_flickr, make_imagefolder, make_mnist, make_wds,
                        write_catalog)

CATALOG, LABELS, TEMPLATES = zeroshot.load_catalog()
TYPES = {'shapes', 'imagefolder', 'torchvision', 'filelist', 'wds', 'tfds', 'retrieval'}
PAPER_SETS = ['imagenet', 'food101', 'cifar10', 'cifar100', 'cub200', 'sun397', 'cars', 'aircraft',
              'dtd', 'pets', 'caltech101', 'flowers', 'mnist', 'fer2013', 'stl10', 'eurosat',
              'resisc45', 'gtsrb', 'kitti_distance', 'country211', 'patch_camelyon', 'ucf101_frames',
              'kinetics700_frames', 'clevr_counts', 'hateful_memes', 'rendered_sst2', 'imagenetv2',
              'imagenet-sketch', 'imagenet-a', 'imagenet-r', 'mscoco', 'flickr30k', 'shapes']


# ----------------------------------------------------------------------------- catalog data

def test_catalog_covers_the_paper_and_is_well_formed():
    assert set(PAPER_SETS) <= set(CATALOG)
    for name, entry in CATALOG.items():
        assert entry['display'] and entry.get('metric', 'top1')
        for source in evalsets.sources(entry):
            assert source['type'] in TYPES, (name, source)
            assert entry['type'] == 'shapes' or not os.path.isabs(source['path']), name
    assert CATALOG['shapes'] == {**CATALOG['shapes'], 'type': 'shapes', 'display': 'shapes held-out'}
    for name in ('aircraft', 'pets', 'caltech101', 'flowers'):
        assert CATALOG[name]['metric'] == 'mean_per_class_recall'
    assert CATALOG['hateful_memes']['metric'] == 'roc_auc'
    assert CATALOG['mscoco']['type'] == CATALOG['flickr30k']['type'] == 'retrieval'


def test_every_classification_entry_has_unique_names_and_templates():
    for name, entry in CATALOG.items():
        if evalsets.task_of(entry) != 'zeroshot_classification':
            continue
        names, templates = LABELS[name], TEMPLATES[name]
        assert names and templates, name
        keys = [tuple(n) if isinstance(n, list) else n for n in names]
        assert len(set(keys)) == len(keys), (name, [k for k in keys if keys.count(k) > 1][:3])
        for t in templates:
            assert t.count('{}') == 1 and not re.search(r'\{(?!\})|(?<!\{)\}', t), (name, t)
    assert len(LABELS['imagenet']) == 1000 and len(TEMPLATES['imagenet']) == 80
    assert LABELS['shapes'] == shapes.CLASSNAMES and TEMPLATES['shapes'] == shapes.TEMPLATES
    expected = {'cifar10': 10, 'cifar100': 100, 'food101': 101, 'sun397': 397, 'cars': 196,
                'aircraft': 100, 'dtd': 47, 'pets': 37, 'caltech101': 102, 'flowers': 102,
                'cub200': 200, 'kinetics700_frames': 700, 'ucf101_frames': 101, 'imagenet-a': 200,
                'imagenet-r': 200, 'country211': 211, 'gtsrb': 43, 'clevr_counts': 8}
    assert {k: len(LABELS[k]) for k in expected} == expected


def test_labels_regenerate_from_their_sources():
    import tools.export_labels as export
    assert export.main(['--check']) == 0          # labels.json/templates.json == the sources


def test_unknown_and_missing_names_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match='valid: shapes'):
        zeroshot.check_names(['nope'])
    with pytest.raises(ValueError, match=f'cifar10: not found at {tmp_path}/cifar10'):
        zeroshot.check_names(['shapes', 'cifar10'], data_root=str(tmp_path))
    zeroshot.check_names(['shapes'], data_root=str(tmp_path))          # generated: never missing
    assert zeroshot.expand_names(['imagenet*', 'shapes'], CATALOG) == [
        n for n in CATALOG if n.startswith('imagenet') or n == 'shapes']


# ----------------------------------------------------------------------------- metrics

def test_classification_metrics_known_values():
    logits = torch.tensor([[3., 2, 1, 0, -1, -2], [0, 3, 2, 1, -1, -2], [0, 1, 2, 3, 4, 5],
                           [5, 4, 3, 2, 1, 0]])
    labels = torch.tensor([0, 0, 0, 5])
    m = zeroshot.classification_metrics(logits, labels)
    assert m['acc1'] == 1 / 4 and m['acc5'] == 2 / 4
    assert m['mean_per_class_recall'] == pytest.approx((1 / 3 + 0) / 2)
    few = zeroshot.classification_metrics(torch.tensor([[1., 0], [0, 1], [1, 0]]),
                                          torch.tensor([0, 0, 1]), auc=True)
    assert few['acc1'] == 1 / 3 and math.isnan(few['acc5'])             # < 5 classes, as CLIP_benchmark
    assert few['roc_auc'] == pytest.approx(0.25)   # positive -1 vs negatives -1 (tie), 1
    assert zeroshot.to_percent(m, 'zeroshot_classification')['top1'] == 25.0


def test_retrieval_metrics_known_values():
    scores = torch.tensor([[.9, .1, .0], [.8, .7, .15], [.1, .2, .05], [.3, .2, .1]])  # 4 texts x 3 images
    owner = torch.tensor([0, 1, 2, 2])
    m = zeroshot.retrieval_metrics(scores, owner, ks=(1, 2))
    approx = pytest.approx                      # float32 means, as CLIP_benchmark computes them
    assert m['image_retrieval_recall@1'] == approx(1 / 4) and m['image_retrieval_recall@2'] == approx(2 / 4)
    assert m['text_retrieval_recall@1'] == approx(2 / 3) and m['text_retrieval_recall@2'] == 1.0


# ----------------------------------------------------------------------------- readers + loops

def _run(tmp_path, tokenizer, entries, model=None, **kw):
    files = write_catalog(tmp_path, entries)
    model = model or CodedModel(NUM_CLASSES, tokenizer)
    return zeroshot.run(model, list(entries), tokenizer, 'cpu', 16, batch_size=4,
                        data_root=str(tmp_path), **files, **kw), model


def test_imagefolder_exact_metrics_and_percent_interface(tmp_path, tokenizer):
    make_imagefolder(tmp_path / 'gen' / 'val')
    results, _ = _run(tmp_path, tokenizer, {'gen': {'type': 'imagefolder', 'path': 'gen/val'}})
    m = results['gen'].metrics
    assert m['acc1'] == EXPECTED['acc1'] and m['acc5'] == EXPECTED['acc5']
    assert m['mean_per_class_recall'] == pytest.approx(EXPECTED['mean_per_class_recall'])
    assert results['gen'].num_samples == len(SAMPLES)
    files = write_catalog(tmp_path, {'gen': {'type': 'imagefolder', 'path': 'gen/val'}})
    pct = zeroshot.evaluate(CodedModel(NUM_CLASSES, tokenizer), ['gen'], tokenizer, 'cpu', 16,
                            data_root=str(tmp_path), **files)['gen']
    assert pct['top1'] == pytest.approx(100 * 5 / 9) and pct['top5'] == pytest.approx(100 * 7 / 9)


def test_two_heads_and_ensembles(tmp_path, tokenizer):
    make_imagefolder(tmp_path / 'gen')
    model = CodedModel(NUM_CLASSES, tokenizer, heads=('z', 'h'))
    results, _ = _run(tmp_path, tokenizer, {'gen': {'type': 'imagefolder', 'path': 'gen'}}, model)
    m = results['gen'].metrics
    assert m['acc1'] == EXPECTED['acc1'] and m['h_acc1'] == EXPECTED['h_acc1']
    assert m['h_acc5'] == EXPECTED['acc5']
    for w in zeroshot.ENSEMBLE_WEIGHTS:           # w on z: z's ranking wins above 0.5
        if w != 0.5:
            assert m[f'zh{w}_acc1'] == (EXPECTED['acc1'] if w > 0.5 else EXPECTED['h_acc1']), w
    pct = results['gen'].percent()
    assert pct['h_top1'] == pytest.approx(100 * 2 / 9) and 'zh0.9_mean_per_class_recall' in pct


@pytest.mark.parametrize('kind', ['filelist-txt', 'filelist-npy', 'wds', 'torchvision'])
def test_every_classification_format(tmp_path, tokenizer, kind):
    if kind.startswith('filelist'):
        make_filelist(tmp_path / 'ds', npy=kind.endswith('npy'))
        labels = [f'count_{i}' for i in range(NUM_CLASSES)] if kind.endswith('txt') else None
        entry = {'type': 'filelist', 'path': 'ds', 'split': 'val', 'label_names': labels}
    elif kind == 'wds':
        make_wds(tmp_path / 'ds')
        entry = {'type': 'imagefolder', 'path': 'not_here', 'fallbacks': [{'type': 'wds', 'path': 'ds'}]}
    else:
        make_mnist(tmp_path / 'ds')
        entry = {'type': 'torchvision', 'class': 'MNIST', 'path': 'ds', 'kwargs': {'train': False}}
    results, model = _run(tmp_path, tokenizer, {'ds': entry})
    r = results['ds']
    assert not r.skipped and r.num_samples == len(SAMPLES)
    if kind == 'torchvision':                      # greyscale: q == p, top-1 right iff p == y
        assert r.metrics['acc1'] == sum(y == p for y, p, _ in SAMPLES) / len(SAMPLES)
    else:
        assert r.metrics['acc1'] == EXPECTED['acc1'] and r.metrics['acc5'] == EXPECTED['acc5']
    if kind == 'wds':                              # the export's own class names and template
        assert r.source['type'] == 'wds' and model.text_calls == 1


@pytest.mark.parametrize('kind', ['coco', 'flickr', 'wds'])
def test_retrieval_formats_known_recall(tmp_path, tokenizer, kind):
    if kind == 'coco':
        make_coco(tmp_path / 'ret')
        entry = {'type': 'retrieval', 'path': 'ret', 'images': 'images', 'annotation': 'ann.json'}
    elif kind == 'flickr':
        make_flickr(tmp_path / 'ret')
        entry = {'type': 'retrieval', 'path': 'ret', 'images': '.', 'annotation': 'test.txt'}
    else:
        make_wds(tmp_path / 'ret', retrieval=RETRIEVAL, per_shard=3)
        entry = {'type': 'retrieval', 'path': 'nope', 'images': '.', 'annotation': 'x.json',
                 'fallbacks': [{'type': 'wds', 'path': 'ret'}]}
    model = CodedModel(5, tokenizer, filler=0.0)
    results, _ = _run(tmp_path, tokenizer, {'ret': entry}, model)
    r = results['ret']
    assert r.task == 'zeroshot_retrieval' and r.num_samples == 4
    assert r.metrics['image_retrieval_recall@1'] == pytest.approx(4 / 5)    # text -> image
    assert r.metrics['text_retrieval_recall@1'] == pytest.approx(3 / 4)     # image -> text
    assert r.metrics['image_retrieval_recall@5'] == r.metrics['text_retrieval_recall@10'] == 1.0
    assert r.percent()['top1'] == pytest.approx((80 + 75) / 2)


def test_missing_dataset_is_skipped_not_raised(tmp_path, tokenizer):
    entries = {'gone': {'type': 'imagefolder', 'path': 'gone/val',
                        'fallbacks': [{'type': 'wds', 'path': 'wds_gone'}]}}
    results, _ = _run(tmp_path, tokenizer, entries)
    assert results['gone'].skipped == f'not found at {tmp_path}/gone/val'
    files = write_catalog(tmp_path, entries)
    with pytest.raises(FileNotFoundError, match='not found at'):
        zeroshot.evaluate(CodedModel(NUM_CLASSES, tokenizer), ['gone'], tokenizer, 'cpu', 16,
                          data_root=str(tmp_path), **files)
    out = zeroshot.evaluate(CodedModel(NUM_CLASSES, tokenizer), ['gone'], tokenizer, 'cpu', 16,
                            data_root=str(tmp_path), skip_missing=True, **files)
    assert out == {'gone': {'skipped': f'not found at {tmp_path}/gone/val'}}


def test_text_cache_skips_the_text_tower(tmp_path, tokenizer):
    make_imagefolder(tmp_path / 'gen')
    entries = {'gen': {'type': 'imagefolder', 'path': 'gen'}}
    cache_dir = str(tmp_path / 'cache')
    first, model = _run(tmp_path, tokenizer, entries, cache=zeroshot.TextCache('ckpt-a', cache_dir),
                        classes_per_batch=3)
    assert model.text_calls == math.ceil(NUM_CLASSES / 3) and len(os.listdir(cache_dir)) == 1
    again = CodedModel(NUM_CLASSES, tokenizer)
    second, _ = _run(tmp_path, tokenizer, entries, again, cache=zeroshot.TextCache('ckpt-a', cache_dir))
    assert again.text_calls == 0 and second['gen'].metrics == first['gen'].metrics
    other = CodedModel(NUM_CLASSES, tokenizer)                     # other weights: a miss
    _run(tmp_path, tokenizer, entries, other, cache=zeroshot.TextCache('ckpt-b', cache_dir))
    assert other.text_calls > 0 and len(os.listdir(cache_dir)) == 2


def test_classifier_is_independent_of_batching_and_averages_synonyms(tokenizer):
    model = CodedModel(4, tokenizer)
    names = ['cls0', ['cls1', 'cls2'], 'cls3']
    a = zeroshot.build_classifier(model, names, ['a {}.', 'the {}!'], tokenizer, 'cpu', classes_per_batch=1)
    b = zeroshot.build_classifier(model, names, ['a {}.', 'the {}!'], tokenizer, 'cpu', classes_per_batch=8)
    assert torch.allclose(a, b) and a.shape == (3, 4)
    assert torch.allclose(a[1], torch.tensor([0, 2 ** -0.5, 2 ** -0.5, 0]))


def _classifier_of_single_prompts(encode, names, templates, tokenizer, **kwargs):
    """The reference: every prompt through the text tower alone (no padding, no prefix cache)."""
    expected = []
    for name in names:
        prompts = [t.format(n) for n in (name if isinstance(name, list) else [name]) for t in templates]
        alone = torch.cat([F.normalize(encode(tokenizer([p]), **kwargs), dim=-1) for p in prompts]).mean(dim=0)
        expected.append(alone / alone.norm())
    return torch.stack(expected)


NAMES = ['cat', ['great white shark', 'white pointer'], 'ox', 'a hammerhead shark seen from below!']
PROMPTS = ['a {}.', 'a bad photo of the {} in the wild at night.', '{}', 'itap of my {}!']


@pytest.mark.parametrize('name', ['CLIP_TINYCNN_CLIP', 'CL2L_TINYCNN_CL2L'])
def test_classifier_from_shared_prefixes_and_sorted_batches_equals_single_prompts(name, tokenizer):
    """Our causal text tower: each template's shared prefix runs once, the rest in batches
    sorted by length; the class embeddings equal those of every prompt encoded alone."""
    import models
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    calls, after_prefix = [], model.encode_text_after_prefix

    def spy(prefixes, which, rest, **kwargs):
        calls.append(zeroshot.token_lengths(rest))
        return after_prefix(prefixes, which, rest, **kwargs)
    model.encode_text_after_prefix = spy
    for head in zeroshot.model_heads(model):
        calls.clear()
        got = zeroshot.build_classifier(model, NAMES, PROMPTS, tokenizer, 'cpu', classes_per_batch=1,
                                        **zeroshot._head_kwargs(model, head))
        seen = torch.cat(calls)
        assert [len(c) for c in calls] == [4, 4, 4, 4, 4] and torch.equal(seen, seen.sort().values)
        expected = _classifier_of_single_prompts(model.encode_text, NAMES, PROMPTS, tokenizer,
                                                 **zeroshot._head_kwargs(model, head))
        assert torch.allclose(got, expected, atol=1e-6), head


def test_towers_without_a_shared_prefix_get_length_sorted_batches(tokenizer):
    import models
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINYCNN_CLIP').eval()
    model.shares_text_prefix = lambda: False                     # e.g. CLIPA's bidirectional tower
    encode, calls = model.encode_text, []

    def spy(tokens, **kwargs):
        calls.append(zeroshot.token_lengths(tokens))
        return encode(tokens, **kwargs)
    model.encode_text = spy
    got = zeroshot.build_classifier(model, NAMES, PROMPTS, tokenizer, 'cpu', classes_per_batch=1)
    seen = torch.cat(calls)
    assert [len(c) for c in calls] == [4, 4, 4, 4, 4] and torch.equal(seen, seen.sort().values)
    assert torch.allclose(got, _classifier_of_single_prompts(encode, NAMES, PROMPTS, tokenizer), atol=1e-6)


def test_template_prefixes_split_each_prompt_into_shared_prefix_and_rest(tokenizer):
    templates = ['a photo of a {}.', '{} !', 'a photo of a {}.']
    tokens = tokenizer([t.format(n) for n in ['dog', 'hot dog'] for t in templates])
    prefixes, starts, which, rest = zeroshot.template_prefixes(tokens, len(templates))
    assert which.tolist() == [0, 1, 2, 0, 1, 2] and starts.tolist() == [5, 1, 5]   # SOT a photo of a
    for i, row in enumerate(tokens):
        n = int(starts[which[i]])
        joined = torch.cat([prefixes[which[i], :n], rest[i]])[:len(row)]
        assert torch.equal(joined, row) and not rest[i, len(row) - n:].any()
    one = tokenizer(['a photo of a dog.'])                        # one prompt: keeps its EOT
    assert zeroshot.common_prefix_length(one) == zeroshot.token_lengths(one)[0] - 1


def test_token_lengths_count_up_to_the_last_non_padding_token(tokenizer):
    tokens = tokenizer(['a', 'the cat!', ''])                     # '!' is id 0 in CLIP's BPE
    assert zeroshot.token_lengths(tokens).tolist() == [3, 5, 2]   # SOT ... EOT
