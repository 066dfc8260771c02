"""Loop overhead: kiln's fit() beside hand-written PyTorch loops on the same model, data and seed.

    .venv/bin/python -m bench.loop                   # CPU (the default), one torch thread: item 1 of BENCHMARKS.md
    .venv/bin/python -m bench.loop --threads 2       # every core of this machine, as one worker process has them
    .venv/bin/python -m bench.loop --device cuda     # item 2, on a GPU host: bf16, data on the device, MFU
    .venv/bin/python -m bench.loop --also old.py     # also time the fit() of another training.py (before/after)

CPU: an MLP 784-256-256-10 (Adam, lr 1e-3, cross-entropy) on a synthetic 60,000 x 784 set, one epoch per run, on
one torch thread by default: what each of two worker processes has on this 2-core machine, and the setting least
disturbed by other processes (with two threads, each parallel op waits for a thread another process may hold).
Every run starts from the same initial weights and trains on the same batch order, and the runs are interleaved
(hand, kiln, hand, kiln, ...) so that drift on a shared machine falls on all of them alike. The targets are
judged on the median over the rounds of each round's ratio (two loops run back to back within a round); the ratio
of each loop's fastest run is printed beside it, with every run's time (a spread over 1.5x is flagged). The
fastest runs alone swung a ratio by a fifth between two runs of the same tree on this machine. The baselines:

- "hand": the minimal loop anyone writes: x[idx] slices of one permutation per epoch, torch.optim.Adam as
  constructed by default, zero_grad / backward / step, nothing recorded. The issue's target is kiln / hand.
- "hand, same kernels": the same minimal loop with the kernels kiln chose (fused Adam, index_select). kiln / this
  is the loop's own overhead: what recording every batch's loss, gradient norms and predictions costs. kiln's
  final weights must equal this loop's bit for bit (the benchmark checks it), so both did the very same work.
- "tutorial": DataLoader(TensorDataset(x, y), batch_size, shuffle=True), as the PyTorch tutorials train.

GPU (--device cuda): the same MLP at batch 1024 and a small CNN on 32x32x3 images, data resident on the device,
bf16 autocast, fused Adam, no per-step host sync, optionally torch.compile (--compile reduce-overhead: CUDA graphs);
the baseline is a hand-written loop with the same settings. Each run trains several epochs; the first (warm-up,
compilation) is dropped and samples/s comes from the median epoch (fit()'s own duration_s, which ends after the
epoch's one host sync). MFU is the model FLOPs per sample (torch's FlopCounterMode on one training step) times
samples/s, over the GPU's dense bf16 peak (a table of known GPUs, or --peak-tflops).
"""

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.report import heading, machine, median, target
from kiln.catalog import DatasetInfo, Task
from kiln.spec import JobSpec
from models import build_model
from worker.training import TrainData, fit

SEED = 0
ROWS, FEATURES, CLASSES = 60_000, 784, 10
MLP = {"type": "mlp", "hidden": [256, 256]}
CNN = {"type": "cnn", "dims": 2, "channels": [32, 64], "kernel_size": 3, "pool": True, "hidden": [128]}
LR = 1e-3

# Dense bf16 peak FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "RTX 4090": 165e12}


@dataclass
class Problem:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    spec: JobSpec
    input_shape: tuple[int, ...]

    def model(self, device: torch.device | str) -> nn.Module:
        """kiln's model for the spec, initialised from the seed: every loop starts from these very weights."""
        torch.manual_seed(self.spec.seed)
        return build_model(self.spec.model, self.input_shape, CLASSES).to(device)

    def train_data(self) -> TrainData:
        return TrainData(self.x, self.y, None, None, Task.classification)


