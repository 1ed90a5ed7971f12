"""models/training/ and the two entry points on a tiny real pipeline (tiny GPT-2 -> datastore -> kNN targets)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_mlpmem_offline
import train_mlpmem_online
from knn_utils.index_build import IndexSettings, build_index
from knn_utils.knn_targets import TargetSettings, compute_knn_targets
from models import MemoryConfig, build_memory, load_memory
from models.training.arguments import warmup_steps
from models.training.losses import memory_loss
from models.training.rows import DatastoreRows, OnTheFlyRows, window_hidden_states
from tests.conftest import tiny_model
from tests.knn_fixtures import accelerate_launch, tiny_lm, write_datastore  # noqa: F401  (tiny_lm is a fixture)
from utils.arguments import ModelArguments
from utils.artifacts.dataset import load_split
from utils.artifacts.datastore import load_datastore
from utils.artifacts.knn_targets import load_knn_targets
from utils.cli import UsageError
from utils.modeling import load_causal_lm

pytestmark = pytest.mark.usefixtures("one_faiss_thread")

FAST = ["--num_warmup_steps", "2", "--logging_steps", "1", "--disable_tqdm", "--base_model_name", "tiny"]


def knn_targets_of(dstore, out, k: int = 8):
    """Exact-search kNN targets of every row of ``dstore``."""
    if not (dstore / "index").exists():
        build_index(str(dstore), settings=IndexSettings(index_type="flat"), show_progress=False)
    compute_knn_targets(str(dstore), str(out), settings=TargetSettings(k=k, knn_temp=1.0))
    return out


@pytest.fixture(scope="module")
def pipeline(tiny_lm, tmp_path_factory):
    """tiny_lm (dataset, model, datastore of the train split) plus the kNN targets of its rows."""
    return {**tiny_lm, "targets": knn_targets_of(tiny_lm["dstore"], tmp_path_factory.mktemp("targets") / "targets")}


def offline_args(pipeline, out, *extra) -> list[str]:
    return ["--knn_dstore_path", str(pipeline["dstore"]), "--knn_save_path", str(pipeline["targets"]),
            "--output_dir", str(out), *FAST, *extra]


def test_offline_entry_point_writes_a_loadable_memory(pipeline, tmp_path):
    out = tmp_path / "memory"
    results = train_mlpmem_offline.main(offline_args(pipeline, out, "--num_train_epochs", "2", "--per_device_train_batch_size",
                                                     "128", "--validation_rows", "100"))
    assert {"config.json", "model.safetensors", "meta.json", "training_results.json", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "meta.json").read_text())
    datastore = load_datastore(str(pipeline["dstore"]))
    assert meta["kind"] == "mlp_memory" and meta["mode"] == "offline"
    assert meta["source"] == {"mode": "offline", "unit": "row", "train_units": datastore.num_rows - 100, "validation_rows": 100}
    memory = load_memory(out)
    assert (memory.config.layer, memory.config.tokenizer_fingerprint, memory.config.hidden_size) == (
        datastore.meta["layer"], datastore.meta["tokenizer_fingerprint"], datastore.dim)
    assert memory.config.base_model["model_name_or_path"] == datastore.meta["model"]["model_name_or_path"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = -(-(datastore.num_rows - 100) // 128)
    assert [r["step"] for r in lines if r["type"] == "train"] == list(range(1, 2 * steps_per_epoch + 1))
    validations = [r for r in lines if r["type"] == "validation"]
    assert [r["step"] for r in validations] == [steps_per_epoch, 2 * steps_per_epoch]
    assert validations[-1]["val_rows"] == 100 and 0 <= results["val_top1_agreement"] <= 1
    assert results["val_kl"] == validations[-1]["val_kl"]
    with pytest.raises(UsageError, match="already holds a trained memory"):
        train_mlpmem_offline.main(offline_args(pipeline, out))


def test_a_tiny_memory_overfits_its_targets(pipeline):
    """64 rows, pure KL, no dropout: the memory learns the kNN distributions almost exactly."""
    datastore, targets = load_datastore(str(pipeline["dstore"])), load_knn_targets(pipeline["targets"])
    source = DatastoreRows(datastore, targets, boundary=64, vocab_size=42, train_batch_size=64, eval_batch_size=64)
    batch = source.train_batch(np.arange(64))
    torch.manual_seed(0)
    memory = build_memory(MemoryConfig.from_preset("tiny", hidden_size=datastore.dim, vocab_size=42, dropout=0.0))
    optimizer = torch.optim.AdamW(memory.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(300):
        loss = memory_loss(memory(batch.inputs), batch.targets, batch.labels, alpha=1.0).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = memory_loss(memory(batch.inputs), batch.targets, batch.labels, alpha=1.0)
    assert final.kl.item() < 0.02, final.kl.item()


def test_offline_and_online_see_the_same_inputs_and_targets(pipeline):
    datastore, targets = load_datastore(str(pipeline["dstore"])), load_knn_targets(pipeline["targets"])
    split = load_split(str(pipeline["data"]), "train")
    model = load_causal_lm(ModelArguments(model_name_or_path=str(pipeline["model"])))
    rows, hidden = window_hidden_states(model, split.tokens, split.windows[[0, 3, 5]])
    np.testing.assert_allclose(hidden.numpy(), np.asarray(datastore.keys[rows], dtype=np.float32), rtol=2e-3, atol=2e-3)

    boundary = datastore.num_rows - 40
    online = OnTheFlyRows(model, split.tokens, split.windows, -1, targets, boundary, 42, 2, 2)
    offline = DatastoreRows(datastore, targets, boundary, 42, 64, 64)
    on = online.train_batch(np.array([3, len(online.train_windows) - 1]))  # the last one straddles the boundary
    on_rows = np.concatenate([np.arange(*split.windows[w, 2:4]) for w in online.train_windows[[3, -1]]])
    on_rows = on_rows[on_rows < boundary]
    off = offline.train_batch(on_rows)
    torch.testing.assert_close(on.inputs, off.inputs, rtol=2e-3, atol=2e-3)
    for name in ("entry_row", "token_ids", "probs"):
        assert torch.equal(getattr(on.targets, name), getattr(off.targets, name))
    assert torch.equal(on.labels, off.labels)
    held_out = np.concatenate([b.labels.numpy() for b in online.validation_batches(0, 1)])
    assert np.array_equal(held_out, np.asarray(targets.labels[boundary:]))


def test_online_entry_point(pipeline, tmp_path):
    out = tmp_path / "memory"
    train_mlpmem_online.main(["--model_name_or_path", str(pipeline["model"]), "--dataset_name", str(pipeline["data"]),
                              "--knn_save_path", str(pipeline["targets"]), "--output_dir", str(out), *FAST,
                              "--max_train_steps", "4", "--per_device_train_batch_size", "4", "--validation_rows", "50",
                              "--init_lm_head"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["mode"] == "online" and meta["source"]["unit"] == "window" and meta["results"]["val_rows"] == 50
    assert meta["dataset"]["split"] == "train" and meta["layer"] == 1


def final_weights(out) -> dict:
    return load_file(str(out / "model.safetensors"))


def test_resumed_run_matches_an_uninterrupted_one(pipeline, tmp_path):
    """Stopped after step 5 with checkpoints every 2 steps, rerun: same weights and log as one run (dropout on)."""
    args = ["--max_train_steps", "8", "--per_device_train_batch_size", "96", "--gradient_accumulation_steps", "2",
            "--checkpointing_steps", "2", "--save_total_limit", "2", "--eval_steps", "3", "--validation_rows", "64"]
    straight = tmp_path / "straight"
    train_mlpmem_offline.main(offline_args(pipeline, straight, *args))
    resumed = tmp_path / "resumed"
    assert train_mlpmem_offline.main(offline_args(pipeline, resumed, *args), stop_after_steps=5) is None
    assert not (resumed / "meta.json").exists()
    assert [p.name for p in sorted((resumed / "checkpoints").iterdir())] == ["step-00000002", "step-00000004"]
    train_mlpmem_offline.main(offline_args(pipeline, resumed, *args))  # resumes from step 4 by itself

    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda out: [{k: v for k, v in json.loads(line).items() if k != "rows_per_second"}  # noqa: E731
                         for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert strip(straight) == strip(resumed)


def test_resume_refuses_another_run(pipeline, tmp_path):
    out = tmp_path / "memory"
    train_mlpmem_offline.main(offline_args(pipeline, out, "--max_train_steps", "4", "--checkpointing_steps", "2"),
                              stop_after_steps=2)
    with pytest.raises(UsageError, match="another run.*batch_size"):
        train_mlpmem_offline.main(offline_args(pipeline, out, "--max_train_steps", "4", "--per_device_train_batch_size", "7"))


def test_two_processes_match_one(pipeline, tmp_path):
    """Data parallel over 2 gloo processes (512 rows each) = 1 process with 1024 rows, up to float rounding."""
    common = ["--max_train_steps", "3", "--memory_dropout", "0", "--validation_rows", "64", "--checkpointing_steps", "no"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_mlpmem_offline.main(offline_args(pipeline, one, *common, "--per_device_train_batch_size", "256"))
    accelerate_launch("train_mlpmem_offline", offline_args(pipeline, two, *common, "--per_device_train_batch_size", "128"))
    assert json.loads((two / "meta.json").read_text())["num_processes"] == 2
    a, b = final_weights(one), final_weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Mismatched artifacts


@pytest.fixture(scope="module")
def impostors(pipeline, tmp_path_factory):
    """Targets of datastores that differ from the tiny one in tokenizer, row count, or text (labels)."""
    datastore = load_datastore(str(pipeline["dstore"]))
    keys, vals = np.asarray(datastore.keys), np.asarray(datastore.vals)
    fingerprint = datastore.meta["tokenizer_fingerprint"]
    root = tmp_path_factory.mktemp("impostors")
    other_vals = vals.copy()
    other_vals[7] = (other_vals[7] + 1) % 42
    made = {
        "tokenizer": write_datastore(root / "d_tok", keys, vals, tokenizer_fingerprint="another-tokenizer"),
        "rows": write_datastore(root / "d_rows", keys[:-5], vals[:-5], tokenizer_fingerprint=fingerprint),
        "labels": write_datastore(root / "d_labels", keys, other_vals, tokenizer_fingerprint=fingerprint),
    }
    return {name: knn_targets_of(path, root / f"t_{name}") for name, path in made.items()}


@pytest.mark.parametrize("which, message", [
    ("tokenizer", "tokenizer fingerprint another-tokenizer"),
    ("rows", r"has \d+ rows but --knn_dstore_path"),
    ("labels", "gold token of row 7"),
])
def test_mismatched_targets_are_refused(pipeline, impostors, tmp_path, which, message):
    args = offline_args(pipeline, tmp_path / "m")
    args[args.index("--knn_save_path") + 1] = str(impostors[which])
    with pytest.raises(UsageError, match=message):
        train_mlpmem_offline.main(args)


def test_online_refuses_targets_of_other_rows(pipeline, impostors, tmp_path):
    with pytest.raises(UsageError, match="not the rows of whole windows"):
        train_mlpmem_online.main(["--model_name_or_path", str(pipeline["model"]), "--dataset_name", str(pipeline["data"]),
                                  "--knn_save_path", str(impostors["rows"]), "--output_dir", str(tmp_path / "m")])


def test_flags_are_checked(pipeline, tmp_path):
    with pytest.raises(UsageError, match="--checkpointing_steps"):
        train_mlpmem_offline.main(offline_args(pipeline, tmp_path / "m", "--checkpointing_steps", "sometimes"))
    with pytest.raises(UsageError, match="--validation_rows holds out"):
        train_mlpmem_offline.main(offline_args(pipeline, tmp_path / "m", "--validation_rows", "1000000"))


def test_base_model_must_fit_the_datastore(pipeline, tiny_gpt2_dir, tmp_path):
    narrow = tmp_path / "narrow"
    tiny_model("gpt2", vocab_size=42, n_embd=16).save_pretrained(narrow)
    with pytest.raises(UsageError, match="hidden size 16, but the keys .* dimension 32"):
        train_mlpmem_offline.main(offline_args(pipeline, tmp_path / "m", "--model_name_or_path", str(narrow)))
    with pytest.raises(UsageError, match="--model_name_or_path .* tokenizer fingerprint"):
        train_mlpmem_offline.main(offline_args(pipeline, tmp_path / "m", "--model_name_or_path", str(tiny_gpt2_dir)))


def test_default_warm_up_is_a_fraction_of_a_short_run(pipeline, tmp_path):
    assert warmup_steps(None, 300_000) == 2000 and warmup_steps(None, 40) == 4 and warmup_steps(7, 40) == 7
    out = tmp_path / "memory"
    args = offline_args(pipeline, out, "--max_train_steps", "10", "--per_device_train_batch_size", "64")
    i = args.index("--num_warmup_steps")
    train_mlpmem_offline.main(args[:i] + args[i + 2:])  # no --num_warmup_steps: 1 warm-up step of 10
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert lrs[0] == pytest.approx(5e-4)  # the warm-up is over after one step (with 2,000 it would be 5e-4 / 2000)
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0)


def test_prefetched_batches_are_the_schedule_batches_from_any_step(pipeline):
    """train_batches with worker processes yields, from a step in the middle of an epoch (a resume), exactly the
    batches the schedule gives those steps, in order, and draws nothing from the global RNG (dropout's)."""
    from models.training.checkpoints import Schedule
    from models.training.loop import train_batches

    datastore, targets = load_datastore(str(pipeline["dstore"])), load_knn_targets(pipeline["targets"])
    boundary = datastore.num_rows - 64
    schedule = Schedule(boundary, 50, 1, 2, 3, None)  # 50 rows per micro-batch, 2 micro-batches per step, 3 epochs
    first_step = schedule.steps_per_epoch + 1  # mid-epoch 2
    expected = [DatastoreRows(datastore, targets, boundary, 42, 50, 64).train_batch(schedule.units(7, step, micro, 0))
                for step in range(first_step, schedule.total_steps) for micro in range(2)]
    for workers in (0, 2):
        source = DatastoreRows(datastore, targets, boundary, 42, 50, 64, loader_workers=workers)
        rng = torch.get_rng_state()
        got = list(train_batches(source, schedule, 7, first_step, 0, pin_memory=False))
        assert torch.equal(torch.get_rng_state(), rng)
        assert len(got) == len(expected) > 2
        for a, b in zip(got, expected):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
            assert all(torch.equal(getattr(a.targets, n), getattr(b.targets, n)) for n in ("entry_row", "token_ids", "probs"))
    rows = np.sort(schedule.units(7, first_step, 0, 0))
    assert torch.equal(got[0].inputs, torch.from_numpy(np.asarray(datastore.keys[rows], dtype=np.float32)))


def test_loader_workers_do_not_change_the_trained_memory(pipeline, tmp_path):
    """The same run gathering in the training process (0 workers) and in 2 prefetching workers: the same weights."""
    args = ["--max_train_steps", "6", "--per_device_train_batch_size", "96", "--gradient_accumulation_steps", "2",
            "--checkpointing_steps", "no", "--validation_rows", "64"]
    plain, prefetched = tmp_path / "plain", tmp_path / "prefetched"
    train_mlpmem_offline.main(offline_args(pipeline, plain, *args, "--dataloader_num_workers", "0"))
    train_mlpmem_offline.main(offline_args(pipeline, prefetched, *args, "--dataloader_num_workers", "2"))
    a, b = final_weights(plain), final_weights(prefetched)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UsageError, match="--dataloader_num_workers must be >= 0"):
        train_mlpmem_offline.main(offline_args(pipeline, tmp_path / "bad", "--dataloader_num_workers", "-1"))
