"""The ``linsolve-rbp`` command line (also ``python -m linsolve_rbp``).

``linsolve-rbp compare`` solves one linear system with every method and prints what each solve
cost and how accurate it is (the runner is :mod:`linsolve_rbp.cli.compare`, the table, JSON
and plot :mod:`linsolve_rbp.cli.report`); ``linsolve-rbp reproduce`` runs the paper's
experiments (:mod:`linsolve_rbp.cli.reproduce`). The command line needs the ``cli`` extra
(matplotlib, tqdm): ``pip install linsolve_rbp[cli]``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import backend as _b
from .._validate import nonnegative_real, positive_int
from .reproduce import register as register_reproduce

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parsed(convert, check, what):
    """An argparse ``type``: ``check(convert(text))``, or a one-line error saying ``what``."""
    def parse(text):
        try:
            return check(convert(text), "value")
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


_positive_int = _parsed(int, positive_int, "a positive integer")
_nonneg_float = _parsed(float, nonnegative_real, "a non-negative number")


def _add_compare(sub):
    p = sub.add_parser(
        "compare",
        help="compare every solver on one linear system (default: the Hopfield adjoint system)",
        description=(
            "Solve one linear system with every applicable method and print, per method, the "
            "status, iterations, operator products, wall time, final relative residual "
            "(recomputed with an extra product) and relative error against a direct solve. "
            "Also writes a PNG of the residual histories into --out, and JSON with --json."
        ),
    )
    p.add_argument("--problem", default="hopfield", metavar="NAME|FILE",
                   help="hopfield (default), gnn, convdiff, contractive, or a .mtx / .npz file with a square "
                        "matrix M (and optionally b) to solve M x = b")
    p.add_argument("--methods", default=None, metavar="LIST",
                   help="comma-separated method names (default: all of linsolve_rbp.methods())")
    p.add_argument("--rtol", type=_nonneg_float, default=1e-6, help="relative tolerance (default 1e-6)")
    p.add_argument("--maxiter", type=_positive_int, default=1000, help="iteration limit per solve (default 1000)")
    p.add_argument("--backend", choices=("numpy", "torch", "cupy"), default=None,
                   help="array backend (default numpy; torch for gnn)")
    p.add_argument("--device", default=None, help="device for torch (cpu, cuda:0) or cupy (0, 1, ...)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="number of right-hand sides solved as one batch (default: 10 digits for hopfield, 1 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed of right-hand sides, random problems and the corruption")
    p.add_argument("--out", default="linsolve-rbp-out", help="directory for the PNG plot (default ./linsolve-rbp-out)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--rho", type=_nonneg_float, default=None, help="spectral radius of J for contractive (default 0.9)")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="contractive: n (500); convdiff: grid points per side (32); gnn: nodes (100)")
    p.set_defaults(func=_compare)
    return p


def _compare(args, parser):
    from ..solve import methods
    from . import compare as C
    from . import report as R

    names = None
    if args.methods is not None:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = set(methods())
        unknown = [m for m in names if m not in known]
        if not names or unknown:
            parser.error(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"available: {', '.join(sorted(known))}")
    try:
        _b.import_optional("matplotlib", "linsolve-rbp compare (its plot)")
    except ImportError as exc:
        parser.error(str(exc))
    try:
        case = C.build_case(args.problem, backend=args.backend, device=args.device, dtype=args.dtype,
                            batch=args.batch, seed=args.seed, size=args.size, rho=args.rho)
    except C.UsageError as exc:
        parser.error(str(exc))
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        parser.error(f"--out {args.out}: {exc.strerror}")
    print(case.description)
    batch = case.b.shape[0] if case.batched else 1
    rows = C.run_compare(case, names, rtol=args.rtol, maxiter=args.maxiter, progress=sys.stderr.isatty() and _b.has_module("tqdm"))
    print(R.format_table(rows, adjoint=case.adjoint))
    png = os.path.join(args.out, f"compare-{case.name.replace('.', '_')}.png")
    R.plot_histories(png, case, rows, rtol=args.rtol)
    print(f"plot: {png}")
    settings = dict(rtol=args.rtol, maxiter=args.maxiter, backend=args.backend or ("torch" if args.problem == "gnn" else "numpy"),
                    device=args.device, dtype=args.dtype, batch=batch, seed=args.seed)
    if args.json:
        try:
            R.write_json(args.json, case, rows, settings)
        except OSError as exc:
            parser.error(f"--json {args.json}: {exc.strerror}")
        print(f"json: {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``linsolve-rbp`` (subcommands ``compare`` and ``reproduce``)."""
    parser = _Parser(prog="linsolve-rbp",
                     description="Matrix-free linear solvers for recurrent back-propagation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_compare(sub)
    register_reproduce(sub)
    return parser


def main(argv=None) -> int:
    """Run ``linsolve-rbp`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = args.func
    sub_parser = parser
    for action in parser._subparsers._group_actions:  # the subcommand's own parser, for its errors
        sub_parser = action.choices.get(args.command, parser)
    if func is _compare:
        return func(args, sub_parser)
    rc = func(args)
    return 0 if rc is None else int(rc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