def synthetic(name: str, model: dict, input_shape: tuple[int, ...], batch_size: int, rows: int,
              device: torch.device | str = "cpu") -> Problem:
    """A learnable classification set: standard normal rows labelled by a random linear teacher."""
    g = torch.Generator().manual_seed(SEED)
    features = int(torch.tensor(input_shape).prod())
    x = torch.randn(rows, features, generator=g)
    y = (x @ torch.randn(features, CLASSES, generator=g)).argmax(dim=1)
    info = DatasetInfo("synthetic", Task.classification, input_shape, CLASSES, rows)
    spec = JobSpec.model_validate(
        {"data": {"dataset": "synthetic", "val_fraction": 0.0}, "model": model, "loss": "cross_entropy",
         "optimizer": {"type": "adam", "lr": LR}, "epochs": 1, "batch_size": batch_size, "seed": SEED},
        context={"datasets": {"synthetic": info}},
    )
    return Problem(name, x.to(device), y.to(device), spec, input_shape)


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """kiln's documented batch order (worker.training._permutation), so every loop sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# ---- the loops -------------------------------------------------------------------------------------------


def kiln_loop(problem: Problem, model: nn.Module, epochs: int, **options) -> None:
    spec = problem.spec.model_copy(update={"epochs": epochs})
    fit(model, problem.train_data(), spec, **options)


def fit_from(path: str) -> Callable[..., None]:
    """A loop running the fit() of another copy of worker/training.py (say, the one before a change)."""
    spec = importlib.util.spec_from_file_location(f"other_training_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def loop(problem: Problem, model: nn.Module, epochs: int) -> None:
        module.fit(model, problem.train_data(), problem.spec.model_copy(update={"epochs": epochs}))

    return loop


def hand_loop(problem: Problem, model: nn.Module, epochs: int) -> None:
    """The minimal loop: slices of a permutation, the optimizer as torch builds it by default."""
    x, y, bs = problem.x, problem.y, problem.spec.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for epoch in range(1, epochs + 1):
        order = permutation(len(x), SEED, epoch)
        for start in range(0, len(x), bs):
            idx = order[start : start + bs]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def same_kernels_loop(problem: Problem, model: nn.Module, epochs: int) -> None:
    """The minimal loop with the kernels kiln uses (fused Adam, index_select), recording nothing."""
    x, y, bs = problem.x, problem.y, problem.spec.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    for epoch in range(1, epochs + 1):
        for idx in permutation(len(x), SEED, epoch).split(bs):
            loss = nn.functional.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def tutorial_loop(problem: Problem, model: nn.Module, epochs: int) -> None:
    """As the PyTorch tutorials write it: a DataLoader over a TensorDataset, shuffled."""
    loader = DataLoader(TensorDataset(problem.x, problem.y), batch_size=problem.spec.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(SEED))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(epochs):
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def timed(loop: Callable[..., None], problem: Problem, *args) -> tuple[float, nn.Module]:
    """Wall time of one CPU run from the seed's initial weights, and the model it trained."""
    model = problem.model("cpu")
    t0 = time.perf_counter()
    loop(problem, model, *args)
    return time.perf_counter() - t0, model


def interleaved(
    loops: dict[str, Callable[[], tuple[float, nn.Module]]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, nn.Module]]:
    """Each loop `repeats` times, round-robin, after one warm-up round that is not counted. Returns the times
    and each loop's last trained model."""
    for run in loops.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in loops}
    models: dict[str, nn.Module] = {}
    for _ in range(repeats):
        for name, run in loops.items():
            seconds, models[name] = run()
            times[name].append(seconds)
    return times, models


def paired(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median, over the rounds, of a's time over b's in the same round: the two ran back to back, so a slow
    stretch of a shared machine that spans a round weighs on both, and one lucky or unlucky run cannot move it
    (the ratio of the fastest runs, printed beside it, rests on one run of each)."""
    return median([x / y for x, y in zip(times[a], times[b], strict=True)])


def show(times: dict[str, list[float]]) -> None:
    for name, values in times.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        disturbed = "  (disturbed: over 1.5x spread; re-run on a quieter machine)" if max(values) > 1.5 * min(
            values) else ""
        print(f"  {name:<22} fastest {min(values):.3f} s, median {median(values):.3f} s   [{runs}]{disturbed}")


# ---- CPU -------------------------------------------------------------------------------------------------


def cpu(args: argparse.Namespace) -> bool:
    threads = args.threads
    torch.set_num_threads(threads)
    print(f"CPU loop benchmark: {machine()}, torch {torch.__version__} on {threads} thread(s); "
          f"MLP 784-256-256-10, Adam, {ROWS:,} x {FEATURES} synthetic rows, 1 epoch per run, "
          f"{args.repeats} interleaved rounds (targets on the median of the rounds' ratios)")
    others = [fit_from(path) for path in args.also]
    ok = True
    for bs in (64, 512):
        problem = synthetic("mlp", MLP, (FEATURES,), bs, ROWS)
        heading(f"batch {bs} ({-(-ROWS // bs)} steps per epoch)")
        loops = {
            "hand": lambda p=problem: timed(hand_loop, p, 1),
            "kiln fit()": lambda p=problem: timed(kiln_loop, p, 1),
            "hand, same kernels": lambda p=problem: timed(same_kernels_loop, p, 1),
        }
        if bs == 64:
            loops["tutorial DataLoader"] = lambda p=problem: timed(tutorial_loop, p, 1)
        for path, other in zip(args.also, others, strict=True):
            loops[f"fit() of {os.path.basename(path)}"] = lambda p=problem, o=other: timed(o, p, 1)
        times, models = interleaved(loops, args.repeats)
        show(times)
        same = all(torch.equal(a, b) for a, b in zip(models["kiln fit()"].state_dict().values(),
                                                     models["hand, same kernels"].state_dict().values(), strict=True))
        print(f"  kiln's final weights equal the same-kernels loop's bit for bit: {same}")
        kiln = min(times["kiln fit()"])
        ratio = paired(times, "kiln fit()", "hand")
        overhead = kiln / min(times["hand, same kernels"])
        ok &= target(f"kiln / hand at batch {bs}", f"{ratio:.3f} (fastest runs: {kiln / min(times['hand']):.3f})",
                     "<= 1.05", ratio <= 1.05)
        steps = -(-ROWS // bs)
        print(f"  kiln / hand with the same kernels (kiln's own per-batch work: loss, gradient norms, predictions): "
              f"{overhead:.3f}, {(kiln - min(times['hand, same kernels'])) / steps * 1e6:+.0f} us per step")
        ok &= same
        if bs == 64:
            speedup = paired(times, "tutorial DataLoader", "kiln fit()")
            fastest = min(times["tutorial DataLoader"]) / kiln
            ok &= target("tutorial / kiln at batch 64", f"{speedup:.2f}x (fastest runs: {fastest:.2f}x)", ">= 1.3x",
                         speedup >= 1.3)
        for path in args.also:
            name = f"fit() of {os.path.basename(path)}"
            print(f"  {name} / hand: {min(times[name]) / min(times['hand']):.3f}; "
                  f"/ hand with the same kernels: {min(times[name]) / min(times['hand, same kernels']):.3f}")
    return ok


# ---- GPU -------------------------------------------------------------------------------------------------


def flops_per_sample(problem: Problem, device: str) -> float:
    """Model FLOPs of one training step (forward and backward) per sample, as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    model = problem.model(device)
    bs = problem.spec.batch_size
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(problem.x[:bs]), problem.y[:bs]).backward()
    return counter.get_total_flops() / bs


