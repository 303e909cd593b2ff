"""Activation sparsity of the relu² MLP, and the low-rank activation predictor.

`measure_sparsity` runs the reference model over real text and counts, per layer, MLP
activations a = relu(up(x))² that are exactly zero and that are below eps in magnitude;
from those it derives activated parameters per token. `fit_predictors` trains, for each
layer, a rank-r predictor of which neurons fire (in the spirit of Deja Vu / PowerInfer):
from recorded MLP inputs X and pre-activations Z = X W_up^T it takes the reduced-rank
regression Z ~ X A B (A = W_up^T V_r, B = V_r^T, V_r the top right singular vectors of Z),
and per layer a margin so that the predicted set {i : (xAB)_i > -margin} keeps a target
share of the activation mass on the fitting tokens. Recall and output agreement are
measured on held-out tokens.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from plm.errors import PLMError
from plm.utils import atomic_write_json


# ---------------------------------------------------------------------------------------
# data


def token_stream(sources: Sequence[str], tokenizer, text_field: str = "text") -> Iterator[np.ndarray]:
    """Token arrays from a prepared-token folder (manifest.json) or text sources (files,
    folders, globs, .jsonl with `text_field`), documents separated by EOS."""
    if len(sources) == 1 and (Path(sources[0]) / "manifest.json").exists():
        from plm.data.prepare import load_shards
        for shard in load_shards(sources[0]):
            yield np.asarray(shard, dtype=np.int64)
        return
    from plm.data.prepare import iter_documents
    eos = tokenizer.eos_token_id
    for doc in iter_documents(list(sources), text_field):
        if doc:
            yield np.asarray(tokenizer.encode(doc) + [eos], dtype=np.int64)


def sample_sequences(sources: Sequence[str], tokenizer, tokens: int, seq_len: int,
                     text_field: str = "text", vocab_size: int | None = None) -> torch.Tensor:
    """[N, seq_len] token ids, the first `tokens` tokens of the data cut into sequences."""
    need = max(seq_len, (tokens // seq_len) * seq_len)
    parts, have = [], 0
    for arr in token_stream(sources, tokenizer, text_field):
        parts.append(arr[: need - have])
        have += len(parts[-1])
        if have >= need:
            break
    if have < seq_len:
        raise PLMError(f"{', '.join(sources)}: only {have} tokens of data; need at least {seq_len}")
    ids = torch.from_numpy(np.concatenate(parts)[: (have // seq_len) * seq_len]).view(-1, seq_len)
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise PLMError(f"data holds token id {int(ids.max())} but the model's vocabulary has {vocab_size}; "
                       "was it prepared with another tokenizer?")
    return ids


# ---------------------------------------------------------------------------------------
# measurement


@dataclass
class LayerSparsity:
    layer: int
    exact_zero: float  # fraction of MLP activations exactly 0
    near_zero: float  # fraction with |a| < eps
    mean_active: float  # mean number of non-zero neurons per token


@dataclass
class SparsityReport:
    tokens: int
    eps: float
    intermediate_size: int
    layers: list[LayerSparsity]
    total_parameters: int
    mlp_parameters_per_layer: int
    activated_parameters_per_token: int  # MLP rows of exact-zero neurons not counted
    activated_parameters_per_token_eps: int  # ... of |a| < eps neurons not counted
    predictor: dict | None = field(default=None)

    @property
    def mean_exact_zero(self) -> float:
        return float(np.mean([lyr.exact_zero for lyr in self.layers]))

    @property
    def mean_near_zero(self) -> float:
        return float(np.mean([lyr.near_zero for lyr in self.layers]))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean_exact_zero"] = self.mean_exact_zero
        d["mean_near_zero"] = self.mean_near_zero
        return d


class _Recorder:
    """Forward hooks on every layer's up_proj: counts zeros; optionally keeps MLP inputs."""

    def __init__(self, model, eps: float, keep_inputs: int = 0) -> None:
        self.eps, self.keep = eps, keep_inputs
        L = model.config.num_hidden_layers
        self.zero = [0] * L
        self.near = [0] * L
        self.count = [0] * L
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self.kept = [0] * L
        self.handles = [layer.mlp.up_proj.register_forward_hook(self._hook(i))
                        for i, layer in enumerate(model.model.layers)]

    def _hook(self, i: int):
        def hook(mod, inp, out):
            z = out.detach().float().reshape(-1, out.shape[-1])
            a = F.relu(z).square()
            self.zero[i] += int((a == 0).sum())
            self.near[i] += int((a.abs() < self.eps).sum())
            self.count[i] += a.numel()
            if self.kept[i] < self.keep:
                x = inp[0].detach().float().reshape(-1, inp[0].shape[-1])[: self.keep - self.kept[i]]
                self.inputs[i].append(x.clone())
                self.kept[i] += x.shape[0]
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def measure_sparsity(model, ids: torch.Tensor, eps: float = 1e-3, keep_inputs: int = 0,
                     batch: int = 1) -> tuple[SparsityReport, list[torch.Tensor]]:
    """Run `model` over ids [N, T]; return the report and (if keep_inputs) up to that many
    recorded MLP inputs per layer (for predictor fitting)."""
    cfg = model.config
    rec = _Recorder(model, eps, keep_inputs)
    try:
        for s in range(0, ids.shape[0], batch):
            model(ids[s:s + batch].to(model.device))
    finally:
        rec.close()
    I = cfg.intermediate_size
    layers = [LayerSparsity(i, rec.zero[i] / rec.count[i], rec.near[i] / rec.count[i],
                            I * (1 - rec.zero[i] / rec.count[i])) for i in range(cfg.num_hidden_layers)]
    from plm.model.config import model_info
    total = model_info(cfg)["total_parameters"]
    mlp = 2 * cfg.hidden_size * I
    rep = SparsityReport(
        tokens=int(ids.numel()), eps=eps, intermediate_size=I, layers=layers, total_parameters=total,
        mlp_parameters_per_layer=mlp,
        activated_parameters_per_token=int(total - sum(lyr.exact_zero for lyr in layers) * mlp),
        activated_parameters_per_token_eps=int(total - sum(lyr.near_zero for lyr in layers) * mlp))
    inputs = [torch.cat(x) if x else torch.empty(0) for x in rec.inputs]
    return rep, inputs


