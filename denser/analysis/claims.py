"""The claims of "Denser ≠ Better" checked against a comparison's runs, and the density frontier.

**Which runs are GRPO and which SDPO** comes from each run's recorded objective (``grpo``; ``sdpo``
with its recorded teacher), never from the label a user gave it. Every SDPO configuration present is
compared with every GRPO configuration present.

**The verdict rule** (fixed): for a claim "SDPO's X is larger (smaller) than GRPO's", the difference
``d = mean_sdpo - mean_grpo`` over seeds has the standard error ``se = sqrt(se_sdpo² + se_grpo²)``
(standard errors over seeds); for the accuracy measures, where the runs hold per-prompt successes,
``se`` is the larger of that and the standard deviation of ``d`` under the bootstrap over seeds and
eval prompts. Then ``|d| > 2 se`` in the claimed direction: **reproduced**; ``|d| > 2 se`` in the
other direction: **contradicted**; otherwise **not resolved at this scale**. A configuration with one
seed has no standard error over seeds, so a claim it enters is not resolved.

**When the teacher knows better** (:data:`TEACHER_CLAIMS`): claims comparing two configurations in
roles read from their records (:func:`teacher_roles`): with an aligned, stable teacher (sdpo or opd
with a frozen ``teacher_path`` teacher) dense distillation specialises faster than GRPO (in-domain
gain) and still forgets more; SDPO-CL's stable (frozen) teachers beat EMA teachers (final accuracy,
both or neither with a ``teacher_path``). Same difference, standard error and verdict rule.
:func:`stage_alignment` pairs each stage's recorded teacher alignment (``teacher_probe``) with what
the stage did to its task.

**The density frontier**: hybrid configurations (``hybrid``, ``hybrid_adv``) at a constant ``lam``
(the GRPO weight: ``lam = 1`` is the sparse end, ``lam = 0`` the dense end), one point per lam with
in-domain gain against forgetting and against response KL. A mix (``0 < lam < 1``) dominates an end
when its point estimate has at least the end's in-domain gain and at most its cost (forgetting or
KL), one of them strictly; the dominance is resolved when at least one of the two differences exceeds
2 se of the difference (the rule above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from denser.analysis.seeds import RunGroup, Stat

SE_MULTIPLE = 2.0

REPRODUCED, CONTRADICTED, NOT_RESOLVED = "reproduced", "contradicted", "not resolved at this scale"


@dataclass(frozen=True)
class Claim:
    text: str
    measure: str  # a key of denser.analysis.seeds.MEASURE
    sign: int  # +1: the paper says SDPO's value is larger, -1 smaller


CLAIMS: tuple[Claim, ...] = (
    Claim("SDPO specialises faster in-domain", "in_domain_gain", +1),
    Claim("SDPO forgets more than GRPO", "forgetting", +1),
    Claim("SDPO's parameter drift is larger", "relative_l2", +1),
    Claim("… with lower principal-subspace overlap", "mean_overlap", -1),
    Claim("SDPO's responses drift further from the initial model's", "kl", +1),
    Claim("… (similarity to the initial responses is lower)", "similarity", -1),
    Claim("SDPO amplifies formatting artifacts", "repeated_answer_rate", +1),
    Claim("… (no answer marker)", "no_answer_rate", +1),
    Claim("… (repeated 3-grams)", "repeated_ngram_rate", +1),
    Claim("… (hitting the length limit)", "length_limit_rate", +1),
)


def objective_role(group: RunGroup) -> str | None:
    """``"grpo"``, ``"sdpo"`` or None, from the recorded objective (not the label)."""
    return group.objective if group.objective in ("grpo", "sdpo") else None


def describe(group: RunGroup) -> str:
    """The recorded configuration in words: objective, teacher, lam."""
    args = group.args
    parts = []
    if group.objective.startswith("hybrid") and args.get("lam") is not None:
        parts.append(f"lam {args['lam']:g}" + (f"→{args['lam_end']:g}" if args.get("lam_end") is not None else ""))
    if args.get("teacher") and (group.objective == "sdpo" or group.objective.startswith("hybrid")):
        parts.append(f"{args['teacher']} teacher")
    return group.objective + (f" ({', '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class Difference:
    diff: float | None
    se: float | None  # None: a side with one seed (or no value)
    ci: tuple[float, float] | None = None  # bootstrap 95% interval (accuracy measures)


def difference(a: Stat, b: Stat, boot_a: np.ndarray | None = None, boot_b: np.ndarray | None = None) -> Difference:
    """``a - b`` with the rule's standard error (see the module docstring)."""
    if a.mean is None or b.mean is None:
        return Difference(None, None)
    d = a.mean - b.mean
    se = math.sqrt(a.se ** 2 + b.se ** 2) if a.se is not None and b.se is not None else None
    ci = None
    if boot_a is not None and boot_b is not None:
        diffs = boot_a - boot_b
        lo, hi = np.percentile(diffs, [2.5, 97.5])
        ci = (float(lo), float(hi))
        if se is not None:
            se = max(se, float(np.std(diffs, ddof=1)))
    return Difference(d, se, ci)


