"""The teacher's weights: which model scores the teacher contexts, and how it follows the policy.

What the teacher is (its weights and its context, the EMA or trust-region rate, the model it starts
from) is the objective's :class:`~denser.objectives.TeacherSpec`; :func:`build_teacher` builds the
weights that spec names, for every kind of run (one process or DDP, LoRA, FSDP through
:meth:`TeacherWeights.shard`), and :class:`TeacherWeights` runs them on a packed batch
(:meth:`TeacherWeights.outputs`). The loop calls :func:`build_teacher` once and asks nothing else
about the teacher's kind; the teacher's context is built by ``trainers/signals.py``.

- ``live``: the policy itself;
- ``ema``: a copy of the policy (or of ``teacher_path``), ``teacher <- (1 - rate) * teacher + rate *
  policy`` once per rollout batch, after its optimiser updates (when one of them was applied;
  :meth:`TeacherWeights.update`, called by the loop's ``_finish_step``, as SDPO's actor updates its
  teacher once per training step, i.e. rollout batch); with several updates per rollout batch (``--mini-batches``,
  ``--epochs``) still once;
- ``frozen``: the initial policy (or ``teacher_path``), never updated;
- ``trust-region`` (SDPO's ``TrustRegionTeacher``): logits ``lerp(reference, policy, rate)``, both
  on the teacher context, the reference being what ``frozen`` would be. Written for the
  hidden-state loss core without logits: since ``z = h @ W.T + b`` is linear,
  ``(1 - rate) z_ref + rate z_pol = [(1 - rate) h_ref, rate h_pol] @ [W_ref, W_pol].T
  + (1 - rate) b_ref + rate b_pol``, a teacher whose hidden state and output weight are the two
  models' concatenated along H.

``rate`` is ``teacher_update_rate``. ``teacher_init_alpha < 1`` starts the teacher (the reference, for
trust-region) at ``init_alpha * teacher + (1 - init_alpha) * policy``, parameter by parameter (SDPO-CL),
the policy being the one the run started from.

Under LoRA (``trainers/lora.py``) the frozen teacher and the trust-region reference are the base model
(the policy with its adapter disabled, not a copy) and an ``ema`` teacher averages the adapter's
weights only (:class:`LoraTeacherWeights`).

Under FSDP (:meth:`TeacherWeights.shard`) the teacher's model is sharded like the policy and runs
inside the forward of its root, which gathers the weights; the output layer it hands the loss core
is a copy taken there (the gathered weight is freed when that forward returns). An EMA teacher
updates shard by shard.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from denser.engines.packing import PackedBatch, completion_hidden_states, lm_head_params
from denser.objectives import TeacherSpec
from denser.objectives.teacher import TEACHER_MODES
from denser.trainers import checkpoint as ckpt
from denser.trainers.lora import AdapterView, trainable_adapter
from denser.trainers.models import EMBEDDED_NAMES, TINY_NAME, build_tiny_model, load_model
from denser.trainers.sharding import ModelCall, Sharding

#: ``--teacher-path tiny``: a random tiny model unlike ``--model tiny`` (seed 0, hidden size 64), same vocabulary
TINY_TEACHER = {"seed": 1, "hidden_size": 96}

#: a model, or a function that loads it when first asked (so a run loads only the models its teacher uses)
ModelSource = Union[nn.Module, AdapterView, Callable[[], Any]]


@dataclass
class TeacherInputs:
    """What the loss core receives of the teacher: its hidden states at the completion tokens and
    its output layer (the core uses them when the objective's core options ask for a divergence)."""

    hidden: Tensor  # [N, H_teacher]
    weight: Tensor  # [V, H_teacher] (under FSDP a copy of the gathered weight)
    bias: Tensor | None
    entropy: Tensor | None = None  # [N] the teacher's entropy per token (--log-teacher-entropy), detached


def resolve_teacher_path(path: str) -> Path | str:
    """The model ``--teacher-path`` names: a model name (``default``/``smollm2``: the embedded model;
    ``tiny``: :data:`TINY_TEACHER`, a random tiny model of another seed and hidden size than ``--model
    tiny``), returned as the name, or the model directory of a Hugging Face model directory
    (``config.json``), a denser checkpoint (``<ckpt>/model``, or a LoRA checkpoint's merged model
    ``<ckpt>/merged``) or a denser run directory (its newest checkpoint's model). Raises ``ValueError``
    naming the flag for anything else."""
    name = str(path).strip().lower()
    if name in EMBEDDED_NAMES or name == TINY_NAME:
        return name
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"--teacher-path {path}: no such directory; give a local Hugging Face model directory "
                         "(with config.json), a denser checkpoint directory, a denser run directory, or "
                         "default/tiny")
    if (p / "config.json").is_file():
        return p
    for ckpt_dir in (p, ckpt.latest_checkpoint(p)):  # a checkpoint, a run's newest; a LoRA run's merged model
        for sub in ("model", "merged"):
            if ckpt_dir is not None and (ckpt_dir / sub / "config.json").is_file():
                return ckpt_dir / sub
    raise ValueError(f"--teacher-path {path}: neither a Hugging Face model directory (no config.json), nor a "
                     "denser checkpoint (no model/config.json), nor a run directory with a complete checkpoint; a "
                     "LoRA checkpoint's model/ is an adapter: merge it (--merge-lora, or denser merge-lora) first")


