"""Agreement between our PyTorch model and llama.cpp running our GGUF export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from plm.errors import PLMError


def open_llama(gguf_path: str | Path, n_ctx: int = 512, threads: int = 2, f32_cache: bool = True):
    try:
        import llama_cpp
    except ImportError:
        raise PLMError("the llama.cpp check needs llama-cpp-python: pip install 'plm[llama]'") from None
    kw = {"type_k": 0, "type_v": 0} if f32_cache else {}  # f32 K/V: compare the model, not cache rounding
    return llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, logits_all=True, n_threads=threads, n_batch=128,
                           verbose=False, **kw)


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def compare_with_llama_cpp(model, gguf_path: str | Path, prompt: list[int], n_greedy: int = 32) -> dict:
    """Max logit difference over the prompt and greedy agreement over n_greedy tokens."""
    from plm.infer.generate import GenerationConfig, generate_tokens, model_step_fn

    llm = open_llama(gguf_path, n_ctx=len(prompt) + n_greedy + 8)
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[: len(prompt)])
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0].float().numpy()
    ours_greedy = [t for _, t in generate_tokens(model_step_fn(model), [prompt],
                                                 GenerationConfig(max_new_tokens=n_greedy))]
    theirs_greedy = llama_greedy(llm, prompt, n_greedy)
    agree = next((i for i, (a, b) in enumerate(zip(ours_greedy, theirs_greedy)) if a != b), n_greedy)
    max_abs = float(np.abs(theirs - ours).max())
    return {"prompt_tokens": len(prompt), "max_abs_logit_diff": max_abs,
            "max_abs_logit": float(np.abs(ours).max()),
            "relative_diff": max_abs / float(np.abs(ours).max()),
            "greedy_tokens": n_greedy, "greedy_identical_prefix": agree,
            "greedy_identical": ours_greedy == theirs_greedy}
