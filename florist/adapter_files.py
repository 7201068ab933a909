"""What an adapter directory holds: file names, size limits, and the error for a bad one.

Kept apart from florist.adapters (which needs torch) so that the command line can name them,
and refuse bad arguments, without loading torch.
"""

from __future__ import annotations

from florist.errors import FloristError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Beside the adapter, the client states how many examples it trained on (the FedAvg weight).
CLIENT_INFO_FILE = "florist_client.json"
NUM_EXAMPLES_FILE = "num_examples.json"  # also accepted: {"num_examples": N} or a bare integer
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

# Example counts become float64 FedAvg weights: beyond 2**53 they are no longer exact (and
# 10**400 overflows a float), and no client has that many examples.
MAX_NUM_EXAMPLES = 2**53
DEFAULT_MAX_BYTES = 2 * 1024**3  # a 7B model at r=64 on every projection is ~0.7 GB in fp32
MAX_JSON_BYTES = 1024**2


class AdapterError(FloristError, ValueError):
    """A bad or unsafe adapter directory; the message names the directory, client and module."""
