"""warmstart: move a fine-tuned task vector into a bigger or newer model, inside Lightning.

Public API::

    from warmstart import transport, TransportOptions, TaskVectorTransport, ConvergenceTracker
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Eager, not lazy like _EXPORTS: the name would otherwise resolve to the submodule. Re-exported
# through the computed __all__ below, which ruff cannot see.
from .engine.transport import transport  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "TransportReport": "warmstart.engine.transport_report",
    "TransportOptions": "warmstart.engine.options",
    "procrustes_map": "warmstart.engine.procrustes",
    "CrossStatistics": "warmstart.engine.procrustes",
    "task_vector": "warmstart.engine.task_vector",
    "load_state_dict": "warmstart.engine.task_vector",
    "transport_adapter": "warmstart.engine.lora_out",
    "TaskVectorTransport": "warmstart.lightning.callbacks",
    "ConvergenceTracker": "warmstart.lightning.callbacks",
    "Classifier": "warmstart.lightning.models",
    "build_model": "warmstart.lightning.models",
    "ImageClassificationData": "warmstart.lightning.data",
    "TextClassificationData": "warmstart.lightning.data",
    "write_report": "warmstart.experiments.report",
    "summarize": "warmstart.experiments.summary",
}

__all__ = sorted([*_EXPORTS, "transport"])


def __getattr__(name: str) -> Any:
    # Lazy: importing warmstart stays cheap (Lightning alone takes seconds to import).
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'warmstart' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .engine.lora_out import transport_adapter  # noqa: F401
    from .engine.options import TransportOptions  # noqa: F401
    from .engine.procrustes import CrossStatistics, procrustes_map  # noqa: F401
    from .engine.task_vector import load_state_dict, task_vector  # noqa: F401
    from .engine.transport_report import TransportReport  # noqa: F401
    from .experiments.report import write_report  # noqa: F401
    from .experiments.summary import summarize  # noqa: F401
    from .lightning.callbacks import ConvergenceTracker, TaskVectorTransport  # noqa: F401
    from .lightning.data import ImageClassificationData, TextClassificationData  # noqa: F401
    from .lightning.models import Classifier, build_model  # noqa: F401
