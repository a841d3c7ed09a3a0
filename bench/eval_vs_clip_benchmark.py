"""Zero-shot evaluation end to end: our eval_zeroshot.py against CLIP_benchmark on the same model
(exported to OpenCLIP's format, which CLIP_benchmark loads through open_clip) and the same
generated ImageFolder, one fresh process per run, arms interleaved round by round.

    python bench/eval_vs_clip_benchmark.py [--model CLIP_VITB32_CLIP] [--classes 100] [--per-class 50] [--rounds 3]
    python bench/eval_vs_clip_benchmark.py --quick     # smoke run: tiny ViT, 10 classes x 4 templates

Each round runs, as a user would from the shell (python start-up, model load, text classifier,
image pass, metrics, result file):
  ours cold:   eval_zeroshot.py with an empty --cache-dir (the text tower runs);
  ours warm:   the same again: the class embeddings come from the text-feature cache;
  CLIP_benchmark: `python -m clip_benchmark.cli eval --model_type open_clip --model local-dir:EXPORT`
               (no text cache: every run builds its classifier);
  CLIP_benchmark --load_clfs: with the classifier it saved (--save_clf) in its first run.
Same batch size, workers, images (--classes x --per-class 500x375 JPEGs) and prompts (the first
--classes ImageNet class names x --templates of its 80 templates). Prints wall and CPU seconds
(the process and its children) as min / median / max and the ratios of the medians, and
asserts that every run reports the same acc1, acc5 and mean per-class recall.

`--precision bf16` times both sides in bf16 autocast instead (ours `--precision bf16`,
CLIP_benchmark without `--no_amp`: its default, which autocasts to bf16 on a CPU): each side's
runs are asserted to agree with each other; the two sides' metrics are printed, not asserted
equal (two implementations of the model round differently in bf16).
"""
import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

from loader_common import Clock, photo, spread  # noqa: E402

METRICS = ('acc1', 'acc5', 'mean_per_class_recall')
CB_DATASET = 'imagenet1k-unverified'      # CLIP_benchmark's ImageFolder at DATASET_ROOT/val
ARMS = ('ours cold', 'ours warm', 'CLIP_benchmark', 'CLIP_benchmark --load_clfs')


# ----------------------------------------------------------------------------- inputs

def make_imagefolder(root, classes, per_class):
    """root/val/cNNN/iiii.jpg: `per_class` photo-like 500x375 JPEGs per class."""
    for c in range(classes):
        folder = os.path.join(root, 'val', f'c{c:03d}')
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            with open(os.path.join(folder, f'{i:04d}.jpg'), 'wb') as f:
                f.write(photo(c * per_class + i))


def make_model(folder, model_name, image_size):
    """A randomly initialised checkpoint of ours and its OpenCLIP export -> (checkpoint, export dir)."""
    import torch
    import checkpoint
    import interop
    import models
    torch.manual_seed(0)
    model = models.create_model(model_name, image_size=image_size)
    ckpt = os.path.join(folder, 'model.pt')
    checkpoint.save({'model': model.state_dict(), 'model_name': model_name,
                     'args': {'image_size': image_size, 'context_length': 77}}, ckpt)
    export = os.path.join(folder, 'export')
    interop.main(['export', '--checkpoint', ckpt, '--out', export])
    return ckpt, export


def write_prompts(folder, classes, templates):
    """Our catalog / labels / templates files and CLIP_benchmark's custom class-name and template
    files, holding the same class names and prompts."""
    names = json.load(open(os.path.join(ROOT, 'labels.json')))['imagenet'][:classes]
    prompts = json.load(open(os.path.join(ROOT, 'templates.json')))['imagenet'][:templates]
    files = {k: os.path.join(folder, f'{k}.json')
             for k in ('catalog', 'labels', 'templates', 'cb_names', 'cb_templates')}
    contents = {'catalog': {'gen': {'type': 'imagefolder', 'path': 'val', 'display': 'generated'}},
                'labels': {'gen': names}, 'templates': {'gen': prompts},
                'cb_names': {CB_DATASET: names},
                'cb_templates': {CB_DATASET: [t.replace('{}', '{c}') for t in prompts]}}
    for key, path in files.items():
        with open(path, 'w') as f:
            json.dump(contents[key], f)
    return files


# ----------------------------------------------------------------------------- the runs

