"""OpenCLIP's pooled towers: ViT image pooling other than the class token (`--image-pool`: the
mean of the patch tokens as in CLIPA's GAP ViTs, or OpenCLIP's attention pool) and the text-tower
options of OpenCLIP's `ViT-*-CLIPA` configs (`--text-tokenizer`: a local Hugging Face tokenizer
such as bert-base-uncased's WordPiece vocabulary, `--text-mask none`, `--text-pooling last`,
`--text-vocab-size`).

    python main.py --model CLIP_VITL14CLIPA_CLIP --text-tokenizer ./bert-base-uncased ...
    python main.py --model CLIP_VITB16_CLIP --image-pool avg ...

The pools are timm's VisionTransformer options where they are OpenCLIP's function exactly
(`avg` = global_pool 'avg' + fc_norm: the mean of the patch tokens, then the final LayerNorm,
OpenCLIP's pool_type 'avg' with final_ln_after_pool; `norm-avg` = fc_norm off: LayerNorm, then
the mean). timm's attention pool ('map') is another function (it drops the class token and adds
an MLP), so OpenCLIP's AttentionalPooler is written here once (`attn`). docs/zoo.md lists the
presets, docs/interop.md what maps to OpenCLIP.
"""
import os

import torch
import torch.nn as nn

IMAGE_POOLS = ('token', 'avg', 'norm-avg', 'attn')
CNN_POOLS = ('avg', 'avg-max')      # a builder tower's own poolings (models.TinyCNN.POOLS)
TEXT_MASKS = ('causal', 'none')
TEXT_POOLS = ('eot', 'last')        # the built-in tower's --text-pooling choices
_TIMM_POOL_KWARGS = {'token': {'global_pool': 'token'},
                     'avg': {'global_pool': 'avg', 'fc_norm': True},
                     'norm-avg': {'global_pool': 'avg', 'fc_norm': False},
                     'attn': {'global_pool': '', 'final_norm': False, 'pool_include_prefix': True}}


# ----------------------------------------------------------------------------- flags

def add_args(parser):
    g = parser.add_argument_group('pooled towers and CLIPA text (docs/zoo.md)')
    g.add_argument('--image-pool', choices=IMAGE_POOLS + CNN_POOLS[1:], default=None,
                   help="ViTs: the image embedding: token (class token; the VIT* presets' default), avg "
                        "(mean of the patch tokens, then LayerNorm: CLIPA, the *CLIPA presets' default), "
                        "norm-avg (LayerNorm, then the mean), attn (OpenCLIP's attention pool); "
                        "the TINYCNN: avg (mean of its last feature map) or avg-max (mean + max; default)")
    g.add_argument('--image-pool-heads', type=int, default=None,
                   help="--image-pool attn: attention heads of the pool (default 8, OpenCLIP's attn_pooler_heads)")
    g.add_argument('--text-tokenizer', default=None, metavar='DIR',
                   help='a local Hugging Face tokenizer directory for the built-in text transformer, '
                        "tokenizing as OpenCLIP's HFTokenizer with CLIPA's strip_sep_token (CLIPA: "
                        'bert-base-uncased, vocab.txt); default: the CLIP BPE')
    g.add_argument('--text-mask', choices=TEXT_MASKS, default=None,
                   help='built-in text tower attention: causal (default) or none (CLIPA: bidirectional)')
    g.add_argument('--text-vocab-size', type=int, default=None,
                   help='rows of the token embedding (default: the preset; 49408 for the CLIP BPE, '
                        "the tokenizer's size with --text-tokenizer; CLIPA: 32000)")
    return g


def resolve_args(args, preset):
    """Check the pool and text-tower flags against `preset` (a models.BackboneCfg) and fill
    their defaults (ValueError -> one-line parser error)."""
    if args.image_pool is None and not args.image_tower and preset.train_pool:
        args.image_pool = preset.train_pool     # recorded in the checkpoint's args
    pool = args.image_pool or ('' if args.image_tower else preset.pool)
    if args.image_pool:
        check_pool(args.image_tower or preset, args.image_pool, '--image-pool')
    if args.image_pool_heads is not None and pool != 'attn':
        raise ValueError("--image-pool-heads goes with --image-pool attn")
    if args.image_pool_heads is not None and args.image_pool_heads < 1:
        raise ValueError(f"--image-pool-heads must be > 0, got {args.image_pool_heads}")
    dim, heads = args.embed_dim or preset.embed_dim, args.image_pool_heads or preset.pool_heads
    if pool == 'attn' and dim % heads:
        raise ValueError(f"--image-pool attn: the embed dim {dim} (--embed-dim) is not divisible by "
                         f"{heads} pool heads (--image-pool-heads)")
    text = preset.text
    if args.text_tower:
        bad = [f for f in ('text_tokenizer', 'text_mask', 'text_vocab_size') if getattr(args, f) is not None]
        if bad:
            raise ValueError(f"--{bad[0].replace('_', '-')} configures the built-in text tower, "
                             f"not a --text-tower")
        return
    if args.text_tokenizer:
        check_tokenizer_dir(args.text_tokenizer)
        if (args.text_pooling or text.pool) == 'eot':
            raise ValueError("--text-tokenizer: eot pooling finds the CLIP BPE's end token (the highest id); "
                             "another vocabulary's is not that: use --text-pooling last")
        if getattr(args, 'text_reduction', 'none') != 'none':
            raise ValueError("--text-reduction works on the CLIP BPE tokens, not a --text-tokenizer's")
        import text as text_module
        size = text_module.LocalHFTokenizer(args.text_tokenizer).vocab_size
        if args.text_vocab_size is None and not text.hf_tokenizer:
            args.text_vocab_size = size
    else:
        size = text.vocab_size                  # the CLIP BPE (a CLIPA preset stops in main())
    rows = text.vocab_size if args.text_vocab_size is None else args.text_vocab_size
    if rows < 1:
        raise ValueError(f"--text-vocab-size must be > 0, got {rows}")
    if rows < size:
        raise ValueError(f"--text-vocab-size {rows}: the token embedding needs a row for each of the "
                         f"tokenizer's {size} tokens")


