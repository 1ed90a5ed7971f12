"""Model cards: the ``README.md`` of a memory, a joint model or a released-layout export, in the Hugging Face format.

A card is YAML front matter (``base_model``, ``datasets``, ``library_name``, ``tags``, ``pipeline_tag`` for a
joint model, and ``model-index`` with the metrics when they are known) and a Markdown body: what the
directory holds, how it was made (from its ``meta.json``), how to load it. Uploading the directory publishes
it as it is. `save_memory`, `models.joint.build` and ``models.convert --to official`` write one; the recipe
runner (`scripts.pipeline`) rewrites the memory's with the run's metrics (from its summary and ledger).
A local base model or dataset is named in the body only: the hub's front matter takes hub names.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from utils.io import META_NAME, read_json

CARD = "README.md"
PAPER = "https://arxiv.org/abs/2508.01832"
TAGS = ["mlp-memory", "knn-lm", "retrieval", "memory"]


def _hub_name(name: str | None) -> str | None:
    """``name`` when it reads as a hub name (``owner/model`` or ``gpt2``), None for a local path."""
    if not name or os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or name.count("/") > 1:
        return None
    return name


def read_front_matter(text: str) -> dict:
    """The YAML front matter of a card's text ({} when it has none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {}


def _front_matter(base_model: str | None, datasets: list[str], metrics: list[dict], name: str,
                  pipeline_tag: str | None = None) -> str:
    front: dict = {}
    if hub := _hub_name(base_model):
        front["base_model"] = hub
    if datasets:
        front["datasets"] = datasets
    front["library_name"] = "transformers"
    front["tags"] = TAGS
    if pipeline_tag:
        front["pipeline_tag"] = pipeline_tag
    if metrics:
        front["model-index"] = [{"name": name, "results": metrics}]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"


def card_metrics(summary: dict, dataset: str = "the run's test split", dataset_type: str = "local") -> list[dict]:
    """``model-index`` results from a run's summary (`downstream.summary`): test perplexity of the base, of base +
    memory at the recorded lmbda and of the kNN-LM; QA exact match with and without the memory."""
    perplexity, lmbda, results = summary.get("test_perplexity", {}), summary.get("lmbda", {}), []
    entries = [{"type": "perplexity", "name": "test perplexity, base model alone", "value": perplexity.get("base")}]
    if "base_plus_memory" in perplexity:
        entries.append({"type": "perplexity", "value": perplexity["base_plus_memory"],
                        "name": f"test perplexity, base + memory (lmbda {lmbda.get('base_plus_memory', 0):g}, "
                                f"{lmbda.get('base_plus_memory_chosen_on', 'fixed')})"})
    if "knn_lm" in perplexity:
        entries.append({"type": "perplexity", "value": perplexity["knn_lm"],
                        "name": f"test perplexity, kNN-LM (lmbda {lmbda.get('knn_lm', 0):g})"})
    dataset_entry = {"name": dataset, "type": dataset_type, "split": "test"}
    if entries[0]["value"] is not None or len(entries) > 1:
        results.append({"task": {"type": "text-generation", "name": "Language modeling"}, "dataset": dataset_entry,
                        "metrics": [e for e in entries if e["value"] is not None]})
    if qa := summary.get("qa_test"):
        metrics = [{"type": "exact_match", "name": "exact match, base model alone", "value": qa["base"]["exact_match"]}
                   ] if "base" in qa else []
        if "base_plus_memory" in qa:
            metrics.append({"type": "exact_match", "value": qa["base_plus_memory"]["exact_match"],
                            "name": f"exact match, base + memory (lmbda {qa['lmbda']:g}, {qa['lmbda_chosen_on']})"})
        if metrics:
            results.append({"task": {"type": "question-answering", "name": "Closed-book QA"},
                            "dataset": {**dataset_entry, "name": f"{dataset} (questions)"}, "metrics": metrics})
    return results


def _metrics_table(metrics: list[dict]) -> list[str]:
    if not metrics:
        return []
    lines = ["## Results", "", "| task | metric | value |", "|---|---|---:|"]
    for result in metrics:
        lines += [f"| {result['task']['name']} | {m['name']} | {m['value']:.4g} |" for m in result["metrics"]]
    return lines + [""]


