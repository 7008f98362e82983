"""Sharded loading (denser/trainers/sharded_load.py): a model built empty and filled shard by shard
from its safetensors file equals the same model loaded whole and then sharded, bit for bit.

Multi-process cases run this file under ``torch.distributed.run`` (its ``__main__`` block): each
process loads a saved model both ways, shards both, gathers every parameter and buffer and compares
them exactly, then compares the two models' logits. The saved models have rows that do not divide
among the processes (an intermediate size of 67, a vocabulary of the tiny tokenizer's size), a tied
output layer stored once, and an index over several safetensors files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def save_models(root: Path) -> list[tuple[str, str]]:
    """Two saved tiny models: untied in one file (float32), tied over several files (saved in
    bfloat16). Returns ``(directory, dtype to load in)`` pairs, bfloat16 loaded as float32 too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from denser.trainers.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    out = []
    for name, tied, dtype in [("untied", False, torch.float32), ("tied", True, torch.bfloat16)]:
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=67, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(len(name))
        model = LlamaForCausalLM(config).to(dtype)
        path = root / name
        model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB" if tied else "1GB")
        tok.save_pretrained(path)
        out.append((str(path), str(dtype).removeprefix("torch.")))
    out.append((out[1][0], "float32"))
    return out


def _compare(path: str, dtype: str) -> dict:
    """In a process group: load ``path`` whole and empty, shard both, compare (every process)."""
    from denser.trainers.models import load_model
    from denser.trainers.sharded_load import is_empty
    from denser.trainers.sharding import ModelCall, Sharding, fsdp_plugin

    sharding = Sharding(fsdp_plugin(), torch.device("cpu"))
    whole, tok = load_model(path, dtype=dtype)
    empty, _ = load_model(path, dtype=dtype, empty=True)
    assert is_empty(empty) and not is_empty(whole)
    tied = whole.config.tie_word_embeddings
    a = sharding.shard(ModelCall(whole), frozen=True)
    b = sharding.shard(ModelCall(empty), frozen=True)
    assert not is_empty(empty)
    if tied:
        assert empty.lm_head.weight is empty.model.embed_tokens.weight
    sa = Sharding.full_state(whole.state_dict(), keep=True)
    sb = Sharding.full_state(empty.state_dict(), keep=True)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not differ, f"{path} ({dtype}): {differ[:4]}"
    buffers = dict(empty.named_buffers())
    for k, v in whole.named_buffers():
        assert torch.equal(v, buffers[k]), k
    ids = torch.randint(len(tok), (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        la = Sharding.run(a, lambda m: m(input_ids=ids).logits)
        lb = Sharding.run(b, lambda m: m(input_ids=ids).logits)
    assert torch.equal(la, lb)
    return {"path": path, "dtype": dtype, "params": len(sa), "tied": tied}


def _main(out: str, models: str) -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = [_compare(p, d) for p, d in json.loads(models)]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()
    return 0


@pytest.mark.parametrize("processes", [1, 2])
def test_a_model_filled_shard_by_shard_equals_it_loaded_whole(tmp_path, processes):
    models = save_models(tmp_path)
    out = tmp_path / "out.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(HERE), str(out), json.dumps(models)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["tied"] for r in results] == [False, True, True]


def test_an_empty_model_hashes_as_the_loaded_one_and_refuses_to_be_mixed(tmp_path):
    from denser.trainers.models import load_model
    from denser.trainers.sharded_load import full_tensor, is_empty
    from denser.trainers.teacher import interpolate_, weights_sha256

    for path, dtype in save_models(tmp_path):
        whole, _ = load_model(path, dtype=dtype)
        empty, _ = load_model(path, dtype=dtype, empty=True)
        assert all(p.is_meta for p in empty.parameters())
        assert weights_sha256(empty) == weights_sha256(whole)
        assert torch.equal(full_tensor(empty, "lm_head.weight"), whole.lm_head.weight)
        with pytest.raises(RuntimeError, match="no weights to mix"):
            interpolate_(empty, whole, 0.5)
        assert is_empty(empty)


def test_a_directory_without_safetensors_loads_whole(tmp_path):
    from denser.trainers.models import build_tiny_model, load_model
    from denser.trainers.sharded_load import can_load_empty, is_empty

    model, tok = build_tiny_model()
    model.save_pretrained(tmp_path)  # transformers writes safetensors only: replace them by a pickle
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    tok.save_pretrained(tmp_path)
    assert not can_load_empty(tmp_path)
    loaded, _ = load_model(str(tmp_path), empty=True)
    assert not is_empty(loaded)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


if __name__ == "__main__":
    code = _main(sys.argv[1], sys.argv[2])
    from denser.cli import exit_process  # as the entry point ends: the group destroyed, no teardown

    exit_process(code)
