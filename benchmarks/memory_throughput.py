"""Training throughput of a memory preset in bf16, as a share of the GPU's peak (a stage of benchmarks/gpu_run.py).

    python -m benchmarks.memory_throughput --preset large --rows 4096 --steps 20     # on a GPU

The memory (`models.configuration_mlp_memory.PRESETS`, GPT-2's vocabulary unless told) trains as
``train_mlpmem_*`` trains it: float32 weights and AdamW, bf16 autocast on CUDA, the project's loss
(`models.training.losses.memory_loss`) on sparse targets (32 entries a row), gradient clipping. Inputs and targets are
random: the speed does not depend on them. After ``warmup`` steps, ``steps`` steps are timed (synchronised);
FLOPs a row are 6 x the parameters of the memory's matrices (forward 2, backward 4; norms and biases left out),
and the achieved rate is set against the dense bf16 peak of the GPU torch names (`PEAK_BF16_TFLOPS`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# Dense bf16 tensor-core peaks (datasheets, no sparsity), matched against torch's device name in this order.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))
GPT2_VOCAB = 50_257
TARGETS_PER_ROW = 32


def memory_params(preset: str, hidden_size: int | None = None, vocab_size: int = GPT2_VOCAB) -> dict:
    """The parameters of a preset memory, counted on the meta device (nothing allocated): all, those of its
    matrices (2 FLOPs a row each in a forward pass), and the training FLOPs a row."""
    from models import MemoryConfig, build_memory

    fields = {"vocab_size": vocab_size, **({"hidden_size": hidden_size} if hidden_size else {})}
    with torch.device("meta"):
        memory = build_memory(MemoryConfig.from_preset(preset, **fields))
    total = sum(p.numel() for p in memory.parameters())
    matrices = sum(p.numel() for p in memory.parameters() if p.dim() == 2)
    return {"parameters": total, "matrix_parameters": matrices, "flops_per_row": 6 * matrices}


def peak_bf16_tflops(name: str | None) -> float | None:
    """The dense bf16 peak of a GPU named ``name`` (torch's device name), if `PEAK_BF16_TFLOPS` knows it."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if name and key in name), None)


def measure_throughput(preset: str, rows: int, steps: int, warmup: int, device: str, hidden_size: int | None = None,
                       vocab_size: int = GPT2_VOCAB) -> dict:
    """Training rows/s of ``preset`` on ``device`` and its share of the bf16 peak (None off a known GPU)."""
    from models import MemoryConfig, build_memory
    from models.training.losses import SparseTargets, memory_loss

    device = torch.device(device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    fields = {"vocab_size": vocab_size, **({"hidden_size": hidden_size} if hidden_size else {})}
    memory = build_memory(MemoryConfig.from_preset(preset, **fields)).to(device).train()
    optimizer = torch.optim.AdamW(memory.parameters(), lr=5e-4, weight_decay=0.0, fused=cuda)
    width, vocab = memory.config.hidden_size, memory.config.vocab_size
    inputs = torch.randn(rows, width, device=device)  # (n, d)
    entries = rows * TARGETS_PER_ROW
    targets = SparseTargets(torch.arange(rows, device=device).repeat_interleave(TARGETS_PER_ROW),
                            torch.randint(0, vocab, (entries,), device=device),
                            torch.full((entries,), 1.0 / TARGETS_PER_ROW, device=device), rows)
    labels = torch.randint(0, vocab, (rows,), device=device)  # (n,)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = memory_loss(memory(inputs), targets, labels, 0.5).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(memory.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    counted = memory_params(preset, hidden_size, vocab_size)
    rows_per_second = steps * rows / seconds
    achieved = rows_per_second * counted["flops_per_row"] / 1e12
    gpu = torch.cuda.get_device_name(device) if cuda else None
    peak = peak_bf16_tflops(gpu)
    return {"preset": preset, **counted, "rows_per_step": rows, "steps": steps, "seconds": seconds,
            "rows_per_second": rows_per_second, "achieved_tflops": achieved, "gpu": gpu, "peak_bf16_tflops": peak,
            "share_of_peak": achieved / peak if peak else None,
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="large", help="Memory preset (models.configuration_mlp_memory.PRESETS).")
    parser.add_argument("--rows", type=int, default=4096, help="Rows per step.")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps.")
    parser.add_argument("--warmup", type=int, default=5, help="Untimed steps first.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    found = measure_throughput(args.preset, args.rows, args.steps, args.warmup, args.device)
    print(json.dumps(found, indent=1))
    return found


if __name__ == "__main__":
    main()
