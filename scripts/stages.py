"""The pipeline's stages: the entry point each one runs, the flags it gets, the artifacts it reads and writes.

A recipe section's keys are the flags of its stage's entry point (its argument dataclasses, or its argparse
parser), plus a few runner keys (`RUNNER_KEYS`). The runner owns the flags that name the run's own
artifacts (`Stage.owned`: output directories, the dataset, the datastore ...), which come from
`utils.run_layout`. The values of ``shared`` flow to the stages that take them (`ROUTES`), unless a stage's
section sets the flag itself. Each stage makes one `Run` per entry-point call (one per split; QA: one per split
and the choice between them).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Callable

from scripts.runs import CHOSEN, Run, Stage, field_default, function_parser, hf_parser
from utils.cli import UsageError
from utils.io import read_json
from utils.recipes import Recipe, RecipeSchema, expand
from utils.run_layout import (EVAL_RESULTS, HALUEVAL_RESULTS, JOINT_RESULTS, KNNLM_RESULTS, META, QA_RESULTS,
                              TRAIN_RESULTS, YES_NO_RESULTS, RunLayout)

DEFAULT_LMBDAS = [0.25, 0.5, 0.75]  # the lmbda sweeps chosen on validation (perplexity and QA)
RUNNER_KEYS = {  # keys of a stage section that are not its entry point's flags (Stage.runner_keys: which stage)
    "splits": "the splits to evaluate, one run each (eval_base, knnlm, eval_joint)",
    "nproc": "processes (accelerate launch) of this stage",
    "lmbdas": "the lmbdas tried on the validation questions, all in one eval_qa run (qa)",
    "validation_file": "QA file of the validation questions (qa; default: the corpus's)",
    "test_file": "QA file of the test questions (qa; default: the corpus's)",
    "base_model": "hub repository of a base model to download (download)",
    "memory": "hub repository of a released memory to download (download)",
}
SHARED = {
    "model": "the base model: hub name, directory, or directory of gguf_file (default: the run's base/ when "
             "train_base runs, the downloaded base_model when download names one)",
    "gguf_file": "GGUF file inside the model's directory",
    "tokenizer": "tokenizer to preprocess with (default: the corpus's when the corpus stage runs, else the model)",
    "dataset": "an existing preprocessed dataset: preprocess is not run",
    "knn_targets": "existing kNN targets of the datastore's rows (another retriever sharing the tokenizer): index, "
                   "knn_targets and knnlm are not run",
    "k": "neighbours of the kNN targets and the kNN-LM",
    "knn_temp": "temperature of the kNN distribution (targets and kNN-LM)",
    "memory_temp": "temperature of the memory's logits in the interpolation (--memory_temp, default 1)",
    "lmbdas": "lmbda sweep of base + memory and the kNN-LM, chosen on validation",
    "eval_windows": "evaluate only the first N windows of each split",
    "eval_batch": "windows per forward pass in the evaluations and the datastore",
    "nproc": "processes for the datastore, the kNN search and memory training",
    "knn_gpu": "index build, kNN search and kNN-LM search on the GPU",
}
JUDGMENT_STAGES = ("yes_no", "yes_no_claims", "halueval", "halueval_pairs")
MODEL_STAGES = ("eval_base", "datastore", "knnlm", "memory_online", "eval_joint", "qa", *JUDGMENT_STAGES, "correction")
ROUTES: dict[str, dict[str, str]] = {  # shared key -> {stage: flag}
    "model": {**{stage: "model_name_or_path" for stage in MODEL_STAGES}, "convert": "base_model"},
    "gguf_file": {**{stage: "gguf_file" for stage in MODEL_STAGES}, "convert": "gguf_file", "preprocess": "gguf_file"},
    "tokenizer": {"preprocess": "tokenizer_path"},
    "k": {"knn_targets": "k", "knnlm": "k"},
    "knn_temp": {"knn_targets": "knn_temp", "knnlm": "knn_temp"},
    "memory_temp": {stage: "memory_temp" for stage in ("eval_joint", "qa", *JUDGMENT_STAGES, "correction")},
    "lmbdas": {"eval_joint": "lmbda", "knnlm": "lmbda"},
    "eval_windows": {stage: "max_eval_samples" for stage in ("eval_base", "knnlm", "eval_joint")},
    "eval_batch": {stage: "per_device_eval_batch_size" for stage in ("eval_base", "datastore", "knnlm", "eval_joint")},
    "knn_gpu": {"index": "knn_gpu", "knn_targets": "knn_gpu", "knnlm": "knn_gpu"},
}
PLAN_KEYS = {
    "train_tokens": "tokens of the train split (the datastore's rows)",
    "validation_tokens": "tokens of the validation split", "test_tokens": "tokens of the test split",
    "parameters": "the base model's parameters", "hidden_size": "the base model's width (the keys' dimension)",
    "memory_parameters": "the memory's parameters (default: as many as the base model's)",
}


# ---------------------------------------------------------------------------------------------------
# The context every builder reads: the recipe, the layout, the shared values


class Context:
    """The recipe resolved against the run's layout: shared values with their defaults, sections expanded."""

    def __init__(self, recipe: Recipe, repo: Path):
        self.recipe = recipe
        self.variables = {"repo": str(repo)}
        self.variables["out"] = str(expand(recipe.out, self.variables))
        self.layout = RunLayout(self.variables["out"])
        chosen = recipe.stages(schema())
        shared = {key: None for key in SHARED}
        shared.update(k=field_default("knn_utils.knn_targets:TargetSettings", "k"), nproc=1, knn_gpu=False,
                      knn_temp=field_default("knn_utils.knn_targets:TargetSettings", "knn_temp"), lmbdas=DEFAULT_LMBDAS)
        shared.update(expand(recipe.section("shared"), self.variables))
        downloaded = self.expanded("download").get("base_model") if "download" in chosen else None
        if "train_base" in chosen:
            if recipe.section("shared").get("model"):
                raise UsageError(f"recipe {recipe.path}: shared.model is the run's own base/ when train_base runs; "
                                 "name the model train_base starts from in its section (model_name_or_path)")
            shared["model"], shared["gguf_file"] = str(self.layout.base), None
        elif downloaded and not shared["model"]:
            shared["model"] = str(self.layout.download(downloaded))
        if shared["tokenizer"] is None:
            shared["tokenizer"] = str(self.layout.corpus / "tokenizer") if "corpus" in chosen else shared["model"]
        self.shared = shared
        skipped = {"preprocess"} if shared["dataset"] else set()
        skipped |= {"index", "knn_targets", "knnlm"} if shared["knn_targets"] else set()
        self.skipped = [stage for stage in chosen if stage in skipped]
        self.stages = [stage for stage in chosen if stage not in skipped]
        if {"memory", "memory_online"} <= set(self.stages):
            raise UsageError(f"recipe {recipe.path}: stages memory and memory_online both train {self.layout.memory}: "
                             "keep one (memory: on the saved keys; memory_online: on the base's hidden states)")

    def expanded(self, stage: str) -> dict:
        return expand(self.recipe.section(stage), self.variables)

    @property
    def dataset(self) -> str:
        return str(self.shared["dataset"] or self.layout.dataset)

    @property
    def knn_targets(self) -> str:
        return str(self.shared["knn_targets"] or self.layout.knn_targets)

    def model_input(self) -> dict:
        return {"model": self.shared["model"]} if self.shared["model"] else {}

    def settings(self, stage: str, owned: dict) -> dict:
        """The flags of one run of ``stage``: the runner's own (``owned``), the shared values routed to the stage,
        then the stage's section, which wins over shared values (runner keys left out)."""
        section = {k: v for k, v in self.expanded(stage).items() if k not in STAGES[stage].runner_keys}
        for flag in section:
            if flag in STAGES[stage].owned:
                raise UsageError(f"recipe {self.recipe.path}: stage {stage}: {flag} is set by the runner from the "
                                 "run's layout (utils/run_layout.py); remove it")
        routed = {flag: self.shared[key] for key, stages in ROUTES.items() for s, flag in stages.items()
                  if s == stage and self.shared.get(key) is not None}
        settings = {**owned, **routed, **section}
        if stage in MODEL_STAGES and settings.get("model_name_or_path") is None:
            raise UsageError(f"recipe {self.recipe.path}: stage {stage} needs a base model: set shared.model")
        return settings

    def nproc(self, stage: str, shared: bool = True) -> int:
        value = self.expanded(stage).get("nproc", self.shared["nproc"] if shared else 1)
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"recipe {self.recipe.path}: {stage}.nproc must be a whole number >= 1, got {value!r}")
        return value

    def splits(self, stage: str, default: list[str]) -> list[str]:
        splits = self.expanded(stage).get("splits", default)
        if not isinstance(splits, list) or not set(splits) <= {"train", "validation", "test"}:
            raise UsageError(f"recipe {self.recipe.path}: {stage}.splits must be a list of train, validation, test; "
                             f"got {splits!r}")
        return splits

    def recorded(self, path: Path, key: str):
        """A value a finished run recorded (a choice), or `CHOSEN` while that run has not finished."""
        return read_json(path)[key] if path.is_file() else CHOSEN


