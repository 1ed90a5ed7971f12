"""knn_utils/knnlm.py: the interpolation formula by hand, and the evaluation on a tiny GPT-2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from knn_utils import knnlm
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.saveKNNMulti import main as save_knn_main
from tests.knn_fixtures import accelerate_launch, make_tokenizer, random_datastore, tiny_lm  # noqa: F401  (tiny_lm is a fixture)
from utils.arguments import DataArguments, ModelArguments
from utils.cli import UsageError

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def indexed_lm(tiny_lm):
    """The tiny LM's datastore with an exact index."""
    build_index(str(tiny_lm["dstore"]), settings=IndexSettings(index_type="flat"), show_progress=False)
    return tiny_lm


def test_formula_matches_a_hand_computation():
    lm_logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    dists = torch.tensor([[1.0, 2.0, 4.0]])
    vals = torch.tensor([[1, 3, 1]])
    got = knnlm.knnlm_log_probs(lm_logits, dists, vals, lmbda=0.25, knn_temp=2.0)

    p_lm = np.exp([1.0, 2.0, 0.5, -1.0]) / np.exp([1.0, 2.0, 0.5, -1.0]).sum()
    w = np.exp([-0.5, -1.0, -2.0]) / np.exp([-0.5, -1.0, -2.0]).sum()
    p_knn = np.array([0.0, w[0] + w[2], 0.0, w[1]])
    np.testing.assert_allclose(got[0].exp().numpy(), 0.75 * p_lm + 0.25 * p_knn, rtol=1e-6)
    assert got.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_lmbda_zero_is_the_base_lm_exactly_and_one_is_knn_alone():
    torch.manual_seed(0)
    lm_logits = torch.randn(5, 11)
    dists = torch.rand(5, 4) * 10
    vals = torch.randint(0, 11, (5, 4))
    base = torch.log_softmax(lm_logits, dim=-1)
    assert torch.equal(knnlm.knnlm_log_probs(lm_logits, dists, vals, lmbda=0.0, knn_temp=1.0), base)
    knn_only = knnlm.knnlm_log_probs(lm_logits, dists, vals, lmbda=1.0, knn_temp=1.0)
    assert torch.equal(knn_only, knnlm.knn_log_probs(dists, vals, 11, 1.0))
    assert torch.isinf(knn_only).any() and not torch.isnan(knn_only).any()


def test_missing_neighbours_weigh_nothing_and_a_row_without_any_keeps_the_lm():
    lm_logits = torch.randn(2, 6)
    dists = torch.tensor([[1.0, math.inf], [math.inf, math.inf]])
    vals = torch.tensor([[2, 0], [0, 0]])
    got = knnlm.knnlm_log_probs(lm_logits, dists, vals, lmbda=0.5, knn_temp=1.0)
    lm = torch.log_softmax(lm_logits, dim=-1)
    expected_first = torch.log(0.5 * lm[0].exp() + 0.5 * torch.nn.functional.one_hot(torch.tensor(2), 6))
    torch.testing.assert_close(got[0], expected_first)
    assert torch.equal(got[1], lm[1])


def run_knnlm(tiny_lm, tmp_path, split="test", **overrides) -> dict:
    settings = {"dstore_dir": str(tiny_lm["dstore"]), "output_dir": str(tmp_path), "k": 8, "per_device_eval_batch_size": 4}
    args = knnlm.KnnLMArguments(**{**settings, **overrides})
    return knnlm.evaluate_knnlm(ModelArguments(model_name_or_path=str(tiny_lm["model"])),
                                DataArguments(dataset_name=str(tiny_lm["data"]), eval_subset=split), args)


def test_lmbda_zero_reproduces_the_base_perplexity(indexed_lm, tmp_path):
    metrics = run_knnlm(indexed_lm, tmp_path, lmbda=0.0)
    base = json.loads((indexed_lm["root"] / "base_eval" / "eval_results.json").read_text())
    assert metrics["perplexity"] == metrics["base_perplexity"]
    assert metrics["eval_tokens"] > 0 and not metrics["exclude_self"]
    train_metrics = run_knnlm(indexed_lm, tmp_path, split="train", lmbda=0.0)
    assert train_metrics["base_perplexity"] == base["perplexity"] and train_metrics["exclude_self"]


