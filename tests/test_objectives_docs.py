"""docs/objectives.md: the reference tables match the registry, and the example runs as written."""

import re
from pathlib import Path

import pytest
import torch

from denser.kernels import token_stats
from denser.objectives import get_objective, list_objectives, unregister_objective
from denser.objectives.docs import BEGIN, END, main, reference_markdown, render

DOC = Path(__file__).resolve().parents[1] / "docs" / "objectives.md"


def example_block() -> str:
    text = DOC.read_text()
    section = text.split("## Write your own objective", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under 'Write your own objective'"
    return match.group(1)


def test_reference_section_is_up_to_date():
    text = DOC.read_text()
    assert render(text) == text, "docs/objectives.md is stale: run python -m denser.objectives.docs"
    assert main(["--check", str(DOC)]) == 0


def test_reference_lists_every_builtin_field():
    generated = reference_markdown()
    for name, _, _ in list_objectives():
        if name.startswith("test_"):
            continue
        assert f"### `{name}`" in generated
        for field_name in get_objective(name).__dataclass_fields__:
            assert f"| `{field_name}` |" in generated


def test_check_mode_detects_a_stale_file(tmp_path):
    stale = tmp_path / "objectives.md"
    stale.write_text(f"# x\n{BEGIN}\n| old |\n{END}\n")
    assert main(["--check", str(stale)]) == 1
    assert main([str(stale)]) == 0 and main(["--check", str(stale)]) == 0


def test_write_your_own_example_runs_as_written(capsys):
    code = example_block()
    assert len(code.strip().splitlines()) <= 30
    unregister_objective("reinforce")
    namespace: dict = {}
    try:
        exec(compile(code, str(DOC), "exec"), namespace)
        out, objective, batch = namespace["out"], namespace["objective"], namespace["batch"]
        hidden, weight, targets = namespace["hidden"], namespace["weight"], namespace["targets"]
        assert objective.name == "reinforce" and objective.scale == 0.5
        assert hidden.grad is not None and torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0
        # the fused route of the example equals the plain route
        h = hidden.detach().clone().requires_grad_()
        plain = objective.loss(token_stats(h, weight, targets, backend="reference"), batch)
        plain.loss.backward()
        assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-5)
        assert torch.allclose(hidden.grad, h.grad, rtol=1e-4, atol=1e-6)
        assert "logp" in capsys.readouterr().out
    finally:
        unregister_objective("reinforce")
