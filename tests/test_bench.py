"""The benchmark CLI: bad input exits non-zero with a message, and a tiny sweep writes its results."""
import json
import math
import subprocess
import sys
import time

import pytest
import torch

# tune imports the Triton kernels: here, while TRITON_INTERPRET=1 (the fixture below unsets it)
from peftkern.bench import cases, cli, measure, sweep, tune


@pytest.fixture(autouse=True)
def _compiled_paths_and_few_copies(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # time the compiled CPU paths, not the interpreter
    monkeypatch.setattr(sweep.measure, "ROTATE_BYTES", 1 << 20)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "peftkern.bench", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--ops", "gemm9"], "unknown op 'gemm9'"),
    (["--shapes", "4096by4096"], "expected NxK"),
    (["--M", "0"], "not a positive integer"),
    (["--ranks", ","], "empty rank list"),
])
def test_bad_arguments_exit_2_with_a_message(args, needle):
    p = _run_cli(*args)
    assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_clear_error():
    p = _run_cli("--device", "cuda", "--quick")
    assert p.returncode == 2 and "no CUDA device" in p.stderr and "Traceback" not in p.stderr


def test_plan_replaces_only_the_axes_given():
    items = sweep.plan(["dequantize", "decode"], "cpu", quick=True, shapes=[(64, 128)], Ms=[3])
    assert items == [("dequantize", 64, 128, 0, 0), ("decode", 64, 128, 3, 16)]


def test_a_failing_baseline_is_reported_not_raised():
    case = cases.dequantize(64, 128, 0, 0, torch.float32, "cpu")

    def broken():
        raise RuntimeError("baseline exploded")
    case.impls.append(cases.Impl("broken", broken))
    roof = {"memory_GBps": 1.0, "matmul_TFLOPs": 1.0}
    rows = sweep.run_case(case, roof, 0.01)
    bad = next(r for r in rows if r["impl"] == "broken")
    assert "baseline exploded" in bad["error"] and bad["peftkern_speedup"] is None
    assert next(r for r in rows if r["impl"] == "peftkern")["peftkern_speedup"] == 1.0


