"""train_base: perplexity, the datastore it writes, resuming, and multi-process identity."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import train_base
from tests.conftest import REPO, shared_data
from tests.knn_fixtures import cpu_launch_env
from utils.artifacts.dataset import load_split
from utils.artifacts.datastore import DatastoreWriter, load_datastore
from utils.cli import UsageError
from utils.hidden_state import HiddenStateHook
from utils.io import ArtifactError
from utils.windows import window_labels


def run_eval(model_dir, dataset, out, split="test", dstore=None, extra=()):
    args = ["--model_name_or_path", str(model_dir), "--dataset_name", str(dataset), "--do_eval",
            "--eval_subset", split, "--output_dir", str(out), "--per_device_eval_batch_size", "3", "--report_to", "none"]
    if dstore is not None:
        args += ["--save_knnlm_dstore", "--dstore_dir", str(dstore)]
    return train_base.main(args + list(extra))


def reference_perplexity(model, data) -> float:
    """Perplexity from the HF model's own loss, one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in data.windows:
            input_ids, labels = window_labels(window, data.tokens)
            scored = int((labels[1:] != -100).sum())
            loss = model(torch.from_numpy(input_ids)[None], labels=torch.from_numpy(labels)[None]).loss
            total += float(loss) * scored
            count += scored
    return float(np.exp(total / count))


def test_perplexity_matches_reference(tiny_gpt2_dir, tiny_dataset, tmp_path):
    metrics = run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path)
    data = load_split(str(tiny_dataset), "test")
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    assert metrics["eval_tokens"] == data.num_rows
    assert metrics["perplexity"] == pytest.approx(reference_perplexity(model, data), rel=1e-5)
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["perplexity"] == metrics["perplexity"]


def test_datastore_rows_keys_and_values(tiny_gpt2_dir, tiny_dataset, tmp_path):
    run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path / "out", split="train", dstore=tmp_path / "ds")
    dstore = load_datastore(str(tmp_path / "ds"))
    data = load_split(str(tiny_dataset), "train")
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    assert dstore.num_rows == data.num_rows and dstore.dim == model.config.hidden_size
    assert dstore.keys.dtype == np.float16 and dstore.vals.dtype == np.int32
    np.testing.assert_array_equal(dstore.vals, data.tokens[1:])
    meta = dstore.meta
    assert meta["architecture"] == "gpt2" and meta["layer"] == 1 and meta["dataset"]["split"] == "train"
    # Keys of the second window, recomputed from that window alone.
    begin, end, row_begin, row_end = data.windows[1]
    with torch.no_grad(), HiddenStateHook(model) as hook:
        model(torch.from_numpy(np.asarray(data.tokens[begin:end], dtype=np.int64))[None])
        expected = hook.hidden[0, row_begin - begin : row_end - begin].numpy().astype(np.float16)
    np.testing.assert_allclose(dstore.keys[row_begin:row_end].astype(np.float32), expected.astype(np.float32),
                               rtol=1e-3, atol=1e-3)


def test_interrupted_datastore_resumes_to_the_same_artifact(tiny_gpt2_dir, tiny_dataset, tmp_path, monkeypatch):
    run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path / "out", split="train", dstore=tmp_path / "fresh")
    original_write = DatastoreWriter.write
    calls = {"n": 0}

    def crash_after_two(self, *args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return original_write(self, *args, **kwargs)

    monkeypatch.setattr(DatastoreWriter, "write", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path / "out", split="train", dstore=tmp_path / "ds")
    with pytest.raises(ArtifactError, match="incomplete.*Rerun"):
        load_datastore(str(tmp_path / "ds"))
    monkeypatch.setattr(DatastoreWriter, "write", original_write)
    run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path / "out", split="train", dstore=tmp_path / "ds")
    fresh, resumed = load_datastore(str(tmp_path / "fresh")).meta, load_datastore(str(tmp_path / "ds")).meta
    assert resumed["keys_sha256"] == fresh["keys_sha256"] and resumed["vals_sha256"] == fresh["vals_sha256"]
    assert not (tmp_path / "ds.partial").exists()


