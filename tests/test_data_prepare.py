"""Data preparation into token shards and mixtures of them, with a byte-level fake tokenizer (id 256 = EOS)."""
import functools
import importlib.util
import json
import random

import numpy as np
import pytest
import torch

import plm.data.prepare as prep
from plm.data.mixture import MixtureLoader, MixturePhase
from plm.data.prepare import Manifest, load_shards, prepare, verify
from plm.errors import PLMError

EOS = 256


class ByteTok:
    """encode(str) only; picklable (module level)."""
    vocab_size = 257
    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class BatchByteTok(ByteTok):
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


class BigVocabTok(ByteTok):
    vocab_size = 100_000
    eos_token_id = 99_999


class CountingTok(ByteTok):
    """Counts documents encoded; optionally crashes after `fail_after` of them."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return super().encode(text)


def stream(docs: list[str], eos: int = EOS) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += list(d.encode("utf-8")) + [eos]
    return out


def all_tokens(out_dir) -> list[int]:
    return [int(t) for m in load_shards(out_dir) for t in m]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("hello world\n")
    (root / "c.py").write_text("print('hi')\n")
    (root / "sub" / "b.md").write_text("# Title\nsome text, caf\u00e9\n")
    (root / "d.jsonl").write_text(
        json.dumps({"text": "first row"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    (root / ".hidden" / "x.txt").write_text("hidden, skipped")
    (root / "data.bin").write_bytes(b"\x00\x01")  # unsupported suffix in a folder: ignored
    # folder order is sorted paths: a.txt, c.py, d.jsonl (2 docs), sub/b.md
    docs = ["hello world\n", "print('hi')\n", "first row", "second", "# Title\nsome text, caf\u00e9\n"]
    return root, docs


def test_prepare_folder_stream_and_manifest(tmp_path, corpus):
    root, docs = corpus
    out = tmp_path / "out"
    m = prepare([str(root)], out, ByteTok(), shard_tokens=16, name="tiny", progress=False)
    expected = stream(docs)
    assert all_tokens(out) == expected
    assert m.complete and m.documents == 5 and m.total_tokens == len(expected)
    assert m.dtype == "uint16" and m.eos_token_id == EOS and m.vocab_size == 257
    assert [s.file for s in m.shards][:2] == ["tiny-00000.bin", "tiny-00001.bin"]
    assert [s.tokens for s in m.shards[:-1]] == [16] * (len(m.shards) - 1)
    assert sum(s.tokens for s in m.shards) == len(expected)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["sources"] == [str(root)] and on_disk["settings"]["shard_tokens"] == 16
    assert all(len(s["sha256"]) == 64 for s in on_disk["shards"])
    assert len(on_disk["tokenizer_fingerprint"]) == 16
    maps = load_shards(out)
    assert isinstance(maps[0], np.memmap) and maps[0].dtype == np.uint16
    assert verify(out).total_tokens == len(expected)


def test_files_globs_and_batch_encoder(tmp_path, corpus):
    root, docs = corpus
    out = tmp_path / "out"
    prepare([str(root / "sub" / "b.md"), str(root / "**" / "*.txt")], out, BatchByteTok(), progress=False)
    assert all_tokens(out) == stream([docs[4], docs[0]])  # glob skips the hidden folder's file


def test_workers_and_factories_match(tmp_path, corpus):
    root, _ = corpus
    ref = prepare([str(root)], tmp_path / "w1", ByteTok(), shard_tokens=8, progress=False)
    ref_sums = [s.sha256 for s in ref.shards]
    for i, tok in enumerate([ByteTok(), ByteTok, functools.partial(BatchByteTok)]):
        m = prepare([str(root)], tmp_path / f"w2-{i}", tok, shard_tokens=8, workers=2, progress=False)
        assert [s.sha256 for s in m.shards] == ref_sums


def test_uint32_for_large_vocab(tmp_path, corpus):
    root, docs = corpus
    m = prepare([str(root / "a.txt")], tmp_path / "out", BigVocabTok(), progress=False)
    assert m.dtype == "uint32"
    assert all_tokens(tmp_path / "out") == stream(docs[:1], eos=99_999)


def test_dedup(tmp_path):
    src = tmp_path / "d.jsonl"
    rows = ["alpha", "beta", "alpha", "gamma", "beta", "   "]
    src.write_text("".join(json.dumps({"body": r}) + "\n" for r in rows))
    m = prepare([str(src)], tmp_path / "dd", ByteTok(), text_field="body", dedup=True, progress=False)
    assert all_tokens(tmp_path / "dd") == stream(["alpha", "beta", "gamma"])
    assert (m.documents, m.duplicates_removed, m.empty_skipped) == (3, 2, 1)
    m2 = prepare([str(src)], tmp_path / "nodd", ByteTok(), text_field="body", progress=False)
    assert m2.documents == 5


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(5, 50))) + f"#{i}" for i in range(n)]


def test_resume_after_crash_skips_finished_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_DOCS", 16)  # small tasks so shards finish before the crash
    docs = make_docs(200)
    docs[150] = docs[10]  # one duplicate, to check dedup state survives the resume
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    fresh = prepare([str(src)], tmp_path / "fresh", ByteTok(), shard_tokens=500, dedup=True, progress=False)

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare([str(src)], out, CountingTok(fail_after=120), shard_tokens=500, dedup=True, progress=False)
    partial = Manifest.load(out)
    assert not partial.complete and len(partial.shards) >= 3
    kept = {s.file: (out / s.file).stat().st_mtime_ns for s in partial.shards}

    tok = CountingTok()
    m = prepare([str(src)], out, tok, shard_tokens=500, dedup=True, progress=False)
    # Only documents after the last finished shard were tokenised again (less the duplicate,
    # plus one call for the tokenizer fingerprint's probe text).
    assert tok.calls == 1 + (200 - 1 - partial.shards[-1].next_doc)
    assert all((out / f).stat().st_mtime_ns == t for f, t in kept.items())
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in fresh.shards]
    assert (m.documents, m.duplicates_removed, m.total_tokens) == (fresh.documents, 1, fresh.total_tokens)
    assert all_tokens(out) == all_tokens(tmp_path / "fresh")


def test_resume_rebuilds_corrupt_and_missing_shards(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(60)))
    out = tmp_path / "out"
    m = prepare([str(src)], out, CountingTok(), shard_tokens=200, progress=False)
    sums = [s.sha256 for s in m.shards]
    assert len(sums) >= 5
    first = (out / m.shards[0].file).stat().st_mtime_ns

    tok = CountingTok()
    assert prepare([str(src)], out, tok, shard_tokens=200, progress=False).complete
    assert tok.calls == 1  # complete and verified: only the fingerprint probe was encoded

    raw = bytearray((out / m.shards[2].file).read_bytes())
    raw[0] ^= 0xFF
    (out / m.shards[2].file).write_bytes(bytes(raw))
    (out / m.shards[4].file).unlink()
    with pytest.raises(PLMError, match=m.shards[2].file):
        verify(out)
    m2 = prepare([str(src)], out, tok, shard_tokens=200, progress=False)
    assert [s.sha256 for s in m2.shards] == sums
    assert (out / m.shards[0].file).stat().st_mtime_ns == first
    assert 1 < tok.calls < 60
    verify(out)


def test_other_settings_into_same_dir_refused(tmp_path, corpus):
    root, _ = corpus
    out = tmp_path / "out"
    prepare([str(root)], out, ByteTok(), shard_tokens=16, progress=False)
    with pytest.raises(PLMError, match="shard_tokens"):
        prepare([str(root)], out, ByteTok(), shard_tokens=32, progress=False)
    with pytest.raises(PLMError, match="tokenizer_fingerprint"):
        prepare([str(root)], out, BigVocabTok(), shard_tokens=16, progress=False)


def test_errors(tmp_path):
    tok = ByteTok()
    with pytest.raises(PLMError, match="nope.txt: no such file"):
        prepare([str(tmp_path / "nope.txt")], tmp_path / "o1", tok, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PLMError, match="empty: folder holds no"):
        prepare([str(tmp_path / "empty")], tmp_path / "o2", tok, progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    with pytest.raises(PLMError, match="no documents"):
        prepare([str(tmp_path / "blank")], tmp_path / "o3", tok, progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(PLMError, match=r"bad\.jsonl:2: no field 'text'"):
        prepare([str(bad)], tmp_path / "o4", tok, progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(PLMError, match=r"broken\.jsonl:2: not valid JSON"):
        prepare([str(broken)], tmp_path / "o5", tok, progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(PLMError, match="latin.txt: not valid UTF-8"):
        prepare([str(latin)], tmp_path / "o6", tok, progress=False)
    with pytest.raises(PLMError, match="unsupported file type"):
        prepare([str(_touch(tmp_path / "x.csv"))],
                tmp_path / "o7", tok, progress=False)
    with pytest.raises(PLMError, match="matches no"):
        prepare([str(tmp_path / "*.rst")], tmp_path / "o8", tok, progress=False)
    with pytest.raises(PLMError, match="no manifest.json"):
        load_shards(tmp_path / "o8")
    with pytest.raises(PLMError, match="neither encode nor encode_batch"):
        prepare([str(latin)], tmp_path / "o9", object(), progress=False)

    class NoEos:
        vocab_size = 10

        def encode(self, text):
            return [1]

    with pytest.raises(PLMError, match="eos_token_id"):
        prepare([str(latin)], tmp_path / "o10", NoEos(), progress=False)


def _touch(path):
    path.write_text("a,b\n")
    return path


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is not None, reason="pyarrow installed")
def test_parquet_without_pyarrow(tmp_path):
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1")
    with pytest.raises(PLMError, match=r"x\.parquet: reading Parquet needs pyarrow.*datasets"):
        prepare([str(pq)], tmp_path / "o", ByteTok(), progress=False)


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["one", "two"]}), tmp_path / "x.parquet")
    prepare([str(tmp_path / "x.parquet")], tmp_path / "o", ByteTok(), text_field="content", progress=False)
    assert all_tokens(tmp_path / "o") == stream(["one", "two"])
    with pytest.raises(PLMError, match="no column 'text'"):
        prepare([str(tmp_path / "x.parquet")], tmp_path / "o2", ByteTok(), progress=False)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets installed")
def test_hf_source_without_datasets(tmp_path):
    with pytest.raises(PLMError, match="hf:org/name:cfg: .*datasets"):
        prepare(["hf:org/name:cfg"], tmp_path / "o", ByteTok(), progress=False)


# ---- mixtures of prepared sources ---------------------------------------------------------

SEQ = 16


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three prepared sources; every doc is letter + 5 digits, so a window names its source."""
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for letter, n_docs in (("w", 400), ("c", 300), ("m", 200)):
        src = root / f"{letter}.jsonl"
        src.write_text("".join(json.dumps({"text": f"{letter}{i:05d}"}) + "\n" for i in range(n_docs)))
        # small shards: windows straddle shard boundaries
        prepare([str(src)], root / letter, ByteTok(), shard_tokens=100, progress=False)
        out[letter] = str(root / letter)
    return out


