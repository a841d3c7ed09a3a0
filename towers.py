"""Pretrained and locked towers: any timm model as the image tower (`--image-tower`) with local
weights (`--image-pretrained`), a Hugging Face encoder as the text tower (`--text-tower`, with
its own tokenizer), and locking either tower (`--lock-image`, `--lock-text`), in the spirit of
OpenCLIP's `--lock-image` / `--lock-text` and train-CLIP's CustomCLIPWrapper.

    python main.py --model CLIP_TINYCNN_CLIP --image-tower resnet18 --image-pretrained r18.safetensors \
        --text-tower ./bert-mini --lock-image --lock-image-unlocked-groups 1 --lock-text

Nothing is downloaded: weights, configs and tokenizer files are read from local paths only.
docs/training-features.md, section "Pretrained and locked towers", says what is tested.
"""
import json
import os
import sys

import torch
import torch.nn as nn

PAD = -1                      # token id of padding in HFTokenizer output (-> attention mask)
POOLINGS = ('mean', 'cls', 'pooler')
BUILTIN_POOLINGS = ('eot', 'last')     # the built-in text transformer's (clipa.TEXT_POOLS)
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'vocab.json', 'spiece.model',
                   'sentencepiece.bpe.model', 'tokenizer.model')
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json',
                'pytorch_model.bin.index.json')


# ----------------------------------------------------------------------------- flags

def add_args(parser):
    """The tower flags, one argument group of main.py's parser."""
    g = parser.add_argument_group('pretrained and locked towers (docs/training-features.md)')
    g.add_argument('--image-tower', default=None, metavar='TIMM_NAME',
                   help='any timm model as the image tower, replacing the <backbone> of --model '
                        '(which still sets the text tower, embed dim and head sizes), e.g. resnet18')
    g.add_argument('--image-proj-bias', action='store_true', default=None,
                   help='a bias in the linear image projection (train-CLIP CustomCLIPWrapper imports '
                        'have one, its image encoder\'s last layer; the RN*OAI backbones always do)')
    g.add_argument('--image-pretrained', default=None, metavar='PATH',
                   help='image-tower weights: a timm/torch state dict (.pt/.pth/.bin, read with '
                        'weights_only=True) or .safetensors; keys must match exactly (classifier dropped)')
    g.add_argument('--text-tower', default=None, metavar='PATH',
                   help='Hugging Face encoder as the text tower: a local directory (config, weights, '
                        'tokenizer) or a config.json (random init; tokenizer files beside it)')
    g.add_argument('--text-pooling', choices=POOLINGS + BUILTIN_POOLINGS, default=None,
                   help='--text-tower pooling: mean over non-pad tokens (default), cls (first token) '
                        "or pooler (the model's pooler output, train-CLIP's default); the built-in "
                        'tower: eot (default) or last (the last position: CLIPA)')
    g.add_argument('--avg-word-embs', action='store_true',
                   help="train-CLIP's spelling of --text-pooling mean (mean of the output token embeddings)")
    g.add_argument('--lock-image', action='store_true',
                   help='freeze the image tower (no gradient, no optimizer state); projections stay trainable')
    g.add_argument('--lock-image-unlocked-groups', type=int, default=0, metavar='N',
                   help="with --lock-image: leave the last N layer groups trainable (timm's group_matcher)")
    g.add_argument('--lock-image-freeze-bn-stats', action='store_true',
                   help='with --lock-image: locked BatchNorm layers stay in eval mode (running stats frozen)')
    g.add_argument('--lock-text', action='store_true',
                   help='freeze the text tower (token/position embeddings, transformer, final norm)')
    g.add_argument('--lock-text-unlocked-layers', type=int, default=0, metavar='N',
                   help='with --lock-text: leave the last N transformer layers (and the final norm) trainable')
    return g


