"""Every GPU measurement in one go, for a lent device machine (about 8 minutes on one H100/H200):

    python scripts/gpu_suite.py --out $OUT [--official PATH] [--budget-s 480]
    python scripts/gpu_suite.py --out /tmp/smoke --smoke          # the same steps on the CPU, tiny sizes

1. Training step, bf16 autocast, batch 64, of DiMR-XL/2R, G/2R, XL/3R and DiT-XL/2: eager and with compiled
   blocks (compile time stated), images/s, TFLOP/s, MFU, peak memory (`dimr-lab bench`).
2. Sampling images/s of XL/2R with and without guidance (the FID-50K bill), timed over --sample-nfe NFE and
   scaled to 250 (one network call per NFE): eager at the training batch, compiled at an evaluation's.
3. The released DiMR code side by side with ours in one run (scripts/bench_official.py: as it ships,
   without its block recomputation, ours), when --official (or $DIMR_OFFICIAL_SRC) names a checkout.
4. torch.profiler's top kernels of one XL/2R training step and one sampling step, eager and with compiled
   blocks, with the share of matmul, attention, depthwise convolution, norms, elementwise and optimizer time.
5. The `gpu` profile of the evidence ablations (Table 2 first), as long as the budget lasts. Steps 1-4 take
   about 7 minutes on an H200, so the ablations need a call of their own:
   `--skip bench,profile,released --budget-s 480`.
--out receives two files, rewritten after every step: all.json (every step's result, or its error) and
summary.md (them, for BENCHMARKS.md). A device call brings back at most 8 files from $OUT, no more than two
folders down, so everything else (released.json, the gpu profile's run folders) goes to --work (default: a
new temporary folder; `environment` names it). A step that fails is recorded with its error and the suite
goes on; SIGTERM stops the step in flight, and its child processes, and writes both files.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ["dimr_xl_2r", "dimr_g_2r", "dimr_xl_3r", "dit_xl_2"]
CATEGORIES = [  # (category, substrings of profiler op names), first match wins
    # fmha: the memory-efficient SDPA kernels (fmha_cutlassF_..._sm80), which "cutlass" would take for matmul
    ("attention", ("attention", "sdpa", "flash", "efficient_attention", "softmax", "fmha")),
    ("depthwise conv", ("conv", "cudnn", "dgrad", "wgrad", "fprop")),
    # before matmul: CUDA's fused AdamW kernel is multi_tensor_apply_kernel<FusedAdamMathFunctor> ("mm")
    ("optimizer", ("adam", "foreach", "lerp")),
    # nvjet: cuBLAS(Lt)'s Hopper GEMM kernels (CUDA 12.8+), e.g. nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT
    ("matmul", ("mm", "gemm", "matmul", "linear", "addmm", "cutlass", "sm90", "sm80", "nvjet")),
    ("norms", ("norm", "rsqrt")),
    ("elementwise", ("mul", "add", "gelu", "sigmoid", "silu", "copy", "cat", "div", "sub", "pow", "elementwise",
                     "vectorized", "reduce", "sum", "mean", "where", "fill", "clone", "neg", "exp")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def free_device_memory() -> None:
    """Hand cached GPU memory back: a step's networks stay in the caching allocator after it returns, and
    the released-code benchmark runs in child processes (on an H200 it failed after XL/2R's benchmarks had
    run in this process, and ran when it came first)."""
    import gc

    torch = sys.modules.get("torch")
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def child_env() -> dict[str, str]:
    """The environment of the suite's child processes: they import this checkout's dimr_lab (the code whose
    commit `environment` records), not another copy installed in the interpreter, whatever their cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def descendants(pid: int) -> list[int]:
    """The process ids below `pid` (children, grandchildren, ...), from /proc (Linux; [] elsewhere)."""
    parents: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:  # gone already
            pass


