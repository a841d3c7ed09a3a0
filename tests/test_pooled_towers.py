"""Pooled ViT towers (--image-pool: GAP, OpenCLIP's attention pool) and CLIPA's text tower
(--text-tokenizer, --text-mask none, --text-pooling last): equal to OpenCLIP's own models in both
directions (interop.py) for every OpenCLIP ViT-*-CLIPA config (tiny random twins; the real sizes'
layouts on the meta device), trainable and fine-tunable through main.py, evaluable with
eval_zeroshot.py and demo_zeroshot.py after an import; bad combinations fail in one line."""
import copy
import json
import os
from dataclasses import replace

import open_clip
import pytest
import torch
from PIL import Image

import checkpoint
import clipa
import demo_zeroshot
import eval_zeroshot
import interop
import interop_openclip
import main as train
import models
import towers
from conftest import register_backbone
from test_interop import TINY_OC, _randomize

TOL = 1e-5
CLIPA_CONFIGS = sorted(n for n in open_clip.list_models() if 'CLIPA' in n)
CLIPA_PRESETS = {'ViT-L-14': 'VITL14CLIPA', 'ViT-H-14': 'VITH14CLIPA', 'ViT-bigG-14': 'VITBIGG14CLIPA'}
CAPTIONS = ['a photo of a cat', 'a diagram of a red square', 'red']


def _preset_of(config):
    return CLIPA_PRESETS[config.split('-CLIPA')[0]]


