"""A loaded model behind one interface, whichever runtime serves it: `Engine.new_step()` gives a
fresh `StepFn` (one per generation call) for plm.infer.generate. On CPU the edge runtime
(plm.infer.runtime) runs by default; on a CUDA GPU the static decoder (plm.infer.static_decode:
latent cache, absorbed MLA, one CUDA graph per token); with runtime="reference", the PyTorch
model."""
from __future__ import annotations

from pathlib import Path

import torch

from plm.errors import PLMError
from plm.infer.generate import StepFn, model_step_fn

RUNTIMES = ("auto", "edge", "reference", "static")


def resolve_device(device: str | None = None) -> torch.device:
    """--device: as given (checked), else cuda when present, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PLMError(f"--device {device!r}: not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PLMError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_runtime(runtime: str = "auto", device: torch.device | None = None) -> str:
    """The edge runtime is the CPU one; a CUDA GPU runs the static decoder (plm.infer.static_decode)."""
    if runtime not in RUNTIMES:
        raise PLMError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    device = device or resolve_device()
    if runtime == "edge" and device.type != "cpu":
        raise PLMError(f"--runtime edge runs on the CPU, not on {device}")
    if runtime != "auto":
        return runtime
    return "edge" if device.type == "cpu" else ("static" if device.type == "cuda" else "reference")


class Engine:
    """A checkpoint, its tokenizer and the runtime chosen for it.

    dtype: compute dtype (default bfloat16 on the edge runtime and the static decoder on CUDA,
    float32 on the reference and the static decoder on CPU);
    edge: the edge runtime's options (plm.infer.runtime.EdgeOptions).
    """

    def __init__(self, path: str | Path, runtime: str = "auto", dtype: str | None = None, edge=None,
                 device: str | None = None) -> None:
        from plm.data.tokenizer import Tokenizer
        from plm.model.checkpoint import load_config

        from plm.model.hub import resolve_model
        self.device = resolve_device(device)
        self.kind = resolve_runtime(runtime, self.device)
        path = resolve_model(path)
        self.path = path
        self.model = self.runtime = self.static = self.native = None
        if Path(path).suffix == ".gguf":  # llama.cpp's format: the native decoder reads its blocks as they are
            self._open_gguf(Path(path), edge)
            return
        self.config = load_config(path)  # a clear error for a wrong path before anything else
        self.tokenizer = Tokenizer.from_dir(path)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise PLMError(f"{path}: the tokenizer has {self.tokenizer.vocab_size} ids but the model's vocabulary "
                           f"has {self.config.vocab_size} rows; they do not belong together")
        self.backend = self.kind
        if self.kind == "edge":
            from plm.infer.runtime import EdgeOptions
            opts = edge or EdgeOptions()
            if dtype:
                opts.dtype = dtype
            opts.validate()
            self.native = native_decoder(path, self.config, opts)
            self.backend = "native" if self.native is not None else "torch"
            if self.native is None:
                from plm.infer.runtime import EdgeRuntime
                self.runtime = EdgeRuntime.from_checkpoint(path, opts)
        elif self.kind == "static":  # the CUDA path: the reference model's weights, decoded statically
            from plm.infer.static_decode import StaticRuntime
            from plm.model.modeling import PLMForCausalLM
            dev = self.device
            default = "bfloat16" if torch.device(dev).type == "cuda" else "float32"
            self.model = PLMForCausalLM.from_pretrained(path, dtype=dtype or default, device=dev).eval()
            self.static = StaticRuntime(self.model)
        else:
            from plm.model.modeling import PLMForCausalLM
            self.model = PLMForCausalLM.from_pretrained(path, dtype=dtype or "float32", device=self.device)

    def _open_gguf(self, path: Path, edge) -> None:
        from plm.infer import native as nv
        from plm.infer.native_decoder import load_gguf
        if self.device.type != "cpu":
            raise PLMError(f"{path}: a GGUF runs on the CPU's native decoder, not on {self.device}")
        if not nv.load():
            raise PLMError(f"{path}: running a GGUF needs the native kernels ({nv.info().get('reason')}); "
                           "build them with `plm kernels build`")
        if edge is not None and edge.threads:
            torch.set_num_threads(edge.threads)
        self.native, self.tokenizer = load_gguf(path, sparse=edge is not None and edge.sparse == "on")
        self.config = self.native.config
        self.kind, self.backend = "edge", "native"

    def new_step(self) -> StepFn:
        from plm.infer.runtime import edge_step_fn
        if self.native is not None:
            from plm.infer.native_decoder import native_step_fn
            return native_step_fn(self.native)
        if self.static is not None:
            return self.static.new_step()
        if self.runtime is not None:
            return edge_step_fn(self.runtime)
        return model_step_fn(self.model)


def native_decoder(path: Path, config, opts):
    """The native C++ decoder for a checkpoint folder, or None where the PyTorch edge runtime
    serves: the options need it (--backend torch, or something only it does), or the kernels
    are not built (one line says so). Block formats (NATIVE_QUANT) and --backend native need
    the kernels."""
    from plm.infer import native as nv
    from plm.infer.runtime import NATIVE_QUANT
    blockers = opts.native_blockers(config)
    needs = opts.backend == "native" or opts.quant in NATIVE_QUANT
    if opts.backend == "torch" or (blockers and not needs):
        if needs:
            raise PLMError(f"--quant {opts.quant} runs on the native kernels only (not with --backend torch)")
        return None
    if blockers:
        raise PLMError(f"the native decoder does not do {', '.join(blockers)}; use --backend torch")
    if not nv.load():
        if needs:
            raise PLMError(f"the native kernels are not available ({nv.info().get('reason')}); "
                           "build them with `plm kernels build`, or use --backend torch")
        return None
    from plm.infer.layerwise import MappedCheckpoint
    from plm.infer.native_decoder import NativeDecoder
    from plm.model.checkpoint import read_headers, validate_checkpoint

    if opts.threads:
        torch.set_num_threads(opts.threads)
    validate_checkpoint(path, config, read_headers(path))
    ckpt = MappedCheckpoint(path)
    return NativeDecoder.from_state_dict(config, ckpt.view, fmt=opts.native_format, sparse=opts.sparse == "on")