def _vocab(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _different_tokenizer(teacher: Any, student: Any) -> str | None:
    """How the teacher's tokenizer maps a token to another id than the student's, or None (same map).
    A vocabulary of the same size can still number its tokens differently (another tokenizer of the
    same size, added tokens in another order): token-level distillation would then compare
    unrelated distributions without any error."""
    t, s = teacher.get_vocab(), student.get_vocab()
    if t == s:
        return None
    differ = sorted((tok for tok in set(t) | set(s) if t.get(tok) != s.get(tok)), key=lambda tok: s.get(tok, t.get(tok)))
    tok = differ[0]
    return (f"{len(differ)} of its tokens have another id than in the policy's tokenizer (first: {tok!r} is "
            f"{t.get(tok, 'absent')} in the teacher's, {s.get(tok, 'absent')} in the policy's)")


def _same_parameters(teacher: nn.Module, policy: nn.Module) -> str | None:
    """Why the two models cannot be mixed parameter by parameter, or None."""
    t, p = dict(teacher.named_parameters()), dict(policy.named_parameters())
    if list(t) != list(p):
        missing = sorted(set(p) ^ set(t))
        return f"their parameters differ ({missing[0] if missing else 'order'})"
    for name, value in t.items():
        if value.shape != p[name].shape:
            return f"parameter {name} has shape {tuple(value.shape)} in the teacher, {tuple(p[name].shape)} in the policy"
    return None


@torch.no_grad()
def interpolate_(teacher: nn.Module, policy: nn.Module, alpha: float) -> None:
    """``teacher <- alpha * teacher + (1 - alpha) * policy``, parameter by parameter, in place."""
    from denser.trainers import sharded_load

    if sharded_load.is_empty(teacher) or sharded_load.is_empty(policy):  # the loop loads such runs whole
        raise RuntimeError("--teacher-init-alpha: a model loaded empty for sharded loading has no weights to mix yet")
    problem = _same_parameters(teacher, policy)
    if problem:
        raise ValueError(f"--teacher-init-alpha {alpha} mixes the teacher with the policy parameter by parameter, but "
                         f"{problem}; use a teacher of the policy's architecture or --teacher-init-alpha 1")
    for t, p in zip(teacher.parameters(), policy.parameters()):
        t.mul_(alpha).add_(p.detach().to(t.dtype), alpha=1.0 - alpha)


def _hidden(model: nn.Module, packed: PackedBatch) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return completion_hidden_states(model, packed)
    finally:
        model.train(was_training)


class TeacherWeights:
    """Which weights score the teacher context (see the module docstring); built by :func:`build_teacher`.

    ``model`` is the teacher's own model: the policy for ``live``, the EMA copy, the frozen model,
    or the reference of ``trust-region`` (whose other half is ``policy``). ``TeacherWeights(policy,
    mode, rate)`` starts an ``ema``/``frozen``/``trust-region`` teacher from a copy of ``policy``;
    ``weights`` gives it that model instead."""

    def __init__(self, policy: nn.Module, mode: str, rate: float, *, weights: Any = None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher={mode!r} must be one of {', '.join(map(repr, TEACHER_MODES))}")
        self.mode, self.rate, self.policy = mode, float(rate), policy
        if mode == "live":
            self.model = policy
        elif weights is not None:
            self.model = weights
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        self._joint: tuple[tuple, Tensor] | None = None  # trust-region: ((W_ref, W_pol), [W_ref, W_pol]) of this update
        self.sharding: Sharding | None = None
        self._root: ModelCall | None = None  # under FSDP: the root whose forward gathers ``model``'s weights
        self._policy_root: ModelCall | None = None  # ... and the policy's (live, trust-region)
        # a teacher model from --teacher-path: {"path", "sha256"} (teacher_source), recorded in config.yaml
        self.source: dict[str, str] | None = None

    @property
    def keeps_state(self) -> bool:
        """Whether the teacher's weights change during the run (``ema``): checkpoints hold them
        (:meth:`state_dict`), and a resumed or chained run restores them (:meth:`load_state_dict`)."""
        return self.mode == "ema"

    def to(self, device: Any) -> "TeacherWeights":
        """Move the teacher's own model to ``device`` (the policy, which the loop places, stays where it is)."""
        if self.model is not self.policy:
            self.model.to(device)
        return self

    def shard(self, sharding: Sharding, *, policy_root: ModelCall, root_of: Callable[[nn.Module], ModelCall]) -> None:
        """Under FSDP: the teacher runs inside ``policy_root`` (``live``) or inside ``root_of(model)``,
        the root of its own model sharded like the policy (shared with the reference when it is the
        reference's model); ``trust-region``'s policy half inside ``policy_root``."""
        self.sharding, self._policy_root = sharding, policy_root
        self._root = policy_root if self.model is self.policy else root_of(self.model)

    def _forward(self, model: nn.Module, root: ModelCall | None, packed: PackedBatch) -> tuple[Tensor, Any, Any]:
        """``(hidden, lm_head weight, bias)`` of ``model`` on ``packed``; under FSDP run in ``root``."""
        if root is None:
            return (_hidden(model, packed), *lm_head_params(model))
        return Sharding.run(root, lambda m: (_hidden(m, packed), *map(Sharding.keep, lm_head_params(m))))

    # ---------------------------------------------------------------------------------- forward

    @torch.no_grad()
    def outputs(self, packed: PackedBatch) -> TeacherInputs:
        """The teacher's hidden states at the completion tokens of ``packed`` (teacher contexts) and
        its output layer; for ``trust-region`` the concatenation described in the module docstring."""
        hidden, weight, bias = self._forward(self.model, self._root, packed)
        if self.mode != "trust-region":
            return TeacherInputs(hidden, weight, bias)
        r = self.rate
        h_pol, w_pol, b_pol = self._forward(self.policy, self._policy_root, packed)
        hidden = torch.cat([(1.0 - r) * hidden, r * h_pol.to(hidden.dtype)], dim=-1)
        if bias is not None or b_pol is not None:
            bias = ((1.0 - r) * (bias if bias is not None else 0.0)
                    + r * (b_pol.detach().to(hidden.dtype) if b_pol is not None else 0.0))
        return TeacherInputs(hidden, self._joint_weight(weight, w_pol), bias)

    def _joint_weight(self, w_ref: Tensor, w_pol: Tensor) -> Tensor:
        """``[W_ref, W_pol]`` along H, built once per optimiser update (:meth:`policy_updated` drops
        it), so the micro-batches of one update share one copy.

        Neither the tensors' ``_version`` nor their ``id()`` can say the policy changed: the fused
        AdamW kernel updates parameters in place without bumping their version counter (so a version
        key reused the first update's ``W_pol`` for the whole run), and under FSDP each forward hands
        back fresh copies of the gathered weights whose ids can repeat once freed. The cache holds the
        tensors it was built from and is cleared by the loop after every optimiser update."""
        cached = self._joint
        if cached is None or cached[0][0] is not w_ref or cached[0][1] is not w_pol:
            self._joint = ((w_ref, w_pol), torch.cat([w_ref.detach(), w_pol.detach().to(w_ref.dtype)], dim=-1))
        return self._joint[1]

    def policy_updated(self) -> None:
        """The policy's weights changed (an optimiser update): drop what was derived from them."""
        self._joint = None

    # ---------------------------------------------------------------------------------- updates

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """The EMA teacher's move towards ``policy``, once per rollout batch (the loop calls it after
        the batch's optimiser updates; other teachers: nothing). Under FSDP on this process's shards
        only (the teacher's and the policy's shards are the same slices of the same parameters)."""
        if not self.keeps_state:
            return
        for (name, t), p in zip(self.model.named_parameters(), policy.parameters()):
            if self._root is not None:
                t, p = _local(t, name), _local(p, name)
                if t.shape != p.shape:
                    raise RuntimeError(f"EMA update under FSDP: the teacher's shard of {name} {tuple(t.shape)} is "
                                       f"not the policy's {tuple(p.shape)}; both must be sharded alike")
            t.lerp_(p.detach().to(t.dtype), self.rate)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """An EMA teacher's weights (None for other modes): the live tensors, not a copy (a 135M model's
        copy is 540 MB at every checkpoint); :meth:`update` changes them in place, so a caller that keeps
        them past the next update copies them (a checkpoint writes them at once; the continual runner
        hands them to the next run, which copies them into its own teacher). A tensor that shares memory
        with an earlier one (tied embeddings) is copied: safetensors refuses shared tensors. Under FSDP a
        collective: every process calls it, the main process gets the whole weights, the others None."""
        if not self.keeps_state:
            return None
        if self._root is not None:
            return Sharding.full_state(self.model.state_dict(), keep=_is_main())
        out, seen = {}, set()
        for k, v in self.model.state_dict().items():
            ptr = v.untyped_storage().data_ptr()
            out[k] = v.detach().clone() if ptr in seen else v.detach()
            seen.add(ptr)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.keeps_state and state is not None:
            if self.sharding is not None:  # whole tensors: each process keeps its shards
                self.sharding.load_model_state(self.model, state)
            else:
                self.model.load_state_dict(state)


class LoraTeacherWeights(TeacherWeights):
    """An ``ema`` teacher of a LoRA policy: the base model with an EMA of the adapter's weights,
    ``A <- (1 - rate) A + rate A_policy`` and likewise ``B``, each matrix on its own (not the EMA of
    ``B @ A``, which would need the full weights). Starts from the policy's adapter. Its state
    (checkpoints, ``carry_state``) is the averaged adapter tensors."""

    def __init__(self, policy: nn.Module, rate: float):
        weights = {k: v.detach().clone() for k, v in trainable_adapter(policy).items()}
        super().__init__(policy, "ema", rate, weights=AdapterView(policy, weights))

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        live = trainable_adapter(policy)
        for name, t in self.model.weights.items():
            t.lerp_(live[name].detach().to(t.dtype), self.rate)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.weights.items()}

    def load_state_dict(self, state: dict[str, Tensor] | None) -> None:
        if state is None:
            return
        mine = self.model.weights
        if set(state) != set(mine):
            raise ValueError("the EMA teacher state does not match this run's LoRA adapter (different target "
                             "modules?); resume with the --lora-* flags the run was started with")
        for k, v in state.items():
            mine[k].copy_(v)


# ------------------------------------------------------------------------------------ build


class _Once:
    """A :data:`ModelSource` resolved on first use, then kept (``default`` when the source is None)."""

    def __init__(self, source: ModelSource | None, default: Callable[[], Any]):
        self._source, self._default, self._model = source, default, None

    def __call__(self) -> Any:
        if self._model is None:
            src = self._source
            if src is None:
                self._model = self._default()
            elif isinstance(src, (nn.Module, AdapterView)):
                self._model = src
            else:
                self._model = src()
        return self._model


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's weights: every state-dict entry's name, dtype, shape and bytes, in order."""
    from denser.trainers import sharded_load

    h = hashlib.sha256()
    empty = sharded_load.is_empty(model)  # loaded for sharded loading: each tensor read from the file
    for name, t in model.state_dict().items():
        t = (sharded_load.full_tensor(model, name) if empty and t.is_meta else t.detach()).cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def teacher_source(spec: TeacherSpec, weights: nn.Module) -> dict[str, str]:
    """What config.yaml records of a teacher model from ``--teacher-path`` (key ``denser.trainers.config.TEACHER_MODEL_KEY``):
    the model it resolved to and the SHA-256 of its weights as loaded (before any --teacher-init-alpha mix)."""
    return {"path": str(resolve_teacher_path(spec.teacher_path)), "sha256": weights_sha256(weights)}


def check_resumed_teacher(recorded: Any, source: dict[str, str] | None) -> None:
    """A resumed run's teacher model must be the one it started with (``recorded``: the run's
    config.yaml entry, or None for a run that recorded none). Raises ``ValueError``, one line."""
    if not isinstance(recorded, dict) or source is None or recorded.get("sha256") in (None, source["sha256"]):
        return
    raise ValueError(f"--resume: the teacher model changed since the run started ({recorded.get('path')}: weights "
                     f"sha256 {str(recorded['sha256'])[:12]}..., now {source['path']}: {source['sha256'][:12]}...); "
                     "resume with the teacher the run started with, or use another --output-dir")


def _model_from_path(spec: TeacherSpec, policy: nn.Module, tokenizer: Any = None, empty: bool = False) -> nn.Module:
    """The model ``spec.teacher_path`` names, checked against the policy (vocabulary size and, given the
    policy's ``tokenizer``, the teacher's own tokenizer token by token; for an EMA teacher, the
    parameters it averages) before anything is computed. A ``frozen`` teacher is a model of its own,
    loaded in its own dtype (the ``torch_dtype`` its config records; ``tiny``: float32): the loss core
    takes its hidden states and output layer in any dtype. ``ema`` and ``trust-region`` mix it with the
    policy (parameters, logits), so they load it in the policy's dtype, as ``teacher_init_alpha`` needs too."""
    path = resolve_teacher_path(spec.teacher_path)
    own = spec.teacher == "frozen" and spec.teacher_init_alpha == 1.0
    dtype = "auto" if own else next(policy.parameters()).dtype
    if path == TINY_NAME:
        weights, teacher_tokenizer = build_tiny_model(**TINY_TEACHER, dtype=torch.float32 if own else dtype)
    else:
        with ckpt.quiet_transformers():
            weights, teacher_tokenizer = load_model(str(path), dtype=dtype, empty=empty)
    if _vocab(weights) != _vocab(policy):
        raise ValueError(f"--teacher-path {spec.teacher_path}: its vocabulary ({_vocab(weights)}) differs from the "
                         f"policy's ({_vocab(policy)}); token-level distillation needs one shared tokenizer")
    problem = _different_tokenizer(teacher_tokenizer, tokenizer) if tokenizer is not None else None
    if problem:
        raise ValueError(f"--teacher-path {spec.teacher_path}: {problem}; token-level distillation needs one "
                         "shared tokenizer")
    problem = _same_parameters(weights, policy) if spec.teacher == "ema" else None
    if problem:
        raise ValueError(f"--teacher-path {spec.teacher_path}: an EMA teacher averages the policy into the teacher "
                         f"parameter by parameter, but {problem}; use --teacher frozen or trust-region")
    return weights


