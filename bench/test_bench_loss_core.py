"""pytest-benchmark cases of the loss core (not run by CI's test command):

    pytest bench --benchmark-only
"""

import pytest
import torch

from denser.kernels import fused_loss, token_stats
from denser.objectives import PolicyBatch, get_objective

N, H, V = 512, 128, 8192


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).requires_grad_()
    teacher = hidden.detach() + 0.5 * torch.randn(N, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, teacher, targets


def _floor(hidden, weight, teacher, targets):
    with torch.no_grad():
        z_s, z_t = hidden @ weight.t(), teacher @ weight.t()
        return z_s @ weight, z_t.t() @ hidden


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_token_stats_jsd(benchmark, inputs, backend):
    hidden, weight, teacher, targets = inputs

    def step():
        hidden.grad = weight.grad = None
        s = token_stats(hidden, weight, targets, teacher_hidden=teacher, alpha=0.5, backend=backend)
        s.divergence.mean().backward()

    benchmark(step)


@pytest.mark.parametrize("objective", ["sdpo", "sdpo-topk", "grpo"])
def test_fused_loss(benchmark, inputs, objective):
    hidden, weight, teacher, targets = inputs
    obj = {"sdpo": lambda: get_objective("sdpo", distill_mode="full"), "grpo": lambda: get_objective("grpo"),
           "sdpo-topk": lambda: get_objective("sdpo", distill_mode="topk")}[objective]()
    seq_ids = torch.arange(N) * 8 // N
    batch = PolicyBatch(seq_ids=seq_ids, num_seqs=8, global_tokens=float(N), global_seqs=8.0, advantages=torch.randn(8),
                        teacher_mask=torch.ones(8, dtype=torch.bool))
    kw = {"teacher_hidden": teacher} if objective.startswith("sdpo") else {}

    def step():
        hidden.grad = weight.grad = None
        fused_loss(hidden, weight, targets, obj, batch, backend="chunked", **kw).loss.backward()

    benchmark(step)


def test_matmul_floor(benchmark, inputs):
    benchmark(_floor, *inputs)
