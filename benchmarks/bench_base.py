"""Base model on real data: perplexity and datastore throughput (pipeline steps 1-2).

    python -m benchmarks.bench_base                       # SmolLM2-135M (GGUF) on WikiText-2
    python -m benchmarks.bench_base --test_windows 0      # the whole test split (slow on CPU)

Preprocesses WikiText-2 with the model's tokenizer, evaluates test perplexity over the first
``--test_windows`` windows, and writes a datastore over the first ``--train_windows`` windows of
train, once with one process and once with ``--processes`` processes (side by side, checking the
datastores are identical). Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.environment import machine  # noqa: E402
from utils.io import read_json, write_json  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def run(cmd: list[str]) -> float:
    """Run a command from the repository root; return its wall time."""
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def launch(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default=str(SHARED / "smollm2-135m-instruct"))
    parser.add_argument("--gguf_file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--data_dir", default=str(SHARED / "wikitext-2"))
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--test_windows", type=int, default=50, help="First N test windows (0: all).")
    parser.add_argument("--train_windows", type=int, default=40, help="First N train windows for the datastore.")
    parser.add_argument("--train_chars", type=int, default=2_000_000, help="Characters of train to preprocess.")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--name", default="base_smollm2_wikitext2")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_base_"))
    model = ["--model_name_or_path", args.model_dir, "--gguf_file", args.gguf_file]
    try:
        dataset = work / "dataset"
        run([sys.executable, "-m", "utils.preprocess_dataset", "--tokenizer_path", args.model_dir, "--gguf_file",
             args.gguf_file, "--train_file", f"{args.data_dir}/wiki.train.tokens", "--test_file",
             f"{args.data_dir}/wiki.test.tokens", "--max_chars", str(args.train_chars), "--block_size",
             str(args.block_size), "--stride", str(args.stride), "--output_dir", str(dataset)])
        # --max_chars cuts train only in effect: the test split is shorter than it.
        test_limit = ["--max_eval_samples", str(args.test_windows)] if args.test_windows else []
        common = [*model, "--dataset_name", str(dataset), "--do_eval", "--report_to", "none",
                  "--per_device_eval_batch_size", str(args.batch_size)]
        run([*launch(1), "train_base", *common, "--eval_subset", "test", *test_limit, "--output_dir", str(work / "test")])
        test = read_json(work / "test" / "eval_results.json")
        results = {"machine": machine(), "model": f"{args.model_dir}/{args.gguf_file}", "block_size": args.block_size,
                   "stride": args.stride, "test": {k: test[k] for k in ("perplexity", "eval_tokens", "eval_windows",
                                                                        "eval_tokens_per_second")},
                   "test_split_tokens": read_json(dataset / "meta.json")["splits"]["test"]["tokens"], "datastore": {}}
        for processes in (1, args.processes):
            out = work / f"train_{processes}"
            wall = run([*launch(processes), "train_base", *common, "--eval_subset", "train", "--max_eval_samples",
                        str(args.train_windows), "--output_dir", str(out), "--save_knnlm_dstore", "--dstore_dir",
                        str(work / f"dstore_{processes}")])
            meta = read_json(work / f"dstore_{processes}" / "meta.json")
            results["datastore"][f"{processes}_process"] = {
                "rows": meta["rows"], "dim": meta["dim"], "seconds": meta["seconds"], "wall_seconds": round(wall, 1),
                "rows_per_second": round(meta["rows"] / meta["seconds"], 1), "keys_sha256": meta["keys_sha256"]}
        shas = {d["keys_sha256"] for d in results["datastore"].values()}
        results["datastores_identical"] = len(shas) == 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{args.name}.json", results)
    m = results["machine"]
    rows = [f"| datastore, {k.replace('_', ' ')} | {v['rows']} rows x {v['dim']} | {v['rows_per_second']} rows/s |"
            for k, v in results["datastore"].items()]
    (out_dir / f"{args.name}.md").write_text("\n".join([
        f"# {args.name}", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; torch {m['torch']}.",
        f"Model: {results['model']}; windows {args.block_size}/{args.stride}.", "",
        "| what | size | result |", "|---|---|---|",
        f"| test perplexity | first {results['test']['eval_tokens']} of {results['test_split_tokens']} test tokens "
        f"| {results['test']['perplexity']:.2f} ({results['test']['eval_tokens_per_second']} tokens/s) |",
        *rows, "", f"Datastores from 1 and {args.processes} processes identical: {results['datastores_identical']}", ""]))
    print((out_dir / f"{args.name}.md").read_text())
    return results


if __name__ == "__main__":
    main()
