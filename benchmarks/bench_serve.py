"""Serving speed in vLLM (issue 22): the base against base + memory side by side in one run, HF ``generate`` beside.

    python -m benchmarks.bench_serve                      # CPU, in the serving environment (.venv-serve)
    python -m benchmarks.bench_serve --device cuda        # a GPU with pip's vllm (benchmarks/bench_serve_gpu.sh)
    python -m benchmarks.bench_serve --dry_run --tiny     # the stages and sizes only: no vLLM, no timing

The base is SmolLM2-135M-Instruct from ../shared/data, dequantised from its GGUF file to a float safetensors
directory (vLLM does not load our joint class from GGUF); the memory has the shape of docs/results.md (2 SwiGLU
blocks reading the last block, 33.6M parameters) and **random weights**: its speed depends on its shape only. Both
are joined by ``python -m models.convert --joint`` (``lmbda`` 0.25). Stages, each timed:

1. ``prepare``: the base directory, the memory and the joint directory (under ``--work_dir``; kept for reruns);
2. ``vllm``: one vLLM engine for the base and one for the joint directory (the plugin of `models.serving`), both
   in this process with the same settings; for every batch size, ``--repeats`` times, the two taking turns (so that
   a change in the machine's load hits both alike): a batch of that many prompts of ``--prompt_tokens`` tokens,
   greedy, ``--new_tokens`` new tokens each (output tokens/s = batch x new tokens / wall time), and the same batch
   with one new token (time to first token: prefill and the first step, the batch arriving at once). Medians of
   the repeats after one warm-up;
3. ``hf``: the same with Hugging Face ``generate``, the base alone and `JointLM` (hooks), for the figures beside.

The FLOP bound is ``F_base / (F_base + F_memory)`` per generated token at the mean context of the generation
(``benchmarks.flops.flops_per_token``). ``--dry_run`` runs ``prepare`` (``--tiny``: on a tiny random Llama, no
shared data needed) and writes the plan with every size, without vLLM. Writes benchmarks/results/<name>.json, .md
and .png with the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.flops import flops_per_token  # noqa: E402
from models import MemoryConfig, build_memory  # noqa: E402
from models.convert import main as convert_main  # noqa: E402
from models.memory_directory import save_memory  # noqa: E402
from utils.arguments import ModelArguments  # noqa: E402
from utils.environment import machine  # noqa: E402
from utils.modeling import load_causal_lm, load_tokenizer, model_fingerprint, tokenizer_fingerprint  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
STAGES = ("prepare", "vllm", "hf")
TINY_LLAMA = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=256)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=str(SHARED / "smollm2-135m-instruct"))
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--text_file", default=str(SHARED / "wikitext-2" / "wiki.test.raw"),
                        help="Prompts are cut from this text.")
    parser.add_argument("--work_dir", default=str(REPO / "outputs" / "bench_serve"),
                        help="Where the base, memory and joint directories are built (kept for reruns).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None,
                        help="vLLM's and HF's dtype (default: float32 on cpu, bfloat16 on cuda).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt_tokens", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory_layers", type=int, default=2, help="SwiGLU blocks of the memory.")
    parser.add_argument("--lmbda", type=float, default=0.25)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--enforce_eager", type=int, default=1,
                        help="1: vLLM without torch.compile / CUDA graphs (CPU default: compiling takes minutes on 2 "
                             "cores); 0: vLLM's default compilation.")
    parser.add_argument("--dry_run", action="store_true", help="Prepare and write the plan only (no vLLM, no timing).")
    parser.add_argument("--tiny", action="store_true", help="A tiny random Llama in place of SmolLM2 (tests).")
    parser.add_argument("--name", default="serve_vllm")
    parser.add_argument("--out_dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--note", default="", help="Recorded with the results (e.g. the machine's load).")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if not args.tiny and not Path(args.model_dir, args.gguf_file).is_file():
        raise SystemExit(f"--model_dir {args.model_dir}: {args.gguf_file} not found (see ../shared/data/README.md)")
    return args


# ---------------------------------------------------------------------------------------------------
# Stage 1: the base directory, the memory, the joint directory


def load_base(args: argparse.Namespace, base_dir: Path):
    """The float base model (from ``base_dir`` once saved) and its tokenizer."""
    if (base_dir / "config.json").is_file():
        return load_causal_lm(ModelArguments(model_name_or_path=str(base_dir))).eval(), load_tokenizer(str(base_dir))
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        from tests.conftest import save_word_tokenizer

        tokenizer = load_tokenizer(str(save_word_tokenizer(base_dir)))
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **TINY_LLAMA)).eval()
    else:  # dequantised from the GGUF file to float32
        model = load_causal_lm(ModelArguments(model_name_or_path=args.model_dir, gguf_file=args.gguf_file)).eval()
        tokenizer = load_tokenizer(args.model_dir, args.gguf_file)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return model, tokenizer


def prepare(args: argparse.Namespace) -> dict:
    """Build (or reuse) the base, memory and joint directories; returns their paths and sizes."""
    work = Path(args.work_dir)
    base_dir, memory_dir, joint_dir = work / "base", work / "memory", work / "joint"
    model, tokenizer = load_base(args, base_dir)
    layer = model.config.num_hidden_layers - 1
    config = MemoryConfig.from_base(model.config, num_layers=args.memory_layers, layer=layer,
                                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                    base_model_fingerprint=model_fingerprint(model, layer))
    if not (memory_dir / "config.json").is_file():
        torch.manual_seed(0)
        save_memory(memory_dir, build_memory(config).eval(), {}, {})  # random weights: the speed depends on the shape
    if not (joint_dir / "config.json").is_file():
        convert_main(["--joint", "--base_model", str(base_dir), "--memory", str(memory_dir), "--output", str(joint_dir),
                      "--lmbda", str(args.lmbda)])
    context = args.prompt_tokens + (args.new_tokens + 1) / 2  # mean context of a generated token
    base_flops, memory_flops = flops_per_token(model, build_memory(config), context)
    return {"base_dir": str(base_dir), "joint_dir": str(joint_dir), "memory": {**config.describe(), "layer": layer},
            "base_parameters": model.num_parameters(), "vocab_size": model.config.vocab_size,
            "flops_per_token": {"base": base_flops, "memory": memory_flops, "context": context},
            "flop_bound": round(base_flops / (base_flops + memory_flops), 4), "model": model, "tokenizer": tokenizer}


def make_prompts(args: argparse.Namespace, tokenizer, count: int) -> list[list[int]]:
    """``count`` prompts of ``--prompt_tokens`` tokens, consecutive pieces of the text (random words for --tiny)."""
    if args.tiny:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(3, len(tokenizer), (count, args.prompt_tokens), generator=generator).tolist()
    text = Path(args.text_file).read_text()[: 8 * count * args.prompt_tokens]
    ids = tokenizer(text).input_ids
    if len(ids) < count * args.prompt_tokens:
        raise SystemExit(f"--text_file {args.text_file} has too few tokens for {count} prompts")
    return [ids[i * args.prompt_tokens:(i + 1) * args.prompt_tokens] for i in range(count)]


# ---------------------------------------------------------------------------------------------------
# Stages 2 and 3: timing


def timed_runs(runs: dict, batch_sizes: list[int], repeats: int, new_tokens: int) -> dict:
    """Each ``runs[label](batch, new)`` timed, the labels taking turns in every repeat (so that a change in the
    machine's load hits all alike): output tokens/s with ``new_tokens`` and time to first token (one new token)."""
    results: dict = {label: {} for label in runs}
    for batch in batch_sizes:
        walls: dict = {label: [] for label in runs}
        firsts: dict = {label: [] for label in runs}
        for run in runs.values():
            run(batch, 2)  # warm-up
        for _ in range(repeats):
            for label, run in runs.items():
                walls[label].append(run(batch, new_tokens))
                firsts[label].append(run(batch, 1))
        for label in runs:
            results[label][batch] = {
                "tokens_per_second": round(batch * new_tokens / statistics.median(walls[label]), 2),
                "ttft_seconds": round(statistics.median(firsts[label]), 4),
                "wall_seconds": [round(w, 4) for w in walls[label]],
                "first_token_seconds": [round(f, 4) for f in firsts[label]]}
            print(f"  {label} batch {batch}: {results[label][batch]['tokens_per_second']} tokens/s, time to first "
                  f"token {results[label][batch]['ttft_seconds']} s", flush=True)
    return results


def vllm_runners(targets: dict, args: argparse.Namespace, prompts: list[list[int]]) -> tuple[dict, dict]:
    """One engine per target directory, all in this process with the same settings; their ``run(batch, new)`` and
    start-up seconds."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    placement = ({"kv_cache_memory_bytes": 1 << 30, "distributed_executor_backend": "uni"} if args.device == "cpu"
                 else {"gpu_memory_utilization": 0.9 / len(targets)})  # the engines share the device
    runs, starts = {}, {}
    for label, model_dir in targets.items():
        start = time.perf_counter()
        llm = LLM(model=model_dir, dtype=args.dtype, enforce_eager=bool(args.enforce_eager), seed=0,
                  max_model_len=args.prompt_tokens + args.new_tokens + 8, max_num_seqs=max(args.batch_sizes),
                  **placement)
        starts[label] = round(time.perf_counter() - start, 1)

        def run(batch: int, new: int, llm=llm) -> float:
            params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
            begin = time.perf_counter()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts[:batch]], params,
                                   use_tqdm=False)
            wall = time.perf_counter() - begin
            assert all(len(out.outputs[0].token_ids) == new for out in outputs)
            return wall

        runs[label] = run
    return runs, starts


def hf_runners(model, memory_dir: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    """HF ``generate`` of the base alone and of `JointLM` (hooks), greedy: their ``run(batch, new)``."""
    from models import load_memory
    from models.joint import JointLM

    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    generators = {"base": model.generate, "joint": JointLM(model, load_memory(memory_dir), lmbda=args.lmbda).generate}

    def runner(generate):
        def run(batch: int, new: int) -> float:
            ids = torch.tensor(prompts[:batch], device=args.device)  # equal lengths: no padding
            if args.device == "cuda":
                torch.cuda.synchronize()
            begin = time.perf_counter()
            with torch.no_grad():
                out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)
            if args.device == "cuda":
                torch.cuda.synchronize()
            assert out.shape[1] == ids.shape[1] + new
            return time.perf_counter() - begin
        return run

    return {label: runner(generate) for label, generate in generators.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.device == "cpu":  # the engine in this process, its OpenMP threads not bound (as HF generate's beside it)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    stage_seconds = {}
    start = time.perf_counter()
    prepared = prepare(args)
    stage_seconds["prepare"] = round(time.perf_counter() - start, 1)
    model, tokenizer = prepared.pop("model"), prepared.pop("tokenizer")
    prompts = make_prompts(args, tokenizer, max(args.batch_sizes))
    results = {"machine": {**machine(), "load_average_at_start": os.getloadavg(), "note": args.note},
               "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir",)}, **prepared,
               "prompts": {"count": len(prompts), "tokens": args.prompt_tokens}, "threads": torch.get_num_threads(),
               "stages": [s for s in STAGES if s in args.stages and (s == "prepare" or not args.dry_run)]}
    if args.dry_run:
        results["plan"] = {"engines": ["base", "joint"], "batches": args.batch_sizes,
                           "generated_tokens_per_engine": (args.repeats * args.new_tokens + args.repeats + 2)
                           * sum(args.batch_sizes)}
    else:
        for stage in ("vllm", "hf"):
            if stage not in args.stages:
                continue
            print(f"{stage}:", flush=True)
            begin = time.perf_counter()
            starts = {}
            if stage == "vllm":
                targets = {"base": prepared["base_dir"], "joint": prepared["joint_dir"]}
                runs, starts = vllm_runners(targets, args, prompts)
            else:
                runs = hf_runners(model, str(Path(args.work_dir) / "memory"), args, prompts)
            timed = timed_runs(runs, args.batch_sizes, args.repeats, args.new_tokens)
            results[stage] = {label: {"batches": timed[label], "engine_start_seconds": starts.get(label)}
                              for label in runs}
            del runs
            gc.collect()
            stage_seconds[stage] = round(time.perf_counter() - begin, 1)
            finish(results, stage_seconds, args)  # a stage's results are kept even if a later one is cut short
    return finish(results, stage_seconds, args)


def finish(results: dict, stage_seconds: dict, args: argparse.Namespace) -> dict:
    """Record the stage times and the load, write the JSON, the table and the plot."""
    from benchmarks.serve_report import write_outputs

    results["stage_seconds"] = stage_seconds
    results["machine"]["load_average_at_end"] = os.getloadavg()
    write_outputs(results, Path(args.out_dir), args.name)
    return results


if __name__ == "__main__":
    main()