def source_of(row: torch.Tensor) -> str:
    letters = {chr(int(t)) for t in row if chr(int(t)) in "wcm"} if len(row) else set()
    assert len(letters) == 1, row
    return letters.pop()


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))



def test_mixture_proportions_and_shift(sources):
    weights = {"w": 0.6, "c": 0.3, "m": 0.1}
    loader = MixtureLoader({k: (sources[k], weights[k]) for k in weights}, SEQ, 8, seed=1)
    counts = {k: 0 for k in weights}
    for _ in range(400):
        x, y = next(loader)
        assert x.shape == y.shape == (8, SEQ) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], dim=1):
            counts[source_of(row)] += 1
    realised = loader.realised_proportions()
    for k, w in weights.items():
        assert abs(realised[k] - w) < 0.03, realised
        assert realised[k] == pytest.approx(counts[k] / 3200)


def test_mixture_covers_each_epoch_once(sources):
    loader = MixtureLoader({"m": (sources["m"], 1.0)}, SEQ, 1, seed=3)
    stream_m = np.concatenate(load_shards(sources["m"])).astype(np.int64)
    n = len(stream_m) // (SEQ + 1)
    seen = set()
    for _ in range(n):
        x, y = next(loader)
        row = torch.cat([x[0], y[0, -1:]]).numpy()
        start = int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream_m, SEQ + 1) == row, axis=1))[0])
        assert start % (SEQ + 1) == 0
        seen.add(start // (SEQ + 1))
    assert seen == set(range(n))


def test_mixture_deterministic(sources):
    spec = {"w": (sources["w"], 2.0), "c": (sources["c"], 1.0)}
    a = take(MixtureLoader(spec, SEQ, 4, seed=5), 20)
    b = take(MixtureLoader(dict(reversed(list(spec.items()))), SEQ, 4, seed=5), 20)
    assert same(a, b)
    assert not same(a, take(MixtureLoader(spec, SEQ, 4, seed=6), 20))


def test_mixture_resume_is_exact(sources):
    spec = {k: (v, w) for (k, v), w in zip(sources.items(), (0.5, 0.3, 0.2))}
    first = MixtureLoader(spec, SEQ, 8, seed=7)
    take(first, 80)  # past an epoch boundary of every source
    state = json.loads(json.dumps(first.state_dict()))
    assert min(s["epoch"] for s in state["sources"].values()) >= 1
    expected = take(first, 30)
    resumed = MixtureLoader(spec, SEQ, 8, seed=7)
    resumed.load_state_dict(state)
    assert same(take(resumed, 30), expected)
    assert resumed.realised_proportions() == first.realised_proportions()
    with pytest.raises(PLMError, match="seq_len"):
        MixtureLoader(spec, SEQ + 1, 8, seed=7).load_state_dict(state)
    with pytest.raises(PLMError, match="global_batch"):
        MixtureLoader(spec, SEQ, 4, seed=7).load_state_dict(state)


def test_mixture_ranks_partition_the_global_batch(sources):
    spec = {k: (v, 1.0) for k, v in sources.items()}
    single = take(MixtureLoader(spec, SEQ, 8, seed=11), 12)
    ranks = [MixtureLoader(spec, SEQ, 2, seed=11, rank=r, world_size=4) for r in range(4)]
    per_rank = [take(r, 12) for r in ranks]
    for k in range(12):
        xs = torch.cat([per_rank[r][k][0] for r in range(4)])
        ys = torch.cat([per_rank[r][k][1] for r in range(4)])
        assert torch.equal(xs, single[k][0]) and torch.equal(ys, single[k][1])
        # disjoint: every row of the global batch is a distinct window
        assert len({tuple(row.tolist()) for row in xs}) == 8
    # every rank holds the same state, so any one can resume a run at another world size
    assert all(r.state_dict() == ranks[0].state_dict() for r in ranks)
    two = MixtureLoader(spec, SEQ, 4, seed=11, rank=1, world_size=2)
    two.load_state_dict(ranks[0].state_dict())
    single_loader = MixtureLoader(spec, SEQ, 8, seed=11)
    single_loader.load_state_dict(ranks[0].state_dict())
    assert torch.equal(next(two)[0], next(single_loader)[0][4:])


def test_mixture_errors(sources, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PLMError, match="'e'.*no manifest.json"):
        MixtureLoader({"w": (sources["w"], 1.0), "e": (str(tmp_path / "empty"), 1.0)}, SEQ, 2)
    with pytest.raises(PLMError, match="all source weights are zero"):
        MixtureLoader({"w": (sources["w"], 0.0), "c": (sources["c"], 0)}, SEQ, 2)
    with pytest.raises(PLMError, match="'c': weight"):
        MixtureLoader({"w": (sources["w"], 1.0), "c": (sources["c"], -1.0)}, SEQ, 2)
    with pytest.raises(PLMError, match="fewer than seq_len"):
        MixtureLoader({"m": (sources["m"], 1.0)}, 100_000, 2)
    with pytest.raises(PLMError, match="rank"):
        MixtureLoader({"m": (sources["m"], 1.0)}, SEQ, 2, rank=2, world_size=2)
    with pytest.raises(PLMError, match="no sources"):
        MixtureLoader({}, SEQ, 2)
    # a zero weight alone is allowed: that source is never drawn
    loader = MixtureLoader({"w": (sources["w"], 1.0), "c": (sources["c"], 0.0)}, SEQ, 4)
    take(loader, 5)
    assert loader.realised_proportions() == {"c": 0.0, "w": 1.0}


def test_phase(sources):
    phase = MixturePhase.from_dict({"name": "p1", "token_budget": 10_000,
                                    "sources": {"w": {"dir": sources["w"], "weight": 3}, "m": [sources["m"], 1]}})
    assert phase.steps(SEQ, 8) == 79  # ceil(10000 / 128)
    x, _ = next(phase.loader(SEQ, 8, seed=0))
    assert x.shape == (8, SEQ)
    with pytest.raises(PLMError, match="token_budget"):
        MixturePhase.from_dict({"name": "p2", "sources": {}})
