"""Generation: cached decoding equals recomputation, sampling controls, stops, batching."""
import pytest
import torch

from plm.errors import PLMError
from plm.infer.generate import (GenerationConfig, apply_repetition_penalty, generate_tokens, model_step_fn,
                                recompute_step_fn, sample_next)


def _run(step, prompts, cfg, **kw):
    out = [[] for _ in prompts]
    for r, t in generate_tokens(step, prompts, cfg, **kw):
        out[r].append(t)
    return out


@pytest.mark.slow
def test_cached_equals_recompute_batched(small_model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [100, 200, 300, 400]]
    cfg = GenerationConfig(max_new_tokens=20)
    cached = _run(model_step_fn(small_model), prompts, cfg)
    recomputed = _run(recompute_step_fn(small_model), prompts, cfg)
    assert cached == recomputed and all(len(c) == 20 for c in cached)


def test_batch_equals_single(small_model):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    cfg = GenerationConfig(max_new_tokens=12)
    batched = _run(model_step_fn(small_model), prompts, cfg)
    for p, b in zip(prompts, batched):
        assert _run(model_step_fn(small_model), [p], cfg)[0] == b


@pytest.mark.slow
def test_finished_rows_leave_the_batch(small_model):
    """Rows that stop early are dropped from the batch and the cache: the others' tokens are
    exactly those of a batch that keeps decoding pads for them, and of each prompt alone."""
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [100, 200, 300, 400], [7, 7]]
    free = _run(model_step_fn(small_model), prompts, GenerationConfig(max_new_tokens=16))
    stop = free[1][2]  # row 1 stops at its first `stop` (others may stop too, at theirs)
    cfg = GenerationConfig(max_new_tokens=16, stop_token_ids=[stop])
    step = model_step_fn(small_model)
    kept = []
    orig = step.select
    step.select = lambda index: (kept.append(len(index)), orig(index))
    shrunk = _run(step, prompts, cfg)
    plain_step = model_step_fn(small_model)
    padded = _run(lambda ids, mask: plain_step(ids, mask), prompts, cfg)  # no `select`: pads decoded
    assert shrunk == padded and shrunk[1] == free[1][:free[1].index(stop)] and kept and min(kept) < len(prompts)
    for p, got in zip(prompts, shrunk):
        assert _run(model_step_fn(small_model), [p], cfg)[0] == got


