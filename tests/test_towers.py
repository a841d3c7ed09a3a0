"""Pretrained and locked towers (towers.py): a timm --image-tower with --image-pretrained weights,
a Hugging Face --text-tower with its own tokenizer, --lock-image / --lock-text, through
models.create_model and main.main (training, resume, zero-shot validation, eval_zeroshot.py)."""
import os
import re

import pytest
import timm
import torch

import eval_zeroshot
import main as train
import models
import shapes
import towers

TINY = ['--shapes-num-train', '128', '--batch-size', '64', '--print-freq', '1', '--epochs', '1',
        '--image-size', '32', '--zeroshot-datasets', 'shapes']


@pytest.fixture(scope='module')
def bert(tmp_path_factory):
    """A tiny BERT: `config` = a config.json + WordPiece vocab.txt (random init), `dir` = a
    saved model directory (config, model.safetensors, vocab.txt), `state` = its weights."""
    from transformers import BertConfig, BertModel
    words = set(shapes.caption_vocabulary())
    for text in shapes.TEMPLATES + list(shapes.CLASSNAMES):
        words |= set(re.findall(r'[a-z]+', text.lower().replace('{}', ' ')))
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + sorted(words) + list('.,-')
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=80)
    paths = {}
    for kind in ('config', 'dir'):
        d = tmp_path_factory.mktemp(f'bert_{kind}')
        (d / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
        config.save_pretrained(d)
        paths[kind] = str(d / 'config.json') if kind == 'config' else str(d)
    torch.manual_seed(1)
    model = BertModel(config)
    model.save_pretrained(paths['dir'])
    paths['state'] = {k: v.clone() for k, v in model.state_dict().items()}
    return paths


@pytest.fixture(scope='module')
def resnet(tmp_path_factory):
    """timm's test_resnet with a 10-class classifier (dropped on loading), saved as .pt and
    .safetensors."""
    from safetensors.torch import save_file
    torch.manual_seed(2)
    net = timm.create_model('test_resnet', num_classes=10)
    for m in net.modules():                 # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    state = {k: v.clone().contiguous() for k, v in net.state_dict().items()}
    d = tmp_path_factory.mktemp('resnet')
    torch.save(state, d / 'test_resnet.pth')
    save_file(state, str(d / 'test_resnet.safetensors'))
    return {'pt': str(d / 'test_resnet.pth'), 'safetensors': str(d / 'test_resnet.safetensors'),
            'state': state}


def _tower_model(name='CLIP_TINYCNN_CLIP', **kw):
    return models.create_model(name, image_tower='test_resnet', image_size=32, **kw)


# ----------------------------------------------------------------------------- image tower

@pytest.mark.parametrize('kind', ['pt', 'safetensors'])
def test_image_pretrained_loads_exactly(resnet, kind):
    model = _tower_model()
    assert type(model.visual).__name__ == 'ResNet' and model.backbone_cfg.timm_name == 'test_resnet'
    towers.load_image_pretrained(model, resnet[kind])
    own = model.visual.state_dict()
    assert set(resnet['state']) - set(own) == {'fc.weight', 'fc.bias'}      # classifier dropped
    for k, v in own.items():
        assert torch.equal(v, resnet['state'][k]), k


def test_image_pretrained_unwraps_checkpoints(resnet, tmp_path):
    wrapped = {'state_dict': {f'module.{k}': v for k, v in resnet['state'].items()}, 'epoch': 3}
    torch.save(wrapped, tmp_path / 'wrapped.pth')
    model = _tower_model('CL2L_TINYCNN_BYOLIP')
    towers.load_image_pretrained(model, str(tmp_path / 'wrapped.pth'))
    for k, v in model.teacher.visual.state_dict().items():             # the EMA teacher too
        assert torch.equal(v, resnet['state'][k]), k


def test_image_pretrained_mismatch_is_a_clear_error(resnet, tmp_path):
    torch.save(timm.create_model('test_vit').state_dict(), tmp_path / 'vit.pth')
    with pytest.raises(ValueError, match=r'keys \d+ missing .*\d+ unexpected'):
        towers.load_image_pretrained(_tower_model(), str(tmp_path / 'vit.pth'))
    state = dict(resnet['state'], **{'conv1.0.weight': torch.zeros(1, 3, 3, 3)})
    torch.save(state, tmp_path / 'shape.pth')
    with pytest.raises(ValueError, match=r'1 with another shape .*conv1\.0\.weight \(1, 3, 3, 3\)'):
        towers.load_image_pretrained(_tower_model(), str(tmp_path / 'shape.pth'))
    import argparse
    torch.save({'args': argparse.Namespace(x=1)}, tmp_path / 'pickle.pth')   # needs unpickling code
    with pytest.raises(ValueError, match='cannot read it as a state dict'):
        towers.load_image_pretrained(_tower_model(), str(tmp_path / 'pickle.pth'))


# ----------------------------------------------------------------------------- text tower

def test_hf_tokenizer_pads_with_pad_and_pools_over_real_tokens(bert):
    tok = towers.tokenizer_for({'text_tower': bert['config'], 'context_length': 16})
    texts = ['a photo of a red circle', 'a small green star on a grey background, top left']
    tokens = tok(texts)
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    n = (tokens != towers.PAD).sum(1)
    assert (tokens[0, n[0]:] == towers.PAD).all() and tok.decode(tokens[0]) == texts[0]
    for pooling in ('mean', 'cls', 'pooler'):
        torch.manual_seed(0)
        tower = towers.HFTextTower(bert['config'], pooling, context_length=16).eval()
        with torch.no_grad():
            pooled = tower(tokens)                                       # [2, 32]
            mask = tokens != towers.PAD
            out = tower.model(input_ids=tokens.clamp(min=0), attention_mask=mask.long())
            alone = tower(tokens[:1])                                    # fewer padding columns
        hidden = out.last_hidden_state
        expected = {'mean': (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True),
                    'cls': hidden[:, 0], 'pooler': out.pooler_output}[pooling]
        assert pooled.shape == (2, 32)
        torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone, pooled[:1], atol=1e-5, rtol=1e-5)


