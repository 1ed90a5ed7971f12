"""The folder layout of a pipeline run, written once: every path under a run's output directory.

    layout = RunLayout("outputs/quickstart")
    layout.dataset                 # outputs/quickstart/dataset
    layout.eval_joint("test")      # outputs/quickstart/eval_joint_test
    layout.qa("test", 0.5)         # outputs/quickstart/qa_test/lmbda_0.5

The runner (`scripts.pipeline`) writes these paths, `downstream.summary` and the demo read them, and the
tests build them; nothing else types a run's folder names. Each artifact directory describes itself
(its ``meta.json`` or results file); `RESULTS` names the file each stage's results are read from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The file whose presence marks each kind of directory complete, and which holds its results.
EVAL_RESULTS = "eval_results.json"
TRAIN_RESULTS = "train_results.json"
KNNLM_RESULTS = "knnlm_results.json"
JOINT_RESULTS = "joint_results.json"
QA_RESULTS = "qa_results.json"
LMBDA_CHOICE = "lmbda_choice.json"  # downstream.choose_lmbda --output_file: the QA lmbda and the table it came from
YES_NO_RESULTS = "strategyqa_results.json"
HALUEVAL_RESULTS = "halueval_results.json"
META = "meta.json"


def lmbda_name(lmbda: float) -> str:
    """How a lmbda is written in a folder name: ``0.5``, ``0.25`` (``%g``)."""
    return f"{float(lmbda):g}"


@dataclass(frozen=True)
class RunLayout:
    """Every path of one run, under ``out``."""

    out: Path

    def __init__(self, out: str | os.PathLike):
        object.__setattr__(self, "out", Path(out))

    # The pipeline's artifacts, in the order the stages write them.
    @property
    def corpus(self) -> Path:
        """The embedded corpus (`utils.embedded_corpus`): text splits, QA and judgment files, tokenizer."""
        return self.out / "corpus"

    def corpus_file(self, name: str) -> Path:
        return self.corpus / name

    @property
    def dataset(self) -> Path:
        return self.out / "dataset"

    @property
    def base(self) -> Path:
        """A base model trained or fine-tuned by the run (`train_base --do_train`)."""
        return self.out / "base"

    @property
    def downloads(self) -> Path:
        """Hub snapshots a recipe downloads (one folder per repository, ``owner--name``)."""
        return self.out / "downloads"

    def download(self, repo_id: str) -> Path:
        return self.downloads / repo_id.replace("/", "--")

    @property
    def converted_memory(self) -> Path:
        """A released memory converted to this project's layout (`models.convert --from official`)."""
        return self.out / "memory_converted"

    def eval_base(self, split: str) -> Path:
        return self.out / f"eval_base_{split}"

    @property
    def dstore(self) -> Path:
        return self.out / "dstore"

    @property
    def index(self) -> Path:
        return self.dstore / "index"

    @property
    def knn_targets(self) -> Path:
        return self.out / "knn_targets"

    def knnlm(self, split: str) -> Path:
        return self.out / f"eval_knnlm_{split}"

    @property
    def memory(self) -> Path:
        return self.out / "memory"

    def eval_joint(self, split: str) -> Path:
        return self.out / f"eval_joint_{split}"

    def qa_dir(self, split: str) -> Path:
        """``qa_validation`` / ``qa_test``: one eval_qa run, which writes each setting it scores into a folder below
        it (`qa`) and the first setting with the memory, with every setting's scores, at its top."""
        return self.out / f"qa_{split}"

    def qa(self, split: str, lmbda: float | None) -> Path:
        """One setting of the eval_qa run on the ``split`` questions: ``base`` without the memory, ``lmbda_<l>`` with
        it (`downstream.qa_results`)."""
        return self.qa_dir(split) / ("base" if lmbda is None else f"lmbda_{lmbda_name(lmbda)}")

    @property
    def qa_choice(self) -> Path:
        """The QA lmbda chosen on the validation questions, with the table it was chosen from."""
        return self.qa_dir("validation") / LMBDA_CHOICE

    def qa_file(self, split: str) -> Path:
        return self.corpus_file(f"qa_{split}.jsonl")

    @property
    def halueval_fewshot(self) -> Path:
        """The corpus's few-shot prompt of judged train-only samples, given to HaluEval as ``--instruction``."""
        return self.corpus_file("halueval_fewshot.txt")

    @property
    def yes_no(self) -> Path:
        """The yes/no questions about the test facts, after their file's few-shot prefix (`downstream.strategyqa`)."""
        return self.out / "yes_no_fewshot_test"

    @property
    def halueval(self) -> Path:
        """The hallucination judgments about the test facts, after `halueval_fewshot` (`downstream.halueval`)."""
        return self.out / "halueval_fewshot_test"

    @property
    def yes_no_claims(self) -> Path:
        """The same yes/no questions judged from each claim's likelihood (`downstream.strategyqa --judge claim`)."""
        return self.out / "yes_no_claims_test"

    @property
    def halueval_pairs(self) -> Path:
        """The same hallucination samples judged from their two answers' likelihoods (`downstream.halueval --judge
        pair`)."""
        return self.out / "halueval_pairs_test"

    @property
    def correction(self) -> Path:
        """The first test question whose answer the memory corrects (`demo.generation_example --find_correction`)."""
        return self.out / "correction.json"

    @property
    def summary(self) -> Path:
        return self.out / "summary.json"

    @property
    def ledger(self) -> Path:
        """The run ledger (`utils.ledger`): recipe, settings, versions, fingerprints, metrics of every stage."""
        return self.out / "ledger.json"

    @property
    def stage_records(self) -> Path:
        """One JSON record per completed stage run: the settings it was made with (`scripts.pipeline`)."""
        return self.out / "stages"

    def stage_record(self, run_name: str) -> Path:
        return self.stage_records / f"{run_name}.json"
