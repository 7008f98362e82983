"""The peer of the step benchmark: TRL 1.16's own loss path for GRPO and SDPO on the step's tensors.

An instance of ``GRPOTrainer`` / ``SDPOTrainer`` is made without its ``__init__`` (no datasets, no
generation), given the attributes its loss methods read as ``__init__`` sets them from the config,
and its ``compute_loss`` runs on the same prompts, completions and teacher contexts as denser's case.
TRL is imported inside the functions: it is an optional dependency of the benchmark only.
"""

from __future__ import annotations


def _right_pad(seqs, pad: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _left_pad(seqs, pad: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask



def _trl_standin(cls, args, policy, **attrs):
    """An instance of a TRL trainer class with the attributes its loss methods read, set as its
    ``__init__`` sets them from ``args``; the rest of ``__init__`` (datasets, generation) is skipped."""
    from collections import defaultdict

    from accelerate import Accelerator

    tr = object.__new__(cls)
    tr.args = args
    tr.accelerator = Accelerator(cpu=True)
    tr.state = type("State", (), {"global_step": 0})()
    tr.model = policy
    tr.current_gradient_accumulation_steps = 1
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr.temperature = args.temperature
    for k, v in attrs.items():
        setattr(tr, k, v)
    return tr


def trl_grpo_step(completion_len: int, policy, data, pad: int, tmp: str):
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    prompts, _, completions, advantages = data
    args = GRPOConfig(output_dir=tmp, report_to=[], use_cpu=True, max_completion_length=completion_len)
    # GRPOTrainer.__init__: the fused LM head that returns per-token log-probs and entropies
    add_fused_lm_head(policy, temperature=args.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
                      outputs=("log_probs", "entropy"))
    tr = _trl_standin(
        GRPOTrainer, args, policy, loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold, top_entropy_quantile=args.top_entropy_quantile,
        use_vllm=False, vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, max_completion_length=completion_len,
        num_generations=args.num_generations)
    prompt_ids, prompt_mask = _left_pad(prompts, pad)
    completion_ids, completion_mask = _right_pad(completions, pad)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum().float()}
    loss = tr.compute_loss(policy, inputs)
    loss.backward()
    return float(loss.detach())


def trl_sdpo_step(completion_len: int, policy, teacher, data, pad: int, tmp: str):
    import inspect

    import torch
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    prompts, teacher_ctx, completions, advantages = data
    args = SDPOConfig(output_dir=tmp, report_to=[], use_cpu=True, distillation_mode="full_logits",
                      distillation_alpha=0.5, teacher_model_kind="ema", max_completion_length=completion_len)
    tr = _trl_standin(SDPOTrainer, args, policy, teacher_model=teacher, use_teacher_server=False,
                      model_kwarg_keys=inspect.signature(policy.forward).parameters.keys())
    prompt_ids, prompt_mask = _left_pad(prompts, pad)
    completion_ids, completion_mask = _right_pad(completions, pad)
    t_ids, t_mask = _left_pad(teacher_ctx, pad)
    b = len(completions)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "teacher_input_ids": torch.cat([t_ids, completion_ids], 1),
              "teacher_attention_mask": torch.cat([t_mask, completion_mask], 1),
              "self_distillation_mask": torch.ones(b)}
    loss = tr.compute_loss(policy, inputs)
    loss.backward()
    return float(loss.detach())