def peak_flops(args: argparse.Namespace) -> tuple[float | None, str]:
    name = torch.cuda.get_device_name()
    if args.peak_tflops:
        return args.peak_tflops * 1e12, name
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak, name
    return None, name


def hand_epochs(problem: Problem, epochs: int) -> list[float]:
    """The same-kernels loop with bf16 autocast on the data's device, timed per epoch (one sync at each end)."""
    x, y, bs = problem.x, problem.y, problem.spec.batch_size
    model = problem.model(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
    seconds = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        for idx in permutation(len(x), SEED, epoch).to(x.device).split(bs):
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss.item()  # the epoch's one sync: its queued kernels are done
        seconds.append(time.perf_counter() - t0)
    return seconds


def kiln_epochs(problem: Problem, epochs: int, **options) -> list[float]:
    """fit()'s own per-epoch training time (duration_s: it ends after the epoch's one host sync)."""
    spec = problem.spec.model_copy(update={"epochs": epochs})
    return [m.duration_s for m in fit(problem.model(problem.x.device), problem.train_data(), spec, **options).history]


def gpu(args: argparse.Namespace) -> bool:
    if not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; nothing measured")
        return False
    peak, name = peak_flops(args)
    print(f"GPU loop benchmark on {name} (torch {torch.__version__}): data on the device, bf16 autocast, fused Adam; "
          f"runs of {args.epochs} epochs, the first (warm-up, compilation) not counted; samples/s from the median "
          f"of the other epochs' times, the best of {args.repeats} runs")
    problems = [
        (synthetic("mlp 784-256-256-10", MLP, (FEATURES,), 1024, ROWS, "cuda"), 1_000_000),
        (synthetic("cnn [32, 64] on 32x32x3", CNN, (3, 32, 32), 1024, 50_000, "cuda"), 150_000),
    ]
    ok = True
    for problem, goal in problems:
        heading(f"{problem.name}, batch {problem.spec.batch_size}, {len(problem.x):,} rows")
        loops: dict[str, Callable[[], list[float]]] = {
            "hand (same kernels)": lambda p=problem: hand_epochs(p, args.epochs),
            "kiln fit() bf16": lambda p=problem: kiln_epochs(p, args.epochs, bf16=True),
        }
        if args.compile:
            loops[f"kiln fit() bf16, compile {args.compile}"] = lambda p=problem: kiln_epochs(
                p, args.epochs, bf16=True, compile_mode=args.compile)
        rates: dict[str, float] = {}
        for _ in range(args.repeats):
            for label, run in loops.items():
                rate = len(problem.x) / median(run()[1:])
                rates[label] = max(rates.get(label, 0.0), rate)
        flops = flops_per_sample(problem, "cuda")
        print(f"  model FLOPs per sample (forward + backward, FlopCounterMode): {flops / 1e6:.2f} MFLOP")
        for label, rate in rates.items():
            mfu = f"MFU {rate * flops / peak:.1%}" if peak else "MFU n/a (unknown GPU: give --peak-tflops)"
            print(f"  {label:<36} {rate:>12,.0f} samples/s   {mfu}")
        best = max((label for label in rates if label.startswith("kiln")), key=rates.get)
        print(f"  {best} / hand: {rates[best] / rates['hand (same kernels)']:.3f} of its throughput")
        ok &= target(f"{problem.name} samples/s ({best})", f"{rates[best]:,.0f}", f">= {goal:,}",
                     rates[best] >= goal)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each loop (GPU: 3 is plenty)")
    parser.add_argument("--epochs", type=int, default=6, help="GPU: epochs per run (the first is not counted)")
    parser.add_argument("--compile", default=None, help="GPU: also time fit() with torch.compile in this mode "
                        "(default, max-autotune, reduce-overhead)")
    parser.add_argument("--also", action="append", default=[], metavar="TRAINING_PY",
                        help="CPU: also time the fit() of this copy of worker/training.py (repeatable)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU: dense bf16 peak, for the MFU")
    args = parser.parse_args()
    ok = cpu(args) if args.device == "cpu" else gpu(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
