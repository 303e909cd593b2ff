"""lm-evaluation-harness 0.4.13 with `--model plm`, offline: local YAML tasks over a local JSONL
file exercise loglikelihood (multiple choice), generate_until and loglikelihood_rolling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from plm.eval.lm import PLMEvalModel  # noqa: E402

DOCS = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "gold": 0},
    {"question": "How many legs does a dog have?", "choices": ["three", "four", "ten"], "gold": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "potato", "apple"], "gold": 2},
]
COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
TASKS = {
    "plm_toy_mc": """output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "plm_toy_gen": """output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices[gold]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "plm_toy_ppl": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    data = d / "toy.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    for name, body in TASKS.items():
        (d / f"{name}.yaml").write_text(f"task: {name}\n" + COMMON.format(data=data) + body.format())
    return d


@pytest.fixture(scope="module")
def plm_lm(qwen2_micro_dir):
    from lm_eval.api.registry import get_model

    import plm.eval.lm_eval_model  # noqa: F401  (registers "plm")
    return get_model("plm").create_from_arg_string(f"pretrained={qwen2_micro_dir}",
                                                   {"batch_size": 2, "device": "cuda:0"})


def _inst(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("t", i, 1))


def test_registered_model_scores_like_the_plm_engine(plm_lm, qwen2_micro_dir) -> None:
    assert plm_lm.device == torch.device("cpu")  # no CUDA here: falls back
    engine = PLMEvalModel.from_pretrained(qwen2_micro_dir, progress=False)
    pairs = [("Question: Which is a fruit?\nAnswer:", " apple"), ("", "Hello"), ("2 + 2 = ", "4")]
    got = plm_lm.loglikelihood([_inst("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    want = engine.loglikelihood(pairs)
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    text = "A document whose log-likelihood is computed in full."
    (rolling,) = plm_lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (text,))], disable_tqdm=True)
    ids = engine.tokenizer.encode(text)
    with torch.no_grad():
        logp = engine.model(torch.tensor([[engine.tokenizer.endoftext_id] + ids])).logits[0, :-1].log_softmax(-1)
    assert rolling == pytest.approx(float(logp.gather(-1, torch.tensor(ids)[:, None]).sum()), abs=1e-3)
    prompt = "Question: 1 + 1?\nAnswer:"
    free = engine.generate([prompt], max_new_tokens=10)[0]
    stop = free[2:4] if len(free) > 4 else "\n"
    (cut,) = plm_lm.generate_until([_inst("generate_until", (prompt, {"until": [stop], "max_gen_toks": 10}))],
                                   disable_tqdm=True)
    assert stop not in cut and free.startswith(cut)
    assert plm_lm.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_lm_eval_cli_runs_local_tasks_offline(qwen2_micro_dir, task_dir: Path, tmp_path: Path) -> None:
    """`plm lm-eval` is lm_eval's own CLI with `--model plm` registered."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "plm", "lm-eval", "--model", "plm",
                        "--model_args", f"pretrained={qwen2_micro_dir},max_gen_toks=16",
                        "--tasks", ",".join(TASKS), "--include_path", str(task_dir), "--device", "cpu",
                        "--batch_size", "4", "--output_path", str(out), "--log_samples"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plm_toy_mc" in r.stdout and "acc_norm" in r.stdout and "word_perplexity" in r.stdout
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert 0 <= results["plm_toy_mc"]["acc,none"] <= 1 and "exact_match,none" in results["plm_toy_gen"]
    assert results["plm_toy_ppl"]["word_perplexity,none"] > 1
    # the harness's per-choice scores are plm's own engine's
    (mc_samples,) = out.rglob("samples_plm_toy_mc_*.jsonl")
    engine = PLMEvalModel.from_pretrained(qwen2_micro_dir, progress=False)
    for line in mc_samples.read_text().splitlines():
        s = json.loads(line)
        args = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        harness = [float(resp[0][0]) for resp in s["resps"]]
        assert harness == pytest.approx([lp for lp, _ in engine.loglikelihood(args)], abs=1e-4)
        best = max(range(len(harness)), key=harness.__getitem__)
        assert s["acc"] == float(best == s["doc"]["gold"])


def test_prompts_match_lm_eval_task_utilities() -> None:
    """Our converters build the prompts lm-eval's own task code builds."""
    from lm_eval.tasks.hellaswag.utils import preprocess as lm_eval_hellaswag
    from lm_eval.tasks.logiqa.utils_logiqa import doc_to_text as logiqa_text
    from lm_eval.tasks.mathqa.utils import doc_to_choice as mathqa_choices

    from plm.eval.mc_tasks import MC_TASKS, convert_hellaswag

    hs = {"activity_label": "Baking cookies", "ctx_a": "A woman puts dough [header] on a tray.",
          "ctx_b": "she", "endings": [" bakes them [title] in the oven.", "eats  the tray."], "label": "0"}
    ex = convert_hellaswag(hs)
    assert ex.query == lm_eval_hellaswag(hs["activity_label"] + ": " + hs["ctx_a"] + " " + hs["ctx_b"].capitalize())
    assert ex.choices == [lm_eval_hellaswag(e) for e in hs["endings"]]
    lq = {"label": "b", "context": "Ctx.", "question": "Q?", "options": ["w", "x", "y", "z"]}
    assert MC_TASKS["logiqa"].convert(lq).query == logiqa_text(lq)
    mq = {"Problem": "p", "options": "a ) 1 , b ) 2.5 , c ) 3 , d ) 4 , e ) none of these", "correct": "e"}
    assert MC_TASKS["mathqa"].convert(mq).choices == mathqa_choices(mq)
