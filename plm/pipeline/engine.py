"""The pipeline engine: stages in order, each recorded in a manifest, resumable.

Each stage writes `RUN/stages/NAME.json` holding a fingerprint of its settings (and of its stage
recipe, and of the stages before it), checksums of what it wrote, its results and its time. A
rerun skips a stage only when its manifest's fingerprint matches and its outputs still verify
(not merely exist); `--from STAGE` reruns from that stage. A failing stage leaves the earlier
stages' results intact and is reported by name with the reason.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from plm.errors import ConfigError, PLMError
from plm.recipe import to_dict
from plm.utils import atomic_write_json, sha256_path, short_hash


@dataclass
class Context:
    run_dir: Path
    recipes: dict[str, Any] = field(default_factory=dict)  # stage -> its parsed stage recipe
    results: dict[str, dict] = field(default_factory=dict)  # stage -> results, of stages done

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)


@dataclass
class Stage:
    name: str
    run: Callable[[Context, Any], dict]  # (context, typed settings) -> results, with "outputs": paths written
    help: str


def fingerprint(settings: Any, recipe: Any, upstream: list[dict]) -> str:
    """What decides a stage's result: its settings, its parsed stage recipe (so a changed recipe
    file reruns the stage; its comments do not) and the stages before it."""
    return short_hash({"settings": to_dict(settings), "recipe": to_dict(recipe),
                       "upstream": [u.get("fingerprint") for u in upstream]})


def _manifest_ok(manifest: dict | None, fp: str) -> bool:
    if not manifest or manifest.get("status") != "done" or manifest.get("fingerprint") != fp:
        return False
    for p, digest in manifest.get("checksums", {}).items():
        if not Path(p).exists() or sha256_path(Path(p)) != digest:
            return False
    return True


def _read_manifest(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # damaged: the stage reruns


def run_pipeline(stages_settings: dict[str, Any], stages: list[Stage], ctx: Context,
                 start_from: str | None = None) -> Context:
    """Run the stages named in `stages_settings` (name -> typed settings), in `stages` order."""
    names = [s.name for s in stages]
    if start_from is not None and start_from not in stages_settings:
        raise ConfigError(f"--from {start_from}: this pipeline has no such stage; its stages are: "
                          f"{', '.join(n for n in names if n in stages_settings)}")
    run_dir = ctx.run_dir
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    upstream: list[dict] = []
    forced = False
    t_all = time.perf_counter()
    for stage in stages:
        if stage.name not in stages_settings:
            continue
        settings = stages_settings[stage.name]
        forced = forced or stage.name == start_from
        mpath = run_dir / "stages" / f"{stage.name}.json"
        manifest = _read_manifest(mpath)
        fp = fingerprint(settings, ctx.recipes.get(stage.name), upstream)
        if not forced and _manifest_ok(manifest, fp):
            print(f"[{stage.name}] done before (manifest verified) - skipped")
            ctx.results[stage.name] = manifest["results"]
            upstream.append(manifest)
            continue
        forced = True  # everything after a rerun stage reruns too
        print(f"\n[{stage.name}] {stage.help}")
        t0 = time.perf_counter()
        try:
            results = stage.run(ctx, settings)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # report which stage failed and why; earlier results stay
            reason = str(e) if isinstance(e, PLMError) else f"{type(e).__name__}: {e}"
            atomic_write_json(mpath, {"stage": stage.name, "status": "failed", "reason": reason,
                                      "traceback": traceback.format_exc()})
            raise PLMError(f"stage {stage.name!r} failed: {reason} (details in {mpath}; "
                           f"rerun with --from {stage.name} after fixing)") from None
        outputs = [Path(p) for p in results.pop("outputs", [])]
        manifest = {"stage": stage.name, "status": "done", "fingerprint": fp, "settings": to_dict(settings),
                    "seconds": round(time.perf_counter() - t0, 1), "results": results,
                    "checksums": {str(p): sha256_path(p) for p in outputs if p.exists()}}
        atomic_write_json(mpath, manifest)
        ctx.results[stage.name] = results
        upstream.append(manifest)
        print(f"[{stage.name}] done in {manifest['seconds']}s")
    print(f"\npipeline finished in {time.perf_counter() - t_all:.0f}s; run directory {run_dir}")
    return ctx


def stage_times(run_dir: Path, order: list[str]) -> dict[str, float]:
    """Seconds of each finished stage, in pipeline order."""
    out = {}
    for name in order:
        m = _read_manifest(run_dir / "stages" / f"{name}.json")
        if m and m.get("status") == "done":
            out[name] = m["seconds"]
    return out
