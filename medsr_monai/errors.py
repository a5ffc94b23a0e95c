"""One last line with the root cause when a bundle run fails.

A failed ``python -m monai.bundle run`` of these bundles ends in a 60-100-line traceback whose last line is
MONAI's generic ``RuntimeError: Failed to evaluate ConfigExpression ...``; the line that names the file and the
problem (``VolumeError: /data/scan.nii.gz: unreadable or corrupt file``) is somewhere in the middle. When
``medsr_monai`` is imported by the bundle runner (every config starts with ``$import medsr_monai``), this module
adds an exception hook that prints the traceback as before and then the innermost exception of the chain, as the
last line(s) the user sees::

    medsr: error: VolumeError: /data/scan.nii.gz: unreadable or corrupt file (EOFError: ...)
"""

from __future__ import annotations

import sys

__all__ = ["root_cause", "install_bundle_excepthook", "under_bundle_runner"]

_INSTALLED = False


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of ``exc``'s chain (``raise ... from``, else the one being handled)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None:
            break
        exc = nxt
    return exc


def _hook(prev):
    def excepthook(etype, value, tb):
        prev(etype, value, tb)  # the full traceback, as before
        if value is None or isinstance(value, (KeyboardInterrupt, SystemExit)):
            return
        try:
            cause = root_cause(value)
            text = str(cause) or type(cause).__name__
            print(f"medsr: error: {type(cause).__name__}: {text}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - never hide the original traceback behind a failure of our own
            pass

    return excepthook


def under_bundle_runner() -> bool:
    """Whether this process is ``python -m monai.bundle ...``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") in ("monai.bundle.__main__", "monai.bundle")


def install_bundle_excepthook(force: bool = False) -> bool:
    """Install the hook (once) when running under the bundle runner, or when ``force``; returns whether it is
    installed."""
    global _INSTALLED
    if not _INSTALLED and (force or under_bundle_runner()):
        sys.excepthook = _hook(sys.excepthook)
        _INSTALLED = True
    return _INSTALLED
