"""ARIES: losses against hand-computed values, the refinement template's exact ChatML, the
scorers (GSM8K references through the math verifier, code through the sandbox, a reward
model), rule-based and reward selection on hand-made chains, and a short `plm aries` run."""
import json
import math
import re

import pytest
import torch
import yaml

from plm.align import aries as aries_mod
from plm.align.aries import PairLoader, collate_pairs, encode_pair, make_loss_fn, make_pairs
from plm.align.config import AriesConfig, SampleConfig
from plm.align.losses import aries_preference_loss, aries_sft_loss, dpo_loss, sequence_logps, token_logps
from plm.eval.config import ScorerSpec, TaskSource
from plm.eval.scorers import CodeVerifier, MathVerifier, RewardModel, Verifier, build_scorer
from plm.align.selection import select_pair, select_reward, select_rule
from plm.eval.tasks import Task, code_tasks_from_tiny, load_tasks
from plm.data.chat import DEFAULT_REFINE_INSTRUCTION, direct_messages, refinement_messages
from plm.data import arith
from plm.data.chat import render_chatml
from plm.recipe import parse
from plm.errors import ConfigError
from test_sft import micro_base, run_cli  # noqa: F401  (shared session fixture)

T = torch.tensor


# ---- losses -----------------------------------------------------------------------------------
def test_dpo_hand_computed():
    # pi_w=-10, pi_l=-12, ref_w=-11, ref_l=-11, beta=0.1: logits = 0.1*((1)-(-1)) = 0.2
    loss, margin = dpo_loss(T([-10.0]), T([-12.0]), T([-11.0]), T([-11.0]), beta=0.1)
    assert margin.item() == pytest.approx(0.2)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)  # 0.598139
    assert loss.item() == pytest.approx(0.5981388693, abs=1e-6)
    # policy == reference: log 2, whatever beta
    loss, _ = dpo_loss(T([-3.0, -7.0]), T([-5.0, -1.0]), T([-3.0, -7.0]), T([-5.0, -1.0]), beta=0.5)
    assert torch.allclose(loss, torch.full((2,), math.log(2)))


def test_aries_preference_hand_computed():
    direct = (T([-10.0]), T([-12.0]), T([-11.0]), T([-11.0]))  # DPO logits 0.2
    refine = (T([-5.0]), T([-4.0]), T([-5.0]), T([-5.0]))  # DPO logits 0.1*(0-1) = -0.1
    out = aries_preference_loss(direct, refine, beta=0.1, lam=0.5)
    want = math.log(1 + math.exp(-0.2)) + 0.5 * math.log(1 + math.exp(0.1))  # 0.598139 + 0.5*0.744397
    assert out["loss"].item() == pytest.approx(want, abs=1e-6)
    assert out["refine_margin"].item() == pytest.approx(-0.1)


def test_lambda_zero_is_dpo():
    g = torch.Generator().manual_seed(0)
    d = tuple(torch.randn(5, generator=g) * 10 for _ in range(4))
    r = tuple(torch.randn(5, generator=g) * 10 for _ in range(4))
    dpo, _ = dpo_loss(*d, beta=0.3)
    assert torch.equal(aries_preference_loss(d, r, 0.3, 0.0)["loss"], dpo)
    assert torch.equal(aries_preference_loss(d, None, 0.3, 0.0)["loss"], dpo)
    with pytest.raises(ValueError):
        aries_preference_loss(d, None, 0.3, 1.0)


def test_aries_sft_sum():
    # -[log p(y_w|x) + log p(y_w|z(x,y_l))]
    assert aries_sft_loss(T([-3.0, -0.5]), T([-4.0, -1.5])).tolist() == [7.0, 2.0]


