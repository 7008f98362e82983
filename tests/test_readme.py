"""The README's commands and example are the ones that work."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)


def test_ci_runs_the_readme_test_command():
    test_cmd = [line for block in _bash_blocks() for line in block.splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(test_cmd) == 1, test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd[0] in ci.splitlines()


def test_main_command_is_denser_train_sdpo():
    main_cmd = [line for block in _bash_blocks() for line in block.splitlines() if "denser train" in line]
    assert main_cmd and main_cmd[0].endswith("denser train --objective sdpo")


def test_token_stats_example_runs():
    block = re.search(r"## The loss core\n\n```python\n(.*?)```", README, flags=re.DOTALL).group(1)
    exec(compile(block, "README-example", "exec"), {})
