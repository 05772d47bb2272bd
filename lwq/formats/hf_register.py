"""Make ``AutoModelForCausalLM.from_pretrained(lwq_checkpoint)`` work after ``import lwq``, cheaply.

transformers keeps its quantizers in a registry (``transformers.quantizers.auto``) that takes seconds
to import. ``import lwq`` must stay fast, so ``arrange_registration`` registers lwq's quantizer
(``lwq.formats.hf_quantizer``) at once only when that registry is already imported; otherwise it adds
a one-shot finder to ``sys.meta_path`` that lets the registry module load as usual, registers right
after it has run, and removes itself. That finder (until transformers' registry is imported) and the
entry in transformers' registry are the only state; ``import lwq`` does nothing else.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Sequence

REGISTRY_MODULE = "transformers.quantizers.auto"


def register() -> bool:
    """Register the lwq quantizer in transformers now (imports transformers); True if newly added."""
    for finder in [f for f in sys.meta_path if isinstance(f, _RegisterOnImport)]:
        sys.meta_path.remove(finder)  # registering now: the pending one-shot finder is not needed
    from lwq.formats.hf_quantizer import register_lwq

    return register_lwq()


def _register_after_import() -> None:
    """Called right after transformers' registry module has run. A failure here must not break the
    user's ``import transformers``: it becomes a warning naming the reason (``lwq doctor`` shows it too)."""
    try:
        register()
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        warnings.warn(f"lwq: cannot register the 'lwq' quantizer with transformers ({type(exc).__name__}: {exc}); "
                      "load lwq checkpoints with lwq.load instead", RuntimeWarning, stacklevel=2)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``REGISTRY_MODULE`` it asks the other finders, and wraps the loader so
    that registration follows the module's execution. It leaves ``sys.meta_path`` on first use."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != REGISTRY_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            _register_after_import()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]  # this spec's own loader only
        return spec


def arrange_registration() -> None:
    """Register now if transformers' registry is loaded, else when it gets imported (see module doc)."""
    if REGISTRY_MODULE in sys.modules:
        _register_after_import()
        return
    if importlib.util.find_spec("transformers") is None:
        return
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
