"""FSDP2: the policy, the frozen reference and the teacher sharded alike across processes.

A run is sharded when ``--fsdp`` is given (``torchrun ... -m denser train --fsdp``) or when it is
launched with an accelerate config whose ``distributed_type`` is ``FSDP``
(``accelerate launch --config_file configs/accelerate_fsdp.yaml -m denser train``). accelerate
applies FSDP only on accelerators (on CPU processes it silently runs DDP), so denser applies
PyTorch's ``fully_shard`` itself, on CPU (gloo) and GPU (NCCL) alike, with the settings of
accelerate's ``FullyShardedDataParallelPlugin`` (``fsdp_version: 2``; the wrap policy, reshard
after forward, mixed precision and CPU offload of the config; defaults for ``--fsdp``).

Every model is sharded the same way: each transformer layer is its own FSDP unit and the rest
(embeddings, final norm, lm_head) belongs to a root :class:`ModelCall`, a module whose forward
runs a function of the model, ``call(fn)`` = ``fn(model)``. Anything that needs a model's whole
parameters runs as such a function, so FSDP gathers them around it:

- the policy's loss (the root's parameters, lm_head included, stay gathered from its forward to
  its backward, where ``fused_loss`` hands back the lm_head gradient it computed in forward);
- generation and a ``live`` teacher's forward (the policy's root, then resharded);
- the frozen reference's log-probs and the teacher's hidden states and log-probs (frozen roots
  reshard after their forward: nothing of theirs stays gathered).

The teacher's lm_head weight must outlive its forward (the loss core reads it inside the
policy's forward); :meth:`Sharding.keep` copies it inside the teacher's forward, where it is
already gathered: no collective beyond the forward's own (``denser bench fsdp --teacher-head``, denser/bench/fsdp.py, measures
the alternatives). An EMA teacher updates shard by shard: its shards and the policy's are the
same slices of the same parameters, so ``lerp_`` on the local tensors is the whole update.

Checkpoints hold each process's shards (``trainers/sharded_checkpoint.py``: torch's distributed
checkpoint), resumable sharded or not on any number of processes (docs/resuming.md says what another
number changes); the final one also exports the weights for ``from_pretrained``.

A model stored as safetensors is not loaded whole under FSDP: it is built empty and each process
reads only its own rows when :meth:`Sharding.shard` shards it (:mod:`denser.trainers.sharded_load`).

A sharded model remembers its root (:meth:`Sharding.root_of`): a model sharded once (the continual
runner's initial model, the reference and frozen teacher of every stage) is not sharded again, and
code above the loop (measurements) runs it through :meth:`Sharding.within`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from denser.trainers import sharded_load

T = TypeVar("T")

_ROOT_ATTR = "_denser_fsdp_root"  # a sharded model's ModelCall root (in its __dict__: not a submodule)
_MESHES: dict[tuple[str, int], Any] = {}  # one device mesh per (device type, world size) in a process


class ModelCall(nn.Module):
    """``ModelCall(model)(fn, *args)`` is ``fn(model, *args)``, run inside this module's forward.

    Whatever wraps this module (DDP, FSDP) sees the function's use of the model as a forward: FSDP
    gathers the root's parameters (embeddings, final norm, lm_head) for it, the layers' FSDP units
    gather their own as the model runs them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(self.model, *args, **kwargs)