def _tiny_twin(config):
    """The OpenCLIP config `config` with every option kept (pooling, no ln_pre, tokenizer, mask,
    context, vocabulary, mlp ratio, patch 14) and tiny sizes: 2 blocks of 2 heads of the config's
    head width, an eighth of its resolution (224 -> 28, 336 -> 42: grids of 2 and 3 patches)."""
    cfg = copy.deepcopy(open_clip.get_model_config(config))
    v, t = cfg['vision_cfg'], cfg['text_cfg']
    v.update(layers=2, width=2 * v.get('head_width', 64), image_size=v['image_size'] // 8)
    t.update(width=64, heads=2, layers=2)
    cfg['embed_dim'] = 48
    return cfg


def _tiny_preset(config, cfg):
    """Our preset of `config` at the tiny twin's sizes (its options untouched)."""
    p, v = models.BACKBONES[_preset_of(config)], cfg['vision_cfg']
    return replace(p, image_size=v['image_size'], embed_dim=cfg['embed_dim'],
                   timm_kwargs={**p.timm_kwargs, 'embed_dim': v['width'], 'depth': 2, 'num_heads': 2},
                   text=replace(p.text, width=64, heads=2, layers=2))


def _outputs_equal(oc, ours, oc_tokens, size):
    torch.manual_seed(1)
    image = torch.randn(3, 3, size, size)
    with torch.no_grad():
        di = (oc.encode_image(image, normalize=True) - ours.encode_image(image)).abs().max()
        dt = (oc.encode_text(oc_tokens, normalize=True) - ours.encode_text(oc_tokens)).abs().max()
    assert di <= TOL and dt <= TOL, (float(di), float(dt))


@pytest.mark.parametrize('config', CLIPA_CONFIGS)
def test_clipa_config_imports_and_exports_exactly(config, tmp_path, wordpiece, monkeypatch):
    """OpenCLIP's CLIPA model (tiny twin, random weights) -> interop.py import -> our preset with no
    override (the preset has every option of the config) -> equal embeddings on OpenCLIP's own
    tokens, which our tokenizer reproduces; -> interop.py export -> open_clip.create_model and
    open_clip.get_tokenizer('local-dir:') give the same again."""
    assert len(CLIPA_CONFIGS) == 6
    cfg = _tiny_twin(config)
    name = 'TINY' + _preset_of(config)
    register_backbone(monkeypatch, name, _tiny_preset(config, cfg))
    (tmp_path / 'twin.json').write_text(json.dumps(cfg))
    oc = _randomize(open_clip.CLIP(**cfg)).eval()
    torch.save(oc.state_dict(), tmp_path / 'oc.pt')
    interop.main(['import', '--from', 'openclip', '--checkpoint', str(tmp_path / 'oc.pt'),
                  '--openclip-model', str(tmp_path / 'twin.json'), '--model', f'CLIP_{name}_CLIP',
                  '--text-tokenizer', wordpiece, '--out', str(tmp_path / 'ours.pt')])
    ckpt = checkpoint.load_checkpoint(str(tmp_path / 'ours.pt'))
    args = ckpt['args']
    assert args['text_tokenizer'] == os.path.abspath(wordpiece) and args['context_length'] == 32
    assert not {'image_tower', 'image_pool', 'text_mask', 'text_pooling', 'text_vocab_size'} & set(args), args
    ours = checkpoint.load_model(ckpt)
    assert ours.text_cfg.vocab_size == 32000 and type(ours.visual.norm).__name__ == 'Identity'
    oc_tokenizer = open_clip.tokenizer.HFTokenizer(wordpiece, context_length=32, **cfg['text_cfg']['tokenizer_kwargs'])
    tokens = oc_tokenizer(CAPTIONS)
    assert torch.equal(towers.tokenizer_for(args)(CAPTIONS), tokens)
    assert (tokens[:, 1:] != 1).all()                                   # the vocabulary knows every word
    _outputs_equal(oc, ours, tokens, cfg['vision_cfg']['image_size'])

    out = tmp_path / 'exported'
    interop.main(['export', '--checkpoint', str(tmp_path / 'ours.pt'), '--out', str(out)])
    back = open_clip.create_model('local-dir:' + str(out)).eval()
    _outputs_equal(back, ours, tokens, cfg['vision_cfg']['image_size'])
    assert torch.equal(open_clip.get_tokenizer('local-dir:' + str(out))(CAPTIONS), tokens)
    exported = json.loads((out / 'open_clip_config.json').read_text())['model_cfg']
    for part, keys in EXPORTED_OPTIONS.items():
        assert {k: exported[part].get(k) for k in keys} == {k: cfg[part].get(k) for k in keys}, part


EXPORTED_OPTIONS = {
    'vision_cfg': ('image_size', 'layers', 'width', 'patch_size', 'no_ln_pre', 'pool_type', 'final_ln_after_pool'),
    'text_cfg': ('context_length', 'vocab_size', 'width', 'heads', 'layers', 'pool_type', 'no_causal_mask',
                 'hf_tokenizer_name', 'tokenizer_kwargs')}


@pytest.mark.parametrize('config', CLIPA_CONFIGS)
def test_real_size_clipa_layouts_match_open_clip(config, wordpiece):
    """At the real sizes (on the meta device: no weights), import picks our preset with no
    override and its state dict maps key for key, shape for shape, onto OpenCLIP's model of the
    config in both directions (ViT-bigG: 2.5 B parameters, 8192-wide MLPs from mlp_ratio 4.9231)."""
    cfg = open_clip.get_model_config(config)
    name = f'CLIP_{_preset_of(config)}_CLIP'
    flags, notes = interop_openclip.flags_for_openclip(name, cfg, tokenizer_dir=wordpiece)
    assert not notes and flags['image_size'] == cfg['vision_cfg']['image_size']
    assert not {'image_tower', 'image_pool', 'text_mask', 'text_pooling', 'text_vocab_size'} & set(flags)
    with torch.device('meta'):
        oc = open_clip.CLIP(**cfg)
        ours = models.create_model(name, **interop._create_kwargs(flags))
    interop_openclip.load_openclip(ours, oc.state_dict(), cfg)           # strict: every key, every shape
    cfg_out, state, _ = interop_openclip.to_openclip(ours, wordpiece)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in oc.state_dict().items()}
    with torch.device('meta'):
        rebuilt = open_clip.CLIP(**cfg_out)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in state.items()}


POOL_CASES = {   # our --image-pool -> OpenCLIP vision_cfg options
    'token': {},
    'avg': {'pool_type': 'avg', 'final_ln_after_pool': True},
    'norm-avg': {'pool_type': 'avg'},
    'attn': {'attentional_pool': True, 'attn_pooler_heads': 4},         # 256 queries (OpenCLIP's default)
}


