"""The package's layers import downward only: every import in plm/ (including those inside
functions) goes to a strictly lower layer, library code never imports the command-line layer
or argparse, and config modules stay free of torch so recipes are checked before it loads."""
import ast
import subprocess
import sys
from pathlib import Path

PLM = Path(__file__).resolve().parents[1] / "plm"

# lowest first; a unit may import only units of a lower rank
LAYERS = [
    ["errors"],
    ["utils"],
    ["recipe", "report"],  # the typed-recipe machinery; result rows and every table
    ["data"],  # text, tokenizer, chat template, answer extraction, shards, mixtures
    ["model"],  # config, reference model, caches, checkpoints
    ["train", "infer"],  # the trainer; the edge runtime, generation, kernels
    ["export", "eval"],  # GGUF; benchmarks, held-out evaluation, scorers, sandbox
    ["align", "bench"],  # SFT and ARIES; benchmark cores
    ["pipeline", "serve"],  # the whole pipeline and its stages; the OpenAI-compatible server
    ["cli"],  # plm.cli, every *.commands module, plm/__init__ and __main__
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[-1] in ("commands", "cli", "__main__") or module == "plm":
        return "cli"  # plm/__init__ (the version, lazy top-level names) belongs with the entry points
    return parts[1]


def modules() -> dict[str, ast.Module]:
    out = {}
    for f in PLM.rglob("*.py"):
        name = ".".join(("plm",) + f.relative_to(PLM).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = ast.parse(f.read_text(), str(f))
    return out


def imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_every_unit_has_a_layer():
    assert {unit_of(m) for m in modules()} <= set(RANK), {unit_of(m) for m in modules()} - set(RANK)


def test_imports_go_downward_only():
    bad = []
    for mod, tree in modules().items():
        a = unit_of(mod)
        for imp in imports(tree):
            if not imp.startswith("plm.") and imp != "plm":
                continue
            b = unit_of(imp)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{mod} ({a}, layer {RANK[a]}) imports {imp} ({b}, layer {RANK[b]})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_library_code_never_imports_the_command_line():
    bad = []
    for mod, tree in modules().items():
        if unit_of(mod) == "cli":
            continue
        for imp in imports(tree):
            if imp == "argparse" or imp.endswith(".commands") or imp == "plm.cli":
                bad.append(f"{mod} imports {imp}")
    assert not bad, "\n".join(bad)


def test_the_checker_catches_a_violation(tmp_path):
    """The rules above would notice an upward import (a test that cannot fail is no test)."""
    tree = ast.parse("def f():\n    from plm.pipeline.run import run\n")
    assert imports(tree) == {"plm.pipeline.run"} and RANK[unit_of("plm.pipeline.run")] > RANK["model"]
    assert unit_of("plm.train.commands") == "cli" and unit_of("plm.eval.heldout") == "eval"


def test_recipes_parse_without_torch():
    code = ("import sys\nfrom plm.pipeline.run import load_pipeline\n"
            "load_pipeline('recipes/tiny')\nassert 'torch' not in sys.modules, 'torch was imported'\n"
            "import plm.cli\nplm.cli.build_parser()\nassert 'torch' not in sys.modules, 'the CLI parser imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PLM.parent, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