def resolve_args(args):
    """Check the tower flags before any work starts (ValueError -> one-line parser error) and
    fill their defaults: --image-size from the timm model, --text-pooling mean."""
    if args.image_tower:
        import timm
        if not timm.is_model(args.image_tower):
            close = timm.list_models(f'*{args.image_tower}*')[:8]
            raise ValueError(f"--image-tower {args.image_tower!r} is not a timm model" +
                             (f"; similar: {', '.join(close)}" if close else '; see timm.list_models()'))
        if args.image_size is None:
            args.image_size = native_image_size(args.image_tower)
    if args.image_pretrained and not os.path.isfile(args.image_pretrained):
        raise ValueError(f"--image-pretrained: no such file {args.image_pretrained!r}")
    _resolve_text_args(args)
    for lock, flag, value in [('lock_image', '--lock-image-unlocked-groups', args.lock_image_unlocked_groups),
                              ('lock_image', '--lock-image-freeze-bn-stats', args.lock_image_freeze_bn_stats),
                              ('lock_text', '--lock-text-unlocked-layers', args.lock_text_unlocked_layers)]:
        if value and not getattr(args, lock):
            raise ValueError(f"{flag} goes with --{lock.replace('_', '-')}")
    if args.lock_image_unlocked_groups < 0 or args.lock_text_unlocked_layers < 0:
        raise ValueError("--lock-image-unlocked-groups and --lock-text-unlocked-layers must be >= 0")


def _resolve_text_args(args):
    if args.avg_word_embs:
        if args.text_pooling not in (None, 'mean'):
            raise ValueError(f"--avg-word-embs is --text-pooling mean; it contradicts --text-pooling {args.text_pooling}")
        args.text_pooling = 'mean'
    if not args.text_tower:
        if args.text_pooling and args.text_pooling not in BUILTIN_POOLINGS:
            raise ValueError(f"--text-pooling {args.text_pooling} / --avg-word-embs go with --text-tower "
                             f"(the built-in text tower pools {' or '.join(BUILTIN_POOLINGS)})")
        return
    if args.text_pooling in BUILTIN_POOLINGS:
        raise ValueError(f"--text-pooling {args.text_pooling} is the built-in text tower's; "
                         f"a --text-tower pools {', '.join(POOLINGS)}")
    check_text_tower_path(args.text_tower)
    args.text_pooling = args.text_pooling or 'mean'
    builtin = [f for f in ('transformer_layers', 'transformer_width', 'transformer_heads')
               if getattr(args, f) is not None]
    if builtin:
        raise ValueError(f"--{builtin[0].replace('_', '-')} configures the built-in text tower; "
                         f"with --text-tower the Hugging Face config decides")
    if args.text_dropout_prob or args.text_drop_path_prob:
        raise ValueError("--text-dropout-prob / --text-drop-path-prob act on the built-in text tower; "
                         "a --text-tower uses its config's dropout")
    if getattr(args, 'text_reduction', 'none') != 'none':
        raise ValueError("--text-reduction works on the built-in tower's CLIP BPE tokens, not a --text-tower's")
    config = args.text_tower if not os.path.isdir(args.text_tower) else os.path.join(args.text_tower, 'config.json')
    try:
        with open(config) as f:
            max_len = json.load(f).get('max_position_embeddings')
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"--text-tower {args.text_tower}: unreadable config {config} ({e})") from None
    if max_len and args.context_length > max_len:
        raise ValueError(f"--context-length {args.context_length} exceeds the --text-tower's "
                         f"max_position_embeddings {max_len}")


def check_text_tower_path(path):
    """A directory needs config.json, weights and tokenizer files; a .json config file needs
    tokenizer files beside it. ValueError naming what is missing."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, 'config.json')):
            raise ValueError(f"--text-tower {path}: no config.json in the directory")
        if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES):
            raise ValueError(f"--text-tower {path}: no weights ({', '.join(WEIGHT_FILES[:2])}); "
                             f"for a random init pass the config file: --text-tower {os.path.join(path, 'config.json')}")
    elif not (os.path.isfile(path) and path.endswith('.json')):
        raise ValueError(f"--text-tower {path!r}: expected a Hugging Face model directory or a config .json file")
    directory = tower_dir(path)
    if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"--text-tower {path}: no tokenizer files in {directory} "
                         f"(one of {', '.join(TOKENIZER_FILES)})")


def tower_dir(path):
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


# ----------------------------------------------------------------------------- image tower

def native_image_size(timm_name):
    """The resolution timm's default pretrained config of `timm_name` expects (224 if none)."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(timm_name)
    return int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224


