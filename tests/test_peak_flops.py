"""MFU's denominator: the dense bf16 peak by exact GPU model, from the name CUDA reports (no GPU needed)."""
import pytest

from witscale.training.config import RunConfig
from witscale.training.peak_flops import device_peak_flops, peak_bf16_flops

T = 1e12


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989),        # SXM5
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA A100-PCIE-40GB", 312),
    ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA L40S", 362),
    ("NVIDIA B200", 2250),
    ("nvidia  h100 pcie", 756),            # case and spacing do not matter
])
def test_known_gpus_get_their_datasheet_peak(name, tflops):
    assert peak_bf16_flops(name) == tflops * T


@pytest.mark.parametrize("name", ["NVIDIA H100 PCIe-ish", "NVIDIA H800", "NVIDIA A10G", "NVIDIA RTX 6000 Ada",
                                  "Tesla V100-SXM2-32GB", "cpu", ""])
def test_unknown_gpus_get_no_peak(name):
    # no substring guess: an unknown H100 variant is not given the SXM's figure
    assert peak_bf16_flops(name) is None


def test_peak_tflops_overrides_the_table():
    assert device_peak_flops(500.0) == 500 * T


def test_peak_tflops_is_a_train_flag():
    from witscale.train import build_parser

    args = build_parser().parse_args(["--data", "d", "--model-config", "c.json", "--output-dir", "o",
                                      "--ds_config", "z.json", "--peak-tflops", "756"])
    assert RunConfig.from_args(args).peak_tflops == 756.0
