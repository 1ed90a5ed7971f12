"""The generation demo (demo/generation_example.py) on a tiny GPT-2 + tiny memory, in-process."""

from __future__ import annotations

import json
import shutil

import pytest

from demo.generation_example import is_right, main, normalize_answer
from models.memory_directory import save_memory
from tests.models.test_joint_hooks import tiny_memory
from utils.cli import UsageError

PROMPTS = ["the river city of", "a king was born near the old tower", "many people"]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tiny_gpt2_dir):
    """A saved tiny GPT-2 (with its tokenizer) and a saved tiny random memory reading its block 1."""
    from transformers import AutoConfig

    memory_dir = tmp_path_factory.mktemp("memory")
    save_memory(memory_dir, tiny_memory(AutoConfig.from_pretrained(tiny_gpt2_dir)), results={}, record={})
    return tiny_gpt2_dir, memory_dir


def run_demo(tmp_path, tiny_pair, *extra, name="out.json"):
    model_dir, memory_dir = tiny_pair
    out = tmp_path / name
    result = main(["--model_name_or_path", str(model_dir), "--knn_generator_path", str(memory_dir),
                   "--max_new_tokens", "6", "--output_file", str(out), *extra])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    return saved


def test_prompts_give_base_and_joint_continuations(tmp_path, tiny_pair, capsys):
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    saved = run_demo(tmp_path, tiny_pair, *args, "--lmbda", "1")
    assert [e["prompt"] for e in saved["examples"]] == PROMPTS
    for ex in saved["examples"]:
        assert isinstance(ex["base"], str) and isinstance(ex["joint"], str)
        assert ex["gold"] is None and ex["corrected"] is None
    assert any(e["base"] != e["joint"] for e in saved["examples"]), "a random memory alone should change something"
    printed = capsys.readouterr().out
    assert all(p in printed for p in PROMPTS) and "base + memory" in printed

    same = run_demo(tmp_path, tiny_pair, *args, "--lmbda", "0", name="zero.json")
    assert [e["joint"] for e in same["examples"]] == [e["base"] for e in same["examples"]]
    assert [e["base"] for e in same["examples"]] == [e["base"] for e in saved["examples"]]


def test_qa_from_a_quickstart_dir(tmp_path, tiny_pair):
    """Questions from corpus/qa_test.jsonl in the corpus's qa_prompt format; correction counts add up."""
    model_dir, memory_dir = tiny_pair
    quick = tmp_path / "quickstart"
    shutil.copytree(model_dir, quick / "base")
    shutil.copytree(memory_dir, quick / "memory")
    (quick / "corpus").mkdir()
    (quick / "corpus" / "meta.json").write_text(json.dumps({"qa_prompt": "the {question} was"}))
    qa = [{"question": q, "answer": a} for q, a in
          (("king", ["born"]), ("queen", ["the old tower"]), ("city", "river"), ("bridge", ["stone"]))]
    (quick / "corpus" / "qa_test.jsonl").write_text("".join(json.dumps(x) + "\n" for x in qa))
    out = tmp_path / "qa.json"
    result = main(["--quickstart_dir", str(quick), "--num_examples", "2", "--max_new_tokens", "4",
                   "--output_file", str(out)])
    assert [e["prompt"] for e in result["examples"]] == ["the king was", "the queen was"]
    assert result["examples"][1]["gold"] == ["the old tower"]
    scanned = main(["--quickstart_dir", str(quick), "--find_correction", "--scan", "3", "--max_new_tokens", "4"])
    summary = scanned["summary"]
    assert summary["num_prompts"] == 3
    assert all(e["corrected"] and e["joint_right"] and not e["base_right"] for e in scanned["examples"])
    assert len(scanned["examples"]) == summary["corrected"] == summary["joint_right"] - summary["base_right"] + \
        summary["broken"]


def test_answer_matching():
    assert normalize_answer(" Yorford River. ") == "yorford river"
    assert is_right(" Wenna.\nQuestion: next", ["Wenna"])
    assert is_right(" yorford river!", ["Yorford", "Yorford River"])
    assert not is_right(" Wenna is a country", ["Wenna"])
    assert not is_right("\nWenna", ["Wenna"])
    assert is_right(" 671,000", ["671,000"])


def test_missing_quickstart_dir_names_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--quickstart_dir.*scripts/quickstart.sh"):
        main(["--quickstart_dir", str(tmp_path / "absent")])
    with pytest.raises(UsageError, match="--quickstart_dir"):
        main(["--quickstart_dir", str(tmp_path / "absent"), "--prompt", "the king"])
    with pytest.raises(UsageError, match="lmbda"):
        main(["--quickstart_dir", str(tmp_path / "absent"), "--lmbda", "2"])
