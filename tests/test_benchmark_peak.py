"""The arithmetic of benchmarks/train_speed.py: FLOPs counted per training image, the peak and the percentages."""

import pytest

from benchmarks.train_speed import (achieved, cpu_time_line, parse_cpuinfo, peak_line, percent_of, percent_rounds,
                                    product_share, train_flop_per_image)

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
    text = ("processor\t: 0\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD Ryzen 5 1600 Six-Core Processor\n"
            "flags\t\t: fpu sse avx avx2 fma bmi2\nprocessor\t: 1\ncpu family\t: 99\nmodel\t\t: 98\n")
    assert parse_cpuinfo(text) == {"model": "AMD Ryzen 5 1600 Six-Core Processor", "family": "23",
                                   "model_number": "1", "flags": ["avx2", "fma"]}


def test_a_capped_run_says_so_beside_its_figures():
    from benchmarks.train_speed import ISA_CAPS, cpu_label

    cpu = {"model": "AMD EPYC", "family": "25", "model_number": "17", "flags": ["avx2", "fma", "avx512f", "avx512_bf16"],
           "capability": "AVX2", "threads": 2, "isa_caps": dict(ISA_CAPS["avx2"])}
    label = cpu_label(cpu)
    assert label.startswith("AMD EPYC (family 25 model 17; avx2 fma avx512f avx512_bf16; AVX2 code, 2 threads; "
                            "capped to AVX2 (")
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in label and "ATEN_CPU_CAPABILITY=avx2" in label
    assert "capped" not in cpu_label({**cpu, "isa_caps": {}, "capability": "AVX512"})


def test_each_round_is_compared_with_the_peak_measured_in_it():
    from benchmarks.train_speed import combine_peak, percent_rounds

    peak = combine_peak([{"fp32_gflops": 100.0, "repeats": 12}, {"fp32_gflops": 50.0, "repeats": 12},
                         {"fp32_gflops": 80.0, "repeats": 12}])
    assert peak["fp32_gflops"] == 80.0 and len(peak["rounds"]) == 3
    flop = train_flop_per_image(SIMPLE_CNN_MACS)
    part = {"macs_per_image": sum(SIMPLE_CNN_MACS), "flop_per_image": flop,
            "rounds": [{"images_per_s": r * 1e9 / flop * 0.9} for r in (100, 50, 80)]}
    assert percent_rounds(part, peak) == pytest.approx([90.0, 90.0, 90.0])
    assert "median over 3 rounds (fp32: 100, 50, 80)" in peak_line(peak)
    assert percent_rounds(part, {"fp32_gflops": 80.0}) is None  # a peak measured once: no pairs


def test_epoch_clock_notes_each_epochs_speed_and_cpu_time_through_cnnkits_callbacks(tmp_path):
    import csv
    import io

    from benchmarks.train_speed import EpochClock
    from cnnkit.train import loop

    clock = EpochClock()
    log = io.StringIO()
    result = loop.train(model="simple_cnn", data="shapes", num_samples=128, batch_size=32, epochs=2,
                        out=str(tmp_path / "run"), progress=False, log=log, callbacks=clock)
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert clock.images_per_s == pytest.approx([float(row["images_per_s"]) for row in csv.DictReader(f)])
    assert len(clock.images_per_s) == result.epochs == 2
    assert len(clock.epoch_cpu_s) == 2 and all(s > 0 for s in clock.epoch_cpu_s)
    assert "epoch 2/2" in log.getvalue()  # the log still gets cnnkit's lines


def test_old_results_count_the_flops_they_counted_then():
    from benchmarks.train_speed import part_flop_per_image

    flop = train_flop_per_image(SIMPLE_CNN_MACS)
    assert part_flop_per_image({"macs_per_image": sum(SIMPLE_CNN_MACS), "flop_per_image": flop}) == flop
    assert part_flop_per_image({"macs_per_image": 10}) == 60  # written before flop_per_image was recorded
    assert part_flop_per_image({"images_per_s": 100.0}) is None  # the seed loop: no MACs counted
    peak = {"fp32_gflops": 100.0, "fp32_matmul_gflops": 50.0, "fp32_cpu_gflops": 80.0}
    seed = {"images_per_s": 100.0, "images_per_cpu_s": 90.0, "rounds": [{"images_per_s": 100.0}]}
    assert achieved(seed, peak) is None and percent_rounds(seed, {**peak, "rounds": [peak]}) is None
    assert product_share(seed, peak) == "" and cpu_time_line(seed, peak) is None


def test_the_share_of_the_product_alone_is_given_beside_the_peaks():
    from benchmarks.train_speed import product_share

    flop = train_flop_per_image(SIMPLE_CNN_MACS)
    part = {"macs_per_image": sum(SIMPLE_CNN_MACS), "flop_per_image": flop, "images_per_s": 40e9 / flop,
            "images_per_cpu_s": 20e9 / flop}
    peak = {"fp32_gflops": 100.0, "fp32_matmul_gflops": 50.0, "fp32_matmul_cpu_gflops": 40.0}
    assert product_share(part, peak) == "; 80% of the 2048x2048 product's 50.0 alone"
    assert product_share(part, peak, cpu=True) == "; 50% of the 2048x2048 product's 40.0 alone"
    assert product_share(part, {"fp32_gflops": 100.0}) == ""


def test_the_tables_heading_counts_one_epoch_and_one_round_in_the_singular():
    # A quick run (--epochs 1 --rounds 1) read "1 epochs of CIFAR-10 JPEG ..., 1 rounds of the speed runs".
    from benchmarks.train_speed import table

    one = table({"machine": "a CPU", "epochs": 1, "rounds": 1, "parts": {}})
    assert "1 epoch of CIFAR-10 JPEG" in one and "1 round of the speed runs" in one
    three = table({"machine": "a CPU", "epochs": 3, "rounds": 2, "parts": {}})
    assert "3 epochs of CIFAR-10 JPEG" in three and "2 rounds of the speed runs" in three
