"""`plm generate` and `plm chat`."""
from __future__ import annotations

import argparse
import sys

import torch

from plm.errors import PLMError
from plm.infer.generate import GenerationConfig, generate


def load_for_inference(path: str, dtype: str = "float32"):
    from plm.data.tokenizer import Tokenizer
    from plm.model.modeling import PLMForCausalLM

    model = PLMForCausalLM.from_pretrained(path, dtype=dtype)
    return model, Tokenizer.from_dir(path)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def sampling_config(args: argparse.Namespace) -> GenerationConfig:
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p,
                           repetition_penalty=args.repetition_penalty,
                           stop_strings=list(args.stop), seed=args.seed)
    cfg.validate()
    if args.threads:
        torch.set_num_threads(args.threads)
    return cfg


def _stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _cmd_generate(args: argparse.Namespace) -> int:
    cfg = sampling_config(args)
    model, tok = load_for_inference(args.dir, args.dtype)
    prompts = args.prompt
    if not prompts:
        raise PLMError("give at least one --prompt")
    if args.chat_template:
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in prompts]
    if len(prompts) == 1:
        generate(model, tok, prompts[0], cfg, stream=_stream)
        print()
    else:
        res = generate(model, tok, prompts, cfg)
        for p, t in zip(args.prompt, res.texts):
            print(f"### {p}\n{t}\n")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    cfg = sampling_config(args)
    cfg.stop_strings = cfg.stop_strings or []
    model, tok = load_for_inference(args.dir, args.dtype)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("plm chat: empty line or Ctrl-D to quit, /reset to start over")
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not user:
            return 0
        if user == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": user})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        sys.stdout.write("plm> ")
        res = generate(model, tok, prompt, cfg, stream=_stream)
        print()
        messages.append({"role": "assistant", "content": res.texts[0]})


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint")
    p.add_argument("dir")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt as a user turn")
    add_sampling_args(p)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("chat", help="multi-turn chat in the terminal (ChatML)")
    p.add_argument("dir")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p)
    p.set_defaults(func=_cmd_chat)
