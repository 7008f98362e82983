"""LoRA training with peft: the policy is the base model plus a low-rank adapter, and everything
that used to be a second copy of the weights is the base model itself.

``--lora-r R`` (> 0) wraps the policy with peft (:func:`attach_lora`): only the adapter's ``A`` and
``B`` matrices train, every base weight is frozen, the output layer included (so the loss core gets
an ``lm_head.weight`` that needs no gradient and skips the dW matmul). The other models the loop
may need are views of that one model (:class:`AdapterView`), never copies:

- the frozen reference (``ref_logp``), a ``frozen`` teacher and the ``trust-region`` teacher's
  reference: the policy with its adapter disabled (= the base model, since a fresh adapter's ``B``
  is zero, the model the run started from);
- an ``ema`` teacher: the base model with an exponential moving average of the adapter's weights,
  ``A`` and ``B`` averaged separately (``trainers.teacher.LoraTeacherWeights``; the EMA of a product
  ``B @ A`` is not the product of the EMAs, so this teacher is not the EMA of the full weights; it is
  what keeps the teacher's memory at one adapter);
- the ``live`` teacher: the policy itself, as without LoRA.

``--teacher-path`` loads its own full model as before (``frozen`` and ``trust-region``; an EMA of
adapter weights cannot start from another model, so ``ema`` with a path is refused, as is
``--teacher-init-alpha`` below 1 with a path: that mixes full weights with the policy's). Which
teacher a run gets is decided in one place, ``trainers.teacher.build_teacher`` (``lora=True``);
this module gives it the views.

Checkpoints hold the adapter in peft's format in ``<ckpt>/model`` (``adapter_config.json``,
``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained(base, <ckpt>/model)``);
``--merge-lora`` adds ``<ckpt>/merged``, the base with the adapter merged in, loadable with
``AutoModelForCausalLM.from_pretrained``, to the final checkpoint; :func:`merge_lora` (``denser
merge-lora``) merges any checkpoint afterwards. A resumed run loads the base model again
(``--model``) and the adapter from the checkpoint. FSDP with LoRA is not supported (refused).

A continual run's stages chain adapters (:class:`AdapterChain`, ``denser continual --lora-stages``):
``keep`` trains one adapter through every stage (stage k starts from stage k-1's adapter); ``merge``
makes each finished stage's adapter part of the weights and trains a fresh one. The base model is
never changed: the earlier stages' adapters stay beside it, frozen and active (their low-rank updates
add up to what merging them would), so the base with every adapter disabled is still the sequence's
initial model, the KL reference, without a second copy of the weights. :func:`effective_weights`
gives the weights the policy computes with (base plus every active adapter's update), layer by layer.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch import Tensor, nn
from torch.func import functional_call

from denser.trainers import checkpoint as ckpt
from denser.trainers.models import load_model
from denser.trainers.sharding import fsdp_requested

#: ``--lora-target-modules`` default: every linear layer of the blocks (peft's shorthand; never the output layer)
ALL_LINEAR = "all-linear"
#: where ``--merge-lora`` puts the merged model inside a checkpoint
MERGED_DIR = "merged"
ADAPTER_CONFIG = "adapter_config.json"

__all__ = ["ALL_LINEAR", "MERGED_DIR", "AdapterChain", "AdapterView", "attach_lora", "check_lora_run",
           "effective_weights", "is_adapter_dir", "is_lora", "load_lora_policy", "merge_lora", "merged_model",
           "trainable_adapter"]


def _peft():
    # lazy: peft is an optional extra (denser[lora]); TrainConfig names it when --lora-r needs it
    import peft

    return peft


# ------------------------------------------------------------------------------------ attach


def _target_modules(spec: str, model: nn.Module) -> str | list[str]:
    """``--lora-target-modules`` as peft takes it, checked against ``model``: ``all-linear`` or a
    list of module names (each matching the end of a module's dotted name). Raises ``ValueError``
    naming the flag for a name that matches no module, matches a non-linear one, or names the
    input or output embeddings (their weight is the loss core's frozen ``lm_head``, or tied to it)."""
    if spec.strip().lower() == ALL_LINEAR:
        return ALL_LINEAR
    names = [n.strip() for n in spec.split(",") if n.strip()]
    modules = dict(model.named_modules())
    embeddings = {id(model.get_output_embeddings()), id(model.get_input_embeddings())}
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                     if isinstance(m, nn.Linear) and id(m) not in embeddings})
    problems = []
    for name in names:
        hits = [m for n, m in modules.items() if n == name or n.endswith("." + name)]
        if not hits:
            problems.append(f"{name!r} matches no module")
        elif any(id(m) in embeddings for m in hits):
            problems.append(f"{name!r} is the input or output embedding layer, which stays frozen (the loss core "
                            "reads the output layer's weight as is)")
        elif not all(isinstance(m, nn.Linear) for m in hits):
            problems.append(f"{name!r} is not a linear layer")
    if problems:
        raise ValueError(f"--lora-target-modules {spec}: {'; '.join(problems)}; give '{ALL_LINEAR}' or "
                         f"comma-separated linear layers of the blocks, of this model: {', '.join(linear)}")
    return names


