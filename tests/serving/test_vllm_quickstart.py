"""vLLM serving the quickstart's joint model (its base and memory, lmbda 0.5) against JointLM, on the question the
quickstart found the memory corrects (``correction.json``: the README's example on our machine).

Reads ``outputs/quickstart`` (``MLPMEM_QUICKSTART`` to point elsewhere), written by ``bash scripts/quickstart.sh``;
skips when it is absent.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.serving.conftest import engine, vllm  # noqa: F401  (vllm: skips without it)

from models import load_memory  # noqa: E402
from models.convert import main as convert_main  # noqa: E402
from models.joint import JointLM  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

QUICKSTART = Path(os.environ.get("MLPMEM_QUICKSTART", REPO / "outputs" / "quickstart"))
SENTENCE = "Varthas Varabourne was born in Varra and held a position at Darentov Works."  # a test sentence
LMBDA = 0.5
SamplingParams = vllm.SamplingParams

pytestmark = pytest.mark.skipif(
    not all((QUICKSTART / name).is_file() for name in ("base/config.json", "memory/config.json", "correction.json")),
    reason=f"no quickstart outputs in {QUICKSTART}: run bash scripts/quickstart.sh (or set MLPMEM_QUICKSTART)")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    joint_dir = tmp_path_factory.mktemp("quickstart") / "joint"
    assert convert_main(["--joint", "--base_model", str(QUICKSTART / "base"), "--memory", str(QUICKSTART / "memory"),
                         "--output", str(joint_dir), "--lmbda", str(LMBDA)]) == 0
    base = AutoModelForCausalLM.from_pretrained(QUICKSTART / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(QUICKSTART / "base")
    llm = engine(joint_dir, max_model_len=256)
    corrected = json.loads((QUICKSTART / "correction.json").read_text())["examples"][0]
    yield {"joint_dir": joint_dir, "llm": llm, "tokenizer": tokenizer, "base": base, "question": corrected["prompt"],
           "gold": corrected["gold"][0], "base_answer": corrected["base"].strip().split("\n")[0],
           "joint": JointLM(base, load_memory(str(QUICKSTART / "memory")), lmbda=LMBDA)}
    del llm
    gc.collect()


def test_answer_is_the_corrected_one_and_joint_lm_token_for_token(quickstart):
    question = quickstart["question"]
    out = quickstart["llm"].generate([question], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    served = list(out.outputs[0].token_ids)
    ids = quickstart["tokenizer"]([question], return_tensors="pt")
    expected = quickstart["joint"].generate(**ids, max_new_tokens=4, do_sample=False)[0, ids.input_ids.shape[1]:]
    assert served == expected.tolist()[:len(served)] and len(served) >= 3
    assert out.outputs[0].text.startswith(" " + quickstart["gold"])  # the memory's answer is the gold one


def test_prompt_log_probs_equal_joint_lm(quickstart):
    ids = quickstart["tokenizer"](SENTENCE).input_ids
    out = quickstart["llm"].generate([vllm.inputs.TokensPrompt(prompt_token_ids=ids)],
                                     SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    served = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    expected = quickstart["joint"].log_probs(torch.tensor([ids]))[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])
    torch.testing.assert_close(served, expected[:, 0], rtol=0, atol=1e-4)


def test_lmbda_zero_gives_the_base_models_answer(quickstart):
    llm = engine(quickstart["joint_dir"], max_model_len=256, hf_overrides={"lmbda": 0.0})
    out = llm.generate([quickstart["question"]], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    del llm
    gc.collect()
    ids = quickstart["tokenizer"]([quickstart["question"]], return_tensors="pt")
    expected = quickstart["base"].generate(**ids, max_new_tokens=4, do_sample=False)[0, ids.input_ids.shape[1]:]
    assert list(out.outputs[0].token_ids) == expected.tolist()[:len(out.outputs[0].token_ids)]
    assert out.outputs[0].text.startswith(" " + quickstart["base_answer"])  # the base's (wrong) answer