def test_text_tower_directory_loads_its_weights(bert):
    tower = towers.HFTextTower(bert['dir'])
    own = tower.model.state_dict()
    for k, v in bert['state'].items():
        assert torch.equal(own[k], v), k
    assert not any(p.requires_grad for p in tower.model.pooler.parameters())   # unused by mean pooling


def test_cl2l_views_and_teacher_with_hf_tower(bert):
    model = models.create_model('CL2L_TINYCNN_BYOLIP', text_tower=bert['config'], image_size=32,
                                separate_proj=True)
    towers.lock_text(model)
    tok = towers.HFTokenizer(bert['config'])
    text = tok(['a red circle', 'a big blue square'])
    batch = {'image': torch.randn(2, 3, 32, 32), 'text': text,
             'image_views': torch.randn(2, 2, 3, 32, 32), 'text_views': torch.stack([text, text], 1)}
    out = model(batch)
    terms = [t for v in out.values() for t in (v if isinstance(v, list) else [v]) if t.requires_grad]
    sum(t.sum() for t in terms).backward()
    assert all(p.grad is None for p in model.text_tower.parameters())
    assert model.h_text_projection[0].weight.grad is not None                # width = BERT hidden size


@pytest.mark.parametrize('extra, fragment', [
    (['--text-tower', 'NOTOK'], 'no tokenizer files'),
    (['--text-tower', 'NOWEIGHTS'], 'no weights'),
    (['--text-tower', 'CONFIG', '--transformer-layers', '4'], '--transformer-layers configures the built-in'),
    (['--text-tower', 'CONFIG', '--avg-word-embs', '--text-pooling', 'cls'], 'contradicts --text-pooling cls'),
    (['--text-pooling', 'cls'], 'go with --text-tower'),
    (['--text-tower', 'CONFIG', '--context-length', '100'], 'exceeds the --text-tower'),
    (['--image-tower', 'resnet_nope'], "'resnet_nope' is not a timm model"),
    (['--image-pretrained', 'missing.pth'], 'no such file'),
    (['--lock-image-unlocked-groups', '1'], 'goes with --lock-image'),
    (['--lock-text-unlocked-layers', '1'], 'goes with --lock-text'),
])
def test_tower_flag_errors_are_one_line(extra, fragment, bert, tmp_path, capsys):
    notok = tmp_path / 'notok'
    notok.mkdir()
    (notok / 'config.json').write_text(open(bert['config']).read())
    (notok / 'model.safetensors').write_bytes(b'')
    paths = {'NOTOK': str(notok), 'NOWEIGHTS': os.path.dirname(bert['config']), 'CONFIG': bert['config']}
    with pytest.raises(SystemExit):
        train.parse_args([paths.get(a, a) for a in extra])
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- locking

