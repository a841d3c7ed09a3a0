"""Tokenizer: open_clip's packaged BPE vocabulary, context 77, SOT/EOT, round trip."""
import torch

import augment


def test_tokenizer_round_trip(tokenizer):
    texts = ['a small red triangle in the top left corner', 'there is a blue circle on a grey background']
    tokens = tokenizer(texts)
    assert tokens.shape == (2, 77) and tokens.dtype == torch.int64
    assert (tokens[:, 0] == 49406).all()                                  # SOT
    assert (tokens.argmax(-1) == (tokens != 0).sum(-1) - 1).all()          # EOT = the last, top id
    assert [tokenizer.decode(t) for t in tokens] == texts
    assert tokenizer.vocab_size == 49408


def test_long_captions_are_truncated_keeping_eot(tokenizer):
    tokens = tokenizer(['word ' * 200])
    assert tokens.shape == (1, 77) and tokens[0, -1] == 49407


def test_clean_caption():
    assert augment.clean_caption('A  Caf&amp;eacute;\n  PHOTO') == 'a café photo'
