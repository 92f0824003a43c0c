"""lightning-prism: PRISM (Principal Image Sections Mapping) for PyTorch and PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

from .engine import PRISMResult, prism

try:
    __version__ = version("lightning-prism")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["PRISMResult", "__version__", "prism"]
