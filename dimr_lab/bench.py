"""Speed and memory of a network: training steps (forward + backward + AdamW) and forward passes.

What is measured
- Times: wall clock per step (CUDA synchronised), median over `steps` after `warmup` steps;
  images/s = batch / median. Also the process CPU seconds per step (`*_cpu_s`): on a shared CPU
  with one torch thread, CPU time is robust to being descheduled where wall time is not.
- dtype: float32 runs in float32; bfloat16 / float16 run under torch.autocast with float32 weights
  (mixed precision, as training does; no gradient scaler).
- Peak memory, CUDA: torch.cuda.max_memory_allocated over the phase (weights, gradients, AdamW state,
  activations). CPU: torch keeps no peak counter for its CPU allocator, so it is the process's peak
  resident set over the phase minus its resident set before the model was built: the same things
  plus allocator slack and whatever else the process touches. On Linux the peak is VmHWM, reset at
  the start of each phase (/proc/self/clear_refs); where it cannot be reset it is a high-water mark
  of the whole process and exact only when the phase raised it (`memory_exact`), so measure in a
  fresh process (the CLI is one; `run_isolated` starts one).
- TFLOP/s: the model's MACs per image (torch.utils.flop_counter, as `describe`) x 2 FLOPs, x 3 for a
  training step (forward + backward), not counting the recomputation of activation checkpointing.
  MFU = TFLOP/s / the device's dense peak (a small table; CUDA only).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from dimr_lab.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dense peak TFLOP/s by device-name substring (first match): bf16/fp16 tensor cores, fp32 without TF32
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 51.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
]

Call = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], list]


def ours_call(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list:
    return model(x, t, y)


def rss_mib() -> float:
    """Current resident set of this process (Linux /proc; elsewhere the peak, as the best available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return maxrss_mib()


def maxrss_mib() -> float:
    """Peak resident set of this process: VmHWM on Linux (per address space, so a fresh exec'd process
    starts afresh, and resettable), else getrusage's ru_maxrss (which survives fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: `5` into /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_tflops(device: torch.device, dtype: str) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return name, peaks.get(dtype)
    return name, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], steps: int, warmup: int,
           device: torch.device) -> tuple[list[float], list[float], list[float]]:
    """Wall-clock and process CPU seconds of each timed call, and wall-clock seconds of each warm-up call."""
    warm = []
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        _sync(device)
        warm.append(time.perf_counter() - start)
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu, warm


class _Memory:
    """Peak memory of a phase: CUDA allocator peak, or CPU peak RSS above a baseline."""

    def __init__(self, device: torch.device, baseline_mib: float):
        self.device, self.baseline = device, baseline_mib

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.reset = reset_peak_rss()
        self.high_before = maxrss_mib()

    def stop(self) -> tuple[float, bool]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, True
        high = maxrss_mib()
        return high - self.baseline, self.reset or high > self.high_before


def bench_model(model: torch.nn.Module, *, batch: int, image_size: int, in_channels: int, num_classes: int,
                dtype: str = "float32", device: str | torch.device = "cpu", steps: int = 5, warmup: int = 2,
                train: bool = True, forward: bool = True, call: Call = ours_call, t_mode: str = "ours",
                macs_per_image: float | None = None, baseline_mib: float | None = None,
                seed: int = 0, optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None
                ) -> dict[str, Any]:
    """Time training steps and forward passes of a built model (its weights already on `device`)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, image_size, image_size, generator=gen).to(device)
    t = torch.rand(batch, generator=gen).to(device)  # distinct t per sample: TD tensors per sample
    t_in = 8 * t - 4 if t_mode == "log_snr" else t
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "float32")
    memory = _Memory(device, rss_mib() if baseline_mib is None else baseline_mib)
    result: dict[str, Any] = {}

    if forward:
        model.eval()

        def fwd() -> None:
            with torch.no_grad(), autocast:
                call(model, x, t_in, y)

        memory.start()
        times, cpu, warm = _timed(fwd, steps, warmup, device)
        peak, exact = memory.stop()
        result.update(forward_s=statistics.median(times), forward_times_s=times, forward_warmup_s=warm,
                      forward_cpu_s=statistics.median(cpu),
                      forward_images_per_s=batch / statistics.median(times),
                      forward_peak_memory_mib=peak, forward_memory_exact=exact)
    if train:
        model.train()
        if optimizer is None:  # the trainer's AdamW (fused where the device has the kernel)
            from dimr_lab.train.loop import build_optimizer

            optimizer = build_optimizer
        opt = optimizer(model)

        def step() -> None:
            with autocast:
                outs = call(model, x, t_in, y)
                loss = sum(o.float().square().mean() for o in outs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        memory.start()
        times, cpu, warm = _timed(step, steps, warmup, device)
        peak, exact = memory.stop()
        result.update(train_step_s=statistics.median(times), train_times_s=times, train_warmup_s=warm,
                      train_cpu_s=statistics.median(cpu),
                      train_images_per_s=batch / statistics.median(times),
                      peak_memory_mib=peak, memory_exact=exact)
    name, peak_tf = peak_tflops(device, dtype)
    result.update(device_name=name, peak_tflops=peak_tf,
                  memory_measure="torch.cuda.max_memory_allocated" if device.type == "cuda"
                  else "peak RSS (VmHWM, reset per phase) minus RSS before the model was built"
                  if getattr(memory, "reset", False) else "peak RSS (high-water mark) minus RSS before the model was built")
    if macs_per_image:
        flops = 2 * macs_per_image * batch
        if "forward_s" in result:
            result["forward_tflops"] = flops / result["forward_s"] / 1e12
        if "train_step_s" in result:
            result["train_tflops"] = 3 * flops / result["train_step_s"] / 1e12
        if peak_tf:
            result["mfu"] = result.get("train_tflops", 0.0) / peak_tf
            if "forward_tflops" in result:
                result["forward_mfu"] = result["forward_tflops"] / peak_tf
    return result


def bench_sampling(model: torch.nn.Module, *, batch: int, image_size: int, in_channels: int, num_classes: int,
                   dtype: str, device: torch.device, nfe: int, guidance: float, repeats: int = 2) -> dict[str, Any]:
    """Images/s of the sampler (DPM-Solver++ on the released discrete schedule, `nfe` network evaluations per
    sample; with guidance, conditional and unconditional share one batched forward): the median of
    `repeats` full sampling runs of `batch` images after one untimed run."""
    from dimr_lab.diffusion.samplers import sample
    from dimr_lab.diffusion.schedule import build_schedule

    sched = build_schedule("scaled_linear", 1000)
    amp = DTYPES[dtype] if dtype != "float32" else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, max(1, num_classes), (batch,), generator=g).to(device)

    def net(xx, t, yy, tau=None):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            return model(xx, t, yy, tau=tau)[-1].float()

    def run() -> None:
        with torch.no_grad():
            sample(net, x, y, sampler="dpm_solver++", steps=nfe, order=2, schedule=sched, guidance_scale=guidance,
                   null_label=num_classes)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    per = statistics.median(times)
    forwards = nfe * (2 if guidance else 1)
    return {"nfe": nfe, "guidance": guidance, "batch": batch, "images_per_s": batch / per, "forward_images_per_s": batch * forwards / per,
            "seconds": per}


