"""florist: federated fine-tuning of LLMs with LoRA adapters (FLoRIST and its baselines)."""

import os

__version__ = "0.1.0"

# oneDNN (bf16 matmuls on the CPU) and PyTorch's ideep layer above it each keep compiled kernels for
# up to 1024 shapes, and every new batch shape adds some: RSS grew round after round. 128 holds a
# training step's kernels several times over (bench/rounds.py --memory measures both); the same
# kernels are compiled, so results do not change. Set here, before the first bf16 matmul reads
# them; a value the user set wins.
KERNEL_CACHE_CAPACITY = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}
for _name, _value in KERNEL_CACHE_CAPACITY.items():
    os.environ.setdefault(_name, _value)