def plot_sparsity(rep: SparsityReport, out: str | Path, title: str = "") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = [lyr.layer for lyr in rep.layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(L) + 3), 4.4))
    w = 0.4
    ax.bar([i - w / 2 for i in L], [100 * lyr.exact_zero for lyr in rep.layers], w, label="exactly 0")
    ax.bar([i + w / 2 for i in L], [100 * lyr.near_zero for lyr in rep.layers], w, label=f"|a| < {rep.eps:g}")
    ax.axhline(100 * rep.mean_exact_zero, color="C0", ls="--", lw=1,
               label=f"mean exactly 0: {100 * rep.mean_exact_zero:.1f}%")
    ax.set_xticks(L)  # whole layers, never fractional ticks
    ax.set_xlabel("layer")
    ax.set_ylabel("inactive MLP neurons per token (%)")
    ax.set_ylim(0, 100)
    act = rep.activated_parameters_per_token
    summary = (f"{rep.tokens} tokens; {act / 1e6:.2f}M of {rep.total_parameters / 1e6:.2f}M "
               "parameters active per token")
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()  # after the two-line title, so nothing is clipped
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------
# predictor


@dataclass
class PredictorLayerReport:
    layer: int
    rank: int
    margin: float
    active_fraction: float  # true active neurons per token / I (held-out)
    predicted_fraction: float  # up_proj rows computed per token / I (held-out)
    recall: float  # share of truly active neurons predicted (held-out)
    mass_recall: float  # share of activation mass sum(a) predicted (held-out)
    mlp_rel_error: float  # ||down(a*pred) - down(a)|| / ||down(a)|| (held-out)


def _margin_for_mass(zhat: torch.Tensor, a: torch.Tensor, target: float) -> float:
    """Smallest margin m with sum(a[zhat > -m]) >= target * sum(a)."""
    act = a > 0
    key = -zhat[act]  # a neuron is kept when key < m
    w = a[act]
    if key.numel() == 0:
        return 0.0
    order = key.argsort()
    cum = w[order].cumsum(0)
    k = int(torch.searchsorted(cum, target * cum[-1]).clamp(max=key.numel() - 1))
    return float(key[order[k]]) + 1e-6


def fit_layer_predictor(X: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, rank: int,
                        target: float = 0.99, holdout: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, float,
                                                                            dict]:
    X, w_up, w_down = X.float(), w_up.float(), w_down.float()
    n = X.shape[0]
    n_fit = int(n * (1 - holdout))
    if n_fit < 2 * rank or n - n_fit < 8:
        raise PLMError(f"{n} recorded tokens are too few to fit a rank-{rank} predictor; "
                       f"record at least {4 * rank} (--tokens)")
    Xf, Xh = X[:n_fit], X[n_fit:]
    Z = Xf @ w_up.t()
    r = min(rank, min(Z.shape))
    _, _, V = torch.svd_lowrank(Z, q=min(r + 8, min(Z.shape)), niter=4)
    Vr = V[:, :r]
    A = w_up.t() @ Vr  # [d, r]
    B = Vr.t().contiguous()  # [r, I]
    margin = _margin_for_mass((Xf @ A) @ B, F.relu(Z).square(), target)
    Zh = Xh @ w_up.t()
    ah = F.relu(Zh).square()
    pred = (Xh @ A) @ B > -margin
    act = ah > 0
    y = ah @ w_down.t()
    y_pred = (ah * pred) @ w_down.t()
    stats = {
        "active_fraction": float(act.float().mean()),
        "predicted_fraction": float(pred.float().mean()),
        "recall": float((act & pred).sum() / act.sum().clamp(min=1)),
        "mass_recall": float((ah * pred).sum() / ah.sum().clamp(min=1e-30)),
        "mlp_rel_error": float((y_pred - y).norm() / y.norm().clamp(min=1e-30)),
    }
    return A, B, margin, stats