def test_one_pass_scores_every_lmbda_like_separate_runs(indexed_lm, tmp_path):
    sweep = run_knnlm(indexed_lm, tmp_path, lmbda=[0.25, 0.0, 0.5])
    alone = run_knnlm(indexed_lm, tmp_path, lmbda=0.5)
    by_lmbda = {entry["lmbda"]: entry["perplexity"] for entry in sweep["lmbda_sweep"]}
    assert list(by_lmbda) == [0.25, 0.0, 0.5] and sweep["lmbda"] == 0.25
    assert sweep["perplexity"] == by_lmbda[0.25]  # the first value is the headline
    assert by_lmbda[0.0] == sweep["base_perplexity"]
    assert by_lmbda[0.5] == pytest.approx(alone["perplexity"], rel=1e-12)
    assert len(set(by_lmbda.values())) == 3


def test_cli_writes_results_and_two_processes_agree_with_one(indexed_lm, tmp_path):
    flags = ["--model_name_or_path", str(indexed_lm["model"]), "--dataset_name", str(indexed_lm["data"]),
             "--eval_subset", "test", "--dstore_dir", str(indexed_lm["dstore"]), "--k", "8", "--lmbda", "0.25",
             "--knn_temp", "1", "--per_device_eval_batch_size", "2"]
    one = knnlm.main([*flags, "--output_dir", str(tmp_path / "one")])
    written = json.loads((tmp_path / "one" / "knnlm_results.json").read_text())
    assert written["perplexity"] == one["perplexity"] and math.isfinite(one["perplexity"])
    assert one["perplexity"] != one["base_perplexity"] and one["eval_tokens_per_second"] > 0

    accelerate_launch("knn_utils.knnlm", [*flags, "--output_dir", str(tmp_path / "two")])
    two = json.loads((tmp_path / "two" / "knnlm_results.json").read_text())
    assert two["num_processes"] == 2
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-12)
    assert two["base_perplexity"] == pytest.approx(one["base_perplexity"], rel=1e-12)


def test_mismatched_datastore_is_a_usage_error(indexed_lm, tmp_path):
    fingerprint = json.loads((indexed_lm["data"] / "meta.json").read_text())["tokenizer"]["fingerprint"]
    narrow = random_datastore(tmp_path / "narrow", rows=50, dim=16, vocab=10, seed=0, tokenizer_fingerprint=fingerprint)
    with pytest.raises(UsageError, match="dimension 16"):
        run_knnlm(indexed_lm, tmp_path, dstore_dir=str(narrow))
    foreign = random_datastore(tmp_path / "foreign", rows=50, dim=32, vocab=10, seed=0)
    with pytest.raises(UsageError, match="tokenizer fingerprint"):
        run_knnlm(indexed_lm, tmp_path, dstore_dir=str(foreign))
    with pytest.raises(UsageError, match="--lmbda"):
        knnlm.KnnLMArguments(dstore_dir="d", output_dir="o", lmbda=1.5)


def test_knn_targets_check_the_model_tokenizer(indexed_lm, tmp_path):
    out = tmp_path / "targets"
    meta = save_knn_main(["--model_path", str(indexed_lm["model"]), "--dstore_path", str(indexed_lm["dstore"]),
                          "--output_path", str(out), "--k", "4", "--ignore_first", "True"])
    assert meta["rows"] == json.loads((indexed_lm["dstore"] / "meta.json").read_text())["rows"]
    other_tokenizer = make_tokenizer(tmp_path / "other_tokenizer", words=[f"v{i}" for i in range(40)])
    with pytest.raises(UsageError, match="--model_path"):
        save_knn_main(["--model_path", str(other_tokenizer), "--dstore_path", str(indexed_lm["dstore"]),
                       "--output_path", str(tmp_path / "never")])


