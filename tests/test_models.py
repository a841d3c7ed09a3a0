"""Model zoo: every registered backbone builds, trains (forward + backward reaches every
parameter), has the known size; names and overrides fail with the valid choices."""
import dataclasses
import math

import pytest
import torch

import losses
import models
import text_transformer
from conftest import params_without_grad, shallow_if_huge, text_tokenizer_of, tower_parameters, unzero_norms

REAL_SMALL_RES = 64          # real towers run at a small resolution to keep the test fast
SLOW_TOWER = 150e6           # image towers this big take ~30 s and more to build and train once on CPU


def _backbone_cases():
    return [pytest.param(b, marks=pytest.mark.slow) if tower_parameters(b) > SLOW_TOWER else b
            for b in sorted(models.BACKBONES)]


def _batch(model, tokenizer, n=4):
    size = model.image_size
    return {'image': torch.randn(n, 3, size, size),
            'text': tokenizer([f'a photo of a thing number {i}' for i in range(n)])}


@pytest.mark.parametrize('backbone', _backbone_cases())
def test_every_backbone_trains(backbone, tokenizer, wordpiece, monkeypatch):
    name = f'CLIP_{backbone}_CLIP'
    shallow_if_huge(monkeypatch, backbone)
    size = min(models.BACKBONES[backbone].image_size, REAL_SMALL_RES)
    torch.manual_seed(0)
    model = models.create_model(name, image_size=size, transformer_layers=2)
    unzero_norms(model)
    out = model(_batch(model, text_tokenizer_of(model, tokenizer, wordpiece)))
    assert out['image_embed'].shape == out['text_embed'].shape == (4, model.embed_dim)
    assert torch.allclose(out['image_embed'].norm(dim=-1), torch.ones(4), atol=1e-5)
    terms = losses.CLIPLoss()(out)
    assert torch.isfinite(terms['loss'])
    terms['loss'].backward()
    missing = params_without_grad(model)
    assert not missing, f'parameters without gradient: {missing[:10]}'


def test_known_parameter_counts():
    model = models.create_model('CLIP_VITB16_CLIP')
    visual = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for n, p in model.named_parameters()
               if n.split('.')[0] in ('token_embedding', 'positional_embedding', 'transformer', 'ln_final'))
    assert abs(visual - 86e6) / 86e6 < 0.01, visual       # ViT-B/16 trunk: 85.8 M
    assert abs(text - 63e6) / 63e6 < 0.01, text           # 12 x 512 text transformer: 63.2 M
    assert model.embed_dim == 256 and model.text_cfg.layers == 12 and model.text_cfg.width == 512


def test_cvnets_towers_take_timm_kwargs_and_other_sizes():
    """VITB16CV / VITH16CV (cvnets' ViT, vit_cvnets.py) get the preset's timm_kwargs and
    --patch-dropout like timm towers, take any size (a grid of 16 px tokens from the conv stem),
    and load weights saved at another size with their position embeddings resampled."""
    small = dataclasses.replace(models.BACKBONES['VITB16CV'], timm_kwargs={'depth': 1})
    tower = models.build_image_tower(small, 64, patch_dropout=0.5)
    assert len(tower.blocks) == 1 and tower.patch_drop.prob == 0.5 and tower.pos_embed.shape == (1, 16, 768)
    assert tower.patch_embed.backbone.conv1.padding == (1, 1)
    tower.eval()
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, 768)
    bigger = models.build_image_tower(small, 96)
    loaded, skipped, _ = models.load_weights(bigger, tower.state_dict())
    assert 'pos_embed' in loaded and not skipped and bigger.pos_embed.shape == (1, 36, 768)
    assert models.BACKBONES['VITH16CV'].builder.keywords == {'embed_dim': 1280, 'depth': 32, 'num_heads': 20}


def test_openai_state_dict_layout():
    keys = set(models.create_model('CLIP_TINYVIT_CLIP').state_dict())
    for k in ['token_embedding.weight', 'positional_embedding', 'text_projection', 'logit_scale',
              'ln_final.weight', 'transformer.resblocks.0.attn.in_proj_weight',
              'transformer.resblocks.0.attn.out_proj.weight', 'transformer.resblocks.1.mlp.c_fc.weight',
              'transformer.resblocks.1.mlp.c_proj.bias', 'transformer.resblocks.0.ln_1.weight']:
        assert k in keys, k


def test_attention_matches_reference_mha():
    """Our SDPA attention equals nn.MultiheadAttention with the same weights and causal mask."""
    torch.manual_seed(0)
    ours = text_transformer.CausalSelfAttention(32, 4)
    torch.nn.init.normal_(ours.in_proj_weight, std=0.2)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 32)
    mask = torch.triu(torch.full((7, 7), float('-inf')), 1)
    assert torch.allclose(ours(x), ref(x, x, x, attn_mask=mask, need_weights=False)[0], atol=1e-5)


def test_text_trimming_is_exact(tokenizer):
    """Dropping padding after the last EOT does not change the text embedding."""
    torch.manual_seed(0)
    model = models.create_model('CLIP_TINYVIT_CLIP').eval()
    text = tokenizer(['a red circle', 'a much longer caption about a small blue star on grey'])
    ref_x = model.token_embedding(text) + model.positional_embedding
    ref = model.ln_final(model.transformer(ref_x))[torch.arange(2), text.argmax(-1)] @ model.text_projection
    assert torch.allclose(model.encode_text(text, normalize=False), ref, atol=1e-5)


