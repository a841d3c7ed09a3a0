"""train-CLIP (github.com/Zasder3/train-CLIP) Lightning checkpoints in interop.py. Its
`CLIPWrapper` keeps OpenAI's CLIP (RN or ViT config) under `model.`: the OpenAI route reads it.
Its `CustomCLIPWrapper` keeps an image encoder whose last layer maps to the embedding (e.g.
torchvision's resnet50 with `fc` = Linear(2048, 768)) under `model.visual.`, a Hugging Face
encoder under `model.transformer.` whose pooled output is the text embedding (no projection),
an EMA `teacher.` copy and the Sinkhorn temperature `sink_temp`: it maps onto our image tower
(--image-tower, classifier -> biased image projection) and --text-tower (identity text
projection). docs/interop.md says what maps and what is refused."""
from dataclasses import replace

import torch

import models
import towers

UNTRUSTED_HINT = ("train-CLIP checkpoints are Lightning files, whose hyper_parameters may hold pickled "
                  "objects; if you trust the file, keep its weights only: python -c \"import torch; "
                  "c = torch.load('IN.ckpt', weights_only=False); torch.save({'state_dict': c['state_dict']}, "
                  "'OUT.ckpt')\" and import OUT.ckpt")
TOWER_FLAGS = ('image_tower', 'text_tower', 'text_pooling')      # interop.py import's, in custom_flags' order
_CLIP_LEFTOVERS = ('token_embedding.', 'positional_embedding', 'ln_final.', 'text_projection')


def split_state(state):
    """-> ('clip', OpenAI-layout state) for a CLIPWrapper, ('custom', state) for a
    CustomCLIPWrapper (prefixes kept), from a Lightning state_dict."""
    if not any(k.startswith('model.') for k in state):
        raise ValueError("not a train-CLIP checkpoint: its state_dict has no 'model.' entries "
                         "(CLIPWrapper / CustomCLIPWrapper keep their CLIP model there)")
    if any(k.startswith('model.transformer.resblocks.') for k in state):
        return 'clip', {k[len('model.'):]: v for k, v in state.items() if k.startswith('model.')}
    return 'custom', state


def custom_flags(name, state, image_tower, text_tower, text_pooling, hparams):
    """create_model flags of a CustomCLIPWrapper checkpoint -> (flags, notes)."""
    if not text_tower:
        raise ValueError("a CustomCLIPWrapper checkpoint holds a Hugging Face text encoder: pass --text-tower "
                         "DIR (its config.json and tokenizer files; the weights come from the checkpoint)")
    avg = (hparams or {}).get('avg_word_embs')
    pooling = text_pooling or {True: 'mean', False: 'pooler'}.get(avg)
    if pooling is None:
        raise ValueError("pass --text-pooling mean (train-CLIP's avg_word_embs=True, as train_finetune.py) "
                         "or pooler (its default): the checkpoint does not say which it trained with")
    if pooling not in ('mean', 'pooler'):
        raise ValueError(f"--text-pooling {pooling}: train-CLIP pools with mean (avg_word_embs) or pooler")
    flags = {'text_tower': text_tower, 'text_pooling': pooling, 'clip_proj_type': 'linear',
             'image_proj_bias': True}
    if image_tower:
        flags['image_tower'] = image_tower
    cfg = models.BACKBONES.get(models.parse_model_name(name)[1])
    if image_tower:
        cfg = replace(cfg, **towers.timm_backbone_fields(image_tower))
    with torch.device('meta'):                          # shapes only: which classifier, how wide
        tower = models.build_image_tower(cfg, cfg.image_size)
    classifier = _classifier(tower, state)
    width = state['model.transformer.' + _first_embedding(state)].shape[1]
    flags['embed_dim'] = (state[f'model.visual.{classifier}.weight'].shape[0] if classifier
                          else tower.num_features)
    if flags['embed_dim'] != width:
        raise ValueError(f"image embedding {flags['embed_dim']} vs text encoder width {width}: train-CLIP "
                         f"compares them directly, so they must be equal")
    flags['image_size'] = cfg.image_size
    return flags, [f"train-CLIP CustomCLIPWrapper: text pooling {pooling}; image tower "
                   f"{cfg.timm_name}" + (f", its {classifier} as the image projection"
                                                        if classifier else '')]


def _first_embedding(state):
    names = [k[len('model.transformer.'):] for k in state
             if k.startswith('model.transformer.') and k.endswith('word_embeddings.weight')]
    if not names:
        raise ValueError("model.transformer.* has no word_embeddings.weight: not a Hugging Face text encoder")
    return names[0]


def _classifier(tower, state):
    """The image encoder's last layer in the checkpoint (timm's classifier name for the tower,
    e.g. fc), or None when the encoder has none."""
    names = getattr(tower, 'pretrained_cfg', {}).get('classifier') or ()
    return next((n for n in ((names,) if isinstance(names, str) else names)
                 if f'model.visual.{n}.weight' in state), None)


def load_custom(model, state):
    """Load a CustomCLIPWrapper state dict into our model (built from custom_flags) -> notes."""
    from interop_openclip import _load
    classifier = _classifier(model.visual, state)
    head = f'model.visual.{classifier}.' if classifier else None
    new = {'visual.' + k[len('model.visual.'):]: v for k, v in state.items()
           if k.startswith('model.visual.') and not (head and k.startswith(head))}
    new.update({'text_tower.model.' + k[len('model.transformer.'):]: v for k, v in state.items()
                if k.startswith('model.transformer.')})
    for k in [k for k in new if k not in model.state_dict() and k.endswith('position_ids')]:
        del new[k]                          # a constant buffer older transformers saved
    n = model.embed_dim
    new['image_projection.weight'] = state[head + 'weight'] if head else torch.eye(n)
    new['image_projection.bias'] = state.get(head + 'bias', torch.zeros(n)) if head else torch.zeros(n)
    new['text_projection'] = torch.eye(n)    # train-CLIP uses the encoder's output as it is
    new['logit_scale'] = state['model.logit_scale'].reshape(())
    unused = ('teacher.', 'sink_temp') + tuple('model.' + p for p in _CLIP_LEFTOVERS)
    left = sorted(k for k in state if not k.startswith(('model.visual.', 'model.transformer.', 'model.logit_scale'))
                  and not k.startswith(unused))
    if left:
        raise ValueError(f"{len(left)} checkpoint tensors have no place in our model: {left[:6]}")
    notes = _load(model, new)
    dropped = sorted({k.split('.')[0] if k.startswith(('teacher.', 'sink_temp')) else k.split('.')[1]
                      for k in state if k.startswith(unused)})
    if dropped:
        notes.append(f"not imported (train-CLIP's EMA teacher, Sinkhorn temperature and the unused parts "
                     f"of its CLIP shell): {', '.join(dropped)}")
    return notes