# ---------------------------------------------------------------------------------------------------
# The stages' runs


def _download(ctx: Context, section: dict) -> list[Run]:
    repos = [section[key] for key in ("base_model", "memory") if section.get(key)]
    if not repos:
        raise UsageError(f"recipe {ctx.recipe.path}: download needs base_model and/or memory (hub repositories)")
    return [Run(f"download_{repo.replace('/', '--')}", "download", "scripts.download",
                {"repo_id": repo, "local_dir": str(ctx.layout.download(repo)), "revision": section.get("revision")},
                ctx.layout.download(repo), {f"download:{repo}": ctx.layout.download(repo)})  # renamed in when complete
            for repo in repos]


def _corpus(ctx: Context, section: dict) -> list[Run]:
    out = ctx.layout.corpus  # done when its newest file is there: an older corpus gets its judgments written
    return [Run("corpus", "corpus", "utils.embedded_corpus", ctx.settings("corpus", {"output_dir": str(out)}),
                ctx.layout.halueval_fewshot, {"corpus": out}, results=out / META)]


def _preprocess(ctx: Context, section: dict) -> list[Run]:
    owned, inputs = {"output_dir": ctx.dataset}, {}
    if "corpus" in ctx.stages:
        owned.update({f"{split}_file": str(ctx.layout.corpus_file(f"{split}.txt"))
                      for split in ("train", "validation", "test")})
        inputs["corpus"] = ctx.layout.corpus
    settings = {**ctx.settings("preprocess", {}), **owned}
    for split in ("train", "validation", "test"):
        if settings.get(f"{split}_file") and "corpus" not in ctx.stages:
            inputs[f"{split}_file"] = settings[f"{split}_file"]
    return [Run("preprocess", "preprocess", "utils.preprocess_dataset", settings, Path(ctx.dataset) / META,
                {"dataset": Path(ctx.dataset)}, inputs, results=Path(ctx.dataset) / META)]