def test_token_and_sequence_logps_hand_computed():
    logits = torch.log(T([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    labels = T([[-100, 1, 2]])  # targets of positions 1 and 2 only
    lp = token_logps(logits, labels)
    assert lp[0, 0].item() == 0.0
    assert lp[0, 1].item() == pytest.approx(math.log(0.8), abs=1e-6)
    assert lp[0, 2].item() == pytest.approx(math.log(0.6), abs=1e-6)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return type("O", (), {"logits": logits})()

    assert sequence_logps(Fixed(), T([[0, 0, 0]]), labels).item() == pytest.approx(math.log(0.8 * 0.6), abs=1e-6)


# ---- the template ---------------------------------------------------------------------------
def test_refinement_prompt_exact_chatml():
    z = refinement_messages("What is 2 + 3?", "2 + 3 = 6\n#### 6")
    assert render_chatml(z, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 6\n#### 6<|im_end|>\n"
        "<|im_start|>user\nReview your previous answer step by step. If it contains a mistake, correct it; "
        "then give the complete improved answer.<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert refinement_messages("q", "a", system="S")[0] == {"role": "system", "content": "S"}
    assert render_chatml(direct_messages("q"), True) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert DEFAULT_REFINE_INSTRUCTION in render_chatml(z)


# ---- scorers ----------------------------------------------------------------------------------
def test_math_scorer_on_gsm8k(shared_data):
    from plm.data.answers import extract_reference_answer
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    tasks = [Task(r["question"], "math", extract_reference_answer(r["answer"])) for r in rows]
    scorer = build_scorer(ScorerSpec())
    assert scorer.score_batch(tasks, [r["answer"] for r in rows]) == [1.0] * 1319

    def perturb(ans: str) -> str:
        head, tail = ans.rsplit("####", 1)
        n = tail.strip().replace(",", "")
        wrong = str(int(n) + 1) if re.fullmatch(r"-?\d+", n) else n + "1"
        return f"{head}#### {wrong}"

    assert scorer.score_batch(tasks, [perturb(r["answer"]) for r in rows]) == [0.0] * 1319
    assert MathVerifier().score(tasks[0], "The answer is 18.") == 1.0


def test_step_checking_math_verifier():
    from plm.eval.tasks import Task
    from plm.data.answers import steps_consistent
    # hand-checked steps: precedence, chains, commas, rounding to the written precision
    assert steps_consistent("3 + 4 * 2 = 11 apples\nthen 16 - 3 - 4 = 9\n#### 9")
    assert steps_consistent("1,200 / 3 = 400 and 10 / 3 = 3.33\n#### 3.33")
    assert not steps_consistent("4 * 2 = 6 plants\n#### 8")
    assert not steps_consistent("10 / 3 = 3.4")
    assert steps_consistent("no working shown\n#### 8")
    # the right number through wrong working: plain verifier yes, step-checking verifier no
    t = Task(prompt="Chloe plants 4 rows of 2. How many?", reference="8", kind="math")
    wrong_work, right_work = "4 * 2 = 6 plants.\n#### 8", "4 * 2 = 8 plants.\n#### 8"
    assert build_scorer(ScorerSpec()).score_batch([t, t], [wrong_work, right_work]) == [1.0, 1.0]
    strict = build_scorer(parse(ScorerSpec, {"kind": "verifier", "check_steps": True}, "scorer"))
    assert strict.score_batch([t, t], [wrong_work, right_work]) == [0.0, 1.0]
    assert MathVerifier(check_steps=True).score(t, "4 * 2 = 8\n#### 9") == 0.0


def test_code_scorer_in_sandbox():
    tasks = code_tasks_from_tiny(3, seed=0)
    good = [t.code.canonical_solution for t in tasks]
    bad = ["```python\ndef solve(*a):\n    return None\n```", "```python\nwhile True:\n    pass\n```",
           "no code here"]
    s = Verifier(CodeVerifier(timeout_s=2.0, memory_mb=256)).score_batch(tasks + tasks, good + bad)
    assert s == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_reward_model_scorer(micro_base):
    """The score is the mean log-probability of the answer's tokens and <|im_end|> after the
    ChatML prompt, computed here independently with one forward pass of the reference model."""
    from plm.data.chat import IM_END, chat_prompt
    from plm.data.tokenizer import Tokenizer
    from plm.model.checkpoint import load_model
    rm = RewardModel(str(micro_base))
    tok, model = Tokenizer.from_dir(micro_base), load_model(micro_base).eval()

    def by_hand(prompt: str, answer: str) -> float:
        head = tok.encode(chat_prompt(direct_messages(prompt)))
        ids = tok.encode(chat_prompt(direct_messages(prompt)) + answer + IM_END)
        assert ids[:len(head)] == head
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        picked = [lp[i - 1, ids[i]].item() for i in range(len(head), len(ids))]
        return sum(picked) / len(picked)

    t = Task("What is 2 + 3?", "math", "5")
    got = rm.score_batch([t, t], ["5", "2 + 3 = 5"])
    assert got == pytest.approx([by_hand(t.prompt, "5"), by_hand(t.prompt, "2 + 3 = 5")], abs=1e-4)
    assert got[0] != got[1] and rm.score("What is 2 + 3?", "5") == pytest.approx(got[0], abs=1e-6)
    spec = parse(ScorerSpec, {"kind": "reward_model", "checkpoint": str(micro_base)}, "scorer")
    assert not rm.binary and build_scorer(spec).binary is False


# ---- selection --------------------------------------------------------------------------------
def test_rule_selection_hand_made_chains():
    assert select_rule([False, True, True]) == (2, 0)  # latest correct beats earlier correct
    assert select_rule([True, False, False]) == (0, 1)  # refinement broke it: keep the original
    assert select_rule([False, True, False, True]) == (3, 0)
    assert select_rule([True, True, True]) is None
    assert select_rule([False, False]) is None
    assert select_pair([0.0, 1.0, 0.0], "rule") == (1, 0)
    assert select_reward([0.1, 0.5, 0.5]) == (2, 0)
    assert select_reward([0.2, 0.1, 0.1]) == (0, 1)
    assert select_reward([0.3, 0.3]) is None
    assert select_reward([0.1, 0.2], min_margin=0.5) is None


def test_make_pairs_rule_based(monkeypatch, micro_base):
    """Hand-made chains through the ARIES selection step: verifier scores, pairs, reference log-probs."""
    from plm.data.tokenizer import Tokenizer
    from plm.model.checkpoint import load_model
    from plm.train.dist import DistEnv
    tok, model = Tokenizer.from_dir(micro_base), load_model(micro_base)
    pool = [Task("What is 2 + 3?", "math", "5", id="a"), Task("What is 4 * 4?", "math", "16", id="b"),
            Task("What is 9 - 1?", "math", "8", id="c")]
    made = [["#### 6", "2 + 3 = 5\n#### 5", "#### 5"],  # wrong, right, right -> (2, 0)
            ["#### 16", "#### 16", "#### 16"],  # all right -> no pair
            ["#### 8", "#### 7", "#### 9"]]  # right, wrong, wrong -> (0, 1)
    monkeypatch.setattr(aries_mod, "chains", lambda lm, tasks, rounds, cfg, instruction, system=None: made)
    cfg = AriesConfig(prompts_per_iteration=3, refinements=2)
    pairs, stats = make_pairs(model, tok, pool, 1, cfg, SampleConfig(), MathVerifier(), 0, DistEnv(), False)
    assert [(p["task_id"], p["chosen_idx"], p["rejected_idx"]) for p in pairs] == [("a", 2, 0), ("c", 0, 1)]
    assert pairs[0]["chosen"] == "#### 5" and pairs[0]["rejected"] == "#### 6"
    assert stats.pairs_kept == 2 and stats.chains_all_correct == pytest.approx(1 / 3)
    assert stats.sample_metric == "acc" and stats.sample_initial == pytest.approx(2 / 3)
    # lambda = 0 (plain iterative DPO): chains are K+1 independent direct answers, 2 sequences a pair
    calls = []

    def fake_answer(lm, tasks, cfg, seed_offset=0, system=None):
        calls.append(seed_offset)
        return [made[i][seed_offset] for i in range(len(tasks))]

    monkeypatch.setattr(aries_mod, "answer", fake_answer)
    dpairs, _ = make_pairs(model, tok, pool, 1, AriesConfig(prompts_per_iteration=3, refinements=2, lam=0.0),
                           SampleConfig(), MathVerifier(), 0, DistEnv(), False)
    assert calls == [0, 1, 2] and [len(p["enc"]) for p in dpairs] == [2, 2] and len(dpairs[0]["ref"]) == 2
    # the stored reference log-probs are the model's own, context by context
    b = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        lp = sequence_logps(model, b["input_ids"], b["seq_labels"], b["attention_mask"]).view(4, 2).T
    assert torch.allclose(lp, torch.tensor([p["ref"] for p in pairs]), atol=1e-4)
    # the refinement context shows y_l by default; aries.keep = 1 shows y_w ("keep a right answer")
    assert [p["shown"] for p in pairs] == ["rejected", "rejected"]
    kpairs, kstats = make_pairs(model, tok, pool, 1, AriesConfig(prompts_per_iteration=3, refinements=2, keep=1.0),
                                SampleConfig(), MathVerifier(), 0, DistEnv(), False)
    assert kstats.keep_pairs == 2 and [p["shown"] for p in kpairs] == ["chosen", "chosen"]
    prompts = {t.id: t.prompt for t in pool}
    for p, kp in zip(pairs, kpairs):
        def z(shown, p=p):
            return tok.apply_chat_template(refinement_messages(prompts[p["task_id"]], shown), add_generation_prompt=True)
        assert tok.decode(p["enc"][2].ids).startswith(z(p["rejected"]))
        assert tok.decode(kp["enc"][2].ids).startswith(z(p["chosen"]))
        assert kp["enc"][:2] == p["enc"][:2]  # the direct context is unchanged
    with pytest.raises(ConfigError, match=r"aries.keep: a share of pairs in \[0, 1\], got 1.5"):
        parse(AriesConfig, {"keep": 1.5}, "aries")


def test_pair_loss_and_loader(micro_base):
    from plm.data.tokenizer import Tokenizer
    from plm.model.checkpoint import load_model
    tok, model = Tokenizer.from_dir(micro_base), load_model(micro_base).eval()
    cfg = AriesConfig(beta=0.2, lam=0.7, sft_weight=0.5)
    pairs = []
    for i, p in enumerate(arith.generate(5, seed=9)):
        enc = encode_pair(tok, p.question, p.solution, "#### 0", cfg)
        pairs.append({"enc": enc, "ref": [-30.0 - i, -5.0, -25.0, -6.0 + i]})
    b = collate_pairs(pairs[:3], tok.pad_token_id)
    assert b["labels"].tolist() == [0, 0, 0]  # one counted entry per pair: the trainer averages over pairs
    with torch.no_grad():
        got, n = make_loss_fn(cfg)(model, b)
        # by hand from the per-sequence log-probs
        lp = torch.stack([sequence_logps(model, torch.tensor([s.ids]), torch.tensor([s.labels]))[0]
                          for c in range(4) for s in [pr["enc"][c] for pr in pairs[:3]]]).view(4, 3)
    ref = torch.tensor([p["ref"] for p in pairs[:3]]).T
    d = -torch.nn.functional.logsigmoid(0.2 * ((lp[0] - ref[0]) - (lp[1] - ref[1])))
    r = -torch.nn.functional.logsigmoid(0.2 * ((lp[2] - ref[2]) - (lp[3] - ref[3])))
    n_w = torch.tensor([float(sum(1 for x in pr["enc"][0].labels if x != -100)) for pr in pairs[:3]])
    want = (d + 0.7 * r + 0.5 * (-(lp[0] + lp[2])) / n_w).sum()
    assert n == 3 and got.item() == pytest.approx(want.item(), rel=1e-4)
    # lambda = 0: two sequences per pair, only the direct SFT half
    c0 = AriesConfig(beta=0.2, lam=0.0, sft_weight=0.5)
    assert len(encode_pair(tok, "q", "a", "b", c0)) == 2
    # exact resume of the pair loader
    a = PairLoader(pairs, 2, tok.pad_token_id, seed=3)
    for _ in range(4):
        next(a)
    st = a.state_dict()
    want_b = [next(a) for _ in range(3)]
    b2 = PairLoader(pairs, 2, tok.pad_token_id, seed=3)
    b2.load_state_dict(st)
    for x, y in zip(want_b, [next(b2) for _ in range(3)]):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_task_sources(tmp_path):
    sft_math = arith.generate(30, seed=11)
    fresh = load_tasks(parse(TaskSource, {"builder": "arith", "n": 10, "seed": 11, "skip": 30}, "prompts"))
    assert not {p.question for p in sft_math} & {t.prompt for t in fresh}  # ARIES prompts SFT never saw
    assert all(t.reference.isdigit() for t in fresh)
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"question": "Q", "answer": "work\n#### 1,200"}) + "\n")
    assert load_tasks(parse(TaskSource, {"path": str(p), "format": "qa"}, "prompts"))[0].reference == "1200"


# ---- end to end ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_plm_aries_end_to_end(micro_base, tmp_path):
    """Two iterations on a micro model; a reward-model scorer so that pairs exist with random weights."""
    run_dir = tmp_path / "aries"
    r = {
        "name": "t-aries", "run_dir": str(run_dir), "seed": 0,
        "model": {"init_from": str(micro_base)},
        "prompts": {"builder": "arith", "n": 8, "seed": 3, "difficulty": 1},
        "scorer": {"kind": "reward_model", "checkpoint": str(micro_base)},
        "aries": {"iterations": 2, "prompts_per_iteration": 4, "refinements": 1, "beta": 0.1, "lambda": 1.0,
                  "sft_weight": 0.1, "selection": "reward", "epochs": 3, "max_len": 160,
                  "schedule": {"kind": "wsdc", "peak_lr": 1e-3, "floor_lr": 1e-4, "warmup": 0, "stable": 1, "decay": 1}},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10, "batch_size": 4},
        "train": {"micro_batch_size": 2, "precision": "fp32", "device": "cpu", "log_every": 1, "progress": False},
        "eval": {"tasks": {"builder": "arith", "split": "test", "n": 3, "difficulty": 1}, "rounds": 1,
                 "max_new_tokens": 8, "batch_size": 3},
    }
    recipe = tmp_path / "aries.yaml"
    recipe.write_text(yaml.safe_dump(r))
    out = run_cli(["aries", recipe])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "aries_metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in rows] == [0, 1, 2]
    for x in rows[1:]:
        assert x["prompts"] == 4 and 0 < x["pairs_kept"] <= 4 and x["train_steps"] >= 1
        # a reward model scores the samples: the record says so, and the table shows the scores
        assert x["sample_metric"] == "score" and x["sample_initial"] < 0
        # training moved the policy toward the chosen answers on its own pairs (implicit DPO reward)
        assert x["reward_acc_direct"] > 0.5 and x["reward_margin_direct"] > 0
    pairs = [json.loads(line) for line in (run_dir / "iter-1" / "pairs.jsonl").read_text().splitlines()]
    assert all(len(p["ref"]) == 4 and p["score_w"] > p["score_l"] for p in pairs)
    table = (run_dir / "aries_table.md").read_text()
    assert "sampled reward score y0" in table and f"{rows[1]['sample_initial']:.3f}" in table
    # the held-out accuracy recorded for each iteration is that iteration's model's
    from plm.align.config import AriesRecipe
    from plm.eval.heldout import evaluate_checkpoint
    from plm.recipe import load_recipe
    spec = load_recipe(recipe, AriesRecipe).eval
    for x in rows:
        assert evaluate_checkpoint(x["model"], spec, use_cache=False).as_dict() == x["eval"]
    from plm.utils import sha256_file
    assert sha256_file(run_dir / "final" / "model.safetensors") == sha256_file(run_dir / "iter-2/model/model.safetensors")
    assert sha256_file(run_dir / "iter-1/model/model.safetensors") != sha256_file(micro_base / "model.safetensors")
    # a rerun finds every iteration done and only reprints the table
    again = run_cli(["aries", recipe, "--set", "aries.iterations=2"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert len((run_dir / "aries_metrics.jsonl").read_text().splitlines()) == 3


def test_report_shows_reward_model_scores():
    """A reward-model run's sampled scores reach the report (they were once read as 'acc' keys only)."""
    from plm.report import AriesIteration, pipeline_report
    rec = {"iteration": 1, "prompts": 4, "pairs_kept": 2, "sample_score_initial": -2.25, "sample_score_last": -1.5,
           "reward_margin_direct": 0.125, "eval": {"n": 3, "direct_acc": 1 / 3}}
    it = AriesIteration.from_record(rec)  # a record in the older layout
    assert (it.sample_metric, it.sample_initial, it.sample_last) == ("score", -2.25, -1.5)
    md = pipeline_report("t", {"aries": {"rows": [it.as_record()]}}, __import__("pathlib").Path("."), {}, "now")
    assert "| sampled reward score y0 |" in md and "| 1 | 2/4 | -2.250 | -1.500 | 0.125 | n/a |" in md
