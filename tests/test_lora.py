"""LoRA (trainers/lora.py): only the adapter trains, the reference and frozen teachers are the base
model with the adapter disabled (no copy), an EMA teacher averages the adapter's A and B, the loss
core skips dW for the frozen output layer, checkpoints hold a peft adapter, and the merged model
computes what the adapter model does. Exact resume after a kill: tests/test_resume.py (lora_sdpo)."""

from __future__ import annotations

import copy
import dataclasses
import json
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from denser.cli import main, parse_train_args
from denser.engines.packing import build_packed_batch, completion_hidden_states, lm_head_params
from denser.kernels import fused_loss, token_stats
from denser.objectives import PolicyBatch, TeacherSpec, get_objective
from denser.trainers import checkpoint as ckpt
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.lora import (
    AdapterView,
    attach_lora,
    check_lora_run,
    merge_lora,
    merged_model,
    trainable_adapter,
)
from denser.trainers.models import ModelNotFoundError, build_tiny_model, load_model
from denser.trainers.teacher import LoraTeacherWeights, build_teacher

peft = pytest.importorskip("peft")


def _policy(seed: int = 0, r: int = 4, perturb: bool = True, **kw):
    """A tiny model with a LoRA adapter; ``perturb``: random A and B (a fresh adapter's B is zero,
    which would make every comparison with the base model trivially true)."""
    base, _ = build_tiny_model(seed=seed)
    policy = attach_lora(base, r=r, alpha=8.0, dropout=0.0, **kw)
    if perturb:
        g = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            for p in trainable_adapter(policy).values():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return policy.eval()


def _batch(gen, extra_context: int = 0):
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (4, 7)]
    prompts = [p + [5] * extra_context for p in prompts]
    completions = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (5, 3)]
    return build_packed_batch(prompts, completions, pad_token_id=0)


def _logits(model, packed):
    """Logits at the completion tokens from the model's own forward (the full HF path)."""
    with torch.no_grad():
        out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids)
    return out.logits[packed.predict_mask].float()


def _view_logits(view, packed):
    h = completion_hidden_states(view, packed)
    w, b = lm_head_params(view)
    return (h @ w.T + (b if b is not None else 0)).float()


def _is_lora(name: str) -> bool:
    return "lora_" in name


