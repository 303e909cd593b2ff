"""`plm aries`: iterative self-refinement preference learning (REFERENCE §4).

For t = 1..T, with the current model M_t:
  1. sample: for each of this iteration's prompts x, an answer y_0 ~ M_t(.|x) and K refinements
     y_k ~ M_t(.|z(x, y_{k-1})) (batched; temperature, top-p, max tokens are settings);
  2. score every answer with the scorer (verifier: math final number / code unit tests in the
     sandbox; or a reward-model checkpoint);
  3. select one (chosen, rejected) pair per chain (rule-based or by reward; plm.align.selection);
  4. reference log-probs of every pair sequence from M_t itself, computed once BEFORE training
     and stored with the pairs (pairs.pt), so training never holds a second model;
  5. train on L = DPO(x; y_w > y_l) + lambda * DPO(z(x, y_l); y_w > y_l)
                 + sft_weight * ARIES-SFT / |y_w|   (lambda = 0: iterative DPO, the baseline;
     its SFT term then keeps only the direct half, -log p(y_w|x)), on the shared trainer;
  6. evaluate held-out accuracy answering directly and with self-refinement; save M_{t+1}.
Every iteration writes RUN_DIR/iter-t/ (pairs.jsonl, pairs.pt, model/, trainer metrics) and one
line of RUN_DIR/aries_metrics.jsonl; RUN_DIR/aries_table.md is the per-iteration table.
A rerun resumes: finished iterations are loaded, an interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plm.align.data import Encoded, encode_prompt_response, pad_batch
from plm.align.evaluate import SampleConfig, answer, chains
from plm.align.losses import aries_preference_loss, aries_sft_loss, sequence_logps
from plm.align.selection import select_pair
from plm.align.template import DEFAULT_REFINE_INSTRUCTION, direct_messages, refinement_messages
from plm.errors import ConfigError, PLMError
from plm.recipe import section
from plm.train.dist import DistEnv, cleanup, init_distributed
from plm.train.trainer import Phase, TrainConfig, Trainer

CONTEXTS = ("direct_w", "direct_l", "refine_w", "refine_l")


@dataclass
class AriesConfig:
    iterations: int = 3
    prompts_per_iteration: int = 256  # fresh prompts each iteration (cycling through the pool)
    refinements: int = 2  # K refinement rounds after the initial answer
    beta: float = 0.1
    lam: float = 1.0  # recipe key `lambda`; 0 = the iterative-DPO baseline
    sft_weight: float = 0.0  # weight of the token-normalised ARIES-SFT term
    chain: str = "auto"  # refine: y_k ~ p(.|z(x, y_{k-1})); direct: K+1 independent answers to x;
    #                      auto: refine when lambda > 0, direct when lambda = 0 (plain iterative DPO)
    selection: str = "rule"  # rule | reward
    keep: float = 0.0  # ASSUMED: share of pairs whose refinement context shows the CHOSEN answer,
    #                    DPO(z(x, y_w); y_w > y_l): "keep a right answer" rather than only "fix a wrong one"
    min_margin: float = 0.0  # reward selection: smallest score gap kept
    epochs: float = 1.0  # passes over each iteration's pairs
    max_len: int = 1024  # tokens per pair sequence (the context's head is cut first)
    instruction: str = DEFAULT_REFINE_INSTRUCTION
    system: str | None = None
    ref_batch_size: int = 16  # pairs per reference-log-prob forward
    schedule: dict = field(default_factory=lambda: {"kind": "wsdc", "peak_lr": 1e-5, "floor_lr": 1e-6,
                                                    "warmup": 0.1, "stable": 0.6, "decay": 0.3})

    @classmethod
    def from_dict(cls, d: dict | None) -> "AriesConfig":
        d = dict(d or {})
        if "lambda" in d:
            d["lam"] = d.pop("lambda")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"aries: unknown setting(s) {unknown}; known: "
                              f"{sorted(set(cls.__dataclass_fields__) - {'lam'}) + ['lambda']}")
        c = cls(**d)
        if c.iterations < 1 or c.prompts_per_iteration < 1 or c.refinements < 0:
            raise ConfigError("aries: iterations and prompts_per_iteration must be >= 1, refinements >= 0")
        if c.beta <= 0 or c.lam < 0 or c.sft_weight < 0:
            raise ConfigError("aries: beta must be > 0, lambda and sft_weight >= 0")
        if c.chain not in ("auto", "refine", "direct"):
            raise ConfigError(f"aries.chain must be auto, refine or direct, got {c.chain!r}")
        if not 0.0 <= c.keep <= 1.0:
            raise ConfigError(f"aries.keep is a share of pairs in [0, 1], got {c.keep}")
        if c.selection not in ("rule", "reward"):
            raise ConfigError(f"aries.selection must be rule or reward, got {c.selection!r}")
        return c

    @property
    def refine_chains(self) -> bool:
        return self.chain == "refine" or (self.chain == "auto" and self.lam > 0)

    @property
    def contexts(self) -> int:
        """Sequences per pair: the refinement context is only needed when lambda > 0."""
        return 4 if self.lam > 0 else 2


# ---- pairs -----------------------------------------------------------------------------------
def encode_pair(tok, prompt: str, chosen: str, rejected: str, cfg: AriesConfig,
                shown_answer: str | None = None) -> list[Encoded]:
    """[x -> y_w, x -> y_l, z(x, y_s) -> y_w, z(x, y_s) -> y_l] (the last two only if lambda > 0);
    y_s, the earlier answer shown inside z, is y_l unless `shown_answer` is given (aries.keep)."""
    x = direct_messages(prompt, cfg.system)
    seqs = [encode_prompt_response(tok, x, chosen, cfg.max_len), encode_prompt_response(tok, x, rejected, cfg.max_len)]
    if cfg.contexts == 4:
        z = refinement_messages(prompt, rejected if shown_answer is None else shown_answer, cfg.instruction, cfg.system)
        seqs += [encode_prompt_response(tok, z, chosen, cfg.max_len), encode_prompt_response(tok, z, rejected, cfg.max_len)]
    return seqs


def collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Context-major rows [c0 of every pair, c1 of every pair, ...] plus stored reference log-probs.

    `labels` holds ONE counted entry per pair: the trainer normalises the summed loss by the
    number of labelled entries, so the step loss is the mean over pairs."""
    n_ctx = len(pairs[0]["enc"])
    seqs = [p["enc"][c] for c in range(n_ctx) for p in pairs]
    b = pad_batch(seqs, pad_id)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "seq_labels": b["labels"],
            "ref_logps": torch.tensor([p["ref"] for p in pairs], dtype=torch.float32),
            "labels": torch.zeros(len(pairs), dtype=torch.long)}


