"""OpenAI's ModifiedResNet towers (RN50 ... RN50x64, our RN*OAI backbones = timm's resnet*_clip):
OpenAI / OpenCLIP state dicts and TorchScript archives import with encode_image / encode_text
equal to OpenCLIP's own model, ours export to OpenCLIP's ModifiedResNet, an imported RN50
evaluates zero-shot and runs the demo, and the backbones train every method through main.py."""
import json
from dataclasses import replace

import open_clip
import pytest
import torch
from PIL import Image

import checkpoint
import demo_zeroshot
import eval_zeroshot
import interop
import interop_openclip
import interop_resnet
import losses
import main as train
import models
import syncbn
from test_interop import _randomize, _same_outputs
from test_methods import METHOD_CASES
from zs_helpers import make_imagefolder, write_catalog

RN_BACKBONES = [b for b, cfg in models.BACKBONES.items() if cfg.timm_name.endswith('_clip')]
TINY_TEXT = {'context_length': 77, 'vocab_size': 49408, 'width': 64, 'heads': 1, 'layers': 1}


def _preset_spec(backbone):
    cfg = models.BACKBONES[backbone]
    with torch.device('meta'):
        model = models.create_model(f'CLIP_{backbone}_CLIP')
    return cfg, interop_resnet.resnet_spec(model)


def _shallow(backbone, image_size=64):
    """(OpenCLIP config, our model) of `backbone`'s width with one block per stage at 64 px
    and a tiny QuickGELU text tower: each preset's stem / channel / head arrangement, cheaply."""
    from timm.models.byobnet import model_cfgs
    cfg, spec = _preset_spec(backbone)
    blocks = tuple(replace(b, d=1) for b in model_cfgs[cfg.timm_name].blocks)
    tower = replace(cfg, timm_kwargs={'blocks': blocks}, image_size=image_size)
    oc_cfg = {'embed_dim': 48, 'quick_gelu': True, 'text_cfg': TINY_TEXT,
              'vision_cfg': {'image_size': image_size, 'layers': [1, 1, 1, 1], 'width': spec['width']}}
    text = models.TextCfg(width=64, heads=1, layers=1, act='quick_gelu')
    return oc_cfg, models.CLIP(tower, text, 48, image_size=image_size).eval()


def test_presets_are_openais_configs():
    """Layers, width, attention-pool heads, image size and embed dim as OpenCLIP's RN* configs."""
    assert RN_BACKBONES == ['RN50OAI', 'RN101OAI', 'RN50X4OAI', 'RN50X16OAI', 'RN50X64OAI']
    for backbone in RN_BACKBONES:
        cfg, spec = _preset_spec(backbone)
        oc = open_clip.get_model_config(backbone[:-3].replace('X', 'x'))
        v = oc['vision_cfg']
        assert spec == {'layers': tuple(v['layers']), 'width': v['width'], 'heads': v['width'] // 2,
                        'image_size': v['image_size']}, backbone
        assert cfg.embed_dim == oc['embed_dim'] and cfg.text.width == oc['text_cfg']['width'], backbone
        assert cfg.text.heads == oc['text_cfg']['heads'], backbone


@pytest.mark.parametrize('backbone', RN_BACKBONES)
def test_every_openai_resnet_maps_both_ways(backbone, tokenizer):
    oc_cfg, ours = _shallow(backbone)
    oc = _randomize(open_clip.CLIP(**oc_cfg)).eval()
    assert interop_openclip.openai_config(oc.state_dict()) == {
        **oc_cfg, 'vision_cfg': {**oc_cfg['vision_cfg'], 'patch_size': None}}
    interop_openclip.load_openclip(ours, oc.state_dict(), oc_cfg)
    _same_outputs(oc, ours, tokenizer, 64)
    _randomize(ours, seed=1)                                        # and back: ours -> OpenCLIP
    cfg, state, _ = interop_openclip.to_openclip(ours)
    back = open_clip.CLIP(**cfg).eval()
    back.load_state_dict(state)                                     # strict: every key, every shape
    _same_outputs(back, ours, tokenizer, 64)


def _rn50_at_64(tmp_path):
    """An OpenCLIP RN50 at 64 px with a tiny text tower, random weights, as an OpenAI state dict."""
    cfg = json.loads(json.dumps(open_clip.get_model_config('RN50-quickgelu')))
    cfg['vision_cfg']['image_size'], cfg['text_cfg'] = 64, TINY_TEXT
    oc = _randomize(open_clip.CLIP(**cfg)).eval()
    path = tmp_path / 'RN50.pt'
    torch.save(oc.state_dict(), path)
    return oc, path