def missing_tokenizer(flags):
    """Why the text tower of a run's flags (main.py's, or a checkpoint's `args`) has no tokenizer
    (a CLIPA preset without --text-tokenizer), or None."""
    import models
    if flags.get('text_tower') or flags.get('text_tokenizer') or not flags.get('model'):
        return None
    name = models.BACKBONES.get(models.parse_model_name(flags['model'])[1]).text.hf_tokenizer
    return (f"{flags['model']}'s text tower reads the {name} vocabulary: pass --text-tokenizer DIR, a local "
            f"copy of its tokenizer (nothing is downloaded)") if name else None


def check_tokenizer_dir(path):
    import towers
    if not os.path.isdir(path):
        raise ValueError(f"--text-tokenizer {path!r}: not a directory (a local Hugging Face tokenizer, "
                         f"e.g. a copy of bert-base-uncased with its vocab.txt)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in towers.TOKENIZER_FILES):
        raise ValueError(f"--text-tokenizer {path}: no tokenizer files "
                         f"(one of {', '.join(towers.TOKENIZER_FILES)})")


def check_pool(tower, pool, flag):
    """`pool` if `tower` (a timm model name or a models.BackboneCfg) takes it, else ValueError: a
    builder tower with its own `pools` (the TinyCNN) takes those, a timm ViT the IMAGE_POOLS."""
    own = () if isinstance(tower, str) else tower.pools
    if own and pool not in own:
        raise ValueError(f"{flag} {pool}: the {tower.tower_name} tower pools {' or '.join(own)}")
    if not own:
        check_vit(tower, flag)
        if pool not in IMAGE_POOLS:
            raise ValueError(f"{flag} {pool} pools a CNN's feature map (the TINYCNN); a ViT pools "
                             f"{', '.join(IMAGE_POOLS)}")
    return pool


def check_vit(tower, flag):
    """ValueError unless `tower` (a timm model name or a models.BackboneCfg) is a timm
    VisionTransformer, whose pooling the pools replace."""
    import timm
    name = tower if isinstance(tower, str) else tower.timm_name
    module = timm.models.model_entrypoint(name).__module__ if name and timm.is_model(name) else ''
    if module != 'timm.models.vision_transformer' or (not isinstance(tower, str) and not tower.takes_img_size):
        what = name or 'this backbone'
        raise ValueError(f"{flag} pools the tokens of a ViT; {what} is not a timm VisionTransformer "
                         f"(use a VIT* backbone or an --image-tower vit_*)")


# ----------------------------------------------------------------------------- image towers

def timm_pool_kwargs(pool):
    if pool not in _TIMM_POOL_KWARGS:
        raise ValueError(f"unknown image pool {pool!r}; valid: {', '.join(IMAGE_POOLS)}")
    return dict(_TIMM_POOL_KWARGS[pool])


class AttentionalPool(nn.Module):
    """OpenCLIP's AttentionalPooler with pool_type 'tok' (the CLIP setup of its ViT
    `attentional_pool`): a learned query attends over all tokens (class token included), the
    result is LayerNorm'ed (OpenCLIP's ln_post). OpenCLIP keeps 256 queries by default; only
    the first reaches the embedding (queries do not interact), so one is kept.
    [B, N, width] -> [B, dim]."""

    def __init__(self, dim, width, heads=8, eps=1e-5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"--image-pool attn: the embed dim {dim} is not divisible by "
                             f"{heads} pool heads (--image-pool-heads)")
        self.query = nn.Parameter(torch.randn(1, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=width, vdim=width, batch_first=True)
        self.ln_q = nn.LayerNorm(dim)           # OpenCLIP builds both with the default eps
        self.ln_k = nn.LayerNorm(width)
        self.ln_post = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.ln_post(self.attn(q, x, x, need_weights=False)[0][:, 0])


def attach_attention_pool(tower, dim, heads):
    """timm's ViT built with timm_pool_kwargs('attn') pools through timm's own `attn_pool`
    slot (prefix tokens included); its feature width becomes `dim` (OpenCLIP: the embed dim)."""
    eps = tower.blocks[0].norm1.eps
    tower.attn_pool = AttentionalPool(dim, tower.embed_dim, heads, eps)
    tower.num_features = tower.head_hidden_size = dim
    return tower


def image_pool(tower):
    """(pool, heads) of a timm ViT built here, or None for a pooling none of IMAGE_POOLS is."""
    if isinstance(getattr(tower, 'attn_pool', None), AttentionalPool):
        return 'attn', tower.attn_pool.attn.num_heads
    if getattr(tower, 'attn_pool', None) is not None:
        return None
    fc_norm = not isinstance(tower.fc_norm, nn.Identity)
    norm = not isinstance(tower.norm, nn.Identity)
    return {('token', False, True): ('token', None), ('avg', True, False): ('avg', None),
            ('avg', False, True): ('norm-avg', None)}.get((tower.global_pool, fc_norm, norm))
