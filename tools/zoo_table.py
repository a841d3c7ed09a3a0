"""Print the README's model-zoo tables: the backbones' image/text tower parameters and forward
GFLOPs per sample at 224 px (counted with torch.utils.flop_counter; a multiply-add is 2
FLOPs), or with --methods the method table, from the registry (methods.py; docs/zoo.md's copy is
checked by tests/test_readme.py).

    python tools/zoo_table.py
    python tools/zoo_table.py --methods
"""
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import methods  # noqa: E402
import models  # noqa: E402
import text  # noqa: E402


def count(model, fn, *inputs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() / 1e9


def row(backbone, tokens):
    cfg = models.BACKBONES[backbone]
    size = cfg.image_size
    with torch.device('meta'):          # weights left uninitialised: counts do not depend on them,
        model = models.create_model(f'CLIP_{backbone}_CLIP')   # and ViT-bigG's 2.5 B are built in seconds
    model = model.to_empty(device='cpu').eval()
    if cfg.text.hf_tokenizer:           # CLIPA: a full WordPiece context (every position is computed)
        tokens = torch.ones(1, cfg.text.context_length, dtype=torch.long)
    img_params = sum(p.numel() for p in model.visual.parameters()) / 1e6
    txt_params = sum(p.numel() for n, p in model.named_parameters()
                     if n.split('.')[0] in ('token_embedding', 'positional_embedding',
                                            'transformer', 'ln_final')) / 1e6
    img_flops = count(model, model.encode_image, torch.randn(1, 3, size, size))
    txt_flops = count(model, model.encode_text, tokens)
    img_params = f'{img_params:.3g}' if img_params < 1000 else f'{img_params:.0f}'    # not 1.84e+03
    return (f"| `{backbone}` | {cfg.tower_name or 'TinyCNN'} | {size} | {img_params} M | "
            f"{img_flops:.3g} | {txt_params:.1f} M | {txt_flops:.3g} |")


if __name__ == '__main__':
    if sys.argv[1:] == ['--methods']:
        print(methods.markdown_table())
        sys.exit()
    tokens = text.Tokenizer()(['x ' * 75])          # a full 77-token caption
    print('| backbone | timm model | px | image params | image GFLOPs | text params | '
          'text GFLOPs (77 tok; CLIPA 32) |')
    print('|---|---|---|---|---|---|---|')
    for name in models.BACKBONES:
        print(row(name, tokens))