def verdict(diff: Difference, sign: int) -> str:
    if diff.diff is None or diff.se is None or abs(diff.diff) <= SE_MULTIPLE * diff.se:
        return NOT_RESOLVED
    return REPRODUCED if diff.diff * sign > 0 else CONTRADICTED


@dataclass(frozen=True)
class ClaimRow:
    claim: Claim
    sdpo: RunGroup
    grpo: RunGroup
    sdpo_stat: Stat
    grpo_stat: Stat
    diff: Difference
    verdict: str


def claim_rows(groups: list[RunGroup], summaries: dict[str, dict[str, Stat]],
               boots: dict[str, dict[str, np.ndarray] | None]) -> list[ClaimRow]:
    """Every claim for every (sdpo, grpo) pair of configurations present; [] without both."""
    sdpo = [g for g in groups if objective_role(g) == "sdpo"]
    grpo = [g for g in groups if objective_role(g) == "grpo"]
    rows = []
    for claim in CLAIMS:
        for s in sdpo:
            for g in grpo:
                if s.records[0]["train_tasks"] != g.records[0]["train_tasks"]:
                    continue
                a, b = summaries[s.label][claim.measure], summaries[g.label][claim.measure]
                ba, bb = (boots.get(s.label) or {}).get(claim.measure), (boots.get(g.label) or {}).get(claim.measure)
                d = difference(a, b, ba, bb)
                rows.append(ClaimRow(claim, s, g, a, b, d, verdict(d, claim.sign)))
    return rows


# ----------------------------------------------------------------------------------- the frontier


def frontier_families(groups: list[RunGroup]) -> dict[str, list[RunGroup]]:
    """``{family: hybrid groups sorted by lam}`` for hybrid configurations at a constant lam; a family
    is the objective with its teacher."""
    fam: dict[str, list[RunGroup]] = {}
    for g in groups:
        if g.objective.startswith("hybrid") and g.args.get("lam") is not None and g.args.get("lam_end") is None:
            key = g.objective + (f" ({g.args['teacher']} teacher)" if g.args.get("teacher") else "")
            fam.setdefault(key, []).append(g)
    return {k: sorted(v, key=lambda g: g.args["lam"]) for k, v in fam.items()}


def lam_values(groups: list[RunGroup]) -> int:
    """The most distinct lam values of one frontier family."""
    return max((len({g.args["lam"] for g in v}) for v in frontier_families(groups).values()), default=0)


def dominance(family: list[RunGroup], refs: list[RunGroup], summaries: dict[str, dict[str, Stat]],
              cost: str, cost_name: str) -> str:
    """One sentence: for each end of the frontier (its lowest and highest lam, and the GRPO and SDPO
    configurations in ``refs``), which mixes dominate it in (in-domain gain, ``cost``)."""
    lams = [g.args["lam"] for g in family]
    lo, hi = min(lams), max(lams)
    mixes = [g for g in family if lo < g.args["lam"] < hi and 0 < g.args["lam"] < 1]
    ends = [(g, f"the dense end (lam {lo:g})") for g in family if g.args["lam"] == lo]
    ends += [(g, f"the sparse end (lam {hi:g})") for g in family if g.args["lam"] == hi]
    ends += [(g, f"`{g.label}` ({describe(g)})") for g in refs]
    head = f"In-domain gain vs {cost_name}: "
    if not mixes:
        return head + f"no mix strictly between lam {lo:g} and {hi:g} was run, so no dominance can be stated."
    found, none = [], []
    for end, name in ends:
        e_gain, e_cost = summaries[end.label]["in_domain_gain"], summaries[end.label][cost]
        winners = []
        for m in mixes:
            m_gain, m_cost = summaries[m.label]["in_domain_gain"], summaries[m.label][cost]
            if None in (m_gain.mean, m_cost.mean, e_gain.mean, e_cost.mean):
                continue
            if m_gain.mean >= e_gain.mean and m_cost.mean <= e_cost.mean and (
                    m_gain.mean > e_gain.mean or m_cost.mean < e_cost.mean):
                gd, cd = difference(m_gain, e_gain), difference(e_cost, m_cost)
                resolved = any(d.se is not None and d.diff > SE_MULTIPLE * d.se for d in (gd, cd))
                winners.append(f"lam {m.args['lam']:g} (in-domain gain {gd.diff:+.3g} and {cost_name} {-cd.diff:+.3g} against it; "
                               + ("resolved: beyond 2 se" if resolved else "not resolved: within 2 se or 1 seed") + ")")
        if winners:
            found.append(f"{' and '.join(winners)} {'dominates' if len(winners) == 1 else 'dominate'} {name}")
        else:
            none.append(name)
    parts = []
    if found:
        parts.append("a sparse-dense mix dominates an end: " + "; ".join(found))
    if none:
        parts.append(("no sparse-dense mix dominates " if not found else "none dominates ") + ", ".join(none)
                     + f" (each mix has less in-domain gain or more {cost_name})")
    return head + "; ".join(parts) + " (point estimates)."


