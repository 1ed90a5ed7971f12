"""Generation demo: the base LM alone beside the base LM + MLP memory, greedy, on the same prompts.

    bash scripts/quickstart.sh                       # once: writes outputs/quickstart/
    python -m demo.generation_example                # a few test questions of the embedded corpus
    python -m demo.generation_example --find_correction --scan 200   # first questions the memory fixes
    python -m demo.generation_example --prompt "Question: Who was the mentor of Jordor Kasidor? Answer:"
    python -m demo.generation_example --model_name_or_path MODEL --memory MEMORY --prompt "..."
    python -m demo.generation_example --model_name_or_path JOINT_DIR --prompt "..."   # python -m models.convert --joint

With no model flags, the base model (``base/``), its memory (``memory/``) and the test questions
(``corpus/qa_test.jsonl``, prompts in the corpus's ``qa_prompt`` format from ``corpus/meta.json``)
come from ``--quickstart_dir``. The test questions ask for facts the training split states, in prose
and as QA lines, but each in a question wording that train never uses for that fact.

For a question, the answer is the first line of the greedy continuation; it is right when, lowercased
and stripped of punctuation, it equals one of the gold answers. An example is *corrected* when the
base is wrong and base + memory is right. Nothing is written except ``--output_file`` (JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import string
import sys

import torch
from transformers import HfArgumentParser

from downstream.qa_data import recorded_prompt
from models.joint import JointLM
from models.joint.loading import LoadedJoint, is_joint_directory, load_joint
from models.joint.settings import DOWNSTREAM, MemoryArguments
from utils.arguments import PretrainedModelArguments
from utils.cli import UsageError, check_finite_floats, run, setup_logging
from utils.embedded_corpus import QA_PROMPT
from utils.io import write_json
from utils.locking import artifact_lock

logger = logging.getLogger(__name__)

DEFAULT_QUICKSTART = os.path.join("outputs", "quickstart")
DEFAULT_QA_PROMPT = QA_PROMPT  # corpora written before meta.json recorded their prompt
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags; the memory's (--memory, --lmbda, --memory_temp, --allow_base_mismatch and their released
    names) come from their one definition, `models.joint.settings.MemoryArguments`."""
    p = HfArgumentParser(MemoryArguments, prog="python -m demo.generation_example",
                         description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quickstart_dir", default=DEFAULT_QUICKSTART,
                   help="Outputs of scripts/quickstart.sh (base/, memory/, corpus/) used for what is not given.")
    p.add_argument("--model_name_or_path", help="Base causal LM (default: QUICKSTART_DIR/base), or a joint model "
                   "directory (python -m models.convert --joint), which holds its memory and settings.")
    p.add_argument("--gguf_file", help="GGUF file name inside --model_name_or_path.")
    p.add_argument("--tokenizer_name", help="Tokenizer, if not the model's own.")
    p.add_argument("--torch_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompt", action="append", default=[], help="A free-text prompt (repeatable); replaces the QA.")
    p.add_argument("--max_new_tokens", type=int, default=12)
    p.add_argument("--num_examples", type=int, default=5, help="QA examples to show.")
    p.add_argument("--find_correction", action="store_true",
                   help="Scan up to --scan questions and show the first ones where the memory corrects the base.")
    p.add_argument("--scan", type=int, default=200, help="Questions scanned with --find_correction.")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--output_file", help="Write the examples here as JSON.")
    return p


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def first_line(continuation: str) -> str:
    return continuation.strip(" \t").split("\n", 1)[0].strip()


def is_right(continuation: str, gold: list[str]) -> bool:
    answer = normalize_answer(first_line(continuation))
    return bool(answer) and answer in {normalize_answer(g) for g in gold}


def quickstart_path(args, *parts: str) -> str:
    """A path inside --quickstart_dir, or a UsageError saying to run the quickstart first."""
    path = os.path.join(args.quickstart_dir, *parts)
    if not os.path.exists(path):
        raise UsageError(f"--quickstart_dir {args.quickstart_dir}: {os.path.join(*parts)} not found; run "
                         f"`bash scripts/quickstart.sh` first (or give --model_name_or_path, --memory "
                         f"and --prompt)")
    return path


def load_qa(args) -> tuple[list[dict], str]:
    """The quickstart's test questions and its prompt format."""
    qa_file = quickstart_path(args, "corpus", "qa_test.jsonl")
    qa_prompt = (recorded_prompt(qa_file) or (DEFAULT_QA_PROMPT, None))[0]
    with open(qa_file) as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    for pair in pairs:
        if isinstance(pair["answer"], str):
            pair["answer"] = [pair["answer"]]
    return pairs, qa_prompt


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             joint: JointLM | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), by the base or by ``joint``."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(device)
        kwargs = dict(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out = joint.generate(**kwargs) if joint is not None else model.generate(**kwargs)
        width = batch["input_ids"].shape[1]
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


def load_pair(args, memory_args: MemoryArguments) -> LoadedJoint:
    """The base and the memory (`load_joint`) from the flags, the quickstart's outputs for what is not given; a joint
    model directory as --model_name_or_path gives both, and --lmbda / --memory_temp unless given."""
    model_path = args.model_name_or_path or quickstart_path(args, "base")
    if not memory_args.memory and not is_joint_directory(model_path):
        memory_args.memory = quickstart_path(args, "memory")
    model_args = PretrainedModelArguments(model_name_or_path=model_path, gguf_file=args.gguf_file,
                                          tokenizer_name=args.tokenizer_name, torch_dtype=args.torch_dtype)
    loaded = load_joint(model_args, memory_args, DOWNSTREAM)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"{model_path}: the tokenizer has neither a pad nor an eos token to pad prompts with")
        tokenizer.pad_token = tokenizer.eos_token
    return loaded.to("cuda" if torch.cuda.is_available() else "cpu")


