"""CLIPA-style reduced-token training: text token reduction, ViT patch dropout, low-resolution
pre-training then full-resolution fine-tuning (--finetune, position embeddings resampled)."""
import os

import pytest
import torch

import main as train
import models
import text_reduction
from test_main import TINY, read_jsonl

CAPTIONS = ['a big red dog sitting on the green grass near a house', 'cat',
            'the small photo of a running blue car']


def _content(tokenizer, row):
    return tokenizer.decode(row).split()


@pytest.mark.parametrize('mode', ['truncate', 'random', 'shuffle',
                                  pytest.param('syntax', marks=pytest.mark.needs('wordnet'))])
def test_reduced_captions_keep_sot_eot_and_a_subset_of_words(mode, tokenizer):
    tokens = tokenizer(CAPTIONS)
    torch.manual_seed(0)
    out = text_reduction.TextReducer(mode, 6, tokenizer)(tokens)
    assert out.shape == (3, 6)
    sot, eot = tokenizer.bpe.sot_token_id, tokenizer.bpe.eot_token_id
    for full, short in zip(tokens, out):
        assert short[0] == sot and eot in short.tolist()
        n = min(4, int(full.argmax()) - 1)
        assert int(short.argmax()) == n + 1                       # EOT right after the kept tokens
        kept, words = _content(tokenizer, short), _content(tokenizer, full)
        assert len(kept) == n and set(kept) <= set(words)
        if mode != 'shuffle':                                     # caption order is kept
            positions = [words.index(w) for w in kept]
            assert positions == sorted(positions)
    assert _content(tokenizer, out[1]) == ['cat']                 # short captions unchanged
    if mode == 'truncate':
        assert _content(tokenizer, out[0]) == ['a', 'big', 'red', 'dog']
    if mode == 'syntax':                                          # nouns, then adjectives
        assert _content(tokenizer, out[0]) == ['big', 'dog', 'grass', 'house']
        assert _content(tokenizer, out[2]) == ['small', 'photo', 'blue', 'car']


@pytest.mark.parametrize('mode', ['random', 'shuffle'])
def test_random_reduction_is_seeded_and_varies(mode, tokenizer):
    tokens = tokenizer(CAPTIONS[:1] * 16)
    reducer = text_reduction.TextReducer(mode, 5, tokenizer)
    torch.manual_seed(1)
    a = reducer(tokens)
    torch.manual_seed(1)
    assert torch.equal(a, reducer(tokens))
    assert len({tuple(r.tolist()) for r in a}) > 1
    if mode == 'shuffle':                 # some row out of caption order
        words = _content(tokenizer, tokens[0])
        assert any([words.index(w) for w in _content(tokenizer, r)] !=
                   sorted(words.index(w) for w in _content(tokenizer, r)) for r in a)


def test_reducer_handles_text_views_and_bad_settings(tokenizer):
    views = tokenizer(CAPTIONS * 2).view(3, 2, -1)
    batch = {'text': tokenizer(CAPTIONS), 'text_views': views, 'image': torch.zeros(3)}
    out = text_reduction.TextReducer('truncate', 8, tokenizer).apply(batch)
    assert out['text'].shape == (3, 8) and out['text_views'].shape == (3, 2, 8)
    assert out['image'] is batch['image']
    with pytest.raises(ValueError, match='valid: truncate'):
        text_reduction.TextReducer('nouns', 8, tokenizer)
    with pytest.raises(SystemExit):
        train.parse_args(['--text-reduction', 'random', '--text-context', '2'])


def test_patch_dropout_only_for_vits_and_drops_tokens():
    model = models.create_model('CLIP_TINYVIT_CLIP', image_size=64, patch_dropout=0.5)
    seen = []
    model.visual.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model.encode_image(x).sum().backward()
    model.eval()
    with torch.no_grad():
        model.encode_image(x)
    patches = model.visual.patch_embed.num_patches
    assert seen == [1 + patches // 2, 1 + patches]      # class token + half the patches in training
    with pytest.raises(ValueError, match='not a ViT'):
        models.create_model('CLIP_TINYCNN_CLIP', patch_dropout=0.5)


def test_load_weights_resamples_position_embeddings():
    low = models.create_model('CLIP_TINYVIT_CLIP', image_size=32)
    high = models.create_model('CLIP_TINYVIT_CLIP', image_size=64)
    loaded, skipped, missing = models.load_weights(high, low.state_dict())
    assert not skipped and not missing
    assert high.visual.pos_embed.shape == (1, 1 + high.visual.patch_embed.num_patches,
                                           low.visual.pos_embed.shape[-1])
    assert high.visual.patch_embed.num_patches == 4 * low.visual.patch_embed.num_patches
    assert torch.equal(high.visual.pos_embed[:, 0], low.visual.pos_embed[:, 0])   # class token
    for name, p in low.state_dict().items():
        if name != 'visual.pos_embed':
            assert torch.equal(high.state_dict()[name], p), name
    with pytest.raises(ValueError, match='no tensor'):
        models.load_weights(high, {'nothing': torch.zeros(1)})


@pytest.mark.slow
def test_low_resolution_reduced_token_pretraining_then_full_resolution_finetune(tmp_path):
    low = str(tmp_path / 'low')
    train.main([*TINY, '--model', 'CLIP_TINYVIT_CLIP', '--image-size', '32', '--patch-dropout', '0.5',
                '--text-reduction', 'syntax', '--text-context', '8', '--epochs', '1', '--output-dir', low])
    steps = read_jsonl(os.path.join(low, 'log_steps.txt'))
    assert len(steps) == 8 and all(torch.isfinite(torch.tensor(s['loss'])) for s in steps)
    full = str(tmp_path / 'full')
    ckpt = os.path.join(low, 'checkpoint.pt')
    train.main([*TINY, '--model', 'CLIP_TINYVIT_CLIP', '--image-size', '64', '--finetune', ckpt,
                '--epochs', '1', '--exit-after-steps', '1', '--output-dir', full])
    before = torch.load(ckpt, weights_only=True)['model']
    after = torch.load(os.path.join(full, 'checkpoint.pt'), weights_only=True)
    assert after['step'] == 1                                   # a fresh schedule, not epoch 1's
    assert after['model']['visual.pos_embed'].shape[1] == 1 + 4 * (before['visual.pos_embed'].shape[1] - 1)
    torch.testing.assert_close(after['model']['token_embedding.weight'],
                               before['token_embedding.weight'], rtol=0, atol=1e-5)  # one step at lr 1e-6
