"""An index sharded by rows (build_index --index_shards) gives the neighbours, kNN targets and kNN-LM perplexity of
one unsharded index: in one process, in two processes over gloo, and on two "nodes" (two torchrun launches) here."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import faiss
import numpy as np
import pytest

from knn_utils import faiss_devices, index_build, index_search, knnlm
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.index_search import load_index
from knn_utils.knn_targets import TargetSettings, compute_knn_targets
from knn_utils.sharded import merge_neighbours, shards_of_process
from tests.knn_fixtures import (REPO, accelerate_launch, cpu_launch_env, random_datastore, tiny_lm,  # noqa: F401  (a fixture)
                                write_datastore)
from tests.knn_utils.test_knn_targets import nearest_by_distance_then_row, tie_keys
from utils.artifacts.datastore import load_datastore
from utils.checksums import verify_files
from utils.cli import UsageError
from utils.io import partial_path

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

TARGET_FILES = ("offsets.npy", "token_ids.npy", "probs.npy", "labels.npy")
LAUNCH_TIMEOUT = 180  # seconds: a hung rendezvous or collective fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def tie_dstore(tmp_path_factory):
    """400 float16 keys full of exact ties and duplicates, an exact index over all rows and one in 3 shards."""
    keys = tie_keys()
    vals = np.random.default_rng(1).integers(12, size=len(keys)).astype(np.int32)
    path = write_datastore(tmp_path_factory.mktemp("ties") / "ds", keys, vals)
    build_index(str(path), settings=IndexSettings(index_type="flat"), show_progress=False)
    build_index(str(path), str(path / "sharded"), IndexSettings(index_type="flat", index_shards=3), show_progress=False)
    return path


def same_bytes(a, b, names=TARGET_FILES) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def target_settings(**overrides) -> TargetSettings:
    return TargetSettings(**{"k": 6, "knn_temp": 20 * 2.0**-20, "batch_size": 50, "chunk_rows": 100, **overrides})


def test_merge_keeps_the_nearest_and_breaks_ties_by_the_lower_row():
    dists = [np.array([[1.0, 2.0, np.inf]], dtype=np.float32), np.array([[1.0, 0.5, 3.0]], dtype=np.float32)]
    ids = [np.array([[7, 9, -1]]), np.array([[3, 20, 11]])]
    got_dists, got_ids = merge_neighbours(dists, ids, 4)
    np.testing.assert_array_equal(got_ids, [[20, 3, 7, 9]])
    np.testing.assert_array_equal(got_dists, np.array([[0.5, 1.0, 1.0, 2.0]], dtype=np.float32))
    assert merge_neighbours([d[:, :1] for d in dists], [i[:, :1] for i in ids], 3)[1].tolist() == [[3, 7, -1]]
    assert [list(shards_of_process(4, r, 2)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(shards_of_process(2, r, 3)) for r in range(3)] == [[0], [], [1]]


def test_sharded_meta_records_ranges_and_checksums(tie_dstore):
    meta = json.loads((tie_dstore / "sharded" / "meta.json").read_text())
    assert [(s["begin"], s["end"], s["id_offset"]) for s in meta["shards"]] == [(0, 133, 0), (133, 267, 133), (267, 400, 267)]
    assert sorted(meta["checksums"]) == ["shard_000.faiss", "shard_001.faiss", "shard_002.faiss"]
    assert meta["rows"] == 400 and meta["settings"]["index_shards"] == 3
    assert verify_files(tie_dstore / "sharded", meta, [s["file"] for s in meta["shards"]])
    assert "shards" not in json.loads((tie_dstore / "index" / "meta.json").read_text())  # the unsharded layout
    assert not (tie_dstore / "index" / "shard_000.faiss").exists() and (tie_dstore / "index" / "index.faiss").exists()


def test_one_process_searches_every_shard_like_one_index(tie_dstore, tmp_path):
    datastore = load_datastore(str(tie_dstore))
    whole, sharded = load_index(tie_dstore / "index", datastore), load_index(tie_dstore / "sharded", datastore)
    assert len(sharded.shards) == 3 and not sharded.collective
    queries, rows = np.asarray(datastore.keys, dtype=np.float32), np.arange(datastore.num_rows)
    expected_ids, expected_dists = nearest_by_distance_then_row(np.asarray(datastore.keys), 6)
    for index in (whole, sharded):
        found = index.search(queries, 6, rows)
        np.testing.assert_array_equal(found.ids, expected_ids)
        np.testing.assert_array_equal(found.dists, expected_dists.astype(np.float32))
    compute_knn_targets(str(tie_dstore), str(tmp_path / "whole"), settings=target_settings())
    compute_knn_targets(str(tie_dstore), str(tmp_path / "sharded"), str(tie_dstore / "sharded"), settings=target_settings())
    assert same_bytes(tmp_path / "whole", tmp_path / "sharded")


def test_an_ivfpq_shard_holds_global_row_ids(tmp_path):
    dstore = random_datastore(tmp_path / "ds", rows=1200, dim=8, vocab=12, seed=3)
    build_index(str(dstore), settings=IndexSettings(index_type="ivfpq", ncentroids=8, code_size=4, nbits=4,
                                                    index_shards=2, probe=8), show_progress=False)
    datastore = load_datastore(str(dstore))
    index = load_index(dstore / "index", datastore)
    assert [shard.id_offset for shard in index.shards] == [0, 0] and index.nprobe == 8
    second = faiss.read_index(str(dstore / "index" / "shard_001.faiss"))
    assert faiss.rev_swig_ptr(faiss.extract_index_ivf(second).invlists.get_ids(0), 1)[0] >= 600
    queries = np.asarray(datastore.keys[595:605], dtype=np.float32)
    found = index.search(queries, 1)  # each key's nearest row is itself, in either shard
    np.testing.assert_array_equal(found.ids[:, 0], np.arange(595, 605))


def test_a_sharded_build_resumes_after_its_last_finished_chunk(tmp_path, monkeypatch):
    dstore = random_datastore(tmp_path / "ds", rows=900, dim=8, vocab=12, seed=4)
    settings = IndexSettings(index_type="ivfpq", ncentroids=4, code_size=4, nbits=4, index_shards=3,
                             num_keys_to_add_at_a_time=100)
    build_index(str(dstore), str(tmp_path / "fresh"), settings, show_progress=False)

    encoded, real_encode = [], index_build.encode_chunk

    def encode_then_die(trained, keys, first_id, use_gpu):  # the process dies while encoding rows 500-600
        if first_id == 500:
            raise KeyboardInterrupt
        encoded.append(first_id)
        return real_encode(trained, keys, first_id, use_gpu)

    monkeypatch.setattr(index_build, "encode_chunk", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_index(str(dstore), str(tmp_path / "index"), settings, show_progress=False)
    staging = partial_path(tmp_path / "index")
    assert (staging / "shard_000.faiss").exists() and not (staging / "shard_000.partial").exists()
    assert encoded == [0, 100, 200, 300, 400] and not (staging / "shard_001.faiss").exists()

    encoded.clear()
    monkeypatch.setattr(index_build, "encode_chunk", lambda *args: encoded.append(args[2]) or real_encode(*args))
    build_index(str(dstore), str(tmp_path / "index"), settings, show_progress=False)
    assert encoded == [500, 600, 700, 800]  # shard 0 and the first two chunks of shard 1 are not redone
    assert same_bytes(tmp_path / "index", tmp_path / "fresh", ("shard_000.faiss", "shard_001.faiss", "shard_002.faiss"))


def test_bad_shard_counts_and_gpu_limits_are_usage_errors(tmp_path, monkeypatch):
    dstore = random_datastore(tmp_path / "ds", rows=10, dim=8, vocab=12, seed=5)
    with pytest.raises(UsageError, match="--index_shards must be >= 1"):
        IndexSettings(index_shards=0)
    with pytest.raises(UsageError, match="--index_shards 11 is more than the datastore's 10 keys"):
        build_index(str(dstore), settings=IndexSettings(index_type="flat", index_shards=11), show_progress=False)
    monkeypatch.setattr(index_search, "faiss_gpu_available", lambda: True)  # the limit checks only, no GPU is used
    largest = index_search.max_gpu_k()
    index_search.check_gpu_k(largest, use_gpu=True)
    with pytest.raises(UsageError, match=f"--k {largest + 1}: FAISS-GPU returns at most 2048 .* --k {largest} or less"):
        index_search.check_gpu_k(largest + 1, use_gpu=True)
    index_search.check_gpu_k(2047, use_gpu=True, exact=False)
    index_search.check_gpu_k(5000, use_gpu=False)
    with pytest.raises(UsageError, match="--probe 2049: FAISS-GPU visits at most 2048 lists"):
        index_search.check_gpu_probe(2049, use_gpu=True)
    index_search.check_gpu_probe(2048, use_gpu=True)


def test_float16_lookup_tables_only_where_faiss_gpu_requires_them():
    def ivfpq(code_size, nbits):
        return faiss.IndexIVFPQ(faiss.IndexFlatL2(192), 192, 4, code_size, nbits)

    assert not faiss_devices.needs_float16_lookup_tables(ivfpq(64, 8))  # 64 x 256 = 16384 entries: float32 fits
    assert faiss_devices.needs_float16_lookup_tables(ivfpq(96, 8))
    assert not faiss_devices.needs_float16_lookup_tables(faiss.IndexFlatL2(8))


# ---------------------------------------------------------------------------------------------------
# Several processes, through the real launchers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_node_torchrun(module: str, args: list[str], port: int) -> list[str]:
    """The README's two-machine recipe, both "machines" on 127.0.0.1: one process each. Each launch has its own
    rendezvous id, so no state of an earlier launch on a reused port can be taken for this one's."""
    run_id = f"sharded-test-{uuid.uuid4().hex[:12]}"
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", run_id, "-m", module, *args] for rank in (0, 1)]


