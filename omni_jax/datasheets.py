"""Accelerators' datasheet figures by jax's device_kind, in one place (no jax import: the accelerator suite's
parent process reads them without touching the device). TPU slices for AOT planning: omni_jax.aot.hardware."""

# Dense bfloat16 peak FLOP/s per device (vendor datasheets). CPUs have no entry: set
# config.train.peak_flops_per_device to get an MFU there.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU7x": 2307e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA B200": 2250e12,
}

# HBM bandwidth per device, bytes/s: a batch-1 decode step cannot be faster than weight bytes / bandwidth.
HBM_BANDWIDTH = {
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.819e12,
    "TPU v5": 2.765e12,
    "TPU v5p": 2.765e12,
    "TPU v6 lite": 1.64e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA H100 80GB HBM3": 3.35e12,
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H200": 4.8e12,
}