def attach_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: str = ALL_LINEAR,
                adapter: str | os.PathLike | None = None) -> nn.Module:
    """``model`` (loaded, unwrapped) wrapped with a trainable LoRA adapter: peft's ``PeftModel``.

    A fresh adapter (``B = 0``: the wrapped model computes what ``model`` did) with rank ``r``,
    scale ``alpha / r`` and dropout on the adapter's input, on ``target_modules``; or, with
    ``adapter`` (a directory in peft's format, e.g. a checkpoint's ``model/``), that adapter's
    weights, trainable. Every base parameter is frozen, the output layer included. The adapter's
    ``base_model_name_or_path`` is the base model's directory (empty for ``--model tiny``)."""
    peft = _peft()
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if adapter is not None:
            policy = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        else:
            config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                                     target_modules=_target_modules(target_modules, model))
            policy = peft.get_peft_model(model, config)
    head = policy.get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()):  # e.g. an adapter from elsewhere that trains lm_head
        raise ValueError("the LoRA adapter trains the output layer; denser's loss core reads the output layer's "
                         "weight directly, so only adapters of the blocks' layers are supported")
    return policy


def trainable_adapter(policy: nn.Module) -> dict[str, Tensor]:
    """The adapter's trainable tensors (``lora_A`` and ``lora_B`` of each adapted layer), keyed by
    their names relative to the decoder (``policy.get_decoder()``). Raises ``ValueError`` when one
    lies outside the decoder (the views below run only the decoder)."""
    decoder = policy.get_decoder()
    inside = {id(p): n for n, p in decoder.named_parameters()}
    out = {}
    for name, p in policy.named_parameters():
        if p.requires_grad:
            if id(p) not in inside:
                raise ValueError(f"LoRA parameter {name} lies outside the model's decoder; adapt the blocks' layers only")
            out[inside[id(p)]] = p
    return out


# ------------------------------------------------------------------------------------- views


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class AdapterView:
    """The LoRA policy run with other adapter weights: the base model (``weights=None``: the adapter
    disabled) or the base with ``weights`` in place of the adapter's (an EMA teacher's). Not a copy:
    it holds no base weight of its own.

    It offers what the loop asks of a frozen model (``get_decoder()``, ``get_output_embeddings()``,
    ``parameters()``, ``eval()``, ``to()``, ``config``), so it stands where a reference or teacher
    model stands. Its decoder always runs in eval mode (no adapter dropout) and without gradients."""

    def __init__(self, policy: nn.Module, weights: dict[str, Tensor] | None = None):
        self.policy, self.weights = policy, weights
        self.training = False

    @property
    def config(self) -> Any:
        return self.policy.config

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def get_input_embeddings(self) -> nn.Module:
        return self.policy.get_input_embeddings()

    def get_decoder(self):
        return self._decode

    @torch.no_grad()
    def _decode(self, **inputs: Any) -> Any:
        decoder = self.policy.get_decoder()
        with _eval_mode(self.policy):
            if self.weights is None:
                with self.policy.disable_adapter():
                    return decoder(**inputs)
            return functional_call(decoder, self.weights, args=(), kwargs=inputs, strict=False)

    def parameters(self) -> Iterator[Tensor]:
        return iter(self.weights.values()) if self.weights else self.policy.parameters()

    def eval(self) -> "AdapterView":
        return self

    def train(self, mode: bool = True) -> "AdapterView":
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "AdapterView":
        return self

    def to(self, device: Any) -> "AdapterView":
        if self.weights is not None:
            for k, v in self.weights.items():
                self.weights[k] = v.to(device)
        return self


