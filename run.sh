#!/usr/bin/env bash
# One commit -> one experiment: launch SCRIPT from a snapshot of the current commit.
#
#   ./run.sh [--dry-run] [--allow-dirty] [--local] [--nproc N] NAME SCRIPT [flags...]
#
#   ./run.sh clip_s0 run_with_submitit.py --nodes 4 --ngpus 8 --model CL2L_R50_CL2L ...   # Slurm
#   ./run.sh --local --nproc 2 tiny main.py --seed 0,1 --lr 1e-3,2e-3                      # 4 local runs
#   ./run.sh eval_b eval_zeroshot.py --resume ~/experiments/clip_s0/1a2b3c4/clip_s0/checkpoint.pt
#
# SCRIPT: run_with_submitit.py (submits to Slurm), main.py (with --local: runs
# `torchrun --standalone --nproc_per_node N main.py`, N = --nproc, default 1) or eval_zeroshot.py
# (runs here).
# - Refuses a git tree with uncommitted changes to tracked files, unless --allow-dirty (the
#   snapshot is still the commit: uncommitted changes are never part of an experiment).
# - Extracts the commit (`git archive HEAD`) to $EXP_ROOT/NAME/SHA/code/ (EXP_ROOT defaults to
#   $HOME/experiments, SHA is the short commit id) and runs the code there, so later edits of
#   the checkout never change a running or requeued experiment. Relative paths in the flags
#   are relative to the current directory, as when running the script directly.
# - A flag value with commas is a sweep: `--seed 0,10,50 --lr 1e-3,2e-3` launches the Cartesian
#   product (6 jobs) named NAME_seed0_lr1e-3, NAME_seed0_lr2e-3, ... (only flags with a comma
#   name the job; none -> one job named NAME). A literal comma is written `\,` (quoted:
#   --csv-separator '\,').
# - Each job gets --output-dir $EXP_ROOT/NAME/SHA/JOBNAME unless the flags give one, and the
#   exact command is appended to command.txt there. Launching the same thing again at the same
#   commit reuses those directories, so training resumes from their checkpoint.pt.
# - --dry-run checks the flags of every job and prints one command per line; it launches and
#   writes nothing. The flags of all jobs are checked before any job starts.
# - Python: $PYTHON, else the active virtualenv, else the checkout's .venv, else python3.
set -euo pipefail

die() { echo "run.sh: $*" >&2; exit 2; }
note() { echo "run.sh: $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

DRY=0 DIRTY=0 LOCAL=0 NPROC=1
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1; shift ;;
        --allow-dirty) DIRTY=1; shift ;;
        --local) LOCAL=1; shift ;;
        --nproc) [ $# -ge 2 ] || die "--nproc needs a number"; NPROC=$2; shift 2 ;;
        --nproc=*) NPROC=${1#*=}; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (run.sh's options come before NAME; see ./run.sh --help)" ;;
        *) break ;;
    esac
done
[ $# -ge 2 ] || die "usage: ./run.sh [--dry-run] [--allow-dirty] [--local] [--nproc N] NAME SCRIPT [flags...]"
NAME=$1 SCRIPT=${2#./}
shift 2
[[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9._+-]*$ ]] || die "NAME must be letters, digits and ._+- (got '$NAME')"
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer (got '$NPROC')"
case $SCRIPT in
    run_with_submitit.py)
        [ "$LOCAL" = 0 ] || die "run_with_submitit.py submits to Slurm; --local runs main.py or eval_zeroshot.py" ;;
    main.py)
        [ "$LOCAL" = 1 ] || die "main.py runs only with --local (torchrun here); for Slurm use run_with_submitit.py" ;;
    eval_zeroshot.py) ;;
    *) die "SCRIPT must be run_with_submitit.py, main.py or eval_zeroshot.py (got '$SCRIPT')" ;;
esac
[ "$NPROC" = 1 ] || [ "$SCRIPT" = main.py ] || die "--nproc goes with --local main.py"

# ---------------------------------------------------------------- the commit and its snapshot
REPO=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel 2>/dev/null) ||
    die "$(dirname "${BASH_SOURCE[0]}") is not in a git checkout"
