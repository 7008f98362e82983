"""The processes of ``denser bench fsdp`` (started by torchrun; see :mod:`denser.bench.fsdp`).

    python -m denser.bench.fsdp_worker train OUT SETTINGS_JSON    # a training run, then this process's memory
    python -m denser.bench.fsdp_worker head MODEL OUT             # the teacher lm_head timings
    python -m denser.bench.fsdp_worker load MODEL whole|sharded DTYPE OUT   # one model's load peak
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def _hwm_mib() -> float:
    """The resident-memory high-water mark of this process so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def load(argv: list[str]) -> int:
    """``load MODEL whole|sharded DTYPE OUT``: load MODEL in DTYPE as an FSDP run's policy and shard it,
    ``whole`` (every process loads all of it, then keeps its shard) or ``sharded`` (built empty,
    each process reads its own rows); write OUT.<rank>.json with this process's peaks over the load
    and sharding: anonymous memory (RssAnon, sampled every millisecond by a thread) and the
    resident high-water mark (VmHWM, which also counts the file's memory-mapped pages), both
    before loading and at the end."""
    import threading
    import time

    import torch
    import torch.distributed as dist

    from denser.trainers.models import load_model
    from denser.trainers.sharding import ModelCall, Sharding, fsdp_plugin

    model_name, mode, dtype, out = argv
    dist.init_process_group("gloo")
    sharding = Sharding(fsdp_plugin(), torch.device("cpu"))
    load_model("tiny")  # transformers' model classes imported and warmed before the baseline
    dist.barrier()
    base_anon, base_hwm = _status_kib("RssAnon"), _status_kib("VmHWM")
    peak = [base_anon]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _status_kib("RssAnon"))
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    model, _ = load_model(model_name, dtype=dtype, empty=mode == "sharded")
    sharding.shard(ModelCall(model))
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    peak[0] = max(peak[0], _status_kib("RssAnon"))
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    rank = dist.get_rank()
    Path(f"{out}.{rank}.json").write_text(json.dumps({
        "rank": rank, "base_anon_mib": base_anon / 1024, "peak_anon_mib": peak[0] / 1024,
        "base_hwm_mib": base_hwm / 1024, "hwm_mib": _hwm_mib(), "shard_mib": local / 2**20, "seconds": seconds}))
    dist.destroy_process_group()
    return 0


def train(argv: list[str]) -> int:
    """``train OUT SETTINGS``: run ``Trainer`` with ``SETTINGS`` (JSON: ``objective``, ``objective_args``,
    ``config``, TrainConfig's fields); write OUT.<rank>.json with this process's peak resident memory
    before its last checkpoint (loading, sharding, the steps and evaluations) and over the whole run
    (the last checkpoint gathers whole tensors on process 0)."""
    from denser.objectives import get_objective
    from denser.trainers.config import TrainConfig
    from denser.trainers.loop import Trainer

    out, settings = argv[0], json.loads(argv[1])
    marks: dict[str, float] = {}
    trainer = Trainer(TrainConfig(**settings["config"]),
                      get_objective(settings["objective"], **settings.get("objective_args", {})))
    save = trainer.save

    def measured_save(step, **kw):  # this benchmark's instrumentation: the mark before the final checkpoint
        if kw.get("finished"):
            marks["before_last_save_mib"] = _hwm_mib()
        return save(step, **kw)

    trainer.save = measured_save
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mib": _hwm_mib(), **marks}))
    return 0


def head(argv: list[str]) -> int:
    """``head MODEL OUT``: median milliseconds of a sharded frozen model's forward alone, with a copy
    of its lm_head weight taken inside, and followed by ``full_tensor()`` of the weight."""
    import statistics
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from denser.engines.packing import build_packed_batch, completion_hidden_states, lm_head_params
    from denser.trainers.models import load_model
    from denser.trainers.sharding import ModelCall, Sharding, fsdp_plugin

    model_name, out = argv[0], argv[1]
    dist.init_process_group("gloo")
    model, _ = load_model(model_name)
    sharding = Sharding(fsdp_plugin(), torch.device("cpu"))
    root = sharding.shard(ModelCall(model.eval().requires_grad_(False)), frozen=True)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = build_packed_batch([torch.randint(vocab, (24,), generator=g).tolist() for _ in range(4)],
                               [torch.randint(vocab, (16,), generator=g).tolist() for _ in range(4)], pad_token_id=0)

    def timed(fn, n=8) -> float:
        times = []
        for _ in range(n):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times[1:])

    with torch.no_grad():
        forward = timed(lambda: Sharding.run(root, lambda m: completion_hidden_states(m, batch)))
        inside = timed(lambda: Sharding.run(root, lambda m: (completion_hidden_states(m, batch),
                                                           Sharding.keep(lm_head_params(m)[0]))))

        def after():
            Sharding.run(root, lambda m: completion_hidden_states(m, batch))
            w = lm_head_params(model)[0]
            assert isinstance(w, DTensor)
            return w.full_tensor()

        outside = timed(after)
    w = lm_head_params(model)[0]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"forward_ms": forward, "copy_inside_ms": inside, "full_tensor_after_ms": outside,
                                         "head_mib": w.numel() * w.element_size() / 2**20, "shape": list(w.shape)}))
    dist.destroy_process_group()
    return 0




if __name__ == "__main__":
    kinds = {"train": train, "head": head, "load": load}
    if sys.argv[1:2] and sys.argv[1] in kinds:
        raise SystemExit(kinds[sys.argv[1]](sys.argv[2:]))
    raise SystemExit(f"usage: python -m denser.bench.fsdp_worker {{{'|'.join(kinds)}}} ...")