def commands(a, data, ckpt, export, files, work):
    """arm -> (command, result JSON glob)."""
    py = sys.executable
    ours = [py, os.path.join(ROOT, 'eval_zeroshot.py'), '--resume', ckpt, '--data-root', data,
            '--datasets', 'gen', '--catalog', files['catalog'], '--labels', files['labels'],
            '--templates', files['templates'], '--batch-size', str(a.batch_size), '-j', str(a.workers),
            '--cache-dir', os.path.join(work, 'text_cache'), '--output-dir', os.path.join(work, 'ours')]
    cb = [py, '-m', 'clip_benchmark.cli', 'eval', '--model_type', 'open_clip', '--model', f'local-dir:{export}',
          '--pretrained', '', '--dataset', CB_DATASET, '--dataset_root', data,
          '--custom_classname_file', files['cb_names'], '--custom_template_file', files['cb_templates'],
          '--num_workers', str(a.workers), '--batch_size', str(a.batch_size), '--quiet']
    if a.precision == 'fp32':
        cb.append('--no_amp')                   # CLIP_benchmark autocasts (bf16 on CPU) unless told not to
    else:
        ours += ['--precision', a.precision]
    clf = os.path.join(work, 'classifier.pt')
    return {'ours cold': (ours, os.path.join(work, 'ours', '*_zeroshot_classification.json')),
            'ours warm': (ours, os.path.join(work, 'ours', '*_zeroshot_classification.json')),
            'CLIP_benchmark': (cb + ['--output', os.path.join(work, 'cb.json'), '--save_clf', clf],
                               os.path.join(work, 'cb.json')),
            'CLIP_benchmark --load_clfs': (cb + ['--output', os.path.join(work, 'cb_clf.json'), '--load_clfs', clf],
                                           os.path.join(work, 'cb_clf.json'))}


def timed(command):
    """-> (wall s, CPU s of the child and its children) of one process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def metrics_of(pattern):
    paths = glob.glob(pattern)
    if len(paths) != 1:
        raise SystemExit(f"expected one result file at {pattern}, found {paths}")
    with open(paths[0]) as f:
        metrics = json.load(f)['metrics']
    os.remove(paths[0])
    return {k: metrics[k] for k in METRICS}


def run_rounds(a, runs, work):
    """-> ({arm: [(wall, cpu)]}, {arm: [metrics]}), the arms in ARMS order each round."""
    times, metrics = {arm: [] for arm in ARMS}, {arm: [] for arm in ARMS}
    for _ in range(a.rounds):
        shutil.rmtree(os.path.join(work, 'text_cache'), ignore_errors=True)     # cold: nothing cached
        for arm in ARMS:
            command, result = runs[arm]
            times[arm].append(timed(command))
            metrics[arm].append(metrics_of(result))
    return times, metrics


def check_same_metrics(metrics):
    """Every run of every arm reports the same metrics (asserted after the table is printed,
    so that a long run still shows its times)."""
    reference = next((m for runs in metrics.values() for m in runs), None)
    for arm, runs in metrics.items():
        for m in runs:
            assert m == reference, f"{arm}: {m} != the first run's {reference}"
    return reference


def check_same_metrics_per_side(metrics):
    """bf16: each side's runs agree with each other (asserted); -> {side: its metrics}."""
    sides = {'ours': {}, 'CLIP_benchmark': {}}
    for arm, runs in metrics.items():
        sides['ours' if arm.startswith('ours') else 'CLIP_benchmark'][arm] = runs
    return {side: check_same_metrics(arms) for side, arms in sides.items()}


def print_table(times, metrics, n_images, a):
    print(f"\n{n_images} images, {a.classes} classes x {a.templates} templates, {a.model} at "
          f"{a.image_size} px, batch {a.batch_size}, {a.workers} workers, {a.rounds} rounds, {a.precision}; "
          f"metrics of the first run: {metrics[ARMS[0]][0]}\n")
    base_wall = statistics.median(w for w, _ in times['CLIP_benchmark'])
    base_cpu = statistics.median(c for _, c in times['CLIP_benchmark'])
    print("| run | wall s (min / median / max) | CPU s (min / median / max) "
          "| CLIP_benchmark wall / this | CLIP_benchmark CPU / this |")
    print("|---|---|---|---|---|")
    for arm in ARMS:
        wall, cpu = [w for w, _ in times[arm]], [c for _, c in times[arm]]
        print(f"| {arm} | {spread(wall, '{:.1f}')} | {spread(cpu, '{:.1f}')} | "
              f"{base_wall / statistics.median(wall):.2f}x | {base_cpu / statistics.median(cpu):.2f}x |",
              flush=True)


