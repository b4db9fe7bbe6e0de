"""WikiText-2: the loader on the real files, checksums, the canonical download from a local HTTP
server, the tied adaptive softmax against a full softmax, and the task's segments, perplexity
convention and a two-step training run."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cdeq import data, tasks
from cdeq.data import __main__ as data_cli
from cdeq.data import wikitext
from cdeq.data.sources import ChecksumError, DataUnavailableError
from cdeq.models.transformer import AdaptiveIO, AdaptiveTransformer, DEQTransformer
from cdeq.models import num_parameters
from test_data_sources import _Server

FILES = data.REGISTRY["wikitext-2"].files.files
COUNTS = {"train": 2_088_628, "valid": 217_646, "test": 245_569}
LINES = {"train": 36_718, "valid": 3_760, "test": 4_358}
VOCAB = 33_278


def _shared() -> Path:
    shared = data.shared_root()
    if shared is None or not all((shared / "wikitext-2" / n).is_file() for n in FILES):
        pytest.skip("the shared WikiText-2 copy (../shared/data/wikitext-2) is not present")
    return shared / "wikitext-2"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CDEQ_CACHE", str(root))
    return root


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def corpus() -> data.TextData:
    _shared()
    return data.load("wikitext-2")


def test_real_files_counts_vocabulary_and_eos(corpus, cache) -> None:
    fresh = wikitext.read_wikitext2(_shared())  # read afresh into the empty cache, then from it
    assert list((cache / "wikitext-2").glob("tokens-v*.pt"))
    for d in (corpus, fresh):
        assert {s: getattr(d, s).numel() for s in COUNTS} == COUNTS
        assert len(d.vocab) == VOCAB and d.vocab[:3] == ["<unk>", "<eos>", "the"]
    assert torch.equal(corpus.test, fresh.test) and corpus.vocab == fresh.vocab
    eos = corpus.vocab.index("<eos>")
    assert {s: int((getattr(corpus, s) == eos).sum()) for s in COUNTS} == LINES
    first = (_shared() / "train.txt").read_text(encoding="utf-8").split("\n")[:3]  # " ", " = Valkyria ... = ", " "
    expected = ["<eos>"] + first[1].split() + ["<eos>", "<eos>"]
    assert [corpus.vocab[i] for i in corpus.train[: len(expected)]] == expected
    counts = torch.bincount(corpus.train, minlength=VOCAB)[2:]
    assert bool((counts[:-1] >= counts[1:]).all())  # ids in falling frequency, as the cut-offs need


def test_unknown_words_map_to_unk_with_a_count(tmp_path, cache) -> None:
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "train.txt").write_text(" a b a <unk> \n \n b c \n")
    (folder / "valid.txt").write_text(" a zz \n")
    (folder / "test.txt").write_text(" c b a")  # no final newline: still one line
    with pytest.warns(UserWarning, match=r"wikitext-2 valid: 1 of 3 tokens are not in the training vocabulary"):
        d = wikitext.read_wikitext2(folder)
    assert d.vocab == ["<unk>", "<eos>", "a", "b", "c"]
    assert d.train.tolist() == [2, 3, 2, 0, 1, 1, 3, 4, 1]
    assert d.valid.tolist() == [2, 0, 1] and d.test.tolist() == [4, 3, 2, 1]


def test_checksum_failure_names_the_file(tmp_path, cache) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    for name in FILES:
        shutil.copyfile(_shared() / name, root / name)
    body = (root / "valid.txt").read_bytes()
    (root / "valid.txt").write_bytes(body[:100] + b"X" + body[101:])
    with pytest.raises(ChecksumError) as err:
        data.load("wikitext-2", root=root)
    assert "valid.txt" in str(err.value) and FILES["valid.txt"].sha256 in str(err.value)


def test_canonical_download_from_a_local_server(server, cache, monkeypatch) -> None:
    assert data.describe("wikitext-2").sources[-1].where.startswith("https://raw.githubusercontent.com/pytorch/examples/")
    for name in FILES:
        server.routes[f"/wt2/{name}"] = ((_shared() / name).read_bytes(), "ok")
    monkeypatch.setenv("CDEQ_DATA_SOURCES", "cache,url")
    monkeypatch.setenv("CDEQ_URL_WIKITEXT_2", f"{server.url}/wt2/")
    good = server.routes["/wt2/test.txt"][0]
    server.routes["/wt2/test.txt"] = (good[:-1] + b"!", "ok")
    with pytest.raises(DataUnavailableError, match=r"test\.txt: SHA-256 mismatch"):
        data.fetch("wikitext-2")
    assert not (cache / "wikitext-2").exists()
    server.routes["/wt2/test.txt"] = (good, "ok")
    assert data_cli.main(["fetch", "wikitext-2"]) == 0
    assert sorted(p.name for p in (cache / "wikitext-2").iterdir()) == sorted(FILES)


def test_adaptive_softmax_equals_a_full_softmax_when_every_word_is_in_the_head() -> None:
    # With one cluster of one word, the cluster's head logit is that word's logit: the adaptive
    # softmax is then a full softmax whose weights are the head's rows.
    torch.manual_seed(0)
    vocab, d = 12, 8
    io = AdaptiveIO(vocab, d, max_len=5, cutoffs=[vocab - 1])
    h = torch.randn(3, 5, d)
    y = torch.randint(0, vocab, (3, 5))
    y[0, :2] = -100
    full = F.log_softmax(h @ io.softmax.head.weight.T, dim=-1)
    assert torch.allclose(io.log_prob(h), full, atol=1e-5)
    keep = y != -100
    assert torch.allclose(io.nll(h, y), F.nll_loss(full[keep], y[keep]), atol=1e-5)
    # Tied input: head words are the head's rows, times sqrt(d), plus the position.
    x = torch.randint(0, vocab - 1, (2, 5))
    expected = io.softmax.head.weight[x] * math.sqrt(d) + io.pos[:5]
    assert torch.allclose(io(x), expected)


def test_adaptive_clusters_tied_words_and_normalised_readout() -> None:
    torch.manual_seed(0)
    model = DEQTransformer(50, d_model=16, n_heads=2, d_ff=32, max_len=8, cutoffs=(10, 30), weight_norm=False)
    io = model.embed
    proj, table = io.softmax.tail[1]
    assert torch.allclose(io.words(torch.tensor([42])), table.weight[[12]] @ proj.weight)
    z = torch.randn(2, 8, 16)
    y = torch.randint(0, 50, (2, 8))
    log_probs = model.readout(z)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(2, 8), atol=1e-5)
    nll = -log_probs.gather(-1, y.unsqueeze(-1)).mean()
    assert torch.allclose(model.lm_loss(z, y), nll, atol=1e-5)
    explicit = AdaptiveTransformer(50, (10, 30), d_model=16, n_heads=2, d_ff=32, max_len=8)
    assert num_parameters(explicit) == num_parameters(model)
    with pytest.raises(ValueError, match=r"cutoffs: expected increasing ids between 1 and vocab_size - 1 = 49"):
        AdaptiveIO(50, 16, 8, cutoffs=[30, 10])


@pytest.fixture(scope="module")
def task(corpus) -> tasks.Task:
    return tasks.get("wikitext-2", preset="tiny")


def test_segments_predict_every_test_token_once(task) -> None:
    stream = task.streams["test"]
    batches = list(task.batches("test", batch_size=512, seq_len=100))  # 245,568 targets: the last row is padded
    assert torch.equal(torch.cat([y[y != -100] for _, y in batches]), stream[1:])
    last_x, last_y = batches[-1][0][-1], batches[-1][1][-1]
    assert int(last_x.min()) >= 0 and int((last_y == -100).sum()) == 100 - (len(stream) - 1) % 100
    x, y = next(task.batches("test", batch_size=2, seq_len=4))
    assert torch.equal(x, stream[:8].view(2, 4)) and torch.equal(y, stream[1:9].view(2, 4))


def test_perplexity_convention(task, monkeypatch) -> None:
    monkeypatch.setitem(task.streams, "test", task.streams["test"][:1001])
    uniform = torch.full((1, 1, task.vocab_size), -math.log(task.vocab_size))
    ppl = task.evaluate(lambda x: uniform.expand(*x.shape, -1), "test", batch_size=4)
    assert ppl == pytest.approx(task.vocab_size, rel=1e-6)  # log V held in float32
    ev = task.last_evaluation
    assert ev["targets"] == 1000 and ev["whole_split"] and ev["seq_len"] == 16
    task.evaluate(lambda x: uniform.expand(*x.shape, -1), "test", batch_size=4, limit=2)
    assert task.last_evaluation["targets"] == 128 and not task.last_evaluation["whole_split"]


def test_tiny_teacher_and_explicit_two_steps(task, tmp_path) -> None:
    metrics = task.train_teacher(tmp_path / "teacher", preset="tiny", progress=False)
    assert math.isfinite(metrics["test"]["perplexity"]) and metrics["test"]["perplexity"] > 1
    teacher = task.load_teacher(tmp_path / "teacher")
    assert teacher.embed.softmax.cutoffs == [2000, 10000, task.vocab_size]
    x, y = next(task.batches("train", batch_size=2))
    loss, logs = task.teacher_step(teacher.train(), (x, y), task.recipe())
    assert loss.requires_grad and {"nfe", "rel_residual", "jac"} <= set(logs)
    explicit = task.train_explicit(tmp_path / "explicit", preset="tiny", progress=False)
    assert math.isfinite(explicit["test"]["perplexity"])


def test_state_score_through_the_adaptive_loss_equals_the_full_log_probabilities(task) -> None:
    """The evaluation's cheap path (the adaptive softmax's own loss) and the readout's full
    log-probabilities give the same perplexity."""
    torch.manual_seed(0)
    teacher = task.build_teacher("tiny").eval()
    states = lambda x: teacher.equilibrium(x)[0]  # noqa: E731
    with torch.no_grad():
        cheap = task.evaluate(states, "test", limit=2, score=lambda z, y: task.state_score(teacher, z, y))
        full = task.evaluate(lambda x: teacher.readout(states(x)), "test", limit=2)
    assert cheap == pytest.approx(full, rel=1e-5)