# ------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "-1"], "--lora-r must be >= 0"),
    (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha must be a number > 0"),
    (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--lora-r", "4", "--lora-target-modules", ","], "--lora-target-modules is empty"),
    (["--merge-lora"], "--merge-lora needs --lora-r > 0"),
])
def test_bad_lora_flags_are_one_line_before_any_compute(capsys, flags, message):
    assert main(["train", "--model", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_target_modules_name_the_flag_and_the_model_layers():
    base, _ = build_tiny_model()
    with pytest.raises(ValueError, match=r"--lora-target-modules nope,lm_head: 'nope' matches no module; 'lm_head' is "
                                         r"the input or output embedding.*q_proj"):
        attach_lora(base, r=2, alpha=4.0, dropout=0.0, target_modules="nope,lm_head")
    policy = attach_lora(build_tiny_model()[0], r=2, alpha=4.0, dropout=0.0, target_modules="q_proj, v_proj")
    adapted = {n.split(".")[-4] for n in trainable_adapter(policy)}
    assert adapted == {"q_proj", "v_proj"}


def test_fsdp_continual_and_ema_teacher_path_are_refused(tmp_path):
    from accelerate.utils import DistributedType

    cfg = TrainConfig(model="tiny", lora_r=4)
    with pytest.raises(ValueError, match="--lora-r with --fsdp is not supported"):
        TrainConfig(model="tiny", lora_r=4, fsdp=True)
    with pytest.raises(ValueError, match=r"--lora-r with FSDP \(--fsdp or an accelerate FSDP config\) is not supported"):
        check_lora_run(cfg, types.SimpleNamespace(distributed_type=DistributedType.FSDP))
    check_lora_run(cfg, types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))  # DDP is fine
    from denser.continual import ContinualConfig, ContinualRunner

    with pytest.raises(ValueError, match="denser continual --lora-r needs --lora-stages: merge"):  # a choice to make
        ContinualRunner(cfg, None, ContinualConfig(tasks=["addition"]))
    with pytest.raises(ValueError, match="--teacher-path .* with --teacher ema and --lora-r"):
        build_teacher(TeacherSpec(teacher="ema", teacher_path=str(tmp_path)), _policy(), lora=True)


# ------------------------------------------------------------------------------ views of one model


def test_reference_and_frozen_teacher_are_the_base_model_without_a_copy(gen):
    policy = _policy(seed=3)
    base, _ = build_tiny_model(seed=3)
    packed = _batch(gen)
    expected = _logits(base, packed)
    assert not torch.allclose(_logits(policy, packed), expected, atol=1e-3)  # the adapter does change the model
    reference = AdapterView(policy)
    torch.testing.assert_close(_view_logits(reference, packed), expected, rtol=1e-5, atol=1e-5)
    for mode in ("frozen", "trust-region"):
        teacher = build_teacher(TeacherSpec(teacher=mode, teacher_update_rate=0.25), policy, lora=True)
        assert isinstance(teacher.model, AdapterView) and teacher.model.policy is policy  # a view, not a copy
    frozen = build_teacher(TeacherSpec(teacher="frozen"), policy, lora=True).outputs(packed)
    torch.testing.assert_close((frozen.hidden @ frozen.weight.T).float(), expected, rtol=1e-5, atol=1e-5)
    # trust-region: logits lerp(reference, policy, rate) on the teacher context, as SDPO's TrustRegionTeacher
    tr = build_teacher(TeacherSpec(teacher="trust-region", teacher_update_rate=0.25), policy, lora=True).outputs(packed)
    lerped = torch.lerp(expected, _logits(policy, packed), 0.25)
    torch.testing.assert_close((tr.hidden @ tr.weight.T).float(), lerped, rtol=1e-5, atol=1e-5)
    # the policy is unchanged by the views: adapter on, trainable again
    assert all(p.requires_grad for p in trainable_adapter(policy).values())
    torch.testing.assert_close(_view_logits(policy, packed), _logits(policy, packed), rtol=1e-5, atol=1e-5)


def test_ema_teacher_averages_a_and_b_separately(gen):
    policy = _policy(seed=1)
    teacher = build_teacher(TeacherSpec(teacher="ema", teacher_update_rate=0.3), policy, lora=True)
    assert isinstance(teacher, LoraTeacherWeights)
    start = {k: v.detach().clone() for k, v in trainable_adapter(policy).items()}
    expected = dict(start)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):  # two optimiser updates' worth of new adapter weights
        with torch.no_grad():
            for p in trainable_adapter(policy).values():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        live = trainable_adapter(policy)
        expected = {k: 0.7 * expected[k] + 0.3 * live[k].detach() for k in expected}
        teacher.update(policy)
    state = teacher.state_dict()
    assert state.keys() == start.keys() and any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    for k in state:
        torch.testing.assert_close(state[k], expected[k], rtol=1e-6, atol=1e-7)
    # its outputs: the base model with the averaged adapter in place of the policy's
    packed = _batch(gen)
    reference_model = copy.deepcopy(policy)
    with torch.no_grad():
        for k, p in trainable_adapter(reference_model).items():
            p.copy_(expected[k])
    out = teacher.outputs(packed)
    torch.testing.assert_close((out.hidden @ out.weight.T).float(), _logits(reference_model, packed),
                               rtol=1e-5, atol=1e-5)
    # a round trip through its state (checkpoints, carry_state)
    other = build_teacher(TeacherSpec(teacher="ema", teacher_update_rate=0.3), _policy(seed=1), lora=True)
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in state)


