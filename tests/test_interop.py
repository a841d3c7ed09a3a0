"""Checkpoint interop (interop.py): OpenCLIP/OpenAI weights load into our models with the same
encode_image / encode_text outputs, ours export to OpenCLIP (open_clip.create_model loads them),
clip-rocket / SLIP checkpoints round-trip exactly, cvnets' CLIP models load exactly (its ViTs onto
our cvnets backbones), and mismatches fail saying why."""
import argparse
import dataclasses
import json
import os
import pickle
import zipfile
from collections import OrderedDict

import open_clip
import pytest
import timm
import torch
import torch.nn as nn

import checkpoint
import cvnets_ref
import interop
import interop_openclip
import interop_upstream
import models
import towers

TOL = 1e-5
# OpenCLIP configs with random weights, small enough for a CPU test
TINY_OC = {'embed_dim': 64,          # = CLIP_TINYVIT_CLIP: no ln_pre, LayerNorm eps 1e-6, patch 8, 64 wide
           'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'head_width': 32, 'patch_size': 8,
                          'no_ln_pre': True, 'norm_kwargs': {'eps': 1e-6}},
           'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 2, 'layers': 2}}
TINY_OAI = {'embed_dim': 64, 'quick_gelu': True,    # OpenAI layout: ln_pre, eps 1e-5, QuickGELU, 64-wide heads
            'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 128, 'head_width': 64, 'patch_size': 8},
            'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 128, 'heads': 2, 'layers': 2}}
# our side of TINY_OAI: timm's CLIP ViT (pre-norm, eps 1e-5, QuickGELU) at the same tiny size
TINY_OAI_TOWER = models.BackboneCfg('vit_base_patch32_clip_quickgelu_224', takes_img_size=True, image_size=32,
                                    timm_kwargs={'patch_size': 8, 'embed_dim': 128, 'depth': 2, 'num_heads': 2})


def _randomize(module, seed=0):
    """Every float tensor (weights, biases, norms, running stats) random, so nothing maps by luck."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith('running_var')
                        else torch.randn(t.shape, generator=g) * 0.05 + (1.0 if name.endswith('logit_scale') else 0.0))
            elif name.endswith('num_batches_tracked'):
                t.fill_(7)
    return module


def _inputs(tokenizer, size, n=3):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size), tokenizer(['a photo of a cat', 'a diagram of a red square', 'x'][:n])


def _same_outputs(openclip_model, ours, tokenizer, size):
    image, text = _inputs(tokenizer, size)
    with torch.no_grad():
        di = (openclip_model.encode_image(image, normalize=True) - ours.encode_image(image)).abs().max()
        dt = (openclip_model.encode_text(text, normalize=True) - ours.encode_text(text)).abs().max()
        ds = (openclip_model.logit_scale - ours.logit_scale).abs()
    assert di <= TOL and dt <= TOL and ds == 0, (float(di), float(dt), float(ds))


def _register(tmp_path, name, cfg):
    path = tmp_path / f'{name}.json'
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    return str(path)


def test_openclip_checkpoint_imports_via_cli(tmp_path, tokenizer):
    """OpenCLIP state dict + its model config -> our checkpoint; eval_zeroshot and --finetune load it."""
    _register(tmp_path, 'tiny-oc-interop', TINY_OC)
    oc = _randomize(open_clip.create_model('tiny-oc-interop')).eval()
    torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in oc.state_dict().items()}},
               tmp_path / 'epoch_3.pt')                                 # as OpenCLIP's training saves it
    out = tmp_path / 'ours.pt'
    interop.main(['import', '--from', 'openclip', '--checkpoint', str(tmp_path / 'epoch_3.pt'),
                  '--openclip-model', 'tiny-oc-interop', '--model', 'CLIP_TINYVIT_CLIP', '--out', str(out)])
    ckpt = checkpoint.load_checkpoint(str(out))                              # weights_only
    assert ckpt['model_name'] == 'CLIP_TINYVIT_CLIP' and 'image_tower' not in ckpt['args']
    ours = checkpoint.load_model(ckpt, ckpt['args']['image_size'])
    _same_outputs(oc, ours, tokenizer, 32)
    fresh = models.create_model_from_flags('CLIP_TINYVIT_CLIP', ckpt['args'])     # main.py --finetune
    loaded, skipped, missing = models.load_weights(fresh, ckpt['model'])
    assert not skipped and not missing


def test_export_loads_in_open_clip(tmp_path, tokenizer):
    """Ours -> OpenCLIP: create_model(name, pretrained=PATH) and local-dir: give our outputs; the
    timm patch-embedding bias (OpenCLIP's conv1 has none) is folded into the position embedding."""
    ours = _randomize(models.create_model('CLIP_TINYVIT_CLIP')).eval()
    assert ours.visual.patch_embed.proj.bias.abs().sum() > 0
    interop.save_ours(str(tmp_path / 'ckpt.pt'), ours, 'CLIP_TINYVIT_CLIP', {}, {'from': 'test'})
    out = tmp_path / 'exported'
    interop.main(['export', '--checkpoint', str(tmp_path / 'ckpt.pt'), '--out', str(out),
                  '--name', 'tiny-ours-interop'])
    open_clip.add_model_config(str(out / 'tiny-ours-interop.json'))
    oc = open_clip.create_model('tiny-ours-interop', pretrained=str(out / 'open_clip_pytorch_model.bin')).eval()
    _same_outputs(oc, ours, tokenizer, 32)
    oc_dir = open_clip.create_model('local-dir:' + str(out)).eval()      # CLIP_benchmark: --model local-dir:DIR
    _same_outputs(oc_dir, ours, tokenizer, 32)
    back, _, _, _ = interop.import_checkpoint('openclip', str(out), 'CLIP_TINYVIT_CLIP')   # and back in
    _same_outputs(oc, back, tokenizer, 32)


def test_openai_layout_both_directions(tokenizer):
    """ln_pre + LayerNorm eps 1e-5 + QuickGELU in both towers (OpenAI's and OpenCLIP's native ViT)
    map key by key onto timm's CLIP ViT; the config inferred from an OpenAI state dict is right."""
    oc = _randomize(open_clip.CLIP(**TINY_OAI)).eval()
    assert interop_openclip.openai_config(oc.state_dict()) == TINY_OAI
    ours = models.CLIP(TINY_OAI_TOWER, models.TextCfg(width=128, heads=2, layers=2, act='quick_gelu'), 64,
                       image_size=32).eval()
    interop_openclip.load_openclip(ours, oc.state_dict(), TINY_OAI)
    _same_outputs(oc, ours, tokenizer, 32)
    cfg, state, _ = interop_openclip.to_openclip(ours)
    assert cfg['quick_gelu'] and 'no_ln_pre' not in cfg['vision_cfg'] and 'norm_kwargs' not in cfg['vision_cfg']
    back = open_clip.CLIP(**cfg).eval()
    back.load_state_dict(state)                                         # strict: every key, every shape
    _same_outputs(back, ours, tokenizer, 32)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_torchscript_archive_is_read_without_running_it(tmp_path, tokenizer, monkeypatch):
    """OpenAI ships TorchScript archives: their tensors are read by a restricted unpickler,
    torch.jit.load (which compiles the archive's code) is never called."""
    oc = _randomize(open_clip.CLIP(**TINY_OAI)).eval()
    torch.jit.script(oc).save(str(tmp_path / 'ViT-tiny.pt'))
    monkeypatch.setattr(torch.jit, 'load', lambda *a, **k: pytest.fail('torch.jit.load called'))
    state, _ = interop.read_checkpoint(str(tmp_path / 'ViT-tiny.pt'))
    ref = oc.state_dict()
    assert set(state) - set(ref) == {'attn_mask'}                       # a plain tensor attribute, ignored
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    ours = models.CLIP(TINY_OAI_TOWER, models.TextCfg(width=128, heads=2, layers=2, act='quick_gelu'), 64,
                       image_size=32).eval()
    interop_openclip.load_openclip(ours, state, interop_openclip.openai_config(state))
    _same_outputs(oc, ours, tokenizer, 32)


def test_torchscript_archive_with_code_in_its_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return os.system, ('touch ' + str(tmp_path / 'pwned'),)
    path = tmp_path / 'evil.pt'
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('evil/data.pkl', pickle.dumps(Evil(), protocol=2))
        z.writestr('evil/code/__torch__/m.py', 'x = 1\n')
    with pytest.raises(ValueError, match='refusing to load posix.system'):
        interop.read_checkpoint(str(path))
    assert not (tmp_path / 'pwned').exists()


def test_timm_adapter_route_both_directions(tmp_path, tokenizer):
    """Non-ViT timm towers go through OpenCLIP's TimmModel (timm_pool '', linear projection):
    exact in both directions (resnet10t stands in for R50, which takes the same route)."""
    flags = {'image_tower': 'resnet10t', 'clip_proj_type': 'linear', 'image_size': 64}
    ours = _randomize(models.create_model('CLIP_TINYCNN_CLIP', **interop._create_kwargs(flags))).eval()
    cfg, state, _ = interop_openclip.to_openclip(ours)
    assert cfg['vision_cfg']['timm_model_name'] == 'resnet10t' and cfg['vision_cfg']['timm_pool'] == ''
    interop_openclip.write_openclip(str(tmp_path / 'r10'), 'tiny-r10-interop', cfg, state, 64)
    open_clip.add_model_config(str(tmp_path / 'r10' / 'tiny-r10-interop.json'))
    weights = str(tmp_path / 'r10' / 'open_clip_pytorch_model.bin')
    oc = open_clip.create_model('tiny-r10-interop', pretrained=weights).eval()
    _same_outputs(oc, ours, tokenizer, 64)
    back, _, flags_back, _ = interop.import_checkpoint('openclip', str(tmp_path / 'r10'), 'CLIP_TINYCNN_CLIP')
    assert flags_back['image_tower'] == 'resnet10t'
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.slow          # ~30 s of CPU: two ViT-B/32 image towers
def test_openai_vitb32_builds_the_matching_timm_tower(tmp_path, tokenizer):
    """A real ViT-B/32 (OpenAI layout, 64 px, 1 text layer): our VITB32 preset (timm
    vit_base_patch32_224: no ln_pre, eps 1e-6, GELU) is not that function, so the import builds
    timm's vit_base_patch32_clip_quickgelu_224 as image_tower; the checkpoint says so."""
    cfg = json.loads(json.dumps(open_clip.get_model_config('ViT-B-32-quickgelu')))
    cfg['vision_cfg']['image_size'], cfg['text_cfg']['layers'] = 64, 1
    oc = _randomize(open_clip.CLIP(**cfg)).eval()
    torch.save(oc.state_dict(), tmp_path / 'ViT-B-32.pt')
    interop.main(['import', '--from', 'openai', '--checkpoint', str(tmp_path / 'ViT-B-32.pt'),
                  '--model', 'CLIP_VITB32_CLIP', '--out', str(tmp_path / 'ours.pt')])
    ckpt = checkpoint.load_checkpoint(str(tmp_path / 'ours.pt'))
    assert ckpt['args']['image_tower'] == 'vit_base_patch32_clip_quickgelu_224'
    assert ckpt['args']['text_act'] == 'quick_gelu' and ckpt['args']['embed_dim'] == 512
    ours = checkpoint.load_model(ckpt, 64)
    _same_outputs(oc, ours, tokenizer, 64)
    cfg_out, _, _ = interop_openclip.to_openclip(ours)                           # exports back to OpenCLIP's own ViT
    assert cfg_out['quick_gelu'] and cfg_out['vision_cfg'] == {**cfg['vision_cfg'], 'head_width': 64, 'mlp_ratio': 4.0}


# ----------------------------------------------------------------------------- clip-rocket, SLIP

ROCKET_CASES = {
    'CLIP': ('CLIP_TINYVIT_CLIP', {}),
    'CL2L-mlp-linear': ('CL2L_TINYVIT_CL2L', {'separate_proj': True, 'cl2l_txt_proj_type': 'linear'}),
    'CL2L-shared-proj': ('CL2L_TINYVIT_CL2L', {}),
    'BARLIP': ('CL2L_TINYVIT_BARLIP', {'separate_proj': True}),
    'BARLIP-child': ('CL2L_TINYVIT_BARLIP', {'separate_proj': True, 'separate_proj_child': True}),
    'SIAMLIP': ('CL2L_TINYVIT_SIAMLIP', {'separate_proj': True}),
    'SIAMLIP-no-last-bn': ('CL2L_TINYVIT_SIAMLIP', {'siamlip_no_last_bn': True}),
    'BYOLIP-child': ('CL2L_TINYVIT_BYOLIP', {'separate_proj': True, 'separate_proj_child': True}),
    'SWALIP-cnn': ('CL2L_TINYCNN_SWALIP', {'separate_proj': True, 'proj_type': 'linear'}),
}


@pytest.mark.parametrize('case', list(ROCKET_CASES))
def test_cliprocket_round_trip_is_exact(case, tmp_path):
    """Ours -> a clip-rocket checkpoint (their key names, 'module.' prefixes, args as an
    argparse.Namespace, momentum model apart) -> ours gives back every tensor bit for bit."""
    name, kw = ROCKET_CASES[case]
    ours = _randomize(models.create_model(name, text_act='quick_gelu', **kw))
    up = interop_upstream.to_upstream(ours)
    args = argparse.Namespace(model=name.replace('BYOLIP', 'SIAMLIP'), momentum=name.endswith('BYOLIP'),
                              transformer_heads=ours.text_cfg.heads,      # upstream: always 8 (512 wide)
                              **{k: v for k, v in kw.items() if k != 'proj_type'})
    torch.save({**up, 'args': args, 'epoch': 25, 'best_acc1': 1.0}, tmp_path / 'checkpoint_best.pt')
    back, back_name, flags, notes = interop.import_checkpoint('cliprocket', str(tmp_path / 'checkpoint_best.pt'))
    assert back_name == name and flags['text_act'] == 'quick_gelu'
    a, b = ours.state_dict(), back.state_dict()
    assert set(a) == set(b) and not [k for k in a if not torch.equal(a[k], b[k])]
    keys = set(up['state_dict'])
    assert {'module.image_projector.weight', 'module.text_projector.weight', 'module.logit_scale',
            'module.visual.cls_token' if 'VIT' in name else 'module.visual.features.0.weight',
            'module.transformer.resblocks.0.attn.in_proj_weight'} <= keys
    expect = {'CL2L-mlp-linear': ['l2l_image_projector.layer1.bias', 'l2l_image_projector.bn2.running_mean',
                                  'l2l_text_projector.weight', 'l2l_logit_scale'],
              'CL2L-shared-proj': ['l2l_image_projector.weight'],
              'BARLIP': ['barlip_image_projector_global.6.bias', 'barlip_text_projector_local.7.running_var'],
              'SIAMLIP': ['siamlip_image_projector_global.0.3.weight', 'siamlip_image_projector_local.1.running_mean',
                          'image_text_predictor_local.3.bias'],
              'SIAMLIP-no-last-bn': ['siamlip_text_projector_global.3.weight'],
              'BYOLIP-child': ['text_image_predictor_local.0.weight']}.get(case, [])
    assert {'module.' + k for k in expect} <= keys, sorted({'module.' + k for k in expect} - keys)
    assert ('momentum_state_dict' in up) == name.endswith('BYOLIP')
    assert any('final BatchNorm' in n for n in notes) == (case == 'SIAMLIP')


def test_cliprocket_biases_before_batchnorm_fold_exactly():
    """Upstream MLPs have a Linear bias before each BatchNorm, ours not: the bias moves into the
    running mean; eval outputs equal (and in training the batch mean cancels it either way)."""
    ours = _randomize(models.create_model('CL2L_TINYVIT_CL2L', separate_proj=True, text_act='quick_gelu'))
    up = {k[len('module.'):]: v.clone() for k, v in interop_upstream.to_upstream(ours)['state_dict'].items()}
    g = torch.Generator().manual_seed(3)
    for layer in ('layer1', 'layer2'):
        key = f'l2l_image_projector.{layer}.bias'
        up[key] = torch.randn(up[key].shape, generator=g)
    hid, dim, out = up['l2l_image_projector.layer1.weight'].shape[0], ours.vision_width, ours.embed_dim
    ref = nn.Sequential(OrderedDict([                                   # upstream's _build_mlp, by its key names
        ('layer1', nn.Linear(dim, hid)), ('bn1', nn.BatchNorm1d(hid)), ('relu1', nn.ReLU()),
        ('layer2', nn.Linear(hid, hid)), ('bn2', nn.BatchNorm1d(hid)), ('relu2', nn.ReLU()),
        ('layer3', nn.Linear(hid, out))]))
    prefix = 'l2l_image_projector.'
    ref.load_state_dict({k[len(prefix):]: v for k, v in up.items() if k.startswith(prefix)})
    back = models.create_model('CL2L_TINYVIT_CL2L', separate_proj=True, text_act='quick_gelu')
    interop_upstream.load_upstream(back, up)
    x = torch.randn(8, dim)
    with torch.no_grad():
        assert (ref.eval()(x) - back.h_image_projection.eval()(x)).abs().max() < TOL
        assert (ref.train()(x) - back.h_image_projection.train()(x)).abs().max() < TOL


def test_slip_round_trip_and_names(tmp_path):
    ours = _randomize(models.create_model('CLIP_TINYVIT_CLIP', text_act='quick_gelu'))
    up = interop_upstream.to_upstream(ours, layout='slip')['state_dict']
    assert up['module.image_projection'].shape == (ours.vision_width, ours.embed_dim)   # a Parameter, [W, E]
    up['module.image_mlp.layer1.weight'] = torch.zeros(4, ours.vision_width)            # SLIP's SimCLR head
    args = argparse.Namespace(model='SLIP_TINYVIT', transformer_heads=ours.text_cfg.heads)
    torch.save({'state_dict': up, 'args': args}, tmp_path / 'slip.pt')
    back, name, _, notes = interop.import_checkpoint('slip', str(tmp_path / 'slip.pt'))
    assert name == 'CLIP_TINYVIT_CLIP' and any('image_mlp' in n for n in notes)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    assert interop_upstream._our_name('CLIP_VITS16', {}, 'slip') == 'CLIP_VITS16MOCO_CLIP'    # SLIP's ViT-S: 12 heads
    with pytest.raises(ValueError, match='text tower'):
        interop_upstream._our_name('SIMCLR_VITB16', {}, 'slip')


# ----------------------------------------------------------------------------- cvnets

# The published RangeAugment CLIP recipes (examples/range_augment/clip/*.yaml) at the reference's
# tiny size: text 128 wide, 2 heads (= width / 64, as 512/8 and 768/12 there); the image encoder
# is its ViT (128 wide, 2 layers: 64-wide heads, as every cvnets ViT mode).
CVNETS_RECIPE = """model:
  activation: {name: gelu}
  classification:
    name: vit
    vit: {mode: base, norm_layer: layer_norm_fp32}
    activation: {name: gelu}
  image_projection_head: {name: simple_projection_nc2nc}
  normalization: {name: batch_norm, momentum: 0.1}
  text:
    name: transformer
    transformer: {causal_masking: true, model_dim: 128, n_transformer_layers: 2, n_heads_per_layer: 2,
                  ffn_multiplier_per_layer: 4.0, norm_layer: layer_norm_fp32}
"""
CVNETS_VIT = {'embed_dim': 128, 'depth': 2, 'num_heads': 2}      # cvnets_ref.CLIP's default ViT


def _cvnets_ref(qkv_gain=8.0, stem_gain=10.0, **size):
    """A random cvnets CLIP whose differences show: LayerNorm gains near 1, peaked attention (a
    wrong head count or mask), a stem that is not tiny (a shifted stem: timm's vit_base_mci_224
    pads by 0). Deep towers take gains of 1: through 12 layers, peaked attention turns float
    rounding into visible differences."""
    ref = _randomize(cvnets_ref.CLIP(**size)).eval()
    vit = ref.image_encoder
    with torch.no_grad():
        for block in ref.text_encoder.transformer:
            block.pre_norm_mha[1].qkv_proj.weight.mul_(8)
        for block in vit.transformer:
            block.pre_norm_mha[1].qkv_proj.weight.mul_(qkv_gain)
            block.pre_norm_mha[0].weight.add_(1.0)
            block.pre_norm_ffn[0].weight.add_(1.0)
        vit.post_transformer_norm.weight.add_(1.0)
        for layer in vit.patch_emb:
            layer.block.conv.weight.mul_(stem_gain)
    return ref


def _cvnets_checkpoint(tmp_path, range_augment=False):
    """A random cvnets CLIP saved as its training checkpoint.pt (model_state_dict + optimizer state)."""
    ref = _cvnets_ref(text_width=128, text_heads=2, text_layers=2, proj_dim=32, range_augment=range_augment)
    opt = torch.optim.AdamW(ref.parameters())
    torch.save({'model_state_dict': ref.state_dict(), 'optim_state_dict': opt.state_dict(), 'iterations': 3,
                'epoch': 0, 'best_metric': 0.5}, tmp_path / 'checkpoint.pt')
    (tmp_path / 'clip.yaml').write_text(CVNETS_RECIPE)
    return ref


@pytest.fixture
def cvnets_tiny():
    """Backbone CVTINY while the test runs: our cvnets ViT (VITB16CV's builder) at the reference's size."""
    models.BACKBONES.register('CVTINY', dataclasses.replace(models.BACKBONES['VITB16CV'], timm_kwargs=CVNETS_VIT))
    yield 'CVTINY'
    del models.BACKBONES['CVTINY']


@pytest.mark.parametrize('with_recipe', [True, False])
def test_cvnets_text_tower_imports_exactly(tmp_path, tokenizer, with_recipe, capsys):
    ref = _cvnets_checkpoint(tmp_path)
    argv = ['import', '--from', 'cvnets', '--checkpoint', str(tmp_path / 'checkpoint.pt'), '--model',
            'CLIP_TINYVIT_CLIP', '--text-only', '--out', str(tmp_path / 'ours.pt')]
    interop.main(argv + (['--cvnets-config', str(tmp_path / 'clip.yaml')] if with_recipe else []))
    assert ('no --cvnets-config' in capsys.readouterr().out) != with_recipe
    ours, ckpt = interop.load_ours(str(tmp_path / 'ours.pt'))
    assert ckpt['args']['transformer_heads'] == 2 and ckpt['args']['embed_dim'] == 32
    text = tokenizer(['a photo of a cat', 'a diagram of a red square', 'x'])
    with torch.no_grad():
        assert (ref.text_encoder(text) - ours.encode_text(text)).abs().max() <= TOL
    assert torch.equal(ours.logit_scale, ref.logit_scale)


@pytest.mark.parametrize('with_recipe', [True, False])
def test_cvnets_clip_imports_exactly(tmp_path, tokenizer, cvnets_tiny, with_recipe, capsys):
    """The whole CLIP (ViT with its convolutional stem, projections, logit scale) at its native
    224 px; RangeAugment's training-only magnitudes are left out, saying so."""
    ref = _cvnets_checkpoint(tmp_path, range_augment=True)
    argv = ['import', '--from', 'cvnets', '--checkpoint', str(tmp_path / 'checkpoint.pt'), '--model',
            f'CL2L_{cvnets_tiny}_CL2L', '--out', str(tmp_path / 'ours.pt')]
    interop.main(argv + (['--cvnets-config', str(tmp_path / 'clip.yaml')] if with_recipe else []))
    out = capsys.readouterr().out
    assert 'neural_augmentor' in out and ("image settings assumed" in out) != with_recipe
    ours, ckpt = interop.load_ours(str(tmp_path / 'ours.pt'))
    assert ckpt['args']['image_size'] == 224
    torch.manual_seed(1)
    image, text = torch.randn(2, 3, 224, 224), tokenizer(['a photo of a cat', 'a diagram of a red square'])
    with torch.no_grad():
        want = ref.image_encoder(image)
        assert (want - ours.encode_image(image)).abs().max() <= TOL
        assert (want - ours.encode_image(image, head='h')).abs().max() <= TOL     # CL2L without separate heads
        assert (ref.text_encoder(text) - ours.encode_text(text)).abs().max() <= TOL
        ours.visual.patch_embed.backbone.conv1.padding = (0, 0)     # why not timm's stem, which pads by 0
        assert (want - ours.encode_image(image)).abs().max() > 100 * TOL
    with torch.device('meta'):
        assert timm.create_model('vit_base_mci_224').patch_embed.backbone[0].conv.padding == (0, 0)
    assert torch.equal(ours.logit_scale, ref.logit_scale)
    # other sizes: our 2-D resampled grid runs; cvnets resizes the flattened sequence (not the same)
    at_256 = checkpoint.load_model(ckpt, 256)
    image = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert at_256.visual.pos_embed.shape == (1, 256, 128)
        assert (ref.image_encoder(image) - at_256.encode_image(image)).abs().max() > TOL


@pytest.mark.slow
def test_cvnets_vitb16_recipe_imports_exactly(tmp_path, tokenizer):
    """cvnets' CLIP ViT-B/16 recipe at its real size (ViT-B/16, text 512 wide x 12, 512-d) onto
    CLIP_VITB16CV_CLIP. (ViT-H/16 onto CLIP_VITH16CV_CLIP was checked the same way once: 6 GB.)"""
    ref = _cvnets_ref(qkv_gain=1.0, stem_gain=1.0, vit_width=768, vit_heads=12, vit_layers=12, text_width=512,
                      text_heads=8, text_layers=12, proj_dim=512)
    torch.save(ref.state_dict(), tmp_path / 'clip_vit_base_16.pt')
    interop.main(['import', '--from', 'cvnets', '--checkpoint', str(tmp_path / 'clip_vit_base_16.pt'),
                  '--model', 'CLIP_VITB16CV_CLIP', '--out', str(tmp_path / 'ours.pt')])
    ours, _ = interop.load_ours(str(tmp_path / 'ours.pt'))
    torch.manual_seed(1)
    image, text = torch.randn(2, 3, 224, 224), tokenizer(['a photo of a cat', 'a diagram of a red square'])
    with torch.no_grad():
        assert (ref.image_encoder(image) - ours.encode_image(image)).abs().max() <= TOL
        assert (ref.text_encoder(text) - ours.encode_text(text)).abs().max() <= TOL


def test_cvnets_image_encoders_that_do_not_map_are_refused(tmp_path, cvnets_tiny):
    _cvnets_checkpoint(tmp_path)
    state = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['model_state_dict']
    argv = ['import', '--from', 'cvnets', '--checkpoint', str(tmp_path / 'bad.pt'), '--model',
            f'CLIP_{cvnets_tiny}_CLIP', '--out', str(tmp_path / 'ours.pt')]
    proj = 'image_encoder.classifier.proj'
    for change, fragment in [
            (lambda sd: sd.pop('image_encoder.cls_token'), 'no_cls_token'),
            (lambda sd: sd.update({proj.replace('proj', 'weight'): sd.pop(proj)}), 'projection head'),
            (lambda sd: sd.update({'image_encoder.simple_fpn.out_l3.block.conv.weight': torch.zeros(1)}),
             "image_encoder.simple_fpn.out_l3.block.conv.weight: not a tensor of cvnets' ViT"),
            (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith('image_encoder.patch_emb.')], 'not its ViT')]:
        bad = dict(state)
        change(bad)
        torch.save(bad, tmp_path / 'bad.pt')
        with pytest.raises(SystemExit, match=fragment) as e:
            interop.main(argv)
        assert '\n' not in str(e.value)
    for good, bad in {'name: vit': 'name: resnet', 'vit: {mode: base,': 'vit: {mode: base, no_cls_token: true,',
                      'activation: {name: gelu}\n  image': 'activation: {name: relu}\n  image',   # classification's
                      'simple_projection_nc2nc': 'attention_pool_nchw2nc'}.items():
        (tmp_path / 'clip.yaml').write_text(CVNETS_RECIPE.replace(good, bad, 1))
        with pytest.raises(SystemExit, match='resnet|no_cls_token|relu|attention_pool'):
            interop.main(argv[:4] + [str(tmp_path / 'checkpoint.pt')] + argv[5:] +
                         ['--cvnets-config', str(tmp_path / 'clip.yaml')])
    assert not os.path.exists(tmp_path / 'ours.pt')


def test_cvnets_vits_fit_only_our_cvnets_backbone_of_their_size(tmp_path, cvnets_tiny):
    _cvnets_checkpoint(tmp_path)
    argv = ['import', '--from', 'cvnets', '--checkpoint', str(tmp_path / 'checkpoint.pt'), '--out',
            str(tmp_path / 'ours.pt'), '--model']
    with pytest.raises(SystemExit, match=r'does not fit VITB16CV \(768 wide, 12 layers, 12 heads\): use the '
                                         f'{cvnets_tiny} backbone'):
        interop.main(argv + ['CLIP_VITB16CV_CLIP'])
    del models.BACKBONES[cvnets_tiny]                 # no backbone of that size left
    try:
        with pytest.raises(SystemExit) as e:
            interop.main(argv + ['CLIP_TINYVIT_CLIP'])
        assert all(s in str(e.value) for s in ('TINYVIT', 'no convolutional stem', '--text-only'))
    finally:
        models.BACKBONES.register(cvnets_tiny, dataclasses.replace(models.BACKBONES['VITB16CV'],
                                                                   timm_kwargs=CVNETS_VIT))


def test_cvnets_text_settings_that_do_not_map_are_refused(tmp_path):
    _cvnets_checkpoint(tmp_path)
    argv = ['import', '--from', 'cvnets', '--checkpoint', str(tmp_path / 'checkpoint.pt'), '--model',
            'CLIP_TINYVIT_CLIP', '--out', str(tmp_path / 'ours.pt')]
    for good, bad in {'causal_masking: true': 'causal_masking: false', 'name: gelu': 'name: relu',
                      'n_heads_per_layer: 2,': 'n_heads_per_layer: [2, 4],'}.items():
        (tmp_path / 'clip.yaml').write_text(CVNETS_RECIPE.replace(good, bad))
        with pytest.raises(SystemExit, match='causal_masking=False|relu|per-layer heads'):
            interop.main(argv + ['--text-only', '--cvnets-config', str(tmp_path / 'clip.yaml')])
    with pytest.raises(SystemExit, match='--cvnets-config goes with --from cvnets'):
        interop.main(['import', '--from', 'openai', '--checkpoint', str(tmp_path / 'checkpoint.pt'),
                      '--model', 'CLIP_TINYVIT_CLIP', '--cvnets-config', 'x.yaml', '--out', str(tmp_path / 'o.pt')])
    assert not os.path.exists(tmp_path / 'ours.pt')


@pytest.mark.parametrize('source', ['cliprocket', 'slip', 'trainclip', 'cvnets'])
def test_text_tokenizer_is_refused_where_it_would_be_ignored(tmp_path, source):
    with pytest.raises(SystemExit, match=f'--text-tokenizer goes with --from openclip .* not --from {source}'):
        interop.main(['import', '--from', source, '--checkpoint', str(tmp_path / 'missing.pt'),
                      '--model', 'CLIP_TINYVIT_CLIP', '--text-tokenizer', str(tmp_path), '--out', str(tmp_path / 'o.pt')])
    assert not os.path.exists(tmp_path / 'o.pt')


# ----------------------------------------------------------------------------- clear errors

def test_modified_resnet_of_no_preset_is_refused_but_its_text_tower_loads(tokenizer):
    cfg = {'embed_dim': 32, 'vision_cfg': {'image_size': 64, 'layers': [1, 1, 1, 1], 'width': 16},
           'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 128, 'heads': 4, 'layers': 2}}
    oc = _randomize(open_clip.CLIP(**cfg)).eval()
    with pytest.raises(ValueError, match=r'ModifiedResNet layers \[1, 1, 1, 1\], width 16.*no backbone of ours'):
        interop_openclip.flags_for_openclip('CLIP_R50_CLIP', cfg)
    assert interop_openclip.openai_config(oc.state_dict())['vision_cfg']['layers'] == [1, 1, 1, 1]
    flags, _ = interop_openclip.flags_for_openclip('CLIP_TINYCNN_CLIP', cfg, text_only=True)
    ours = models.create_model('CLIP_TINYCNN_CLIP', **interop._create_kwargs(flags)).eval()
    notes = interop_openclip.load_openclip(ours, oc.state_dict(), cfg, text_only=True)
    assert any('visual' in n for n in notes)
    _, text = _inputs(tokenizer, 64)
    with torch.no_grad():
        assert (oc.encode_text(text, normalize=True) - ours.encode_text(text)).abs().max() <= TOL


def test_mismatched_architectures_fail_saying_why():
    oai = open_clip.CLIP(**TINY_OAI).state_dict()
    tiny = models.create_model('CLIP_TINYVIT_CLIP', embed_dim=64, transformer_width=128, transformer_heads=2,
                               text_act='quick_gelu')
    with pytest.raises(ValueError, match='image towers differ: .*ln_pre True'):
        interop_openclip.load_openclip(tiny, oai, TINY_OAI)
    with pytest.raises(ValueError, match='no timm ViT matches'):            # nothing in timm is this tiny CLIP ViT
        interop_openclip.flags_for_openclip('CLIP_TINYVIT_CLIP', TINY_OAI)
    gelu = models.create_model('CLIP_TINYVIT_CLIP', embed_dim=64, transformer_width=128, transformer_heads=2)
    with pytest.raises(ValueError, match='text towers differ: quick_gelu True'):
        interop_openclip.load_openclip(gelu, oai, TINY_OAI)
    with pytest.raises(ValueError, match='MLP image projection'):
        interop_openclip.to_openclip(models.create_model('CLIP_TINYCNN_CLIP'))     # TINYCNN projects with an MLP
    with pytest.raises(ValueError, match='not a timm model'):
        interop_openclip.to_openclip(models.create_model('CLIP_TINYCNN_CLIP', proj_type='linear'))
    tokens = {**TINY_OC, 'vision_cfg': {**TINY_OC['vision_cfg'], 'pool_type': 'none'}}   # avg: test_pooled_towers.py
    with pytest.raises(ValueError, match="pool_type='none'"):
        interop_openclip.openclip_vit_spec(tokens)
    ours = models.create_model('CLIP_TINYVIT_CLIP', text_act='quick_gelu')
    state = {k[len('module.'):]: v for k, v in interop_upstream.to_upstream(ours)['state_dict'].items()}
    state['image_projector.layer1.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match='clip-proj-type mlp'):
        interop_upstream.flags_for_upstream(state, {'model': 'CLIP_TINYVIT_CLIP'})


def test_cli_errors_are_one_line(tmp_path, capsys):
    class Code:                                                         # a pickle that would run code
        def __reduce__(self):
            return print, ('ran',)
    torch.save({'state_dict': {'a': torch.zeros(1)}, 'x': Code()}, tmp_path / 'bad.pt')
    with pytest.raises(SystemExit) as e:
        interop.main(['import', '--from', 'cliprocket', '--checkpoint', str(tmp_path / 'bad.pt'),
                      '--out', str(tmp_path / 'o.pt')])
    assert 'cannot load' in str(e.value) and 'weights_only' in str(e.value) and '\n' not in str(e.value)
    assert 'ran' not in capsys.readouterr().out
    torch.save({'logit_scale': torch.zeros(())}, tmp_path / 'plain.pt')
    with pytest.raises(SystemExit, match='needs --openclip-model'):
        interop.main(['import', '--from', 'openclip', '--checkpoint', str(tmp_path / 'plain.pt'),
                      '--model', 'CLIP_TINYVIT_CLIP', '--out', str(tmp_path / 'o.pt')])


# ----------------------------------------------------------------------------- export names

def _export_config(name):
    """The OpenCLIP config `interop.py export` writes for the registered model `name` (built on
    the meta device, then given uninitialised storage: no weights are computed), or None when
    export refuses the model."""
    with torch.device('meta'):
        model = models.create_model(name)
    model.to_empty(device='cpu')
    for param in (p for n, p in model.named_parameters() if n.startswith('logit_')):
        param.data.zero_()                                  # written into the config (init_logit_bias)
    try:
        return interop_openclip.to_openclip(model)[0]
    except ValueError:
        return None


@pytest.mark.slow
def test_every_exportable_model_gets_the_clip_tokenizer_in_open_clip(tmp_path):
    """open_clip.get_tokenizer(NAME) picks SigLIP's sentencepiece tokenizer for any registered
    name containing 'siglip' (offline: an error; online: another vocabulary). Every registered
    model that export supports, its config registered as export tells users
    (add_model_config(DIR/NAME.json)), gets CLIP's BPE tokenizer with our tokens."""
    caption = ['A SigLIP-style photo of a dog &amp; two cats, taken in 2024!']
    exported = []
    for name in models.list_models():
        cfg = _export_config(name)
        if cfg is None:
            continue
        oc_name = interop_openclip.openclip_export_name(name)
        (tmp_path / f'{oc_name}.json').write_text(json.dumps(cfg))
        open_clip.add_model_config(str(tmp_path / f'{oc_name}.json'))
        oc_tokenizer = open_clip.get_tokenizer(oc_name)
        assert type(oc_tokenizer) is open_clip.tokenizer.SimpleTokenizer, (name, oc_name, oc_tokenizer)
        ours = towers.tokenizer_for({'context_length': cfg['text_cfg']['context_length']})   # main.py's
        assert torch.equal(oc_tokenizer(caption), ours(caption)), name
        exported.append(name)
    methods = {n.split('_')[2] for n in exported}
    assert {'CLIP', 'SIGLIP'} <= methods and len(exported) > len(models.list_models()) // 2, exported


def test_siglip_export_names_the_config_for_the_clip_tokenizer(tmp_path, tokenizer, capsys):
    """End to end: export of a SigLIP-trained model without --name, loaded both ways the export
    prints, tokenizes like ours; a --name containing 'siglip' is refused in one line."""
    ours = _randomize(models.create_model('CLIP_TINYVIT_SIGLIP')).eval()
    interop.save_ours(str(tmp_path / 'ckpt.pt'), ours, 'CLIP_TINYVIT_SIGLIP', {}, {'from': 'test'})
    out = tmp_path / 'exported'
    interop.main(['export', '--checkpoint', str(tmp_path / 'ckpt.pt'), '--out', str(out)])
    printed = capsys.readouterr().out
    assert "open_clip.create_model('CLIP_TINYVIT_SIG-LIP'" in printed and 'not CLIP_TINYVIT_SIGLIP' in printed
    open_clip.add_model_config(str(out / 'CLIP_TINYVIT_SIG-LIP.json'))
    oc = open_clip.create_model('CLIP_TINYVIT_SIG-LIP', pretrained=str(out / 'open_clip_pytorch_model.bin')).eval()
    _same_outputs(oc, ours, tokenizer, 32)
    for oc_name in ('CLIP_TINYVIT_SIG-LIP', 'local-dir:' + str(out)):
        oc_tokenizer = open_clip.get_tokenizer(oc_name)
        assert type(oc_tokenizer) is open_clip.tokenizer.SimpleTokenizer, oc_name
        assert torch.equal(oc_tokenizer(['a photo of a cat']), tokenizer(['a photo of a cat']))
    with pytest.raises(SystemExit) as e:
        interop.main(['export', '--checkpoint', str(tmp_path / 'ckpt.pt'), '--out', str(tmp_path / 'o'),
                      '--name', 'my-siglip'])
    message = str(e.value.code)
    assert message.startswith('interop.py export: error: --name ') and "e.g. 'CLIP_TINYVIT_SIG-LIP'" in message
    assert '\n' not in message and not os.path.exists(tmp_path / 'o')