def _train_base(ctx: Context, section: dict) -> list[Run]:
    out = ctx.layout.base
    owned = {"dataset_name": ctx.dataset, "output_dir": str(out), "do_train": True}
    if "corpus" in ctx.stages and not section.get("model_name_or_path"):
        owned["tokenizer_name"] = str(ctx.layout.corpus / "tokenizer")
    return [Run("train_base", "train_base", "train_base", {**owned, **ctx.settings("train_base", {})},
                out / TRAIN_RESULTS, {"base": out}, {"dataset": Path(ctx.dataset)}, results=out / TRAIN_RESULTS)]


def _convert(ctx: Context, section: dict) -> list[Run]:
    released = ctx.expanded("download").get("memory") if "download" in ctx.stages else None
    source = section.get("input") or (ctx.layout.download(released) if released else None)
    if source is None:
        raise UsageError(f"recipe {ctx.recipe.path}: convert needs input (a released memory directory), or a download "
                         "stage naming memory")
    out = ctx.layout.memory
    settings = {"from_layout": "official", **ctx.settings("convert", {"output": str(out)}), "input": str(source)}
    return [Run("convert", "convert", "models.convert", settings, out / META, {"memory": out},
                {"released_memory": source, **ctx.model_input()}, results=out / META)]


def _eval_base(ctx: Context, section: dict) -> list[Run]:
    runs = []
    for split in ctx.splits("eval_base", ["test"]):
        out = ctx.layout.eval_base(split)
        owned = {"dataset_name": ctx.dataset, "do_eval": True, "eval_subset": split, "output_dir": str(out),
                 "report_to": "none"}
        runs.append(Run(f"eval_base_{split}", "eval_base", "train_base", ctx.settings("eval_base", owned),
                        out / EVAL_RESULTS, {f"eval_base_{split}": out},
                        {"dataset": Path(ctx.dataset), **ctx.model_input()}, results=out / EVAL_RESULTS,
                        nproc=ctx.nproc("eval_base", shared=False)))
    return runs


