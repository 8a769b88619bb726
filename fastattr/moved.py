"""Deprecated import paths: one import hook for every module the layout of issue #32 moved.

A package whose modules moved registers ``{old path: new path}`` (:func:`register`); each old path
then still imports, warns once with a :class:`DeprecationWarning` naming its new path at the line that
imports it, and is the new module itself, so ``from old import X`` gives the very objects of the new
path. ``extra`` assembles an old path from its new module plus names that now live elsewhere.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

#: old module path -> the module that replaces it, over every registering package
MOVED: dict[str, str] = {}
#: names an old path held that its new module does not: old path -> {name: the module defining it now}
EXTRA: dict[str, dict[str, str]] = {}
#: old paths that were packages (their submodules moved too)
PACKAGES: set[str] = set()


def register(moves: dict[str, str], extra: dict[str, dict[str, str]] | None = None,
             packages: set[str] | frozenset[str] = frozenset()) -> None:
    """Answer the old paths of ``moves`` from now on (see the module docstring)."""
    MOVED.update(moves)
    EXTRA.update(extra or {})
    PACKAGES.update(packages)
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def moved_attribute(package: str, name: str) -> types.ModuleType:
    """``package.name`` as an attribute where ``package.name`` is an old path (a package's ``__getattr__``)."""
    if f"{package}.{name}" in MOVED:
        return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")


def _warn_importer(message: str) -> None:
    """A :class:`DeprecationWarning` told at the line that imports (the first frame outside importlib
    and this module), whether it came through ``import``, ``from ... import`` or an attribute."""
    frame = sys._getframe(1)
    while frame.f_back and (frame.f_code.co_filename == __file__ or "importlib" in frame.f_code.co_filename
                            or frame.f_code.co_name == "__getattr__"):
        frame = frame.f_back
    warnings.warn_explicit(message, DeprecationWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the old paths of :data:`MOVED` only; every other import goes on as before."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=name in PACKAGES)

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__
        _warn_importer(f"{old} is deprecated; import {MOVED[old]} instead")
        new = importlib.import_module(MOVED[old])
        if old in EXTRA:  # assembled: the new module's names and the extras, the same objects
            module.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})
            module.__dict__.update({k: getattr(importlib.import_module(m), k) for k, m in EXTRA[old].items()})
            module.__all__ = [*getattr(new, "__all__", []), *EXTRA[old]]
        else:  # the import system hands out whatever sys.modules holds once this returns
            sys.modules[old] = new
