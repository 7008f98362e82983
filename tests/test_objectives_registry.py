"""The registry: a user's objective through the decorator and the chunked core, every bad input."""

import dataclasses
import typing
from dataclasses import field

import pytest
import torch
from test_objectives_helpers import make_case

import denser.objectives as objectives
from denser.kernels import CoreOptions, fused_loss, token_stats
from denser.objectives import (
    LossOutput,
    Metric,
    Objective,
    Signal,
    aggregate,
    field_help,
    get_objective,
    list_objectives,
    objective_class,
    objective_fields,
    register_objective,
    unregister_objective,
)

BUILTINS = {"grpo", "dr_grpo", "dapo", "gspo", "sdpo", "hybrid", "hybrid_adv", "rloo", "reinforce_pp",
            "reinforce_pp_baseline", "cispo"}


@pytest.fixture
def custom():
    """Registers ``test_reinforce`` through the decorator for one test."""

    @register_objective("test_reinforce")
    class Reinforce(Objective):
        """REINFORCE with an entropy bonus (test objective)."""

        scale: float = field(default=1.0, metadata={"help": "loss multiplier"})
        bonus: float = field(default=0.0, metadata={"help": "entropy bonus"})

        def signals(self):
            return frozenset({Signal.ADVANTAGES} | ({Signal.ENTROPY} if self.bonus else set()))

        def loss(self, stats, batch):
            per_token = -self.scale * batch.token_advantages() * stats.logp
            if self.bonus:
                per_token = per_token - self.bonus * stats.entropy
            return LossOutput(aggregate(per_token, batch, "seq-mean-token-mean"),
                              {"logp": Metric.of(stats.logp, batch.token_mask)})

    yield Reinforce
    unregister_objective("test_reinforce")


def test_custom_objective_registered_and_differentiated_through_chunked_core(gen, custom):
    assert dataclasses.is_dataclass(custom) and custom.name == "test_reinforce"
    assert "test_reinforce" in [row[0] for row in list_objectives()]
    objective = get_objective("test_reinforce", scale=2, bonus=0.1)  # int -> float
    assert objective.scale == 2.0 and isinstance(objective.scale, float)
    assert objective.core_options() == CoreOptions(need_entropy=True, need_divergence=False)
    case = make_case(gen)
    batch = case["batch"]
    grads = {}
    for backend in ("reference", "chunked"):
        hidden = case["hidden"].clone().requires_grad_()
        stats = token_stats(hidden, case["weight"], case["targets"], need_entropy=True, backend=backend, chunk_size=4)
        out = objective.loss(stats, batch)
        (grads[backend],) = torch.autograd.grad(out.loss, hidden)
        grads[backend + "_loss"] = out.loss.detach()
    hidden = case["hidden"].clone().requires_grad_()
    fused = fused_loss(hidden, case["weight"], case["targets"], objective, batch, backend="chunked", chunk_size=5)
    (grads["fused"],) = torch.autograd.grad(fused.loss, hidden)
    assert torch.allclose(grads["chunked_loss"], grads["reference_loss"], rtol=1e-5)
    assert torch.allclose(fused.loss.detach(), grads["reference_loss"], rtol=1e-5)
    for key in ("chunked", "fused"):
        assert torch.allclose(grads[key], grads["reference"], rtol=1e-4, atol=1e-6), key
    assert grads["reference"].abs().sum() > 0


def test_registering_a_duplicate_name_fails(custom):
    with pytest.raises(ValueError, match="already registered"):
        @register_objective("test_reinforce")
        class Again(Objective):
            pass
    with pytest.raises(ValueError, match="'grpo' is already registered"):
        @register_objective("grpo")
        class Mine(Objective):
            pass
    assert objective_class("grpo") is objectives.GRPO


def test_registering_a_non_objective_fails():
    with pytest.raises(TypeError, match="subclass of denser.objectives.Objective"):
        @register_objective("test_not_an_objective")
        class NotOne:
            pass


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown objective 'grpoo'") as err:
        get_objective("grpoo")
    for name in BUILTINS:
        assert name in str(err.value)


def test_unknown_field_lists_the_fields():
    with pytest.raises(ValueError, match="no field.*clip_hi") as err:
        get_objective("grpo", clip_hi=0.3)
    for name in ("clip_low", "clip_high", "kl_coef", "loss_agg_mode"):
        assert name in str(err.value)


@pytest.mark.parametrize("name, overrides, match", [
    ("grpo", dict(clip_low="0.2"), "must be a float"),
    ("grpo", dict(clip_low=True), "must be a float"),
    ("grpo", dict(use_old_logp=1), "must be a bool"),
    ("grpo", dict(loss_agg_mode="mean"), "must be one of"),
    ("grpo", dict(ratio_level="seq"), "must be one of"),
    ("grpo", dict(clip_ratio_c="off"), "clip_ratio_c"),
    ("sdpo", dict(topk=10.5), "must be an int"),
    ("sdpo", dict(teacher="student"), "must be one of"),
    ("sdpo", dict(seed="1"), "must be an int"),
    ("hybrid", dict(lam_end="0.5"), "lam_end"),
])
def test_wrong_types_fail_naming_the_field(name, overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        get_objective(name, **overrides)
    assert repr(next(iter(overrides))) in str(err.value) or next(iter(overrides)) in str(err.value)


def test_optional_fields_take_none_and_ints_widen():
    assert get_objective("grpo", clip_ratio_c=None).clip_ratio_c is None
    assert get_objective("sdpo", is_clip=None).is_clip is None
    assert get_objective("hybrid", lam=1).lam == 1.0
    assert get_objective("grpo", clip_ratio_c=4).clip_ratio_c == 4.0


def test_builtins_registered_with_documented_typed_fields():
    rows = {name: (doc, signals) for name, doc, signals in list_objectives()}
    assert BUILTINS <= set(rows)
    for name in BUILTINS:
        doc, signals = rows[name]
        assert doc and isinstance(signals, frozenset) and signals
        cls = objective_class(name)
        hints = typing.get_type_hints(cls)
        for f in objective_fields(cls):
            assert f.name in hints, f"{name}.{f.name} has no type annotation"
            assert field_help(f), f"{name}.{f.name} has no help"
            assert f.default is not dataclasses.MISSING, f"{name}.{f.name} has no default"
            # every default passes the registry's own type check
            get_objective(name, **{f.name: f.default})


def test_every_builtin_separable_declaration():
    for name in BUILTINS:
        assert get_objective(name).separable in ("token", "sequence")
