"""The pooled-ViT and CLIPA parts of the OpenCLIP mapping (interop_openclip.py): OpenCLIP's image
pooling options (pool_type, final_ln_after_pool, attentional_pool) as our --image-pool, the
final LayerNorm / attention-pool keys both ways, and OpenCLIP's text-tower options of its
`ViT-*-CLIPA` configs (hf_tokenizer_name, tokenizer_kwargs, no_causal_mask, pool_type 'last',
vocab_size) as our --text-tokenizer / --text-mask / --text-pooling / --text-vocab-size.
docs/interop.md says what maps and what is refused."""
import os
import shutil

import torch

import clipa
import models

CLIP_BPE_VOCAB = models.TextCfg.vocab_size
_ATTN_POOL_KEYS = ('attn.in_proj_weight', 'attn.q_proj_weight', 'attn.k_proj_weight', 'attn.v_proj_weight',
                   'attn.in_proj_bias', 'attn.out_proj.weight', 'attn.out_proj.bias',
                   'ln_q.weight', 'ln_q.bias', 'ln_k.weight', 'ln_k.bias')


# ----------------------------------------------------------------------------- image pooling

def openclip_pool(v):
    """(pool, heads) of an OpenCLIP CLIPVisionCfg, in clipa.IMAGE_POOLS terms, or ValueError."""
    if v.attentional_pool:
        if isinstance(v.attentional_pool, str):
            raise ValueError(f"OpenCLIP ViT with attentional_pool={v.attentional_pool!r}: OpenCLIP's own "
                             f"image features are then [B, 1, D] (work in progress upstream); only "
                             f"attentional_pool true maps (--image-pool attn)")
        if v.pool_type != 'tok':
            raise ValueError(f"OpenCLIP ViT with attentional_pool and pool_type={v.pool_type!r}: ours keeps the "
                             f"first query (pool_type 'tok', OpenCLIP's default)")
        return 'attn', v.attn_pooler_heads
    if v.pool_type == 'tok':        # LayerNorm per token: before or after taking token 0 is the same
        return 'token', None
    if v.pool_type == 'avg':
        return ('avg' if v.final_ln_after_pool else 'norm-avg'), None
    raise ValueError(f"OpenCLIP ViT with pool_type={v.pool_type!r}: its image features are then every "
                     f"token, not one vector")


def tower_pool(tower):
    """(pool, heads) of our timm ViT, or ValueError naming what OpenCLIP cannot express."""
    pool = clipa.image_pool(tower)
    if pool is None:
        raise ValueError(f"this timm ViT pools with global_pool={tower.global_pool!r}"
                         f"{' and an attention pool' if tower.attn_pool is not None else ''}; OpenCLIP's ViT "
                         f"pools {', '.join(clipa.IMAGE_POOLS)} (--image-pool)")
    return pool


def pool_flags(want, preset):
    """The --image-pool / --image-pool-heads flags that give `preset` the pooling of `want`
    (an openclip_vit_spec), and the preset with them."""
    flags = {}
    if want['pool'] != (preset.pool or 'token'):
        flags['image_pool'] = want['pool']
    heads = want['pool_heads'] or preset.pool_heads
    if want['pool'] == 'attn' and heads != preset.pool_heads:
        flags['image_pool_heads'] = heads
    from dataclasses import replace
    return flags, replace(preset, pool=want['pool'], pool_heads=heads)


def find_preset(want, image_size):
    """Names of our ViT presets whose tower is `want` (an openclip_vit_spec) but for the pooling."""
    from interop_openclip import timm_vit_spec
    found = []
    for name, cfg in models.BACKBONES.items():
        if not cfg.takes_img_size or not cfg.timm_name:
            continue
        with torch.device('meta'):
            tower = models.build_image_tower(cfg, image_size)
        try:
            have = timm_vit_spec(tower)
        except ValueError:
            continue
        if all(have[k] == want[k] for k in want if k not in ('pool', 'pool_heads')):
            found.append(name)
    return found


def head_keys(tower):
    """timm key of OpenCLIP's ln_post, and the attention-pool keys both sides share."""
    pool, _ = tower_pool(tower)
    if pool == 'attn':
        own = set(tower.attn_pool.state_dict())
        return 'attn_pool.ln_post', [f'attn_pool.{k}' for k in _ATTN_POOL_KEYS if k in own]
    return ('fc_norm' if pool == 'avg' else 'norm'), []


def head_from_openclip(oc, tower):
    """OpenCLIP's ln_post (+ attention pool, first query) -> timm keys of `tower`."""
    ln, shared = head_keys(tower)
    out = {f'{ln}.weight': oc['ln_post.weight'], f'{ln}.bias': oc['ln_post.bias']}
    out.update({k: oc[k] for k in shared})
    if shared:
        out['attn_pool.query'] = oc['attn_pool.query'][:1]
    return out


def head_to_openclip(tower_sd, tower):
    ln, shared = head_keys(tower)
    out = {'ln_post.weight': tower_sd[f'{ln}.weight'], 'ln_post.bias': tower_sd[f'{ln}.bias']}
    out.update({k: tower_sd[k] for k in shared + (['attn_pool.query'] if shared else [])})
    return out


def openclip_pool_cfg(pool, heads):
    """OpenCLIP vision_cfg entries for our pool."""
    if pool == 'attn':
        return {'attentional_pool': True, 'attn_pooler_queries': 1, 'attn_pooler_heads': heads}
    if pool == 'token':
        return {}
    return {'pool_type': 'avg', 'final_ln_after_pool': pool == 'avg'}


