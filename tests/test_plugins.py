"""Plugins: the user's objectives and tasks reach the command line (--import, a config file's
``import:``, installed entry points), the Python API runs the same loop, and a bad plugin is one
line naming its module, exit code 2, before any compute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import denser
from denser.cli import main, parse_train_args
from denser.cli.flags import parse_continual_args
from denser.engines import HFRolloutEngine
from denser.objectives import (
    LossOutput,
    Metric,
    Objective,
    Signal,
    aggregate,
    objective_class,
    register_objective,
    unregister_objective,
)
from denser.plugins import PluginError, import_plugin

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "objectives.md"
SMALL = ["--model", "tiny", "--max-new-tokens", "4", "--num-generations", "2", "--prompts-per-step", "2",
         "--eval-size", "2", "--no-progress"]


def docs_example() -> str:
    from test_objectives_docs import example_block

    return example_block()


def run_denser(args: list[str], cwd: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), extra_path) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "denser", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=cwd)


@pytest.fixture
def no_compute(monkeypatch):
    def generate(*a, **k):
        raise AssertionError("generation started: the error should have come before any compute")

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)


def one_error_line(capsys, argv, command="train") -> str:
    code = main([command, *argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith(f"denser {command}: error: "), err
    assert "Traceback" not in out + err
    return lines[0]


# ------------------------------------------------------------------------------ the docs example


def test_docs_reinforce_example_trains_from_the_command_line(tmp_path):
    """docs/objectives.md's `reinforce`, saved as a module, trains two steps with `denser train --import`."""
    module = tmp_path / "plugins" / "my_objectives.py"
    module.parent.mkdir()
    module.write_text(docs_example())
    run = tmp_path / "run"
    proc = run_denser(["train", "--import", str(module), "--objective", "reinforce", "--scale", "0.5", *SMALL,
                       "--steps", "2", "--output-dir", str(run)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all("logp" in r for r in steps)  # the plugin's own metric reached the log
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["objective"] == "reinforce" and config["objective_args"] == {"scale": 0.5}
    assert config["import"] == [str(module.resolve())]  # so the config file finds the objective again
    assert (run / "checkpoints" / "step-000002" / "model" / "config.json").is_file()
    # the run's own config.yaml, passed back, imports the plugin (another process, another directory)
    proc = run_denser(["train", "--config", str(run / "config.yaml"), "--help"], cwd=tmp_path / "plugins")
    assert proc.returncode == 0 and "--scale" in proc.stdout, proc.stderr


def test_import_by_module_name_and_config_key(tmp_path, monkeypatch):
    (tmp_path / "mine_by_name.py").write_text(docs_example().replace('"reinforce"', '"reinforce_by_name"'))
    monkeypatch.chdir(tmp_path)  # a module name is found in the current directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    try:
        cfg, objective = parse_train_args(["--import", "mine_by_name", "--objective", "reinforce_by_name",
                                           "--scale", "2", "--model", "tiny"])
        assert objective.name == "reinforce_by_name" and objective.scale == 2.0
        config = tmp_path / "c.yaml"
        config.write_text("import: mine_by_name\nobjective: reinforce_by_name\nscale: 3\n")
        cfg, objective = parse_train_args(["--config", str(config)])
        assert objective.scale == 3.0
        # continual and eval take --import too (the objective's flags are built after it)
        cfg, objective, _, values = parse_continual_args(["--import", "mine_by_name", "--objective", "reinforce_by_name",
                                                       "--tasks", "addition,compare"])
        assert objective.name == "reinforce_by_name" and values["tasks"] == ["addition", "compare"]
    finally:
        unregister_objective("reinforce_by_name")
        sys.modules.pop("mine_by_name", None)


def test_importing_a_plugin_twice_registers_it_once(tmp_path):
    path = tmp_path / "twice.py"
    path.write_text(docs_example().replace('"reinforce"', '"reinforce_twice"'))
    try:
        first = import_plugin(str(path))
        assert import_plugin(str(path)) is first
        assert import_plugin(str(tmp_path / "." / "twice.py")) is first
        cls = objective_class("reinforce_twice")
        register_objective("reinforce_twice")(cls)  # the same class again is harmless
        assert objective_class("reinforce_twice") is cls
    finally:
        unregister_objective("reinforce_twice")


def test_python_api_runs_the_same_loop(tmp_path):
    """denser.train with a registered instance and a task instance returns the run directory."""
    from denser.tasks import get_task

    @register_objective("test_api_reinforce")
    class ApiReinforce(Objective):
        scale: float = 1.0

        def signals(self):
            return frozenset({Signal.REWARDS, Signal.ADVANTAGES})

        def loss(self, stats, batch):
            per_token = -self.scale * batch.token_advantages() * stats.logp
            return LossOutput(aggregate(per_token, batch, "token-mean"),
                              {"logp": Metric.of(stats.logp, batch.token_mask)})

    try:
        cfg = denser.TrainConfig(model="tiny", steps=1, max_new_tokens=4, num_generations=2, prompts_per_step=2,
                                 eval_size=2, progress=False)
        run = denser.train(cfg, objective=ApiReinforce(scale=0.5), task=get_task("compare", seed=0),
                           output_dir=str(tmp_path / "api"), log=lambda m: None)
        assert run == tmp_path / "api"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["objective"] == "test_api_reinforce" and config["task"] == "compare"
        assert config["objective_args"] == {"scale": 0.5}
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 1]
        with pytest.raises(ValueError, match="TrainConfig fields"):
            denser.train(cfg, objective="grpo", learning_rate=0.1)
        with pytest.raises(ValueError, match="not registered"):
            denser.train(cfg, objective=Objective())
    finally:
        unregister_objective("test_api_reinforce")


# ----------------------------------------------------------------------------------- bad plugins


@pytest.mark.parametrize("source, needles", [
    ("def broken(:\n", ["importing it failed: SyntaxError", "bad_plugin.py:1"]),
    ("import denser_no_such_dependency\n", ["importing it failed: ModuleNotFoundError",
                                            "denser_no_such_dependency", "bad_plugin.py:1"]),
    ("raise RuntimeError('boom\\non two lines')\n", ["RuntimeError: boom on two lines"]),
    ("from denser.objectives import Objective, register_objective\n\n@register_objective('grpo')\n"
     "class Mine(Objective):\n    pass\n", ["'grpo' is already registered", "denser.objectives.grpo.GRPO",
                                            "must pick another name"]),
])
def test_a_bad_plugin_is_one_line_naming_the_module(tmp_path, capsys, no_compute, source, needles):
    path = tmp_path / "bad_plugin.py"
    path.write_text(source)
    line = one_error_line(capsys, ["--import", str(path), *SMALL])
    assert f"--import {path}:" in line
    for needle in needles:
        assert needle in line, (needle, line)
    assert "bad_plugin" not in sys.modules  # a failed import leaves nothing half-registered behind


def test_missing_plugins_and_their_config_key(tmp_path, capsys, no_compute):
    line = one_error_line(capsys, ["--import", "denser_no_such_plugin", *SMALL])
    assert "--import denser_no_such_plugin: no module named 'denser_no_such_plugin'" in line
    line = one_error_line(capsys, ["--import", str(tmp_path / "none.py"), *SMALL])
    assert "no such file" in line
    config = tmp_path / "c.yaml"
    config.write_text("import: [denser_no_such_plugin]\n")
    line = one_error_line(capsys, ["--config", str(config), *SMALL])
    assert f"--config {config}: import denser_no_such_plugin: no module named" in line
    config.write_text("import: 3\n")
    assert "expected a module name" in one_error_line(capsys, ["--config", str(config)])
    # eval, objectives and tasks take --import too
    assert "no module named" in one_error_line(capsys, ["--import", "denser_no_such_plugin"], command="eval")
    assert "no module named" in one_error_line(capsys, ["--import", "denser_no_such_plugin"], command="objectives")


def test_task_registry_refuses_a_name_from_another_class():
    from denser.tasks import register_task
    from denser.tasks.builtin import Addition

    with pytest.raises(ValueError, match="'addition' is already registered .*must pick another name"):
        @register_task("addition")
        class Other(Addition):
            pass


# ---------------------------------------------------------------------------------- entry points


def _distribution(root: Path, entry_points: str, modules: dict[str, str]) -> Path:
    """An installed distribution on a path entry: its module files and a dist-info with entry_points.txt."""
    root.mkdir(parents=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / "denser_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: denser-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return root


PLUGIN_OBJECTIVE = '''
from dataclasses import field
from denser.objectives import LossOutput, Metric, Objective, Signal, aggregate, register_objective

@register_objective("plugin_reinforce")
class PluginReinforce(Objective):
    """REINFORCE from an installed package."""

    plugin_scale: float = field(default=1.0, metadata={"help": "multiplies the plugin loss"})

    def signals(self):
        return frozenset({Signal.REWARDS, Signal.ADVANTAGES})

    def loss(self, stats, batch):
        per_token = -self.plugin_scale * batch.token_advantages() * stats.logp
        return LossOutput(aggregate(per_token, batch, "token-mean"), {"logp": Metric.of(stats.logp, batch.token_mask)})


class NotYetRegistered(PluginReinforce):
    """Registered by its entry point's name."""
'''
PLUGIN_TASK = '''
from denser.tasks.builtin import Addition

class Doubling(Addition):
    """what is twice a number"""
    description = "double a number (from an installed package)"
'''


def test_entry_points_reach_listings_help_and_train(tmp_path):
    site = _distribution(tmp_path / "site", """
        [denser.objectives]
        plugin_reinforce = denser_test_objectives
        plugin_class = denser_test_objectives:NotYetRegistered

        [denser.tasks]
        doubling = denser_test_tasks:Doubling
        """, {"denser_test_objectives": PLUGIN_OBJECTIVE, "denser_test_tasks": PLUGIN_TASK})
    proc = run_denser(["objectives"], cwd=tmp_path, extra_path=str(site))
    assert proc.returncode == 0, proc.stderr
    assert "plugin_reinforce" in proc.stdout and "REINFORCE from an installed package" in proc.stdout
    assert "plugin_class" in proc.stdout
    proc = run_denser(["tasks"], cwd=tmp_path, extra_path=str(site))
    assert proc.returncode == 0 and "doubling" in proc.stdout and "from an installed package" in proc.stdout
    proc = run_denser(["train", "--objective", "plugin_reinforce", "--help"], cwd=tmp_path, extra_path=str(site))
    assert proc.returncode == 0, proc.stderr
    assert "--plugin-scale" in proc.stdout and "multiplies the plugin loss" in proc.stdout
    assert "plugin_reinforce" in proc.stdout.split("Objectives:")[1]  # listed among the objectives
    run = tmp_path / "run"
    proc = run_denser(["train", "--objective", "plugin_class", "--task", "doubling", "--plugin-scale", "0.5", *SMALL,
                       "--steps", "1", "--output-dir", str(run)], cwd=tmp_path, extra_path=str(site))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["objective"] == "plugin_class" and config["task"] == "doubling"
    assert config["import"] == ["denser_test_objectives", "denser_test_tasks"]


def test_a_broken_entry_point_is_one_line_naming_it(tmp_path):
    site = _distribution(tmp_path / "site", """
        [denser.objectives]
        broken = denser_test_broken
        """, {"denser_test_broken": "import denser_no_such_dependency\n"})
    for argv in (["objectives"], ["train", "--objective", "not_builtin", "--model", "tiny"]):
        proc = run_denser(argv, cwd=tmp_path, extra_path=str(site))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert "plugin 'broken' (denser.objectives entry point 'denser_test_broken')" in lines[0]
        assert "ModuleNotFoundError" in lines[0] and "denser_no_such_dependency" in lines[0]
    # a built-in objective never loads the plugins: a broken one does not stand in its way
    proc = run_denser(["train", "--objective", "grpo", "--steps", "x"], cwd=tmp_path, extra_path=str(site))
    assert proc.returncode == 2 and "--steps: 'x' is not a valid int" in proc.stderr and "broken" not in proc.stderr


def test_plugin_error_is_a_value_error():
    assert issubclass(PluginError, ValueError)


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    import re

    block = re.search(r"## Train with an objective\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(),
                      re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README-api-example", "exec"), namespace)
    assert namespace["run_dir"] == Path("runs/grpo-addition") and (tmp_path / "runs/grpo-addition/config.yaml").exists()
    metrics = namespace["result"]["tasks"]["addition"]["metrics"]
    assert set(metrics) == {"greedy", "mean@4", "pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"}
    assert metrics["pass@1"]["mean"] <= metrics["pass@4"]["mean"]
