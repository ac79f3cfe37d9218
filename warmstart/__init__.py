"""warmstart: move a fine-tuned task vector into a bigger or newer model, inside Lightning.

Public API::

    from warmstart import transport, TaskVectorTransport, ConvergenceTracker
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Eager, not lazy like _EXPORTS: the name would otherwise resolve to the submodule. Re-exported
# through the computed __all__ below, which ruff cannot see.
from .transport import transport  # noqa: F401

__version__ = "0.1.0"

_EXPORTS = {
    "TransportReport": "warmstart.transport_report",
    "procrustes_map": "warmstart.procrustes",
    "CrossStatistics": "warmstart.procrustes",
    "task_vector": "warmstart.task_vector",
    "load_state_dict": "warmstart.task_vector",
    "TaskVectorTransport": "warmstart.callbacks",
    "ConvergenceTracker": "warmstart.callbacks",
    "Classifier": "warmstart.models",
    "build_model": "warmstart.models",
    "ImageClassificationData": "warmstart.data",
    "TextClassificationData": "warmstart.data",
    "write_report": "warmstart.report",
    "summarize": "warmstart.summary",
}

__all__ = sorted([*_EXPORTS, "transport"])


def __getattr__(name: str) -> Any:
    # Lazy: importing warmstart stays cheap (Lightning alone takes seconds to import).
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'warmstart' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .callbacks import ConvergenceTracker, TaskVectorTransport  # noqa: F401
    from .data import ImageClassificationData, TextClassificationData  # noqa: F401
    from .models import Classifier, build_model  # noqa: F401
    from .procrustes import CrossStatistics, procrustes_map  # noqa: F401
    from .report import write_report  # noqa: F401
    from .summary import summarize  # noqa: F401
    from .task_vector import load_state_dict, task_vector  # noqa: F401
    from .transport_report import TransportReport  # noqa: F401
