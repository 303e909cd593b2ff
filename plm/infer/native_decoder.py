"""NativeDecoder: the whole PLM forward in C++ (torch.classes.plm.Decoder), one call per
decode step, on weights in GGUF formats (BF16/F16/F32, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K).

Build it from our Hugging Face checkpoints (`from_state_dict`, quantising at load) or from a
`plm`-architecture GGUF, ours or llama.cpp's (`from_gguf`: tensors stay in their blocks and
are only repacked). Sequences are independent (a server adds and removes them); each has a
latent cache of kv_lora_rank + rope values per token and layer, preallocated and growing:

    dec = NativeDecoder.from_gguf("model-q8_0.gguf")
    s = dec.new_sequence()
    logits = dec.prefill(s, prompt_ids)          # [V] fp32, for the last prompt token
    logits = dec.step([s], [next_id])            # [1, V]
    dec.free(s)

How the model maps onto matrices (all in the file's / requested format unless noted):
  qa    = q_proj and kv_a_proj_with_mqa stacked (one GEMV; two parts if their types differ)
  wuk   = kv_b_proj's key half, per head transposed to [rank, nope] (the absorbed query side
          needs its columns): from GGUFs dequantised and held as Q8_0 when the file's kv_b
          has at most 6 bits a value, else F16 (BF16/F32 for those files; `wuk_format`);
          from float checkpoints Q8_0 when the model is quantised, else the model dtype
  wuv   = kv_b_proj's value half, per head [v, rank] (rows of the file's tensor, not requantised)
  o, up = as stored; down = as stored, or the neuron-major sparse layout (`sparse=True`)
  embed = token_embd, also the tied lm_head
GGUF tensors of types without a native kernel (the Q5_0/Q5_1/... that llama.cpp's K-quant
mixes use where rows are not whole 256-value blocks) are dequantised once at load and held as
Q8_0, with a one-line notice.
"""
from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from plm.errors import CheckpointError, ConfigError, PLMError
from plm.infer import native as nv
from plm.model.config import PLMConfig

if TYPE_CHECKING:
    from plm.data.tokenizer import Tokenizer