# ----------------------------------------------------------------------------- where the time goes

def load_ours(a, ckpt_path, device):
    """-> (model, tokenizer) as eval_zeroshot.py loads them."""
    import checkpoint
    import towers
    ckpt = checkpoint.load_model_checkpoint(ckpt_path)
    return checkpoint.load_model(ckpt, a.image_size, device).eval(), towers.tokenizer_for(ckpt['args'])


def dataset_ours(a, data, files):
    """-> (dataset, class names, prompts) of the generated ImageFolder, as eval_zeroshot.py builds them."""
    import evalsets
    import zeroshot
    catalog, labels, templates = zeroshot.load_catalog(files['catalog'], files['labels'], files['templates'])
    return evalsets.build('gen', {'type': 'imagefolder', 'path': os.path.join(data, 'val')}, a.image_size,
                          'zeroshot_classification', labels['gen'], templates['gen'])


def phases_ours(a, ckpt_path, data, files, cache_dir, clock):
    """eval_zeroshot.py's work, phase by phase (its functions, in this process)."""
    import torch
    import checkpoint
    import evalsets
    import zeroshot
    device = torch.device('cpu')
    with clock('model load'):
        model, tokenizer = load_ours(a, ckpt_path, device)
    dataset, classnames, prompts = dataset_ours(a, data, files)
    sha = checkpoint.file_sha256(ckpt_path)          # the cache key eval_zeroshot.py uses
    with torch.no_grad():
        with clock('text classifier, cold'):
            weights = zeroshot.cached_classifier(model, 'z', classnames, prompts, tokenizer, device)
        zeroshot.cached_classifier(model, 'z', classnames, prompts, tokenizer, device,
                                   zeroshot.TextCache(sha, cache_dir))          # filled, if it was not
        with clock('text classifier, warm'):                # a new process's cache: read from disk
            weights = zeroshot.cached_classifier(model, 'z', classnames, prompts, tokenizer, device,
                                                 zeroshot.TextCache(sha, cache_dir))
    loader = torch.utils.data.DataLoader(dataset, batch_size=a.batch_size, num_workers=0, collate_fn=evalsets.collate)
    with clock('image pass'), torch.no_grad():
        logits, target = zeroshot.run_classification(model, loader, {'z': weights.t().contiguous()}, device)
    with clock('metrics'):
        return zeroshot.classification_metrics(logits['z'], target)


def phases_cb(a, export, data, files, clock):
    """CLIP_benchmark's work, phase by phase, as its cli.py and evaluate() do it."""
    import torch
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.models import load_clip
    from sklearn.metrics import balanced_accuracy_score
    with clock('model load'):
        model, transform, tokenizer = load_clip(model_type='open_clip', model_name=f'local-dir:{export}',
                                                pretrained='', cache_dir=None, device='cpu')
        model.eval()
    dataset = build_dataset(dataset_name=CB_DATASET, root=data, transform=transform, split='test',
                            download=True, custom_template_file=files['cb_templates'],
                            custom_classname_file=files['cb_names'])
    with clock('text classifier, cold'):
        classifier = zc.zero_shot_classifier(model, tokenizer, dataset.classes, dataset.templates, 'cpu', amp=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=a.batch_size, num_workers=0,
                                         collate_fn=get_dataset_collate_fn(CB_DATASET))
    with clock('image pass'):
        logits, target = zc.run_classification(model, classifier, loader, 'cpu', amp=False)
    with clock('metrics'):                         # as zc.evaluate computes them
        acc1, acc5 = zc.accuracy(logits, target, topk=(1, 5))
        return {'acc1': acc1, 'acc5': acc5,
                'mean_per_class_recall': balanced_accuracy_score(target, logits.argmax(axis=1))}


