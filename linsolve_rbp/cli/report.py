"""Reports of ``linsolve-rbp compare``: the table, the JSON file and the plot of residual
histories, from the rows of :func:`linsolve_rbp.cli.compare.run_compare`; and the figure
helpers the command line's plots share.

matplotlib (the ``cli`` extra) is imported only by the functions that draw. They draw on a
:class:`matplotlib.figure.Figure` with the Agg canvas, so no pyplot state and no global
backend is touched: a user's interactive backend stays as it was.
"""

from __future__ import annotations

import json

import numpy as np

from .. import backend as _b
from .compare import Case

__all__ = ["format_table", "write_json", "plot_histories", "new_figure"]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict], adjoint: bool = True) -> str:
    """The results as an aligned plain-text table."""
    heads = ["method", "status", "iters", "VJPs" if adjoint else "A x", "JVPs" if adjoint else "A^T y",
             "time [s]", "rel. residual", "rel. error"]
    body = [[r["method"], r["status"], _fmt(r["iterations"], "d"), _fmt(r["vjps"], "d"), _fmt(r["jvps"], "d"),
             _fmt(r["time_s"], ".3f"), _fmt(r["rel_residual"], ".2e"), _fmt(r["rel_error"], ".2e")]
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    left = {0, 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(heads), line(["-" * w for w in widths])] + [line(b) for b in body]
    return "\n".join(s.rstrip() for s in out)


def write_json(path, case: Case, rows: list[dict], settings: dict) -> None:
    """Write the problem, the settings and the rows (with histories) as JSON."""
    doc = dict(problem=dict(name=case.name, description=case.description, n=int(case.A.shape[0]),
                            batch=int(case.b.shape[0]) if case.batched else 1, symmetric=case.symmetric,
                            adjoint=case.adjoint, info=case.info),
               settings=settings, results=rows)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1, default=_jsonable)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(fig, axes)``: a :class:`matplotlib.figure.Figure` on the Agg canvas and its
    ``subplots(nrows, ncols)``; ``kwargs`` go to ``Figure`` (``figsize``, ``layout``).

    Raises
    ------
    ImportError
        matplotlib is not installed (``pip install linsolve_rbp[cli]``).
    """
    figure = _b.import_optional("matplotlib.figure", "plotting")
    agg = _b.import_optional("matplotlib.backends.backend_agg", "plotting")
    fig = figure.Figure(**kwargs)
    agg.FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=True)


def plot_histories(path, case: Case, rows: list[dict], rtol: float | None = None) -> None:
    """Plot the relative residual of every method that ran against the number of products."""
    fig, ax = new_figure(figsize=(8, 5), layout="constrained")
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(rows):
        h = r.get("history")
        if not h or not h["products"]:
            continue
        y = np.asarray(h["rel_residual"])
        y = np.where(y > 0, y, np.nan)
        ax.semilogy(h["products"], y, styles[(i // 10) % len(styles)], label=f"{r['method']} ({r['status']})")
    if rtol:
        ax.axhline(rtol, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("operator products (VJPs + JVPs)" if case.adjoint else "operator products (A x + A^T y)")
    ax.set_ylabel("relative residual ||b - A x|| / ||b|| (as reported)")
    ax.set_title(case.description if len(case.description) < 90 else case.description[:87] + "...", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120)
