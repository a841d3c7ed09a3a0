"""Visual prompt tuning (vpt.py): prompt tokens sit where VPT puts them (shallow: inserted once,
deep: replaced before every block, dropped before the final norm), the prompted image tower
equals a direct computation, only the prompts (and with --vpt-train-heads the heads) train on
both routes (main.py on a caption folder, finetune_classification.py on an ImageFolder),
towers bit-identical, resume exact, the readers of a checkpoint use the prompts, and what
cannot work is one line."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import checkpoint
import datagen
import demo_zeroshot
import eval_zeroshot
import finetune_classification as ft
import interop
import main as train
import models
import vpt
import zeroshot
from test_eval_linear import make_colour_folder
from zs_helpers import tiny_checkpoint

MODEL = 'CLIP_TINYVIT_CLIP'      # 2 blocks, 4 x 4 patches of 8 px at 32 px, one class token


pytestmark = pytest.mark.usefixtures('one_thread')   # tiny models: one thread (conftest.py)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp('pre') / 'tinyvit.pt', MODEL, 32, seed=3)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('captions')
    return datagen.write_folder(str(root), datagen.specs(n_good=32))


def _load(path):
    return torch.load(path, weights_only=True)


def _prompted(mode, tokens=3, seed=0, **flags):
    torch.manual_seed(seed)
    return models.create_model_from_flags(MODEL, {'image_size': 32, 'vpt_tokens': tokens,
                                                  'vpt_mode': mode, **flags}).eval()


def direct_features(vit, prompts, mode, images):
    """The VPT forward written out (hooks bypassed with .forward): [B, width] pooled features."""
    s, n = vit.num_prefix_tokens, prompts.shape[1]
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    for i, block in enumerate(vit.blocks):
        if i == 0 or mode == 'deep':
            p = prompts[i].expand(len(x), -1, -1)
            x = torch.cat([x[:, :s], p, x[:, s + (n if i else 0):]], dim=1)
        x = block.forward(x)
    return vit.forward_head(vit.norm.forward(torch.cat([x[:, :s], x[:, s + n:]], dim=1)))


def _sequence_log(vit):
    """[(module, input length)] of every block and of the final norm, in call order, as they
    see their input (forward hooks run after the prompts' pre-hooks)."""
    log = []
    for i, block in enumerate(vit.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: log.append((f'block{i}', a[0].shape[1], a[0], o)))
    vit.norm.register_forward_hook(lambda m, a, o: log.append(('norm', a[0].shape[1], a[0], o)))
    return log


# ----------------------------------------------------------------------------- the sequence

@pytest.mark.parametrize('mode', vpt.MODES)
def test_prompt_tokens_in_the_sequence(mode):
    model = _prompted(mode, tokens=3)
    vit, prompts = model.visual, model.visual.vpt.prompts
    assert prompts.shape == ((len(vit.blocks) if mode == 'deep' else 1), 3, vit.embed_dim)
    log = _sequence_log(vit)
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 32, 32))
    patches, s = 16, vit.num_prefix_tokens
    assert [(name, length) for name, length, *_ in log] == \
        [('block0', s + 3 + patches), ('block1', s + 3 + patches), ('norm', s + patches)]
    block0_out, block1_in = log[0][3], log[1][2]
    assert torch.equal(log[0][2][:, s:s + 3], prompts[0].expand(2, -1, -1))           # after the class token
    want = prompts[1].expand(2, -1, -1) if mode == 'deep' else block0_out[:, s:s + 3]  # fresh / carried on
    assert torch.equal(block1_in[:, s:s + 3], want)
    assert torch.equal(block1_in[:, s + 3:], block0_out[:, s + 3:])                   # the patches flow on
    norm_in, block1_out = log[2][2], log[1][3]
    assert torch.equal(norm_in, torch.cat([block1_out[:, :s], block1_out[:, s + 3:]], dim=1))


@pytest.mark.parametrize('mode', vpt.MODES)
def test_prompted_tower_equals_direct_computation(mode):
    model = _prompted(mode, tokens=4)
    plain = models.create_model(MODEL, image_size=32).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not vpt.is_prompt(k)})
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = zeroshot.encode_image(model, images)
        want = F.normalize(model.image_projection(direct_features(model.visual, model.visual.vpt.prompts,
                                                                  mode, images)), dim=-1)
        assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(got, zeroshot.encode_image(plain, images), atol=1e-3)   # the prompts matter
    model.train().set_grad_checkpointing(True)          # timm's checkpoint_seq runs the hooks too
    checkpointed = model.encode_image(images)
    assert torch.allclose(checkpointed, got, atol=1e-6)
    checkpointed.sum().backward()
    assert model.visual.vpt.prompts.grad.abs().sum() > 0