def _provenance(meta: dict) -> list[str]:
    """How a memory was made, from its meta.json."""
    lines = []
    if source := meta.get("converted_from"):
        lines.append(f"- Converted from the released implementation's {source.get('layout')} layout "
                     f"(`python -m models.convert --from official`, from `{source.get('path')}`).")
    if mode := meta.get("mode"):
        store, targets = meta.get("datastore") or {}, meta.get("knn_targets") or {}
        rows = store.get("rows") or targets.get("rows")
        lines.append(f"- Trained {mode} (`train_mlpmem_{mode}`) to imitate the kNN distribution of "
                     f"{rows:,} datastore rows" if rows else f"- Trained {mode} (`train_mlpmem_{mode}`)")
        if targets:
            retriever = (targets.get("retriever") or {}).get("model") or {}
            lines.append(f"  (kNN targets: k {targets.get('k')}, knn_temp {targets.get('knn_temp')}, retriever "
                         f"`{retriever.get('model_name_or_path', 'the base model')}`).")
    if training := meta.get("training"):
        lines.append(f"- Loss `{training.get('alpha')} * KL(p_knn || q) + {1 - training.get('alpha', 0.5):g} * CE`, "
                     f"AdamW lr {training.get('learning_rate')}, {training.get('lr_scheduler_type')} schedule, "
                     f"{training.get('num_train_epochs')} epochs, seed {training.get('seed')}.")
    if results := meta.get("results"):
        shown = {k: v for k, v in results.items() if isinstance(v, (int, float))}
        lines.append("- Final training results: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()) + ".")
    return lines


def memory_card(meta: dict, name: str, metrics: list[dict] = (), made_by: str | None = None,
                ledger: str | None = None, datasets: list[str] = (), base_model: str | None = None) -> str:
    """The card of a memory directory (train_mlpmem_* or ``models.convert --from official``) from its meta.json;
    ``base_model`` names the base on the hub when the recorded one is a local copy of it."""
    memory = meta.get("memory", {})
    base = base_model or (meta.get("base_model") or {}).get("model_name_or_path")
    lines = [f"# {name}", "",
             f"An [MLP Memory]({PAPER}) for the base model `{base}`: a {memory.get('memory_style')}-style network of "
             f"{memory.get('num_layers')} feed-forward blocks ({memory.get('parameters', 0):,} parameters) that reads "
             f"the feed-forward input of block {meta.get('layer')} of the base model and outputs the next-token "
             "distribution a kNN-LM retriever would give. Interpolated with the base model, it replaces the datastore "
             "and its search.", "", "## How it was made", "", *_provenance(meta)]
    if made_by:
        lines.append(f"- Command: `{made_by}`" + (f" (the run's ledger: `{ledger}`)." if ledger else "."))
    lines += ["", *_metrics_table(list(metrics)), "## How to load it", "",
              "With this project's code on the Python path (`pip install -e .` in its repository):", "", "```python",
              "from transformers import AutoModelForCausalLM", "from models import load_memory",
              "from models.joint import JointLM", "",
              f"base = AutoModelForCausalLM.from_pretrained({base!r})",
              'joint = JointLM(base, load_memory("THIS_DIRECTORY"), lmbda=0.25)  # checks the memory fits the base',
              "```", "",
              "`python -m models.convert --joint` makes one `AutoModelForCausalLM` directory of base + memory.",
              ""]
    return _front_matter(base, list(datasets), list(metrics), name) + "\n" + "\n".join(lines)


def joint_card(meta: dict, name: str, metrics: list[dict] = ()) -> str:
    """The card of a joint model directory (``models.convert --joint``) from its meta.json."""
    base = (meta.get("base_model") or {}).get("model_name_or_path")
    parameters = meta.get("parameters", {})
    lines = [f"# {name}", "",
             f"The base model `{base}` and the {meta.get('memory_kind')} `{meta.get('memory')}` as one causal LM "
             f"(`MLPMemoryForCausalLM`, [MLP Memory]({PAPER})): its logits are the interpolation "
             f"`log((1 - lmbda) p_lm + lmbda q)` at lmbda {meta.get('lmbda')} and memory temperature "
             f"{meta.get('memory_temp', meta.get('knn_temp'))}, with the memory reading block "
             f"{meta.get('memory_layer')}. "
             f"Parameters: base {parameters.get('base', 0):,}, memory {parameters.get('memory', 0):,}.", "",
             "## How it was made", "",
             f"`python -m models.convert --joint --base_model {base} --memory {meta.get('memory')} --lmbda "
             f"{meta.get('lmbda')}`; `meta.json` records the base model check and the checksums.", "",
             *_metrics_table(list(metrics)), "## How to load it", "", "```python",
             "import models  # registers MLPMemoryForCausalLM with AutoConfig / AutoModelForCausalLM",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'joint = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY")',
             'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")', "```", ""]
    return _front_matter(base, [], list(metrics), name, "text-generation") + "\n" + "\n".join(lines)


def released_card(memory_meta: dict, name: str, base_model: str, layer_position: int) -> str:
    """The card of a memory written in the released implementation's layout (``models.convert --to official``)."""
    memory = memory_meta.get("memory", {})
    lines = [f"# {name}", "",
             f"An [MLP Memory]({PAPER}) in the layout of the released implementation (Binn0/MLPMemory): the base "
             f"model's `config.json` with the memory's depth ({memory.get('num_layers')} blocks, "
             f"{memory.get('parameters', 0):,} parameters), `model.safetensors` under the released weight names, and "
             f"`mlp_memory_config.json` (`layer_position` {layer_position}). Base model: `{base_model}`.", "",
             "## How it was made", "", "Exported with `python -m models.convert --to official` from a memory of this "
             "project:", "", *_provenance(memory_meta), "", "## How to load it", "",
             "With the released code, as its memories; or with this project's `models.load_memory`, which "
             "recognises the layout (`python -m models.convert --from official` records the base model).", ""]
    return _front_matter(base_model, [], [], name) + "\n" + "\n".join(lines)


def write_card(directory: str | os.PathLike, text: str) -> Path:
    path = Path(directory) / CARD
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_memory_card(directory: str | os.PathLike, metrics: list[dict] = (), made_by: str | None = None,
                      ledger: str | None = None, datasets: list[str] = (), base_model: str | None = None) -> Path:
    """(Re)write a memory directory's card from its meta.json, with ``metrics`` when given."""
    directory = Path(directory)
    meta = read_json(directory / META_NAME)
    return write_card(directory, memory_card(meta, directory.name, metrics, made_by, ledger, datasets, base_model))