# ----------------------------------------------------------------------------- text tower

def text_options(t):
    """Our text-tower options (mask, pool, vocab_size, hf tokenizer name) of an OpenCLIP
    CLIPTextCfg, or ValueError."""
    if t.pool_type not in ('argmax', 'last'):
        raise ValueError(f"OpenCLIP text tower with pool_type={t.pool_type!r}: ours pools argmax (EOT) or last")
    if t.tokenizer_mode:
        raise ValueError(f"OpenCLIP text tower with tokenizer_mode={t.tokenizer_mode!r}: ours tokenizes as "
                         f"OpenCLIP's HFTokenizer in its standard mode")
    kwargs = t.tokenizer_kwargs or {}
    if t.hf_tokenizer_name:
        if kwargs != {'strip_sep_token': True}:
            raise ValueError(f"OpenCLIP tokenizer_kwargs={kwargs}: ours reads a --text-tokenizer as CLIPA's "
                             f"configs do ({{'strip_sep_token': True}})")
        if t.pool_type == 'argmax':
            raise ValueError(f"OpenCLIP text tower pooling the top token id of the {t.hf_tokenizer_name} "
                             f"vocabulary (pool_type 'argmax'): ours pools that only on the CLIP BPE")
    elif kwargs or t.vocab_size != CLIP_BPE_VOCAB:
        raise ValueError(f"OpenCLIP text tower with vocab_size {t.vocab_size}, tokenizer_kwargs {kwargs} and no "
                         f"hf_tokenizer_name: ours reads the CLIP BPE ({CLIP_BPE_VOCAB} tokens) as it is")
    return {'mask': 'none' if t.no_causal_mask else 'causal', 'pool': 'eot' if t.pool_type == 'argmax' else 'last',
            'vocab_size': t.vocab_size, 'hf_tokenizer': t.hf_tokenizer_name or ''}


def text_flags(t, preset_text, tokenizer_dir):
    """create_model / main.py flags giving `preset_text` the options of OpenCLIP's `t`."""
    want = text_options(t)
    flags = {}
    for key, flag in (('mask', 'text_mask'), ('pool', 'text_pooling'), ('vocab_size', 'text_vocab_size')):
        if want[key] != getattr(preset_text, key):
            flags[flag] = want[key]
    if want['hf_tokenizer']:
        if not tokenizer_dir:
            raise ValueError(f"this text tower reads the {want['hf_tokenizer']} vocabulary: pass "
                             f"--text-tokenizer DIR, a local copy of its tokenizer (nothing is downloaded)")
        clipa.check_tokenizer_dir(tokenizer_dir)
        flags['text_tokenizer'] = os.path.abspath(tokenizer_dir)
    elif tokenizer_dir:
        raise ValueError("--text-tokenizer: this OpenCLIP text tower reads the CLIP BPE (no hf_tokenizer_name)")
    return flags


def text_differences(model, t):
    want, c = text_options(t), model.text_cfg
    return [f"{k} {want[k]} (OpenCLIP) vs {getattr(c, k)} (ours)" for k in ('mask', 'pool', 'vocab_size')
            if want[k] != getattr(c, k)]


def export_text_cfg(text_cfg, tokenizer_dir):
    """OpenCLIP text_cfg entries for our text options; a --text-tokenizer model's tokenizer is
    named by its hf_tokenizer_name (CLIPA: bert-base-uncased) or, without one, the export directory
    (write_tokenizer copies the files there; local-dir: reads them there either way)."""
    out = {}
    if text_cfg.mask == 'none':
        out['no_causal_mask'] = True
    if text_cfg.pool == 'last':
        out['pool_type'] = 'last'
    if tokenizer_dir:
        out.update(hf_tokenizer_name=text_cfg.hf_tokenizer or '.', tokenizer_kwargs={'strip_sep_token': True})
    elif text_cfg.hf_tokenizer or text_cfg.vocab_size != CLIP_BPE_VOCAB:
        raise ValueError(f"the checkpoint names no --text-tokenizer for its {text_cfg.vocab_size}-token vocabulary")
    return out


def write_tokenizer(cfg, tokenizer_dir, out_dir):
    """Copy the tokenizer files into the export directory (OpenCLIP's local-dir: reads them
    there); an unnamed one is named by the directory's absolute path."""
    import towers
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(tokenizer_dir):
        if name in towers.TOKENIZER_FILES or name in ('tokenizer_config.json', 'special_tokens_map.json'):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    if cfg['text_cfg'].get('hf_tokenizer_name') == '.':
        cfg['text_cfg']['hf_tokenizer_name'] = os.path.abspath(out_dir)


FINETUNE_FLAGS = ('image_pool', 'image_pool_heads', 'text_tokenizer', 'text_mask', 'text_pooling', 'text_vocab_size')


def finetune_note(flags):
    """The main.py flags a --finetune of an import needs (main.py builds from its own flags)."""
    given = [f"--{k.replace('_', '-')} {flags[k]}" for k in FINETUNE_FLAGS if k in flags]
    return (f"fine-tune with main.py --finetune ... {' '.join(given)} (main.py builds its model from "
            f"its flags; eval_zeroshot.py reads them from the checkpoint)") if given else None