def check_lora_run(cfg: Any, accelerator: Any) -> None:
    """Refuse what LoRA does not support, before any model is loaded: FSDP (``--fsdp`` or an
    accelerate FSDP config; the sharded policy and peft's adapter layers are not wired together)."""
    if cfg.lora_r and fsdp_requested(cfg.fsdp, accelerator):
        raise ValueError("--lora-r with FSDP (--fsdp or an accelerate FSDP config) is not supported: a LoRA run holds "
                         "one frozen base model and a small adapter, which one process or DDP trains; drop --fsdp "
                         "or --lora-r")


@dataclass(frozen=True)
class AdapterChain:
    """What a continual stage's LoRA policy starts from (``denser continual --lora-stages``).

    ``mode``: ``keep`` (the trainable adapter starts as the last of ``adapters``) or ``merge`` (every
    one of ``adapters`` is attached frozen and active, the trainable adapter is fresh).
    ``adapters``: the earlier stages' final adapters (peft directories: their checkpoints' ``model/``), in order."""

    mode: str
    adapters: tuple[str, ...] = ()


def load_lora_policy(cfg: Any, resume_from: Path | None, chain: AdapterChain | None = None) -> tuple[nn.Module, Any]:
    """``(policy, tokenizer)`` of a LoRA run: the base model ``cfg.model`` with a fresh adapter (or the
    adapter of ``resume_from``; or, in a continual stage, as ``chain`` says). The reference and the
    teacher are views of it: ``AdapterView(policy)`` (the base model) and
    ``trainers.teacher.build_teacher(..., lora=True)``."""
    with ckpt.quiet_transformers():
        base, tokenizer = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), seed=cfg.seed)
    adapter = resume_from / "model" if resume_from is not None else None
    if adapter is None and chain is not None and chain.mode == "keep" and chain.adapters:
        adapter = Path(chain.adapters[-1])
    policy = attach_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.lora_target_modules, adapter=adapter)
    if chain is not None and chain.mode == "merge" and chain.adapters:
        _add_frozen_adapters(policy, [(f"stage{i + 1}", p) for i, p in enumerate(chain.adapters)])
    return policy, tokenizer


def _add_frozen_adapters(policy: nn.Module, adapters: list[tuple[str, str | os.PathLike]]) -> None:
    """Attach ``adapters`` (name, peft directory) to ``policy``, frozen and active beside its own
    (trainable) adapter: the policy computes with the base plus every one of their updates. peft
    saves them with the policy's adapter (as subdirectories ``<name>/`` of its directory)."""
    own = policy.active_adapter
    for name, path in adapters:
        policy.load_adapter(str(path), adapter_name=name, is_trainable=False)
    policy.base_model.set_adapter([name for name, _ in adapters] + [own])  # peft makes them trainable: undone below
    for n, p in policy.named_parameters():
        p.requires_grad_("lora_" in n and f".{own}." in n)


def _stage_adapters(adapter_dir: Path) -> list[tuple[str, Path]]:
    """The earlier stages' adapters a ``--lora-stages merge`` checkpoint holds beside its own."""
    found = [d for d in adapter_dir.iterdir() if d.is_dir() and re.fullmatch(r"stage\d+", d.name)
             and (d / ADAPTER_CONFIG).is_file()]
    return [(d.name, d) for d in sorted(found, key=lambda d: int(d.name[5:]))]


