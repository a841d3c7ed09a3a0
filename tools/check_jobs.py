"""Check the flags of every job of a run.sh launch before any of them starts (one Python start-up
for a whole sweep). run.sh calls it from the code snapshot:

    python tools/check_jobs.py SCRIPT  N1 NAME1 ARG... N2 NAME2 ARG...

where Nk counts NAMEk and its arguments. Exit 0 if every job parses; otherwise one line
`run.sh: job NAME: <the script's one-line error>` on stderr and exit 2.
"""
import contextlib
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_main(argv):
    import main
    main.parse_args(argv)


def check_submitit(argv):
    import run_with_submitit
    parser = run_with_submitit.get_args_parser()
    args = parser.parse_args(argv)
    try:
        run_with_submitit.check_args(args)
    except ValueError as e:
        parser.error(str(e))


def check_eval(argv):
    import eval_zeroshot
    import utils
    parser = utils.OneLineErrorParser('eval_zeroshot.py', parents=[eval_zeroshot.get_args_parser()])
    args = parser.parse_args(argv)
    if not os.path.isfile(args.resume):
        parser.error(f"--resume: no such file {args.resume!r}")


CHECKS = {'main.py': check_main, 'run_with_submitit.py': check_submitit, 'eval_zeroshot.py': check_eval}


def split_jobs(words):
    """[N1, NAME1, ARG..., N2, ...] -> [(NAME1, [ARG...]), ...]"""
    jobs = []
    while words:
        n = int(words[0])
        jobs.append((words[1], words[2:1 + n]))
        words = words[1 + n:]
    return jobs


def main(argv):
    check = CHECKS[argv[0]]
    for name, args in split_jobs(argv[1:]):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                check(args)
        except SystemExit as e:
            if e.code:
                lines = err.getvalue().strip().splitlines() or [f'exit status {e.code}']
                sys.stderr.write(f'run.sh: job {name}: {lines[-1]}\n')
                return 2
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