@pytest.mark.parametrize("knn_temp", [0.5, 1.0, 7.0])
def test_gold_p_knn_from_the_neighbours_equals_the_dense_p_knn(knn_temp):
    generator = torch.Generator().manual_seed(0)
    n, k, vocab = 200, 16, 50
    lm_logits = torch.randn(n, vocab, generator=generator) * 3
    dists = torch.rand(n, k, generator=generator) * 20
    vals = torch.randint(0, 12, (n, k), generator=generator)  # few values: neighbours share tokens
    dists[5:15, 10:] = math.inf  # some neighbours missing
    dists[50:53] = math.inf  # rows without any neighbour keep the LM
    labels = torch.randint(0, 14, (n,), generator=generator)  # some gold tokens no neighbour holds
    labels[:40] = vals[:40, 3]
    gold = knnlm.knn_gold_log_probs(dists, vals, labels, knn_temp)
    torch.testing.assert_close(gold, knnlm.knn_log_probs(dists, vals, vocab, knn_temp).gather(-1, labels[:, None])[:, 0],
                               rtol=1e-6, atol=1e-6)
    assert torch.isinf(gold).any() and torch.isfinite(gold[:40]).all()

    lmbdas = [0.0, 0.25, 0.5, 1.0]
    lm_gold = torch.log_softmax(lm_logits, -1).gather(-1, labels[:, None])[:, 0]
    got = knnlm.knnlm_gold_log_probs_sweep(lm_gold, dists, vals, labels, lmbdas, knn_temp)  # (len(lmbdas), n)
    full = knnlm.knnlm_log_probs_sweep(lm_logits, dists, vals, lmbdas, knn_temp)
    torch.testing.assert_close(got, torch.stack([f.gather(-1, labels[:, None])[:, 0] for f in full]),
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], lm_gold) and torch.equal(got[:, 50:53], lm_gold[50:53].expand(4, 3))


def test_perplexity_equals_the_full_distribution_formula(indexed_lm, tmp_path):
    """End to end: evaluate_knnlm's perplexity is the one of p = (1 - l) p_lm + l p_knn built over the whole
    vocabulary in float64 from the same neighbours (searched here through the same index)."""
    from knn_utils.index_search import load_index
    from utils.artifacts.dataset import load_split
    from utils.artifacts.datastore import open_datastore
    from utils.modeling import load_model_for_dataset
    from utils.scoring import score_batches

    lmbdas, knn_temp, k = [0.3, 0.8], 3.0, 8
    metrics = run_knnlm(indexed_lm, tmp_path, lmbda=lmbdas, knn_temp=knn_temp, k=k)
    split = load_split(str(indexed_lm["data"]), "test")
    datastore = open_datastore(indexed_lm["dstore"], "--dstore_dir")
    index = load_index(str(indexed_lm["dstore"] / "index"), datastore, None, False)
    model, _ = load_model_for_dataset(ModelArguments(model_name_or_path=str(indexed_lm["model"])), split.meta,
                                      str(indexed_lm["data"]))
    nll, rows = np.zeros(len(lmbdas)), 0
    for batch in score_batches(model, split.tokens, split.windows, 4, layer=datastore.meta["layer"], show_progress=False):
        found = index.search(batch.hidden.float().numpy(), k)
        p_lm = torch.softmax(batch.logits.double(), -1).numpy()  # (n, V)
        w = np.exp(-found.dists.astype(np.float64) / knn_temp)  # (n, k), 0 for missing neighbours
        w /= w.sum(-1, keepdims=True)
        p_knn = np.zeros_like(p_lm)
        np.add.at(p_knn, (np.arange(len(w))[:, None], np.asarray(datastore.vals)[np.where(found.valid, found.ids, 0)]), w)
        labels = batch.labels.numpy()
        for i, lmbda in enumerate(lmbdas):
            p = (1 - lmbda) * p_lm + lmbda * p_knn
            nll[i] -= np.log(p[np.arange(len(labels)), labels]).sum()
        rows += len(labels)
    for entry, expected in zip(metrics["lmbda_sweep"], np.exp(nll / rows)):
        assert entry["perplexity"] == pytest.approx(expected, rel=1e-6)
