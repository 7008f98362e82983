"""Plugins: objectives and tasks from the user's own code.

Two ways in, both ending in the ordinary registries (``@register_objective``, ``@register_task``):

- ``--import MODULE`` or ``--import path/to/file.py`` on the command line (repeatable; a config
  file's ``import:`` key, a name or a list), or :func:`import_plugin` from Python: the module is
  imported, and its decorators register what it defines. A module name is looked up on the Python
  path, then in the current directory; a ``.py`` file is imported under its file name.
- Packaging entry points of an installed distribution, groups ``denser.objectives`` and
  ``denser.tasks``::

      [project.entry-points."denser.objectives"]
      reinforce = "my_package.objectives"            # a module that registers on import
      reinforce2 = "my_package.objectives:Reinforce"  # or a class, registered under the entry's name

  The registries load a group (:func:`load_entry_points`) the first time a name is not found
  among the registered ones, and for their listings (``denser objectives``, ``denser tasks``).

A plugin that cannot be imported, or that registers a name another class already holds, raises
:class:`PluginError`: one line naming the module (exit code 2 on the command line).

This module imports nothing of denser: the registries (``objectives``, ``tasks``) use it, and the
command line above them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import traceback
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

OBJECTIVES_GROUP = "denser.objectives"
TASKS_GROUP = "denser.tasks"

__all__ = ["OBJECTIVES_GROUP", "TASKS_GROUP", "PluginError", "import_plugin", "import_plugins", "load_entry_points",
           "plugin_imports", "plugin_module_spec"]


class PluginError(ValueError):
    """A plugin module that cannot be imported or registers a name twice: one line naming the module."""


def import_plugins(specs, *, source: str = "--import") -> list[ModuleType]:
    """:func:`import_plugin` for each of ``specs`` (a name, or a list of names), in order;
    ``source`` names where they came from in error messages."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, (list, tuple)) or not all(isinstance(s, str) for s in specs):
        raise PluginError(f"{source}: expected a module name, a .py file or a list of them, got {specs!r}")
    return [import_plugin(s, source=source) for s in specs]


def import_plugin(spec: str, *, source: str = "--import") -> ModuleType:
    """Import a plugin: a module name (``my_objectives``, ``pkg.objectives``) or a ``.py`` file.

    Importing the same module or file again returns the module already imported (its decorators do
    not run twice). Raises :class:`PluginError` naming ``spec`` when it cannot be found or its
    import fails (the plugin's exception, its file and line, on one line)."""
    spec = str(spec).strip()
    if not spec:
        raise PluginError(f"{source}: empty module name; pass a module name or a .py file")
    if spec.endswith(".py") or os.sep in spec or (os.altsep and os.altsep in spec):
        return _import_file(spec, f"{source} {spec}")
    return _import_module(spec, f"{source} {spec}")


def _import_module(name: str, where: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    found, cwd = _find(name), os.getcwd()
    if found is None and not {cwd, ""} & set(sys.path):
        sys.path.append(cwd)  # `denser` (the console script) does not put it there; `python -m` does
        found = _find(name)
    if found is None:
        raise PluginError(f"{where}: no module named {name!r} on the Python path or in the current "
                          "directory; pass an importable module name or a path to a .py file")
    module = _run_import(where, lambda: importlib.import_module(name))
    file = getattr(module, "__file__", None)
    if file and "." not in name and Path(file).resolve().is_relative_to(Path(cwd).resolve()):
        _RECORDED[name] = str(Path(file).resolve())  # another process may start in another directory
    return module


def _find(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return None


def _import_file(spec: str, where: str) -> ModuleType:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PluginError(f"{where}: no such file")
    if path.suffix != ".py":
        raise PluginError(f"{where}: not a .py file")
    path = path.resolve()
    for module in list(sys.modules.values()):  # imported before (by this path or as a module name)
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == path:
            return module
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else _unique_name(path.stem)
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise PluginError(f"{where}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # its sibling modules, as when run as a script

    def load():
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _RECORDED[name] = str(path)
        return module

    return _run_import(where, load)


def _unique_name(stem: str) -> str:
    base = "denser_plugin_" + "".join(c if c.isalnum() else "_" for c in stem)
    name, n = base, 1
    while name in sys.modules:
        n += 1
        name = f"{base}_{n}"
    return name


def _run_import(where: str, load) -> ModuleType:
    try:
        return load()
    except PluginError:
        raise
    except (Exception, SystemExit) as e:  # the plugin's own code failed: say where, on one line
        raise PluginError(f"{where}: importing it failed: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame outside importlib, on one line."""
    message = " ".join(str(e).split())
    where = ""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "importlib" not in f.filename and f.filename != __file__]
    if isinstance(e, SyntaxError) and e.filename:
        where = f" ({e.filename}:{e.lineno})"
    elif frames:
        where = f" ({frames[-1].filename}:{frames[-1].lineno})"
    return f"{type(e).__name__}: {message}{where}" if message else f"{type(e).__name__}{where}"


# ---------------------------------------------------------------------------------- entry points

_LOADED: dict[str, list[tuple[str, Any]]] = {}


def load_entry_points(group: str) -> list[tuple[str, Any]]:
    """``(entry name, loaded object)`` of every installed entry point of ``group``, loaded on the
    first call (importing each module registers what it defines) and remembered after.

    Raises :class:`PluginError` naming the entry point and its module when one fails to load."""
    if group in _LOADED:
        return _LOADED[group]
    _LOADED[group] = []  # a plugin that looks a name up while it loads must not load the group again
    loaded = []
    for ep in sorted(_entry_points(group), key=lambda e: e.name):
        try:
            obj = ep.load()
        except (Exception, SystemExit) as e:
            del _LOADED[group]
            raise PluginError(f"plugin {ep.name!r} ({group} entry point {ep.value!r}): importing it failed: "
                              f"{_describe(e)}") from e
        loaded.append((ep.name, obj))
    _LOADED[group] = loaded
    return loaded


def _entry_points(group: str):
    try:
        return list(metadata.entry_points(group=group))
    except TypeError:  # pragma: no cover - Python < 3.10 selection API
        return list(metadata.entry_points().get(group, []))


def plugin_module_spec(obj: Any) -> str | None:
    """What ``--import`` takes to register ``obj``'s class again in another process (a run's
    ``config.yaml`` records it): the absolute path of a module imported from a file (or found only
    in the current directory), the module name of one importable from the Python path, and None
    for denser's own classes and for classes of a script run as ``__main__`` (importing the script
    again would run it again)."""
    cls = obj if isinstance(obj, type) else type(obj)
    name = cls.__module__
    if name == "denser" or name.startswith("denser.") or name in ("builtins", "__main__"):
        return None
    return _RECORDED.get(name, name)


_RECORDED: dict[str, str] = {}  # module name -> what a config file's ``import:`` should say


def plugin_imports(*objs: Any) -> list[str]:
    """:func:`plugin_module_spec` of each of ``objs``, without repeats and Nones: a run's ``import:``."""
    out: list[str] = []
    for obj in objs:
        spec = plugin_module_spec(obj)
        if spec and spec not in out:
            out.append(spec)
    return out
