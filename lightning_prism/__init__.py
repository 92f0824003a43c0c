"""lightning-prism: PRISM (Principal Image Sections Mapping) for PyTorch and PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

from .callback import PRISMMonitor
from .engine import PRISMResult, prism
from .gradients import GradCAMResult, SaliencyResult, grad_cam, prism_and_grad_cam, saliency
from .prototypes import PrototypeResult, class_prototypes
from .separation import class_separation

try:
    __version__ = version("lightning-prism")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "GradCAMResult",
    "PRISMMonitor",
    "PRISMResult",
    "PrototypeResult",
    "SaliencyResult",
    "__version__",
    "class_prototypes",
    "class_separation",
    "grad_cam",
    "prism",
    "prism_and_grad_cam",
    "saliency",
]
