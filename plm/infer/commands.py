"""`plm generate`, `plm chat` and `plm sparsity`.

On CPU, generation runs on the edge runtime (plm.infer.runtime: latent KV cache, sparse relu²
MLP, optional int8/int4 weights and layer-wise loading); `--runtime reference` runs the
PyTorch reference model instead. Both share plm.infer.generate's sampling loop.
"""
from __future__ import annotations

import argparse
import sys

from plm.errors import PLMError


def engine_from_args(args: argparse.Namespace):
    """The Engine the generation flags describe."""
    from plm.infer.engine import Engine
    from plm.infer.runtime import EdgeOptions
    edge = EdgeOptions(kv=args.kv, sparse=args.sparse, quant=args.quant, predictor=args.predictor,
                       memory_budget=args.memory_budget, threads=args.threads, backend=args.backend)
    return Engine(args.dir, args.runtime, args.dtype, edge, device=args.device)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (capped at the context window)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k best tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below this share of the best token's probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL-style penalty on seen tokens (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's: subtracted from a token's logit once it is in the reply (0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's: subtracted from a token's logit per occurrence in the reply (0 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: bfloat16 on the edge runtime, float32 on the reference)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)")
    g = p.add_argument_group("runtime")
    g.add_argument("--runtime", default="auto", choices=["auto", "edge", "reference", "static"],
                   help="edge: the CPU runtime (plm.infer.runtime); static: the CUDA decoder with a static "
                        "latent cache and CUDA graphs (plm.infer.static_decode); reference: the PyTorch model "
                        "(auto: edge on a CPU, static on a CUDA GPU)")
    g.add_argument("--kv", default="latent", choices=["latent", "full"],
                   help="edge KV cache: latent (576 values/token/layer for PLM-1.8B) or decompressed K/V")
    g.add_argument("--sparse", default="auto", choices=["auto", "on", "off"],
                   help="edge sparse relu² MLP decode (auto: dense when too many neurons are active)")
    # the block formats are runtime.NATIVE_QUANT, written out so the CLI parses without importing torch
    g.add_argument("--quant", default="none", choices=["none", "int8", "int4", "q8_0", "q4_0", "q4_k", "q4_k_m", "q6_k"],
                   help="edge weights: int8/int4 (native: llama.cpp's Q8_0/Q4_0 blocks; PyTorch: its packed "
                        "kernels) or q8_0/q4_0/q4_k/q6_k/q4_k_m (native only; q4_k_m: Q4_K with Q6_K where "
                        "llama.cpp's Q4_K_M puts it); quantised at load (`plm quantize` writes them once, as a GGUF)")
    g.add_argument("--backend", default="auto", choices=["auto", "native", "torch"],
                   help="edge kernels: the native C++ decoder (`plm kernels build`) or PyTorch's "
                        "(auto: native when built and the options allow it)")
    g.add_argument("--predictor", default=None,
                   help="activation predictor file from `plm sparsity --fit-predictor` (skips up_proj rows; "
                        "approximate)")
    g.add_argument("--memory-budget", default=None,
                   help="edge weight memory budget, e.g. 2GB: layers that do not fit are streamed "
                        "from the memory-mapped safetensors")


def sampling_config(args: argparse.Namespace):
    from plm.infer.generate import GenerationConfig
    if args.threads is not None and args.threads < 1:
        raise PLMError(f"--threads must be at least 1, got {args.threads}")
    for p in getattr(args, "prompt", None) or []:
        check_text(p, "--prompt")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                           repetition_penalty=args.repetition_penalty,
                           presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                           stop_strings=list(args.stop), seed=args.seed)
    cfg.validate()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return cfg