# ------------------------------------------------------------------------ the loss core, frozen lm_head


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "addmm_", "bmm", "matmul"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _core_case(gen, n=23, h=11, v=37, seqs=4):
    lengths = torch.tensor([5, 9, 2, 7])
    seq_ids = torch.repeat_interleave(torch.arange(seqs), lengths)
    targets = torch.randint(0, v, (n,), generator=gen)
    batch = PolicyBatch(seq_ids=seq_ids, num_seqs=seqs, global_tokens=float(n), global_seqs=float(seqs),
                        token_mask=torch.ones(n, dtype=torch.bool), advantages=torch.randn(seqs, generator=gen),
                        old_logp=-torch.rand(n, generator=gen) * 3 - 1, teacher_mask=torch.tensor([1, 1, 0, 1]).bool(),
                        global_teacher_tokens=float(n - 2), global_teacher_seqs=3.0)
    return (torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 0.3, torch.randn(n, h, generator=gen),
            targets, batch)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("objective", [("grpo", {}), ("sdpo", {"distill_mode": "full", "alpha": 0.5})])
def test_loss_core_with_a_frozen_lm_head_skips_dw_and_keeps_the_hidden_gradient(gen, backend, objective):
    hidden, weight, teacher, targets, batch = _core_case(gen)
    obj = get_objective(objective[0], **objective[1])
    results = {}
    for frozen in (False, True):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen)
        counter = _CountMatmuls()
        with counter:
            out = fused_loss(h, w, targets, obj, dataclasses.replace(batch), teacher_hidden=teacher,
                             temperature=0.9, backend=backend, chunk_size=5)
            out.loss.backward()
        results[frozen] = (out.loss.detach(), h.grad, w.grad, counter.count)
    (loss_f, gh_f, gw_f, mm_f), (loss_t, gh_t, gw_t, mm_t) = results[True], results[False]
    assert gw_f is None and gw_t is not None
    torch.testing.assert_close(loss_f, loss_t, rtol=0, atol=0)
    torch.testing.assert_close(gh_f, gh_t, rtol=1e-6, atol=1e-7)
    chunks = 5 if backend == "chunked" else 1  # 23 tokens in chunks of 5 (grpo) or on sequence bounds (sdpo: 4)
    assert mm_f < mm_t and mm_t - mm_f <= chunks  # exactly the dW matmuls are gone


def test_token_stats_with_a_frozen_weight_computes_no_weight_gradient(gen):
    hidden, weight, _, targets, _ = _core_case(gen)
    for backend in ("reference", "chunked"):
        h = hidden.clone().requires_grad_()
        w = weight.clone()
        stats = token_stats(h, w, targets, need_entropy=True, backend=backend, chunk_size=4)
        (stats.logp.sum() + stats.entropy.sum()).backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        stats2 = token_stats(h2, w2, targets, need_entropy=True, backend=backend, chunk_size=4)
        (stats2.logp.sum() + stats2.entropy.sum()).backward()
        assert w.grad is None
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------ the loop

SMALL = ["--model", "tiny", "--max-new-tokens", "7", "--temperature", "1.5", "--num-generations", "4", "--prompts-per-step", "2",
         "--eval-size", "2", "--micro-batch-size", "4", "--no-progress", "--cpu", "--lr", "5e-3", "--lora-r", "4"]


def _task():
    from tests.test_train import ParityAddition

    return ParityAddition()


def test_a_lora_step_trains_only_the_adapter(tmp_path):
    cfg, obj = parse_train_args(["--objective", "grpo", "--kl-coef", "0.1", "--steps", "1", "--seed", "1",
                                 "--output-dir", str(tmp_path / "run"), *SMALL])  # seed 1: varied rewards
    trainer = Trainer(cfg, obj, task=_task(), log=lambda *a: None)
    policy = trainer.policy
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in trainable_adapter(policy).values()} and trained
    assert not policy.get_output_embeddings().weight.requires_grad  # the loss core gets a frozen lm_head
    assert isinstance(trainer.reference, AdapterView) and trainer.reference.policy is policy
    row = trainer.step(0)
    assert row["updates"] == 1 and row["reward_std"] > 0  # varied rewards: a non-zero gradient
    after = dict(policy.named_parameters())
    base_changed = [n for n in before if not _is_lora(n) and not torch.equal(before[n], after[n])]
    assert not base_changed, base_changed[:3]
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


