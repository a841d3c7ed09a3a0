"""CLIPA-style text token reduction (Li et al., "An Inverse Scaling Law for CLIP Training").

Training captions are cut to `--text-context` tokens (SOT and EOT included) on the batch,
after tokenisation, in one vectorised step in the training process:

- `truncate`: the first tokens;
- `random`: a uniformly random subset of the caption's tokens, kept in caption order;
- `shuffle`: a random subset in random order;
- `syntax`: nouns first, then adjectives, then the rest, each group in caption order, and the
  kept tokens in caption order. Parts of speech come from WordNet's lexicon, offline, no
  tagger needed: a BPE word's part of speech is its most frequent one in WordNet's sense counts
  (of the lemma, e.g. sitting -> sit); stop words (scikit-learn's list) and word pieces rank
  last. Without
  WordNet, content words (not stop words) come first, with a warning.

Captions no longer than the budget pass unchanged. The text tower then runs on the short
sequence (models.CLIP.text_features trims after EOT), which is where the saving comes from.
"""
import torch

MODES = ('none', 'truncate', 'random', 'shuffle', 'syntax')
NOUN, ADJECTIVE, OTHER = 0, 1, 2


class SyntaxPriorities:
    """token id -> NOUN / ADJECTIVE / OTHER, looked up in WordNet the first time an id is seen
    (the whole 49k vocabulary would take ~15 s at start)."""

    def __init__(self, tokenizer):
        from augment import _stop_words
        self.stop, self.decoder = _stop_words(), tokenizer.bpe.decoder
        try:
            from nltk.corpus import wordnet
            wordnet.ensure_loaded()
        except LookupError:
            wordnet = None
            print("warning: --text-reduction syntax without NLTK's WordNet: content words first, "
                  "no noun/adjective order (run `python tools/setup_wordnet.py`)")
        self.wordnet = wordnet
        self.table = torch.full((tokenizer.vocab_size,), -1, dtype=torch.long)

    def __call__(self, tokens):
        unknown = tokens.unique()
        unknown = unknown[self.table[unknown] < 0]
        for token_id in unknown.tolist():
            self.table[token_id] = self.priority(self.decoder.get(token_id, ''))
        return self.table[tokens]

    def priority(self, piece):
        if not piece.endswith('</w>'):
            return OTHER                              # a word piece or a special token
        word = piece[:-4]
        if not word.isalpha() or word in self.stop:
            return OTHER
        return NOUN if self.wordnet is None else _part_of_speech(self.wordnet, word)


def _part_of_speech(wordnet, word):
    """The word's most frequent part of speech in WordNet's sense counts (ties: noun first)."""
    counts = {}
    for pos in ('n', 'a', 'v', 'r'):
        base = wordnet.morphy(word, pos)
        if base is None:
            continue
        counts[pos] = sum(1 + lemma.count() for synset in wordnet.synsets(base, pos)
                          for lemma in synset.lemmas() if lemma.name().lower() == base)
    if not counts:
        return OTHER
    best = max(counts, key=lambda p: (counts[p], p == 'n', p == 'a'))
    return {'n': NOUN, 'a': ADJECTIVE}.get(best, OTHER)


class TextReducer:
    """tokens [..., L] (SOT, content, EOT, zero padding; EOT has the largest id) ->
    [..., length] with at most length - 2 content tokens chosen by `mode`."""

    def __init__(self, mode, length, tokenizer=None):
        if mode not in MODES or mode == 'none':
            raise ValueError(f"text reduction {mode!r}; valid: {', '.join(MODES[1:])}")
        if length < 3:
            raise ValueError(f"--text-context must be >= 3 (SOT, a token, EOT), got {length}")
        self.mode, self.length = mode, length
        self.priorities = SyntaxPriorities(tokenizer) if mode == 'syntax' else None

    def __call__(self, tokens):
        shape = tokens.shape
        t = tokens.reshape(-1, shape[-1])
        n, L = t.shape
        keep = self.length - 2
        pos = torch.arange(L, device=t.device).expand(n, L)
        eot = t.argmax(dim=-1, keepdim=True)
        content = (pos >= 1) & (pos < eot)
        if self.mode == 'truncate':
            score = pos.float()
        elif self.mode in ('random', 'shuffle'):
            score = torch.rand(n, L, device=t.device)
        else:
            priority = self.priorities(t.cpu()).to(t.device)
            score = (priority * L + pos).float()
        score = score.masked_fill(~content, float('inf'))
        k = min(keep, L)
        chosen_score, chosen = score.topk(k, dim=-1, largest=False)       # valid ones first
        valid = torch.isfinite(chosen_score)
        if self.mode != 'shuffle':                                        # back to caption order
            chosen = torch.where(valid, chosen, L).sort(dim=-1).values.clamp_max(L - 1)
        kept = valid.sum(dim=-1, keepdim=True)
        out = torch.zeros(n, self.length, dtype=t.dtype, device=t.device)
        out[:, 0] = t[:, 0]
        out[:, 1:1 + k] = torch.where(valid, t.gather(1, chosen), 0)
        out.scatter_(1, kept + 1, t.gather(1, eot))
        return out.reshape(*shape[:-1], self.length)

    def apply(self, batch):
        """Reduce `text` and `text_views` of a training batch (other keys untouched)."""
        return {k: self(v) if k in ('text', 'text_views') else v for k, v in batch.items()}