def test_existing_datastore_is_not_overwritten(tiny_gpt2_dir, tiny_dataset, tmp_path):
    run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path / "out", split="validation", dstore=tmp_path / "ds")
    with pytest.raises(ArtifactError, match="already holds a datastore"):
        run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path / "out", split="validation", dstore=tmp_path / "ds")


def test_two_processes_give_identical_artifacts(tiny_gpt2_dir, tiny_dataset, tmp_path):
    single = run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path / "one", split="train", dstore=tmp_path / "ds1")
    subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "train_base",
         "--model_name_or_path", str(tiny_gpt2_dir), "--dataset_name", str(tiny_dataset), "--do_eval",
         "--eval_subset", "train", "--output_dir", str(tmp_path / "two"), "--per_device_eval_batch_size", "3",
         "--report_to", "none", "--save_knnlm_dstore", "--dstore_dir", str(tmp_path / "ds2")],
        cwd=REPO, env=cpu_launch_env(), check=True, capture_output=True,
    )
    two = json.loads((tmp_path / "two" / "eval_results.json").read_text())
    assert single["num_processes"] == 1 and two["num_processes"] == 2
    assert two["perplexity"] == pytest.approx(single["perplexity"], rel=1e-6)
    one_meta, two_meta = load_datastore(str(tmp_path / "ds1")).meta, load_datastore(str(tmp_path / "ds2")).meta
    assert (one_meta["keys_sha256"], one_meta["vals_sha256"]) == (two_meta["keys_sha256"], two_meta["vals_sha256"])


def test_train_from_scratch_then_evaluate(tiny_dataset, tiny_tokenizer_dir, tmp_path):
    metrics = train_base.main([
        "--model_type", "llama", "--tokenizer_name", str(tiny_tokenizer_dir),
        "--config_overrides", "num_hidden_layers=1,hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=1",
        "--dataset_name", str(tiny_dataset), "--do_train", "--do_eval", "--eval_subset", "validation",
        "--output_dir", str(tmp_path), "--max_steps", "30", "--learning_rate", "3e-3", "--per_device_train_batch_size", "4",
        "--save_strategy", "no", "--report_to", "none", "--save_knnlm_dstore", "--dstore_dir", str(tmp_path / "ds"),
    ])
    vocab = json.loads((tiny_dataset / "meta.json").read_text())["tokenizer"]["vocab_size"]
    # The corpus is words drawn uniformly from ~30, so ~30 is the floor; training must get below uniform.
    assert metrics["perplexity"] < 0.95 * vocab
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == 0 and config.get("bos_token_id") is None  # the tokenizer's, not Llama's 2 and 1
    assert load_datastore(str(tmp_path / "ds")).meta["model"]["model_name_or_path"] == str(tmp_path.resolve())