def run_tree(cmd: list[str], timeout: float, grace_s: float = 10.0) -> tuple[int | None, str, str, bool]:
    """(returncode, stdout, stderr, timed_out) of a child process. On a timeout (or an interrupt of the suite)
    the child and every process it started get SIGTERM, then SIGKILL after `grace_s`: subprocess.run would
    kill the child alone, and its own children (bench_official.py's timed processes, `run --jobs 8`'s
    training workers) would go on holding the GPU under the measurements that follow."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err, False
    except BaseException as exc:
        tree = [proc.pid] + descendants(proc.pid)
        _signal_all(tree, signal.SIGTERM)  # `run` and its workers stop at a step boundary on SIGTERM
        try:  # a signal to the suite: a short grace, the summary is still to be written
            out, err = proc.communicate(timeout=grace_s if isinstance(exc, subprocess.TimeoutExpired) else 2.0)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        _signal_all(tree + descendants(proc.pid), signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        more_out, more_err = proc.communicate()
        if not isinstance(exc, subprocess.TimeoutExpired):
            raise
        return proc.returncode, (out or "") + (more_out or ""), (err or "") + (more_err or ""), True


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) of the suite: stop the step, its child processes with it, and write the summary."""


def _terminate(signum, frame):
    raise Terminated(f"signal {signum}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a suite killed while writing leaves the previous version, not half a file


class Suite:
    def __init__(self, out: Path, budget_s: float, smoke: bool, work: Path | None = None):
        self.out, self.t0, self.budget_s, self.smoke = out, time.monotonic(), budget_s, smoke
        self.results: dict[str, object] = {}
        out.mkdir(parents=True, exist_ok=True)
        if work is None:
            import tempfile

            work = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.work = work  # what does not come back from a device call: released.json, the profile's runs
        work.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        _write_atomic(self.out / "summary.md", summary(self))
        _write_atomic(self.out / "all.json", json.dumps(self.results, indent=1, default=str))

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def step(self, name: str, fn) -> None:
        if self.left() <= 0:
            self.results[name] = {"skipped": "budget spent"}
            return
        t0 = time.monotonic()
        try:
            res = fn()
            self.results[name] = {"seconds": round(time.monotonic() - t0, 1), "result": res}
        except Exception as err:  # record and go on: one failed measurement must not cost the others
            self.results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-3000:]}
        except Terminated:
            self.results[name] = {"error": "interrupted (SIGTERM)", "seconds": round(time.monotonic() - t0, 1)}
            self.write()
            raise
        free_device_memory()  # the next step (a child process, too) gets the whole GPU
        self.write()  # summary.md after every step: a suite killed from outside keeps what it measured
        print(f"[gpu_suite] {name}: {'error' if 'error' in self.results[name] else 'ok'} "
              f"({time.monotonic() - t0:.0f} s, {self.left():.0f} s left)", flush=True)


def bench_one(s: Suite, name: str, compiled: bool, device: str, dtype: str, batch: int, sample_nfe: int,
              sample_batch: int = 0) -> None:
    """One training benchmark (eager or compiled blocks); XL/2R (tiny/2R in the smoke run) also samples."""
    from dimr_lab.bench import bench

    key = f"train_{name}_{'compiled' if compiled else 'eager'}"
    nfe = sample_nfe if name in ("dimr_xl_2r", "dimr_tiny_2r") else 0
    # eager XL/2R samples at the training batch (64, as the earlier measurements did), compiled XL/2R at an
    # evaluation's batch (`--sample-batch`): what FID-50K runs at
    s.step(key, lambda: bench(name, batch=batch, dtype=dtype, device=device, steps=2 if s.smoke else 10,
                              warmup=1 if s.smoke else 3, compile=compiled, sample_nfe=nfe, sample_guidance=1.4,
                              sample_batch=sample_batch if compiled else 0))


def plan(s: Suite) -> list[tuple[str, bool]]:
    """(model, compiled) in the order of what matters most, so that a short budget loses the least: XL/2R
    eager and compiled first, then the other networks eager, then their compiled runs."""
    if s.smoke:
        return [("dimr_tiny_2r", False), ("dimr_tiny_2r", True), ("dit_tiny_4", False)]
    return [("dimr_xl_2r", False), ("dimr_xl_2r", True)]


