"""SFT data: ChatML with loss on assistant tokens only, record formats, packing without
cross-contamination, exact-resume loader state, and a short `plm sft` run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from plm.align.data import (SFTLoader, collate_packed, encode_chat, load_source, pack_rows, packed_attention_mask,
                            record_to_chat)
from plm.align.config import SFTSource
from plm.align.losses import token_logps
from plm.data import arith
from plm.data.tokenizer import IM_END, train_bpe
from plm.errors import PLMError
from plm.recipe import parse


@pytest.fixture(scope="module")
def tok():
    problems = arith.generate(300, seed=1)
    texts = [f"{p.question}\n{p.solution}" for p in problems] + ["Explain the topic. Repeat the word river."] * 5
    return train_bpe(texts, 600, show_progress=False)


@pytest.fixture(scope="module")
def micro(tok):
    from plm import PLMConfig, PLMForCausalLM
    cfg = PLMConfig.from_preset("plm-micro", vocab_size=640, bos_token_id=0, eos_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    return PLMForCausalLM(cfg).eval()


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "8"}]


def test_chatml_ids_match_template(tok):
    enc = encode_chat(tok, CHAT)
    assert enc.ids == tok.apply_chat_template(CHAT, tokenize=True)
    assert len(enc.labels) == len(enc.ids)


def test_no_loss_on_prompt_tokens(tok):
    enc = encode_chat(tok, CHAT)
    # labels are next-token targets: the trained tokens, in order, are exactly each assistant
    # turn's content and its closing <|im_end|>
    trained = [l for l in enc.labels if l != -100]
    assert tok.decode(trained) == f"2 + 3 = 5\n#### 5{IM_END}8{IM_END}"
    for i, l in enumerate(enc.labels):
        if l != -100:
            assert l == enc.ids[i + 1]
    # nothing of the system or user turns, nor the assistant header, is ever a target
    text_of_targets = tok.decode(trained)
    assert "Be brief" not in text_of_targets and "What is" not in text_of_targets and "assistant" not in text_of_targets


def test_record_formats():
    assert record_to_chat({"messages": CHAT}) == CHAT
    a = record_to_chat({"instruction": "Add", "input": "2 and 3", "output": "5"})
    assert a == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    a = record_to_chat({"instruction": "Say hi", "input": "", "output": "hi"}, system="S")
    assert a[0] == {"role": "system", "content": "S"} and a[1]["content"] == "Say hi"
    q = record_to_chat({"question": "Q?", "answer": "A #### 1"})
    assert q == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A #### 1"}]
    q = record_to_chat({"query": "Q?", "response": "R"}, "qa", {"question": "query", "answer": "response"})
    assert q[1]["content"] == "R"
    with pytest.raises(PLMError, match="format"):
        record_to_chat({"text": "x"})


def test_local_jsonl_and_hf_errors(tmp_path, monkeypatch):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"i{k}", "output": f"o{k}"}) + "\n" for k in range(5)))
    chats = load_source("alp", parse(SFTSource, {"path": str(p), "limit": 3}, "data.alp"))
    assert len(chats) == 3 and chats[2][1]["content"] == "o2"
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(PLMError, match="needs the `datasets` package"):
        load_source("hf", parse(SFTSource, {"hf": "openai/gsm8k", "config": "main", "format": "qa"}, "data.hf"))


def test_packing_mask_and_positions(tok):
    samples = [encode_chat(tok, arith.as_chat(p)) for p in arith.generate(5, seed=2)]
    rows = pack_rows([len(s) for s in samples], 300)
    assert sorted(i for r in rows for i in r) == list(range(5))
    assert all(sum(len(samples[i]) for i in r) <= 300 for r in rows)
    b = collate_packed([[samples[i] for i in r] for r in rows], 300, tok.pad_token_id)
    seg, pos, mask = b["segment_ids"], b["position_ids"], b["attention_mask"]
    assert mask.shape == (len(rows), 1, 300, 300) and mask.dtype == torch.bool
    for r in range(len(rows)):
        for j in range(len(rows[r])):
            idx = (seg[r] == j).nonzero().flatten()
            assert pos[r, idx].tolist() == list(range(len(idx)))  # positions restart per sample
            other = (seg[r] != j) & (seg[r] >= 0)
            assert not mask[r, 0][idx][:, other].any()  # never attends to another sample
        assert (b["labels"][r][seg[r] < 0] == -100).all()
    m = packed_attention_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0]
    assert m.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_packed_equals_alone(tok, micro):
    """A packed batch gives the same per-sample losses as each sample run alone."""
    samples = [encode_chat(tok, arith.as_chat(p)) for p in arith.generate(6, seed=3)]
    rows = [samples[:3], samples[3:]]
    T = max(sum(len(s) for s in r) for r in rows) + 7  # some padding too
    b = collate_packed(rows, T, tok.pad_token_id)
    with torch.no_grad():
        logits = micro(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
        lp = token_logps(logits, b["labels"])
        for r, row in enumerate(rows):
            for j, s in enumerate(row):
                packed = lp[r][b["segment_ids"][r] == j].sum()
                alone = token_logps(micro(torch.tensor([s.ids])).logits, torch.tensor([s.labels])).sum()
                assert torch.allclose(packed, alone, rtol=1e-5, atol=1e-4), (r, j, float(packed), float(alone))


def test_loader_exact_resume(tok):
    samples = [encode_chat(tok, arith.as_chat(p)) for p in arith.generate(40, seed=4)]
    a = SFTLoader(samples, 256, 3, tok.pad_token_id, seed=5)
    for _ in range(7):  # crosses an epoch boundary
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    want = [next(a) for _ in range(4)]
    b = SFTLoader(samples, 256, 3, tok.pad_token_id, seed=5)
    b.load_state_dict(state)
    for x, y in zip(want, [next(b) for _ in range(4)]):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    # ranks see disjoint rows
    r0 = SFTLoader(samples, 256, 1, tok.pad_token_id, seed=5, rank=0, world_size=2)
    r1 = SFTLoader(samples, 256, 1, tok.pad_token_id, seed=5, rank=1, world_size=2)
    assert not torch.equal(next(r0)["input_ids"], next(r1)["input_ids"])


# ---- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def micro_base(tmp_path_factory):
    """A micro PLM with a small BPE, saved as a 'pretrained' checkpoint."""
    from plm.model.checkpoint import init_checkpoint
    root = tmp_path_factory.mktemp("align-micro")
    problems = arith.generate(400, seed=1)
    from plm.data.tiny import instruction_chat
    import random
    rng = random.Random(0)
    texts = [f"{p.question}\n{p.solution}" for p in problems] + [instruction_chat(rng)[0]["content"] for _ in range(200)]
    tok = train_bpe(texts + ["```python\ndef f(a, b):\n    return a + b\n```"] * 20, 700, show_progress=False)
    tok.save(root / "tok")
    return init_checkpoint("plm-micro", root / "base", seed=0, tokenizer=str(root / "tok"),
                           max_position_embeddings=512)


def run_cli(args, timeout=300):
    e = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-m", "plm"] + [str(a) for a in args], capture_output=True, text=True,
                          env=e, timeout=timeout)


def micro_sft_recipe(base: Path, run_dir: Path) -> Path:
    r = {
        "name": "t-sft", "run_dir": str(run_dir), "seed": 0,
        "model": {"init_from": str(base)},
        "data": {"general": {"builder": "tiny_general", "n": 24, "docs_share": 0.0},
                 "math": {"builder": "arith", "n": 40, "seed": 5, "difficulty": 1},
                 "code": {"builder": "tiny_code", "n": 8}},
        "train": {"seq_len": 256, "micro_batch_size": 4, "precision": "fp32", "device": "cpu", "log_every": 1,
                  "progress": False},
        "phases": [
            {"name": "p1", "sources": {"general": 1.0}, "epochs": 1,
             "schedule": {"kind": "wsdc", "peak_lr": 3e-3, "floor_lr": 3e-4, "warmup": 1, "stable": 1, "decay": 1}},
            {"name": "p2", "sources": {"math": 1.0, "code": 1.0}, "steps": 4,
             "schedule": {"kind": "wsdc", "peak_lr": 3e-3, "floor_lr": 3e-4, "warmup": 1, "stable": 1, "decay": 2}},
        ],
        "eval": {"tasks": {"builder": "arith", "split": "test", "n": 4, "difficulty": 1}, "rounds": 1,
                 "max_new_tokens": 12, "batch_size": 4},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.fixture(scope="session")
def micro_sft(micro_base, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    r = run_cli(["sft", micro_sft_recipe(micro_base, run_dir)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_plm_sft_end_to_end(micro_sft):
    run_dir = micro_sft
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in recs if "loss" in r]
    assert phases[0] == "p1" and phases[-1] == "p2" and phases.count("p2") == 4
    for d in ("p1", "p2", "final"):
        assert (run_dir / d / "config.json").exists() and (run_dir / d / "tokenizer.json").exists()
    assert not (run_dir / "final" / "trainer_state.pt").exists()
    s = json.loads((run_dir / "sft_summary.json").read_text())
    assert set(s["eval"]) == {"p1", "p2"}
    assert s["data"]["sources"]["math"]["trained_tokens"] > 0
    losses = [r["loss"] for r in recs if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])  # it learned something
    # the accuracy recorded for each phase is that phase's model's, and final is the last phase
    from plm.align.config import SFTRecipe
    from plm.eval.heldout import evaluate_checkpoint
    from plm.recipe import load_recipe
    from plm.utils import sha256_file
    spec = load_recipe(run_dir.parent / f"{run_dir.name}.yaml", SFTRecipe).eval
    for phase in ("p1", "p2"):
        assert evaluate_checkpoint(run_dir / phase, spec, use_cache=False).as_dict() == s["eval"][phase]
    assert sha256_file(run_dir / "final/model.safetensors") == sha256_file(run_dir / "p2/model.safetensors")
    assert sha256_file(run_dir / "p1/model.safetensors") != sha256_file(run_dir / "p2/model.safetensors")
    # a fresh rerun over an old run directory (stale checkpoints must not confuse it)
    r = run_cli(["sft", run_dir.parent / f"{run_dir.name}.yaml", "--no-resume", "--set", "phases.1.steps=2", "--set", "phases.1.schedule.decay=0",
                 "--set", "eval.tasks.n=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in recs if "loss" in x].count("p2") == 2


def test_arith_refinement_chats(tok):
    """The ARIES-SFT form in SFT data: z(x, y_l) -> y_w with no loss on the earlier answer y_l,
    which is always wrong (per the verifier) unless it is a 'keep' example."""
    from plm.data.chat import refinement_messages
    from plm.data.tiny import arith as arith_chats, corrupt_solution
    import random
    chats = arith_chats(40, seed=2, difficulty=1, refine=0.5, refine_keep=0.0)
    assert len(chats) == 60
    z = chats[-1]
    assert [m["role"] for m in z] == ["user", "assistant", "user", "assistant"]
    assert z[:3] == [{**m, **({"train": False} if m["role"] == "assistant" else {})}
                     for m in refinement_messages(z[0]["content"], z[1]["content"])]
    enc = encode_chat(tok, z)
    assert tok.decode([l for l in enc.labels if l != -100]) == z[3]["content"] + IM_END
    rng = random.Random(0)
    probs = arith.generate(200, seed=3)
    for p in probs:
        wrong = corrupt_solution(p, probs[rng.randrange(200)], rng)
        assert not arith.is_correct(p, wrong), (p.solution, wrong)