def test_openai_rn50_imports_evaluates_and_runs_the_demo(tmp_path, tokenizer, capsys):
    oc, path = _rn50_at_64(tmp_path)
    out = str(tmp_path / 'ours.pt')
    interop.main(['import', '--from', 'openai', '--checkpoint', str(path), '--model', 'CLIP_RN50OAI_CLIP',
                  '--out', out])
    ckpt = checkpoint.load_checkpoint(out)
    assert ckpt['args']['image_size'] == 64 and ckpt['args']['text_act'] == 'quick_gelu'
    ours = checkpoint.load_model(ckpt)
    _same_outputs(oc, ours, tokenizer, 64)
    small = checkpoint.load_model(ckpt, image_size=32)    # attention-pool position embedding resampled
    image = torch.randn(2, 3, 32, 32)                       # as timm resamples it on the fly
    with torch.no_grad():
        torch.testing.assert_close(small.encode_image(image), ours.encode_image(image), rtol=0, atol=1e-6)
    make_imagefolder(tmp_path / 'data' / 'gen')
    files = write_catalog(tmp_path, {'gen': {'type': 'imagefolder', 'path': 'gen'}})
    results = eval_zeroshot.main(['--resume', out, '--data-root', str(tmp_path / 'data'), '--batch-size', '4',
                                  '--output-dir', str(tmp_path / 'zs'), '--no-cache', '--catalog', files['catalog'],
                                  '--labels', files['labels'], '--templates', files['templates']])
    assert 0 <= results['gen']['top1'] <= 100
    Image.new('RGB', (40, 30), (250, 10, 10)).save(tmp_path / 'red.png')
    demo = demo_zeroshot.main(['--checkpoint', out, '--img-path', str(tmp_path / 'red.png'),
                               '--classes', 'red,green,blue,cat,dog'])
    assert len(demo['predictions']) == 1 and len(demo['predictions'][0]['top']) == 5
    exported = tmp_path / 'exported'                                # out to OpenCLIP again
    interop.main(['export', '--checkpoint', out, '--out', str(exported)])
    back = open_clip.create_model('local-dir:' + str(exported)).eval()
    _same_outputs(back, ours, tokenizer, 64)


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
def test_torchscript_rn_archive_is_read_without_running_it(tmp_path, tokenizer, monkeypatch):
    oc_cfg, ours = _shallow('RN50X4OAI')
    oc = _randomize(open_clip.CLIP(**oc_cfg)).eval()
    torch.jit.script(oc).save(str(tmp_path / 'RN-tiny.pt'))
    monkeypatch.setattr(torch.jit, 'load', lambda *a, **k: pytest.fail('torch.jit.load called'))
    state, _ = interop.read_checkpoint(str(tmp_path / 'RN-tiny.pt'))
    assert all(torch.equal(state[k], v) for k, v in oc.state_dict().items())
    interop_openclip.load_openclip(ours, state, interop_openclip.openai_config(state))
    _same_outputs(oc, ours, tokenizer, 64)


def test_wrong_backbone_names_the_right_one(tmp_path):
    rn101 = json.loads(json.dumps(open_clip.get_model_config('RN101')))
    with pytest.raises(ValueError, match=r'layers \[3, 4, 23, 3\].*our RN101OAI backbone.*CLIP_RN101OAI_CLIP'):
        interop_openclip.flags_for_openclip('CLIP_RN50OAI_CLIP', rn101)
    with pytest.raises(ValueError, match='our RN101OAI backbone'):
        interop_openclip.flags_for_openclip('CLIP_R50_CLIP', rn101)
    wide = {**rn101, 'vision_cfg': {**rn101['vision_cfg'], 'width': 256}}     # train-CLIP's RN.yaml width
    with pytest.raises(ValueError, match='width 256, 128 heads; no backbone of ours builds it'):
        interop_openclip.flags_for_openclip('CLIP_RN101OAI_CLIP', wide)
    with pytest.raises(SystemExit) as e:
        interop.main(['import', '--from', 'openclip', '--checkpoint', str(tmp_path / 'none.pt'),
                      '--openclip-model', 'RN101', '--model', 'CLIP_RN50OAI_CLIP', '--out', str(tmp_path / 'o.pt')])
    assert str(e.value.code).startswith('interop.py import: error: ') and '\n' not in str(e.value.code)
    ours = models.create_model('CLIP_RN50OAI_CLIP', image_size=32, proj_type='mlp', transformer_layers=1)
    with pytest.raises(ValueError, match='MLP image projection'):
        interop_openclip.to_openclip(ours)


