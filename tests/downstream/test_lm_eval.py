"""lm-evaluation-harness on base + memory (downstream/lm_eval.py): the harness's scores are the joint model's.

Three tasks written to a temporary directory (YAML + local JSON lines, no hub): multiple choice
(``loglikelihood``), perplexity (``loglikelihood_rolling``) and greedy answers (``generate_until``). Each
per-item log-likelihood and answer the harness logs is recomputed here with a plain forward of the base
model, the memory on the hidden states of its key block and `interpolate_log_probs`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from downstream.lm_eval import MODEL_NAME, MLPMemoryLM, lm_eval_argv, main
from models import MemoryConfig, build_memory
from models.joint import interpolate_log_probs
from models.memory_directory import save_memory
from utils.cli import UsageError
from utils.hidden_state import HiddenStateHook

LAYER = 1
KNN_TEMP = 0.7
LMBDA = 0.7
TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]

MC = [
    {"question": "the king was born near the", "choices": ["river", "old stone tower", "city"], "answer": 1},
    {"question": "the queen built a", "choices": ["bridge", "market"], "answer": 0},
    {"question": "many people of the north", "choices": ["song", "festival", "king", "a new city"], "answer": 3},
]
ROLLING = [{"text": "the old tower in the north city was built by the king ."},
           {"text": "a river near the stone bridge ."}]
GEN = [{"prompt": "the king of the", "answer": "north"}, {"prompt": "people in the old", "answer": "city"},
       {"prompt": "a song and a", "answer": "festival"}]

TASK_YAMLS = {
    "tiny_mc": """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""",
    "tiny_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
""",
    "tiny_gen": """
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def write_tasks(directory, cache_dir):
    """The three tasks as lm-eval YAML over local JSON lines (``dataset_path: json``), read from ``cache_dir``."""
    for name, rows in zip(TASKS, (MC, ROLLING, GEN)):
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        header = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                  f"  cache_dir: {cache_dir}\ntest_split: test\n")
        (directory / f"{name}.yaml").write_text(header + TASK_YAMLS[name])


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_gpt2_dir):
    from transformers import AutoConfig

    directory = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    memory = build_memory(MemoryConfig.from_base(AutoConfig.from_pretrained(tiny_gpt2_dir), num_layers=1,
                                                 intermediate_size=48, layer=LAYER))
    with torch.no_grad():
        for p in memory.parameters():
            p.normal_(0, 0.5)
    save_memory(directory / "memory", memory, results={}, record={})
    (directory / "tasks").mkdir()
    write_tasks(directory / "tasks", directory / "datasets-cache")
    return {"dir": directory, "base": str(tiny_gpt2_dir), "memory": str(directory / "memory"),
            "tasks": str(directory / "tasks")}


def evaluate(setup, model: str, model_args: str) -> dict:
    """The harness on the three tasks, in process, with the samples it logs."""
    task_manager = TaskManager(include_path=setup["tasks"], include_defaults=False)
    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=task_manager,
                           batch_size=2, device="cpu", log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def joint_run(setup):
    return evaluate(setup, MODEL_NAME, f"base={setup['base']},memory={setup['memory']},lmbda={LMBDA},"
                                       f"knn_temp={KNN_TEMP}")


@pytest.fixture(scope="module")
def reference(setup):
    """The base model, its tokenizer and the memory, loaded by transformers and the memory class themselves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models import load_memory

    return (AutoModelForCausalLM.from_pretrained(setup["base"]).eval(), AutoTokenizer.from_pretrained(setup["base"]),
            load_memory(setup["memory"]).eval())


@torch.no_grad()
def joint_log_probs(reference, ids: list[int], lmbda: float) -> torch.Tensor:
    """(T, V) next-token log-probs of base + memory: one plain forward, the memory on block LAYER's FFN input."""
    model, _, memory = reference
    with HiddenStateHook(model, LAYER) as hook:
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        hidden = hook.hidden[0]
    lm = torch.log_softmax(logits.float(), dim=-1)
    return interpolate_log_probs(lm, torch.log_softmax(memory(hidden).float() / KNN_TEMP, dim=-1), lmbda)


