"""The task registry: ``register_task``, ``get_task``, ``list_tasks``, ``task_descriptions``.

``get_task`` builds a registered task by name, a ``file:PATH`` task from a local file or dataset
directory, or an ``hf:NAME[:CONFIG]`` task from a hub dataset, with options given as keywords or
inline after a ``?`` (what a CLI flag needs; values ``true``/``false``/``none`` and numbers are
converted, ``+`` reads as a space)::

    get_task("addition", seed=0)
    get_task("file:data.jsonl?reward=numeric&eval_fraction=0.2")
    get_task("hf:openai/gsm8k:main?prompt_column=question&rewards=math+format:0.2")
    get_task("mix:larger+subtract+multiply?exclude_eval_of=0,1,2")   # several tasks interleaved (tasks/mixed.py)
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import parse_qsl

from denser.plugins import TASKS_GROUP, PluginError, load_entry_points
from denser.tasks.base import Task
from denser.tasks.file_task import FileTask, HFTask
from denser.tasks.mixed import MIX_PREFIX, MixedTask

TaskFactory = Callable[..., Task]
_TASKS: dict[str, TaskFactory] = {}
_DESCRIPTIONS: dict[str, str] = {}
FILE_PREFIX = "file:"
HF_PREFIX = "hf:"


def register_task(name: str, description: str | None = None):
    """Decorator: register a ``Task`` subclass (or a factory returning a task) under ``name``."""

    def deco(factory: TaskFactory) -> TaskFactory:
        existing = _TASKS.get(name)
        if existing is not None and _qualified(existing) != _qualified(factory):  # the same one again is harmless
            raise ValueError(f"a task named {name!r} is already registered ({_qualified(existing)}); "
                             f"{_qualified(factory)} must pick another name")
        if isinstance(factory, type) and issubclass(factory, Task):
            factory.name = name
        _TASKS[name] = factory
        _DESCRIPTIONS[name] = description or getattr(factory, "description", "") or ""
        return factory

    return deco


def unregister_task(name: str) -> None:
    """Remove a registered task (for tests and interactive sessions)."""
    _TASKS.pop(name, None)
    _DESCRIPTIONS.pop(name, None)


def _qualified(factory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def list_tasks() -> list[str]:
    """Registered task names, installed plugins included (``file:PATH`` and ``hf:NAME`` tasks are not
    listed: any works)."""
    _load_plugins()
    return sorted(_TASKS)


def task_descriptions() -> dict[str, str]:
    """``{name: one-line description}`` of the registered tasks, for ``denser tasks``."""
    return {n: _DESCRIPTIONS[n] for n in list_tasks()}


def get_task(name: str, **options: Any) -> Task:
    """Build a task by name.

    Args:
        name: a registered name (see :func:`list_tasks`), ``file:PATH`` (a local
            ``.jsonl``/``.json``/``.csv``/``.parquet``/``.arrow`` file or dataset directory; see
            :class:`~denser.tasks.file_task.FileTask`), ``hf:NAME[:CONFIG]`` (a hub dataset or
            local dataset directory; :class:`~denser.tasks.file_task.HFTask`) or ``mix:A+B[+C...]``
            (several tasks interleaved; :class:`~denser.tasks.mixed.MixedTask`). Options may follow
            a ``?``: ``"addition?seed=3&num_eval=50"``.
        **options: constructor options (``seed``, ``num_train``, ``num_eval``, ...); they
            override inline options.
    """
    base, inline = _split_options(name)
    options = {**inline, **options}
    args: tuple[str, ...] = ()
    if base.startswith(FILE_PREFIX):
        factory, args = FileTask, (base[len(FILE_PREFIX):],)
    elif base.startswith(HF_PREFIX):
        factory, args = HFTask, (base[len(HF_PREFIX):],)
    elif base.startswith(MIX_PREFIX):
        factory, args = MixedTask, (base[len(MIX_PREFIX):].split("+"),)
    else:
        if base not in _TASKS:
            _load_plugins()
        if base not in _TASKS:
            known = ", ".join(list_tasks())
            raise ValueError(f"unknown task {name!r}. Known tasks: {known}; or file:PATH.jsonl for a local file, "
                             "hf:NAME[:CONFIG] for a dataset, mix:A+B for several tasks at once")
        factory = _TASKS[base]
    try:
        return factory(*args, **options)
    except TypeError as exc:
        raise TypeError(f"task {base!r}: bad options {sorted(options)}: {exc}") from exc


def _load_plugins() -> None:
    """Register the tasks of installed packages (entry-point group ``denser.tasks``, see
    :mod:`denser.plugins`): a module entry registers on import; a ``Task`` subclass (or a factory
    function) entry is registered under the entry's name."""
    for entry, obj in load_entry_points(TASKS_GROUP):
        if callable(obj) and obj not in _TASKS.values() and (not isinstance(obj, type) or issubclass(obj, Task)):
            try:
                register_task(entry)(obj)
            except ValueError as e:
                raise PluginError(f"plugin {entry!r} ({TASKS_GROUP} entry point {_qualified(obj)}): {e}") from None


def _split_options(name: str) -> tuple[str, dict[str, Any]]:
    base, sep, query = str(name).partition("?")
    if not sep:
        return base, {}
    return base, {k: _coerce(v) for k, v in parse_qsl(query, keep_blank_values=True, strict_parsing=True)}


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
