"""The pass registry and the pass manager.

A pass is an ``onnx_ir`` pass (``ir.passes.InPlacePass``) registered under a short name with
``@register_pass("name")``; a recipe or the front end names the passes it runs. The manager runs
them in order and records, after each pass, its name, whether it changed the model, the node
count and, when a ``measure`` callback is given (e.g. ACE), what the callback returns.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import numbers
import pkgutil
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import numpy as np
import onnx_ir as ir

from bnncc.errors import BnnccError, shown

__all__ = ["register_pass", "get_pass", "pass_factory", "pass_parameters", "pass_arguments", "as_annotated",
           "list_passes", "PassManager", "PassRecord"]

logger = logging.getLogger(__name__)

PassFactory = Callable[..., ir.passes.PassBase]
F = TypeVar("F", bound=PassFactory)

_REGISTRY: dict[str, PassFactory] = {}


def register_pass(name: str) -> Callable[[F], F]:
    """Register a pass class (or a factory returning a pass) under ``name``; duplicates are an error."""

    def decorate(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorate


def _import_pass_modules() -> None:
    """Import every module of ``bnncc.passes`` so that their ``@register_pass`` lines run."""
    package = importlib.import_module("bnncc.passes")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"bnncc.passes.{info.name}")


def get_pass(name: str, **params: Any) -> ir.passes.PassBase:
    """Instantiate the pass registered as ``name`` with ``params``, each of its annotated type.

    The types are checked here, not only in recipes: a pass takes what it is given, so w_bits=7.5
    from Python became a float attribute that shape inference failed on after the pass ran.
    A numpy scalar is taken as the Python number (onnx_ir cannot write np.int64 as an attribute).
    """
    return pass_factory(name)(**pass_arguments(name, params, f"{name}: "))


def pass_arguments(name: str, params: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``params`` of the pass registered as ``name``, each as its annotated type (``as_annotated``);
    an unknown or mistyped one is an error naming it as ``prefix`` + its name (a recipe's key)."""
    schema = pass_parameters(name)
    checked = {}
    for key, value in params.items():
        if key not in schema:
            raise BnnccError(f"{prefix}{key}: unknown parameter; expected {', '.join(schema) or 'no parameters'}")
        checked[key] = as_annotated(value, schema[key], f"{prefix}{key}")
    return checked


def pass_parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of the pass registered as ``name`` and their annotated types
    (``object`` where a parameter has no annotation)."""
    factory = pass_factory(name)
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    return {p.name: hints.get(p.name, object) for p in inspect.signature(factory).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def as_annotated(value: Any, expected: Any, key: str) -> Any:
    """``value`` as the plain Python ``expected`` type (a pass parameter's or a recipe field's): a bool
    is never a number, an int is a float, a numpy scalar is its Python number; anything else is a
    one-line error naming ``key``. An ``expected`` that is no type (``object``, ``int | None``) takes
    any value."""
    is_bool = isinstance(value, (bool, np.bool_))
    if expected is bool and is_bool:
        return bool(value)
    if expected is int and isinstance(value, numbers.Integral) and not is_bool:
        return int(value)
    if expected is float and isinstance(value, numbers.Real) and not is_bool:
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits (TOML takes any length)
            raise BnnccError(f"{key} = {shown(value)}: expected a number within a float's range") from None
    if expected in (bool, int, float) or (isinstance(expected, type) and not isinstance(value, expected)):
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        what = names.get(expected, getattr(expected, '__name__', expected))
        raise BnnccError(f"{key} = {shown(value)}: expected {what}")
    return value


def pass_factory(name: str) -> PassFactory:
    """The class or function registered as ``name``: its signature and docstring describe the pass.

    Pass modules are imported on the first miss only, so that a caller that imported the modules
    it needs does not depend on every other module of ``bnncc.passes`` importing cleanly.
    """
    if name not in _REGISTRY:
        _import_pass_modules()
    factory = _REGISTRY.get(name)
    if factory is None:
        raise BnnccError(f"unknown pass {name!r}; registered passes: {', '.join(list_passes())}")
    return factory


def list_passes() -> list[str]:
    """Names of all registered passes, sorted."""
    _import_pass_modules()
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class PassRecord:
    """One row of the manager's log: the state of the model after ``name`` ran."""

    name: str
    modified: bool
    nodes: int
    measure: Any = None


class PassManager:
    """Run passes in order; ``records`` holds one :class:`PassRecord` per pass after ``run``.

    ``passes`` are names (looked up with :func:`get_pass`), ``(name, params)`` pairs or pass
    instances. ``measure(model)`` is called after every pass and its result kept in the record.
    """

    def __init__(
        self,
        passes: Iterable[str | tuple[str, dict[str, Any]] | ir.passes.PassBase],
        measure: Callable[[ir.Model], Any] | None = None,
    ) -> None:
        if isinstance(passes, str):  # iterated, a name would be its letters: "unknown pass 'i'"
            raise TypeError(f"PassManager takes a list of passes, not the string {passes!r}; write [{passes!r}]")
        self.passes = [_named_pass(p) for p in passes]
        self.measure = measure
        self.records: list[PassRecord] = []

    def run(self, model: ir.Model) -> ir.Model:
        """Apply every pass to ``model`` in order and return the resulting model."""
        self.records = []
        for name, pass_ in self.passes:
            result = pass_(model)
            model = result.model
            measured = self.measure(model) if self.measure is not None else None
            record = PassRecord(name, result.modified, len(model.graph), measured)
            logger.debug("pass %s: modified=%s nodes=%d", name, record.modified, record.nodes)
            self.records.append(record)
        return model


def _named_pass(spec: str | tuple[str, dict[str, Any]] | ir.passes.PassBase) -> tuple[str, ir.passes.PassBase]:
    """(name for the records, pass) of a registered name, a ``(name, params)`` pair or a pass instance."""
    if isinstance(spec, str):
        return spec, get_pass(spec)
    if isinstance(spec, tuple):
        return spec[0], get_pass(spec[0], **spec[1])
    return type(spec).__name__, spec
