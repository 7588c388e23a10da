"""Progress bars for long loops of the experiments and the command line.

tqdm is an optional dependency (the ``cli`` extra): it is imported only when a bar is asked
for, and a missing tqdm then raises an ImportError that says how to install it.
"""

from __future__ import annotations

from .. import backend as _b

__all__ = ["progress_bar"]


class _NoBar:
    """What :func:`progress_bar` returns when no bar is shown: the iterable, with tqdm's
    methods as no-ops."""

    def __init__(self, iterable):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def set_postfix(self, *args, **kwargs):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(iterable, *, enabled: bool, desc: str | None = None, **kwargs):
    """``tqdm.auto.tqdm(iterable, desc=desc, leave=False, **kwargs)`` when ``enabled``, else
    ``iterable`` wrapped so that ``set_postfix``, ``set_postfix_str`` and ``close`` do nothing.

    Raises
    ------
    ImportError
        ``enabled`` and tqdm is not installed (``pip install linsolve_rbp[cli]``).
    """
    if not enabled:
        return _NoBar(iterable)
    tqdm = _b.import_optional("tqdm.auto", "a progress bar").tqdm
    kwargs.setdefault("leave", False)
    return tqdm(iterable, desc=desc, **kwargs)