def test_cpu_timing_interleaves_implementations_and_keeps_errors_in_place():
    """The implementations of a case run in alternating slices (so one host's drift moves them
    alike), each gets at least one call per slice, and one that fails mid-way is reported in its
    place without being called again."""
    calls = []

    def fn(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    def flaky():
        calls.append("flaky")
        if calls.count("flaky") == 3:  # two calls pass, then it breaks
            raise RuntimeError("broke mid-way")
    fast, slow, bad = measure.interleaved_median_ms(
        [fn("fast", 0.001), fn("slow", 0.004), flaky], min_time_s=0.05, rounds=4, warm_rounds=1)
    assert 1 <= fast < slow < 20 and isinstance(bad, RuntimeError)
    assert calls.count("flaky") == 3
    # slices alternate: fast, slow, flaky (the warm round), then slow, fast (flaky is gone), ...
    runs = [k for i, k in enumerate(calls) if i == 0 or calls[i - 1] != k]
    assert runs[:5] == ["fast", "slow", "flaky", "slow", "fast"]
    assert calls.count("slow") >= 1 + 4  # at least one call per slice, the warm round's too


def test_tiny_sweep_writes_table_json_and_plots(tmp_path, capsys):
    rc = cli.main(["--ops", "dequantize,decode,qlora_fwd_bwd,qdora_step", "--shapes", "96x128", "--M", "1,3",
                   "--out", str(tmp_path)])
    assert rc == 0
    folder = next(tmp_path.iterdir())
    data = json.loads((folder / "bench.json").read_text())
    meta, rows = data["meta"], data["rows"]
    for key in ("device", "date", "torch", "triton", "peftkern_commit", "roofline", "command"):
        assert key in meta
    assert meta["roofline"]["memory_GBps"] > 0 and meta["roofline"]["matmul_TFLOPs"] > 0
    assert {r["op"] for r in rows} == {"dequantize", "decode", "qlora_fwd_bwd", "qdora_step"}
    assert {r["impl"] for r in rows if r["op"] == "qdora_step"} == \
        {"peftkern", "peftkern-lora", "peft-dora", "peft-lora"}
    assert {(r["op"], r["M"]) for r in rows} >= {("decode", 1), ("decode", 3), ("dequantize", 0)}
    for r in rows:
        assert not r.get("error"), r
        assert r["ms"] > 0 and math.isfinite(r["peftkern_speedup"])
        if r["impl"] == "peftkern":
            assert r["peftkern_speedup"] == 1.0
    md = (folder / "bench.md").read_text()
    assert "## decode" in md and "peftkern ×" in md
    assert "== qlora_fwd_bwd" in capsys.readouterr().out
    if _has_matplotlib():
        assert (folder / "speedup_vs_M.png").stat().st_size > 0
        assert (folder / "roofline.png").stat().st_size > 0


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_tuning_table_from_measurements(tmp_path, monkeypatch):
    """The CUDA/Triton crossover is the largest M up to which CUDA won at every measured M; adopt()
    merges measured sections into the package table, which answers for the nearest measured size."""
    from peftkern.ops import tuning

    def row(N, M, impl, ms):
        return {"op": "decode", "N": N, "K": 4096, "M": M, "impl": impl, "ms": ms}
    rows = [row(4096, 1, "peftkern[cuda]", 1.0), row(4096, 1, "peftkern[triton]", 2.0),
            row(4096, 4, "peftkern[cuda]", 1.5), row(4096, 4, "peftkern[triton]", 2.0),
            row(4096, 16, "peftkern[cuda]", 3.0), row(4096, 16, "peftkern[triton]", 2.0),
            row(1024, 1, "peftkern[cuda]", 2.0), row(1024, 1, "peftkern[triton]", 1.0),
            row(1024, 4, "peftkern[cuda]", 0.5), row(1024, 4, "peftkern[triton]", 1.0),
            {"op": "qlora_fwd", "N": 4096, "K": 4096, "M": 128, "impl": "peftkern", "ms": 1.0}]
    gemv = tuning.cuda_gemv_entries(rows)
    assert gemv == [{"N": 1024, "K": 4096, "max_M": 0}, {"N": 4096, "K": 4096, "max_M": 4}]
    table = tmp_path / "tuning.json"
    table.write_text('{"devices": {}}')
    monkeypatch.setattr(tuning, "TABLE", str(table))
    tuning.clear_caches()
    tuning.write(str(tmp_path / "a.json"), "GPU X", "cuda_gemv", gemv)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}
    tuning.write(str(tmp_path / "b.json"), "GPU X", "lora_matmul", [
        {"op": "fwd", "quant": True, "M": 1, "N": 4096, "K": 4096, "config": cfg},
        {"op": "fwd", "quant": True, "M": 2048, "N": 4096, "K": 4096, "config": {"BLOCK_M": 128}}])
    tuning.adopt(str(tmp_path / "a.json"))
    tuning.adopt(str(tmp_path / "b.json"))   # a second section keeps the first
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    assert tuning.cuda_gemv_max_m("cuda", 4096, 4096) == 4
    assert tuning.cuda_gemv_max_m("cuda", 14336, 4096) == 4   # nearest: 4096 x 4096
    assert tuning.cuda_gemv_max_m("cuda", 1024, 2048) == 0    # nearest: 1024 x 4096
    assert tuning.lora_matmul_config("cuda", "fwd", True, 8, 1024, 4096) == cfg
    assert tuning.lora_matmul_config("cuda", "fwd", True, 4096, 1024, 4096) == {"BLOCK_M": 128}
    assert tuning.lora_matmul_config("cuda", "dx", True, 8, 1024, 4096) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU Y")
    assert tuning.cuda_gemv_max_m("cuda", 4096, 4096) == 0    # not measured: Triton
    assert tuning.lora_matmul_config("cuda", "fwd", True, 1, 4096, 4096) is None
    tuning.clear_caches()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_tune_refuses_without_gpu(capsys):
    assert tune.main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_host_cost_bench_times_both_layers_in_every_mode():
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from peftkern.bench import host
    for input_grad in (False, True):
        rows = host.run(n=16, r=2, M=2, calls=3, repeats=1, input_grad=input_grad)
        assert [(r["base"], r["mode"]) for r in rows] == [
            ("dense", "no_grad"), ("dense", "training"), ("bnb 4-bit", "no_grad"),
            ("bnb 4-bit", "training")]
        assert all(r["peft_us"] > 0 and r["enabled_us"] > 0 and
                   math.isclose(r["ratio"], r["enabled_us"] / r["peft_us"]) for r in rows)


def test_tune_rejects_a_candidate_with_a_wrong_result():
    """A tuning run times a candidate only if its result agrees with dequantize + cuBLAS."""
    want = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    assert tune.agrees(want + 1e-3 * want.abs().max(), want)
    assert tune.agrees((want.half(), None, None), (want, None, None))
    assert not tune.agrees(want.flip(1), want)  # a permuted result
    assert not tune.agrees(torch.full_like(want, float("nan")), want)
    assert not tune.agrees(want[:8], want)
