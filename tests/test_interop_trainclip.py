"""train-CLIP (Zasder3/train-CLIP) Lightning checkpoints: its CLIPWrapper (OpenAI's CLIP under
`model.`) and its CustomCLIPWrapper (an image encoder with a last linear layer, a Hugging Face
text encoder, an EMA teacher) import with train-CLIP's own embeddings; files whose pickles hold
objects are refused in one line with the way out."""
import copy
import json
import math

import open_clip
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import checkpoint
import interop
import towers
from test_interop import TOL, _randomize, _same_outputs
from test_interop_resnet import TINY_TEXT
from test_towers import bert  # noqa: F401  (the tiny-BERT fixture)


def _lightning(state, hparams=None):
    """A dict as Lightning's ModelCheckpoint writes it."""
    out = {'epoch': 31, 'global_step': 1234, 'pytorch-lightning_version': '1.9.5', 'state_dict': state,
           'loops': {'fit_loop': {'epoch_progress': {'current': {'completed': 31}}}}, 'callbacks': {},
           'optimizer_states': [{'state': {}, 'param_groups': [{'lr': 5e-4, 'params': [0]}]}],
           'lr_schedulers': [{'last_epoch': 1234}]}
    if hparams is not None:
        out['hyper_parameters'] = hparams
    return out


def test_clipwrapper_rn50_imports(tmp_path, tokenizer):
    """CLIPWrapper('RN50', ...): OpenAI's CLIP layout under `model.`."""
    cfg = json.loads(json.dumps(open_clip.get_model_config('RN50-quickgelu')))
    cfg['vision_cfg']['image_size'], cfg['text_cfg'] = 64, TINY_TEXT
    oc = _randomize(open_clip.CLIP(**cfg)).eval()
    torch.save(_lightning({'model.' + k: v for k, v in oc.state_dict().items()},
                          {'model_name': 'RN50', 'minibatch_size': 8}), tmp_path / 'epoch=31.ckpt')
    out = str(tmp_path / 'ours.pt')
    interop.main(['import', '--from', 'trainclip', '--checkpoint', str(tmp_path / 'epoch=31.ckpt'),
                  '--model', 'CLIP_RN50OAI_CLIP', '--out', out])
    _same_outputs(oc, checkpoint.load_model(out), tokenizer, 64)


class _Shell(nn.Module):
    """train-CLIP's CLIP after CustomCLIPWrapper swapped in its own `visual` and `transformer`:
    the rest (token embedding, ln_final, text projection) stays, unused, in the state dict."""

    def __init__(self, visual, transformer):
        super().__init__()
        self.visual, self.transformer = visual, transformer
        self.token_embedding = nn.Embedding(10, 8)
        self.positional_embedding = nn.Parameter(torch.randn(77, 8))
        self.ln_final = nn.LayerNorm(8)
        self.text_projection = nn.Parameter(torch.randn(8, 16))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))


class _CustomCLIPWrapper(nn.Module):
    def __init__(self, image_encoder, text_encoder):
        super().__init__()
        self.model = _Shell(image_encoder, text_encoder)
        self.sink_temp = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.teacher = copy.deepcopy(self.model)


def _custom_checkpoint(bert_paths, path, hparams=None):
    """train_finetune.py's recipe, small: torchvision resnet18 with fc -> Linear(512, width), a
    BERT (its own random weights, not the directory's)."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(3)
    image_encoder = torchvision.models.resnet18()
    text_encoder = BertModel(BertConfig.from_pretrained(bert_paths['dir']))
    image_encoder.fc = nn.Linear(512, text_encoder.config.hidden_size)
    wrapper = _randomize(_CustomCLIPWrapper(image_encoder, text_encoder), seed=4).eval()
    torch.save(_lightning(wrapper.state_dict(), hparams), path)
    return wrapper


def _train_clip_embeddings(wrapper, image, texts, bert_dir, avg_word_embs):
    """CustomCLIPWrapper.forward's normalised embeddings, as train-CLIP computes them."""
    from transformers import AutoTokenizer
    inputs = AutoTokenizer.from_pretrained(bert_dir)(texts, padding=True, truncation=True, return_tensors='pt')
    with torch.no_grad():
        out = wrapper.model.transformer(**inputs)
        if avg_word_embs:
            mask = inputs['attention_mask']
            text = torch.sum(out[0] * mask.unsqueeze(-1), dim=1) / torch.clamp(
                torch.sum(mask, dim=1, keepdims=True), min=1e-9)
        else:
            text = out[1]
        return F.normalize(wrapper.model.visual(image), dim=1), F.normalize(text, dim=1)