def is_lora(model: Any) -> bool:
    """``model`` is a peft model (a LoRA policy)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def effective_weights(policy: nn.Module, *, adapters: bool = True) -> Mapping[str, Tensor]:
    """The weights the LoRA ``policy`` computes with, under the plain model's parameter names: each
    adapted layer's base weight plus the updates of its active adapters (``B @ A`` scaled, what
    merging them gives), the other parameters as they are; ``adapters=False``: the base weights
    alone (the initial model's, never changed). Computed on access, one layer at a time (a mapping:
    the drift meter reads one parameter at a time)."""
    return _EffectiveWeights(policy, adapters)


class _EffectiveWeights(Mapping):
    def __init__(self, policy: nn.Module, adapters: bool):
        self.adapters = adapters
        model = policy.get_base_model()
        self._layers: dict[str, nn.Module] = {}
        self._plain: dict[str, Tensor] = {}
        adapted = {}
        for name, module in model.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                adapted[name] = module
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            owner = next((m for m in adapted if name.startswith(m + ".base_layer.")), None)
            if owner is None:
                self._plain[name] = p
            else:
                key = owner + "." + name[len(owner) + len(".base_layer."):]
                (self._layers if key.endswith(".weight") else self._plain)[key] = adapted[owner] if key.endswith(
                    ".weight") else p

    def __getitem__(self, name: str) -> Tensor:
        if name in self._plain:
            return self._plain[name].detach()
        layer = self._layers[name]
        w = layer.base_layer.weight.detach()
        for a in layer.active_adapters if self.adapters else ():
            if a in layer.lora_A and not getattr(layer, "disable_adapters", False):
                w = w + layer.get_delta_weight(a).detach().to(w.dtype)
        return w

    def __iter__(self):
        return iter([*self._plain, *self._layers])

    def __len__(self) -> int:
        return len(self._plain) + len(self._layers)


# ------------------------------------------------------------------------------------- merge


def merged_model(policy: nn.Module) -> nn.Module:
    """A copy of the LoRA ``policy`` with the adapter merged into the base weights: a plain
    transformers model (``save_pretrained`` -> loadable with ``from_pretrained``). ``policy`` is
    unchanged (the copy costs one model's memory while it lives)."""
    return copy.deepcopy(policy).merge_and_unload()


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """A directory holding a peft adapter (``adapter_config.json``) and no full model (``config.json``)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def merge_lora(path: str | os.PathLike, output: str | os.PathLike | None = None, *,
               model: str | None = None) -> Path:
    """Merge the LoRA adapter of a checkpoint (or of a run directory's newest complete checkpoint)
    into its base model and write the result, loadable with ``from_pretrained``, to ``output``
    (default ``<run>/merged-step-NNNNNN``), atomically (a temporary directory renamed into place).

    The base model is the run's ``--model`` (with its ``--seed`` and ``--dtype``, from the run's
    ``config.yaml``) unless ``model`` names another. Returns ``output``."""
    found = ckpt.checkpoint_of(path)
    if found is None or not is_adapter_dir(found / "model"):
        raise ValueError(f"{path}: no LoRA checkpoint there (a checkpoint's model/ with {ADAPTER_CONFIG}); "
                         "only runs trained with --lora-r have an adapter to merge")
    run_dir = found.parent.parent
    config = {}
    if (run_dir / "config.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    name = model or config.get("model")
    if not name:
        raise ValueError(f"{path}: the run's config.yaml names no --model; pass the base model with --model")
    out = Path(output) if output is not None else run_dir / f"merged-{found.name}"
    if out.exists():
        raise ValueError(f"{out} exists; remove it or pass another --output")
    with ckpt.quiet_transformers():
        base, tokenizer = load_model(name, dtype=config.get("dtype", "float32"), seed=int(config.get("seed", 0)))
        policy = attach_lora(base, r=0, alpha=0.0, dropout=0.0, adapter=found / "model")
        stages = _stage_adapters(found / "model")  # a `denser continual --lora-stages merge` stage: all of them
        if stages:
            _add_frozen_adapters(policy, stages)
        merged = policy.merge_and_unload()
        return ckpt.write_model_dir(out, merged, tokenizer, {
            "denser_merged_from.json": json.dumps({"checkpoint": str(found), "base": name})})