def build_teacher(spec: TeacherSpec | None, policy: nn.Module, *, initial: ModelSource | None = None,
                  start: ModelSource | None = None, start_from_policy: bool = False,
                  lora: bool = False, tokenizer: Any = None, empty: bool = False) -> TeacherWeights | None:
    """The teacher's weights ``spec`` names (None without a spec: the objective has no teacher).

    ``policy``: the model being trained (resumed, when the run resumes). ``initial``: the model the
    run's frozen reference is (a ``frozen`` teacher and the ``trust-region`` reference are it, shared,
    not copied; never modified); default: a copy of ``start``. ``start``: the policy this run started
    from, which ``teacher_init_alpha < 1`` mixes in (default: ``policy``; a resumed run passes the
    weights it started from). Each may be a model or a function that loads it, called only when
    this teacher needs it. ``start_from_policy``: a ``frozen`` teacher and the ``trust-region``
    reference start from a copy of ``start`` instead of ``initial`` (``denser continual
    --teacher-reset``). ``teacher_path`` replaces both as the teacher's starting point.

    ``tokenizer``: the policy's; a ``teacher_path`` model's own tokenizer must map every token to the
    same id (checked when given).

    ``empty``: a ``teacher_path`` model stored as safetensors is built empty, to be filled shard by
    shard when it is sharded (FSDP's sharded loading, :mod:`denser.trainers.sharded_load`).

    ``lora``: ``policy`` is a LoRA model (peft; ``trainers/lora.py``): ``frozen`` and ``trust-region``
    are the base model (``initial``, default the policy with its adapter disabled), ``ema`` averages
    the adapter (:class:`LoraTeacherWeights`); a ``teacher_path`` loads a full model, ``frozen`` or
    ``trust-region`` only and without ``teacher_init_alpha``. Under FSDP the loop shards the result
    (:meth:`TeacherWeights.shard`, through ``Sharding.shard_run``)."""
    if spec is None:
        return None
    mode, rate = spec.teacher, spec.teacher_update_rate
    if mode == "live":
        return TeacherWeights(policy, mode, rate)
    if lora:
        return _lora_teacher(spec, policy, initial, tokenizer)
    start_model = _Once(start, default=lambda: policy)
    initial_model = _Once(initial, default=lambda: copy.deepcopy(start_model()))
    shared = None
    source = None
    if spec.teacher_path:
        weights = _model_from_path(spec, policy, tokenizer, empty=empty and spec.teacher_init_alpha == 1.0)
        source = teacher_source(spec, weights)
    elif mode == "ema":
        weights = copy.deepcopy(policy)
    elif start_from_policy:
        weights = copy.deepcopy(start_model())
    else:
        weights = shared = initial_model()
    if spec.teacher_init_alpha < 1.0:
        if weights is shared:  # the reference's model: mix a copy
            weights = copy.deepcopy(shared)
        interpolate_(weights, start_model(), spec.teacher_init_alpha)
    teacher = TeacherWeights(policy, mode, rate, weights=weights.eval().requires_grad_(False))
    teacher.source = source
    return teacher