@pytest.mark.parametrize('embed_dim', [64, 32])       # attention pool: same as / other than the tower width
@pytest.mark.parametrize('pool', clipa.IMAGE_POOLS)
def test_image_pools_equal_open_clip_both_ways(pool, embed_dim, tmp_path, tokenizer):
    cfg = copy.deepcopy(TINY_OC)
    cfg['embed_dim'] = embed_dim
    cfg['vision_cfg'].update(POOL_CASES[pool])
    oc = _randomize(open_clip.CLIP(**cfg)).eval()
    model, _, flags, notes = interop.import_checkpoint('openclip', _save(tmp_path, oc), 'CLIP_TINYVIT_CLIP',
                                                        _save_cfg(tmp_path, cfg))
    assert flags.get('image_pool') == (None if pool == 'token' else pool)
    assert flags.get('image_pool_heads') == (4 if pool == 'attn' else None)
    assert any('first of 256 queries' in n for n in notes) == (pool == 'attn')
    text = tokenizer(CAPTIONS)
    _outputs_equal(oc, model, text, 32)
    cfg_out, state, _ = interop_openclip.to_openclip(model)
    back = open_clip.CLIP(**cfg_out).eval()
    back.load_state_dict(state)                                         # strict
    _outputs_equal(back, model, text, 32)
    if pool == 'attn':
        assert cfg_out['vision_cfg']['attn_pooler_queries'] == 1


def _save(tmp_path, oc):
    torch.save(oc.state_dict(), tmp_path / 'oc.pt')
    return str(tmp_path / 'oc.pt')


def _save_cfg(tmp_path, cfg):
    (tmp_path / 'cfg.json').write_text(json.dumps(cfg))
    return str(tmp_path / 'cfg.json')


def test_refused_openclip_options_say_why(wordpiece):
    for vision, fragment in [({'pool_type': 'none'}, "pool_type='none'.*every token"),
                             ({'attentional_pool': 'parallel'}, "attentional_pool='parallel'"),
                             ({'attentional_pool': True, 'pool_type': 'avg'}, "first query")]:
        cfg = {**TINY_OC, 'vision_cfg': {**TINY_OC['vision_cfg'], **vision}}
        with pytest.raises(ValueError, match=fragment):
            interop_openclip.flags_for_openclip('CLIP_TINYVIT_CLIP', cfg)
    for text, fragment in [({'hf_tokenizer_name': 'bert-base-uncased', 'pool_type': 'last'}, 'strip_sep_token'),
                           ({'hf_tokenizer_name': 'bert-base-uncased', 'tokenizer_kwargs': {'strip_sep_token': True}},
                            "pool_type 'argmax'"),
                           ({'vocab_size': 32000}, 'CLIP BPE'),
                           ({'pool_type': 'first'}, "pool_type='first'")]:
        cfg = {**TINY_OC, 'text_cfg': {**TINY_OC['text_cfg'], **text}}
        with pytest.raises(ValueError, match=fragment):
            interop_openclip.flags_for_openclip('CLIP_TINYVIT_CLIP', cfg)
    clipa_cfg = open_clip.get_model_config('ViT-L-14-CLIPA')
    with pytest.raises(ValueError, match='pass --text-tokenizer DIR'):     # nothing downloaded
        interop_openclip.flags_for_openclip('CLIP_VITL14CLIPA_CLIP', clipa_cfg)
    with pytest.raises(ValueError, match='--model CLIP_VITL14CLIPA_CLIP'):  # the preset that fits is named
        interop_openclip.flags_for_openclip('CLIP_VITL16_CLIP', clipa_cfg, tokenizer_dir=wordpiece)


@pytest.mark.parametrize('argv, fragment', [
    (['--model', 'CLIP_TINYCNN_CLIP', '--image-pool', 'attn'], 'the TinyCNN tower pools avg or avg-max'),
    (['--model', 'CLIP_TINYVIT_CLIP', '--image-pool', 'avg-max'], "pools a CNN's feature map"),
    (['--model', 'CLIP_TINYVIT_CLIP', '--image-tower', 'resnet18', '--image-pool', 'avg-max'], 'resnet18 is not'),
    (['--model', 'CLIP_TINYVIT_CLIP', '--image-tower', 'resnet18', '--image-pool', 'avg'], 'resnet18 is not'),
    (['--model', 'CLIP_TINYVIT_CLIP', '--image-pool-heads', '4'], 'goes with --image-pool attn'),
    (['--model', 'CLIP_TINYVIT_CLIP', '--text-tokenizer', '/nonexistent'], 'not a directory'),
    (['--model', 'CLIP_TINYVIT_CLIP', '--text-pooling', 'mean'], 'go with --text-tower'),
    (['--model', 'CLIP_TINYVIT_CLIP', '--image-pool', 'attn', '--image-pool-heads', '3'], 'not divisible by 3'),
    (['--model', 'CLIP_TINYVIT_CLIP', '--text-vocab-size', '100'], "tokenizer's 49408 tokens"),
])
def test_bad_flags_are_one_line_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and fragment in err[-1] and err[-1].startswith('main.py: error:'), err


