"""Regenerate labels.json and templates.json from their published sources.

    .venv/bin/python tools/export_labels.py            # rewrite labels.json, templates.json
    .venv/bin/python tools/export_labels.py --check    # exit 1 if the committed files differ

Sources, in order of preference for each list (docs/evaluation.md, "Class names and templates", cites them):
  1. CLIP_benchmark 1.6.2 (`pip install clip_benchmark==1.6.2`): its packaged
     en_classnames.json / en_zeroshot_classification_templates.json, and the ImageNet-A/-R
     WordNet-id subsets read (never executed) from the source of its dataset builder.
  2. OpenAI CLIP's data/prompts.md (tools/sources/clip_prompts_excerpt.md, verbatim sections).
  3. SLIP's labels.json for CUB-200 and the 700 Kinetics-700 names
     (tools/sources/slip_labels_excerpt.json), which CLIP's list lacks.
Templates are stored with a `{}` placeholder (CLIP_benchmark's `{c}` is converted).
"""
import argparse
import ast
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

# our catalog name -> (class-name source, template source); a source is (origin, key)
PLAN = {
    'imagenet': (('cb', 'imagenet1k'), ('cb', 'imagenet1k')),
    'imagenetv2': (('cb', 'imagenet1k'), ('cb', 'imagenet1k')),
    'imagenet-sketch': (('cb', 'imagenet1k'), ('cb', 'imagenet1k')),
    'imagenet-a': (('cb-subset', 'imagenet_a_wnids'), ('cb', 'imagenet1k')),
    'imagenet-r': (('cb-subset', 'imagenet_r_wnids'), ('cb', 'imagenet1k')),
    'food101': (('clip', 'Food101'), ('cb', 'food101')),
    'cifar10': (('clip', 'CIFAR10'), ('cb', 'cifar10')),
    'cifar100': (('clip', 'CIFAR100'), ('cb', 'cifar100')),
    'cub200': (('slip', 'cub200'), ('clip', 'Birdsnap')),
    'sun397': (('clip', 'SUN397'), ('cb', 'sun397')),
    'cars': (('clip', 'StanfordCars'), ('cb', 'cars')),
    'aircraft': (('clip', 'FGVCAircraft'), ('cb', 'fgvc_aircraft')),
    'dtd': (('clip', 'DescribableTextures'), ('cb', 'dtd')),
    'pets': (('cb', 'pets'), ('cb', 'pets')),
    'caltech101': (('cb', 'caltech101'), ('cb', 'caltech101')),
    'flowers': (('cb', 'flowers'), ('cb', 'flowers')),
    'mnist': (('cb', 'mnist'), ('cb', 'mnist')),
    'fer2013': (('cb', 'fer2013'), ('cb', 'fer2013')),
    'stl10': (('clip', 'STL10'), ('cb', 'stl10')),
    'eurosat': (('cb', 'eurosat'), ('cb', 'eurosat')),
    'resisc45': (('clip', 'RESISC45'), ('cb', 'resisc45')),
    'gtsrb': (('cb', 'gtsrb'), ('cb', 'gtsrb')),
    'kitti_distance': (('cb', 'kitti_closest_vehicle_distance'), ('cb', 'kitti_closest_vehicle_distance')),
    'country211': (('cb', 'country211'), ('cb', 'country211')),
    'patch_camelyon': (('cb', 'pcam'), ('cb', 'pcam')),
    'ucf101_frames': (('clip', 'UCF101'), ('clip', 'UCF101')),
    'kinetics700_frames': (('slip', 'kinetics700_frames'), ('clip', 'Kinetics700')),
    'clevr_counts': (('cb', 'clevr_count_all'), ('cb', 'clevr_count_all')),
    'hateful_memes': (('clip', 'HatefulMemes'), ('clip', 'HatefulMemes')),
    'rendered_sst2': (('clip', 'SST2'), ('cb', 'renderedsst2')),
}

# OpenAI's ImageNet list names two pairs of WordNet synsets identically, which makes their text
# embeddings identical; we use the synsets' other WordNet lemma for the second of each pair.
IMAGENET_DUPLICATES = {744: 'projectile',        # n04008634 "projectile, missile" (657 is "missile")
                       836: 'sunglass'}          # n04355933 "sunglass" (837 is "sunglasses")


def clip_benchmark_dir():
    import clip_benchmark.datasets
    return os.path.dirname(clip_benchmark.datasets.__file__)


