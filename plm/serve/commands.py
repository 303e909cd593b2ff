"""`plm serve MODEL`: the OpenAI-compatible server (plm.serve; docs/serve.md)."""
from __future__ import annotations

import argparse
import os


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                       description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics). Needs `pip install 'plm[serve]'`.")
    p.add_argument("model", help="checkpoint folder or hub id; a plm .gguf file with --runtime native")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the address is printed)")
    p.add_argument("--model-name", default=None, help="the model id clients send (None: MODEL as given)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (also read from $PLM_API_KEY)")
    p.add_argument("--allowed-origins", default="local",
                   help="web pages whose scripts may call the server (CORS): local (pages served from this "
                        "machine, any port), * (any page), none, or origins such as "
                        "http://localhost:3000,https://chat.example.org")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=16, help="sequences decoded together at most (slots)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot at most; beyond it 429")
    g.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt tokens per iteration while others decode (smaller: shorter stalls of the "
                        "running streams, but more of them). Native runtime: the chunk runs inside the decode "
                        "step (default 8); PyTorch runtimes: between two decode steps (default 512)")
    g.add_argument("--prompt-cache", type=int, default=4,
                   help="native runtime: keep the caches of this many finished requests; a new prompt that "
                        "begins with what one holds (the next turn of a chat) prefills only the rest (0: off)")
    g.add_argument("--context", type=int, default=None,
                   help="prompt + max_tokens limit (None: the model's window; may only lower it)")
    g = p.add_argument_group("runtime")
    g.add_argument("--runtime", default="auto", choices=["auto", "edge", "reference", "native"],
                   help="edge: the PyTorch CPU runtime; reference: the PyTorch model; native: the C++ decoder "
                        "(auto: native for a .gguf; reference on a GPU; on a CPU native when its kernels are "
                        "built and the options allow, else edge)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (None: bfloat16 on the edge runtime, float32 on the reference)")
    g.add_argument("--kv", default="latent", choices=["latent", "full"], help="edge KV cache layout")
    g.add_argument("--sparse", default="off", choices=["auto", "on", "off"],
                   help="sparse relu² MLP (off: a batched step reads most rows anyway, and the sparse kernel "
                        "sums in a batch-dependent order, so a request's tokens would depend on its batch)")
    g.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                   help="weight-only quantisation (native runtime: Q8_0 / Q4_0)")
    g.add_argument("--memory-budget", default=None, help="edge weight memory budget, e.g. 2GB")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (None: all cores)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info, debug: one line per request)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from plm.serve.server import ServeOptions, serve
    key = args.api_key or os.environ.get("PLM_API_KEY") or None  # not an argparse default: --help would print it
    opts = ServeOptions(model=args.model, host=args.host, port=args.port, model_name=args.model_name,
                        api_key=key, runtime=args.runtime, dtype=args.dtype, kv=args.kv,
                        sparse=args.sparse, quant=args.quant, memory_budget=args.memory_budget,
                        threads=args.threads, max_batch=args.max_batch, max_queue=args.max_queue,
                        prefill_chunk=args.prefill_chunk, prompt_cache=args.prompt_cache, context=args.context,
                        log_level=args.log_level, allowed_origins=args.allowed_origins)
    return serve(opts)
