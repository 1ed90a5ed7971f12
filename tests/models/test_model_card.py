"""Model cards (models/model_card.py): every memory, joint-model and released-layout directory carries a README.md
whose Hugging Face front matter parses back, with the run's metrics when the runner has them."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models import MemoryConfig, build_memory
from models.convert import main as convert_main
from models.memory_directory import save_memory
from models.model_card import CARD, card_metrics, read_front_matter, write_memory_card
from utils.modeling import model_fingerprint, tokenizer_fingerprint

LAYER = 1
SUMMARY = {"test_perplexity": {"base": 43.7, "knn_lm": 37.1, "memory_alone": 60.0, "base_plus_memory": 36.9},
           "lmbda": {"knn_lm": 0.25, "base_plus_memory": 0.25, "base_plus_memory_chosen_on": "validation perplexity"},
           "qa_test": {"questions": 245, "base": {"exact_match": 19.6}, "base_plus_memory": {"exact_match": 33.9},
                       "lmbda": 0.5, "lmbda_chosen_on": "validation questions (exact match)"}}


def saved_memory(directory, base_dir, base_name: str, intermediate_size: int | None = 48):
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(base_dir))
    config = MemoryConfig.from_base(base.config, num_layers=1, intermediate_size=intermediate_size, layer=LAYER,
                                    base_model={"model_name_or_path": base_name}, tokenizer_fingerprint=fingerprint,
                                    base_model_fingerprint=model_fingerprint(base, LAYER))
    torch.manual_seed(0)
    memory = build_memory(config).eval()
    record = {"base_model": config.base_model, "layer": LAYER, "mode": "offline",
              "datastore": {"rows": 1018}, "knn_targets": {"k": 8, "knn_temp": 4.0, "rows": 1018},
              "training": {"alpha": 0.5, "learning_rate": 5e-4, "lr_scheduler_type": "linear", "num_train_epochs": 2,
                           "seed": 42}}
    save_memory(directory, memory, {"val_kl": 1.25, "train_steps": 16}, record)
    return directory


def test_a_saved_memory_carries_a_card_whose_front_matter_parses(tmp_path, tiny_gpt2_dir):
    memory = saved_memory(tmp_path / "memory", tiny_gpt2_dir, "openai-community/gpt2")
    text = (memory / CARD).read_text()
    front = read_front_matter(text)
    assert front["base_model"] == "openai-community/gpt2" and front["library_name"] == "transformers"
    assert "mlp-memory" in front["tags"] and "model-index" not in front  # no metrics yet
    assert "k 8, knn_temp 4.0" in text and "val_kl 1.25" in text and "load_memory" in text
    local = saved_memory(tmp_path / "local", tiny_gpt2_dir, str(tiny_gpt2_dir))
    assert "base_model" not in read_front_matter((local / CARD).read_text())  # a local path is no hub name
    assert str(tiny_gpt2_dir) in (local / CARD).read_text()


def test_the_runner_writes_the_runs_metrics_into_the_card(tmp_path, tiny_gpt2_dir):
    memory = saved_memory(tmp_path / "memory", tiny_gpt2_dir, str(tiny_gpt2_dir))  # a local copy of a hub model
    write_memory_card(memory, card_metrics(SUMMARY, "wikitext", "wikitext"), made_by="bash scripts/pipeline.sh r.yaml",
                      ledger="outputs/r/ledger.json", datasets=["wikitext"], base_model="openai-community/gpt2")
    text = (memory / CARD).read_text()
    front = read_front_matter(text)
    assert front["base_model"] == "openai-community/gpt2" and front["datasets"] == ["wikitext"]
    index = front["model-index"]
    assert index[0]["name"] == "memory"
    perplexity, qa = index[0]["results"]
    assert perplexity["task"]["type"] == "text-generation" and perplexity["dataset"] == {
        "name": "wikitext", "type": "wikitext", "split": "test"}
    assert [m["value"] for m in perplexity["metrics"]] == [43.7, 36.9, 37.1]
    assert "lmbda 0.25, validation perplexity" in perplexity["metrics"][1]["name"]
    assert [m["value"] for m in qa["metrics"]] == [19.6, 33.9]
    assert "`bash scripts/pipeline.sh r.yaml`" in text and "outputs/r/ledger.json" in text
    assert "| Language modeling | test perplexity, base model alone | 43.7 |" in text


def test_joint_and_released_exports_carry_cards(tmp_path, tiny_gpt2_dir):
    memory = saved_memory(tmp_path / "memory", tiny_gpt2_dir, str(tiny_gpt2_dir), intermediate_size=None)
    assert convert_main(["--joint", "--base_model", str(tiny_gpt2_dir), "--memory", str(memory),
                         "--output", str(tmp_path / "joint"), "--lmbda", "0.3"]) == 0
    joint = (tmp_path / "joint" / CARD).read_text()
    assert read_front_matter(joint)["pipeline_tag"] == "text-generation"
    assert "lmbda 0.3" in joint and "AutoModelForCausalLM.from_pretrained" in joint
    convert_main(["--to", "official", "--input", str(memory), "--output", str(tmp_path / "official")])
    released = (tmp_path / "official" / CARD).read_text()
    assert read_front_matter(released)["library_name"] == "transformers"
    assert "layer_position" in released and AutoConfig.from_pretrained(tmp_path / "official").model_type == "gpt2"