def kill_group(node: subprocess.Popen) -> None:
    """Kill a launch and the workers it started (its process group), if it still runs."""
    if node.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def printed(node: subprocess.Popen) -> str:
    """What a killed launch printed (what is left in its pipe)."""
    try:
        return node.communicate(timeout=10)[0] or ""
    except subprocess.TimeoutExpired as stuck:
        return (stuck.output or b"").decode(errors="replace") if isinstance(stuck.output, bytes) else stuck.output or ""


def run_nodes(commands: list[list[str]], port: int | None = None) -> None:
    """Run the launches at once; all must succeed within `LAUNCH_TIMEOUT` seconds together (then every one is killed).

    With ``port`` (the launches' c10d rendezvous endpoint on 127.0.0.1), this process hosts the rendezvous store
    until every launch has ended, as a machine that outlives the run would: both launchers then find the port taken
    and connect as clients. Otherwise the launcher that hosts it may exit first and take the store with it while the
    other still asks it how many nodes wait (torch's RendezvousConnectionError, a failed run whose workers all
    succeeded; seen once in CI)."""
    import torch.distributed as dist

    store = (dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False)
             if port is not None else None)
    nodes = [subprocess.Popen(command, cwd=REPO, env=cpu_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) for command in commands]  # a group: kill workers too
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        outputs = [node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            kill_group(node)
        tails = [f"--- node {rank} ---\n{printed(node)[-3000:]}" for rank, node in enumerate(nodes)]
        pytest.fail(f"the launches did not finish within {LAUNCH_TIMEOUT} s (a hung rendezvous or collective); "
                    "what each printed:\n" + "\n".join(tails))
    finally:
        for node in nodes:
            kill_group(node)
        del store
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]


