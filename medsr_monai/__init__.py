"""medsr-monai: MONAI bundles and building blocks for medical image super-resolution."""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("adapt", "data", "losses", "metrics", "networks", "tracking", "transforms", "workflows")

# under `python -m monai.bundle run`, end a failed run with one line stating the root cause (see errors.py)
from .errors import install_bundle_excepthook as _install_bundle_excepthook  # noqa: E402

_install_bundle_excepthook()


def __getattr__(name: str):
    # Bundle configs write `medsr_monai.workflows.X` after `$import medsr_monai`; load subpackages on first
    # use so that plain `import medsr_monai` stays cheap (mlflow alone takes seconds to import).
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
