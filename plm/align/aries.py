"""`plm aries`: iterative self-refinement preference learning (ARIES, arXiv 2502.05605).

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

import dataclasses
import math
import random
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from plm.align.config import AriesConfig, AriesRecipe, SampleConfig
from plm.align.data import Encoded, encode_prompt_response, pad_batch
from plm.align.losses import aries_preference_loss, aries_sft_loss, sequence_logps
from plm.align.selection import select_pair
from plm.align.sft import tokenizer_for
from plm.data.chat import chat_prompt, direct_messages, refinement_messages
from plm.errors import PLMError
from plm.eval.heldout import evaluate_checkpoint
from plm.eval.lm import PLMEvalModel
from plm.eval.scorers import build_scorer
from plm.eval.tasks import Task, load_task_pool
from plm.model.checkpoint import load_model, save_model
from plm.report import AriesIteration, aries_table
from plm.train.checkpointing import export_model
from plm.train.dist import DistEnv, distributed
from plm.train.trainer import Phase, Trainer, read_metrics, use_bf16
from plm.utils import append_jsonl, atomic_write_json, atomic_write_text, publish_dir, read_jsonl, write_jsonl

CONTEXTS = ("direct_w", "direct_l", "refine_w", "refine_l")


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


# ---- sampling -------------------------------------------------------------------------------
def sampler(model, tok, cfg: SampleConfig) -> PLMEvalModel:
    """The evaluation engine over the training model, for sampling answers (autocast on request)."""
    return PLMEvalModel(model, tok, batch_size=cfg.batch_size, max_length=model.config.max_position_embeddings,
                        progress=False, autocast_bf16=bool(cfg.bf16))


def answer(lm: PLMEvalModel, tasks: Sequence[Task], cfg: SampleConfig, seed_offset: int = 0,
           system: str | None = None) -> list[str]:
    """y ~ p(.|x) for each task, batched."""
    prompts = [chat_prompt(direct_messages(t.prompt, system)) for t in tasks]
    return _sample(lm, prompts, cfg, seed_offset)


def chains(lm: PLMEvalModel, tasks: Sequence[Task], rounds: int, cfg: SampleConfig, instruction: str,
           system: str | None = None) -> list[list[str]]:
    """y_0 ~ p(.|x), then y_k ~ p(.|z(x, y_{k-1})) for k = 1..rounds; every step batched."""
    cur = answer(lm, tasks, cfg, 0, system)
    out = [[a] for a in cur]
    for k in range(1, rounds + 1):
        prompts = [chat_prompt(refinement_messages(t.prompt, p, instruction, system)) for t, p in zip(tasks, cur)]
        cur = _sample(lm, prompts, cfg, k)
        for c, a in zip(out, cur):
            c.append(a)
    return out


def _sample(lm: PLMEvalModel, prompts: list[str], cfg: SampleConfig, seed_offset: int) -> list[str]:
    texts = lm.generate(prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        seed=cfg.seed + seed_offset * 1000, batch_size=cfg.batch_size)
    return [t.strip() for t in texts]


# ---- the loop ---------------------------------------------------------------------------------
def aries(recipe: AriesRecipe, resume: bool = True) -> dict:
    with distributed(recipe.train.device) as env:
        if env.world_size > 1:
            raise PLMError("plm aries runs in one process (generation is not sharded); run it without torchrun")
        return _aries(recipe, env, resume)


def _aries(recipe: AriesRecipe, env: DistEnv, resume: bool) -> dict:
    t_start = time.time()
    run_dir = recipe.run_path
    cfg, acfg, seed = recipe.train, recipe.aries, recipe.seed
    scfg = recipe.sampling
    if scfg.bf16 is None:  # autocast sampling on CUDA; on CPUs it is no faster
        scfg = dataclasses.replace(scfg, bf16=env.device.type == "cuda" and cfg.precision != "fp32")
    bf16 = use_bf16(cfg.precision, env.device)
    tok = tokenizer_for(recipe, env)
    init = recipe.model.init_from
    pool = load_task_pool(recipe.prompts, seed)
    scorer = build_scorer(recipe.scorer)
    ev = recipe.eval
    eval_bf16 = ev.bf16 if ev is not None and ev.bf16 is not None else env.device.type == "cuda" and cfg.precision != "fp32"
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "aries_metrics.jsonl"
    done_iters: dict[int, AriesIteration] = {}
    if resume and metrics_path.exists():
        for r in read_jsonl(metrics_path, torn_tail_ok=True):
            done_iters[r["iteration"]] = AriesIteration.from_record(r)
    else:
        for old in run_dir.glob("iter-*"):  # --no-resume: start over
            shutil.rmtree(old, ignore_errors=True)
        write_jsonl(metrics_path, [])
    rows: list[AriesIteration] = []

    def record(r: AriesIteration) -> None:
        rows.append(r)
        if r.iteration not in done_iters:
            append_jsonl(metrics_path, r.as_record())
            done_iters[r.iteration] = r
        print(r.summary())

    print(f"ARIES from {init}: {acfg.iterations} iteration(s) x {acfg.prompts_per_iteration} prompts, "
          f"K={acfg.refinements} refinements, beta={acfg.beta}, lambda={acfg.lam}, sft_weight={acfg.sft_weight}, "
          f"selection={acfg.selection}, chains={'refine' if acfg.refine_chains else 'direct'}; pool {len(pool)} prompts")
    # iteration 0: the starting model
    if 0 in done_iters:
        record(done_iters[0])
    else:
        r0 = AriesIteration(iteration=0, model=str(init))
        if ev:
            t = time.time()
            r0.eval = evaluate_checkpoint(init, ev, env.device.type, bf16=eval_bf16)
            r0.seconds = time.time() - t
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
            pairs, row = saved["pairs"], AriesIteration.from_record({"iteration": it, **saved["stats"]})
        else:
            pairs, row = make_pairs(model, tok, pool, it, acfg, scfg, scorer, seed, env, bf16)
            torch.save({"pairs": pairs, "stats": row.as_record()}, pairs_file)
            write_jsonl(it_dir / "pairs.jsonl", ({k: v for k, v in p.items() if k != "enc"} for p in pairs))
        if len(pairs) < max(1, env.world_size):
            print(f"iteration {it}: no preference pairs (every chain all right or all wrong); model unchanged")
            row.train_steps = 0
        else:
            steps = max(1, math.ceil(len(pairs) * acfg.epochs / (cfg.micro_batch_size * cfg.grad_accum)))
            icfg = dataclasses.replace(cfg, seed=seed + it)

            def make_loader(rank: int, world: int, mbs: int, pairs=pairs, it=it) -> PairLoader:
                return PairLoader(pairs, mbs, tok.pad_token_id, seed + 7919 * it, rank, world)

            phase = Phase(f"aries-iter-{it}", steps, acfg.schedule.build(steps), make_loader, info={"pairs": len(pairs)})
            trainer = Trainer(model, icfg, env, it_dir, loss_fn=make_loss_fn(acfg))
            fit = trainer.fit([phase], resume=resume)
            losses = [m["loss"] for m in read_metrics(it_dir) if "loss" in m]
            row.train_steps = steps
            row.train_loss_first, row.train_loss_last = (losses[0], losses[-1]) if losses else (None, None)
            # the trainer counts one labelled entry per pair: its "tokens" are pairs here
            row.pairs_trained = fit["phases"][-1]["tokens_seen"] if fit["phases"] else None
            post = compute_logps(model, pairs, tok.pad_token_id, acfg.ref_batch_size, env.device, bf16)
            for k, v in margins(post, [p["ref"] for p in pairs], acfg.beta).items():
                setattr(row, k, v)
        tmp = it_dir / ".tmp-model"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp)
        tok.save(tmp)
        current = publish_dir(tmp, it_dir / "model")
        row.train_seconds = time.time() - t_it
        if ev:
            row.eval = evaluate_checkpoint(current, ev, env.device.type, bf16=eval_bf16)
        row.seconds = time.time() - t_it
        row.model = str(current)
        record(row)

    export_model(current, run_dir / "final", tok)
    table = "\n".join(aries_table(rows))
    atomic_write_text(run_dir / "aries_table.md", table)
    print("\n" + table)
    summary = {"rows": [r.as_record() for r in rows], "final_dir": str(run_dir / "final"),
               "seconds": time.time() - t_start, "config": dataclasses.asdict(acfg)}
    atomic_write_json(run_dir / "aries_summary.json", summary)
    return summary


def make_pairs(model, tok, pool, it: int, acfg: AriesConfig, scfg: SampleConfig, scorer, seed: int,
               env: DistEnv, bf16: bool) -> tuple[list[dict], AriesIteration]:
    """Sample chains for this iteration's prompts, score, select, and attach reference log-probs."""
    n = acfg.prompts_per_iteration
    start = ((it - 1) * n) % len(pool)
    tasks = [pool[(start + i) % len(pool)] for i in range(min(n, len(pool)))]
    t = time.time()
    scfg = dataclasses.replace(scfg, seed=seed + 104729 * it)
    lm = sampler(model, tok, scfg)
    if acfg.refine_chains:
        ch = chains(lm, tasks, acfg.refinements, scfg, acfg.instruction, acfg.system)
    else:  # the same number of generations, all answering x directly
        ch = [[] for _ in tasks]
        for k in range(acfg.refinements + 1):
            for c, a in zip(ch, answer(lm, tasks, scfg, seed_offset=k, system=acfg.system)):
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
    refs = compute_logps(model, pairs, tok.pad_token_id, acfg.ref_batch_size, env.device, bf16)
    for p, r in zip(pairs, refs):
        p["ref"] = r
    n = len(scores)
    row = AriesIteration(
        iteration=it, prompts=len(tasks), pairs_kept=len(pairs),
        sample_metric="acc" if scorer.binary else "score",  # a verifier's mean score is its accuracy
        sample_initial=sum(s[0] for s in scores) / n, sample_last=sum(s[-1] for s in scores) / n,
        chosen_is_refinement=(sum(1 for p in pairs if p["chosen_idx"] > 0) / len(pairs)) if pairs else 0.0,
        keep_pairs=sum(1 for p in pairs if p["shown"] == "chosen"),
        score_margin=(sum(p["score_w"] - p["score_l"] for p in pairs) / len(pairs)) if pairs else 0.0,
        refinements=acfg.refinements, generate_seconds=t_gen, ref_logp_seconds=time.time() - t)
    if scorer.binary:
        row.chains_any_correct = sum(1 for s in scores if max(s) > 0.5) / n
        row.chains_all_correct = sum(1 for s in scores if min(s) > 0.5) / n
    return pairs, row