def check_text(text: str, what: str) -> None:
    """Command-line text must be valid UTF-8 (Python keeps undecodable bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PLMError(f"{what}: not valid UTF-8 text") from None


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _constraint(args: argparse.Namespace):
    """What --json / --json-schema / --grammar ask for, read and checked before the model loads:
    a function of the tokenizer giving the Grammar, or None."""
    import json
    from pathlib import Path
    from plm.model.grammar import Grammar
    given = [f for f, v in (("--json", args.json), ("--json-schema", args.json_schema), ("--grammar", args.grammar)) if v]
    if len(given) > 1:
        raise PLMError(f"give one of --json, --json-schema and --grammar, not {' and '.join(given)}")
    if args.json:
        return lambda tok: Grammar.json_schema(None, tok)
    if args.json_schema:
        src = args.json_schema
        text = Path(src).read_text() if Path(src).is_file() else src
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise PLMError(f"--json-schema {src[:60]!r}: neither a file nor valid JSON ({e})") from None
        return lambda tok: Grammar.json_schema(schema, tok)
    if args.grammar:
        if not Path(args.grammar).is_file():
            raise PLMError(f"--grammar {args.grammar}: no such file")
        text = Path(args.grammar).read_text()
        if args.grammar.endswith(".gbnf"):  # llama.cpp's grammar files
            return lambda tok: Grammar.gbnf(text, tok)
        return lambda tok: Grammar.lark(text, tok)
    return None


def _cmd_generate(args: argparse.Namespace) -> int:
    from plm.infer.generate import fit_to_context, generate
    cfg = sampling_config(args)
    prompts = args.prompt
    if not prompts:
        raise PLMError("give at least one --prompt")
    constraint = _constraint(args)
    eng = engine_from_args(args)
    tok = eng.tokenizer
    if constraint is not None:
        cfg.grammar = constraint(tok)
    if args.chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in prompts]
    fit_to_context(cfg, max(len(tok.encode(p)) for p in prompts), eng.config.max_position_embeddings,
                   warn=lambda msg: print(f"plm generate: warning: {msg}", file=sys.stderr))
    if len(prompts) == 1:
        generate(None, tok, prompts[0], cfg, step=eng.new_step(), stream=_stream)
        print()
    else:
        res = generate(None, tok, prompts, cfg, step=eng.new_step())
        for p, t in zip(args.prompt, res.texts):
            print(f"### {p}\n{t}\n")
    return 0


CHAT_HELP = "/exit quit, /reset forget the conversation, /system TEXT set the system prompt, " \
            "/save FILE write the conversation as JSON; Ctrl-C stops a reply, Ctrl-D quits"


def _cmd_chat(args: argparse.Namespace) -> int:
    from plm.infer.chat import ChatSession
    cfg = sampling_config(args)
    eng = engine_from_args(args)
    session = ChatSession(eng, cfg, system=args.system)
    history = _enable_line_editing()
    print(f"plm chat ({eng.kind} runtime, {eng.config.max_position_embeddings}-token window): {CHAT_HELP}")
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            print()
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, the session goes on
            print()
            continue
        if not user:
            continue
        cmd, _, rest = user.partition(" ")
        if cmd == "/exit":
            break
        if cmd == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if cmd == "/system":
            session.system = rest.strip() or None
            print(f"(system prompt {'set' if session.system else 'cleared'})")
            continue
        if cmd == "/save":
            if not rest.strip():
                print("(usage: /save FILE)")
                continue
            print(f"(saved to {session.save(rest.strip())})")
            continue
        if cmd.startswith("/") and cmd not in ("/", "//"):
            print(f"(unknown command {cmd}; {CHAT_HELP})")
            continue
        sys.stdout.write("plm> ")
        sys.stdout.flush()
        try:
            r = session.reply(user, stream=_stream)
        except PLMError as e:
            print(f"\n(error: {e})")
            continue
        print()
        note = " (interrupted)" if r.interrupted else ""
        if r.dropped_turns:
            note += f"; the {r.dropped_turns} oldest turn(s) left the {session.context}-token window"
        print(f"[{r.tokens} tokens, {r.tokens_per_s:.1f} tok/s{note}]", file=sys.stderr)
    if history:
        history()
    return 0


def _enable_line_editing():
    """Line editing and history for input() where the terminal allows it; returns a function
    that saves the history (None without readline or a terminal)."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:
        return None
    from plm.utils import cache_dir
    path = cache_dir("chat_history")
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass
    return save