@pytest.mark.slow
def test_sampling_is_seeded_and_cached_equals_recompute(small_model):
    cfg = GenerationConfig(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = _run(model_step_fn(small_model), [[1, 2, 3]], cfg)
    b = _run(recompute_step_fn(small_model), [[1, 2, 3]], cfg)
    assert a == b


def test_stop_token_ends_row(small_model):
    greedy = _run(model_step_fn(small_model), [[5, 6, 7]], GenerationConfig(max_new_tokens=10))[0]
    stop = greedy[3]
    cfg = GenerationConfig(max_new_tokens=10, stop_token_ids=[stop])
    got = _run(model_step_fn(small_model), [[5, 6, 7]], cfg)[0]
    assert got == greedy[:greedy.index(stop)]


def test_stop_string(small_model):
    decode = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    greedy = _run(model_step_fn(small_model), [[5, 6, 7]], GenerationConfig(max_new_tokens=10))[0]
    target = decode(greedy[2:4])
    cfg = GenerationConfig(max_new_tokens=10, stop_strings=[target])
    got = _run(model_step_fn(small_model), [[5, 6, 7]], cfg, decode=decode)[0]
    assert target in decode(got) and len(got) <= 4


def test_sample_next_rules():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert sample_next(logits, GenerationConfig()).item() == 1
    g = torch.Generator().manual_seed(0)
    # top-k 1 and a tiny top-p are greedy whatever the temperature
    assert all(sample_next(logits, GenerationConfig(temperature=5.0, top_k=1), g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, GenerationConfig(temperature=5.0, top_p=0.01), g).item() == 1 for _ in range(20))
    # top-k 2 never picks outside the two best
    picks = {sample_next(logits, GenerationConfig(temperature=10.0, top_k=2), g).item() for _ in range(200)}
    assert picks == {1, 2}
    # top-p: probabilities of [3, 2, 1, 0.5] are .61 .22 .08 .05 (+.03); p=0.7 keeps the two best
    picks = {sample_next(logits, GenerationConfig(temperature=1.0, top_p=0.7), g).item() for _ in range(300)}
    assert picks == {1, 2}
    # a large vocabulary (the top-p candidates path): probabilities ~.665 .245 .090 for ids 7, 500,
    # 999; p=0.8 keeps 7 and 500, in the ratio .665 : .245 (7 drawn 73% of the time)
    big = torch.full((1, 1000), -30.0)
    big[0, 7], big[0, 500], big[0, 999] = 3.0, 2.0, 1.0
    draws = [sample_next(big, GenerationConfig(temperature=1.0, top_p=0.8), g).item() for _ in range(2000)]
    assert set(draws) == {7, 500} and abs(draws.count(7) / 2000 - 0.665 / 0.91) < 0.04
    # a nucleus wider than the candidates: uniform over 200 ids, p=0.9 keeps 180 of them
    flat = {sample_next(torch.zeros(1, 200), GenerationConfig(temperature=1.0, top_p=0.9), g).item() for _ in range(3000)}
    assert 150 < len(flat) <= 180
    # min-p: logits [1, 3, 2, 0.5, -1] give probabilities .084 .624 .229 .051 .011; min_p 0.3
    # keeps those >= .187: ids 1 and 2, drawn in the ratio .624 : .229 (1 in 73.1% of draws); at
    # temperature 2 (.154 .417 .253 .120 .057) it keeps >= .125: ids 1, 2, 0; min_p 1 is greedy
    five = torch.tensor([[1.0, 3.0, 2.0, 0.5, -1.0]])
    draws = [sample_next(five, GenerationConfig(temperature=1.0, min_p=0.3), g).item() for _ in range(2000)]
    assert set(draws) == {1, 2} and abs(draws.count(1) / 2000 - 0.7311) < 0.04
    hot = {sample_next(five, GenerationConfig(temperature=2.0, min_p=0.3), g).item() for _ in range(500)}
    assert hot == {0, 1, 2}
    assert all(sample_next(five, GenerationConfig(temperature=5.0, min_p=1.0), g).item() == 1 for _ in range(20))
    # with top-p the two filters intersect: top_p 0.95 keeps 1, 2, 0, 3; min_p 0.3 of those 1, 2
    both = {sample_next(five, GenerationConfig(temperature=1.0, top_p=0.95, min_p=0.3), g).item() for _ in range(500)}
    assert both == {1, 2}
    big = torch.full((1, 1000), -30.0)  # and on the top-p candidates path
    big[0, 7], big[0, 500], big[0, 999] = 3.0, 2.0, 1.0
    assert {sample_next(big, GenerationConfig(temperature=1.0, top_p=0.99, min_p=0.2), g).item()
            for _ in range(500)} == {7, 500}


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0]]


def test_presence_frequency_penalties_and_logit_bias_by_hand():
    from plm.infer.generate import SequencePenalties, penalize
    cfg = GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: -1.0, 9: 100.0})
    counts = torch.tensor([[0.0, 0.0, 2.0, 0.0, 1.0]])  # the reply [2, 2, 4]
    out = penalize(torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]]), cfg, None, counts)
    # token 2: 1 - 0.25 * 2 - 0.5; token 4: 1 - 0.25 - 0.5; token 3: 1 - 1; token 9 lies past V
    assert out.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.25]]
    assert SequencePenalties(cfg, [0, 1])(torch.ones(1, 5), [2, 2, 4]).tolist() == out.tolist()
    # the repetition penalty counts the prompt too
    rep = GenerationConfig(repetition_penalty=2.0)
    want = [[1.0, 2.0, -4.0]]
    assert penalize(torch.tensor([[2.0, 2.0, -2.0]]), rep, torch.tensor([[True, False, True]])).tolist() == want
    assert SequencePenalties(rep, [0])(torch.tensor([[2.0, 2.0, -2.0]]), [2]).tolist() == want