LAYER_MATS = ("q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "up_proj", "down_proj")
# GGUF tensor types the decoder reads (GGML ids); anything else is rejected by name
GGUF_TYPES = (nv.F32, nv.F16, nv.BF16, nv.Q8_0, nv.Q4_0, nv.Q4_K, nv.Q5_K, nv.Q6_K)
LOW_BIT = (nv.Q4_0, nv.Q4_K, nv.Q5_K, nv.Q6_K)  # block formats of at most 6 bits a value


def _fmt_for(requested: int, K: int) -> int:
    """The requested block format if rows of K fit its blocks, else Q8_0, else BF16 (llama.cpp
    also falls back to finer types for rows that are not whole super-blocks)."""
    if K % nv.BLOCK[requested][0] == 0:
        return requested
    return nv.Q8_0 if K % 32 == 0 else nv.BF16


def q4_k_m_more_bits(layer: int, layers: int) -> bool:
    """Layers whose V projection (kv_b) and down projection llama.cpp's Q4_K_M stores in Q6_K:
    the first and last eighth, and every third layer between (its `use_more_bits`)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _as_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Float rows [N, K] as Q8_0 blocks (BF16 where rows are not whole 32-value blocks): how
    GGUF tensors no kernel reads in their own format or layout are held."""
    f = nv.Q8_0 if w.shape[1] % 32 == 0 else nv.BF16
    return nv.quantize(w, f).view(torch.uint8).reshape(w.shape[0], -1), f


# Cached rows per attention part in the C++ step (decoder.cpp's ATTN_PART): a decode step
# spreads one sequence's parts over the threads.
ATTN_PART = 256


class NativeDecoder:
    """PLM decode and prefill in native code. See the module docstring."""

    def __init__(self, config: PLMConfig, cache_dtype: str = "bf16", capacity: int = 256) -> None:
        nv.require()
        if cache_dtype not in ("bf16", "f32"):
            raise PLMError(f"cache_dtype must be 'bf16' or 'f32', got {cache_dtype!r}")
        c = config
        self.config = c
        self.cache_dtype = cache_dtype
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.qk_rope_head_dim, 2, dtype=torch.float32)
                                           / c.qk_rope_head_dim))  # exactly as plm.model.modeling
        self.impl = torch.classes.plm.Decoder(
            c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
            c.v_head_dim, c.kv_lora_rank, c.intermediate_size, c.vocab_size, float(c.rms_norm_eps),
            float(c.softmax_scale), inv_freq, cache_dtype == "bf16", int(capacity))
        self.formats: dict[str, str] = {}  # tensor -> format, for reports
        self.converted: dict[str, str] = {}  # GGUF tensor -> its type, where held as Q8_0 / BF16 instead
        self.sparse = False
        self._seqs: set[int] = set()

    # ---- loading --------------------------------------------------------------------------
    def _add(self, layer: int, name: str, raw: torch.Tensor, fmt: int, N: int, K: int, groups: int = 1,
             sparse: bool = False, label: str = "") -> None:
        raw = raw.contiguous().view(torch.uint8).reshape(-1)
        if sparse and fmt in nv.NO_SPARSE:  # no neuron-major layout for it: hold it as Q8_0
            self.converted[label or f"{layer}.{name}"] = f"{nv.FORMAT_NAMES[fmt]} (sparse down projection)"
            raw, fmt = _as_q8_0(nv.dequantize_blocks(raw, fmt, N, K))
            raw = raw.reshape(-1)
        packed = torch.ops.plm.pack_sparse(raw, fmt, N, K) if sparse else torch.ops.plm.pack(raw, fmt, N, K, groups)
        self.impl.add_matrix(layer, name, packed, fmt, N, K, groups, sparse)
        self.formats[label or f"{layer}.{name}"] = nv.FORMAT_NAMES[fmt] + (" sparse" if sparse else "")

    def matrices(self, layer: int) -> list[nv.PackedLinear]:
        """The packed matrices of `layer` (-1: the embedding / lm_head) as the step reads them
        (qa parts, wuk, wuv, o, up, down), callable on their own (benchmarks time them apart)."""
        return [nv.PackedLinear.from_packed(data, int(f), int(N), int(K), int(g), bool(sp), name=name)
                for name, data, (f, N, K, g, sp) in self.impl.matrices(layer)]

    @classmethod
    def from_state_dict(cls, config: PLMConfig, get_tensor: Callable[[str], torch.Tensor], fmt: str = "bf16",
                        sparse: bool = False, embed_fmt: str | None = None, cache_dtype: str = "bf16",
                        capacity: int = 256) -> "NativeDecoder":
        """From float tensors by Hugging Face name (`model.layers.3.mlp.up_proj.weight`),
        quantised at load to `fmt` (bf16, f16, f32, q8_0, q4_0, q4_k, q6_k, or the q4_k_m mix:
        Q4_K, with Q6_K for the down projection and W_UV in the layers llama.cpp's Q4_K_M gives
        more bits, see `q4_k_m_more_bits`). Matrices whose rows do not fit the format's blocks
        fall back to Q8_0 (then BF16). The tied embedding / lm_head uses `embed_fmt` (default:
        fmt for 16/8-bit models, Q8_0 for 4-bit ones, as llama.cpp keeps its output matrix at 6+
        bits)."""
        c = config
        mix = fmt == "q4_k_m"
        want = nv.Q4_K if mix else nv.format_id(fmt)
        if want == nv.Q5_K:
            raise PLMError(f"{fmt} weights can only be read from GGUF files (no quantiser)")
        dec = cls(c, cache_dtype, capacity)
        dec.sparse = sparse
        blocks = (nv.Q8_0, nv.Q4_0, nv.Q4_K, nv.Q6_K)
        quantised = want in blocks
        H, nope, vd, R = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank

        def add(layer: int, name: str, w: torch.Tensor, f: int, groups: int = 1, sp: bool = False, label: str = ""):
            w = w.float()
            f = _fmt_for(f, w.shape[1]) if f in blocks else f
            dec._add(layer, name, nv.quantize(w, f), f, w.shape[0], w.shape[1], groups, sp, label)

        def get(name: str) -> torch.Tensor:
            try:
                return get_tensor(name)
            except KeyError:
                raise CheckpointError(f"tensor {name!r} missing from the checkpoint") from None

        efmt = nv.format_id(embed_fmt) if embed_fmt else (nv.Q8_0 if want in (nv.Q4_0, nv.Q4_K) else want)
        add(-1, "embed", get("model.embed_tokens.weight"), efmt, label="embed")
        dec.impl.set_vector(-1, "norm", get("model.norm.weight").float())
        wuk_fmt = nv.Q8_0 if quantised else want
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            more = nv.Q6_K if mix and q4_k_m_more_bits(i, c.num_hidden_layers) else want
            dec.impl.set_vector(i, "ln1", get(p + "input_layernorm.weight").float())
            dec.impl.set_vector(i, "ln2", get(p + "post_attention_layernorm.weight").float())
            dec.impl.set_vector(i, "kv_norm", get(p + "self_attn.kv_a_layernorm.weight").float())
            qa = torch.cat([get(p + "self_attn.q_proj.weight").float(),
                            get(p + "self_attn.kv_a_proj_with_mqa.weight").float()])
            add(i, "qa", qa, want, label=f"{i}.qa")
            kvb = get(p + "self_attn.kv_b_proj.weight").float().view(H, nope + vd, R)
            wuk = kvb[:, :nope].transpose(1, 2).reshape(H * R, nope)  # per head W_UK^T [rank, nope]
            add(i, "wuk", wuk, wuk_fmt, groups=H, label=f"{i}.wuk")
            add(i, "wuv", kvb[:, nope:].reshape(H * vd, R), more, groups=H, label=f"{i}.wuv")
            add(i, "o", get(p + "self_attn.o_proj.weight"), want, label=f"{i}.o")
            add(i, "up", get(p + "mlp.up_proj.weight"), want, label=f"{i}.up")
            add(i, "down", get(p + "mlp.down_proj.weight"), more, sp=sparse, label=f"{i}.down")
        dec.impl.check()
        return dec

    @classmethod
    def from_model(cls, model, **kw) -> "NativeDecoder":
        """From an in-memory PLMForCausalLM."""
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        return cls.from_state_dict(model.config, sd.__getitem__, **kw)

    @classmethod
    def from_gguf(cls, path: str | Path, sparse: bool = False, cache_dtype: str = "bf16",
                  capacity: int = 256, reader=None, wuk_format: str | None = None) -> "NativeDecoder":
        """From a `plm` GGUF (ours, or llama.cpp's converter/quantiser output): config from the
        `plm.*` metadata, every tensor kept in its GGUF blocks (repacked, never dequantised to
        bf16; only kv_b's key half is dequantised and transposed for the absorbed query).
        `reader`: the file already opened by open_gguf (load_gguf reads it once for both the
        weights and the tokenizer).

        `wuk_format`: how that transposed key half is held. Its blocks run across the file's
        blocks, so no block format holds it exactly. Default: Q8_0 when the file's kv_b has at
        most 6 bits a value (Q4_0, Q4_K, Q5_K, Q6_K), whose own rounding is 4-16x what Q8_0
        adds, and Q8_0 reads half the bytes of F16; F16 for Q8_0 and F16 files, where Q8_0 would
        double the error; F32/BF16 files as they are. 'f16', 'bf16', 'f32' or 'q8_0' force one."""
        import gguf

        path = Path(path)
        reader = reader or open_gguf(path)
        config = config_from_gguf(reader, path)
        c = config
        H, nope, vd, R = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
        tensors = {t.name: t for t in reader.tensors}
        if "output.weight" in tensors:
            raise CheckpointError(f"{path}: has an untied output.weight; PLM ties lm_head to token_embd")
        wuk_held = None
        if wuk_format is not None:
            if wuk_format not in ("f32", "f16", "bf16", "q8_0"):
                raise ConfigError(f"wuk_format={wuk_format!r}: expected 'f32', 'f16', 'bf16' or 'q8_0'")
            wuk_held = nv.format_id(wuk_format)
            if wuk_held == nv.Q8_0 and nope % 32:
                raise ConfigError(f"{path}: wuk_format='q8_0' needs qk_nope_head_dim a multiple of 32, this model has {nope}")
        dec = cls(c, cache_dtype, capacity)
        dec.sparse = sparse

        def tensor(name: str, shape: tuple[int, int] | tuple[int]):
            if name not in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} missing")
            t = tensors[name]
            ttype = int(t.tensor_type)
            got = tuple(reversed([int(x) for x in t.shape]))
            if got != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name!r} has shape {got}, the metadata implies {tuple(shape)}")
            if ttype not in GGUF_TYPES:
                # llama.cpp's K-quant mixes fall back to Q5_0/Q5_1/... where rows are not whole
                # 256-value blocks: dequantise those few (gguf's decoder) and hold them as Q8_0
                w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
                dec.converted[name] = t.tensor_type.name
                return _as_q8_0(w.reshape(shape[0], -1))
            with warnings.catch_warnings():  # the memmap is read-only; we only read it
                warnings.simplefilter("ignore")
                raw = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).reshape(shape[0], -1))
            return raw, ttype

        def vec(name: str, n: int) -> torch.Tensor:
            raw, ttype = tensor(name, (n,))
            return nv.dequantize_blocks(raw.reshape(1, -1), ttype, 1, n)[0]

        d = c.hidden_size
        raw, t = tensor("token_embd.weight", (c.vocab_size, d))
        dec._add(-1, "embed", raw, t, c.vocab_size, d, label="token_embd")
        dec.impl.set_vector(-1, "norm", vec("output_norm.weight", d))
        nq = H * c.qk_head_dim
        for i in range(c.num_hidden_layers):
            b = f"blk.{i}."
            dec.impl.set_vector(i, "ln1", vec(b + "attn_norm.weight", d))
            dec.impl.set_vector(i, "ln2", vec(b + "ffn_norm.weight", d))
            dec.impl.set_vector(i, "kv_norm", vec(b + "attn_kv_a_norm.weight", R))
            q, tq = tensor(b + "attn_q.weight", (nq, d))
            kva, tk = tensor(b + "attn_kv_a_mqa.weight", (R + c.qk_rope_head_dim, d))
            if tq == tk:  # rows are independent blocks: stack them into one matrix
                dec._add(i, "qa", torch.cat([q, kva]), tq, nq + kva.shape[0], d, label=f"{i}.qa")
            else:
                dec._add(i, "qa", q, tq, nq, d, label=f"{i}.attn_q")
                dec._add(i, "qa", kva, tk, kva.shape[0], d, label=f"{i}.attn_kv_a_mqa")
            kvb, tb = tensor(b + "attn_kv_b.weight", (H * (nope + vd), R))
            rows = kvb.view(H, nope + vd, -1)
            wuv = rows[:, nope:].reshape(H * vd, -1)
            dec._add(i, "wuv", wuv, tb, H * vd, R, groups=H, label=f"{i}.wuv")
            w_uk = nv.dequantize_blocks(rows[:, :nope].reshape(H * nope, -1), tb, H * nope, R)
            wuk = w_uk.view(H, nope, R).transpose(1, 2).reshape(H * R, nope)
            wuk_fmt = wuk_held if wuk_held is not None else (
                tb if tb in (nv.F32, nv.BF16) else nv.Q8_0 if tb in LOW_BIT and nope % 32 == 0 else nv.F16)
            dec._add(i, "wuk", nv.quantize(wuk, wuk_fmt), wuk_fmt, H * R, nope, groups=H, label=f"{i}.wuk")
            raw, t = tensor(b + "attn_output.weight", (d, H * vd))
            dec._add(i, "o", raw, t, d, H * vd, label=f"{i}.o")
            raw, t = tensor(b + "ffn_up.weight", (c.intermediate_size, d))
            dec._add(i, "up", raw, t, c.intermediate_size, d, label=f"{i}.up")
            raw, t = tensor(b + "ffn_down.weight", (d, c.intermediate_size))
            dec._add(i, "down", raw, t, d, c.intermediate_size, sparse=sparse, label=f"{i}.down")
        dec.impl.check()
        dec.gguf_path = path
        if dec.converted:
            kinds = ", ".join(sorted(set(dec.converted.values())))
            print(f"plm: {len(dec.converted)} tensors of {path.name} are {kinds}, which no native kernel reads; "
                  f"held as Q8_0 (dequantised once at load)", file=sys.stderr)
        return dec

    # ---- sequences ------------------------------------------------------------------------
    def new_sequence(self) -> int:
        s = int(self.impl.new_sequence())
        self._seqs.add(s)
        return s

    def free(self, seq: int) -> None:
        if seq not in self._seqs:
            raise PLMError(f"no sequence {seq}")
        self.impl.free_sequence(seq)
        self._seqs.discard(seq)

    def length(self, seq: int) -> int:
        return int(self.impl.length(seq))

    def kv_bytes(self, seq: int) -> int:
        """Bytes of latent cache in use by `seq` (rank + rope values per token and layer)."""
        return int(self.impl.kv_bytes(seq))

    def reserve(self, seq: int, tokens: int) -> None:
        """Grow `seq`'s cache to hold `tokens` positions now (else it doubles as needed)."""
        self.impl.reserve(seq, tokens)

    def truncate(self, seq: int, tokens: int) -> None:
        """Forget all but the first `tokens` positions of `seq`."""
        self.impl.truncate(seq, tokens)

    def copy_prefix(self, dst: int, src: int, tokens: int) -> None:
        """Fill the empty sequence `dst` with the first `tokens` positions of `src`'s cache."""
        self.impl.copy_prefix(dst, src, tokens)

    def weight_bytes(self) -> int:
        return int(self.impl.weight_bytes())

    # ---- compute --------------------------------------------------------------------------
    def prefill(self, seq: int, ids: Sequence[int] | torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Append prompt tokens to `seq` (in chunks of `chunk`); fp32 logits [V] of the last."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise PLMError("prefill needs at least one token")
        return self.impl.prefill(seq, ids, chunk)

    def prefill_all(self, seq: int, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append tokens to `seq` in one forward; fp32 logits [T, V] of every one of them
        (scoring a text: row i predicts the token after ids[i])."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise PLMError("prefill needs at least one token")
        return self.impl.prefill_all(seq, ids)

    def step(self, seqs: Sequence[int], ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One token for each sequence (distinct); fp32 logits [B, V]."""
        return self.impl.step(torch.as_tensor(list(seqs), dtype=torch.long),
                              torch.as_tensor(ids, dtype=torch.long).reshape(-1))

    def run(self, segments: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """One forward over (sequence, tokens) segments of distinct sequences, each appending its
        tokens: decode rows and prompt chunks together, the weights read once. Rows are
        independent, so the result equals running the segments apart. fp32 logits [S, V] of
        each segment's last token."""
        if not segments:
            raise PLMError("run needs at least one segment")
        seqs = torch.tensor([s for s, _ in segments], dtype=torch.long)
        counts = torch.tensor([len(ids) for _, ids in segments], dtype=torch.long)
        ids = torch.tensor([t for _, seg in segments for t in seg], dtype=torch.long)
        return self.impl.segments(seqs, counts, ids)

    def greedy(self, prompt: Sequence[int], n: int) -> list[int]:
        """n greedy tokens after `prompt` in a fresh sequence (tests, benchmarks)."""
        s = self.new_sequence()
        try:
            logits = self.prefill(s, prompt)
            out = []
            for _ in range(n):
                out.append(int(logits.argmax()))
                logits = self.step([s], [out[-1]])[0]
            return out
        finally:
            self.free(s)

    def sparse_stats(self) -> dict:
        rows, active, neurons = (int(v) for v in self.impl.sparse_stats())
        return {"rows": rows, "active_fraction": active / neurons if neurons else float("nan")}

    def __del__(self) -> None:
        for s in list(getattr(self, "_seqs", ())):
            try:
                self.impl.free_sequence(s)
            except Exception:
                pass


def native_step_fn(dec: NativeDecoder, chunk: int = 256):
    """The `StepFn` of plm.infer.generate over a NativeDecoder: the first call prefills each
    row's real (unpadded) prompt tokens into its own sequence, later calls step every row;
    `select` frees the sequences of finished rows."""
    state: dict = {"seqs": None}

    def step(new_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = new_ids.shape
        if state["seqs"] is None:
            state["seqs"] = [dec.new_sequence() for _ in range(B)]
            rows = [dec.prefill(s, new_ids[b][mask[b, -T:].bool()], chunk) for b, s in enumerate(state["seqs"])]
            return torch.stack(rows)[:, None]
        if T != 1:
            raise PLMError("the native step function decodes one token per row after the prompt")
        return dec.step(state["seqs"], new_ids[:, 0])[:, None]

    def select(index: torch.Tensor) -> None:
        keep = set(index.tolist())
        for j, s in enumerate(state["seqs"]):
            if j not in keep:
                dec.free(s)
        state["seqs"] = [state["seqs"][j] for j in index.tolist()]

    def close() -> None:
        for s in state["seqs"] or []:
            dec.free(s)
        state["seqs"] = None

    step.select = select
    step.close = close
    step.state = state
    return step


# ---------------------------------------------------------------------------------------
# GGUF metadata and tokenizer


def load_gguf(path: str | Path, **kw) -> tuple[NativeDecoder, Tokenizer]:
    """The native decoder and the tokenizer of a `plm` GGUF, the file parsed once (`kw`:
    NativeDecoder.from_gguf's)."""
    reader = open_gguf(path)
    return NativeDecoder.from_gguf(path, reader=reader, **kw), tokenizer_from_gguf(reader)


@functools.lru_cache(maxsize=1)
def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """gguf's reader, its header parsed through a plain ndarray view of the file's map (the
        same bytes and fields): numpy's memmap subclass runs Python hooks on every slice, and
        a Qwen2 vocabulary's ~300,000 strings and merges are each sliced, 7-8 s a file that
        way, 2.3 s this way (a tiny model's GGUF, this project's AMD EPYC host)."""

        def _get(self, offset, dtype, count=1, override_order=None):
            if type(self.data) is not np.ndarray:  # the view keeps the memmap (its base) alive
                self.data = self.data.view(np.ndarray)
            return super()._get(offset, dtype, count, override_order)

    return Reader


def open_gguf(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        return _reader_class()(str(path))
    except Exception as e:  # gguf raises ValueError / struct errors on foreign files
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_gguf(reader, path: str | Path = "model.gguf") -> PLMConfig:
    """PLMConfig from the GGUF's `plm.*` metadata (what `plm export gguf` and llama.cpp's
    converter write; REFERENCE.md section 6)."""
    arch = _field(reader, "general.architecture")
    if arch != "plm":
        raise CheckpointError(f"{path}: architecture is {arch!r}, not 'plm'")

    def req(key: str):
        v = _field(reader, f"plm.{key}")
        if v is None:
            raise CheckpointError(f"{path}: metadata key plm.{key} missing")
        return v

    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' missing")
    vocab = int(_field(reader, "plm.vocab_size", int(embd.shape[1])))
    rope = int(req("rope.dimension_count"))
    key_len = int(req("attention.key_length"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    try:
        return PLMConfig(
            vocab_size=vocab, hidden_size=int(req("embedding_length")), num_hidden_layers=int(req("block_count")),
            num_attention_heads=int(req("attention.head_count")), intermediate_size=int(req("feed_forward_length")),
            kv_lora_rank=int(req("attention.kv_lora_rank")), qk_nope_head_dim=key_len - rope, qk_rope_head_dim=rope,
            v_head_dim=int(req("attention.value_length")),
            rms_norm_eps=float(_field(reader, "plm.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(_field(reader, "plm.rope.freq_base", 10000.0)),
            max_position_embeddings=int(_field(reader, "plm.context_length", 4096)),
            bos_token_id=None if bos is None or bos >= vocab else int(bos),
            eos_token_id=None if eos is None or eos >= vocab else int(eos),
            pad_token_id=None if pad is None or pad >= vocab else int(pad))
    except PLMError as e:
        raise CheckpointError(f"{path}: {e}") from None


def tokenizer_from_gguf(reader):
    """Our Tokenizer (plm.data.tokenizer) from a GGUF's `tokenizer.ggml.*` metadata: the
    byte-level BPE vocabulary and merges with the Qwen2 pre-tokenizer (`gpt2` model files)."""
    import gguf
    from tokenizers import AddedToken, models

    from plm.data.tokenizer import Tokenizer, _byte_level_tokenizer

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model is {model!r}; only byte-level BPE ('gpt2') is supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    unused, control = int(gguf.TokenType.UNUSED), int(gguf.TokenType.CONTROL)
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != unused}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = _byte_level_tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    added = [AddedToken(tokens[i], special=ty == control, normalized=False)
             for i, ty in enumerate(types) if ty in (control, int(gguf.TokenType.USER_DEFINED))]
    hf.add_special_tokens([a for a in added if a.special])
    hf.add_tokens([a for a in added if not a.special])
    cfg = {}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    if eos is not None and eos < len(tokens):
        cfg["eos_token"] = tokens[eos]
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None and pad < len(tokens):
        cfg["pad_token"] = tokens[pad]
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return Tokenizer(hf, cfg)