def load_clip_benchmark():
    d = clip_benchmark_dir()
    with open(os.path.join(d, 'en_classnames.json')) as f:
        names = json.load(f)
    with open(os.path.join(d, 'en_zeroshot_classification_templates.json')) as f:
        templates = json.load(f)
    return names, templates


def clip_benchmark_wnid_lists():
    """The WordNet-id literals of clip_benchmark/datasets/builder.py, parsed, not executed."""
    with open(os.path.join(clip_benchmark_dir(), 'builder.py')) as f:
        tree = ast.parse(f.read())
    found = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ('all_imagenet_wordnet_ids', 'imagenet_a_wnids',
                                           'imagenet_r_wnids')):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def load_clip_prompts(path=os.path.join(HERE, 'sources', 'clip_prompts_excerpt.md')):
    """{section: {'classes': [...], 'templates': [...]}} from the markdown's python-list blocks."""
    with open(path) as f:
        text = f.read()
    sections = {}
    for part in re.split(r'^## ', text, flags=re.M)[1:]:
        title, body = part.split('\n', 1)
        lists = {m.group(1): ast.literal_eval(m.group(2))
                 for m in re.finditer(r'^(classes|templates) = (\[.*?^\])', body, re.M | re.S)}
        sections[title.strip()] = lists
    return sections


def load_slip(path=os.path.join(HERE, 'sources', 'slip_labels_excerpt.json')):
    with open(path) as f:
        return json.load(f)


def as_template(t):
    t = t.replace('{c}', '{}')
    if t.count('{}') != 1 or re.search(r'\{(?!\})|(?<!\{)\}', t):
        raise ValueError(f'template {t!r} must hold exactly one {{}} placeholder')
    return t


def build():
    cb_names, cb_templates = load_clip_benchmark()
    clip = load_clip_prompts()
    slip = load_slip()
    wnids = clip_benchmark_wnid_lists()
    imagenet = list(cb_names['imagenet1k'])
    for index, name in IMAGENET_DUPLICATES.items():
        imagenet[index] = name

    def names_from(origin, key):
        if origin == 'cb':
            return imagenet if key == 'imagenet1k' else cb_names[key]
        if origin == 'cb-subset':
            keep = set(wnids[key])
            return [n for n, w in zip(imagenet, wnids['all_imagenet_wordnet_ids']) if w in keep]
        if origin == 'clip':
            return clip[key]['classes']
        return slip[key]

    def templates_from(origin, key):
        return cb_templates[key] if origin == 'cb' else clip[key]['templates']

    import shapes
    shape_sets = ['shapes'] + [f'shapes-{s}' for s in shapes.SHIFT_SPLITS]   # one class list: the splits'
    labels = {name: list(shapes.CLASSNAMES) for name in shape_sets}
    templates = {name: list(shapes.TEMPLATES) for name in shape_sets}
    for name, (names_src, templates_src) in PLAN.items():
        labels[name] = list(names_from(*names_src))
        templates[name] = [as_template(t) for t in templates_from(*templates_src)]
    return labels, templates


def dump(obj):
    return json.dumps(obj, indent=1, ensure_ascii=False) + '\n'


def provenance_table():
    origin_name = {'cb': 'CLIP_benchmark', 'cb-subset': 'CLIP_benchmark (ImageNet subset)',
                   'clip': 'CLIP prompts.md', 'slip': 'SLIP labels.json'}
    rows = ['| entry | class names | templates |', '|---|---|---|']
    for name, ((o1, k1), (o2, k2)) in PLAN.items():
        rows.append(f'| `{name}` | {origin_name[o1]} `{k1}` | {origin_name[o2]} `{k2}` |')
    return '\n'.join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true', help='only compare with the committed files')
    parser.add_argument('--table', action='store_true', help='print the provenance table (markdown)')
    args = parser.parse_args(argv)
    if args.table:
        print(provenance_table())
        return 0
    labels, templates = build()
    stale = []
    for fname, obj in (('labels.json', labels), ('templates.json', templates)):
        path = os.path.join(ROOT, fname)
        if args.check:
            with open(path) as f:
                if f.read() != dump(obj):
                    stale.append(fname)
        else:
            with open(path, 'w') as f:
                f.write(dump(obj))
    if stale:
        print(f"out of date: {', '.join(stale)}; run tools/export_labels.py")
        return 1
    print(f"{'checked' if args.check else 'wrote'} labels.json and templates.json: "
          f"{len(labels)} entries, {sum(map(len, labels.values()))} class names")
    return 0


if __name__ == '__main__':
    sys.exit(main())
