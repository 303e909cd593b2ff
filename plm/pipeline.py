"""`plm pipeline RECIPE_DIR`: the whole PLM pipeline as resumable stages, and a report.

Stages run in order; each writes `RUN/stages/NAME.json` (a manifest) holding a fingerprint of
its settings and of the stages before it, checksums of what it wrote, its results and its
time. A rerun skips a stage only when its manifest's fingerprint matches and its outputs still
verify (not merely exist); `--from STAGE` reruns from that stage. A failing stage leaves the
earlier stages' results intact and is reported by name with the reason.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from plm.errors import ConfigError, PLMError
from plm.recipe import load_recipe


@dataclass
class Context:
    recipe: dict
    run_dir: Path
    results: dict[str, dict] = field(default_factory=dict)  # stage -> results, of stages done

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)


@dataclass
class Stage:
    name: str
    run: Callable[[Context, dict], dict]  # returns results; must list written paths under "outputs"
    help: str


# caches of derived results that later stages may add inside an output directory
_NOT_OUTPUTS = {"eval.json"}


def _sha256_path(p: Path) -> str:
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name not in _NOT_OUTPUTS) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _fingerprint(settings: dict, upstream: list[dict]) -> str:
    # a stage driven by a recipe file reruns when that file's settings change (comments do not count)
    rp = settings.get("recipe")
    recipe = yaml.safe_load(Path(rp).read_text()) if isinstance(rp, str) and Path(rp).is_file() else None
    blob = json.dumps({"settings": settings, "recipe": recipe,
                       "upstream": [u.get("fingerprint") for u in upstream]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _manifest_ok(manifest: dict | None, fingerprint: str) -> bool:
    if not manifest or manifest.get("status") != "done" or manifest.get("fingerprint") != fingerprint:
        return False
    for p, digest in manifest.get("checksums", {}).items():
        if not Path(p).exists() or _sha256_path(Path(p)) != digest:
            return False
    return True


def run_pipeline(recipe: dict, stages: list[Stage], start_from: str | None = None) -> Context:
    run_dir = Path(recipe.get("run_dir") or f"runs/{recipe.get('name', 'pipeline')}")
    settings = recipe.get("stages") or {}
    names = [s.name for s in stages]
    for n in list(settings) + ([start_from] if start_from else []):
        if n not in names:
            raise ConfigError(f"unknown stage {n!r}; stages are: {', '.join(names)}")
    ctx = Context(recipe, run_dir)
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    upstream: list[dict] = []
    forced = False
    t_all = time.perf_counter()
    for stage in stages:
        if stage.name not in settings:
            continue
        s = settings[stage.name] or {}
        forced = forced or stage.name == start_from
        mpath = run_dir / "stages" / f"{stage.name}.json"
        manifest = json.loads(mpath.read_text()) if mpath.exists() else None
        fp = _fingerprint(s, upstream)
        if not forced and _manifest_ok(manifest, fp):
            print(f"[{stage.name}] done before (manifest verified) - skipped")
            ctx.results[stage.name] = manifest["results"]
            upstream.append(manifest)
            continue
        forced = True  # everything after a rerun stage reruns too
        print(f"\n[{stage.name}] {stage.help}")
        t0 = time.perf_counter()
        try:
            results = stage.run(ctx, s)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # report which stage failed and why; earlier results stay
            reason = str(e) if isinstance(e, PLMError) else f"{type(e).__name__}: {e}"
            mpath.write_text(json.dumps({"stage": stage.name, "status": "failed", "reason": reason,
                                         "traceback": traceback.format_exc()}, indent=2))
            raise PLMError(f"stage {stage.name!r} failed: {reason} (details in {mpath}; "
                           f"rerun with --from {stage.name} after fixing)") from None
        outputs = [Path(p) for p in results.pop("outputs", [])]
        manifest = {"stage": stage.name, "status": "done", "fingerprint": fp, "settings": s,
                    "seconds": round(time.perf_counter() - t0, 1), "results": results,
                    "checksums": {str(p): _sha256_path(p) for p in outputs if p.exists()}}
        tmp = mpath.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, mpath)
        ctx.results[stage.name] = results
        upstream.append(manifest)
        print(f"[{stage.name}] done in {manifest['seconds']}s")
    print(f"\npipeline finished in {time.perf_counter() - t_all:.0f}s; run directory {run_dir}")
    return ctx


def stage_times(run_dir: Path) -> dict[str, float]:
    out = {}
    for m in sorted((run_dir / "stages").glob("*.json")):
        d = json.loads(m.read_text())
        if d.get("status") == "done":
            out[d["stage"]] = d["seconds"]
    return out


def resolve_recipe_path(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "pipeline.yaml"
    return p


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from plm.stages import STAGES
    recipe = load_recipe(resolve_recipe_path(args.recipe), args.set)
    from plm.report import write_report
    ctx = run_pipeline(recipe, STAGES, start_from=args.from_stage)
    write_report(ctx)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    args.recipe, args.set, args.from_stage = "recipes/tiny", [], None
    return _cmd_pipeline(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="run the whole pipeline (resumable stages) and write a report")
    p.add_argument("recipe", help="a pipeline recipe directory (e.g. recipes/tiny) or YAML file")
    p.add_argument("--from", dest="from_stage", default=None, help="rerun from this stage on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_pipeline)
    p = sub.add_parser("demo", help="the main job on the embedded default: plm pipeline recipes/tiny")
    p.set_defaults(func=_cmd_demo)