def fsdp_requested(cfg_fsdp: bool, accelerator: Any) -> bool:
    """``--fsdp``, or an accelerate launch with an FSDP config (accelerate sets ACCELERATE_USE_FSDP)."""
    from accelerate.utils import DistributedType

    return (bool(cfg_fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            or accelerator.distributed_type == DistributedType.FSDP)


def fsdp_plugin(accelerator: Any | None = None) -> Any:
    """accelerate's FSDP settings: the accelerator's own (an FSDP launch on accelerators), those of
    the launch's environment (an FSDP config on CPU processes, which accelerate leaves unsharded),
    or denser's defaults for ``--fsdp``."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    if (accelerator is not None and accelerator.distributed_type == DistributedType.FSDP
            and accelerator.state.fsdp_plugin is not None):
        return accelerator.state.fsdp_plugin
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return FullyShardedDataParallelPlugin()
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True)


class Sharding:
    """How this run shards its models (FSDP2 over all processes); built by :meth:`for_run`.

    ``shard(ModelCall(model))`` shards a model under its root; ``run(root, fn)`` calls
    ``fn(model)`` with the parameters gathered."""

    def __init__(self, plugin: Any, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(f"denser shards with FSDP2 (torch fully_shard); the accelerate config asks for "
                             f"fsdp_version {version}: set `fsdp_version: 2` under fsdp_config (see "
                             "configs/accelerate_fsdp.yaml)")
        if getattr(plugin, "activation_checkpointing", False):
            raise ValueError("fsdp_activation_checkpointing is not supported by denser's FSDP runs (the loss core "
                             "keeps no [tokens, vocab] activations); set it to false")
        # fsdp_cpu_ram_efficient_loading (process 0 loads, the others receive) is accepted and not needed:
        # every process reads only its own rows of a safetensors model (trainers/sharded_load.py)
        self.plugin = plugin
        self.reshard_after_forward = bool(plugin.reshard_after_forward)
        self.mp_policy = plugin.mixed_precision_policy or MixedPrecisionPolicy()
        self.offload_policy = plugin.cpu_offload
        self.device = device
        key = (device.type, dist.get_world_size())
        if key not in _MESHES:  # every Sharding of a process (continual stages) shards over the same mesh
            _MESHES[key] = init_device_mesh(device.type, (dist.get_world_size(),))
        self.mesh = _MESHES[key]

    @classmethod
    def for_run(cls, accelerator: Any, cfg_fsdp: bool, *, mixed_precision: str = "no") -> "Sharding | None":
        """The run's sharding, or None (one process or DDP). With one process, a process group of
        one is started, so ``--fsdp`` runs the same code on one process as on many.

        Refused before anything is loaded or started: fp16 mixed precision (it needs a gradient scaler)."""
        if not fsdp_requested(cfg_fsdp, accelerator):
            return None
        if mixed_precision == "fp16":
            raise ValueError("--mixed-precision fp16 needs a gradient scaler, which FSDP runs do not use; "
                             "use --mixed-precision bf16 (or no)")
        if not dist.is_initialized():
            backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return cls(fsdp_plugin(accelerator), accelerator.device)

    # ----------------------------------------------------------------------------- sharding

    def units(self, model: nn.Module) -> list[nn.Module]:
        """The submodules that become their own FSDP units, as the plugin's wrap policy says
        (default: the model's ``_no_split_modules``, its transformer layers)."""
        from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

        fn = self.plugin.auto_wrap_policy
        fn = getattr(fn, "func", fn)
        if fn is transformer_auto_wrap_policy:
            names = [n.strip() for n in self.plugin.transformer_cls_names_to_wrap or [] if n.strip()]
            names = names or list(getattr(model, "_no_split_modules", None) or [])
            def kinds(m: nn.Module) -> set[str]:  # fully_shard makes a unit's class a subclass (FSDP<name>)
                return {c.__name__ for c in type(m).__mro__}

            found = set().union(*(kinds(m) for m in model.modules()))
            missing = [n for n in names if n not in found]
            if missing:
                raise ValueError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which the model "
                                 f"({type(model).__name__}) does not contain; leave it out to use the model's layers")
            return [m for m in model.modules() if kinds(m) & set(names)]
        if fn is size_based_auto_wrap_policy:
            limit = int(self.plugin.min_num_params or 0)
            return [m for m in model.modules() if m is not model and sum(p.numel() for p in m.parameters()) > limit]
        return []

    def shard(self, root: ModelCall, *, frozen: bool = False) -> ModelCall:
        """Shard ``root.model`` in place: its layers (as the wrap policy says) are FSDP units, the
        rest belongs to ``root`` (returned, now an FSDP module).

        ``frozen`` (the reference, a frozen or EMA teacher): every unit, the root included,
        reshards after its forward (no backward runs to free them). The trained policy's root
        keeps its parameters gathered from forward to backward (FSDP's default for a root).

        The model remembers ``root`` (:meth:`root_of`); a model that is already sharded is refused
        (share its root instead)."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.root_of(root.model) is not None:
            raise ValueError(f"{type(root.model).__name__} is already sharded; run it through its root "
                             "(Sharding.root_of)")
        kw = dict(mesh=self.mesh, mp_policy=self.mp_policy, offload_policy=self.offload_policy)
        for unit in reversed(self.units(root.model)):  # inner units first
            if not isinstance(unit, FSDPModule) and any(True for _ in unit.parameters()):
                fully_shard(unit, reshard_after_forward=True if frozen else self.reshard_after_forward, **kw)
        fully_shard(root, reshard_after_forward=True if frozen else None, **kw)
        if sharded_load.is_empty(root.model):  # built empty (sharded loading): read this process's rows now
            from torch.distributed.fsdp import CPUOffloadPolicy

            device = torch.device("cpu") if isinstance(self.offload_policy, CPUOffloadPolicy) else self.device
            sharded_load.materialize(root, root.model, device)
        root.model.__dict__[_ROOT_ATTR] = root
        return root

    @staticmethod
    def root_of(model: nn.Module) -> ModelCall | None:
        """The root a model was sharded under (:meth:`shard`), or None (not sharded)."""
        return model.__dict__.get(_ROOT_ATTR)

    @staticmethod
    def within(model: nn.Module, fn: Callable[[nn.Module], T]) -> T:
        """``fn(model)``, with the weights gathered when ``model`` is sharded (:meth:`run` in its root);
        every process must call it alike (the gathers are collectives)."""
        root = Sharding.root_of(model)
        return fn(model) if root is None else Sharding.run(root, fn)

    def shard_run(self, policy_root: ModelCall, reference: nn.Module | None,
                  teacher: Any | None) -> tuple[ModelCall | None, str]:
        """A run's models, all sharded alike: the policy (under ``policy_root``), then each frozen
        model (the reference; a frozen, EMA or trust-region teacher's own model, one root when it is
        the reference's), through ``teacher.shard``; nothing is gathered until used. Returns the
        reference's root (None without one) and a line saying what was sharded."""
        roots: dict[int, ModelCall] = {}
        empty = sharded_load.is_empty(policy_root.model)
        self.shard(policy_root)

        def root_of(model: nn.Module) -> ModelCall:  # a model sharded before (a chained run's anchor) keeps its root
            if id(model) not in roots:
                roots[id(model)] = self.root_of(model) or self.shard(ModelCall(model), frozen=True)
            return roots[id(model)]

        reference_root = root_of(reference) if reference is not None else None
        if teacher is not None:
            teacher.shard(self, policy_root=policy_root, root_of=root_of)
        units = len(self.units(policy_root.model))
        models = ", ".join(["the policy"] + (["the reference"] if reference is not None else [])
                           + ([f"the {teacher.mode} teacher"] if teacher is not None else []))
        return reference_root, (f"FSDP2: {models} sharded over {dist.get_world_size()} process(es) "
                                f"({units} layer units + a root each"
                                f"{'; the policy loaded shard by shard' if empty else ''})")

    @staticmethod
    def run(root: ModelCall, fn: Callable[[nn.Module], T]) -> T:
        """``fn(model)`` with ``model``'s parameters gathered, outside any backward (generation, a
        no-grad forward); the root's parameters are resharded afterwards."""
        out = root(fn)
        root.reshard()
        return out

    @staticmethod
    def keep(t: Tensor | None) -> Tensor | None:
        """A copy of a gathered parameter that outlives the forward it was gathered for."""
        return None if t is None else t.detach().clone()

    # ------------------------------------------------------------------------------- values

    @staticmethod
    def grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
        """The global gradient norm of sharded parameters (before clipping), clipped to ``max_norm`` > 0."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    @staticmethod
    def full_state(state: dict[str, Any], keep: bool) -> dict[str, Any] | None:
        """``state`` (a model's state_dict) with every sharded tensor gathered whole, on CPU.

        A collective: every process calls it with the same keys; only those with ``keep`` get the
        result (the others get None and hold one gathered tensor at a time). Tied weights are
        gathered under each of their names (every process must gather the same tensors)."""
        from torch.distributed.tensor import DTensor

        out: dict[str, Any] = {}
        for k, v in state.items():
            if isinstance(v, DTensor):
                full = v.detach().full_tensor()
                if full.data_ptr() == v.to_local().data_ptr():  # one process: the shard itself (tied weights alias)
                    full = full.clone()
                full = full.cpu()
            else:
                full = v.detach().cpu() if isinstance(v, Tensor) else v
            if keep:
                out[k] = full
        return out if keep else None

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any] | None:
        """``optimizer.state_dict()`` with its sharded moments gathered whole: what one process
        training the same parameters would hold. A collective (see :meth:`full_state`)."""
        sd = optimizer.state_dict()
        state = {i: self.full_state(s, keep) for i, s in sorted(sd["state"].items())}
        return {"state": state, "param_groups": sd["param_groups"]} if keep else None

    def checkpoint_states(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                          keep: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(model state, optimizer state)`` gathered whole, what one unsharded process would save
        (:func:`denser.trainers.checkpoint.save_checkpoint`'s ``model_state``, ``optimizer_state``).
        A collective: every process calls it; those without ``keep`` get ``(None, None)``."""
        return self.full_state(model.state_dict(), keep), self.full_optimizer_state(optimizer, keep)

    @staticmethod
    def shard_like(full: Tensor, like: Tensor) -> Tensor:
        """This process's shard of ``full`` (a whole tensor every process holds) laid out as ``like``;
        ``full`` may already be such a shard (a DTensor laid out as ``like``: state carried in memory
        from one sharded run to the next), which is returned as it is."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        if not isinstance(like, DTensor):
            return full
        if isinstance(full, DTensor):
            if tuple(full.shape) != tuple(like.shape) or full.placements != like.placements:
                raise ValueError(f"a sharded tensor of shape {tuple(full.shape)} ({full.placements}) does not fit a "
                                 f"parameter of shape {tuple(like.shape)} ({like.placements})")
            return full.to(like.dtype)
        if tuple(full.shape) != tuple(like.shape):
            raise ValueError(f"a saved tensor of shape {tuple(full.shape)} does not fit a parameter of shape "
                             f"{tuple(like.shape)}")
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
        """Load a whole optimizer state (:meth:`full_optimizer_state`, or one process's) into an
        optimizer of sharded parameters: each process keeps its shards."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, s in full["state"].items():
            p = params[int(i)]
            state[i] = {k: self.shard_like(v, p) if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in s.items()}
        optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})

    def load_model_state(self, model: nn.Module, full: dict[str, Tensor]) -> None:
        """Load a whole state_dict into a sharded model (each process copies its shards)."""
        own = model.state_dict()
        missing = sorted(set(own) - set(full))
        if missing:
            raise ValueError(f"the saved state lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(self.shard_like(full[k], v))
