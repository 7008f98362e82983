"""FSDP + vllm: each process's engine receives the sharded policy's weights gathered one tensor at a time.

    python -m torch.distributed.run --nproc_per_node 2 tests/vllm_fsdp_check.py    (with vLLM installed)

Each of two processes shards a tiny model with FSDP2, builds its vllm engine from it (the first sync
gathers every parameter), then changes every weight and syncs again; after each sync the engine's
log-probs must equal an unsharded copy's forward. Prints OK on rank 0. tests/test_vllm_engine.py runs it.
"""

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from test_vllm_engine import max_logp_error, prompts_of, tiny_model
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from denser.engines import SamplingParams, get_rollout_engine

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, tok = tiny_model(tied=True, seed=11)
    full = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    engine = get_rollout_engine("vllm", model, tok, kv_cache_gib=0.05)
    prompts = prompts_of(tok, "3+4=", f"rank {rank}")
    params = SamplingParams(max_new_tokens=8, num_generations=2, temperature=1.0)
    errors = [max_logp_error(engine, full, prompts, params)]
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)  # the same change on every process
        for (_, p), (_, q) in zip(model.named_parameters(), full.named_parameters()):
            q.add_(torch.randn(q.shape, generator=gen) * 0.05)
            p.copy_(distribute_tensor(q.detach().clone(), p.device_mesh, p.placements))
    stale = max_logp_error(engine, full, prompts, params)
    engine.update_weights(model)
    errors.append(max_logp_error(engine, full, prompts, params))
    assert max(errors) < 1e-4 and stale > 1e-2, (errors, stale)
    dist.barrier()
    if rank == 0:
        print("OK", errors, stale, flush=True)
    os._exit(0)  # vLLM's teardown of the process group it shares with the launcher is not ours to run


if __name__ == "__main__":
    main()