def test_two_processes_over_gloo_give_the_perplexity_of_one_index(tiny_lm, tmp_path):
    dstore = tiny_lm["dstore"]
    build_index(str(dstore), str(tmp_path / "flat"), IndexSettings(index_type="flat"), show_progress=False)
    build_index(str(dstore), str(tmp_path / "flat2"), IndexSettings(index_type="flat", index_shards=2), show_progress=False)
    flags = ["--model_name_or_path", str(tiny_lm["model"]), "--dataset_name", str(tiny_lm["data"]), "--eval_subset", "train",
             "--dstore_dir", str(dstore), "--k", "8", "--lmbda", "0.25", "--knn_temp", "1",
             "--per_device_eval_batch_size", "3"]  # an uneven split: one process has a batch more to search
    one = knnlm.main([*flags, "--index_path", str(tmp_path / "flat"), "--output_dir", str(tmp_path / "one")])
    one_sharded = knnlm.main([*flags, "--index_path", str(tmp_path / "flat2"), "--output_dir", str(tmp_path / "one_sharded")])
    accelerate_launch("knn_utils.knnlm", [*flags, "--index_path", str(tmp_path / "flat2"), "--output_dir", str(tmp_path / "two")])
    two = json.loads((tmp_path / "two" / "knnlm_results.json").read_text())
    assert one["exclude_self"] and two["num_processes"] == 2 and one["perplexity"] != one["base_perplexity"]
    assert one_sharded["perplexity"] == one["perplexity"]
    assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-12)  # as for an unsharded index (test_knnlm)


def test_two_nodes_write_the_datastore_and_targets_of_one_process(tiny_lm, tie_dstore, tmp_path):
    """The datastore (train_base) and the kNN targets searched over a sharded index (saveKNNMulti), each process
    holding one of the shards, by two torchrun "nodes" over gloo: the bytes of one process with one index."""
    port = free_port()
    run_nodes(two_node_torchrun("train_base", [
        "--model_name_or_path", str(tiny_lm["model"]), "--dataset_name", str(tiny_lm["data"]), "--do_eval",
        "--eval_subset", "train", "--save_knnlm_dstore", "--dstore_dir", str(tmp_path / "dstore"),
        "--output_dir", str(tmp_path / "base_eval"), "--per_device_eval_batch_size", "4", "--report_to", "none"], port),
        port)
    assert same_bytes(tmp_path / "dstore", tiny_lm["dstore"], ("keys.npy", "vals.npy"))

    build_index(str(tie_dstore), str(tmp_path / "two_shards"), IndexSettings(index_type="flat", index_shards=2),
                show_progress=False)
    compute_knn_targets(str(tie_dstore), str(tmp_path / "one"), settings=target_settings())
    port = free_port()
    run_nodes(two_node_torchrun("knn_utils.saveKNNMulti", [
        "--dstore_path", str(tie_dstore), "--index_path", str(tmp_path / "two_shards"), "--output_path", str(tmp_path / "two"),
        "--k", "6", "--knn_temp", str(20 * 2.0**-20), "--batch_size", "30", "--chunk_rows", "90"], port), port)
    assert same_bytes(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["num_processes"] == 2