def test_checkpoint_holds_a_peft_adapter_and_a_merged_model_with_the_same_logits(tmp_path, gen, capsys):
    run = tmp_path / "run"
    cfg, obj = parse_train_args(["--objective", "sdpo", "--teacher", "ema", "--steps", "2", "--merge-lora",
                                 "--output-dir", str(run), *SMALL])
    Trainer(cfg, obj, task=_task(), log=lambda *a: None).train()
    final = ckpt.latest_checkpoint(run, verify=True)  # the manifest covers model/ and merged/
    files = json.loads((final / ckpt.COMPLETE).read_text())["files"]
    assert "model/adapter_config.json" in files and "model/adapter_model.safetensors" in files
    assert "merged/config.json" in files and not any(f.startswith("model/model") for f in files)
    assert (final / "state" / "teacher.safetensors").is_file()  # the EMA adapter
    from transformers import AutoModelForCausalLM

    adapter_model = peft.PeftModel.from_pretrained(build_tiny_model(seed=cfg.seed)[0], str(final / "model")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(final / "merged")).eval()
    packed = _batch(gen)
    expected = _logits(adapter_model, packed)
    assert not torch.allclose(expected, _logits(build_tiny_model(seed=cfg.seed)[0], packed), atol=1e-4)  # it trained
    torch.testing.assert_close(_logits(merged, packed), expected, rtol=0, atol=1e-5)
    # the same afterwards from the command line, for any checkpoint
    assert main(["merge-lora", str(run), "--output", str(tmp_path / "merged")]) == 0
    assert "merged model:" in capsys.readouterr().out
    later, _ = load_model(str(tmp_path / "merged"))
    torch.testing.assert_close(_logits(later, packed), expected, rtol=0, atol=1e-5)
    # `denser eval`, `denser report drift` and --teacher-path find the merged model of a LoRA run
    from denser.analysis.checkpoints import resolve_model
    from denser.trainers.teacher import resolve_teacher_path

    assert resolve_model(str(run)) == str(final / "merged") and resolve_teacher_path(str(final)) == final / "merged"
    # the adapter directory is not a whole model: one line naming the way out
    with pytest.raises(ModelNotFoundError, match="LoRA adapter .*denser merge-lora"):
        load_model(str(final / "model"))


def test_merged_model_of_a_policy_equals_the_policy(gen):
    policy = _policy(seed=2)
    merged = merged_model(policy)
    packed = _batch(gen)
    torch.testing.assert_close(_logits(merged, packed), _logits(policy, packed), rtol=0, atol=1e-5)
    assert trainable_adapter(policy)  # the policy still has its adapter
    assert not any("lora_" in n for n, _ in merged.named_parameters())


def test_merge_lora_refuses_a_full_fine_tuning_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="no LoRA checkpoint"):
        merge_lora(tmp_path)


@pytest.mark.slow
def test_two_process_lora_run_trains_one_adapter_with_its_ema_teacher_and_reference(tmp_path):
    """LoRA under DDP (accelerate launch, 2 CPU processes, gloo): the hybrid objective uses the reference
    (the base model through AdapterView, --kl-coef) and the EMA teacher of the adapter; one process writes
    the metrics and a peft adapter whose B moved from its zero start, with the teacher's EMA beside it."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "ddp-lora"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "denser", "train",
           "--objective", "hybrid", "--lam", "0.5", "--teacher", "ema", "--kl-coef", "0.1", "--steps", "2",
           "--output-dir", str(out), *[a for a in SMALL if a != "--cpu"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2] and rows[1]["processes"] == 2
    assert all(r.get("skipped", 0) == 0 for r in rows[1:3])
    final = ckpt.latest_checkpoint(out)
    adapter = load_file(final / "model" / "adapter_model.safetensors")
    teacher = load_file(final / "state" / "teacher.safetensors")
    b_policy = {k: v for k, v in adapter.items() if "lora_B" in k}
    b_teacher = {k: v for k, v in teacher.items() if "lora_B" in k}
    assert b_policy and len(b_teacher) == len(b_policy)
    assert any(v.abs().max() > 0 for v in b_policy.values())  # trained: a fresh adapter's B is zero
    # the EMA (rate 0.05) lags the policy: it moved, but less than the adapter did
    moved_p = sum(float(v.norm()) for v in b_policy.values())
    moved_t = sum(float(v.norm()) for v in b_teacher.values())
    assert 0 < moved_t < moved_p