def continuation_log_likelihood(reference, context_ids: list[int], continuation_ids: list[int], lmbda: float) -> float:
    log_probs = joint_log_probs(reference, context_ids + continuation_ids, lmbda)
    positions = range(len(context_ids) - 1, len(context_ids) + len(continuation_ids) - 1)
    return sum(log_probs[p, t].item() for p, t in zip(positions, continuation_ids))


def encode(reference, text: str) -> list[int]:
    return reference[1](text, add_special_tokens=False).input_ids


def mc_log_likelihoods(samples) -> list[float]:
    """Every choice's log-likelihood, document by document, in one flat list."""
    return [resp[0][0] for s in sorted(samples, key=lambda s: s["doc_id"]) for resp in s["resps"]]


def rolling_log_likelihoods(samples) -> list[float]:
    return [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])]


def generations(samples) -> list[str]:
    return [s["filtered_resps"][0] for s in sorted(samples, key=lambda s: s["doc_id"])]


def test_multiple_choice_log_likelihoods_are_the_joint_model_s(joint_run, reference):
    samples = sorted(joint_run["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC)
    for doc, sample in zip(MC, samples):
        requests = [tuple(arguments[:2]) for arguments in sample["arguments"]]
        assert requests == [(doc["question"], " " + choice) for choice in doc["choices"]]
        expected = [continuation_log_likelihood(reference, encode(reference, doc["question"]),
                                                encode(reference, choice), LMBDA) for choice in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert sample["acc"] == float(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert joint_run["results"]["tiny_mc"]["acc,none"] == pytest.approx(
        sum(s["acc"] for s in samples) / len(samples))


def test_rolling_log_likelihoods_are_the_joint_model_s(joint_run, reference):
    eos = reference[1].eos_token_id  # the harness's first context token when the tokenizer has no BOS
    assert reference[1].bos_token_id is None
    got = rolling_log_likelihoods(joint_run["samples"]["tiny_rolling"])
    expected = [continuation_log_likelihood(reference, [eos], encode(reference, doc["text"]), LMBDA) for doc in ROLLING]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)


@torch.no_grad()
def greedy_answer(reference, prompt: str, lmbda: float, max_new_tokens: int = 4) -> str:
    """Greedy decoding by hand, one full forward per token, cut at the task's stop string."""
    ids = encode(reference, prompt)
    start = len(ids)
    for _ in range(max_new_tokens):
        ids.append(int(joint_log_probs(reference, ids, lmbda)[-1].argmax()))
    return reference[1].decode(ids[start:], skip_special_tokens=True).split(".")[0]


def test_generated_answers_are_the_joint_model_s(joint_run, reference):
    got = generations(joint_run["samples"]["tiny_gen"])
    assert got == [greedy_answer(reference, doc["prompt"], LMBDA) for doc in GEN]
    # the memory matters here: the base alone answers otherwise somewhere
    assert got != [greedy_answer(reference, doc["prompt"], 0.0) for doc in GEN]


def test_results_record_the_joint_settings(joint_run, setup):
    record = joint_run["config"][MODEL_NAME]
    assert (record["memory"], record["lmbda"], record["memory_temp"]) == (setup["memory"], LMBDA, KNN_TEMP)
    assert (record["lmbda_source"], record["memory_temp_source"]) == ("--lmbda", "--memory_temp")


def test_a_joint_directory_is_a_base_with_its_memory(setup, joint_run):
    """base=JOINT_DIR (python -m models.convert --joint) brings the memory, lmbda and memory_temp it records."""
    from models.convert import main as convert_main

    joint_dir = setup["dir"] / "joint"
    assert convert_main(["--joint", "--base_model", setup["base"], "--memory", setup["memory"], "--output",
                         str(joint_dir), "--lmbda", str(LMBDA), "--memory_temp", str(KNN_TEMP)]) == 0
    run = evaluate(setup, MODEL_NAME, f"base={joint_dir}")
    record = run["config"][MODEL_NAME]
    assert (record["lmbda"], record["memory_temp"], record["memory"]) == (LMBDA, KNN_TEMP, str(joint_dir))
    assert mc_log_likelihoods(run["samples"]["tiny_mc"]) == mc_log_likelihoods(joint_run["samples"]["tiny_mc"])
    assert generations(run["samples"]["tiny_gen"]) == generations(joint_run["samples"]["tiny_gen"])


def test_lmbda_0_is_the_harness_s_own_hf_model(setup, reference):
    zero = evaluate(setup, MODEL_NAME, f"base={setup['base']},memory={setup['memory']},lmbda=0")
    hf = evaluate(setup, "hf", f"pretrained={setup['base']},dtype=float32")
    z, h = zero["samples"], hf["samples"]
    assert mc_log_likelihoods(z["tiny_mc"]) == pytest.approx(mc_log_likelihoods(h["tiny_mc"]), rel=1e-5, abs=1e-5)
    assert rolling_log_likelihoods(z["tiny_rolling"]) == pytest.approx(rolling_log_likelihoods(h["tiny_rolling"]),
                                                                       rel=1e-5, abs=1e-5)
    assert generations(z["tiny_gen"]) == generations(h["tiny_gen"])
    assert generations(zero["samples"]["tiny_gen"]) == [greedy_answer(reference, d["prompt"], 0.0) for d in GEN]


class OwnTasksOnly(TaskManager):
    """lm-eval's task manager without its 14,000 built-in tasks, which take half a minute to index on 2 cores."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "include_defaults": False})


def test_the_command_runs_lm_eval_s_cli_with_the_joint_model(setup, joint_run, monkeypatch):
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", OwnTasksOnly)  # the CLI imports it from there when it runs
    out = setup["dir"] / "cli"
    main(["--model_args", f"base={setup['base']},memory={setup['memory']},lmbda={LMBDA},knn_temp={KNN_TEMP}",
          "--include_path", setup["tasks"], "--tasks", "tiny_mc", "--device", "cpu", "--batch_size", "2",
          "--output_path", str(out), "--log_samples"])
    results = [json.loads(p.read_text()) for p in out.rglob("results_*.json")]
    assert len(results) == 1
    assert results[0]["config"]["model"] == MODEL_NAME
    # filed under a name derived from the base and the memory, not a random one (lm-eval reads pretrained=)
    assert results[0]["model_name"] == f"{setup['base']}+{setup['memory']}"
    assert results[0]["model_name_sanitized"] in {p.parent.name for p in out.rglob("results_*.json")}
    assert results[0]["results"]["tiny_mc"]["acc,none"] == joint_run["results"]["tiny_mc"]["acc,none"]
    samples = [json.loads(line) for p in out.rglob("samples_tiny_mc_*.jsonl") for line in p.read_text().splitlines()]
    logged = [float(value) for value in mc_log_likelihoods(samples)]  # the samples file holds them as strings
    assert logged == pytest.approx(mc_log_likelihoods(joint_run["samples"]["tiny_mc"]), rel=1e-6)


def test_argv_gets_the_run_command_and_the_model():
    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", MODEL_NAME, "--tasks", "x"]
    assert lm_eval_argv(["run", "--model", "hf", "--tasks", "x"]) == ["run", "--model", "hf", "--tasks", "x"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]


@pytest.mark.parametrize("kwargs, message", [
    ({"memory": "m", "lmbda": 0.5}, "needs base=MODEL"),
    ({"pretrained": "gpt2"}, "needs base=MODEL"),  # pretrained= only names the results
    ({"base": "b", "memory": "m", "memory_temp": 1.0, "knn_temp": 1.0}, "memory_temp or knn_temp"),
    ({"base": "b", "lmbda": 0.5}, "only used with a memory"),
    ({"base": "b", "dtype": "float8"}, "dtype must be one of"),
    ({"base": "b", "revision": "main"}, "unknown model argument(s) revision"),
])
def test_model_argument_errors_name_the_argument(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        MLPMemoryLM(**kwargs)


def test_bad_lmbda_and_a_missing_memory_are_usage_errors(setup):
    with pytest.raises(UsageError, match=r"--model_args: --lmbda values must be in \[0, 1\]"):
        MLPMemoryLM(base=setup["base"], memory=setup["memory"], lmbda=1.5)
    with pytest.raises(UsageError, match="memory"):
        MLPMemoryLM(base=setup["base"], memory=str(setup["dir"] / "nowhere"), lmbda=0.5)