def test_clipa_preset_without_its_tokenizer_stops_before_any_work(tmp_path, wordpiece, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(['--model', 'CLIP_VITL14CLIPA_CLIP', '--output-dir', str(tmp_path / 'o')])
    message = str(e.value.code)
    assert message.startswith('main.py: error: CLIP_VITL14CLIPA_CLIP') and '--text-tokenizer' in message
    assert not os.path.exists(tmp_path / 'o')
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.parse_args(['--model', 'CLIP_TINYVIT_CLIP', '--text-tokenizer', wordpiece])
    assert 'eot pooling' in capsys.readouterr().err                     # the CLIP BPE's EOT is not WordPiece's


TINY = ['--shapes-num-train', '64', '--batch-size', '32', '--print-freq', '1', '--epochs', '1',
        '--image-size', '32', '--zeroshot-datasets', 'shapes']
CLIPA_FLAGS = ['--image-pool', 'avg', '--text-tokenizer', None, '--text-mask', 'none', '--text-pooling', 'last',
               '--context-length', '32']


@pytest.mark.slow          # ~40 s: two short runs and the evaluations
def test_gap_vit_with_clipa_text_trains_finetunes_and_evaluates(tmp_path, wordpiece):
    """main.py trains a GAP ViT with CLIPA's text tower on `shapes` (zero-shot validation
    included), --finetune continues from it, demo_zeroshot.py reads its tokenizer from the
    checkpoint, and an imported OpenCLIP GAP ViT evaluates with eval_zeroshot.py and
    demo_zeroshot.py."""
    flags = [wordpiece if f is None else f for f in CLIPA_FLAGS]
    run = str(tmp_path / 'run')
    train.main([*TINY, '--model', 'CLIP_TINYVIT_CLIP', *flags, '--output-dir', run])
    ckpt = checkpoint.load_checkpoint(os.path.join(run, 'checkpoint.pt'))
    assert ckpt['args']['image_pool'] == 'avg' and ckpt['args']['text_vocab_size'] < 200
    model = checkpoint.load_model(ckpt)
    assert type(model.visual.fc_norm).__name__ == 'LayerNorm' and model.text_cfg.mask == 'none'
    train.main([*TINY, '--model', 'CLIP_TINYVIT_CLIP', *flags, '--finetune', os.path.join(run, 'checkpoint.pt'),
                '--exit-after-steps', '1', '--output-dir', str(tmp_path / 'ft')])

    cfg = copy.deepcopy(TINY_OC)
    cfg['vision_cfg'].update(POOL_CASES['avg'])
    oc = _randomize(open_clip.CLIP(**cfg)).eval()
    imported = str(tmp_path / 'imported.pt')
    interop.main(['import', '--from', 'openclip', '--checkpoint', _save(tmp_path, oc), '--openclip-model',
                  _save_cfg(tmp_path, cfg), '--model', 'CLIP_TINYVIT_CLIP', '--out', imported])
    results = eval_zeroshot.main(['--resume', imported, '--datasets', 'shapes', '--output-dir',
                                  str(tmp_path / 'zs'), '--no-cache'])
    assert results                                                      # a row per dataset
    Image.new('RGB', (16, 16), (255, 0, 0)).save(tmp_path / 'red.png')
    demo = demo_zeroshot.main(['--checkpoint', imported, '--img-path', str(tmp_path / 'red.png'),
                               '--classes', 'circle,square'])
    assert len(demo['predictions']) == 1 and len(demo['predictions'][0]['top']) == 2
    demo = demo_zeroshot.main(['--checkpoint', os.path.join(run, 'checkpoint.pt'), '--img-path',    # WordPiece
                               str(tmp_path / 'red.png'), '--classes', 'circle,square'])
    assert len(demo['predictions'][0]['top']) == 2