def _datastore(ctx: Context, section: dict) -> list[Run]:
    dstore, out = ctx.layout.dstore, ctx.layout.eval_base("train")
    owned = {"dataset_name": ctx.dataset, "do_eval": True, "eval_subset": "train", "output_dir": str(out),
             "report_to": "none", "save_knnlm_dstore": True, "dstore_dir": str(dstore)}
    return [Run("datastore", "datastore", "train_base", ctx.settings("datastore", owned), dstore / META,
                {"dstore": dstore, "eval_base_train": out}, {"dataset": Path(ctx.dataset), **ctx.model_input()},
                results=dstore / META, nproc=ctx.nproc("datastore"))]


def _index(ctx: Context, section: dict) -> list[Run]:
    index = ctx.layout.index
    settings = ctx.settings("index", {"dstore_path": str(ctx.layout.dstore), "index_path": str(index)})
    return [Run("index", "index", "knn_utils.build_index", settings, index / META, {"index": index},
                {"dstore": ctx.layout.dstore}, results=index / META)]


def _knn_targets(ctx: Context, section: dict) -> list[Run]:
    out = ctx.layout.knn_targets
    owned = {"dstore_path": str(ctx.layout.dstore), "index_path": str(ctx.layout.index), "output_path": str(out)}
    return [Run("knn_targets", "knn_targets", "knn_utils.saveKNNMulti", ctx.settings("knn_targets", owned),
                out / META, {"knn_targets": out}, {"dstore": ctx.layout.dstore, "index": ctx.layout.index},
                results=out / META, nproc=ctx.nproc("knn_targets"))]


def _knnlm(ctx: Context, section: dict) -> list[Run]:
    runs = []
    for split in ctx.splits("knnlm", ["validation", "test"]):
        out = ctx.layout.knnlm(split)
        owned = {"dataset_name": ctx.dataset, "eval_subset": split, "dstore_dir": str(ctx.layout.dstore),
                 "index_path": str(ctx.layout.index), "output_dir": str(out)}
        runs.append(Run(f"knnlm_{split}", "knnlm", "knn_utils.knnlm", ctx.settings("knnlm", owned),
                        out / KNNLM_RESULTS, {f"knnlm_{split}": out},
                        {"dataset": Path(ctx.dataset), "dstore": ctx.layout.dstore, "index": ctx.layout.index,
                         **ctx.model_input()}, results=out / KNNLM_RESULTS, nproc=ctx.nproc("knnlm", shared=False)))
    return runs


def _memory(ctx: Context, section: dict) -> list[Run]:
    out = ctx.layout.memory
    owned = {"knn_dstore_path": str(ctx.layout.dstore), "knn_save_path": ctx.knn_targets, "output_dir": str(out)}
    return [Run("memory", "memory", "train_mlpmem_offline", ctx.settings("memory", owned), out / META,
                {"memory": out}, {"dstore": ctx.layout.dstore, "knn_targets": Path(ctx.knn_targets)},
                results=out / "training_results.json", nproc=ctx.nproc("memory"))]


def _memory_online(ctx: Context, section: dict) -> list[Run]:
    """The memory trained on the base's hidden states, computed on the fly (no saved keys), into the same memory/."""
    out = ctx.layout.memory
    owned = {"dataset_name": ctx.dataset, "knn_save_path": ctx.knn_targets, "output_dir": str(out)}
    return [Run("memory_online", "memory_online", "train_mlpmem_online", ctx.settings("memory_online", owned),
                out / META, {"memory": out},
                {"dataset": Path(ctx.dataset), "knn_targets": Path(ctx.knn_targets), **ctx.model_input()},
                results=out / "training_results.json", nproc=ctx.nproc("memory_online"))]