class PairLoader:
    """Epochs over preference pairs in a seeded order, exact-resume state (trainer Loader)."""

    def __init__(self, pairs: list[dict], mbs: int, pad_id: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if len(pairs) < world:
            raise PLMError(f"{len(pairs)} preference pairs cannot feed {world} ranks")
        self.pairs, self.mbs, self.pad_id, self.seed, self.rank, self.world = pairs, mbs, pad_id, seed, rank, world
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def __next__(self) -> dict[str, torch.Tensor]:
        chunk: list[dict] = []
        order = self._order()
        while len(chunk) < self.mbs:
            if self.pos + self.world > len(order):
                self.epoch, self.pos = self.epoch + 1, 0
                order = self._order()
            chunk.append(self.pairs[order[self.pos + self.rank]])
            self.pos += self.world
        return collate_pairs(chunk, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def pair_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probs [P, n_ctx] of a collated pair batch."""
    P = batch["ref_logps"].shape[0]
    lp = sequence_logps(model, batch["input_ids"], batch["seq_labels"], batch["attention_mask"])
    return lp.view(-1, P).T


def make_loss_fn(cfg: AriesConfig):
    """The trainer loss: (summed per-pair loss, number of pairs)."""
    def loss_fn(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        lp, ref = pair_logps(model, batch), batch["ref_logps"]
        direct = (lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1])
        refine = (lp[:, 2], lp[:, 3], ref[:, 2], ref[:, 3]) if lp.shape[1] == 4 else None
        loss = aries_preference_loss(direct, refine, cfg.beta, cfg.lam)["loss"]
        if cfg.sft_weight:
            labels = batch["seq_labels"]
            P = lp.shape[0]
            n_w = (labels[:P] != -100).sum(-1).clamp(min=1)  # |y_w| in tokens
            sft = aries_sft_loss(lp[:, 0], lp[:, 2]) if refine is not None else -lp[:, 0]
            loss = loss + cfg.sft_weight * sft / n_w
        return loss.sum(), lp.shape[0]
    return loss_fn


@torch.no_grad()
def compute_logps(model, pairs: list[dict], pad_id: int, batch_size: int, device, bf16: bool) -> list[list[float]]:
    was = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        for i in range(0, len(pairs), batch_size):
            chunk = [dict(p, ref=[0.0] * len(p["enc"])) for p in pairs[i:i + batch_size]]
            b = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                out += pair_logps(model, b).float().cpu().tolist()
    finally:
        model.train(was)
    return out


def margins(policy: list[list[float]], ref: list[list[float]], beta: float) -> dict:
    """Implicit DPO reward margins beta*((pi_w-ref_w)-(pi_l-ref_l)) per context, and how often > 0."""
    out = {}
    for name, (w, l_) in (("direct", (0, 1)), ("refine", (2, 3))):
        if policy and len(policy[0]) > l_:
            m = [beta * ((p[w] - r[w]) - (p[l_] - r[l_])) for p, r in zip(policy, ref)]
            out[f"reward_margin_{name}"] = sum(m) / len(m)
            out[f"reward_acc_{name}"] = sum(1 for x in m if x > 0) / len(m)
    return out


# ---- the loop ---------------------------------------------------------------------------------
def aries(recipe: dict, resume: bool = True) -> dict:
    env = init_distributed(section(recipe, "train", False).get("device", "auto"))
    try:
        if env.world_size > 1:
            raise PLMError("plm aries runs in one process (generation is not sharded); run it without torchrun")
        return _aries(recipe, env, resume)
    finally:
        cleanup(env)


def _bf16(cfg: TrainConfig, env: DistEnv) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")


def _aries(recipe: dict, env: DistEnv, resume: bool) -> dict:
    from plm.align.scorers import build_scorer
    from plm.align.sft import evaluate_checkpoint, export, run_dir_of, tokenizer_for
    from plm.align.tasks import load_task_pool
    from plm.model.checkpoint import load_model
    from plm.train.pretrain import schedule_from

    t_start = time.time()
    run_dir = run_dir_of(recipe, "aries")
    cfg = TrainConfig.from_dict(section(recipe, "train", False))
    acfg = AriesConfig.from_dict(section(recipe, "aries", False))
    scfg = SampleConfig.from_dict({"temperature": 0.8, "top_p": 0.95, **(recipe.get("sampling") or {})})
    if "bf16" not in (recipe.get("sampling") or {}):  # autocast sampling on CUDA; on CPUs it is no faster
        scfg.bf16 = env.device.type == "cuda" and cfg.precision != "fp32"
    seed = int(recipe.get("seed", 0))
    tok = tokenizer_for(recipe, env)
    init = section(recipe, "model").get("init_from")
    if not init:
        raise ConfigError("model.init_from: ARIES starts from an SFT checkpoint")
    pool = load_task_pool(section(recipe, "prompts"), seed)
    scorer = build_scorer(recipe.get("scorer", "verifier"))
    if acfg.selection == "rule" and not scorer.binary:
        raise ConfigError("aries.selection: rule needs a verifier scorer; use selection: reward with a reward model")
    ev = recipe.get("eval")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "aries_metrics.jsonl"
    done_iters = {}
    if resume and metrics_path.exists():
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done_iters[r["iteration"]] = r
    else:
        for old in run_dir.glob("iter-*"):  # --no-resume: start over
            shutil.rmtree(old, ignore_errors=True)
        metrics_path.write_text("")
    rows: list[dict] = []

    def record(r: dict) -> None:
        rows.append(r)
        if r["iteration"] not in done_iters:
            with metrics_path.open("a") as f:
                f.write(json.dumps(r) + "\n")
            done_iters[r["iteration"]] = r
        print(format_row(r))

    print(f"ARIES from {init}: {acfg.iterations} iteration(s) x {acfg.prompts_per_iteration} prompts, "
          f"K={acfg.refinements} refinements, beta={acfg.beta}, lambda={acfg.lam}, sft_weight={acfg.sft_weight}, "
          f"selection={acfg.selection}, chains={'refine' if acfg.refine_chains else 'direct'}; pool {len(pool)} prompts")
    # iteration 0: the starting model
    if 0 in done_iters:
        record(done_iters[0])
    else:
        r0 = {"iteration": 0, "model": str(init), "seconds": 0.0}
        if ev:
            t = time.time()
            r0["eval"] = evaluate_checkpoint(init, ev, cfg, env)
            r0["seconds"] = time.time() - t
        record(r0)

    model = None
    current = Path(init)
    for it in range(1, acfg.iterations + 1):
        it_dir = run_dir / f"iter-{it}"
        if it in done_iters and (it_dir / "model").exists():
            current = it_dir / "model"
            record(done_iters[it])
            model = None
            continue
        t_it = time.time()
        if model is None:
            model = load_model(current, dtype=torch.float32, device=env.device)
        it_dir.mkdir(parents=True, exist_ok=True)
        pairs_file = it_dir / "pairs.pt"
        if pairs_file.exists():
            saved = torch.load(pairs_file, weights_only=False)
            pairs, stats = saved["pairs"], saved["stats"]
        else:
            pairs, stats = make_pairs(model, tok, pool, it, acfg, scfg, scorer, seed, env, cfg)
            torch.save({"pairs": pairs, "stats": stats}, pairs_file)
            with (it_dir / "pairs.jsonl").open("w") as f:
                for p in pairs:
                    f.write(json.dumps({k: v for k, v in p.items() if k != "enc"}) + "\n")
        row = {"iteration": it, **stats}
        if len(pairs) < max(1, env.world_size):
            print(f"iteration {it}: no preference pairs (every chain all right or all wrong); model unchanged")
            row.update({"train_steps": 0})
        else:
            steps = max(1, math.ceil(len(pairs) * acfg.epochs / (cfg.micro_batch_size * cfg.grad_accum)))
            icfg = TrainConfig.from_dict({**section(recipe, "train", False), "seed": seed + it})

            def make_loader(rank: int, world: int, mbs: int, pairs=pairs, it=it) -> PairLoader:
                return PairLoader(pairs, mbs, tok.pad_token_id, seed + 7919 * it, rank, world)

            phase = Phase(f"aries-iter-{it}", steps, schedule_from(acfg.schedule, steps, "aries.schedule"),
                          make_loader, info={"pairs": len(pairs)})
            trainer = Trainer(model, icfg, env, it_dir, loss_fn=make_loss_fn(acfg))
            fit = trainer.fit([phase], resume=resume)
            from plm.train.trainer import read_metrics
            losses = [m["loss"] for m in read_metrics(it_dir) if "loss" in m]
            row.update({"train_steps": steps, "train_loss_first": losses[0] if losses else None,
                        "train_loss_last": losses[-1] if losses else None,
                        # the trainer counts one labelled entry per pair: its "tokens" are pairs here
                        "pairs_trained": fit["phases"][-1]["tokens_seen"] if fit["phases"] else None})
            post = compute_logps(model, pairs, tok.pad_token_id, acfg.ref_batch_size, env.device, _bf16(cfg, env))
            row.update(margins(post, [p["ref"] for p in pairs], acfg.beta))
        from plm.model.checkpoint import save_model
        tmp = it_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp)
        tok.save(tmp)
        shutil.rmtree(it_dir / "model", ignore_errors=True)
        tmp.rename(it_dir / "model")
        current = it_dir / "model"
        row["train_seconds"] = time.time() - t_it
        if ev:
            row["eval"] = evaluate_checkpoint(current, ev, cfg, env)
        row["seconds"] = time.time() - t_it
        row["model"] = str(current)
        record(row)

    export(current, run_dir / "final", tok)
    table = markdown_table(rows)
    (run_dir / "aries_table.md").write_text(table + "\n")
    print("\n" + table)
    summary = {"rows": rows, "final_dir": str(run_dir / "final"), "seconds": time.time() - t_start,
               "config": {**acfg.__dict__, "lambda": acfg.lam}}
    (run_dir / "aries_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def make_pairs(model, tok, pool, it: int, acfg: AriesConfig, scfg: SampleConfig, scorer, seed: int,
               env: DistEnv, cfg: TrainConfig) -> tuple[list[dict], dict]:
    """Sample chains for this iteration's prompts, score, select, and attach reference log-probs."""
    n = acfg.prompts_per_iteration
    start = ((it - 1) * n) % len(pool)
    tasks = [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]
    t = time.time()
    scfg = SampleConfig(**{**scfg.__dict__, "seed": seed + 104729 * it})
    if acfg.refine_chains:
        ch = chains(model, tok, tasks, acfg.refinements, scfg, instruction=acfg.instruction, system=acfg.system)
    else:  # the same number of generations, all answering x directly
        ch = [[] for _ in tasks]
        for k in range(acfg.refinements + 1):
            for c, a in zip(ch, answer(model, tok, tasks, scfg, seed_offset=k, system=acfg.system)):
                c.append(a)
    t_gen = time.time() - t
    flat_scores = scorer.score_batch([tk for tk, c in zip(tasks, ch) for _ in c], [a for c in ch for a in c])
    scores, k = [], 0
    for c in ch:
        scores.append(flat_scores[k:k + len(c)])
        k += len(c)
    pairs = []
    keep_rng = random.Random(f"{seed}:{it}:keep")
    for tk, c, s in zip(tasks, ch, scores):
        sel = select_pair(s, acfg.selection, acfg.min_margin)
        if sel is None:
            continue
        w, l_ = sel
        if c[w] == c[l_]:
            continue
        keep = keep_rng.random() < acfg.keep
        pairs.append({"task_id": tk.id, "prompt": tk.prompt, "chosen": c[w], "rejected": c[l_],
                      "chosen_idx": w, "rejected_idx": l_, "score_w": s[w], "score_l": s[l_], "chain_scores": s,
                      "shown": "chosen" if keep else "rejected",
                      "enc": encode_pair(tok, tk.prompt, c[w], c[l_], acfg, c[w] if keep else None)})
    t = time.time()
    refs = compute_logps(model, pairs, tok.pad_token_id, acfg.ref_batch_size, env.device, _bf16(cfg, env))
    for p, r in zip(pairs, refs):
        p["ref"] = r
    K = acfg.refinements
    what = "acc" if scorer.binary else "score"  # verifier: mean score = accuracy
    stats = {
        "prompts": len(tasks), "pairs_kept": len(pairs),
        f"sample_{what}_initial": sum(s[0] for s in scores) / len(scores),
        f"sample_{what}_last": sum(s[-1] for s in scores) / len(scores),
        **({"chains_any_correct": sum(1 for s in scores if max(s) > 0.5) / len(scores),
            "chains_all_correct": sum(1 for s in scores if min(s) > 0.5) / len(scores)} if scorer.binary else {}),
        "chosen_is_refinement": (sum(1 for p in pairs if p["chosen_idx"] > 0) / len(pairs)) if pairs else 0.0,
        "keep_pairs": sum(1 for p in pairs if p["shown"] == "chosen"),
        "score_margin": (sum(p["score_w"] - p["score_l"] for p in pairs) / len(pairs)) if pairs else 0.0,
        "refinements": K, "generate_seconds": t_gen, "ref_logp_seconds": time.time() - t,
    }
    return pairs, stats


def format_row(r: dict) -> str:
    e = r.get("eval") or {}
    parts = [f"iteration {r['iteration']}:"]
    if e:
        parts.append(f"direct {100 * e['direct_acc']:.1f}%")
        if "refine_acc" in e:
            parts.append(f"self-refine {100 * e['refine_acc']:.1f}%")
    if "pairs_kept" in r:
        parts.append(f"pairs {r['pairs_kept']}/{r['prompts']}")
    if "reward_margin_direct" in r:
        parts.append(f"margin direct {r['reward_margin_direct']:.3f}")
    if "reward_margin_refine" in r:
        parts.append(f"refine {r['reward_margin_refine']:.3f}")
    parts.append(f"({r.get('seconds', 0):.0f}s)")
    return " ".join(parts)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown_table(rows: list[dict]) -> str:
    head = ("| iteration | direct acc % | self-refine acc % | pairs kept | sampled acc y0 % | sampled acc y_K % "
            "| reward margin direct | reward margin refine | seconds |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        e = r.get("eval") or {}
        pk = f"{r['pairs_kept']}/{r['prompts']}" if "pairs_kept" in r else "-"
        lines.append(f"| {r['iteration']} | {_pct(e.get('direct_acc'))} | {_pct(e.get('refine_acc'))} | {pk} "
                     f"| {_pct(r.get('sample_acc_initial'))} | {_pct(r.get('sample_acc_last'))} "
                     f"| {_num(r.get('reward_margin_direct'))} | {_num(r.get('reward_margin_refine'))} "
                     f"| {_num(r.get('seconds'), '{:.0f}')} |")
    return "\n".join(lines)