def bf16_lever(a, ckpt_path, data, files):
    """The lever this benchmark points at: our image pass and text classifier under bf16 autocast
    (what CLIP_benchmark runs on CPU unless --no_amp) against fp32, in this process, 0 workers,
    on --lever-images images spread over the classes and the first --lever-classes classes' text
    classifier: -> rows of (what, fp32 (wall s, CPU s), bf16 (wall s, CPU s), agreement, its format).
    `eval_zeroshot.py --precision bf16` evaluates this way."""
    import torch
    import engine
    import evalsets
    import zeroshot
    device = torch.device('cpu')
    model, tokenizer = load_ours(a, ckpt_path, device)
    dataset, classnames, prompts = dataset_ours(a, data, files)
    subset = torch.utils.data.Subset(dataset, range(0, len(dataset), max(1, len(dataset) // a.lever_images)))
    loader = torch.utils.data.DataLoader(subset, batch_size=a.batch_size, num_workers=0, collate_fn=evalsets.collate)
    weights = zeroshot.cached_classifier(model, 'z', classnames, prompts, tokenizer, device)
    out = {}
    for precision in ('fp32', 'bf16'):
        clock = Clock()
        with torch.no_grad(), engine.autocast(device, precision):
            with clock('text'):
                text = zeroshot.cached_classifier(model, 'z', classnames[:a.lever_classes], prompts, tokenizer, device)
            with clock('image'):
                logits, _ = zeroshot.run_classification(model, loader, {'z': weights.t().contiguous()}, device)
        out[precision] = (clock, text, logits['z'])     # both float32 already (zeroshot casts them)
    (c32, t32, l32), (c16, t16, l16) = out['fp32'], out['bf16']
    same = (l32.argmax(1) == l16.argmax(1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(t32.flatten(1), t16.flatten(1), dim=-1).min().item()
    return [(f'image pass, {len(subset)} images', c32.phases['image'], c16.phases['image'],
             same, 'same top-1 class for {:.1%} of the images'),
            (f'text classifier, {min(a.lever_classes, len(classnames))} classes x {len(prompts)} prompts',
             c32.phases['text'], c16.phases['text'], cos, 'class embeddings: cosine >= {:.5f}')]


def print_bf16_lever(a, ckpt, data, files):
    print(f"\nthe lever: bf16 autocast (ours, in process, 0 workers; {torch_note()}):\n")
    print("| phase | fp32 wall s / CPU s | bf16 wall s / CPU s | fp32 / bf16 wall | agreement |\n|---|---|---|---|---|")
    for what, f32, b16, agreement, text in bf16_lever(a, ckpt, data, files):
        print(f"| {what} | {f32[0]:.2f} / {f32[1]:.2f} | {b16[0]:.2f} / {b16[1]:.2f} | "
              f"{f32[0] / b16[0]:.2f}x | {text.format(agreement)} |", flush=True)


def torch_note():
    """bf16 speed on CPU depends on the matrix units: say whether this CPU reports AMX."""
    import torch
    flags = open('/proc/cpuinfo').read() if os.path.exists('/proc/cpuinfo') else ''
    return f"torch {torch.__version__}, this CPU {'has' if 'amx_bf16' in flags else 'reports no'} AMX bf16"


def print_phases(a, ckpt, export, data, files, work):
    """Each side split into phases, in this process, no loader workers (one pass each); -> the
    metrics of both sides (equal: asserted by the caller)."""
    imports = {'ours': timed([sys.executable, '-c', 'import eval_zeroshot']),
               'CLIP_benchmark': timed([sys.executable, '-c', 'import clip_benchmark.cli, open_clip'])}
    clocks = {'ours': Clock(), 'CLIP_benchmark': Clock()}
    metrics = {'ours (in process)': [phases_ours(a, ckpt, data, files, os.path.join(work, 'text_cache'),
                                                 clocks['ours'])],
               'CLIP_benchmark (in process)': [phases_cb(a, export, data, files, clocks['CLIP_benchmark'])]}
    print("\nwhere the time goes (wall s / CPU s; in process, 0 workers, one pass; "
          "import: a fresh python importing the entry point):\n")
    print("| phase | ours | CLIP_benchmark |\n|---|---|---|")
    rows = ['import'] + list(dict.fromkeys([*clocks['ours'].phases, *clocks['CLIP_benchmark'].phases]))
    for phase in rows:
        cells = []
        for side in ('ours', 'CLIP_benchmark'):
            value = imports[side] if phase == 'import' else clocks[side].phases.get(phase)
            if value is None and phase == 'text classifier, warm':
                value = clocks[side].phases.get('text classifier, cold')     # no cache: built again
            cells.append(f"{value[0]:.2f} / {value[1]:.2f}" if value else '-')
        print(f"| {phase} | {cells[0]} | {cells[1]} |", flush=True)
    return metrics


# ----------------------------------------------------------------------------- main

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='CLIP_VITB32_CLIP', help='our model (random weights), exported to OpenCLIP')
    p.add_argument('--image-size', type=int, default=224)
    p.add_argument('--classes', type=int, default=100)
    p.add_argument('--per-class', type=int, default=50, help='images per class (500x375 JPEGs)')
    p.add_argument('--templates', type=int, default=80, help="prompt templates (the first N of ImageNet's 80)")
    p.add_argument('--batch-size', type=int, default=64, help="both sides (CLIP_benchmark's default)")
    p.add_argument('--workers', type=int, default=2, help='data-loading processes, both sides')
    p.add_argument('--rounds', type=int, default=3,
                   help='interleaved rounds (min / median / max; 0: only the in-process phases and the lever)')
    p.add_argument('--no-phases', dest='phases', action='store_false',
                   help='skip the in-process split of each side into import, model load, text classifier, '
                        'image pass and metrics')
    p.add_argument('--lever-images', type=int, default=1000,
                   help='images (spread over the classes) in the bf16-autocast lever measurement (0: skip it)')
    p.add_argument('--lever-classes', type=int, default=10, help='classes whose text classifier the lever times')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16'],
                   help='arithmetic of both sides (bf16: autocast, CLIP_benchmark\'s default on CPU; times the '
                        'end-to-end runs only, the fp32 in-process phases and lever are skipped)')
    p.add_argument('--data-dir', default=None, help='reuse/keep the ImageFolder and model here (default: a temp dir)')
    p.add_argument('--quick', action='store_true',
                   help='smoke run: CLIP_TINYVIT_CLIP at 32 px, 10 classes x 4 templates x 5 images, 1 round')
    a = p.parse_args(argv)
    if a.quick:
        a.model, a.image_size, a.classes, a.per_class, a.templates = 'CLIP_TINYVIT_CLIP', 32, 10, 5, 4
        a.batch_size, a.workers, a.rounds, a.lever_images, a.lever_classes = 16, 0, 1, 16, 2
    if not 5 <= a.classes <= 1000 or not 1 <= a.templates <= 80:    # acc5 needs 5 classes
        p.error('--classes must be in 5..1000 and --templates in 1..80 (ImageNet\'s class names and templates)')
    if min(a.per_class, a.batch_size, a.image_size) < 1 or min(a.workers, a.rounds, a.lever_images) < 0:
        p.error('--per-class, --batch-size and --image-size must be >= 1, --workers, --rounds and '
                '--lever-images >= 0')
    if a.precision != 'fp32':
        a.phases, a.lever_images = False, 0
    if not (a.rounds or a.phases or a.lever_images):
        p.error('--rounds 0 with --no-phases and --lever-images 0 leaves nothing to measure')
    return a


def main(argv=None):
    a = get_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.data_dir or tmp
        data = os.path.join(folder, 'data')
        if not os.path.isdir(os.path.join(data, 'val')):
            t0 = time.time()
            make_imagefolder(data, a.classes, a.per_class)
            print(f"wrote {a.classes * a.per_class} JPEGs in {time.time() - t0:.0f} s")
        ckpt, export = make_model(folder, a.model, a.image_size)
        files = write_prompts(folder, a.classes, a.templates)
        work = os.path.join(folder, 'runs')
        os.makedirs(work, exist_ok=True)
        times, metrics = run_rounds(a, commands(a, data, ckpt, export, files, work), work)
        if a.rounds:
            print_table(times, metrics, a.classes * a.per_class, a)
        if a.phases:
            metrics.update(print_phases(a, ckpt, export, data, files, work))
        if a.lever_images:
            print_bf16_lever(a, ckpt, data, files)
        if a.precision != 'fp32':
            reference = check_same_metrics_per_side(metrics)
            print(f"\n{a.precision}: identical acc1 / acc5 / mean per-class recall within each side's runs; "
                  + '; '.join(f'{side}: {m}' for side, m in reference.items()))
        else:
            reference = check_same_metrics(metrics)
            runs = sum(len(v) for v in metrics.values())
            if runs:
                print(f"\nidentical acc1 / acc5 / mean per-class recall in all {runs} runs: {reference}")
    return times, reference


if __name__ == '__main__':
    main()