def _eval_joint(ctx: Context, section: dict) -> list[Run]:
    runs = []
    for split in ctx.splits("eval_joint", ["validation", "test"]):
        out = ctx.layout.eval_joint(split)
        owned = {"dataset_name": ctx.dataset, "dataset_split_name": split, "output_dir": str(out),
                 "memory": str(ctx.layout.memory), "report_to": "none"}
        runs.append(Run(f"eval_joint_{split}", "eval_joint", "evaluate_joint", ctx.settings("eval_joint", owned),
                        out / JOINT_RESULTS, {f"eval_joint_{split}": out},
                        {"dataset": Path(ctx.dataset), "memory": ctx.layout.memory, **ctx.model_input()},
                        results=out / JOINT_RESULTS, nproc=ctx.nproc("eval_joint", shared=False)))
    return runs


def _qa(ctx: Context, section: dict) -> list[Run]:
    """One eval_qa run on the validation questions (the base alone and base + memory at each lmbda, one folder per
    setting, `RunLayout.qa`), the choice recorded from its lmbda folders, one run on the test questions at it."""
    layout = ctx.layout
    files = {split: section.get(f"{split}_file") or (str(layout.qa_file(split)) if "corpus" in ctx.stages else None)
             for split in ("validation", "test")}
    if not all(files.values()):
        raise UsageError(f"recipe {ctx.recipe.path}: qa needs validation_file and test_file (QA files), or the corpus "
                         "stage")
    inputs = {**ctx.model_input(), "memory": layout.memory}

    def qa_run(split: str, lmbdas, more_inputs: dict) -> Run:
        # Its artifacts are its results file and one folder per setting, not qa_<split>/ as a whole, which also
        # holds the choice recorded after it (qa_validation/lmbda_choice.json).
        out, name = layout.qa_dir(split), f"qa_{split}"
        owned = {"data_file": files[split], "output_dir": str(out), "memory": str(layout.memory), "lmbda": lmbdas}
        folders = {f"{name}/{folder.name}": folder for folder in
                   [layout.qa(split, None), *(out / f"lmbda_{CHOSEN}" if lmbda == CHOSEN else layout.qa(split, lmbda)
                                              for lmbda in (lmbdas if isinstance(lmbdas, list) else [lmbdas]))]}
        return Run(name, "qa", "downstream.eval_qa", ctx.settings("qa", owned), out / QA_RESULTS,
                   {name: out / QA_RESULTS, **folders}, {**inputs, f"{name}_file": files[split], **more_inputs},
                   results=out / QA_RESULTS)

    lmbdas = section.get("lmbdas", DEFAULT_LMBDAS)
    sweep = {f"qa_validation/lmbda_{lmbda:g}": layout.qa("validation", lmbda) for lmbda in lmbdas}
    choice = Run("qa_choice", "qa", "downstream.choose_lmbda", {"output_file": str(layout.qa_choice)},
                 layout.qa_choice, {"qa_choice": layout.qa_choice}, sweep, results=layout.qa_choice,
                 positional=[str(path) for path in sweep.values()])
    chosen = ctx.recorded(layout.qa_choice, "lmbda")
    return [qa_run("validation", list(lmbdas), {}), choice, qa_run("test", chosen, {"qa_choice": layout.qa_choice})]


def _qa_lmbda(ctx: Context, section: dict) -> dict:
    """The QA lmbda for the judgment stages and the demo: the recorded QA choice when the qa stage runs."""
    if "qa" in ctx.stages and "lmbda" not in section:
        return {"lmbda": ctx.recorded(ctx.layout.qa_choice, "lmbda")}
    return {}


def _judgment(stage: str, module: str, out: Path, data: str, results: str,
              judge: str | None = None) -> Callable[[Context, dict], list[Run]]:
    """The builder of a judgment stage over the corpus's ``data`` items (``judge``: the stage's fixed --judge)."""
    def build(ctx: Context, section: dict) -> list[Run]:
        owned = {"output_dir": str(out(ctx.layout)), "memory": str(ctx.layout.memory), **_qa_lmbda(ctx, section)}
        if judge is not None:
            owned["judge"] = judge
        settings = ctx.settings(stage, owned)
        if not settings.get("data_file") and not settings.get("dataset_name"):
            settings["data_file"] = str(ctx.layout.corpus_file(data))  # the corpus's items, and its few-shot prompt
            if stage == "halueval" and "instruction" not in settings:
                settings["instruction"] = str(ctx.layout.halueval_fewshot)
        inputs = {**ctx.model_input(), "memory": ctx.layout.memory, "data": settings.get("data_file") or ""}
        if "lmbda" in owned:
            inputs["qa_choice"] = ctx.layout.qa_choice
        return [Run(stage, stage, module, settings, out(ctx.layout) / results, {stage: out(ctx.layout)}, inputs,
                    results=out(ctx.layout) / results)]

    return build


