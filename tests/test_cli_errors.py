"""Bad input on the command line: each case exits with status 2 and one line that names the
setting (or file) and its value, never a traceback. Run in-process (an uncaught exception fails
the case), one table, one assertion shape."""
import json
import shutil
from pathlib import Path

import pytest

from plm.cli import main

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = str(REPO / "recipes/tiny/pretrain.yaml")
SFT = str(REPO / "recipes/tiny/sft.yaml")
ARIES = str(REPO / "recipes/tiny/aries.yaml")
PIPE = str(REPO / "recipes/tiny")
G = ["generate", "{ck}", "--prompt", "x", "--max-new-tokens", "2"]

CASES = [
    # checkpoints and files
    (["info", "/no/such/dir"], "/no/such/dir: not a checkpoint directory"),
    (["generate", "/no/such/dir", "--prompt", "x"], "/no/such/dir: not a checkpoint directory"),
    (["generate", "{tmp}/empty", "--prompt", "x"], "no config.json found"),
    (["generate", "{truncated}", "--prompt", "x"], "not a readable safetensors file"),
    (["generate", "{wrong_shape}", "--prompt", "x"], "has shape"),
    (["generate", "{int_tensor}", "--prompt", "x"], "has dtype I32, expected a float"),
    (["generate", "{extra_tensor}", "--prompt", "x"], "unexpected tensor 'model.layers.0.extra.weight'"),
    (["generate", "{big_tok}", "--prompt", "x"], "the tokenizer has 151646 ids but the model's vocabulary has"),
    (["export", "gguf", "/no/such/dir", "--out", "{tmp}/x.gguf"], "not a checkpoint directory"),
    (["export", "gguf", "{ck}", "--out", "{ck}/model.safetensors"], "would overwrite a file of the checkpoint"),
    (["export", "gguf", "{wrong_shape}", "--out", "{tmp}/w.gguf"], "has shape"),
    (["export", "gguf", "{ck}", "--out", "{tmp}"], "is a directory"),
    (["pretrain", "/no/recipe.yaml"], "/no/recipe.yaml: recipe not found"),
    (["pretrain", str(REPO / "recipes/tiny")], "is a directory; name the YAML file inside it"),
    (["pretrain", "{bad_yaml}"], "invalid YAML"),
    (["export", "gguf", "{ck}", "--out", "/proc/plm-x/m.gguf"], "/proc/plm-x"),
    # sampling and runtime flags
    (G + ["--temperature", "nan"], "temperature must be a finite number, got nan"),
    (G + ["--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    (G + ["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (G + ["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (G + ["--top-k", "-1"], "top_k must be >= 0, got -1"),
    (G + ["--repetition-penalty", "0"], "repetition_penalty must be > 0, got 0.0"),
    (G + ["--max-new-tokens", "-1"], "max_new_tokens must be >= 0, got -1"),
    (G + ["--threads", "0"], "--threads must be at least 1, got 0"),
    (G + ["--threads", "-1"], "--threads must be at least 1, got -1"),
    (G + ["--memory-budget", "xGiB"], "memory budget: cannot read 'xGiB' as a size"),
    (G + ["--stop", ""], "a stop string must not be empty"),
    (G + ["--predictor", str(REPO / "README.md")], "README.md: not a predictor file"),
    (G + ["--predictor", "/no/pred.safetensors"], "/no/pred.safetensors: predictor file not found"),
    (["generate", "{ck}", "--prompt", "bad \udcff byte"], "--prompt: not valid UTF-8 text"),
    (["generate", "{ck}", "--prompt", "word " * 600], "the prompt has"),
    (["generate", "{ck}"], "give at least one --prompt"),
    (["info", "{ck}", "--inactive", "5"], "--inactive is a fraction of MLP neurons in [0, 1], got 5.0"),
    (["sparsity", "{ck}", "--data", PRETRAIN, "--tokens", "10", "--seq-len", "64"],
     "--tokens (10) must be at least --seq-len (64)"),
    (["sparsity", "{ck}", "--data", PRETRAIN, "--mass-recall", "2"], "--mass-recall must be in (0, 1], got 2.0"),
    # model configs
    (["init", "--preset", "plm-micro", "--out", "{tmp}/i", "--set", "hidden_act=gelu"], "hidden_act 'gelu'"),
    (["init", "--preset", "plm-micro", "--out", "{tmp}/i", "--set", "num_hidden_layers=0"],
     "num_hidden_layers must be a positive integer, got 0"),
    (["init", "--preset", "plm-micro", "--out", "{tmp}/i", "--set", "num_layerz=2"], "num_layerz: not a PLM config field"),
    (["init", "--preset", "plm-micro", "--out", "{tmp}/i", "--set", "rope_interleave=false"],
     "rope_interleave: false (half-split RoPE) is not supported"),
    # recipes: every mistake names its dotted path and value
    (["pretrain", PRETRAIN, "--set", "trian.seq_len=1"], "unknown setting 'trian'; did you mean 'train'?"),
    (["pretrain", PRETRAIN, "--set", "phases.7.tokens=5"], "phases is a list of 3; '7' is not an index in 0..2"),
    (["pretrain", PRETRAIN, "--set", "phases.x.tokens=5"], "'x' is not an index in 0..2"),
    (["pretrain", PRETRAIN, "--set", "train.eval_every=often"], "train.eval_every: expected an integer, got 'often'"),
    (["pretrain", PRETRAIN, "--set", "train.grad_clip=abc"], "train.grad_clip: expected a number, got 'abc'"),
    (["pretrain", PRETRAIN, "--set", "seed=abc"], "seed: expected an integer, got 'abc'"),
    (["pretrain", PRETRAIN, "--set", "phases.0.tokens=many"], "phases[0].tokens: expected an integer, got 'many'"),
    (["pretrain", PRETRAIN, "--set", "train.weight_decay=-0.1"], "train.weight_decay: must be >= 0, got -0.1"),
    (["pretrain", PRETRAIN, "--set", "phases.0.schedule.warmup=1.5"], "phases[0].schedule.warmup: 1.5 is neither"),
    (["pretrain", PRETRAIN, "--set", "train.seq_len=4096"], "train.seq_len: 4096 is longer than the model's"),
    (["pretrain", PRETRAIN, "--set", "train.keep_last=0"], "train.keep_last: must be a positive integer, got 0"),
    (["sft", SFT, "--set", "phases.1.epochs=0"], "phases[1].epochs: must be > 0, got 0.0"),
    (["sft", SFT, "--set", "data.math.n_problems=3"], "data.math.n_problems: not a setting of builder arith"),
    (["aries", ARIES, "--set", "aries.lambda=-1"], "aries.lambda: must be >= 0, got -1.0"),
    (["aries", ARIES, "--set", "sampling.top_p=2"], "sampling.top_p: must be in (0, 1], got 2.0"),
    (["pipeline", PIPE, "--from", "nope"], "--from nope: this pipeline has no such stage"),
    (["pipeline", PIPE, "--set", "stages.bench.contention=abc"], "stages.bench.contention: expected a number, got 'abc'"),
    (["pipeline", PIPE, "--set", "stages.sft.set=[train.seq_len=x]"], "sft.yaml: train.seq_len: expected an integer, got 'x'"),
    (["schedule", "plot", "--out", "{tmp}/s.png", "--warmup", "2.5"], "schedule.warmup: 2.5 is neither"),
    (["schedule", "plot", "--out", "{tmp}/s.png", "--recipe", PRETRAIN, "--phase", "9"], "--phase 9: the recipe has phases 0..2"),
    # evaluation and data
    (["eval", "{ck}", "--tasks", "nope"], "unknown task 'nope'"),
    (["eval", "{ck}", "--limit", "0"], "--limit must be at least 1, got 0"),
    (["eval", "{ck}", "--num-fewshot", "gsm8k=x"], "--num-fewshot: expected N or task=N"),
    (["data", "prepare", "/no/file.txt", "--out", "{tmp}/d", "--tokenizer", "qwen2"], "/no/file.txt: no such file"),
]


@pytest.fixture(scope="module")
def paths(qwen2_micro_dir, tmp_path_factory):
    """The checkpoints and files the cases refer to."""
    import torch
    from safetensors.torch import load_file, save_file

    from plm.data.tokenizer import Tokenizer, train_bpe
    from plm.model.checkpoint import init_checkpoint
    root = tmp_path_factory.mktemp("bad")
    ck = qwen2_micro_dir
    (root / "empty").mkdir()

    def variant(name, edit):
        d = root / name
        shutil.copytree(ck, d)
        sd = load_file(d / "model.safetensors")
        edit(sd)
        save_file(sd, d / "model.safetensors")
        return d

    truncated = root / "truncated"
    shutil.copytree(ck, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    wrong = variant("wrong_shape", lambda sd: sd.update({"model.norm.weight": torch.ones(3)}))
    as_int = variant("int_tensor", lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].to(torch.int32)}))
    extra = variant("extra_tensor", lambda sd: sd.update({"model.layers.0.extra.weight": torch.ones(2, 2)}))
    small_tok = train_bpe(["hello world"] * 50, 300, show_progress=False)
    small_tok.save(root / "small_tok")
    big_tok = init_checkpoint("plm-micro", root / "big_tok", tokenizer=str(root / "small_tok"))
    Tokenizer.from_dir(ck).save(big_tok)  # the 151,646-id tokenizer beside a 320-row embedding
    (root / "bad.yaml").write_text("train: [unclosed\n")
    return {"ck": str(ck), "tmp": str(root), "truncated": str(truncated), "wrong_shape": str(wrong),
            "int_tensor": str(as_int), "extra_tensor": str(extra), "big_tok": str(big_tok),
            "bad_yaml": str(root / "bad.yaml")}


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_with_exit_2(paths, argv, message, capsys):
    argv = [a.format(**paths) if "{" in a else a for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"plm {argv[0]}: error: ")


def test_there_are_enough_cases():
    assert len(CASES) >= 40


def test_configs_written_by_other_tools(tmp_path):
    """The fields a transformers port of PLM reads or writes: honoured, or refused, never ignored."""
    from plm.errors import ConfigError
    from plm.model.config import PLMConfig
    base = PLMConfig.from_preset("plm-micro", vocab_size=512, bos_token_id=0, eos_token_id=0).to_dict()
    assert base["num_key_value_heads"] == base["num_attention_heads"] == 2  # written: the port defaults it to 16
    assert base["dtype"] == base["torch_dtype"]
    hf5 = {k: v for k, v in base.items() if k != "rope_theta"}  # transformers 5 keeps it in rope_parameters
    c = PLMConfig.from_dict({**hf5, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}})
    assert c.rope_theta == 5000.0 and c.rope_scaling is None
    c = PLMConfig.from_dict({**hf5, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 9.0}})
    assert c.rope_theta == 9.0 and c.rope_factor == 4.0
    c = PLMConfig.from_dict({**base, "dtype": "float16", "torch_dtype": None})
    assert c.torch_dtype == "float16"
    for bad, msg in [({"rope_interleave": False}, "rope_interleave"),
                     ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
                     ({"num_key_value_heads": 16}, "num_key_value_heads 16 differs"),
                     ({"dtype": "float16", "torch_dtype": "bfloat16"}, "disagree"),
                     ({"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0}}, "disagree")]:
        with pytest.raises(ConfigError, match=msg):
            PLMConfig.from_dict({**base, **bad})
    (tmp_path / "config.json").write_text(json.dumps(PLMConfig.from_dict(base).to_dict()))
    assert PLMConfig.load(tmp_path).to_dict() == base  # a save/load round trip is stable


def test_linear_rope_scaling_matches_scaled_positions():
    """rope_scaling linear with factor F is the model run at positions / F."""
    import torch

    from plm import PLMConfig, PLMForCausalLM
    cfg = PLMConfig.from_preset("plm-micro", vocab_size=128, bos_token_id=0, eos_token_id=0, initializer_range=0.1)
    torch.manual_seed(0)
    plain = PLMForCausalLM(cfg).eval()
    scaled = PLMForCausalLM(cfg.replace(rope_scaling={"rope_type": "linear", "factor": 4.0})).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 128, (1, 12))
    pos = torch.arange(12)[None].float() / 4.0
    with torch.no_grad():
        want = plain(ids, position_ids=pos).logits
        got = scaled(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain(ids).logits, atol=1e-3)