def timm_backbone_fields(timm_name):
    """models.BackboneCfg fields for an arbitrary timm model (--image-tower): fixed-input
    models (ViTs, Swin, ...) are built for the training resolution; the others run channels-last."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(timm_name)
    fixed = bool(cfg is not None and cfg.fixed_input_size)
    return dict(timm_name=timm_name, builder=None, timm_kwargs={}, no_stem_pool=False,
                takes_img_size=fixed, channels_last=not fixed, image_size=native_image_size(timm_name))


def read_state_dict(path):
    """{name: tensor} from a .safetensors file or a torch file read with weights_only=True;
    a wrapping checkpoint ('state_dict' / 'model' entry, 'module.' prefixes, or one of our own
    checkpoints' `visual.*` keys) is unwrapped."""
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:                      # unpicklable code, truncated file, not a state dict
        raise ValueError(f"--image-pretrained {path}: cannot read it as a state dict "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    for key in ('state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"--image-pretrained {path}: not a dict of tensors")
    state = {k.removeprefix('module.'): v for k, v in state.items()}
    if any(k.startswith('visual.') for k in state):                    # a main.py checkpoint
        state = {k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.')}
    return state


def adapt_to_tower(state, tower):
    """timm's own checkpoint filter of the tower's architecture (layout conversions, ViT position
    embeddings resampled to the training resolution), then the classifier dropped."""
    filter_fn = getattr(sys.modules.get(type(tower).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        state = filter_fn(state, tower)
    own = tower.state_dict()
    classifier = getattr(tower, 'pretrained_cfg', {}).get('classifier') or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {k: v for k, v in state.items()
            if k in own or not any(k.startswith(c + '.') for c in classifier)}


def load_image_pretrained(model, path):
    """Load `path` into model.visual (and a BYOL teacher's copy); ValueError listing missing,
    unexpected and mis-shaped keys unless they match exactly."""
    tower = model.visual
    state = adapt_to_tower(read_state_dict(path), tower)
    own = tower.state_dict()
    missing = [k for k in own if k not in state and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(items)} {what} (first: {', '.join(items[:3])})"
                 for what, items in (('missing', missing), ('unexpected', unexpected),
                                     ('with another shape (file vs model)', shapes)) if items]
        raise ValueError(f"--image-pretrained {path} does not fit the {type(tower).__name__} "
                         f"image tower: keys {'; '.join(parts)}")
    tower.load_state_dict(state)
    if getattr(model, 'teacher', None) is not None:
        model.teacher.visual.load_state_dict(tower.state_dict())
    return len(state)


def image_groups(tower):
    """[[parameter names of group 0], ..., [last group]] from timm's group_matcher (stem,
    blocks/stages, final norm); ValueError for towers without one (TinyCNN)."""
    if not hasattr(tower, 'group_matcher'):
        raise ValueError(f"--lock-image-unlocked-groups needs a timm image tower with group_matcher(), "
                         f"not {type(tower).__name__} (use --image-tower NAME)")
    from timm.models import group_parameters
    groups = group_parameters(tower, tower.group_matcher())
    return [list(groups[k]) for k in sorted(groups)]


def lock_image(model, unlocked_groups=0, freeze_bn_stats=False):
    """requires_grad=False for the image tower but its last `unlocked_groups` groups; with
    freeze_bn_stats, BatchNorm layers whose parameters are all locked stay in eval mode
    (CLIP.train keeps the modules named in `model.frozen_modules` in eval)."""
    tower = model.visual
    if unlocked_groups:
        groups = image_groups(tower)
        if unlocked_groups >= len(groups):
            raise ValueError(f"--lock-image-unlocked-groups {unlocked_groups}: the image tower has "
                             f"{len(groups)} groups; use fewer, or drop --lock-image")
        params = dict(tower.named_parameters())
        for names in groups[:len(groups) - unlocked_groups]:
            for name in names:
                params[name].requires_grad_(False)
    else:
        tower.requires_grad_(False)
    if freeze_bn_stats:
        frozen = [f'visual.{n}' for n, m in tower.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and _all_locked(m, unlocked_groups)]
        model.frozen_modules = sorted(set(getattr(model, 'frozen_modules', ())) | set(frozen))
        for name in frozen:
            model.get_submodule(name).eval()


def _all_locked(module, unlocked_groups):
    params = list(module.parameters())
    return all(not p.requires_grad for p in params) if params else unlocked_groups == 0


# ----------------------------------------------------------------------------- text tower

class HFTokenizer:
    """A Hugging Face tokenizer with text.Tokenizer's interface: list[str] -> LongTensor
    [N, context_length], truncated, right-padded with PAD (-1). HFTextTower turns PAD into the
    attention mask, so the mask is right even where the pad token is also a real token
    (CLIP's pad = EOT) or the tokenizer has none."""

    def __init__(self, path, context_length=77):
        check_text_tower_path(path)
        os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')     # loader workers fork
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(tower_dir(path), local_files_only=True)
        self.tokenizer.padding_side = 'right'
        if self.tokenizer.pad_token is None:    # GPT-style: any id will do, the mask decides
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.context_length = context_length
        self.vocab_size = len(self.tokenizer)

    def __call__(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(texts, padding='max_length', truncation=True,
                             max_length=self.context_length, return_attention_mask=True,
                             return_tensors='pt')
        return enc['input_ids'].long().masked_fill(enc['attention_mask'] == 0, PAD)   # [N, ctx]

    def decode(self, tokens):
        return self.tokenizer.decode([int(t) for t in tokens if int(t) != PAD],
                                     skip_special_tokens=True).strip()


class HFTextTower(nn.Module):
    """A Hugging Face encoder (AutoModel) from a local directory, or randomly initialised from a
    config .json, pooled to [B, hidden]: `mean` over non-pad tokens (train-CLIP's
    avg_word_embs), `cls` (first token) or `pooler` (the model's pooler output). Takes HFTokenizer
    tokens; trailing padding columns are dropped first (exact: padded keys are masked)."""

    def __init__(self, path, pooling='mean', context_length=77):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown text pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        check_text_tower_path(path)
        from transformers import AutoConfig, AutoModel
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()       # no "Loading weights" bar per model build
        if os.path.isdir(path):
            self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
        config = self.model.config
        if getattr(config, 'is_encoder_decoder', False):
            raise ValueError(f"--text-tower {path}: encoder-decoder models ({config.model_type}) are not supported")
        max_len = getattr(config, 'max_position_embeddings', None)
        if max_len and context_length > max_len:
            raise ValueError(f"--context-length {context_length} exceeds the text tower's "
                             f"max_position_embeddings {max_len}")
        self.pooling, self.context_length = pooling, context_length
        self.width, self.vocab_size = config.hidden_size, config.vocab_size
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        if pooling != 'pooler' and isinstance(getattr(self.model, 'pooler', None), nn.Module):
            self.model.pooler.requires_grad_(False)    # unused: no gradient, no optimizer state
        if pooling == 'pooler':
            with torch.no_grad():
                if self.model.eval()(input_ids=torch.tensor([[self.pad_id]])).get('pooler_output') is None:
                    raise ValueError(f"--text-pooling pooler: {type(self.model).__name__} has no pooler output")

    def forward(self, tokens):
        mask = tokens != PAD                                                # [B, L]
        length = max(1, int(mask.sum(dim=1).max()))
        mask = mask[:, :length]
        ids = tokens[:, :length].masked_fill(~mask, self.pad_id)
        out = self.model(input_ids=ids, attention_mask=mask.long())
        if self.pooling == 'pooler':
            return out.pooler_output                                        # [B, width]
        hidden = out.last_hidden_state                                      # [B, L, width]
        if self.pooling == 'cls':
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)                       # [B, L, 1]
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def set_grad_checkpointing(self, enable=True):
        if not self.model.supports_gradient_checkpointing:
            return
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        else:
            self.model.gradient_checkpointing_disable()

    def no_weight_decay(self):
        return {f'model.{n}.weight' for n, m in self.model.named_modules() if isinstance(m, nn.Embedding)}

    def layer_stack(self):
        """Name of the encoder's layer list: the longest nn.ModuleList (BERT: encoder.layer)."""
        lists = [(len(m), -i, n) for i, (n, m) in enumerate(self.model.named_modules())
                 if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise ValueError(f"--lock-text-unlocked-layers: no layer list found in {type(self.model).__name__}")
        return 'text_tower.model.' + max(lists)[2]


def text_groups(model):
    """The text tower's parameter names in groups [embeddings, layer 0, ..., layer L-1, final
    norm / pooler] (built-in tower: token + positional embedding, resblocks, ln_final)."""
    tower = getattr(model, 'text_tower', None)
    if tower is not None:
        stack = tower.layer_stack()
        named = [(f'text_tower.{n}', p) for n, p in tower.named_parameters()]
    else:
        stack = 'transformer.resblocks'
        named = [(n, p) for n, p in model.named_parameters()
                 if n.split('.')[0] in ('token_embedding', 'positional_embedding', 'transformer', 'ln_final')]
    num_layers = len(model.get_submodule(stack))
    groups = [[] for _ in range(num_layers + 2)]
    seen_layer = False
    for name, _ in named:
        if name.startswith(stack + '.'):
            groups[1 + int(name[len(stack) + 1:].split('.')[0])].append(name)
            seen_layer = True
        else:
            groups[-1 if seen_layer else 0].append(name)
    return groups


def lock_text(model, unlocked_layers=0):
    """requires_grad=False for the text tower but its last `unlocked_layers` layers and, when
    any layer is unlocked, what follows them (final norm / pooler). Projections stay trainable."""
    groups = text_groups(model)
    num_layers = len(groups) - 2
    if unlocked_layers > num_layers:
        raise ValueError(f"--lock-text-unlocked-layers {unlocked_layers}: the text tower has "
                         f"{num_layers} layers")
    keep = set() if unlocked_layers == 0 else set(range(len(groups) - 1 - unlocked_layers, len(groups)))
    params = dict(model.named_parameters())
    for i, names in enumerate(groups):
        if i not in keep:
            for name in names:
                params[name].requires_grad_(False)


# ----------------------------------------------------------------------------- main.py hooks

def tokenizer_for(flags):
    """The tokenizer of a run's text tower from its flags (a Namespace or a checkpoint's `args`):
    HFTokenizer with --text-tower, text.LocalHFTokenizer with --text-tokenizer, else the OpenAI
    CLIP BPE (text.Tokenizer)."""
    flags = flags if isinstance(flags, dict) else vars(flags)
    context_length = flags.get('context_length') or 77
    import clipa
    if clipa.missing_tokenizer(flags):
        raise ValueError(clipa.missing_tokenizer(flags))
    if flags.get('text_tower'):
        return HFTokenizer(flags['text_tower'], context_length)
    import text
    if flags.get('text_tokenizer'):                 # the built-in tower on another vocabulary (clipa.py)
        return text.LocalHFTokenizer(flags['text_tokenizer'], context_length)
    return text.Tokenizer(context_length)


def prepare(model, args):
    """After create_model: load --image-pretrained, apply the locks, print what happened.
    Errors exit with one line, as the parser's."""
    try:
        if args.image_tower:
            print(f"image tower: timm {args.image_tower} (--image-tower) replaces the {args.backbone} "
                  f"backbone of {args.model}; the preset still sets the text tower, embed dim and heads")
        if args.image_pretrained:
            n = load_image_pretrained(model, args.image_pretrained)
            print(f"image tower: {n} tensors loaded from {args.image_pretrained}")
        if args.lock_image:
            lock_image(model, args.lock_image_unlocked_groups, args.lock_image_freeze_bn_stats)
        if args.lock_text:
            lock_text(model, args.lock_text_unlocked_layers)
    except ValueError as e:
        raise SystemExit(f"main.py: error: {e}") from None
    if args.lock_image or args.lock_text:
        student = [p for n, p in model.named_parameters() if not n.startswith('teacher.')]
        trainable = sum(p.numel() for p in student if p.requires_grad)
        print(f"locked towers: {trainable / 1e6:.3f} M of {sum(p.numel() for p in student) / 1e6:.3f} M "
              f"parameters trainable" + (f"; BatchNorm stats frozen in {len(model.frozen_modules)} layers"
                                         if getattr(model, 'frozen_modules', None) else ''))