def _correction(ctx: Context, section: dict) -> list[Run]:
    out = ctx.layout.correction
    owned = {"quickstart_dir": str(ctx.layout.out), "memory": str(ctx.layout.memory),
             "output_file": str(out), **_qa_lmbda(ctx, section)}
    inputs = {**ctx.model_input(), "memory": ctx.layout.memory, "qa_test_file": ctx.layout.qa_file("test")}
    return [Run("correction", "correction", "demo.generation_example", ctx.settings("correction", owned), out,
                {"correction": out}, inputs, results=out)]


def _summary(ctx: Context, section: dict) -> list[Run]:
    return [Run("summary", "summary", "downstream.summary", {"output_dir": str(ctx.layout.out)}, ctx.layout.summary,
                {"summary": ctx.layout.summary}, results=ctx.layout.summary, always=True)]


MODEL = "utils.arguments:PretrainedModelArguments"
CHECKS = "utils.arguments:BaseCheckArguments"
VERIFY = "utils.arguments:VerificationArguments"
MEMORY = "models.joint.settings:MemoryArguments"  # the front door: --memory, --lmbda, --memory_temp and checks
MEMORY_OWNED = frozenset({"memory", "knn_generator_path", "use_neural_knn"})  # the run's memory/, released names too
TRAIN_BASE = hf_parser("utils.arguments:ModelArguments", "utils.arguments:TrainingDataArguments",
                       "utils.arguments:DstoreArguments", "transformers:TrainingArguments", VERIFY)
YES_NO_PARSER = hf_parser(MODEL, "downstream.choice_eval:ChoiceEvalArguments",
                          "downstream.strategyqa:StrategyQAArguments", MEMORY)
HALUEVAL_PARSER = hf_parser(MODEL, "downstream.choice_eval:ChoiceEvalArguments", "downstream.halueval:HaluEvalArguments",
                            MEMORY)
EVAL_OWNED = frozenset({"dataset_name", "do_eval", "do_train", "eval_subset", "output_dir", "save_knnlm_dstore",
                        "dstore_dir"})