# ------------------------------------------------------------------------- when the teacher knows better


@dataclass(frozen=True)
class PairClaim:
    """A claim comparing configuration A with configuration B (roles from the records, see :func:`teacher_role`)."""

    text: str
    measure: str  # a key of denser.analysis.seeds.MEASURE
    sign: int  # +1: the claim says A's value is larger, -1 smaller
    a: str  # the role of A
    b: str  # the role of B
    same_teacher_source: bool = False  # A and B must both have or both lack a teacher model (--teacher-path)


TEACHER_CLAIMS: tuple[PairClaim, ...] = (
    PairClaim("With an aligned, stable teacher, dense distillation specialises faster than GRPO", "in_domain_gain", +1,
              "aligned-stable", "grpo"),
    PairClaim("… and still forgets more", "forgetting", +1, "aligned-stable", "grpo"),
    PairClaim("Stable teachers beat EMA teachers (SDPO-CL)", "final_accuracy", +1, "sdpo-frozen", "sdpo-ema",
              same_teacher_source=True),
)


def teacher_roles(group: RunGroup) -> set[str]:
    """The roles a configuration plays in :data:`TEACHER_CLAIMS`, from its recorded objective and
    teacher: ``grpo``; ``aligned-stable`` (sdpo or opd with a frozen teacher taken from another model,
    ``teacher_path``: the teacher does not move and is not the student's own start); ``sdpo-frozen``,
    ``sdpo-ema`` (sdpo's teacher, wherever it starts)."""
    roles = set()
    args = group.args
    if group.objective == "grpo":
        roles.add("grpo")
    if group.objective in ("sdpo", "opd") and args.get("teacher") == "frozen" and args.get("teacher_path"):
        roles.add("aligned-stable")
    if group.objective == "sdpo" and args.get("teacher") in ("frozen", "ema"):
        roles.add(f"sdpo-{args['teacher']}")
    return roles


@dataclass(frozen=True)
class PairRow:
    claim: PairClaim
    a: RunGroup
    b: RunGroup
    a_stat: Stat
    b_stat: Stat
    diff: Difference
    verdict: str


def teacher_claim_rows(groups: list[RunGroup], summaries: dict[str, dict[str, Stat]],
                       boots: dict[str, dict[str, np.ndarray] | None]) -> list[PairRow]:
    """Every teacher claim for every pair of configurations in its two roles on the same task sequence
    (the difference, its se and the verdict by the rule of the module docstring); [] when no pair exists."""
    rows = []
    for claim in TEACHER_CLAIMS:
        for a in (g for g in groups if claim.a in teacher_roles(g)):
            for b in (g for g in groups if claim.b in teacher_roles(g) and g is not a):
                if a.records[0]["train_tasks"] != b.records[0]["train_tasks"]:
                    continue
                if claim.same_teacher_source and bool(a.args.get("teacher_path")) != bool(b.args.get("teacher_path")):
                    continue
                sa, sb = summaries[a.label][claim.measure], summaries[b.label][claim.measure]
                ba, bb = (boots.get(a.label) or {}).get(claim.measure), (boots.get(b.label) or {}).get(claim.measure)
                d = difference(sa, sb, ba, bb)
                rows.append(PairRow(claim, a, b, sa, sb, d, verdict(d, claim.sign)))
    return rows


def stage_alignment(record: dict) -> list[dict]:
    """Per trained stage k (1..T) of one run: the teacher alignment recorded at its start
    (``stages[k].teacher_probe``, absent for runs without a teacher or without ``--teacher-probe``) and
    what the stage did to its task:

    - ``logp``: teacher − student log-prob of the correct reply's first token (mean over prompts);
    - ``accuracy``: the teacher's greedy accuracy minus the student's (``R[k-1, k]``), where the teacher
      ran as a policy;
    - ``gain``: ``R[k, k] - R[k-1, k]``;
    - ``forgetting``: of task k by the end, ``max_{k<=l<T} R[l, k] - R[T, k]`` (None for the last task)."""
    R = record["accuracy_matrix"]
    T = len(record["train_tasks"])
    out = []
    for k in range(1, min(T, len(R) - 1) + 1):
        probe = record["stages"][k].get("teacher_probe") or {}
        delta = (probe.get("first") or {}).get("teacher_minus_student")
        acc = probe.get("teacher_accuracy")
        done = len(R) - 1 == T
        out.append({
            "stage": k, "task": record["train_tasks"][k - 1],
            "logp": delta[0] if delta else None,
            "accuracy": None if acc is None else acc - R[k - 1][k - 1],
            "gain": R[k][k - 1] - R[k - 1][k - 1],
            "forgetting": (max(R[l][k - 1] for l in range(k, T)) - R[T][k - 1]) if done and k < T else None,
        })
    return out
