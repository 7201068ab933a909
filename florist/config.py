"""One configuration object for a federated run, with the paper's flag names.

``florist run`` (flags or YAML), the paper-compatible ``main.py``, ``florist sweep`` and the
Flower app all build a ``RunConfig`` and hand it to the same code.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Batches are padded to a multiple of this many tokens. Every new sequence length makes oneDNN
# and the allocator keep another set of per-shape buffers, so with exact-length batches the
# process grows with every client trained (docs/benchmarks.md); a handful of widths bounds it.
PAD_TO_MULTIPLE_OF = 32

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HETER_RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
METHODS = ("fedit", "zeropad", "flora", "flexlora", "ffa", "florist")
# The methods published after FLoRIST (docs/methods.md), in the order the tables list them.
NEWER_METHODS = ("fedex", "fedsa", "rolora", "hetlora", "lorafair")
ALL_METHODS = METHODS + NEWER_METHODS
CLIENT_INITS = ("shared", "per_client")


class ConfigError(ValueError):
    """A bad setting; the CLIs print it in one line and exit with code 2."""


@dataclass
class RunConfig:
    # model / data
    global_model: str = DEFAULT_MODEL
    data_path: str = "./data"
    output_dir: str = "./florist-output"
    num_clients: int = 8
    # federation
    method: str = "florist"
    threshold: float = 0.9
    num_communication_rounds: int = 1
    client_selection_strategy: str = "random"
    client_selection_frac: float = 1.0
    min_clients: int = 1
    # local training (the paper's defaults)
    local_batch_size: int = 128
    local_micro_batch_size: int = 16
    local_num_epochs: int = 1
    local_learning_rate: float = 3e-4
    local_max_steps: int | None = None  # optimizer steps per client per round; None = epochs
    cutoff_len: int = 512
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF  # batch widths; 1 pads to the longest example only
    train_on_inputs: bool = True
    packing: bool = True  # padding-free micro-batches (florist.packing); same loss, less compute
    group_by_length: bool = True
    prompt_template_name: str = "auto"  # auto: chat template for conversations, alpaca for instructions
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    heter: bool = False
    local_ranks: list[int] = field(default_factory=lambda: list(DEFAULT_HETER_RANKS))
    # shared | per_client; None: the method's default, as in the authors' code (docs/methods.md)
    client_init: str | None = None
    # numerics and hardware
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast where supported) | bf16 | fp32
    aggregation_dtype: str = "float64"  # float64 | float32
    wire_dtype: str = "float32"  # dtype of tensors on the wire, for byte accounting
    # quick runs and evaluation
    max_samples_per_client: int | None = None
    eval_samples: int | None = None
    dev_data_path: str | None = None  # MMLU file; None = look in the usual places
    test_data_path: str | None = None  # held-out instruction data; None = data_path/K/global_test.json
    eval_scorer: str = "loglik"  # loglik | generate
    evaluate: bool = True
    # client-level differential privacy and secure aggregation (florist.privacy, docs/methods.md)
    dp_clip_norm: float = 0.0  # C, the L2 bound of each upload's factor update; 0: no DP
    dp_noise_multiplier: float = 0.0  # z: noise std z*C per upload (local) or z*C/m on the mean (central)
    dp_delta: float = 1e-5
    dp_mode: str = "local"  # local: each client noises its upload | central: the server noises the mean
    secure_aggregation: bool = False  # Flower only: SecAgg+, the server learns only the sum
    # outputs
    resume: bool = False
    save_merged: bool = False

    def client_rank(self, client_index: int) -> int:
        if not self.heter:
            return self.lora_r
        return self.local_ranks[client_index % len(self.local_ranks)]

    def client_alpha(self, client_index: int) -> float:
        # The paper's heterogeneous setting uses alpha = 2 r_k.
        return 2.0 * self.client_rank(client_index) if self.heter else float(self.lora_alpha)

    def resolved_client_init(self) -> str:
        """How round r's clients draw their fresh LoRA: "shared" or "per_client"."""
        from florist.aggregation import AGGREGATORS

        return self.client_init or AGGREGATORS[self.method].client_init

    def shared_init_rank(self) -> int | None:
        """The rank of the one init the clients of a round share (the largest client rank), or
        None when each client draws its own."""
        if self.resolved_client_init() != "shared":
            return None
        return max(self.client_rank(k) for k in range(self.num_clients))

    def validate(self) -> RunConfig:
        if self.method not in ALL_METHODS:
            raise ConfigError(f"method must be one of {', '.join(ALL_METHODS)}, got {self.method!r}")
        if self.client_init not in (None, *CLIENT_INITS):
            raise ConfigError(f"client_init must be shared or per_client, got {self.client_init!r}")
        if self.client_init is not None:
            from florist.aggregation import AGGREGATORS

            allowed = AGGREGATORS[self.method].client_inits
            if self.client_init not in allowed:
                raise ConfigError(
                    f"{self.method} needs client_init {' or '.join(allowed)}: its frozen factor is shared by "
                    f"every client (FFA-LoRA's A, RoLoRA's), so client_init {self.client_init} does not apply"
                )
        if not (0.0 < float(self.threshold) <= 1.0):
            raise ConfigError(f"threshold (tau) must be in (0, 1], got {self.threshold}")
        if self.num_clients <= 0:
            raise ConfigError(f"num_clients must be positive, got {self.num_clients}")
        if self.num_communication_rounds <= 0:
            raise ConfigError(
                f"num_communication_rounds must be positive, got {self.num_communication_rounds}"
            )
        if not (0.0 < self.client_selection_frac <= 1.0):
            raise ConfigError(f"client_selection_frac must be in (0, 1], got {self.client_selection_frac}")
        if self.lora_r <= 0:
            raise ConfigError(f"lora_r must be positive, got {self.lora_r}")
        if self.heter:
            if not self.local_ranks or any(int(r) <= 0 for r in self.local_ranks):
                raise ConfigError(f"local_ranks must all be positive, got {self.local_ranks}")
        if self.local_micro_batch_size <= 0 or self.local_batch_size <= 0:
            raise ConfigError("local_batch_size and local_micro_batch_size must be positive")
        if self.local_batch_size % self.local_micro_batch_size:
            raise ConfigError(
                f"local_batch_size ({self.local_batch_size}) must be a multiple of "
                f"local_micro_batch_size ({self.local_micro_batch_size})"
            )
        from florist.aggregation import AGGREGATORS

        if self.heter and not AGGREGATORS[self.method].supports_heterogeneous:
            # the paper of the method gives no rule for averaging factors of different ranks
            raise ConfigError(
                f"{self.method} needs homogeneous ranks; with --heter use zeropad (--zero_padding True), "
                "hetlora, flexlora, flora or florist"
            )
        if self.aggregation_dtype not in ("float64", "float32"):
            raise ConfigError(f"aggregation_dtype must be float64 or float32, got {self.aggregation_dtype!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.eval_scorer not in ("loglik", "generate"):
            raise ConfigError(f"eval_scorer must be loglik or generate, got {self.eval_scorer!r}")
        if self.pad_to_multiple_of <= 0:
            raise ConfigError(f"pad_to_multiple_of must be positive, got {self.pad_to_multiple_of}")
        if self.min_clients <= 0:
            raise ConfigError(f"min_clients must be positive, got {self.min_clients}")
        from florist.privacy import check_config

        problem = check_config(self)
        if problem:
            raise ConfigError(problem)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        # YAML 1.1 reads 1e-5 (no dot) as a string: a float setting takes the number it spells.
        hints = typing.get_type_hints(cls)
        values = dict(values)
        for name, value in values.items():
            if isinstance(value, str) and hints[name] in (float, float | None):
                try:
                    values[name] = float(value)
                except ValueError:
                    pass  # left as given: validate() names the setting
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> RunConfig:
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read YAML config: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config must be a mapping of setting: value")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, source=str(path))


def method_from_paper_flags(
    *,
    florist: bool = False,
    flora: bool = False,
    stacking: bool = False,
    flex: bool = False,
    ffa: bool = False,
    fedit: bool = False,
    zero_padding: bool = False,
    heter: bool = False,
    newer: dict[str, bool] | None = None,
) -> str:
    """Map the paper's boolean switches to one method name.

    The paper's README passes ``--zero_padding True`` next to ``--florist True`` in the
    heterogeneous runs, so the specific methods take precedence over zero-padding. ``newer``
    maps the methods published after FLoRIST (``NEWER_METHODS``: ``--fedex True`` etc.) to their flags.
    """
    switches = [("florist", florist), ("flora", flora or stacking), ("flexlora", flex), ("ffa", ffa)]
    switches += [(name, bool((newer or {}).get(name))) for name in NEWER_METHODS]
    chosen = [name for name, on in switches if on]
    if len(chosen) > 1:
        raise ConfigError(f"choose one aggregation method, got {' and '.join(chosen)}")
    if chosen:
        return chosen[0]
    # FedIT with heterogeneous ranks is only defined through zero-padding.
    return "zeropad" if (heter or zero_padding) else "fedit"