@pytest.mark.parametrize('tower', ['test_resnet', 'test_vit'])
def test_unlocked_groups_and_layers_unlock_exactly_the_last(tower, tmp_path):
    args = train.parse_args(['--image-tower', tower, '--image-size', '32', '--lock-image',
                             '--lock-image-unlocked-groups', '1', '--lock-text',
                             '--lock-text-unlocked-layers', '1', '--output-dir', str(tmp_path)])
    model = models.create_model_from_flags(args.model, args)
    towers.prepare(model, args)
    groups = timm.models.group_parameters(model.visual, model.visual.group_matcher())
    last = {f'visual.{n}' for n in groups[max(groups)]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if n.startswith('visual.')} == last
    last_block = f'transformer.resblocks.{len(model.transformer.resblocks) - 1}.'
    text = {n for n, _ in model.named_parameters()
            if n.split('.')[0] in ('token_embedding', 'positional_embedding', 'transformer', 'ln_final')}
    assert trainable & text == {n for n in text if n.startswith((last_block, 'ln_final.'))}
    assert {'image_projection.0.weight', 'text_projection', 'logit_scale'} <= trainable
    optimizer = train.build_optimizer(model, args)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_lock_text_layers_of_an_hf_tower(bert):
    model = models.create_model('CLIP_TINYCNN_CLIP', text_tower=bert['config'], image_size=32)
    towers.lock_text(model, unlocked_layers=1)
    trainable = {n for n, p in model.text_tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith('model.encoder.layer.1.') for n in trainable)
    assert len(trainable) == sum(1 for n, _ in model.text_tower.named_parameters()
                                 if n.startswith('model.encoder.layer.1.'))


def test_partial_lock_needs_timm_groups():
    with pytest.raises(ValueError, match='needs a timm image tower with group_matcher'):
        towers.lock_image(models.create_model('CLIP_TINYCNN_CLIP'), unlocked_groups=1)
    with pytest.raises(ValueError, match='the image tower has 5 groups'):
        towers.lock_image(_tower_model(), unlocked_groups=5)


def test_frozen_batchnorm_stays_in_eval_mode():
    model = _tower_model()
    towers.lock_image(model, unlocked_groups=1, freeze_bn_stats=True)
    model.train()
    bns = {n: m for n, m in model.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    frozen = {n for n, m in bns.items() if not m.training}
    assert frozen and frozen == {n for n, m in bns.items() if not m.weight.requires_grad}
    assert frozen != set(bns)                                  # the last group's BN still trains


# ----------------------------------------------------------------------------- main.py

def _checkpoint(out):
    return torch.load(os.path.join(out, 'checkpoint.pt'), weights_only=True)


def test_locked_towers_train_resume_and_evaluate(tmp_path, resnet, bert):
    """2 optimizer steps with both towers locked (1, then resumed for 1 more), zero-shot on
    shapes with the BERT tokenizer, then eval_zeroshot.py on the checkpoint."""
    out = str(tmp_path / 'run')
    argv = [*TINY, '--output-dir', out, '--image-tower', 'test_resnet',
            '--image-pretrained', resnet['safetensors'], '--text-tower', bert['dir'],
            '--lock-image', '--lock-image-freeze-bn-stats', '--lock-text']
    assert train.main([*argv, '--exit-after-steps', '1']) is None
    first = _checkpoint(out)
    results = train.main(argv)                                           # resumes at step 1
    second = _checkpoint(out)
    assert first['step'] == 1 and second['step'] == 2
    assert 0 <= results['shapes']['top1'] <= 100
    for ckpt in (first, second):
        model = ckpt['model']
        for k, v in resnet['state'].items():                  # weights and BN statistics
            if not k.startswith('fc.'):
                assert torch.equal(model[f'visual.{k}'], v), k
        for k, v in bert['state'].items():
            assert torch.equal(model[f'text_tower.model.{k}'], v), k
    fresh = models.create_model_from_flags(second['model_name'], second['args'])
    trainable = [n for n, _ in fresh.named_parameters() if not n.startswith(('visual.', 'text_tower.'))]
    assert {'image_projection.0.weight', 'text_projection', 'logit_scale'} <= set(trainable)
    for k in trainable:
        assert not torch.equal(first['model'][k], second['model'][k]), k
    optim = second['optimizer']
    assert len(optim['state']) == sum(len(g['params']) for g in optim['param_groups']) == len(trainable)
    shapes_in_optim = sorted(tuple(s['exp_avg'].shape) for s in optim['state'].values())
    assert shapes_in_optim == sorted(tuple(second['model'][k].shape) for k in trainable)
    evaluated = eval_zeroshot.main(['--resume', os.path.join(out, 'checkpoint.pt'), '--datasets',
                                    'shapes', '--no-cache'])
    assert evaluated['shapes']['top1'] == pytest.approx(results['shapes']['top1'])
