#!/usr/bin/env bash
# The Debian packages the test suite uses, installed with apt-get when missing (`make setup`,
# `make demo` and `make test` run this first; it is quick and silent when nothing is missing):
#   wordnet-base wordnet-sense-index   WordNet 3.0 for --text-augment and --text-reduction syntax
#                                      (tools/setup_wordnet.py then copies it where NLTK reads it)
#   slurmctld slurmd slurm-client munge  a real single-node Slurm for tests/test_slurm.py
#                                      (tools/slurm_local.sh)
#   g++                                --compile: torch.compile builds its CPU kernels with it
# Not root, or no apt-get: nothing is installed and one line says what is missing and what to run.
# WordNet has a path without root (tools/setup_wordnet.py: NLTK's download, or npm), so it is
# not reported here. This script never fails the make: a test that needs a missing package
# skips with the command to run (under CI=true it fails), and pytest lists those at the end.
set -u

missing=()
[ -f /usr/share/wordnet/index.sense ] || missing+=(wordnet-base wordnet-sense-index)
for b in slurmctld slurmd; do
    command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || { missing+=(slurmctld slurmd); break; }
done
command -v sbatch >/dev/null || missing+=(slurm-client)
command -v munged >/dev/null || [ -x /usr/sbin/munged ] || missing+=(munge)
command -v g++ >/dev/null || missing+=(g++)
[ ${#missing[@]} -eq 0 ] && exit 0
pkgs=$(printf '%s\n' "${missing[@]}" | awk '!seen[$0]++' | tr '\n' ' ')

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    others=$(printf '%s\n' $pkgs | grep -v '^wordnet-' | tr '\n' ' ')
    skips=$(printf '%s\n' $others | awk '/^g\+\+$/ {c = 1} /slurm|munge/ {s = 1}
        END {print (s ? "the Slurm tests" : "") (s && c ? " and " : "") (c ? "the --compile tests" : "")}')
    [ -n "$others" ] && echo "setup: not installed (needs root and apt-get): ${others}- $skips" \
        "will skip; as root run: bash tools/setup_system.sh"
    exit 0
fi

echo "setup: apt-get install $pkgs"
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
# a fresh machine may have no package lists yet: update once when the first try fails;
# another apt-get running (unattended upgrades): wait for its lock up to 5 minutes
apt_get() { apt-get -o DPkg::Lock::Timeout=300 "$@"; }
if ! apt_get install -y -q $pkgs >"$log" 2>&1; then
    if ! { apt_get update -q && apt_get install -y -q $pkgs; } >"$log" 2>&1; then
        tail -n 5 "$log"
        echo "setup: apt-get install failed (log above); the tests that need $pkgs will skip"
    fi
fi
rm -f "$log"
exit 0