SHA=$(git -C "$REPO" rev-parse --short HEAD)
if ! git -C "$REPO" diff --quiet HEAD --; then
    [ "$DIRTY" = 1 ] || die "uncommitted changes to tracked files in $REPO: commit them, or pass --allow-dirty to run commit $SHA without them"
    note "warning: uncommitted changes are not part of the snapshot; running commit $SHA as committed"
fi
EXP_ROOT=${EXP_ROOT:-$HOME/experiments}
[[ $EXP_ROOT == /* ]] || EXP_ROOT=$PWD/$EXP_ROOT
BASE=$EXP_ROOT/$NAME/$SHA
CODE=$BASE/code

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PY=$VIRTUAL_ENV/bin/python
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3
fi
PY=$(command -v "$PY") || die "python not found: $PY"

# ---------------------------------------------------------------- comma lists -> jobs
ARGS=("$@")
SEP=$'\x1f'                       # stands for an escaped comma while splitting
AX_POS=() AX_LABEL=() AX_PREFIX=() AX_START=() AX_COUNT=() AX_VALS=()

split_values() {  # split_values TOKEN -> SPLIT=(values), \, kept as a literal comma
    local s=${1//\\,/$SEP}
    SPLIT=()
    while [[ $s == *,* ]]; do SPLIT+=("${s%%,*}"); s=${s#*,}; done
    SPLIT+=("$s")
}

user_output_dir=-1                # index of the token holding the user's --output-dir value
prev_flag=''
for i in "${!ARGS[@]}"; do
    tok=${ARGS[$i]}
    flag=''
    [[ $tok == -* ]] && flag=${tok%%=*}
    case $flag in
        --output-dir|--output-di|--output-d|--output-) is_out=1 ;;
        --output) is_out=1; if [ "$SCRIPT" = eval_zeroshot.py ]; then is_out=0; fi ;;
        *) is_out=0 ;;
    esac
    if [ "$is_out" = 1 ]; then
        if [[ $tok == *=* ]]; then user_output_dir=$i; else user_output_dir=$((i + 1)); fi
    fi
    plain=${tok//\\,/}
    if [[ $plain == *,* ]]; then                       # an unescaped comma: a sweep axis
        if [[ -n $flag && $tok == *=* ]]; then          # --flag=a,b
            prefix="$flag=" label=$flag value=${tok#*=}
        elif [[ -n $flag ]]; then                       # a comma in a flag name: no label
            prefix='' label='' value=$tok
        else                                            # --flag a,b
            prefix='' label=$prev_flag value=$tok
        fi
        label=${label#--}
        split_values "$value"
        AX_POS+=("$i") AX_LABEL+=("${label#-}") AX_PREFIX+=("$prefix")
        AX_START+=("${#AX_VALS[@]}") AX_COUNT+=("${#SPLIT[@]}")
        for v in "${SPLIT[@]}"; do
            [ -n "$v" ] || die "empty value in the comma list '$tok' (a literal comma is written \\,)"
            AX_VALS+=("$prefix${v//$SEP/,}")
        done
    else
        ARGS[i]=${tok//\\,/,}
    fi
    if [[ -n $flag ]]; then prev_flag=$flag; fi
done

njobs=1
for c in "${AX_COUNT[@]}"; do njobs=$((njobs * c)); done

# JOB_ARGV_k (as "N NAME ARG..." chunks in ALL_JOBS), JOB_NAMES[k], JOB_OUT[k]
JOB_NAMES=() JOB_OUT=() ALL_JOBS=() JOB_START=() JOB_LEN=()
for ((k = 0; k < njobs; k++)); do
    job=("${ARGS[@]}")
    jname=$NAME
    rest=$k
    for ((a = ${#AX_POS[@]} - 1; a >= 0; a--)); do    # the last axis varies fastest
        pick=$((rest % AX_COUNT[a]))
        rest=$((rest / AX_COUNT[a]))
        job[AX_POS[a]]=${AX_VALS[AX_START[a] + pick]}
    done
    for ((a = 0; a < ${#AX_POS[@]}; a++)); do
        v=${job[AX_POS[a]]}
        piece="${AX_LABEL[a]}${v#"${AX_PREFIX[a]}"}"
        jname+="_${piece//[^A-Za-z0-9._+-]/-}"
    done
    if [ "$user_output_dir" -ge 0 ]; then
        [ "$user_output_dir" -lt "${#job[@]}" ] || die "--output-dir needs a value"
        out=${job[user_output_dir]}
        [[ ${ARGS[user_output_dir]} == -* ]] && out=${out#*=}
        [[ $out == /* ]] || out=$PWD/$out
    else
        out=$BASE/$jname
        job+=(--output-dir "$out")
    fi
    for ((j = 0; j < k; j++)); do
        [ "${JOB_NAMES[j]}" != "$jname" ] || die "two jobs would be named $jname; make the comma lists distinct"
        [ "${JOB_OUT[j]}" != "$out" ] || die "jobs ${JOB_NAMES[j]} and $jname would share --output-dir $out"
    done
    JOB_NAMES+=("$jname") JOB_OUT+=("$out")
    JOB_START+=("${#ALL_JOBS[@]}") JOB_LEN+=("${#job[@]}")
    ALL_JOBS+=("${job[@]}")
done

job_argv() {  # job_argv K -> JOB=(the flags of job K)
    JOB=("${ALL_JOBS[@]:JOB_START[$1]:JOB_LEN[$1]}")
}

job_command() {  # job_command K -> CMD=(the command of job K)
    job_argv "$1"
    case $SCRIPT in
        main.py) CMD=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$CODE/main.py" "${JOB[@]}") ;;
        *) CMD=("$PY" "$CODE/$SCRIPT" "${JOB[@]}") ;;
    esac
}

quoted() {  # quoted WORD... -> one shell-quoted line (for command.txt and --dry-run)
    local out='' w
    for w in "$@"; do out+="$(printf '%q' "$w") "; done
    printf '%s' "${out% }"
}

# ---------------------------------------------------------------- snapshot + checks
check_from() {  # check_from CODE_DIR: every job's flags, in one Python process
    local words=() k
    for ((k = 0; k < njobs; k++)); do
        job_argv "$k"
        words+=("$((${#JOB[@]} + 1))" "${JOB_NAMES[k]}" "${JOB[@]}")
    done
    [ -f "$1/tools/check_jobs.py" ] || die "commit $SHA has no tools/check_jobs.py (too old for run.sh)"
    "$PY" "$1/tools/check_jobs.py" "$SCRIPT" "${words[@]}" || exit 2
}

extract() {  # extract DIR: the commit's files into DIR
    mkdir -p "$1"
    git -C "$REPO" archive --format=tar HEAD | tar -x -C "$1"
}

if [ "$DRY" = 1 ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    extract "$tmp"
    check_from "$tmp"
    for ((k = 0; k < njobs; k++)); do
        job_command "$k"
        echo "cd $(printf '%q' "$PWD") && $(quoted "${CMD[@]}")"
    done
    note "dry run: $njobs job(s) of commit $SHA, code would be in $CODE; nothing launched"
    exit 0
fi

if [ ! -d "$CODE" ]; then
    mkdir -p "$BASE"
    tmp=$(mktemp -d "$BASE/.code.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    extract "$tmp"
    mv -T "$tmp" "$CODE" 2>/dev/null || rm -rf "$tmp"   # another run.sh may have won the race
fi
check_from "$CODE"

# ---------------------------------------------------------------- launch
note "$njobs job(s) of commit $SHA from $CODE"
for ((k = 0; k < njobs; k++)); do
    job_command "$k"
    mkdir -p "${JOB_OUT[k]}"
    line="cd $(printf '%q' "$PWD") && $(quoted "${CMD[@]}")"
    echo "$line" >> "${JOB_OUT[k]}/command.txt"
    note "job ${JOB_NAMES[k]}: $line"
    "${CMD[@]}"
done