@pytest.mark.parametrize('pooling', ['mean', 'pooler'])
def test_custom_clipwrapper_maps_onto_image_and_text_towers(pooling, tmp_path, bert):  # noqa: F811
    hparams = {'avg_word_embs': True} if pooling == 'mean' else None           # else: --text-pooling
    wrapper = _custom_checkpoint(bert, tmp_path / 'last.ckpt', hparams)
    out = str(tmp_path / 'ours.pt')
    interop.main(['import', '--from', 'trainclip', '--checkpoint', str(tmp_path / 'last.ckpt'),
                  '--model', 'CLIP_R50_CLIP', '--image-tower', 'resnet18', '--text-tower', bert['dir'],
                  '--out', out] + ([] if hparams else ['--text-pooling', pooling]))
    ckpt = checkpoint.load_checkpoint(out)
    assert ckpt['args']['text_pooling'] == pooling and ckpt['args']['image_proj_bias'] is True
    ours = checkpoint.load_model(ckpt)
    texts = ['a red circle', 'two small blue squares on grey', 'x']
    torch.manual_seed(5)
    image = torch.randn(3, 3, 64, 64)
    ref_image, ref_text = _train_clip_embeddings(wrapper, image, texts, bert['dir'], pooling == 'mean')
    with torch.no_grad():
        di = (ours.encode_image(image) - ref_image).abs().max()
        dt = (ours.encode_text(towers.tokenizer_for(ckpt['args'])(texts)) - ref_text).abs().max()
    assert di <= TOL and dt <= TOL, (float(di), float(dt))
    assert torch.equal(ours.logit_scale, wrapper.model.logit_scale.detach())


def test_custom_clipwrapper_needs_its_towers_named(tmp_path, bert, capsys):  # noqa: F811
    _custom_checkpoint(bert, tmp_path / 'last.ckpt')
    base = ['import', '--from', 'trainclip', '--checkpoint', str(tmp_path / 'last.ckpt'), '--model', 'CLIP_R50_CLIP',
            '--image-tower', 'resnet18', '--out', str(tmp_path / 'o.pt')]
    for extra, fragment in [([], 'pass --text-tower DIR'),
                            (['--text-tower', bert['dir']], 'pass --text-pooling mean'),
                            (['--text-tower', bert['dir'], '--text-pooling', 'mean', '--image-tower', 'resnet34'],
                             'does not fit')]:
        with pytest.raises(SystemExit) as e:
            interop.main(base + extra)
        message = str(e.value.code)
        assert message.startswith('interop.py import: error: ') and fragment in message and '\n' not in message
    assert not (tmp_path / 'o.pt').exists()


class _Hparams:                                      # what save_hyperparameters may pickle
    lr = 5e-4


def test_lightning_file_with_pickled_objects_is_refused_with_the_way_out(tmp_path):
    torch.save(_lightning({'model.logit_scale': torch.zeros(())}, {'config': _Hparams()}), tmp_path / 'h.ckpt')
    with pytest.raises(SystemExit) as e:
        interop.main(['import', '--from', 'trainclip', '--checkpoint', str(tmp_path / 'h.ckpt'),
                      '--model', 'CLIP_RN50OAI_CLIP', '--out', str(tmp_path / 'o.pt')])
    message = str(e.value.code)
    assert 'weights_only' in message and "torch.save({'state_dict': c['state_dict']}" in message
    assert '\n' not in message
    torch.save(_lightning({'encoder.weight': torch.zeros(2)}), tmp_path / 'other.ckpt')
    with pytest.raises(SystemExit, match="no 'model.' entries"):
        interop.main(['import', '--from', 'trainclip', '--checkpoint', str(tmp_path / 'other.ckpt'),
                      '--model', 'CLIP_RN50OAI_CLIP', '--out', str(tmp_path / 'o.pt')])
