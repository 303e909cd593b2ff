"""`plm eval` (the paper's benchmark suite) and `plm lm-eval` (lm-evaluation-harness with PLM)."""
from __future__ import annotations

import argparse
from pathlib import Path

from plm.errors import PLMError

EPILOG = """\
tasks: arc_challenge arc_easy mmlu cmmlu ceval gsm8k mathqa humaneval mbpp boolq hellaswag
       logiqa piqa; aliases: paper/all (the 13), mc (the 10 multiple-choice), generation, code.
data:  --data-dir, else $PLM_DATA, else ~/.cache/plm/data (plm eval --download fills it); each task reads
       <data-dir>/<task>/<split>.jsonl (see docs/eval.md), or Hugging Face with --source hf.
examples:
  plm eval runs/micro                                   # GSM8K + HumanEval from the shipped data
  plm eval runs/micro --tasks gsm8k --limit 50 --refine 2   # direct answer + 2 ARIES refinements
  plm eval runs/micro --tasks paper --num-fewshot gsm8k=8,mmlu=5
"""


def _cmd_eval(args: argparse.Namespace) -> int:
    from plm.eval.data import resolve_data_dir
    from plm.eval.runner import (DEFAULT_TASKS, EvalSettings, download_tasks, evaluate, parse_fewshot,
                                 parse_tasks, prepare_tasks)

    tasks = parse_tasks(args.tasks or DEFAULT_TASKS)
    if args.list_tasks:
        return _list_tasks(args.data_dir)
    if args.download:
        for p in download_tasks(tasks, args.data_dir):
            print(p)
        return 0
    if not args.dir:
        raise PLMError("give a checkpoint directory (plm eval DIR --tasks ...)")
    settings = EvalSettings(
        tasks=tasks, data_dir=args.data_dir, source=args.source, limit=args.limit,
        num_fewshot=parse_fewshot(args.num_fewshot, tasks), mode="chat" if args.chat else "completion",
        refine=args.refine, max_new_tokens=args.max_new_tokens, timeout_s=args.timeout,
        memory_mb=args.memory_mb, workers=args.workers)
    data_dir = resolve_data_dir(args.data_dir)
    prepared = prepare_tasks(settings)  # every task's data, before the (slow) model load
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from plm.eval.lm import PLMEvalModel

    lm = PLMEvalModel.from_pretrained(args.dir, dtype=args.dtype, device=args.device,
                                      batch_size=args.batch_size, max_length=args.max_length,
                                      progress=not args.no_progress)
    out = Path(args.output) if args.output else Path("runs") / "eval" / Path(args.dir).resolve().name
    name = args.name or Path(args.dir).resolve().name
    print(f"plm eval: {args.dir} on {', '.join(tasks)} (data: {data_dir}; results: {out})")
    run = evaluate(lm, settings, model=str(args.dir), name=name, out_dir=out, prepared=prepared)
    from plm.report import eval_report
    print()
    print(eval_report(run))
    if run.get("truncated_inputs"):
        print(f"note: {run['truncated_inputs']} input(s) were longer than the model window ({lm.max_length} "
              "tokens, less the generation budget) and kept only their last tokens; see docs/eval.md")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'samples'}/")
    return 0


def _list_tasks(data_dir: str | None) -> int:
    from plm.eval.data import find_local, resolve_data_dir
    from plm.eval.gen_tasks import GEN_TASKS
    from plm.eval.mc_tasks import MC_TASKS
    from plm.eval.runner import ALL_TASKS

    root = resolve_data_dir(data_dir)
    print(f"data directory: {root}")
    for name in ALL_TASKS:
        if name in MC_TASKS:
            t = MC_TASKS[name]
            local = find_local(root, name, t.split)
            kind = f"multiple choice, {t.default_fewshot}-shot, headline {t.headline}"
            hf = f"{t.hf_path}{'/' + t.hf_name if t.hf_name else ''}:{t.split}"
        else:
            g = GEN_TASKS[name]
            local = next((p for p in (root / name).glob("*.jsonl*")), None) if (root / name).is_dir() else None
            kind = f"generation, {g.default_fewshot['completion']}-shot, {g.metric}"
            hf = {"gsm8k": "openai/gsm8k/main:test", "humaneval": "openai/openai_humaneval:test",
                  "mbpp": "google-research-datasets/mbpp/full:test"}[name]
        where = str(local) if local else f"(no local file; Hugging Face {hf})"
        print(f"  {name:<14} {kind:<48} {where}")
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from plm.eval.lm_eval_cli import main
    return main(args.lm_eval_args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on the paper's benchmarks",
                       description="Evaluate a checkpoint: GSM8K, HumanEval, MBPP and log-likelihood "
                                   "multiple-choice tasks; results as JSON and a markdown table beside "
                                   "the published PLM-1.8B-Instruct numbers.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks or aliases (default: gsm8k,humaneval)")
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: $PLM_DATA, else ~/.cache/plm/data)")
    p.add_argument("--source", choices=["auto", "local", "hf"], default="auto",
                   help="local files, Hugging Face datasets, or local first (default)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples of each task")
    p.add_argument("--num-fewshot", default=None, metavar="N|TASK=N,...",
                   help="shots for every task, or per task (defaults: gsm8k 5, mbpp 3, mmlu/cmmlu/ceval 5, "
                        "others 0; 0 for generation tasks in chat mode)")
    p.add_argument("--chat", action="store_true", help="generation tasks as ChatML user turns (instruct models)")
    p.add_argument("--refine", type=int, default=0, metavar="K",
                   help="self-refinement: answer, then K refinements with the ARIES template (implies --chat)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation budget (default: gsm8k 256, humaneval/mbpp 384)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per sandboxed code test (default 10)")
    p.add_argument("--memory-mb", type=int, default=512, help="address-space limit per code test (MiB)")
    p.add_argument("--workers", type=int, default=None, help="parallel code tests (default: CPU count)")
    p.add_argument("--out", "--output", dest="output", default=None,
                   help="results folder (default: runs/eval/<checkpoint name>)")
    p.add_argument("--name", default=None, help="row label in the table (default: checkpoint name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-tasks", action="store_true", help="list tasks and where their data is found")
    p.add_argument("--download", action="store_true",
                   help="write the tasks' Hugging Face splits into --data-dir in the local layout, then exit")
    p.set_defaults(func=_cmd_eval)

    q = sub.add_parser("lm-eval", help="lm-evaluation-harness's CLI with the `plm` model registered",
                       description="Runs `lm_eval` with `--model plm` available, e.g. "
                                   "plm lm-eval --model plm --model_args pretrained=DIR --tasks arc_easy. "
                                   "The same as `python -m plm.eval.lm_eval_cli ...`.",
                       add_help=False, prefix_chars="\x00")  # every argument goes to lm_eval as is
    q.add_argument("lm_eval_args", nargs="*", help="lm_eval's own arguments")
    q.set_defaults(func=_cmd_lm_eval)

