"""florist: federated fine-tuning of LLMs with LoRA adapters (FLoRIST and its baselines)."""

__version__ = "0.1.0"