def bench(spec: Any, *, batch: int = 8, dtype: str = "float32", device: str = "cpu", steps: int = 5,
          warmup: int = 2, checkpointing: bool = False, compile: bool = False, seed: int = 0,
          sample_nfe: int = 0, sample_guidance: float = 1.5, sample_batch: int = 0) -> dict[str, Any]:
    """Build the network of `spec` (ModelSpec, dict, preset or TOML) and benchmark it: training steps, forward
    passes, and with `sample_nfe` the sampler with and without guidance (`sample_batch` images at a time;
    0 = `batch`; with guidance each network call takes twice as many). `compile` compiles as
    `train.compile` does (each block: one graph per kind of block) and reports the graphs, the frames left
    eager and `first_calls_extra_s`, the warm-up calls' time beyond the steady calls' (compilation)."""
    from dimr_lab.nn.describe import count_macs
    from dimr_lab.nn.network import build_model
    from dimr_lab.spec.model_spec import ModelSpec, resolve_model

    if batch < 1 or steps < 1 or warmup < 0 or sample_batch < 0:
        raise UserError(f"need batch >= 1, steps >= 1, warmup >= 0, sample batch >= 0 (got {batch}, {steps}, "
                        f"{warmup}, {sample_batch})")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    spec = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    # MACs on the meta device; attention_fp32 changes no MAC, and its autocast guard fails on 'meta'
    counted = copy.deepcopy(spec)
    counted.attention_fp32 = False
    with torch.device("meta"):
        macs = count_macs(build_model(counted), device="meta")["macs"]
    baseline = rss_mib()
    # CUDA: what is still allocated before this network is built (an earlier one's tensors kept alive
    # would count in this one's peak memory)
    allocated_before = torch.cuda.memory_allocated(device) / 2**20 if device == "cuda" else None
    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    model.set_checkpointing(checkpointing)
    if compile:
        from torch._dynamo.utils import counters

        # a fresh dynamo state: graphs of an earlier network in this process would count against this one's
        # recompile limit (per code object, so shared by every network's blocks) and leave its blocks eager
        torch._dynamo.reset()
        counters.clear()
        model.compile_blocks()
    t0 = time.perf_counter()
    result = bench_model(model, batch=batch, image_size=spec.image_size, in_channels=spec.in_channels,
                         num_classes=spec.num_classes, dtype=dtype, device=device, steps=steps, warmup=warmup,
                         macs_per_image=macs, baseline_mib=baseline, seed=seed)
    result["wall_s"] = time.perf_counter() - t0
    # the warm-up calls' time beyond the steady calls': compilation when compiled (with the first calls' own
    # one-off costs, such as allocator growth and kernel selection, which an eager run shows too)
    result["first_calls_extra_s"] = sum(
        sum(result.get(f"{phase}_warmup_s", [])) - len(result.get(f"{phase}_warmup_s", [])) * result[key]
        for phase, key in (("forward", "forward_s"), ("train", "train_step_s")) if key in result)
    if compile:  # graphs compiled, and code that fell back to eager (recompile limit, errors)
        result["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        result["compile_fallbacks"] = int(counters["frames"]["total"] - counters["frames"]["ok"])
    if sample_nfe:
        model.eval()
        dev = torch.device(device)
        kw = dict(batch=sample_batch or batch, image_size=spec.image_size, in_channels=spec.in_channels,
                  num_classes=spec.num_classes, dtype=dtype, device=dev, nfe=sample_nfe)
        result["sampling"] = []
        for guidance in (0.0, sample_guidance):
            row = bench_sampling(model, guidance=guidance, **kw)
            if compile:  # sampling's batches recompile the blocks: the graphs, and frames left eager, so far
                row["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
                row["compile_fallbacks"] = int(counters["frames"]["total"] - counters["frames"]["ok"])
            result["sampling"].append(row)
    if allocated_before is not None:
        result["allocated_before_mib"] = allocated_before
    params = sum(p.numel() for p in model.parameters())
    return {"model": spec.name, "params": params, "gmacs_per_image": macs / 1e9, "batch": batch, "dtype": dtype,
            "device": device, "threads": torch.get_num_threads(), "checkpointing": checkpointing,
            "compile": compile, "steps": steps, "warmup": warmup, "torch": torch.__version__, **result}


def run_isolated(spec_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """`bench` in a fresh Python process (so that its peak RSS is this benchmark's alone)."""
    payload = json.dumps({"spec": spec_dict, "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-m", "dimr_lab.bench"], input=payload, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"isolated benchmark failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # used by run_isolated: JSON {"spec", "kwargs"} on stdin, one JSON line out
    job = json.loads(sys.stdin.read())
    print(json.dumps(bench(job["spec"], **job["kwargs"])))
