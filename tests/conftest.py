import os

import pytest
import torch

# Two CI cores: keep intra-op threads predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen():
    """A fresh generator per test, seeded from the test's name (inputs differ per test)."""
    import zlib

    name = os.environ.get("PYTEST_CURRENT_TEST", "seed")
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


TINY_CONTINUAL = ["--model", "tiny", "--steps-per-task", "1", "--eval-size", "2", "--max-new-tokens", "6",
                  "--num-generations", "2", "--prompts-per-step", "1", "--spectral-rank", "4", "--no-progress",
                  "--lr", "1e-3", "--eval-samples", "2"]


@pytest.fixture(scope="session")
def tiny_sdpo_run(tmp_path_factory):
    """A tiny sdpo continual run over addition, compare (reverse held out), the optimizer carried,
    through the CLI; shared by the continual and compare tests, which copy it before changing anything."""
    from denser.cli import main

    sdpo = tmp_path_factory.mktemp("continual") / "sdpo"
    assert main(["continual", "--objective", "sdpo", "--tasks", "addition,compare", "--eval-tasks", "reverse",
                 "--carry-optimizer", "--output-dir", str(sdpo), *TINY_CONTINUAL]) == 0
    return sdpo


@pytest.fixture(scope="session")
def tiny_continual_runs(tiny_sdpo_run):
    """``tiny_sdpo_run`` and a tiny grpo run of the same sequence, the optimizer reset, sdpo's stage 0 reused."""
    from denser.cli import main

    sdpo = tiny_sdpo_run
    grpo = sdpo.parent / "grpo"
    assert main(["continual", "--objective", "grpo", "--tasks", "addition,compare", "--eval-tasks", "reverse",
                 "--output-dir", str(grpo), "--initial-eval-from", str(sdpo), *TINY_CONTINUAL]) == 0
    return sdpo, grpo