def test_logit_scale_init_and_clamp():
    model = models.create_model('CLIP_TINYVIT_CLIP')
    assert math.isclose(model.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.after_step()
    assert math.isclose(model.logit_scale.exp().item(), 100.0, rel_tol=1e-5)


def test_no_weight_decay_groups():
    model = models.create_model('CLIP_TINYVIT_CLIP')
    decay, no_decay = models.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay['params']}
    for n in ['logit_scale', 'token_embedding.weight', 'positional_embedding', 'ln_final.weight',
              'transformer.resblocks.0.attn.in_proj_bias', 'visual.pos_embed', 'visual.cls_token']:
        assert n in no_decay_names, n
    decay_names = {names[id(p)] for p in decay['params']}
    assert 'transformer.resblocks.0.attn.in_proj_weight' in decay_names
    assert 'text_projection' in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


@pytest.mark.parametrize('name, fragment', [
    ('CLIP_VITB16', 'must be <base>_<backbone>_<method>'),
    ('CLIP_VITB99_CLIP', 'valid: R50'),
    ('FOO_VITB16_CLIP', 'valid: CLIP'),
    ('CLIP_VITB16_FOO', 'unknown method'),
])
def test_bad_names_name_valid_choices(name, fragment):
    with pytest.raises(ValueError, match=fragment):
        models.parse_model_name(name)


def test_list_models_and_overrides():
    names = models.list_models()
    assert 'CLIP_VITB16_CLIP' in names and 'CLIP_R50_CLIP' in names
    assert models.list_models('CLIP_VIT*_CLIP') == sorted(
        n for n in names if n.startswith('CLIP_VIT') and n.endswith('_CLIP'))
    with pytest.raises(ValueError, match='unknown model overrides'):
        models.create_model('CLIP_TINYVIT_CLIP', embed_dimm=3)
    m = models.create_model('CLIP_TINYVIT_CLIP', embed_dim=None, transformer_layers=3)
    assert m.embed_dim == models.BACKBONES['TINYVIT'].embed_dim and len(m.transformer.resblocks) == 3


@pytest.mark.parametrize('name', ['CLIP_TINYVIT_CLIP', 'CL2L_TINYCNN_CL2L'])
def test_grad_checkpointing_gives_the_same_gradients(name, tokenizer):
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = models.create_model(name, separate_proj=True).double()
        model.set_grad_checkpointing(enable)
        n, size = 4, model.image_size
        torch.manual_seed(1)
        batch = {'image': torch.randn(n, 3, size, size, dtype=torch.float64),
                 'text': tokenizer([f'caption {i}' for i in range(n)])}
        if name.startswith('CL2L'):
            batch['image_views'] = torch.randn(n, 2, 3, size, size, dtype=torch.float64)
            batch['text_views'] = tokenizer([f'view {i}' for i in range(2 * n)]).view(n, 2, -1)
            loss = losses.CL2LLoss()(model(batch))['loss']
        else:
            loss = losses.CLIPLoss()(model(batch))['loss']
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-10), k


def test_logit_scale_and_bias_init_flags():
    import main as train
    args = train.parse_args(['--model', 'CLIP_TINYCNN_SIGLIP', '--logit-scale-init', '20',
                             '--logit-bias-init', '-5'])
    model = models.create_model_from_flags(args.model, args)
    assert torch.isclose(model.logit_scale.exp(), torch.tensor(20.0)) and float(model.logit_bias) == -5.0
    default = models.create_model('CLIP_TINYCNN_SIGLIP')
    assert torch.isclose(default.logit_scale.exp(), torch.tensor(10.0)) and float(default.logit_bias) == -10.0
    with pytest.raises(SystemExit):
        train.parse_args(['--model', 'CLIP_TINYCNN_CLIP', '--logit-bias-init', '-5'])


def test_tinycnn_pools_and_what_checkpoints_record():
    """The TinyCNN pools mean + max (main.py's default, recorded in the args) or the mean
    (`--image-pool avg`, and every checkpoint whose args predate the choice)."""
    import main as train
    image = torch.randn(3, 3, 64, 64)
    avg_model = models.create_model_from_flags('CLIP_TINYCNN_CLIP', {'image_pool': None})
    assert avg_model.visual.pool == 'avg'
    avg_max = models.create_model_from_flags('CLIP_TINYCNN_CLIP', {'image_pool': 'avg-max'})
    avg_max.load_state_dict(avg_model.state_dict())             # the same weights: no new parameters
    with torch.no_grad():
        maps = avg_model.visual.features(image)
        assert torch.equal(avg_model.visual(image), maps.mean(dim=(2, 3)))
        assert torch.equal(avg_max.visual(image), maps.mean(dim=(2, 3)) + maps.amax(dim=(2, 3)))
    assert train.parse_args([]).image_pool == 'avg-max'
    assert train.parse_args(['--image-pool', 'avg']).image_pool == 'avg'
    assert train.parse_args(['--model', 'CLIP_TINYVIT_CLIP']).image_pool is None
    with pytest.raises(ValueError, match='valid: avg, avg-max'):
        models.TinyCNN(pool='max')