def test_sequence_penalties_equal_the_dense_rule_step_by_step():
    """The server's incremental penalties against `penalize` over dense masks rebuilt from the
    whole prompt and reply at every step: equal bit for bit, however the reply grows."""
    from plm.infer.generate import SequencePenalties, penalize
    g = torch.Generator().manual_seed(0)
    V = 300
    prompt = torch.randint(0, 40, (70,), generator=g).tolist()
    reply = torch.randint(20, 200, (150,), generator=g).tolist()  # repeats, some shared with the prompt
    for cfg in (GenerationConfig(repetition_penalty=1.3), GenerationConfig(frequency_penalty=0.7),
                GenerationConfig(presence_penalty=-0.4, logit_bias={5: 3.0, 299: -2.5}),
                GenerationConfig(repetition_penalty=0.8, frequency_penalty=0.3, presence_penalty=1.1)):
        pen = SequencePenalties(cfg, prompt)
        n = 0
        for grow in [1, 1, 5, 1, 17, 1, 60, 1, 63]:  # a token a step, or several (forced tokens)
            n += grow
            logits = torch.randn(1, V, generator=g) * 4
            seen = torch.zeros(1, V, dtype=torch.bool)
            seen[0, prompt + reply[:n]] = True
            counts = torch.bincount(torch.tensor(reply[:n]), minlength=V)[None].float()
            dense = penalize(logits, cfg, seen if cfg.repetition_penalty != 1.0 else None, counts)
            got = pen(logits, reply[:n])
            assert torch.equal(got, dense), (cfg, n)
            assert not torch.equal(got, logits)
        assert n == len(reply)


def test_generate_tokens_applies_the_frequency_penalty():
    """A step that always prefers token 1 by 1.0: with frequency_penalty 0.6 the greedy choice
    alternates, since one earlier occurrence costs 0.6 and two cost 1.2 (> 1.0)."""
    def step(ids, mask):
        out = torch.zeros(ids.shape[0], ids.shape[1], 4)
        out[..., 1] = 1.0
        return out
    toks = [t for _, t in generate_tokens(step, [[0]], GenerationConfig(max_new_tokens=6, frequency_penalty=0.6))]
    # by hand: 1, 1 (1 - 0.6 > 0), then 0 (1 - 1.2 < 0; ties go to the lowest id), ...
    counts = torch.zeros(4)
    want = []
    for _ in range(6):
        logits = torch.tensor([0.0, 1.0, 0.0, 0.0]) - 0.6 * counts
        t = int(logits.argmax())
        want.append(t)
        counts[t] += 1
    assert toks == want and want[:3] == [1, 1, 0]


def test_bad_settings():
    with pytest.raises(PLMError, match="top_p"):
        GenerationConfig(top_p=0).validate()
    with pytest.raises(PLMError, match="min_p"):
        GenerationConfig(min_p=1.5).validate()
    with pytest.raises(PLMError, match="temperature"):
        GenerationConfig(temperature=-1).validate()
    with pytest.raises(PLMError, match="presence_penalty"):
        GenerationConfig(presence_penalty=float("nan")).validate()
    with pytest.raises(PLMError, match="logit_bias"):
        GenerationConfig(logit_bias={-1: 1.0}).validate()


def test_text_generation_with_tokenizer(qwen2_micro_dir):
    from plm import PLMForCausalLM
    from plm.data.tokenizer import Tokenizer
    from plm.infer.generate import generate
    m, tok = PLMForCausalLM.from_pretrained(qwen2_micro_dir), Tokenizer.from_dir(qwen2_micro_dir)
    pieces = []
    res = generate(m, tok, ["Hello, world", "你好"], GenerationConfig(max_new_tokens=8))
    single = generate(m, tok, "Hello, world", GenerationConfig(max_new_tokens=8), stream=pieces.append)
    assert res.tokens[0] == single.tokens[0]
    assert "".join(pieces) == single.texts[0] == tok.decode(single.tokens[0])
