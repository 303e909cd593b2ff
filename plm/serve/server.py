"""Load the model once, start the scheduler, run uvicorn; SIGTERM (or Ctrl-C) drains.

On the first SIGTERM/SIGINT the server stops taking requests (new connections are refused,
requests on open connections get 503), finishes every request it had accepted, streaming
included, and exits with status 0. A second Ctrl-C quits at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from plm.errors import PLMError
from plm.serve.backend import TorchBackend, load_native, native_unavailable
from plm.serve.scheduler import Scheduler

RUNTIMES = ("auto", "edge", "reference", "native")


@dataclass
class ServeOptions:
    model: str  # checkpoint folder, hub id, or (native runtime) a plm GGUF file
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the id clients send; default: `model` as given
    api_key: str | None = None
    runtime: str = "auto"  # auto: edge on CPU, reference on a GPU, native for a .gguf file
    dtype: str | None = None
    kv: str = "latent"
    sparse: str = "off"  # off keeps a request's tokens independent of its batch (see docs/serve.md)
    quant: str = "none"
    memory_budget: str | None = None
    threads: int | None = None
    max_batch: int = 16
    max_queue: int = 64
    prefill_chunk: int | None = None  # default: by runtime (scheduler.default_chunk)
    prompt_cache: int = 4  # native runtime: finished sequences whose caches a new prompt may reuse
    context: int | None = None  # default: the model's window
    log_level: str = "warning"
    allowed_origins: str = "local"  # browser pages (CORS): local | * | none | comma-separated origins

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise PLMError(f"unknown runtime {self.runtime!r}; choose from {', '.join(RUNTIMES)}")
        for name in ("max_batch", "prefill_chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PLMError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("max_queue", "prompt_cache"):
            if getattr(self, name) < 0:
                raise PLMError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise PLMError(f"--threads must be at least 1, got {self.threads}")
        if self.context is not None and self.context < 2:
            raise PLMError(f"--context must be at least 2, got {self.context}")
        if not 0 <= self.port <= 65535:
            raise PLMError(f"--port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise PLMError("--api-key must not be empty")
        cors_origins(self.allowed_origins)  # raises on a malformed origin


LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
_ORIGIN = re.compile(r"https?://[^/\s:]+(:\d+)?")


def cors_origins(spec: str) -> tuple[list[str], str | None] | None:
    """--allowed-origins as (origins, origin regex) for Starlette's CORS middleware, or None
    (none: no page of another origin may read a reply). local: pages served from this machine
    (any port), as Ollama allows by default; *: any page, as vLLM allows by default."""
    spec = spec.strip()
    if spec == "none":
        return None
    if spec == "local":
        return [], LOCAL_ORIGINS
    if spec == "*":
        return ["*"], None
    origins = [o.strip().rstrip("/") for o in spec.split(",") if o.strip()]
    bad = [o for o in origins if o != "local" and not _ORIGIN.fullmatch(o)]
    if not origins or bad:
        raise PLMError(f"--allowed-origins: {', '.join(map(repr, bad)) or repr(spec)} is not an origin; give "
                       f"scheme://host[:port] (e.g. http://localhost:3000), comma-separated, or local, * or none")
    return [o for o in origins if o != "local"], LOCAL_ORIGINS if "local" in origins else None


def resolve_runtime(opts: ServeOptions) -> str:
    """auto: native for a GGUF; the reference model on a GPU; on a CPU the native decoder when its
    kernels are built and the options need nothing only the PyTorch runtime does, else edge."""
    if opts.runtime != "auto":
        return opts.runtime
    if str(opts.model).endswith(".gguf"):
        return "native"
    if torch.cuda.is_available():
        return "reference"  # batched decode on the GPU: the reference model with its K/V cache
    pytorch_only = opts.kv != "latent" or opts.memory_budget or opts.quant not in ("none", "int8", "int4")
    return "native" if native_unavailable() is None and not pytorch_only else "edge"


def load_backend(opts: ServeOptions):
    """(backend, tokenizer, runtime kind) for the options' model."""
    runtime = resolve_runtime(opts)
    if runtime == "native":
        if opts.memory_budget or opts.kv != "latent":
            raise PLMError("--memory-budget and --kv full are edge-runtime options; the native decoder "
                           "keeps every weight resident and a latent cache")
        backend, tok = load_native(opts.model, opts.quant, opts.dtype, sparse=opts.sparse == "on",
                                   keep=opts.prompt_cache)
        return backend, tok, "native"
    if str(opts.model).endswith(".gguf"):
        raise PLMError(f"{opts.model}: GGUF files run on the native runtime (--runtime native)")
    from plm.infer.engine import Engine
    from plm.infer.runtime import EdgeOptions
    edge = EdgeOptions(kv=opts.kv, sparse=opts.sparse, quant=opts.quant, memory_budget=opts.memory_budget,
                       threads=opts.threads)
    if hasattr(edge, "backend"):
        edge.backend = "torch"  # --runtime edge is the PyTorch runtime; the native one is NativeBackend
    eng = Engine(opts.model, runtime, opts.dtype, edge)
    if getattr(eng, "runtime", None) is not None:
        return TorchBackend.edge(eng.runtime), eng.tokenizer, "edge"
    if getattr(eng, "model", None) is not None:
        return TorchBackend.reference(eng.model), eng.tokenizer, "reference"
    raise PLMError(f"the {runtime} runtime has no batched decoding the server can drive")


def build(opts: ServeOptions):
    """(app, scheduler) ready to serve, the scheduler thread started."""
    from plm.serve.app import AppState, create_app

    opts.validate()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    backend, tok, kind = load_backend(opts)
    window = backend.config.max_position_embeddings
    if opts.context is not None and opts.context > window:
        raise PLMError(f"--context {opts.context} is beyond the model's window of {window} tokens")
    scheduler = Scheduler(backend, tok, max_batch=opts.max_batch, max_queue=opts.max_queue,
                          prefill_chunk=opts.prefill_chunk,
                          threads=torch.get_num_threads()).start()
    names = [opts.model_name or str(opts.model)]
    if opts.model_name and str(opts.model) not in names:
        names.append(str(opts.model))  # the path keeps working as an alias
    state = AppState(scheduler, tok, names, opts.context or window, opts.api_key, kind,
                     cors=cors_origins(opts.allowed_origins))
    return create_app(state), scheduler


def serve(opts: ServeOptions) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns the exit status."""
    try:
        import uvicorn
    except ImportError:
        raise PLMError("plm serve needs its extra: pip install 'plm[serve]'") from None
    app, scheduler = build(opts)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                st = app.state.plm
                print(f"plm serve: {st.model_names[0]} ({st.runtime} runtime, max batch {scheduler.max_batch}, "
                      f"{st.context}-token window) on http://{host}:{port}/v1", flush=True)
                if host not in ("127.0.0.1", "::1", "localhost") and not opts.api_key:
                    print("plm serve: warning: reachable from other machines and no --api-key set", flush=True)

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                print("plm serve: draining (finishing accepted requests; Ctrl-C again to quit now)", flush=True)
            scheduler.drain()
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()  # a drained server exits normally, not by the signal

    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                            access_log=opts.log_level in ("info", "debug"),
                            lifespan="off", timeout_graceful_shutdown=None)
    server = Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind (it logged why)
        pass
    finally:
        scheduler.stop(timeout=0 if server.force_exit or not server.started else None)
    if not server.started:
        raise PLMError(f"could not listen on {opts.host}:{opts.port} (in use, or not an address of this machine)")
    print("plm serve: stopped", flush=True)
    return 0