def fit_predictors(model, inputs: list[torch.Tensor], rank: int = 128, target: float = 0.99,
                   holdout: float = 0.2) -> tuple[dict[str, torch.Tensor], list[PredictorLayerReport]]:
    tensors: dict[str, torch.Tensor] = {}
    reports = []
    for i, layer in enumerate(model.model.layers):
        A, B, margin, st = fit_layer_predictor(inputs[i], layer.mlp.up_proj.weight.detach(),
                                               layer.mlp.down_proj.weight.detach(), rank, target, holdout)
        tensors[f"layers.{i}.A"] = A.contiguous()
        tensors[f"layers.{i}.B"] = B
        tensors[f"layers.{i}.margin"] = torch.tensor(margin)
        reports.append(PredictorLayerReport(i, A.shape[1], margin, **st))
    return tensors, reports


def save_predictors(tensors: dict[str, torch.Tensor], path: str | Path, layers: int, rank: int,
                    target: float) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"layers": str(layers), "rank": str(rank),
                                            "mass_recall_target": str(target), "format": "plm-predictor-1"})
    return path


@torch.no_grad()
def output_agreement(model, predictor: str | Path, ids: torch.Tensor, prefix: int = 8,
                     dtype: str = "float32") -> dict:
    """Teacher-forced decode over ids [N, T] with the edge runtime, predictor vs exact dense MLP:
    top-1 agreement and relative logit error per step."""
    from plm.infer.runtime import EdgeRuntime

    exact = EdgeRuntime.from_model(model, dtype=dtype, sparse="off")
    approx = EdgeRuntime.from_model(model, dtype=dtype, sparse="on", predictor=str(predictor))
    agree, total, rel = 0, 0, []
    for row in ids:
        ca, cb = exact.new_cache(1, ids.shape[1]), approx.new_cache(1, ids.shape[1])
        la = exact.forward(row[None, :prefix], None, ca)
        lb = approx.forward(row[None, :prefix], None, cb)
        for t in range(prefix, ids.shape[1]):
            la = exact.forward(row[None, t:t + 1], None, ca)
            lb = approx.forward(row[None, t:t + 1], None, cb)
            agree += int(la.argmax(-1) == lb.argmax(-1))
            total += 1
            rel.append(float((la - lb).norm() / la.norm()))
    st = approx.stats
    return {"steps": total, "top1_agreement": agree / max(total, 1),
            "mean_rel_logit_error": float(np.mean(rel)) if rel else math.nan,
            "max_rel_logit_error": float(np.max(rel)) if rel else math.nan,
            "up_rows_computed_fraction": st.predicted / st.neurons if st.neurons else math.nan,
            "active_fraction": st.active_fraction()}


def write_report(rep: SparsityReport, out_dir: str | Path, title: str = "") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = atomic_write_json(out_dir / "sparsity.json", rep.as_dict())
    png = plot_sparsity(rep, out_dir / "sparsity.png", title)
    return js, png


def sparsity_report(ckpt: str | Path, data: Sequence[str], out: str | Path, tokens: int = 8192, seq_len: int = 256,
                    text_field: str = "text", eps: float = 1e-3, dtype: str = "float32", fit_predictor: bool = False,
                    rank: int = 128, mass_recall: float = 0.99, agreement_seqs: int = 2,
                    device: str = "cpu") -> SparsityReport:
    """`plm sparsity`: per-layer relu² sparsity of a checkpoint on held-out data, written to
    OUT/sparsity.json and OUT/sparsity.png; optionally fits (and saves) the activation predictor
    and measures its recall and its decode agreement with the exact model."""
    from plm.data.tokenizer import Tokenizer
    from plm.model.hub import resolve_model
    from plm.model.modeling import PLMForCausalLM

    if tokens < seq_len or seq_len < 2:
        raise PLMError(f"--tokens ({tokens}) must be at least --seq-len ({seq_len}) >= 2")
    if not 0 < mass_recall <= 1:
        raise PLMError(f"--mass-recall must be in (0, 1], got {mass_recall}")
    model = PLMForCausalLM.from_pretrained(ckpt, dtype=dtype, device=device)
    ckpt = resolve_model(ckpt)
    tok = Tokenizer.from_dir(ckpt)
    ids = sample_sequences(data, tok, tokens, seq_len, text_field, model.config.vocab_size)
    rep, inputs = measure_sparsity(model, ids, eps, keep_inputs=ids.numel() if fit_predictor else 0)
    out = Path(out)
    if fit_predictor:
        tensors, layer_reps = fit_predictors(model, inputs, rank, mass_recall)
        pred_path = save_predictors(tensors, out / "predictor.safetensors", model.config.num_hidden_layers,
                                    rank, mass_recall)
        held = ids[-max(1, agreement_seqs):]  # the held-out tail of the recorded tokens
        agreement = output_agreement(model.float(), pred_path, held[:, :min(ids.shape[1], 96)])
        rep.predictor = {"file": str(pred_path), "rank": rank, "mass_recall_target": mass_recall,
                         "layers": [vars(r) for r in layer_reps], "output_agreement": agreement}
    write_report(rep, out, f"{Path(ckpt).resolve().name}: relu² MLP activation sparsity")
    return rep