def plan_rest(s: Suite) -> list[tuple[str, bool]]:
    if s.smoke:
        return []
    rest = [m for m in MODELS if m != "dimr_xl_2r"]
    return [(m, False) for m in rest] + [(m, True) for m in rest]


def profile_step(s: Suite, device: str, dtype: str, batch: int, compiled: bool = False) -> None:
    """torch.profiler over one training step and one sampling step (eager, or with compiled blocks). Shares
    come from the device's own rows: kernels on a GPU (each kernel counted once, under its own name, which
    is how inductor's fused kernels show), operators on the CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dimr_lab.nn.network import build_model

    name = "dimr_tiny_2r" if s.smoke else "dimr_xl_2r"
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = build_model(name).to(dev)
    if compiled:
        torch._dynamo.reset()
        model.compile_blocks()
    spec = model.spec
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, device=dev)
    t = torch.rand(batch, device=dev)
    y = torch.randint(0, spec.num_classes, (batch,), device=dev)
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)

    def train_step():
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = sum(o.float().square().mean() for o in model(x, t, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_step():
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, spec.num_classes)]))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    suffix = "_compiled" if compiled else ""
    for label, fn in (("profile_train_step", train_step), ("profile_sampling_step", sample_step)):
        def run(fn=fn):
            for _ in range(2):
                fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            sync()
            step_ms = (time.perf_counter() - t0) / 3 * 1e3  # without the profiler
            with profile(activities=acts) as prof:
                fn()
                sync()
            attr = "self_device_time_total" if cuda else "self_cpu_time_total"
            rows = sorted((e for e in prof.key_averages() if e.device_type == kind),
                          key=lambda e: getattr(e, attr, 0), reverse=True)
            total = sum(getattr(e, attr, 0) for e in rows) or 1
            shares: dict[str, float] = {}
            for e in rows:
                c = categorize(e.key)
                shares[c] = shares.get(c, 0) + getattr(e, attr, 0) / total
            top = [{"op": e.key, "ms": getattr(e, attr, 0) / 1e3, "calls": e.count, "category": categorize(e.key)}
                   for e in rows[:25]]
            return {"model": name, "batch": batch, "dtype": dtype, "compiled": compiled, "time": attr,
                    "rows": "kernels" if cuda else "operators", "total_ms": total / 1e3, "step_ms": step_ms,
                    "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])), "top": top}
        s.step(label + suffix, run)


def released(s: Suite, official: str | None, device: str, dtype: str, batch: int) -> None:
    if not official:
        s.results["released_side_by_side"] = {"skipped": "no checkout of the released code (--official)"}
        return
    out = s.work / "released.json"
    depth = ["--t-depth", "2", "--c-depth", "2"] if s.smoke else ["--t-depth", "39", "--c-depth", "20"]
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_official.py"), "--official", official, "--device", device,
           "--dtype", dtype, "--batch", str(batch), *depth, "--steps", "2" if s.smoke else "10", "--warmup", "1",
           "--repeats", "1", "--configs", "released,released-nockpt,ours", "--json", str(out)]
    def run():
        timeout = max(60, s.left())
        code, stdout, stderr, timed_out = run_tree(cmd, timeout)
        if timed_out:
            raise TimeoutError(f"stopped after {timeout:.0f} s: {stdout[-1500:]} {stderr[-1500:]}")
        if code:  # the reason is in the script's own output: keep it with the record
            raise RuntimeError(f"exit {code}: {stdout[-1500:]} {stderr[-1500:]}")
        return {**json.loads(out.read_text()), "batch": batch, "log": stdout[-3000:]}
    s.step("released_side_by_side", run)


def gpu_profile(s: Suite, seeds: str = "") -> None:
    for abl in ("table2_components", "tdln_vs_adaln"):
        cmd = [sys.executable, "-m", "dimr_lab", "run", str(ROOT / "ablations" / f"{abl}.toml"), "--profile", "gpu",
               "--results", str(s.work / "results"), "--json", "--jobs", "8"] + (["--seeds", seeds] if seeds else [])
        if s.smoke:
            cmd += ["--seeds", "0", "--only", "dimr", "--set", "train.steps=2",
                    "--set", "eval.steps=[]", "--set", "eval.samples=8", "--set", "eval.batch_size=8",
                    "--set", "data.train_size=64", "--set", "train.batch_size=4", "--set", "train.precision=fp32"]
            if abl != "table2_components":
                continue

        def run(cmd=cmd):
            t0 = time.monotonic()
            # the runs finished by the end of the budget are kept; the rest are stopped with their workers
            code, stdout, stderr, timed_out = run_tree(cmd, max(30, s.left()))
            return {"exit": code, "seconds": time.monotonic() - t0, "timed_out": timed_out,
                    "runs": [json.loads(x) for x in stdout.splitlines() if x.startswith("{")][-40:],
                    "stderr": stderr[-2000:]}
        s.step(f"gpu_profile_{abl}", run)


def environment(device: str) -> dict:
    """What the numbers were measured on: the device, torch, and the commit (clean or not) of this code."""
    import platform

    import torch

    from dimr_lab.provenance import git_commit

    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"device": gpu, "torch": torch.__version__, "cpus": os.cpu_count(), **git_commit()}


def summary(s: Suite) -> str:
    env = s.results.get("environment", {}).get("result", {})
    lines = ["# GPU suite", "", f"{time.strftime('%Y-%m-%d %H:%M')}; {s.budget_s - s.left():.0f} s; "
             + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += ["| measurement | model | img/s | TFLOP/s | MFU | peak MiB | warm-up beyond steady s | graphs (eager left) |",
              "|---|---|---|---|---|---|---|---|"]
    for key, v in s.results.items():
        r = v.get("result") if isinstance(v, dict) else None
        if key.startswith("train_") and isinstance(r, dict):
            lines.append(f"| {key} | {r.get('model')} | {r.get('train_images_per_s', 0):.1f} | "
                         f"{r.get('train_tflops') or 0:.1f} | {r.get('mfu') or 0:.1%} | "
                         f"{r.get('peak_memory_mib') or 0:.0f} | {r.get('first_calls_extra_s', 0):.1f} | "
                         f"{r.get('compiled_graphs', '-')} ({r.get('compile_fallbacks', '-')}) |")
            for row in r.get("sampling", []):
                at250 = row["images_per_s"] * row["nfe"] / 250  # one network call per NFE: the cost scales with NFE
                lines.append(f"| sampling {'compiled' if r.get('compile') else 'eager'}, batch {row['batch']}, "
                             f"guidance {row['guidance']}: "
                             f"{row['images_per_s']:.2f} img/s at {row['nfe']} NFE = {at250:.2f} at 250 NFE, "
                             f"{row['forward_images_per_s']:.0f} forward img/s | {r.get('model')} | | | | | | "
                             + (f"{row['compiled_graphs']} ({row['compile_fallbacks']}) |" if "compiled_graphs" in row
                                else "|"))
        elif isinstance(v, dict) and ("error" in v or "skipped" in v):
            why = " ".join(str(v.get("error") or v.get("skipped")).split()).replace("|", "/")[:300]  # one table row
            lines.append(f"| {key} | {why} | | | | | | |")
    rel = (s.results.get("released_side_by_side") or {}).get("result")
    if isinstance(rel, dict) and rel.get("summary"):
        batch = rel.get("batch") or (2 if s.smoke else 64)
        lines += ["", f"## The released code side by side (XL/2R widths, batch {batch}, one process each)", "",
                  "| configuration | img/s | TFLOP/s | MFU | peak MiB |", "|---|---|---|---|---|"]
        for cfg, r in rel["summary"].items():
            lines.append(f"| {cfg} | {batch / r['train_step_s']:.1f} | {r.get('train_tflops') or 0:.1f} | "
                         f"{r.get('mfu') or 0:.1%} | {r.get('peak_memory_mib') or 0:.0f} |")
        if rel.get("equivalence"):
            lines.append(f"\nequivalence (float32): {json.dumps(rel['equivalence'])}")
    for key in ("profile_train_step", "profile_sampling_step", "profile_train_step_compiled",
                "profile_sampling_step_compiled"):
        r = (s.results.get(key) or {}).get("result")
        if r:
            lines += ["", f"## {key} ({r['model']}, batch {r['batch']}, {r['dtype']}): {r['total_ms']:.1f} ms of "
                          f"{r['rows']} in a {r['step_ms']:.1f} ms step", ""]
            lines += [f"- {k}: {v:.1%}" for k, v in r["shares"].items()]
    for key, v in s.results.items():
        r = v.get("result") if isinstance(v, dict) else None
        if key.startswith("gpu_profile_") and isinstance(r, dict):
            stopped = ", stopped at the end of the budget" if r.get("timed_out") else ""
            lines += ["", f"## {key}: exit {r.get('exit')}{stopped}, {len(r.get('runs') or [])} runs reported "
                          f"in {r.get('seconds', 0):.0f} s"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None,
                   help="released.json and the gpu profile's run folders (default: a new temporary folder)")
    p.add_argument("--official", default=os.environ.get("DIMR_OFFICIAL_SRC"))
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script itself)")
    p.add_argument("--skip", default="", help="comma-separated steps to skip: bench,profile,released,gpu_profile")
    p.add_argument("--sample-nfe", type=int, default=10,
                   help="NFE of the timed sampling runs; the summary scales images/s to 250 NFE (one call per NFE)")
    p.add_argument("--bench", default="",
                   help="the training benchmarks to take instead of the plan, e.g. dimr_g_2r:compiled,dit_xl_2:eager")
    p.add_argument("--sample-batch", type=int, default=250,
                   help="the sampling batch of compiled XL/2R (eager samples at the training batch, 64)")
    p.add_argument("--gpu-seeds", default="", help="seeds of the gpu profile's runs (default: the profile's)")
    args = p.parse_args()
    chosen = []
    for entry in filter(None, args.bench.split(",")):
        name, _, mode = entry.partition(":")
        if mode not in ("eager", "compiled"):
            p.error(f"--bench {entry!r}: write MODEL:eager or MODEL:compiled")
        chosen.append((name, mode == "compiled"))
    s = Suite(args.out, args.budget_s, args.smoke, args.work)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        run_steps(s, args, chosen)
    except Terminated:
        print("[gpu_suite] terminated: summary of the steps taken so far", flush=True)
        s.write()
        return 143
    s.write()
    print(summary(s))
    return 0


def run_steps(s: Suite, args: argparse.Namespace, chosen: list[tuple[str, bool]]) -> None:
    device, dtype, batch = ("cpu", "float32", 2) if args.smoke else ("cuda", "bfloat16", 64)
    skip = set(args.skip.split(","))
    nfe = 2 if args.smoke else args.sample_nfe
    s.step("environment", lambda: {**environment(device), "work": str(s.work)})
    if chosen and "released" not in skip:  # a rerun of chosen measurements: the released code first
        released(s, args.official, device, dtype, batch)
        skip.add("released")
    if "bench" not in skip:
        for name, compiled in chosen or plan(s):
            bench_one(s, name, compiled, device, dtype, batch, nfe, 4 if args.smoke else args.sample_batch)
    if "released" not in skip:
        released(s, args.official, device, dtype, batch)
    if "profile" not in skip:
        profile_step(s, device, dtype, batch)
        profile_step(s, device, dtype, batch, compiled=True)
    if "bench" not in skip and not chosen:
        for name, compiled in plan_rest(s):
            bench_one(s, name, compiled, device, dtype, batch, nfe)
    if "gpu_profile" not in skip:
        gpu_profile(s, args.gpu_seeds)


if __name__ == "__main__":
    sys.exit(main())