@pytest.mark.slow          # ~1 min of CPU: a full RN50 + 12-layer text tower, twice, at 224 px
def test_real_size_rn50_both_directions(tmp_path, tokenizer):
    oc = _randomize(open_clip.create_model('RN50')).eval()
    torch.save({'epoch': 1, 'state_dict': {'module.' + k: v for k, v in oc.state_dict().items()}},
               tmp_path / 'epoch_1.pt')
    out = str(tmp_path / 'ours.pt')
    interop.main(['import', '--from', 'openclip', '--checkpoint', str(tmp_path / 'epoch_1.pt'),
                  '--openclip-model', 'RN50', '--model', 'CLIP_RN50OAI_CLIP', '--out', out])
    ckpt = checkpoint.load_checkpoint(out)
    assert 'image_tower' not in ckpt['args'] and ckpt['args']['image_size'] == 224
    ours = checkpoint.load_model(ckpt)
    _same_outputs(oc, ours, tokenizer, 224)
    interop.main(['export', '--checkpoint', out, '--out', str(tmp_path / 'exported')])
    back = open_clip.create_model('local-dir:' + str(tmp_path / 'exported')).eval()
    _same_outputs(back, ours, tokenizer, 224)


# ----------------------------------------------------------------------------- training

RN_TRAIN = ['--image-size', '32', '--transformer-layers', '1', '--transformer-width', '64',
            '--transformer-heads', '1', '--embed-dim', '32', '--shapes-num-train', '16', '--batch-size', '8',
            '--epochs', '1', '--print-freq', '1', '--zeroshot-datasets', 'shapes']


@pytest.mark.parametrize('method', [m if m == 'CLIP' else pytest.param(m, marks=pytest.mark.slow)
                                    for m in METHOD_CASES])       # ~20 s each on an idle 2-core CPU
def test_rn50oai_trains_every_method_on_shapes(method, tmp_path):
    name, *flags = METHOD_CASES[method]
    name = name.replace('_TINYVIT_', '_RN50OAI_')
    heads = ['--clip-hidden-dim', '64', '--barlip-hidden-dim', '64', '--barlip-proj-dim', '64',
             '--siamlip-hidden-dim', '64', '--siamlip-proj-dim', '32'] if name.startswith('CL2L') else []
    out = tmp_path / 'run'
    train.main(['--model', name, *flags, *heads, *RN_TRAIN, '--output-dir', str(out)])
    steps = [json.loads(line) for line in open(out / 'log_steps.txt')]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s['loss'])) for s in steps)


def test_image_size_must_be_a_multiple_of_32(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--model', 'CLIP_RN50OAI_CLIP', '--image-size', '100'])
    assert 'multiples of 32' in capsys.readouterr().err
    with pytest.raises(ValueError, match=r'multiples of 32 px \(e.g. 96\)'):
        models.create_model('CLIP_RN50OAI_CLIP', image_size=100)
    with pytest.raises(SystemExit):
        train.parse_args(['--model', 'CLIP_RN50OAI_CLIP', '--patch-dropout', '0.5'])
    assert 'not a ViT' in capsys.readouterr().err


def test_batchnorm_with_activation_syncs_and_keeps_its_activation(tokenizer):
    """timm's BatchNorm+ReLU layers of the RN towers become CPUSyncBatchNormAct (CPU) / timm's
    SyncBatchNormAct (CUDA), not a plain SyncBatchNorm that would drop the ReLU; one process:
    the same outputs."""
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import SyncBatchNormAct
    _, ours = _shallow('RN50OAI')
    _randomize(ours).train()
    image = torch.randn(4, 3, 64, 64)
    ref = ours.encode_image(image)
    count = sum(type(m) is BatchNormAct2d for m in ours.modules())
    cuda = syncbn.sync_batchnorm(_shallow('RN50OAI')[1], torch.device('cuda'))     # conversion only
    assert sum(type(m) is SyncBatchNormAct for m in cuda.modules()) == count
    synced = syncbn.sync_batchnorm(ours, torch.device('cpu'))
    assert sum(type(m) is syncbn.CPUSyncBatchNormAct for m in synced.modules()) == count > 0
    assert not any(type(m) is BatchNormAct2d for m in synced.modules())
    torch.testing.assert_close(synced.encode_image(image), ref, rtol=0, atol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients(tokenizer):
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = _shallow('RN50OAI', image_size=32)[1].train().double()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        batch = {'image': torch.randn(4, 3, 32, 32, dtype=torch.float64), 'text': tokenizer(['a'] * 4)}
        losses.CLIPLoss()(model(batch))['loss'].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert model.visual.grad_checkpointing
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-10), k
