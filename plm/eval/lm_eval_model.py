"""PLM as an lm-evaluation-harness model: ``lm_eval --model plm --model_args pretrained=DIR``.

Importing this module registers the model name ``plm`` (lm-eval 0.4 looks models up only in
its registry and has no plugin entry points, so something must import this first:
``python -m plm.eval.lm_eval_cli`` / ``plm lm-eval`` do, or ``import plm.eval.lm_eval_model``
before calling ``lm_eval.simple_evaluate(model="plm", ...)``).

model_args: ``pretrained`` (checkpoint directory, required), ``dtype`` (float32 | bfloat16 |
float16 | auto = as stored), ``max_length`` (default: the model's window), ``max_gen_toks``
(default 256), ``batch_size`` and ``device`` (also set by lm-eval's --batch_size/--device;
a CUDA device falls back to the CPU when CUDA is absent).

All scoring goes through `plm.eval.lm.PLMEvalModel`, the engine behind `plm eval`.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from plm.eval.lm import PLMEvalModel

log = logging.getLogger(__name__)


def _batch_size(value: Any) -> int:
    if value is None:
        return 8
    s = str(value)
    if s.startswith("auto"):  # "auto" / "auto:N": no memory probing on CPU; a fixed default
        return 8
    try:
        n = int(s)
    except ValueError:
        raise ValueError(f"plm: batch_size must be an integer or 'auto', got {value!r}") from None
    if n < 1:
        raise ValueError(f"plm: batch_size must be at least 1, got {n}")
    return n


@register_model("plm")
class PLMLM(TemplateLM):
    """lm-eval's loglikelihood / loglikelihood_rolling / generate_until over a PLM checkpoint."""

    def __init__(self, pretrained: str, dtype: str = "float32", device: str | None = "cpu",
                 batch_size: int | str | None = 8, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            log.warning("plm: ignoring model_args %s", ", ".join(sorted(kwargs)))
        device = str(device or "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("plm: CUDA is not available; running on the CPU")
            device = "cpu"
        self.engine = PLMEvalModel.from_pretrained(
            pretrained, dtype=None if dtype == "auto" else dtype, device=device,
            batch_size=_batch_size(batch_size), max_length=max_length, progress=False)
        self.pretrained = str(pretrained)
        self.tokenizer = self.engine.tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self._device = torch.device(device)

    # ---- what TemplateLM needs ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.endoftext_id

    @property
    def prefix_token_id(self) -> int:
        return self.engine.prefix_token_id

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)  # Qwen2 adds no BOS

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any):
        self.engine.progress = not disable_tqdm
        try:
            scores = self.engine.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests],
                                                      desc="plm loglikelihood")
        finally:
            self.engine.progress = False
        for (key, _, _), res in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        strings = [req.args[0] for req in requests]
        self.engine.progress = not disable_tqdm
        try:  # all documents' windows batched together
            values = self.engine.loglikelihood_rolling(strings, desc="plm loglikelihood_rolling")
        finally:
            self.engine.progress = False
        for string, value in zip(strings, values):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), value)
        return values

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), desc="plm generate_until", disable=disable_tqdm)
        for idxs in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[idxs[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tokenizer.decode([self.eot_token_id]))
            max_gen = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", False):
                temperature = 0.0
            seed = kwargs.pop("seed", None)
            if kwargs:
                log.warning("plm: ignoring generation kwargs %s", ", ".join(sorted(kwargs)))
            contexts = [requests[i].args[0] for i in idxs]
            texts = self.engine.generate(contexts, max_gen, stop=until, temperature=temperature, seed=seed)
            for i, ctx, text in zip(idxs, contexts, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", (ctx, requests[i].args[1]), text)
            bar.update(len(idxs))
        bar.close()
        return results  # type: ignore[return-value]

    # ---- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return f"plm-{self.tokenizer.fingerprint()}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from plm.data.tokenizer import CHATML_TEMPLATE_PLAIN
        return CHATML_TEMPLATE_PLAIN if chat_template not in (False, None) else None

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.pretrained, "model_num_parameters": self.engine.model.num_parameters(),
                "model_dtype": str(self.engine.model.dtype)}
