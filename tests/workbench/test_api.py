"""`import workbench as wb` exposes its public API by name, whatever was imported before."""

from __future__ import annotations

import importlib
import pkgutil
import types

import workbench


def test_every_export_is_the_named_object_even_after_every_submodule_is_imported() -> None:
    # importing a submodule binds it as an attribute of the package: an export must never be
    # shadowed by a submodule of the same name (wb.causal_trace is the function, not a module)
    for info in pkgutil.walk_packages(workbench.__path__, "workbench."):
        importlib.import_module(info.name)
    for name in workbench.__all__:
        if name == "__version__":
            continue
        value = getattr(workbench, name)
        assert not isinstance(value, types.ModuleType), f"workbench.{name} is a module"
        assert value is getattr(importlib.import_module(workbench._EXPORTS[name]), name)


def test_the_methods_packages_export_their_classes() -> None:
    import adversaries
    import editors

    assert editors.get("rome") is editors.ROME and editors.get("memit") is editors.MEMIT
    assert adversaries.get("copy-paste") is adversaries.CopyPaste and adversaries.get("pgd") is adversaries.PGD
    for package in (editors, adversaries):  # every registered method is importable from its package by class name
        for name in package.available():
            cls = package.get(name)
            assert getattr(package, cls.__name__, None) is cls, f"{package.__name__} does not export {cls.__name__}"
