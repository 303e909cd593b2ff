"""The `plm` command as a user runs it: real subprocesses, one-line errors, no tracebacks."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses and training runs: `make test`, not `make test-fast`


def plm(*args, input=None):
    return subprocess.run([sys.executable, "-m", "plm", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=300)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "micro"
    r = plm("init", "--preset", "plm-micro", "--out", out, "--seed", "3")
    assert r.returncode == 0, r.stderr
    return out


def test_init_writes_released_layout(micro):
    names = {p.name for p in micro.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((micro / "config.json").read_text())
    assert cfg["vocab_size"] == 151936 and cfg["hidden_size"] == 64 and cfg["eos_token_id"] == 151645


def test_info_numbers(micro):
    r = plm("info", micro, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    from plm import PLMForCausalLM
    assert info["total_parameters"] == PLMForCausalLM.from_pretrained(micro).num_parameters()
    r = plm("info", "plm-1.8b", "--json")
    info = json.loads(r.stdout)
    assert info["kv_values_per_token_per_layer"] == {"latent": 576, "decompressed": 5120}
    assert info["kv_bytes_per_token_bf16"]["latent"] == 576 * 32 * 2
    assert info["total_parameters"] == 1_825_458_176
    # MLP is 2*2048*8192 per layer; 90.9% of it inactive
    assert info["activated_parameters_per_token"] == int(1_825_458_176 - 32 * 0.909 * 2 * 2048 * 8192)
    text = plm("info", micro).stdout
    assert "activated/token" in text and "KV cache/token" in text


def test_generate_is_deterministic_and_batched(micro):
    a = plm("generate", micro, "--prompt", "Hello", "--max-new-tokens", "6")
    b = plm("generate", micro, "--prompt", "Hello", "--max-new-tokens", "6")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()
    r = plm("generate", micro, "--prompt", "Hello", "--prompt", "a longer second prompt", "--max-new-tokens", "4")
    assert r.returncode == 0 and r.stdout.count("### ") == 2
    # --min-p 1 keeps only the best token: sampled at temperature 2, the greedy text
    hot = plm("generate", micro, "--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "2", "--min-p", "1",
              "--seed", "5")
    assert hot.returncode == 0 and hot.stdout == a.stdout


def test_chat_multi_turn(qwen2_micro_dir):
    """Each reply is the greedy continuation of the whole conversation so far (history kept);
    empty lines and unknown commands do not end the session, /exit does."""
    r = plm("chat", qwen2_micro_dir, "--max-new-tokens", "6", "--runtime", "reference",
            input="hi\n\n/nope\nand again\n/exit\n")
    assert r.returncode == 0, r.stderr
    replies = [part.split("\nyou> ")[0] for part in r.stdout.split("plm> ")[1:]]
    from plm.data.tokenizer import Tokenizer
    from plm.infer.generate import GenerationConfig, generate
    from plm.model.modeling import PLMForCausalLM
    model, tok = PLMForCausalLM.from_pretrained(qwen2_micro_dir), Tokenizer.from_dir(qwen2_micro_dir)

    def greedy(msgs):
        return generate(model, tok, tok.apply_chat_template(msgs, add_generation_prompt=True),
                        GenerationConfig(max_new_tokens=6)).texts[0]

    first = greedy([{"role": "user", "content": "hi"}])
    second = greedy([{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "and again"}])
    assert replies == [first, second]
    assert second != greedy([{"role": "user", "content": "and again"}])  # the history made a difference
    assert "unknown command /nope" in r.stdout and r.stderr.count("tok/s") == 2


@pytest.mark.parametrize("args,msg", [
    (["info", "/no/such/dir"], "not a checkpoint directory"),
    (["generate", "/no/such/dir", "--prompt", "x"], "not a checkpoint directory"),
    (["init", "--preset", "plm-micro", "--out", "{out}", "--set", "hidden_act=gelu"], "hidden_act 'gelu'"),
    (["generate", "{micro}", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "{micro}", "--prompt", "x", "--min-p", "2"], "min_p must be in [0, 1]"),
    (["generate", "{micro}", "--prompt", "x", "--presence-penalty", "nan"], "presence_penalty must be a finite number"),
    (["export", "gguf", "/no/such/dir", "--out", "{out}/x.gguf"], "not a checkpoint directory"),
])
def test_user_errors_are_one_line(args, msg, micro, tmp_path):
    args = [a.replace("{out}", str(tmp_path / "o")).replace("{micro}", str(micro)) for a in args]
    r = plm(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_corrupt_checkpoint_error(micro, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(micro, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    r = plm("generate", bad, "--prompt", "x")
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_tokenizer_commands(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("the cat sat on the mat\n" * 200)
    r = plm("tokenizer", "train", tmp_path / "corpus", "--vocab-size", "300", "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    r = plm("init", "--preset", "plm-micro", "--out", tmp_path / "m", "--tokenizer", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == 320
    r = plm("tokenizer", "qwen2", "--out", tmp_path / "q")
    assert r.returncode == 0 and (tmp_path / "q" / "tokenizer.json").exists()


def test_every_flag_has_help_and_the_cli_starts_fast():
    """One convention across commands: every option explains itself (and --help shows its
    default); building the parser imports no torch, so `plm --help` answers at once."""
    import argparse
    import time

    from plm.cli import build_parser

    def walk(p, path):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for n, sp in a.choices.items():
                    assert sp.description, f"{path} {n}: no description"
                    yield from walk(sp, f"{path} {n}")
            elif a.dest != "help" and not a.help:
                yield f"{path} {a.option_strings or a.dest}"

    assert list(walk(build_parser(), "plm")) == []
    t = time.perf_counter()
    r = plm("--help")
    assert r.returncode == 0 and time.perf_counter() - t < 5  # generous: a subprocess on a busy CI machine
    assert "--version" in r.stdout and plm("--version").stdout.startswith("plm ")


def test_quant_choices_are_the_runtime_formats():
    """`--quant` lists its choices literally (the CLI parses without importing torch); they must
    be the runtime's: the PyTorch modes and every native block format, q4_k_m and q6_k included."""
    import argparse

    from plm.infer.commands import add_sampling_args
    from plm.infer.quant import QUANT_MODES
    from plm.infer.runtime import NATIVE_QUANT
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    choices = next(a.choices for a in p._actions if a.dest == "quant")
    assert set(choices) == {"none", *QUANT_MODES, *NATIVE_QUANT} and {"q4_k_m", "q6_k"} <= set(choices)
