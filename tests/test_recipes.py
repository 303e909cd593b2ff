"""Shipped recipes parse into typed recipes with valid phases and schedules; every mistake in a
recipe is one error naming the setting's dotted path."""
from pathlib import Path

import pytest

from plm.align.config import AriesRecipe, SFTRecipe
from plm.errors import ConfigError
from plm.pipeline.config import PipelineRecipe
from plm.recipe import load_recipe, to_dict
from plm.train.config import PretrainRecipe
from plm.train.pretrain import build_phases
from plm.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
KINDS = {"pretrain": PretrainRecipe, "sft": SFTRecipe, "aries": AriesRecipe, "pipeline": PipelineRecipe}


@pytest.mark.parametrize("name", ["tiny", "plm-1.8b"])
def test_pretrain_recipes_build(name):
    r = load_recipe(REPO / "recipes" / name / "pretrain.yaml", PretrainRecipe)
    world = 64 if name == "plm-1.8b" else 1
    phases = build_phases(r, {k: Path(v.dir) for k, v in r.data.items()}, r.train, world)
    assert [p.name for p in phases] == [p.name for p in r.phases] and len(phases) == 3
    for p in phases:
        W, S, D, _ = p.schedule.phases()
        assert W + S + D <= p.steps
        peak = p.schedule.peak_lr
        assert lr_at(p.schedule, W) == pytest.approx(peak) and lr_at(p.schedule, p.steps - 1) < peak
    if name == "plm-1.8b":
        assert abs(sum(p.tokens for p in r.phases) - 2.48e12) < 0.01e12  # about 2.48T tokens in all
        assert r.phases[0].tokens == 1_650_000_000_000
        assert r.model.preset == "plm-1.8b" and r.tokenizer == "qwen2"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml")))
def test_every_shipped_recipe_parses(path):
    kind = Path(path).stem
    r = load_recipe(REPO / path, KINDS[kind])
    assert r.source.endswith(path)


def test_set_overrides_and_errors(tmp_path):
    r = load_recipe(REPO / "recipes/tiny/pretrain.yaml", PretrainRecipe,
                    ["train.micro_batch_size=4", "phases.1.tokens=10"])
    assert r.train.micro_batch_size == 4 and r.phases[1].tokens == 10
    # "5e-3" is a float (PyYAML alone reads it as a string); words stay strings
    r = load_recipe(REPO / "recipes/tiny/pretrain.yaml", PretrainRecipe, ["phases.0.schedule.peak_lr=5e-3", "name=inf"])
    assert r.phases[0].schedule.peak_lr == 5e-3 and r.name == "inf"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_recipe(REPO / "recipes/tiny/pretrain.yaml", PretrainRecipe, ["train.micro_batch_size"])
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml", PretrainRecipe)


