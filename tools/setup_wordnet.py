"""Make NLTK's WordNet available for text augmentation (EDA), online or offline.

    python tools/setup_wordnet.py        # exit 0 when `wordnet.synsets('dog')` works

Order: already installed -> nltk.download -> copy Debian's WordNet 3.0 files
(`apt-get install wordnet-base wordnet-sense-index`) into <venv>/nltk_data.
"""
import os
import shutil
import sys

DEBIAN_DIR = '/usr/share/wordnet'
LEXNAMES = ('adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact '
            'noun.attribute noun.body noun.cognition noun.communication noun.event '
            'noun.feeling noun.food noun.group noun.location noun.motive noun.object '
            'noun.person noun.phenomenon noun.plant noun.possession noun.process '
            'noun.quantity noun.relation noun.shape noun.state noun.substance noun.time '
            'verb.body verb.change verb.cognition verb.communication verb.competition '
            'verb.consumption verb.contact verb.creation verb.emotion verb.motion '
            'verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl').split()
POS = {'noun': 1, 'verb': 2, 'adj': 3, 'adv': 4}
FIX = ("WordNet for NLTK is missing: run `python tools/setup_wordnet.py` (needs network, or "
       "`apt-get install wordnet-base wordnet-sense-index` first)")


def wordnet_works():
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
        return bool(wordnet.synsets('dog'))
    except (LookupError, OSError):
        return False


def copy_debian_wordnet(target_root):
    """Copy /usr/share/wordnet into target_root/corpora/wordnet and add `lexnames`."""
    dest = os.path.join(target_root, 'corpora', 'wordnet')
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(DEBIAN_DIR):
        src = os.path.join(DEBIAN_DIR, name)
        if os.path.isfile(src):
            shutil.copy(src, dest)
    with open(os.path.join(dest, 'lexnames'), 'w') as f:
        for i, name in enumerate(LEXNAMES):
            f.write(f"{i:02d}\t{name}\t{POS[name.split('.')[0]]}\n")


def main():
    if wordnet_works():
        print('wordnet: available')
        return 0
    import nltk
    target = os.path.join(sys.prefix, 'nltk_data')         # on nltk's default search path
    try:
        nltk.download('wordnet', download_dir=target, quiet=True, raise_on_error=True)
    except Exception:  # offline: nltk raises or returns quickly
        pass
    if not wordnet_works() and os.path.isdir(DEBIAN_DIR):
        copy_debian_wordnet(target)
    if wordnet_works():
        print(f'wordnet: installed under {target}')
        return 0
    print(FIX, file=sys.stderr)
    return 1


if __name__ == '__main__':
    sys.exit(main())