def test_register_tokens_and_average_pooling():
    """Prompts go after every prefix token (class + registers); the mean over patches excludes them."""
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=32, depth=3,
                            num_heads=2, reg_tokens=2, global_pool='avg', num_classes=0).eval()
    prompts = vpt.VisualPrompts(vit, 5, 'deep')
    vpt.attach(vit, prompts)
    assert prompts.start == 3
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(images), direct_features(vit, prompts.prompts, 'deep', images), atol=1e-6)


def test_init_range_dropout_and_copies():
    model = _prompted('deep', tokens=50)
    p = model.visual.vpt.prompts
    bound = (6 / (3 * 8 * 8 + 64)) ** 0.5                   # VPT: xavier-uniform, a patch as fan-in
    assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound and abs(p.mean()) < 0.05 * bound
    drop = _prompted('deep', tokens=3, vpt_dropout=0.5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(drop.encode_image(images), drop.encode_image(images))          # eval: no dropout
        drop.train()
        assert not torch.equal(drop.encode_image(images), drop.encode_image(images))
        copied = copy.deepcopy(model)                    # EMA / teacher copies use their own prompts
        before = model.encode_image(images)
        copied.visual.vpt.prompts.add_(torch.randn_like(copied.visual.vpt.prompts))
        assert torch.equal(model.encode_image(images), before)
        assert not torch.allclose(copied.encode_image(images), before, atol=1e-3)
    byol = models.create_model_from_flags('CL2L_TINYVIT_BYOLIP', {'image_size': 32, 'vpt_tokens': 2})
    assert torch.equal(byol.teacher.visual.vpt.prompts, byol.visual.vpt.prompts)
    assert not byol.teacher.visual.vpt.prompts.requires_grad


# ----------------------------------------------------------------------------- main.py

def _vpt_run(folder, pretrained, out, *extra):
    return train.main([*folder, '--model', MODEL, '--image-size', '32', '--finetune', pretrained,
                       '--vpt-tokens', '4', '--batch-size', '8', '--epochs', '2', '--print-freq', '1',
                       '--lr', '1e-2', '--zeroshot-datasets', 'shapes', '--output-dir', str(out), *extra])


@pytest.fixture(scope='module')
def deep_run(folder, pretrained, tmp_path_factory):
    out = tmp_path_factory.mktemp('vpt') / 'full'
    _vpt_run(folder, pretrained, out, '--vpt-dropout', '0.1')
    return out


def test_main_trains_only_the_prompts_and_resumes_exactly(deep_run, folder, pretrained, tmp_path, capsys):
    pre, full = _load(pretrained)['model'], _load(deep_run / 'checkpoint.pt')
    assert set(full['model']) == set(pre) | {'visual.vpt.prompts'}
    assert all(torch.equal(full['model'][k], v) for k, v in pre.items())      # towers and heads as loaded
    assert full['args']['vpt_mode'] == 'deep' and full['step'] == 8
    assert len(full['optimizer']['state']) == 1                                # AdamW holds the prompts only

    parts = tmp_path / 'parts'                       # stopped mid-epoch 0, then the same command resumes
    _vpt_run(folder, pretrained, parts, '--vpt-dropout', '0.1', '--exit-after-steps', '3')
    early = _load(parts / 'checkpoint.pt')
    assert early['step'] == 3 and not torch.equal(early['model']['visual.vpt.prompts'],
                                                  full['model']['visual.vpt.prompts'])
    _vpt_run(folder, pretrained, parts, '--vpt-dropout', '0.1')
    assert 'resumed from' in capsys.readouterr().out
    resumed = _load(parts / 'checkpoint.pt')
    assert resumed['step'] == 8
    assert all(torch.equal(resumed['model'][k], v) for k, v in full['model'].items())
    for a, b in zip(resumed['optimizer']['state'].values(), full['optimizer']['state'].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_main_train_heads_shallow(folder, pretrained, tmp_path):
    out = tmp_path / 'heads'
    _vpt_run(folder, pretrained, out, '--vpt-mode', 'shallow', '--vpt-train-heads', '--epochs', '1')
    pre, ckpt = _load(pretrained)['model'], _load(out / 'checkpoint.pt')
    assert ckpt['model']['visual.vpt.prompts'].shape == (1, 4, 64)
    changed = {k for k, v in pre.items() if not torch.equal(ckpt['model'][k], v)}
    assert changed == {'image_projection.weight', 'text_projection', 'logit_scale'}


def test_readers_use_the_prompts(deep_run, tmp_path, capsys):
    path = str(deep_run / 'checkpoint.pt')
    ckpt = checkpoint.load_model_checkpoint(path)
    model = checkpoint.load_model(ckpt)
    prompts = ckpt['model']['visual.vpt.prompts']
    assert torch.equal(model.visual.vpt.prompts, prompts)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got = zeroshot.encode_image(model, images)
        want = F.normalize(model.image_projection(direct_features(model.visual, prompts, 'deep', images)), dim=-1)
        assert torch.allclose(got, want, atol=1e-6)
    plain_state = {k: v for k, v in ckpt['model'].items() if not vpt.is_prompt(k)}
    plain = models.create_model(MODEL, image_size=32).eval()
    plain.load_state_dict(plain_state)
    with torch.no_grad():
        assert not torch.allclose(got, zeroshot.encode_image(plain, images), atol=1e-3)

    result = eval_zeroshot.main(['--resume', path, '--datasets', 'shapes', '--output-dir', str(tmp_path / 'zs'),
                                 '--cache-dir', str(tmp_path / 'cache')])
    tokenizer = datagen_tokenizer()
    direct = zeroshot.evaluate(model, ['shapes'], tokenizer, torch.device('cpu'), 32)
    assert result['shapes']['top1'] == direct['shapes']['top1']
    from PIL import Image
    Image.new('RGB', (32, 32), 'red').save(tmp_path / 'x.png')
    demo = demo_zeroshot.main(['--checkpoint', path, '--img-path', str(tmp_path / 'x.png'), '--labels-from', 'shapes'])
    top = demo['predictions'][0]['top']
    probs = demo_zeroshot.predict(model, 'z', [Image.open(tmp_path / 'x.png').convert('RGB')],
                                  zeroshot.load_catalog()[1]['shapes'], zeroshot.load_catalog()[2]['shapes'],
                                  tokenizer, 32, len(top))[0][0]
    assert [q for _, q in top] == pytest.approx(probs.tolist())

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        interop.main(['export', '--checkpoint', path, '--out', str(tmp_path / 'exported')])
    assert 'prompt-tuned' in str(stop.value.code) and len(str(stop.value.code).splitlines()) == 1
    assert not (tmp_path / 'exported').exists()


def datagen_tokenizer():
    import towers
    return towers.tokenizer_for({'context_length': 77})


# ----------------------------------------------------------------------------- finetune_classification.py

@pytest.fixture(scope='module')
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp('colours')
    return make_colour_folder(root / 'train', 16, 0, classes=4), make_colour_folder(root / 'val', 6, 1, classes=4)


def _ft_args(pretrained, colours, out, *extra):
    return ['--pretrained', pretrained, '--train-dir', str(colours[0]), '--val-dir', str(colours[1]),
            '--output-dir', str(out), '--batch-size', '16', '--epochs', '2', '--lr', '1e-2',
            '--warmup-steps', '1', '--ema-decay', '0.9', '--print-freq', '100', '--vpt-tokens', '4', *extra]


def test_finetune_trains_only_the_prompts_and_resumes_exactly(pretrained, colours, tmp_path, capsys):
    full, parts = tmp_path / 'full', tmp_path / 'parts'
    ft.main(_ft_args(pretrained, colours, full, '--vpt-dropout', '0.1'))
    ft.main(_ft_args(pretrained, colours, parts, '--vpt-dropout', '0.1', '--exit-after-epochs', '1'))
    first = _load(parts / 'checkpoint.pt')
    ft.main(_ft_args(pretrained, colours, parts, '--vpt-dropout', '0.1'))
    assert 'resumed from' in capsys.readouterr().out
    a, b = _load(full / 'checkpoint.pt'), _load(parts / 'checkpoint.pt')
    for key in ('model', 'ema'):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    pre = _load(pretrained)['model']
    for k, v in a['model'].items():                  # towers, projection and head stay as they started
        if k.startswith('visual.') and not vpt.is_prompt(k):
            assert torch.equal(v, pre[k]), k
    assert torch.equal(a['model']['projection.weight'], pre['image_projection.weight'])
    assert torch.equal(a['model']['head.weight'], first['model']['head.weight'])
    assert not torch.equal(a['model']['visual.vpt.prompts'], first['model']['visual.vpt.prompts'])

    model, _ = ft.load_classifier(str(full / 'checkpoint.pt'), ema=False)       # rebuilt with its prompts
    assert torch.equal(model.visual.vpt.prompts, a['model']['visual.vpt.prompts'])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = direct_features(model.visual, a['model']['visual.vpt.prompts'], 'deep', images)
        assert torch.allclose(model(images), model.head(F.normalize(model.projection(feats), dim=-1)), atol=1e-5)


def test_finetune_train_heads(pretrained, colours, tmp_path):
    out = tmp_path / 'heads'
    ft.main(_ft_args(pretrained, colours, out, '--vpt-train-heads', '--vpt-mode', 'shallow', '--epochs', '1'))
    a, pre = _load(out / 'checkpoint.pt')['model'], _load(pretrained)['model']
    assert a['visual.vpt.prompts'].shape == (1, 4, 64)
    assert not torch.equal(a['projection.weight'], pre['image_projection.weight'])
    assert all(torch.equal(v, pre[k]) for k, v in a.items() if k.startswith('visual.') and not vpt.is_prompt(k))


# ----------------------------------------------------------------------------- one-line errors

def test_one_line_errors(pretrained, folder, colours, tmp_path, capsys):
    cnn = tiny_checkpoint(tmp_path / 'cnn.pt', 'CLIP_TINYCNN_CLIP', 64)
    base = [*folder, '--output-dir', str(tmp_path / 'x'), '--finetune', pretrained, '--model', MODEL]
    main_cases = [
        ([*base, '--model', 'CLIP_TINYCNN_CLIP', '--finetune', cnn, '--vpt-tokens', '4'], 'is a TinyCNN, not a timm VisionTransformer'),
        ([*base, '--image-tower', 'resnet18', '--vpt-tokens', '4'], 'is a ResNet, not a timm VisionTransformer'),
        ([a for a in base if a not in ('--finetune', pretrained)] + ['--vpt-tokens', '4'], 'pass --finetune CKPT'),
        ([*base, '--vpt-mode', 'deep'], 'go with --vpt-tokens N'),
        ([*base, '--vpt-tokens', '4', '--vpt-dropout', '1.5'], '--vpt-dropout must be in [0, 1)'),
        ([*base, '--vpt-tokens', '-1'], '--vpt-tokens must be >= 0'),
        ([*base, '--vpt-tokens', '4', '--lock-image', '--lock-image-unlocked-groups', '1'], 'locks both towers whole'),
    ]
    capsys.readouterr()
    for argv, message in main_cases:
        with pytest.raises(SystemExit):
            train.main(argv)
        err = capsys.readouterr().err.strip()
        assert message in err and err.startswith('main.py: error:') and len(err.splitlines()) == 1, (argv[-4:], err)

    done = tmp_path / 'done'
    ft.main(_ft_args(pretrained, colours, done, '--epochs', '1', '--ema-decay', '0'))
    prompted = tmp_path / 'prompted.pt'
    ckpt = _load(pretrained)
    model = _prompted('deep', tokens=2)
    checkpoint.save({'model': model.state_dict(), 'model_name': MODEL,
                     'args': dict(ckpt['args'], vpt_tokens=2, vpt_mode='deep')}, str(prompted))
    capsys.readouterr()
    ft_cases = [
        (_ft_args(cnn, colours, tmp_path / 'c'), 'is a TinyCNN, not a timm VisionTransformer'),
        (_ft_args(str(prompted), colours, tmp_path / 'p'), 'has 2 visual prompt tokens already'),
        (_ft_args(pretrained, colours, done, '--epochs', '2', '--vpt-mode', 'shallow'), 'tuned with --vpt-tokens 4 --vpt-mode deep'),
        (_ft_args(pretrained, colours, tmp_path / 'd', '--vpt-dropout', '-0.1'), '--vpt-dropout must be in [0, 1)'),
    ]
    for argv, message in ft_cases:
        with pytest.raises(SystemExit):
            ft.main(argv)
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (argv[-4:], err)