def show(examples: list[dict]) -> None:
    mark = lambda ok: "" if ok is None else ("  [right]" if ok else "  [wrong]")  # noqa: E731
    for i, ex in enumerate(examples, 1):
        print(f"[{i}] {ex['prompt']}")
        if ex.get("gold") is not None:
            print(f"    gold         : {' | '.join(ex['gold'])}")
        base = first_line(ex["base"]) if ex.get("gold") is not None else ex["base"]
        joint = first_line(ex["joint"]) if ex.get("gold") is not None else ex["joint"]
        print(f"    base         : {base!r}{mark(ex.get('base_right'))}")
        print(f"    base + memory: {joint!r}{mark(ex.get('joint_right'))}")
        if ex.get("corrected"):
            print("    -> the memory corrects the base")
        print()


def run_demo(args: argparse.Namespace, memory_args: MemoryArguments) -> dict:
    """Generate with the base model and with base + memory, print them side by side, write --output_file if given."""
    if args.prompt:
        qa, qa_prompt = None, None
    else:
        qa, qa_prompt = load_qa(args)
        qa = qa[:args.scan] if args.find_correction else qa[:args.num_examples]
    loaded = load_pair(args, memory_args)
    model, tokenizer, joint = loaded.model, loaded.tokenizer, loaded.joint()
    lmbda, memory_temp = loaded.lmbda, loaded.memory_temp

    prompts = args.prompt or [qa_prompt.format(question=pair["question"]) for pair in qa]
    logger.info("Generating %d prompt(s), base alone and base + memory (lmbda %s, memory_temp %s)",
                len(prompts), lmbda, memory_temp)
    base = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
    joint_out = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, joint=joint)

    examples = []
    for i, prompt in enumerate(prompts):
        ex = {"prompt": prompt, "base": base[i], "joint": joint_out[i], "gold": None, "corrected": None}
        if qa is not None:
            gold = qa[i]["answer"]
            ex.update(gold=gold, base_right=is_right(base[i], gold), joint_right=is_right(joint_out[i], gold))
            ex["corrected"] = ex["joint_right"] and not ex["base_right"]
        examples.append(ex)

    summary = {"lmbda": lmbda, "lmbda_source": loaded.record["lmbda_source"], "memory_temp": memory_temp,
               "memory_temp_source": loaded.record["memory_temp_source"], "memory": loaded.record["memory"],
               "memory_kind": loaded.record["memory_kind"], "num_prompts": len(prompts), "base_check": joint.base_check}
    shown = examples
    if qa is not None:
        summary.update(base_right=sum(e["base_right"] for e in examples),
                       joint_right=sum(e["joint_right"] for e in examples),
                       corrected=sum(e["corrected"] for e in examples),
                       broken=sum(e["base_right"] and not e["joint_right"] for e in examples))
        if args.find_correction:
            shown = [e for e in examples if e["corrected"]][:args.num_examples]
    print(f"lmbda {lmbda}, memory_temp {memory_temp}, greedy, {args.max_new_tokens} new tokens\n")
    if args.find_correction and not shown:
        print(f"No correction among the {len(examples)} questions scanned.\n")
    show(shown)
    if qa is not None:
        n = len(examples)
        scanned = " scanned" if args.find_correction else ""
        print(f"Of {n} question(s){scanned}: base right {summary['base_right']}/{n}, "
              f"base + memory right {summary['joint_right']}/{n}; the memory corrects {summary['corrected']}, "
              f"breaks {summary['broken']}.")
    result = {"summary": summary, "examples": shown}
    if args.output_file:
        write_json(args.output_file, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    parsed = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    memory_fields = {f.name for f in dataclasses.fields(MemoryArguments)}
    memory_args = MemoryArguments(**{k: v for k, v in parsed.items() if k in memory_fields})
    args = argparse.Namespace(**{k: v for k, v in parsed.items() if k not in memory_fields})
    check_finite_floats(args)
    memory_args.one_lmbda()
    for name in ("max_new_tokens", "num_examples", "scan", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    with artifact_lock(args.output_file, "--output_file"):  # no lock without --output_file: nothing is written
        return run_demo(args, memory_args)


if __name__ == "__main__":
    setup_logging()
    run(main)
