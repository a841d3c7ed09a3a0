"""eval_linear.py: the probe separates classes a random-weight tower separates (solid colours)
while a shuffled-label control stays near chance; the L-BFGS logistic regression equals
scikit-learn's; the weight-decay sweep picks the grid value a direct computation picks;
one-line errors for bad inputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import eval_linear
import zeroshot
from zs_helpers import tiny_checkpoint

COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 220), (230, 210, 50), (200, 60, 210), (40, 200, 210)]
NAMES = ['red', 'green', 'blue', 'yellow', 'magenta', 'cyan']


def make_colour_folder(root, per_class, seed, classes=len(COLOURS)):
    """ImageFolder of noisy solid colours, one colour per class, varied sizes (28-47 px)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / NAMES[c]
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(28, 48, size=2)
            base = np.array(COLOURS[c]) + rng.integers(-30, 30, size=3)
            pixels = np.clip(base + rng.integers(-25, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f'{i}.png')
    return root


pytestmark = pytest.mark.usefixtures('one_thread')   # tiny models: one thread (conftest.py)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('colours')
    return make_colour_folder(root / 'train', 24, 0), make_colour_folder(root / 'val', 8, 1)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tinycnn.pt', name='CLIP_TINYCNN_CLIP')


def test_probe_separates_colours_shuffled_labels_stay_at_chance(tmp_path, data, ckpt):
    train_dir, val_dir = data
    out = tmp_path / 'probe.json'
    grid = ['1e-4', '1e-2', '1']
    result = eval_linear.main(['--resume', ckpt, '--train-dir', str(train_dir), '--val-dir', str(val_dir),
                               '--head', 'backbone', '--wd-grid', *grid, '--max-iter', '300',
                               '--output', str(out)])
    assert result['top1'] >= 90, result
    record = json.load(open(out))
    assert record['num_classes'] == 6 and record['num_train'] == 144 and record['num_test'] == 48
    assert record['feature_dim'] == 128 and record['best_wd'] in [float(w) for w in grid]
    assert set(record['holdout_top1']) == {str(float(w)) for w in grid}
    assert {'top1', 'top5', 'mean_per_class_recall'} <= set(record)

    ck = checkpoint.load_model_checkpoint(ckpt)             # control: the same features,
    model = checkpoint.load_model(ck, 32)                          # training labels permuted
    train_set, test_set, classes = eval_linear.folder_pair(str(train_dir), str(val_dir), 32)
    x, y = eval_linear.extract_features(model, train_set, 'backbone', torch.device('cpu'))
    xt, yt = eval_linear.extract_features(model, test_set, 'backbone', torch.device('cpu'))
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    control = eval_linear.linear_probe(x, shuffled, xt, yt, len(classes), [1e-2, 1.0], max_iter=300)
    assert control['top1'] <= 40, control['top1']                  # chance: 16.7 %


def test_z_head_features_are_the_normalised_embedding(data, ckpt):
    ck = checkpoint.load_model_checkpoint(ckpt)
    model = checkpoint.load_model(ck, 32)
    dataset = eval_linear.image_folder(str(data[1]), 32, '--val-dir')
    x, y = eval_linear.extract_features(model, dataset, 'z', torch.device('cpu'), batch_size=10)
    images = torch.stack([dataset[i]['image'] for i in range(3)])
    with torch.no_grad():
        direct = model.encode_image(images, normalize=True)
    assert x.shape == (48, 128) and torch.allclose(x[:3], direct, atol=1e-5)
    assert y.tolist() == sorted(y.tolist()) and torch.allclose(x.norm(dim=1), torch.ones(48), atol=1e-5)


def test_logistic_regression_equals_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    n, d, k, wd = 150, 8, 3, 1e-2
    centres = rng.normal(size=(k, d))
    y = rng.integers(0, k, size=n)
    x = centres[y] + 1.5 * rng.normal(size=(n, d))                  # overlapping classes
    weight, bias = eval_linear.fit_logreg(torch.from_numpy(x), torch.from_numpy(y), k, wd)
    ref = LogisticRegression(C=1 / (wd * n), tol=1e-10, max_iter=10000).fit(x, y)
    ours = torch.softmax(eval_linear.predict(torch.from_numpy(x), weight, bias), dim=1).numpy()
    np.testing.assert_allclose(weight.numpy(), ref.coef_, atol=1e-4)   # W is unique (L2)
    np.testing.assert_allclose(ours, ref.predict_proba(x), atol=1e-5)
    grad_w, = torch.autograd.grad(eval_linear.logreg_loss(
        torch.from_numpy(x), torch.from_numpy(y), weight.requires_grad_(), bias, wd), weight)
    assert grad_w.abs().max() < 1e-6                                 # a stationary point


def test_sweep_picks_the_grid_value_a_direct_computation_picks():
    rng = np.random.default_rng(1)
    n, d, k = 240, 30, 4
    centres = 0.6 * rng.normal(size=(k, d))
    y = torch.from_numpy(rng.integers(0, k, size=n))
    x = torch.from_numpy(centres[y.numpy()] + rng.normal(size=(n, d)))   # few samples per dim: wd matters
    grid = [1e-4, 1e-2, 1e-1, 1.0, 10.0]
    best, scores, _ = eval_linear.sweep_wd(x, y, k, grid, fraction=0.25, seed=3)
    fit, held = eval_linear.holdout_split(y, 0.25, seed=3)
    direct = {wd: eval_linear.top1(eval_linear.predict(x[held], *eval_linear.fit_logreg(x[fit], y[fit], k, wd)),
                                   y[held]) for wd in grid}
    assert set(scores) == set(grid) and best in grid
    for wd in grid:                                                  # warm starts reach the same optimum
        assert abs(scores[wd] - direct[wd]) <= 1 / len(held), (wd, scores[wd], direct[wd])
    assert best == max(direct, key=lambda w: (direct[w], w))
    assert len(set(scores.values())) > 1                             # the grid does matter here

    sep_x = torch.cat([torch.randn(20, 2) + 10, torch.randn(20, 2) - 10]).double()
    sep_y = torch.tensor([0] * 20 + [1] * 20)
    best, scores, _ = eval_linear.sweep_wd(sep_x, sep_y, 2, grid)
    assert set(scores.values()) == {1.0} and best == max(grid)     # ties: the largest decay


def test_holdout_split_is_stratified_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, held = eval_linear.holdout_split(y, 0.2, seed=0)
    assert sorted(fit.tolist() + held.tolist()) == list(range(16))
    assert torch.bincount(y[held], minlength=3).tolist() == [2, 1, 0]


def test_catalog_training_splits():
    assert eval_linear._train_source({'type': 'torchvision', 'class': 'CIFAR10', 'path': 'cifar10',
                                      'kwargs': {'train': False}})['kwargs'] == {'train': True}
    assert eval_linear._train_source({'type': 'imagefolder', 'path': 'imagenet/val'})['path'] == 'imagenet/train'
    assert eval_linear._train_source({'type': 'wds', 'path': 'wds_x'})['split'] == 'train'
    assert eval_linear._train_source({'type': 'imagefolder', 'path': 'imagenet-r'}) is None


def test_shapes_catalog_entry_runs(tmp_path, ckpt):
    result = eval_linear.main(['--resume', ckpt, '--dataset', 'shapes', '--shapes-num-train', '300',
                               '--image-size', '32', '--head', 'z', '--wd-grid', '1e-2', '--max-iter', '50'])
    assert result['num_classes'] == 10 and result['num_train'] == 300 and result['num_test'] == 1000
    assert result['holdout_top1'] == {} and 0 <= result['top1'] <= 100


def test_one_line_errors(tmp_path, data, ckpt, capsys):
    train_dir, val_dir = data
    other = tmp_path / 'other_kind.pt'
    checkpoint.save({'kind': checkpoint.FINETUNE_KIND, 'model': {}, 'model_name': 'CLIP_TINYCNN_CLIP',
                     'args': {}}, str(other))
    plain = tmp_path / 'plain.pt'
    torch.save({'state_dict': {}}, plain)
    (tmp_path / 'fewer' / 'red').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'fewer' / 'red' / '0.png')
    cases = [
        (['--resume', ckpt, '--train-dir', str(tmp_path / 'nope'), '--val-dir', str(val_dir)],
         f"--train-dir '{tmp_path / 'nope'}': not a directory"),
        (['--resume', str(other), '--train-dir', str(train_dir), '--val-dir', str(val_dir)],
         'a fine-tuned classifier (finetune_classification.py)'),
        (['--resume', str(plain), '--train-dir', str(train_dir), '--val-dir', str(val_dir)],
         'not a checkpoint written by main.py (no model, model_name, args)'),
        (['--resume', ckpt, '--train-dir', str(train_dir), '--val-dir', str(val_dir), '--head', 'h'],
         'has heads z, backbone'),
        (['--resume', ckpt, '--train-dir', str(train_dir), '--val-dir', str(tmp_path / 'fewer')],
         'different class folders'),
        (['--resume', ckpt, '--dataset', 'mscoco'], 'a retrieval set'),
        (['--resume', ckpt, '--dataset', 'nope'], f"valid: {', '.join(list(zeroshot.load_catalog()[0])[:3])}"),
        (['--resume', ckpt, '--dataset', 'cifar10', '--data-root', str(tmp_path)], 'train split not found at'),
        (['--resume', ckpt], 'give --train-dir and --val-dir'),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            eval_linear.main(argv)
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv, err)
