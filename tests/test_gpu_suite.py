"""scripts/gpu_suite.py, the one script a lent GPU machine runs: its --smoke mode takes every step on the CPU at
tiny sizes, so a broken step shows here rather than in the device's few minutes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _suite():
    from conftest import script_module

    return script_module("gpu_suite")


def _gone(pid: int) -> bool:
    for _ in range(50):  # reaped by init once killed
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_suite_smoke_takes_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "DIMR_OFFICIAL_SRC"}
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_suite.py"), "--out", str(out), "--smoke",
                           "--work", str(work)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "all.json").read_text())
    assert set(results) == {"environment", "train_dimr_tiny_2r_eager", "train_dimr_tiny_2r_compiled", "train_dit_tiny_4_eager",
                            "profile_train_step", "profile_sampling_step", "profile_train_step_compiled",
                            "profile_sampling_step_compiled", "released_side_by_side",
                            "gpu_profile_table2_components"}
    failed = {k: v["error"] for k, v in results.items() if "error" in v}
    assert not failed, failed
    assert "no checkout" in results["released_side_by_side"]["skipped"]
    for key in ("train_dimr_tiny_2r_eager", "train_dit_tiny_4_eager"):
        r = results[key]["result"]
        assert r["train_images_per_s"] > 0 and r["forward_images_per_s"] > 0 and not r["compile"]
        assert "compiled_graphs" not in r
    # a device call brings back at most 8 files from $OUT: the suite leaves two there, the rest in --work
    assert sorted(p.name for p in out.iterdir()) == ["all.json", "summary.md"]
    compiled = results["train_dimr_tiny_2r_compiled"]["result"]
    assert compiled["compile"] and compiled["train_images_per_s"] > 0
    assert compiled["first_calls_extra_s"] > 0 and len(compiled["train_warmup_s"]) == 1  # tracing took time
    # two kinds of block (5 Transformer and 3 ConvNeXt blocks), with and without gradients: at most 4 graphs,
    # and no block left eager
    assert 2 <= compiled["compiled_graphs"] <= 4 and compiled["compile_fallbacks"] == 0
    for key in ("train_dimr_tiny_2r_eager", "train_dimr_tiny_2r_compiled"):  # sampling eager and compiled
        sampling = results[key]["result"]["sampling"]
        assert [row["guidance"] for row in sampling] == [0.0, 1.4] and all(row["images_per_s"] > 0 for row in sampling)
    # eager samples at the training batch, compiled at the evaluation-sized one
    for key, b in (("train_dimr_tiny_2r_eager", 2), ("train_dimr_tiny_2r_compiled", 4)):
        assert [row["batch"] for row in results[key]["result"]["sampling"]] == [b, b]
    # compiled sampling says whether its recompiles left blocks eager (then its numbers are eager ones)
    assert all(row["compile_fallbacks"] == 0 and row["compiled_graphs"] >= compiled["compiled_graphs"]
               for row in compiled["sampling"])
    env = results["environment"]["result"]
    assert env["commit"] and len(env["commit"]) == 40 and env["torch"]  # the commit the numbers were taken at
    for key in ("profile_train_step", "profile_sampling_step", "profile_train_step_compiled",
                "profile_sampling_step_compiled"):
        r = results[key]["result"]
        assert abs(sum(r["shares"].values()) - 1.0) < 1e-6 and r["shares"].get("matmul", 0) > 0
        assert r["step_ms"] > 0 and r["compiled"] == key.endswith("_compiled")
    gpu = results["gpu_profile_table2_components"]["result"]
    assert gpu["exit"] == 0 and gpu["runs"], gpu["stderr"]
    assert results["environment"]["result"]["work"] == str(work)
    metrics = list((work / "results" / "table2_components").glob("*/evals/*/metrics.json"))
    assert metrics and all("fid" in json.loads(m.read_text()) for m in metrics)
    summary = (out / "summary.md").read_text()
    assert "| train_dimr_tiny_2r_eager | DiMR-tiny/2R |" in summary and "## profile_train_step" in summary
    assert "sampling eager, batch 2, guidance 1.4:" in summary and " at 250 NFE" in summary
    assert "sampling compiled, batch 4, guidance 1.4:" in summary
    assert "## gpu_profile_table2_components: exit 0, 1 runs reported" in summary
    header = next(line for line in summary.splitlines() if line.startswith("| measurement"))
    row = next(line for line in summary.splitlines() if line.startswith("| train_dit_tiny_4_eager"))
    assert header.count("|") == row.count("|")  # every row fills the table's columns


@pytest.mark.timeout(300)
def test_count_ops_counts_a_training_steps_operators(tmp_path):
    """scripts/count_ops.py (the gpu profile's operator counts in its recipe and BENCHMARKS.md), eagerly: the
    deeper network runs more operators, and an unknown variant is one clear line."""
    script = [sys.executable, str(ROOT / "scripts" / "count_ops.py"), str(ROOT / "ablations" / "table2_components.toml"),
              "--profile", "tiny", "--batch", "4", "--eager-only"]
    proc = subprocess.run([*script, "--variants", "uvit,dimr", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == {"uvit", "dimr"} and rows["uvit"]["batch"] == 4
    assert 50 < rows["uvit"]["eager"] < rows["dimr"]["eager"]
    proc = subprocess.run([*script, "--variants", "nope"], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 1 and "no variant" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_kernel_names_fall_in_their_categories():
    """The profile's shares on a GPU come from kernel names: cuBLAS's Hopper GEMMs (nvjet), cuDNN's
    convolutions (xmma fprop/dgrad/wgrad), flash attention and inductor's kernels each in their category."""
    cat = _suite().categorize
    assert cat("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT") == "matmul"
    assert cat("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert cat("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "depthwise conv"
    assert cat("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>") \
        == "attention"
    assert cat("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)") \
        == "attention"
    assert cat("fmha_cutlassB_f32_aligned_64x64_k64_sm80") == "attention"
    assert cat("triton_tem_fused_mm_0") == "matmul"
    assert cat("triton_per_fused_native_layer_norm_0") == "norms"
    assert cat("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"


def test_summary_is_written_after_every_step_and_errors_keep_the_table(tmp_path):
    """A suite killed from outside (the device command's time limit) keeps summary.md and all.json of the
    steps it took; a failed step's multi-line error stays one table row."""
    gs = _suite()
    s = gs.Suite(tmp_path, budget_s=60, smoke=True, work=tmp_path / "work")
    s.step("train_x_eager", lambda: {"model": "X", "train_images_per_s": 3.0, "sampling": []})
    assert "| train_x_eager | X | 3.0 |" in (tmp_path / "summary.md").read_text()

    def fail():
        raise RuntimeError("exit 1: line one\nline | two")

    s.step("released_side_by_side", fail)
    summary = (tmp_path / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| released_side_by_side"))
    assert "line one line / two" in row and row.count("|") == 9
    assert set(json.loads((tmp_path / "all.json").read_text())) == {"train_x_eager", "released_side_by_side"}


@pytest.mark.timeout(60)
def test_a_timed_out_child_takes_its_own_children_with_it(tmp_path):
    """subprocess.run's timeout kills the child alone: bench_official.py's timed processes and `run --jobs`'s
    workers would go on holding the GPU under the next measurements. run_tree stops the whole tree."""
    gs = _suite()
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)")
    t0 = time.monotonic()
    rc, out, _err, timed_out = gs.run_tree([sys.executable, "-c", code], timeout=3, grace_s=1)
    assert timed_out and "started" in out and time.monotonic() - t0 < 30
    assert _gone(int(pid_file.read_text())), "grandchild still running"


def test_children_import_this_checkout(tmp_path):
    """The suite's children (bench_official.py, `python -m dimr_lab run` and its workers) import the dimr_lab
    of the checkout the suite runs from, whatever their cwd and whatever copy the interpreter has installed."""
    gs = _suite()
    rc, out, err, _ = gs.run_tree([sys.executable, "-c", "import dimr_lab; print(dimr_lab.__file__)"], timeout=60)
    assert rc == 0, err
    assert Path(out.strip()).resolve() == (ROOT / "dimr_lab" / "__init__.py").resolve()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_official.py"), "--official", str(tmp_path)],
                          cwd=tmp_path, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "not a DiMR checkout" in proc.stderr
    assert str(ROOT) in subprocess.run(
        [sys.executable, "-c", "import runpy, sys; sys.argv = ['x', '--help']; "
         f"runpy.run_path({str(ROOT / 'scripts' / 'bench_official.py')!r}, run_name='not_main'); print(sys.path)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.timeout(200)
def test_sigterm_stops_the_suite_and_writes_the_summary(tmp_path):
    """The device command's time limit sends SIGTERM: the suite stops the step in flight, and the child
    process it waits on, and writes summary.md and all.json of what it took, that step marked interrupted.
    The step here: the released code's benchmark, with a stand-in checkout whose import hangs."""
    fake = tmp_path / "official"
    (fake / "libs" / "core").mkdir(parents=True)
    (fake / "libs" / "__init__.py").write_text("")
    (fake / "libs" / "core" / "__init__.py").write_text("")
    pid_file = tmp_path / "released.pid"
    (fake / "libs" / "core" / "blocks.py").write_text(
        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(150)\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_suite.py"), "--out", str(out), "--smoke",
                             "--skip", "bench,profile,gpu_profile", "--official", str(fake),
                             "--work", str(tmp_path / "work")],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while not pid_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert pid_file.exists(), proc.communicate(timeout=30)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert _gone(int(pid_file.read_text())), "the released benchmark's process outlived the suite"
    results = json.loads((out / "all.json").read_text())
    assert "result" in results["environment"]
    assert results["released_side_by_side"]["error"].startswith("interrupted")
    assert "| released_side_by_side | interrupted" in (out / "summary.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["all.json", "summary.md"]
