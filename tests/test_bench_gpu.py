"""The pure parts of benchmarks/bench_gpu.py's per-kernel profile (--kernels): kernel names and the modelled rates.
The profile itself needs a GPU (scripts/gpu_check.sh runs it)."""

import os

import pytest
from conftest import load_module

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_gpu.py")


@pytest.fixture(scope="module")
def bench():
    return load_module(_PATH)


@pytest.mark.parametrize("raw, short", [
    ("void contrastbound::cuda::(anonymous namespace)::mma_lse_kernel<__nv_bfloat16, false>("
     "contrastbound::cuda::(anonymous namespace)::TcOperand<__nv_bfloat16>, float const*)",
     "mma_lse_kernel<__nv_bfloat16, false>"),
    ("void contrastbound::cuda::(anonymous namespace)::flash_kernel<__nv_bfloat16, "
     "(contrastbound::cuda::(anonymous namespace)::FlashMode)0, 32>(int)",
     "flash_kernel<__nv_bfloat16, (FlashMode)0, 32>"),
    ("contrastbound::cuda::(anonymous namespace)::tc_bound_kernel(float const*, long, float*)", "tc_bound_kernel"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"
     "(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",
     "vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "sm90_xmma_gemm_bf16bf16_bf16f32"),
])
def test_kernel_name(bench, raw, short):
    assert bench._kernel_name(raw) == short


def test_kernel_rows_rates(bench):
    B, K, d, mm = 8192, 2**18, 256, 500.0
    events = [
        ("void contrastbound::cuda::(anonymous namespace)::mma_rows_kernel<__nv_bfloat16, false>(int)", 2, 4000.0),
        ("void contrastbound::cuda::(anonymous namespace)::mma_lse_kernel<__nv_bfloat16, false>(int)", 1, 3000.0),
        ("void contrastbound::cuda::(anonymous namespace)::prepare_kernel<__nv_bfloat16, float>(int)", 3, 1000.0),
    ]
    rows = bench._kernel_rows(events, "fused", B, K, d, mm)
    assert [r["kernel"].split("<")[0] for r in rows] == ["mma_rows_kernel", "mma_lse_kernel", "prepare_kernel"]
    assert sum(r["pct_of_step"] for r in rows) == pytest.approx(100.0)
    assert rows[0]["pct_of_step"] == pytest.approx(50.0)
    # Two rows passes of 4 B K d flop each in 4 ms; one log-sum-exp pass of 2 B K d in 3 ms.
    assert rows[0]["model_tflops"] == pytest.approx(2 * 4 * B * K * d / 4e-3 / 1e12)
    assert rows[1]["model_tflops"] == pytest.approx(2 * B * K * d / 3e-3 / 1e12)
    assert rows[1]["pct_of_matmul"] == pytest.approx(100 * rows[1]["model_tflops"] / mm)
    assert rows[2]["model_tflops"] is None and rows[2]["pct_of_matmul"] is None  # O((B + K) d) work: no rate
    assert rows[0]["ms"] == pytest.approx(4.0)


def test_kernel_flop_model_names_real_kernels(bench):
    """Every kernel of the model exists in the CUDA sources (a renamed kernel would silently lose its rate)."""
    root = os.path.join(os.path.dirname(__file__), "..", "csrc", "cuda")
    text = "".join(open(os.path.join(root, f)).read() for f in os.listdir(root))
    for name in bench.KERNEL_FLOP:
        assert f" {name}(" in text or f"\n    {name}(" in text, name
