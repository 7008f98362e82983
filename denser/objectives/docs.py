"""The reference section of ``docs/objectives.md``, generated from the registry.

    python -m denser.objectives.docs           # rewrite the generated section in place
    python -m denser.objectives.docs --check   # exit 1 if the file is out of date

The section sits between ``BEGIN`` and ``END`` markers; everything around it is hand-written.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from denser.objectives.base import field_help, list_objectives, objective_class, objective_fields
from denser.objectives.fields import type_name

BEGIN = "<!-- BEGIN GENERATED: python -m denser.objectives.docs -->"
END = "<!-- END GENERATED -->"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "objectives.md"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def objective_section(name: str, doc: str, signals) -> str:
    cls = objective_class(name)
    obj = cls()
    hints = typing.get_type_hints(cls)
    lines = [
        f"### `{name}`",
        "",
        doc,
        "",
        f"Signals with the defaults: {', '.join(f'`{s}`' for s in sorted(map(str, signals)))}. "
        f"Separable: `{obj.separable}`."
        + ("" if not obj.run_defaults() else " Run options it turns on (where the user sets none): "
           + ", ".join(f"`{k}={v!r}`" for k, v in obj.run_defaults().items()) + "."),
        "",
        "| field | type | default | help |",
        "| --- | --- | --- | --- |",
    ]
    for f in objective_fields(cls):
        lines.append(
            f"| `{f.name}` | {_cell(type_name(hints.get(f.name)))} | `{_cell(repr(f.default))}` | {_cell(field_help(f))} |"
        )
    return "\n".join(lines)


def reference_markdown() -> str:
    """The generated section (without markers): one table per built-in registered objective."""
    rows = [row for row in list_objectives() if objective_class(row[0]).__module__.startswith("denser.")]
    return "\n\n".join(objective_section(name, doc, signals) for name, doc, signals in rows) + "\n"


def render(text: str) -> str:
    """``text`` with the generated section replaced by the current registry's."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the document has no generated section ({BEGIN} ... {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{reference_markdown()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = "--check" in args
    paths = [a for a in args if not a.startswith("--")]
    path = Path(paths[0]) if paths else DEFAULT_PATH
    text = path.read_text()
    new = render(text)
    if check:
        if new != text:
            print(f"{path} is out of date; run: python -m denser.objectives.docs", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
