"""The evaluation engine on a real tiny PLM, checked against log-likelihoods computed by hand
from the model's full logits; and multiple-choice scoring against rigged models."""
from __future__ import annotations

import pytest
import torch

from plm.errors import PLMError
from plm.eval.lm import PLMEvalModel
from plm.eval.mc_tasks import MC_TASKS, MCExample, MCTask, convert_normalised, evaluate_mc


@pytest.fixture(scope="module")
def engine(qwen2_micro_dir) -> PLMEvalModel:
    return PLMEvalModel.from_pretrained(qwen2_micro_dir, batch_size=3, progress=False)


def hand_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Unbatched, unpadded: log-softmax of the full logits, summed over the continuation."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    rows = logp[len(ctx) - 1: len(ctx) + len(cont) - 1]
    tgt = torch.tensor(cont)
    return float(rows.gather(-1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


PAIRS = [
    ("Question: What color is the sky?\nAnswer:", " blue"),
    ("Question: What color is the sky?\nAnswer:", " a very long answer that is not blue at all"),
    ("The capital of France is", " Paris"),
    ("", "Hello world"),
    ("2 + 2 =", " 4"),
    ("以下是关于农学的单项选择题\n答案：", " A"),
    ("Trailing space moves to the continuation ", "here"),
]


def test_loglikelihood_matches_hand_computation(engine: PLMEvalModel) -> None:
    got = engine.loglikelihood(PAIRS)  # batched, longest first, right-padded
    tok = engine.tokenizer
    for (context, continuation), (lp, greedy) in zip(PAIRS, got):
        ctx, cont = engine.encode_pair(context, continuation)
        assert tok.decode(ctx + cont) == (context + continuation if context else "<|endoftext|>" + continuation)
        want_lp, want_greedy = hand_loglikelihood(engine.model, ctx, cont)
        assert lp == pytest.approx(want_lp, abs=1e-3), (context, continuation)
        assert greedy == want_greedy
    # batch composition and size do not change a score
    single = PLMEvalModel(engine.model, tok, batch_size=1, progress=False).loglikelihood(PAIRS)
    assert [a for a, _ in single] == pytest.approx([a for a, _ in got], abs=1e-4)


def test_encode_pair_conventions(engine: PLMEvalModel) -> None:
    tok = engine.tokenizer
    ctx, cont = engine.encode_pair("Answer: ", "yes")  # the space travels with the answer
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"
    ctx, cont = engine.encode_pair("", "yes")
    assert ctx == [tok.endoftext_id] and tok.decode(cont) == "yes"
    with pytest.raises(PLMError, match="empty continuation"):
        engine.encode_pair("x", "")


def test_greedy_flag_is_true_for_the_models_own_argmax(engine: PLMEvalModel) -> None:
    ctx = engine.tokenizer.encode("Once upon a time")
    with torch.no_grad():
        nxt = int(engine.model(torch.tensor([ctx])).logits[0, -1].argmax())
    (lp, greedy), (_, not_greedy) = engine.loglikelihood_tokens([(ctx, [nxt]), (ctx, [(nxt + 1) % 1000])])
    assert greedy and not not_greedy


def test_long_inputs_keep_their_last_tokens(engine: PLMEvalModel) -> None:
    small = PLMEvalModel(engine.model, engine.tokenizer, batch_size=2, max_length=16, progress=False)
    ctx = list(range(1000, 1040))
    cont = [7, 8, 9]
    (lp, _), = small.loglikelihood_tokens([(ctx, cont)])
    full = ctx + cont
    kept = full[-17:]
    want, _ = hand_loglikelihood(engine.model, kept[:-3], cont)
    assert lp == pytest.approx(want, abs=1e-3) and small.truncated == 1


def test_rolling_loglikelihood_predicts_every_token_once(engine: PLMEvalModel) -> None:
    text = "The Peripheral Language Model runs on small devices. " * 3
    ids = engine.tokenizer.encode(text)
    windowed = PLMEvalModel(engine.model, engine.tokenizer, max_length=8, progress=False)
    windows = windowed.rolling_windows(ids)
    assert sum(len(c) for _, c in windows) == len(ids)
    assert [t for _, c in windows for t in c] == ids
    # whole text in one window: log p(text | <|endoftext|>) by hand
    (total,) = engine.loglikelihood_rolling([text])
    want, _ = hand_loglikelihood(engine.model, [engine.tokenizer.endoftext_id], ids)
    assert total == pytest.approx(want, abs=1e-3)
    # windowed: the sum of each window's hand-computed score (context cut to 8 tokens)
    (total8,) = windowed.loglikelihood_rolling([text])
    seq = [engine.tokenizer.endoftext_id] + ids
    want8 = 0.0
    for s in range(0, len(ids), 8):
        cont = ids[s:s + 8]
        keep = seq[:s + 1][-(8 + 1 - len(cont)):]
        want8 += hand_loglikelihood(engine.model, keep, cont)[0]
    assert total8 == pytest.approx(want8, abs=1e-3)


def test_generate_is_greedy_and_honours_stop_strings(engine: PLMEvalModel) -> None:
    from plm.infer.generate import GenerationConfig, generate

    prompts = ["Question: 1 + 1?\nAnswer:", "def f(x):\n    return"]
    ours = engine.generate(prompts, max_new_tokens=12)
    ref = generate(engine.model, engine.tokenizer, prompts, GenerationConfig(max_new_tokens=12)).texts
    assert ours == ref
    stop = ours[0][3:6]
    cut = engine.generate(prompts[:1], max_new_tokens=12, stop=[stop])[0]
    assert stop not in cut and ours[0].startswith(cut)


# ---- multiple-choice scoring --------------------------------------------------------------
class RiggedLM:
    """Log-likelihood favours continuations containing ``favourite``; everything else scores
    by length (so acc_norm and acc can disagree)."""

    def __init__(self, favourite: str, per_char: float = -1.0) -> None:
        self.favourite, self.per_char, self.seen = favourite, per_char, []

    def loglikelihood(self, requests, desc=None):
        self.seen.extend(requests)
        return [(0.0 if self.favourite in cont else self.per_char * len(cont), False) for _, cont in requests]


def _examples(n: int = 6) -> list[MCExample]:
    return [MCExample(f"Question: q{i}\nAnswer:", [f"opt{k}" for k in range(4)], gold=i % 4, id=str(i))
            for i in range(n)]


def test_mc_picks_the_option_a_rigged_model_favours() -> None:
    task = MC_TASKS["arc_easy"]
    exs = _examples(8)
    for k in range(4):
        metrics, samples = evaluate_mc(RiggedLM(f"opt{k}"), task, exs)
        assert [s["pred"] for s in samples] == [k] * 8
        assert metrics["acc"] == pytest.approx(sum(e.gold == k for e in exs) / 8)
    lm = RiggedLM("nothing")  # every choice the same length and score: the first wins ties
    evaluate_mc(lm, task, exs[:1])
    assert lm.seen == [("Question: q0\nAnswer:", f" opt{k}") for k in range(4)]


def test_acc_norm_divides_by_choice_length() -> None:
    class ShortBiased:
        # raw log-likelihood prefers the short choice; per character the long one is better
        def loglikelihood(self, requests, desc=None):
            return [(-2.0 if cont == " no" else -6.0, False) for _, cont in requests]

    ex = MCExample("Q?", ["no", "a much longer answer"], gold=1)
    metrics, samples = evaluate_mc(ShortBiased(), MC_TASKS["piqa"], [ex])
    assert samples[0]["pred"] == 0 and samples[0]["pred_norm"] == 1
    assert metrics == {"acc": 0.0, "acc_norm": 1.0, "n": 1, "num_fewshot": 0}


def test_mc_on_the_real_model_agrees_with_hand_computation(engine: PLMEvalModel) -> None:
    task: MCTask = MC_TASKS["arc_easy"]
    exs = [convert_normalised({"query": "Question: Which one is an animal?\nAnswer:",
                               "choices": ["a dog", "the number seven", "blue", "a rock"], "gold": 0}),
           convert_normalised({"query": "Question: 3 + 4 =\nAnswer:", "choices": ["7", "8", "12"], "gold": 0})]
    metrics, samples = evaluate_mc(engine, task, exs)
    for ex, s in zip(exs, samples):
        hand = [hand_loglikelihood(engine.model, *engine.encode_pair(ex.query, " " + c))[0] for c in ex.choices]
        assert s["loglikelihoods"] == pytest.approx(hand, abs=1e-3)
        assert s["pred"] == max(range(len(hand)), key=hand.__getitem__)
        normed = [h / len(c) for h, c in zip(hand, ex.choices)]
        assert s["pred_norm"] == max(range(len(normed)), key=normed.__getitem__)
    assert metrics["n"] == 2


def test_choices_after_one_prompt_share_a_forward_pass(engine: PLMEvalModel) -> None:
    ctx = "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    pairs = [(ctx, f" {c}") for c in "ABCD"] + [(ctx, " B and more")]
    calls = []
    handle = engine.model.model.register_forward_hook(lambda m, a, out: calls.append(tuple(a[0].shape)))
    try:
        got = engine.loglikelihood(pairs)
    finally:
        handle.remove()
    assert len(calls) == 1 and calls[0][0] == 2  # four letters share one input; the long answer has its own
    for (context, continuation), (lp, _) in zip(pairs, got):
        assert lp == pytest.approx(hand_loglikelihood(engine.model, *engine.encode_pair(context, continuation))[0],
                                   abs=1e-3)