def _lora_teacher(spec: TeacherSpec, policy: nn.Module, initial: ModelSource | None, tokenizer: Any = None) -> TeacherWeights:
    """:func:`build_teacher` for a LoRA policy (not ``live``)."""
    mode, rate = spec.teacher, spec.teacher_update_rate
    if spec.teacher_path:
        if mode == "ema":
            raise ValueError(f"--teacher-path {spec.teacher_path} with --teacher ema and --lora-r: a LoRA run's EMA "
                             "teacher averages the policy's adapter weights, so it starts from the policy; use "
                             "--teacher frozen or trust-region with --teacher-path")
        if spec.teacher_init_alpha < 1.0:
            raise ValueError(f"--teacher-init-alpha {spec.teacher_init_alpha} with --teacher-path and --lora-r: mixing "
                             "a full teacher model into a LoRA policy parameter by parameter is not supported; use "
                             "--teacher-init-alpha 1 or train without --lora-r")
        weights = _model_from_path(spec, policy, tokenizer)
        teacher = TeacherWeights(policy, mode, rate, weights=weights.eval().requires_grad_(False))
        teacher.source = teacher_source(spec, weights)
        return teacher
    if mode == "ema":
        return LoraTeacherWeights(policy, rate)
    # frozen, trust-region: the base model. --teacher-init-alpha mixes in the policy the run starts
    # from, which is the base model too (a fresh adapter adds zero): nothing to mix.
    return TeacherWeights(policy, mode, rate, weights=_Once(initial, default=lambda: AdapterView(policy))())


def _local(t: Any, name: str) -> Tensor:
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        raise RuntimeError(f"EMA update under FSDP: parameter {name} is not sharded (a gathered parameter left "
                           "unsharded after a forward); reshard before the update")
    return t.to_local()


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