STAGE_LIST = [
    Stage("download", "scripts.download", function_parser("scripts.download:build_parser"), _download,
          frozenset({"repo_id", "local_dir"}), frozenset({"base_model", "memory"})),
    Stage("corpus", "utils.embedded_corpus", function_parser("utils.embedded_corpus.corpus:_parser"), _corpus,
          frozenset({"output_dir"})),
    Stage("preprocess", "utils.preprocess_dataset", hf_parser("utils.preprocess_dataset:PreprocessArguments"),
          _preprocess, frozenset({"output_dir"})),
    Stage("train_base", "train_base", TRAIN_BASE, _train_base, EVAL_OWNED),
    Stage("convert", "models.convert", hf_parser("models.convert:ConvertArguments"), _convert,
          frozenset({"output", "from_layout", "to_layout"})),
    Stage("eval_base", "train_base", TRAIN_BASE, _eval_base, EVAL_OWNED, frozenset({"splits", "nproc"})),
    Stage("datastore", "train_base", TRAIN_BASE, _datastore, EVAL_OWNED, frozenset({"nproc"})),
    Stage("index", "knn_utils.build_index", hf_parser("knn_utils.build_index:BuildIndexArguments",
                                                      "knn_utils.index_build:IndexSettings", VERIFY), _index,
          frozenset({"dstore_path", "index_path"})),
    Stage("knn_targets", "knn_utils.saveKNNMulti", hf_parser("knn_utils.saveKNNMulti:SaveKnnArguments",
                                                             "knn_utils.knn_targets:TargetSettings", VERIFY),
          _knn_targets,
          frozenset({"dstore_path", "index_path", "output_path"}), frozenset({"nproc"})),
    Stage("knnlm", "knn_utils.knnlm",
          hf_parser(MODEL, "utils.arguments:DataArguments", "knn_utils.knnlm:KnnLMArguments", CHECKS),
          _knnlm, frozenset({"dataset_name", "eval_subset", "dstore_dir", "index_path", "output_dir"}),
          frozenset({"splits", "nproc"})),
    Stage("memory", "train_mlpmem_offline", hf_parser("models.training.arguments:OfflineArguments",
                                                      "models.training.arguments:MemoryArguments",
                                                      "models.training.arguments:MemoryTrainingArguments", CHECKS),
          _memory, frozenset({"knn_dstore_path", "knn_save_path", "output_dir"}), frozenset({"nproc"})),
    Stage("memory_online", "train_mlpmem_online",
          hf_parser("models.training.arguments:OnlineArguments", MODEL, "models.training.arguments:MemoryArguments",
                    "models.training.arguments:MemoryTrainingArguments", CHECKS),
          _memory_online, frozenset({"dataset_name", "knn_save_path", "output_dir"}), frozenset({"nproc"})),
    Stage("eval_joint", "evaluate_joint", hf_parser(MODEL, "utils.arguments:DataArguments",
                                                    "models.joint.perplexity:JointArguments", MEMORY), _eval_joint,
          frozenset({"dataset_name", "dataset_split_name", "eval_subset", "output_dir", "do_test", "do_eval"}) |
          MEMORY_OWNED, frozenset({"splits", "nproc"})),
    Stage("qa", "downstream.eval_qa", hf_parser(MODEL, "downstream.eval_qa:QAArguments", MEMORY), _qa,
          frozenset({"data_file", "output_dir", "merge", "lmbda"}) | MEMORY_OWNED,
          frozenset({"lmbdas", "validation_file", "test_file"})),
    Stage("yes_no", "downstream.strategyqa", YES_NO_PARSER,
          _judgment("yes_no", "downstream.strategyqa", lambda layout: layout.yes_no, "yes_no_test.json",
                    YES_NO_RESULTS),
          frozenset({"output_dir"}) | MEMORY_OWNED),
    Stage("yes_no_claims", "downstream.strategyqa", YES_NO_PARSER,
          _judgment("yes_no_claims", "downstream.strategyqa", lambda layout: layout.yes_no_claims,
                    "yes_no_test.json", YES_NO_RESULTS, judge="claim"),
          frozenset({"output_dir", "judge"}) | MEMORY_OWNED),
    Stage("halueval", "downstream.halueval", HALUEVAL_PARSER,
          _judgment("halueval", "downstream.halueval", lambda layout: layout.halueval, "halueval_test.json",
                    HALUEVAL_RESULTS),
          frozenset({"output_dir"}) | MEMORY_OWNED),
    Stage("halueval_pairs", "downstream.halueval", HALUEVAL_PARSER,
          _judgment("halueval_pairs", "downstream.halueval", lambda layout: layout.halueval_pairs,
                    "halueval_test.json", HALUEVAL_RESULTS, judge="pair"),
          frozenset({"output_dir", "judge", "instruction"}) | MEMORY_OWNED),
    Stage("correction", "demo.generation_example", function_parser("demo.generation_example:build_parser"),
          _correction, frozenset({"quickstart_dir", "output_file"}) | MEMORY_OWNED),
    Stage("summary", "downstream.summary", function_parser("downstream.summary:build_parser"), _summary,
          frozenset({"output_dir"})),
]
STAGES = {stage.name: stage for stage in STAGE_LIST}
# The standard pipeline (a recipe without `stages`): SPEC.md's steps with both baselines and the summary.
DEFAULT_STAGES = ("preprocess", "eval_base", "datastore", "index", "knn_targets", "knnlm", "memory", "eval_joint",
                  "summary")


@cache
def schema() -> RecipeSchema:
    """What a recipe may name (`utils.recipes.check_recipe`)."""
    keys = {name: stage.flags() | stage.runner_keys for name, stage in STAGES.items()}  # owned ones: refused later
    return RecipeSchema(stage_keys=keys, shared_keys=frozenset(SHARED), plan_keys=frozenset(PLAN_KEYS),
                        default_stages=DEFAULT_STAGES)


def build_runs(ctx: Context, stage: str) -> list[Run]:
    """The runs of ``stage`` as far as they can be resolved now (a value from a choice not yet made is `CHOSEN`)."""
    runs = STAGES[stage].build(ctx, ctx.expanded(stage))
    for run in runs:
        run.switches = STAGES[stage].switches()
    return runs