def test_mistakes_are_clear_errors(tiny_gpt2_dir, tiny_dataset, tmp_path):
    with pytest.raises(ArtifactError, match="no 'validation' split|does not exist"):
        run_eval(tiny_gpt2_dir, tmp_path / "nowhere", tmp_path / "out", split="validation")
    with pytest.raises(UsageError, match="--model_name_or_path /missing/model"):
        run_eval("/missing/model", tiny_dataset, tmp_path / "out")
    with pytest.raises(UsageError, match="--save_knnlm_dstore needs --dstore_dir"):
        run_eval(tiny_gpt2_dir, tiny_dataset, tmp_path / "out", extra=["--save_knnlm_dstore"])
    result = subprocess.run(
        [sys.executable, "-m", "train_base", "--model_name_or_path", str(tiny_gpt2_dir), "--dataset_name",
         str(tiny_dataset), "--do_eval", "--eval_subset", "valid", "--output_dir", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "--eval_subset" in result.stderr and "Traceback" not in result.stderr


def test_tokenizer_mismatch_is_rejected(tiny_dataset, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    from tests.conftest import tiny_model

    backend = Tokenizer(models.WordLevel(vocab={"<|endoftext|>": 0, "[UNK]": 1, "other": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    GPT2TokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path / "m")
    tiny_model("gpt2", 60).save_pretrained(tmp_path / "m")
    with pytest.raises(UsageError, match="fingerprint"):
        run_eval(tmp_path / "m", tiny_dataset, tmp_path / "out")


def test_smollm2_gguf_perplexity_and_datastore(tmp_path):
    model_dir = shared_data("smollm2-135m-instruct")
    test_file = shared_data("wikitext-2", "wiki.test.tokens")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from utils.preprocess_dataset import main as preprocess_main

    preprocess_main(["--tokenizer_path", str(model_dir), "--gguf_file", gguf, "--test_file", str(test_file),
                     "--max_chars", "4000", "--block_size", "256", "--stride", "128", "--output_dir", str(tmp_path / "d")])
    metrics = run_eval(model_dir, tmp_path / "d", tmp_path / "out", dstore=tmp_path / "ds", extra=["--gguf_file", gguf])
    assert 5 < metrics["perplexity"] < 80  # a real pretrained model on real text
    dstore = load_datastore(str(tmp_path / "ds"))
    assert dstore.meta["architecture"] == "llama" and dstore.dim == 576 and dstore.meta["layer"] == 29
    assert np.isfinite(dstore.keys[:].astype(np.float32)).all()


def test_smollm2_gguf_fine_tunes_into_a_plain_model(tmp_path):
    """A GGUF checkpoint is dequantized on load: the Trainer must accept it, and the fine-tuned directory
    must load as an ordinary float model (no GGUF quantization config carried over)."""
    model_dir = shared_data("smollm2-135m-instruct")
    test_file = shared_data("wikitext-2", "wiki.test.tokens")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers import AutoConfig

    from utils.preprocess_dataset import main as preprocess_main

    preprocess_main(["--tokenizer_path", str(model_dir), "--gguf_file", gguf, "--train_file", str(test_file),
                     "--test_file", str(test_file), "--max_chars", "3000", "--block_size", "64", "--stride", "32",
                     "--output_dir", str(tmp_path / "d")])
    train_base.main([
        "--model_name_or_path", str(model_dir), "--gguf_file", gguf, "--dataset_name", str(tmp_path / "d"), "--do_train",
        "--max_steps", "1", "--max_train_samples", "1", "--per_device_train_batch_size", "1", "--learning_rate", "1e-4",
        "--save_strategy", "no", "--report_to", "none", "--output_dir", str(tmp_path / "ft"),
    ])
    assert getattr(AutoConfig.from_pretrained(tmp_path / "ft"), "quantization_config", None) is None
    before = run_eval(model_dir, tmp_path / "d", tmp_path / "e0", extra=["--gguf_file", gguf])["perplexity"]
    after = run_eval(tmp_path / "ft", tmp_path / "d", tmp_path / "e1")["perplexity"]
    assert 5 < after < 80 and after != before  # the step changed the weights, and the model still works


def test_from_scratch_training_is_reproducible_and_logs_its_progress(tiny_dataset, tiny_tokenizer_dir, tmp_path,
                                                                     capfd):
    from safetensors.torch import load_file

    for run in ("a", "b"):
        train_base.main([
            "--model_type", "gpt2", "--tokenizer_name", str(tiny_tokenizer_dir), "--config_overrides",
            "n_layer=1,n_embd=16,n_head=2", "--dataset_name", str(tiny_dataset), "--do_train", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none", "--seed", "7",
            "--disable_tqdm", "true", "--logging_steps", "1", "--output_dir", str(tmp_path / run),
        ])
    a, b = (load_file(tmp_path / run / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    # without a progress bar, every logging step says how far it is and how long is left
    progress = [line.split("train_base: ", 1)[1] for line in capfd.readouterr().err.splitlines()
                if "train_base: step " in line]
    assert progress[:3] == [m for m in progress[:3] if "s left" in m] and len(progress) == 6
    assert progress[2].startswith("step 3/3 (100%)") and progress[0].startswith("step 1/3 (33%)")