def _cmd_kernels(args: argparse.Namespace) -> int:
    import json

    from plm.infer import native
    if args.action == "build":
        import time
        t = time.perf_counter()
        path = native.build(verbose=args.verbose)
        print(f"built {path} in {time.perf_counter() - t:.0f} s")
    native.load()
    info = native.info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for k, v in info.items():
            print(f"{k:12s} {v}")
    return 0 if info.get("available") or args.action == "info" else 2


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernels", help="the native CPU kernels: build them, or say which path runs")
    p.add_argument("action", choices=["info", "build"], help="info: which kernels run here; build: compile them "
                                                             "(about a minute on 2 cores; cached)")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=_cmd_kernels)
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("dir", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user turn")
    g = p.add_argument_group("structured output (needs llguidance: pip install 'plm[serve]')")
    g.add_argument("--json", action="store_true", help="the reply is a JSON object")
    g.add_argument("--json-schema", default=None, metavar="SCHEMA",
                   help="the reply is JSON valid under this JSON schema (a file, or the schema's text)")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="the reply is in the language of this grammar: Lark (llguidance's dialect), or "
                        "GBNF (llama.cpp's) for a .gbnf file")
    add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("chat", help="multi-turn chat in the terminal (ChatML)")
    p.add_argument("dir", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p)
    p.set_defaults(func=_cmd_chat)
    p = sub.add_parser("sparsity", help="per-layer relu² activation sparsity on data (JSON + PNG); "
                                        "optionally fit the activation predictor")
    p.add_argument("dir", help="checkpoint folder or Hugging Face hub id")
    p.add_argument("--data", action="append", required=True,
                   help="text files, folders, globs, .jsonl, or a prepared-token folder (repeatable)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--tokens", type=int, default=8192, help="tokens to measure over")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per measured sequence")
    p.add_argument("--eps", type=float, default=1e-3, help="also count activations with |a| < eps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--out", default=None, help="output folder (default runs/sparsity/NAME)")
    p.add_argument("--fit-predictor", action="store_true",
                   help="fit the low-rank activation predictor and report its recall and output agreement")
    p.add_argument("--rank", type=int, default=128, help="predictor rank")
    p.add_argument("--mass-recall", type=float, default=0.99,
                   help="share of activation mass the predictor must keep on the fitting tokens")
    p.add_argument("--agreement-seqs", type=int, default=2,
                   help="held-out sequences decoded with and without the predictor")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_sparsity)


def _cmd_sparsity(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from plm.infer.sparsity import sparsity_report

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = Path(args.out or Path("runs") / "sparsity" / Path(args.dir).resolve().name)
    rep = sparsity_report(args.dir, args.data, out, tokens=args.tokens, seq_len=args.seq_len,
                          text_field=args.text_field, eps=args.eps, dtype=args.dtype,
                          fit_predictor=args.fit_predictor, rank=args.rank, mass_recall=args.mass_recall,
                          agreement_seqs=args.agreement_seqs, device=args.device)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
        return 0
    print(f"relu² MLP sparsity of {args.dir} over {rep.tokens} tokens")
    print(f"{'layer':>5} {'exact 0':>8} {'|a|<' + format(args.eps, 'g'):>9} {'active/token':>13}")
    for lyr in rep.layers:
        print(f"{lyr.layer:>5} {100 * lyr.exact_zero:7.1f}% {100 * lyr.near_zero:8.1f}% {lyr.mean_active:13.1f}")
    print(f" mean {100 * rep.mean_exact_zero:7.1f}% {100 * rep.mean_near_zero:8.1f}%")
    print(f"activated parameters per token: {rep.activated_parameters_per_token / 1e6:.2f}M exact zeros skipped, "
          f"{rep.activated_parameters_per_token_eps / 1e6:.2f}M with |a|<{args.eps:g} skipped, "
          f"of {rep.total_parameters / 1e6:.2f}M")
    if rep.predictor:
        p = rep.predictor
        lr = p["layers"]
        mean = lambda k: sum(x[k] for x in lr) / len(lr)  # noqa: E731
        ag = p["output_agreement"]
        print(f"predictor (rank {args.rank}, held-out tokens): recall {mean('recall'):.3f}, mass recall "
              f"{mean('mass_recall'):.4f}, up_proj rows computed {100 * mean('predicted_fraction'):.1f}% "
              f"(truly active {100 * mean('active_fraction'):.1f}%), MLP output rel. error {mean('mlp_rel_error'):.4f}")
        print(f"  decode with predictor vs exact: top-1 agreement {ag['top1_agreement']:.3f} over {ag['steps']} "
              f"steps, mean rel. logit error {ag['mean_rel_logit_error']:.4f}")
        print(f"  wrote {p['file']}")
    print(f"wrote {out / 'sparsity.json'} and {out / 'sparsity.png'}")
    return 0