BAD = [  # (--set, the error must name ...)
    ("trian.seq_len=1", r"unknown setting 'trian'; did you mean 'train'\?"),
    ("train.seq_lenn=1", r"train: unknown setting 'seq_lenn'; did you mean 'seq_len'\?"),
    ("phases.7.tokens=5", r"--set phases.7.tokens: phases is a list of 3; '7' is not an index in 0..2"),
    ("phases.x.tokens=5", r"'x' is not an index in 0..2"),
    ("train.grad_clip=abc", r"train.grad_clip: expected a number, got 'abc'"),
    ("train.eval_every=x", r"train.eval_every: expected an integer, got 'x'"),
    ("seed=1.5", r"seed: expected an integer, got 1.5"),
    ("phases.1.tokens=abc", r"phases\[1\].tokens: expected an integer"),
    ("phases.1.schedule.warmup=1.5", r"phases\[1\].schedule.warmup: 1.5 is neither a fraction"),
    ("phases.0.schedule.warmup=-1", r"phases\[0\].schedule.warmup: must be >= 0"),
    ("phases.0.schedule.kind=wsdcc", r"phases\[0\].schedule.kind: must be one of wsdc, wsd, cosine"),
    ("phases.0.schedule.floor_lr=1", r"phases\[0\].schedule.floor_lr: must be in \[0, peak_lr"),
    ("phases.0.mixture.mathh=1", r"phases\[0\].mixture.mathh: not a data source"),
    ("train.weight_decay=-0.1", r"train.weight_decay: must be >= 0, got -0.1"),
    ("train.precision=fp16", r"train.precision: must be one of auto, fp32, bf16"),
    ("train.seq_len=4096", r"train.seq_len: 4096 is longer than the model's max_position_embeddings \(1024\)"),
    ("model.overrides.num_layerz=2", r"model.overrides.num_layerz: not a PLM config field"),
    ("model.preset=plm-9b", r"model.preset: unknown 'plm-9b'"),
    ("data.code.workerz=2", r"data.code: unknown setting 'workerz'"),
    ("train=3", r"train: expected a mapping of settings, got 3"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_settings_name_their_dotted_path(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(REPO / "recipes/tiny/pretrain.yaml", PretrainRecipe, [override])
    assert str(e.value).startswith(str(REPO / "recipes/tiny/pretrain.yaml"))


def test_schedule_lengths_must_fit_their_phase():
    # a warmup as long as the phase never reaches peak_lr; fractions beyond the phase are refused
    r = load_recipe(REPO / "recipes/tiny/pretrain.yaml", PretrainRecipe,
                    ["phases.2.schedule.warmup=1000", "phases.2.schedule.stable=0", "phases.2.schedule.decay=0"])
    with pytest.raises(ConfigError, match=r"phases\[2\].schedule.warmup: 1000 steps is not shorter than the phase"):
        build_phases(r, {k: Path(v.dir) for k, v in r.data.items()}, r.train, 1)
    r = load_recipe(REPO / "recipes/tiny/pretrain.yaml", PretrainRecipe, ["phases.2.schedule.stable=0.9"])
    with pytest.raises(ConfigError, match=r"phases\[2\].schedule.decay: warmup \+ stable \+ decay fractions sum to 1.4"):
        build_phases(r, {k: Path(v.dir) for k, v in r.data.items()}, r.train, 1)


def test_stage_recipes_check_builders_scorers_and_sources():
    with pytest.raises(ConfigError, match=r"data.math.n_problems: not a setting of builder arith"):
        load_recipe(REPO / "recipes/tiny/sft.yaml", SFTRecipe, ["data.math.n_problems=5"])
    with pytest.raises(ConfigError, match=r"phases\[1\].sources.maths: not a data source"):
        load_recipe(REPO / "recipes/tiny/sft.yaml", SFTRecipe, ["phases.1.sources.maths=1"])
    with pytest.raises(ConfigError, match=r"aries.lambda: must be >= 0"):
        load_recipe(REPO / "recipes/tiny/aries.yaml", AriesRecipe, ["aries.lambda=-1"])
    with pytest.raises(ConfigError, match=r"scorer.timeout: not a setting of scorer verifier"):
        load_recipe(REPO / "recipes/tiny/aries.yaml", AriesRecipe, ["scorer.timeout=3"])
    with pytest.raises(ConfigError, match=r"eval.tasks.builder: unknown 'arithm'"):
        load_recipe(REPO / "recipes/tiny/aries.yaml", AriesRecipe, ["eval.tasks.builder=arithm"])
    with pytest.raises(ConfigError, match=r"stages.sparsity: unknown setting 'tokenz'"):
        load_recipe(REPO / "recipes/tiny/pipeline.yaml", PipelineRecipe, ["stages.sparsity.tokenz=5"])
    with pytest.raises(ConfigError, match=r"stages.evaluate: unknown stage"):
        load_recipe(REPO / "recipes/tiny/pipeline.yaml", PipelineRecipe, ["stages.evaluate.x=5"])


def test_pipeline_checks_every_stage_recipe_before_running(tmp_path):
    from plm.pipeline.run import load_pipeline
    recipe, ctx = load_pipeline(REPO / "recipes/tiny", ["vars.run=" + str(tmp_path / "r")])
    assert set(ctx.recipes) == {"pretrain", "sft", "aries"}
    assert ctx.recipes["sft"].model.init_from == str(tmp_path / "r" / "pretrain" / "final")
    with pytest.raises(ConfigError, match=r"aries.yaml: aries.iterations: must be >= 1"):
        load_pipeline(REPO / "recipes/tiny", ["stages.aries.set=[aries.iterations=0]"])
    assert not (tmp_path / "r").exists()  # nothing ran


def test_run_folder_variable_relocates_every_tiny_path(tmp_path):
    # every path of the tiny recipes is built from ${run}: one setting moves the whole run
    for name, cls in KINDS.items():
        default = repr(to_dict(load_recipe(REPO / f"recipes/tiny/{name}.yaml", cls)))
        moved = repr(to_dict(load_recipe(REPO / f"recipes/tiny/{name}.yaml", cls, ["vars.run=/elsewhere/x"])))
        assert "runs/tiny" in default and "${" not in default, name
        assert "runs/tiny" not in moved and "/elsewhere/x/" in moved, name
    assert load_recipe(REPO / "recipes/tiny/sft.yaml", SFTRecipe, ["vars.run=r"]).model.init_from == "r/pretrain/final"
    bad = tmp_path / "bad.yaml"
    bad.write_text("vars: {run: a}\nrun_dir: ${rn}/x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: \$\{rn\} is not defined under 'vars:' \(defined: run\)"):
        load_recipe(bad, PipelineRecipe)
