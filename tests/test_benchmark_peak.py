"""The arithmetic of benchmarks/train_speed.py: FLOPs counted per training image, the peak and the percentages."""

import pytest

from benchmarks.train_speed import achieved, parse_cpuinfo, peak_line, percent_of, train_flop_per_image

# simple_cnn at 3x32x32: conv 3->32, conv 32->64, conv 64->128, linear 2048->256, linear 256->10
SIMPLE_CNN_MACS = [884_736, 4_718_592, 4_718_592, 524_288, 2_560]


def test_training_flops_leave_out_the_images_gradient():
    # 2 x MACs forward, 2 x for the weights' gradients, 2 x for the inputs' gradients but not the first layer's.
    assert train_flop_per_image([10]) == 40
    assert train_flop_per_image([10, 5]) == 6 * 15 - 20
    assert train_flop_per_image(SIMPLE_CNN_MACS) == 63_323_136
    assert train_flop_per_image([]) == 0


def test_percent_of_a_rate():
    # 1,000 images/s of 100 MFLOP each use 100 GFLOP/s: half of a 200 GFLOP/s peak.
    assert percent_of(1000, 100e6, 200) == pytest.approx(50.0)


def test_achieved_compares_with_the_fp32_peak_and_its_own_precisions():
    peak = {"fp32_gflops": 300.0, "bf16_gflops": 900.0}
    part = {"images_per_s": 4000, "precision": "bf16", "macs_per_image": sum(SIMPLE_CNN_MACS),
            "flop_per_image": train_flop_per_image(SIMPLE_CNN_MACS)}
    gflops, of_fp32, of_own = achieved(part, peak)
    assert gflops == pytest.approx(4000 * 63_323_136 / 1e9)
    assert of_fp32 == pytest.approx(100 * gflops / 300) and of_own == pytest.approx(100 * gflops / 900)
    # On a CPU without bf16 matrix instructions there is no bf16 peak to compare with.
    assert achieved(part, {"fp32_gflops": 300.0})[2] is None


def test_peak_line_names_both_kernels_and_a_missing_bf16():
    line = peak_line({"repeats": 12, "fp32_gflops": 310.0, "fp32_matmul_gflops": 205.0, "fp32_conv_gflops": 310.0})
    assert "310 GFLOP/s fp32 (product 205, convolution 310)" in line
    assert "no bf16" in line and "best of 12" in line


def test_cpuinfo_model_and_flags():
    text = ("processor\t: 0\nmodel name\t: AMD Ryzen 5 1600 Six-Core Processor\n"
            "flags\t\t: fpu sse avx avx2 fma bmi2\nprocessor\t: 1\n")
    assert parse_cpuinfo(text) == {"model": "AMD Ryzen 5 1600 Six-Core Processor", "flags": ["avx2", "fma"]}
