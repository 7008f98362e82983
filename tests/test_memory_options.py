"""Memory options of the loop: gradient checkpointing gives the same loss and gradients, and the flags
reach the model and accelerate."""

from __future__ import annotations

import pytest
import torch

from denser.engines.packing import build_packed_batch, completion_hidden_states, lm_head_params
from denser.kernels import fused_loss
from denser.objectives import PolicyBatch, get_objective
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.memory import adamw, set_mmap_threshold, trim_heap
from denser.trainers.models import load_model
from denser.trainers.teacher import TeacherWeights


def _loss_and_grads(checkpointing: bool, seed: int):
    model, _ = load_model("tiny", seed=seed)
    model.train()  # dropout is 0 in the tiny config: train mode is deterministic
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(seed + 1)
    vocab = model.get_output_embeddings().weight.shape[0]
    contexts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 3)]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 4, 11)]
    packed = build_packed_batch(contexts, completions, pad_token_id=0)
    batch = PolicyBatch(seq_ids=packed.seq_ids, num_seqs=3, global_tokens=float(packed.seq_ids.numel()),
                        global_seqs=3.0, rewards=torch.tensor([1.0, 0.0, 0.5]),
                        advantages=torch.randn(3, generator=g))
    hidden = completion_hidden_states(model, packed)
    weight, bias = lm_head_params(model)
    out = fused_loss(hidden, weight, packed.targets, get_objective("grpo"), batch, bias=bias, backend="chunked")
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    for seed in (0, 1):
        loss, grads = _loss_and_grads(False, seed)
        loss_ckpt, grads_ckpt = _loss_and_grads(True, seed)
        assert torch.equal(loss, loss_ckpt) or torch.allclose(loss, loss_ckpt, rtol=1e-6, atol=1e-7)
        assert grads.keys() == grads_ckpt.keys() and len(grads) > 5
        for name in grads:  # recomputation repeats the same ops: equal up to fp32 rounding
            torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
        assert any(float(g.abs().sum()) > 0 for g in grads.values())


def test_the_flags_reach_the_model_and_accelerate(tmp_path):
    cfg = TrainConfig(model="tiny", steps=1, eval_size=2, progress=False, output_dir=str(tmp_path / "r"),
                      gradient_checkpointing=True, mixed_precision="bf16", cpu=True)
    trainer = Trainer(cfg, get_objective("grpo"))
    assert trainer.policy.is_gradient_checkpointing
    assert trainer.accelerator.mixed_precision == "bf16"
    assert next(trainer.policy.parameters()).dtype == torch.float32  # fp32 master weights
    row = trainer.step(0)
    assert torch.isfinite(torch.tensor(row["loss"]))


def test_runs_with_different_mixed_precision_share_one_process(tmp_path):
    """accelerate keeps one state per process: a bf16 run after an fp32 one (a notebook calling
    ``denser.train`` twice) must get its own precision, not accelerate's 'already initialized'."""
    for i, precision in enumerate(("no", "bf16", "no")):
        cfg = TrainConfig(model="tiny", steps=1, eval_size=2, progress=False, output_dir=str(tmp_path / f"r{i}"),
                          mixed_precision=precision, cpu=True)
        assert Trainer(cfg, get_objective("grpo")).accelerator.mixed_precision == precision


def test_adamw_is_fused_where_supported_and_matches_plain_adamw():
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    runs = {}
    for name, make in (("fused", lambda ps: adamw(ps, **kw)),
                       ("plain", lambda ps: torch.optim.AdamW(ps, foreach=False, **kw))):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = make(ps)
        for step_grads in grads:
            for p, gr in zip(ps, step_grads):
                p.grad = gr.clone()
            opt.step()
        runs[name] = (opt, ps)
    assert runs["fused"][0].defaults["fused"] is True  # torch >= 2.4 has the CPU kernel
    for a, b in zip(runs["fused"][1], runs["plain"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(runs["plain"][1], params))  # the steps moved them


def test_heap_helpers():
    assert isinstance(trim_heap(), bool)
    with pytest.raises(ValueError, match="nbytes must be > 0"):
        set_mmap_threshold(0)


def test_ema_teacher_state_is_the_live_weights_except_tied_copies():
    model, _ = load_model("tiny", seed=0)
    teacher = TeacherWeights(model, "ema", 0.5)
    state = teacher.state_dict()
    live = teacher.model.state_dict()
    assert state.keys() == live.keys()
    ptrs: set[int] = set()
    for k, v in state.items():
        ptr = live[k].untyped_storage().data_ptr()
        shared = v.untyped_storage().data_ptr() == ptr
        assert shared == (ptr not in ptrs), k  # no copy, except a tensor tied to an earlier one
        assert torch.equal(v, live[k])
        ptrs.add(ptr)
    assert TeacherWeights(model, "frozen", 0.0).state_dict() is None
