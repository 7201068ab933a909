"""One configuration object for a federated run, with the paper's flag names.

``florist run`` (flags or YAML), the paper-compatible ``main.py``, ``florist sweep`` and the
Flower app all build a ``RunConfig`` and hand it to the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florist.settings import DEVICE_PATTERN, DEVICE_WORDS, ConfigError, Setting, Source, file_source

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
DP_MODES = ("local", "central")  # florist.privacy's; named here so that config stays torch-free


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
    # The peak rate of round r over the rounds (florist.rounds.round_learning_rate): constant (the
    # paper's), or linear / cosine from local_learning_rate down to lr_min (FlowerTune: cosine).
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    # Within a round: linear decay to 0 (HF Trainer's default, the paper's code) or constant (FlowerTune)
    local_lr_scheduler: str = "linear"
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
    eval_every: int = 0  # also evaluate after every N-th round (and the last); 0: before and after only
    # Records (and MMLU questions) scored at the evaluations before the last round, the first N of
    # eval_samples: cheap learning curves, the whole set at the end. None: eval_samples throughout.
    eval_every_samples: int | None = None
    eval_base: bool = True  # evaluate the base model before round 1 (eval_before); many runs share it
    # client-level differential privacy and secure aggregation (florist.privacy, docs/methods.md)
    dp_clip_norm: float = 0.0  # C, the L2 bound of each upload's factor update; 0: no DP
    dp_noise_multiplier: float = 0.0  # z: noise std z*C per upload (local) or z*C/m on the mean (central)
    dp_delta: float = 1e-5
    dp_mode: str = "local"  # local: each client noises its upload | central: the server noises the mean
    secure_aggregation: bool = False  # Flower only: SecAgg+, the server learns only the sum
    # outputs
    resume: bool = False
    save_merged: bool = False
    save_every: int = 0  # also write the global adapter after every N-th round to rounds/round_<r>/

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

    def validate(self) -> RunConfig:
        """Check every setting's type and range (``run_settings``), then how they combine."""
        from florist.aggregation import AGGREGATORS
        from florist.privacy import check_config

        for name, setting in run_settings().items():
            setattr(self, name, setting.parse(getattr(self, name), name=name))
        if self.client_init is not None:
            allowed = AGGREGATORS[self.method].client_inits
            if self.client_init not in allowed:
                raise ConfigError(
                    f"{self.method} needs client_init {' or '.join(allowed)}: its frozen factor is shared by "
                    f"every client (FFA-LoRA's A, RoLoRA's), so client_init {self.client_init} does not apply"
                )
        if self.lr_schedule != "constant" and not self.lr_min <= self.local_learning_rate:
            raise ConfigError(
                f"lr_min ({self.lr_min}) must not exceed local_learning_rate ({self.local_learning_rate}): "
                f"the {self.lr_schedule} schedule anneals from the one down to the other"
            )
        if self.local_batch_size % self.local_micro_batch_size:
            raise ConfigError(
                f"local_batch_size ({self.local_batch_size}) must be a multiple of "
                f"local_micro_batch_size ({self.local_micro_batch_size})"
            )
        if self.heter and not AGGREGATORS[self.method].supports_heterogeneous:
            # the paper of the method gives no rule for averaging factors of different ranks
            raise ConfigError(
                f"{self.method} needs homogeneous ranks; with --heter use zeropad (--zero_padding True), "
                "hetlora, flexlora, flora or florist"
            )
        problem = check_config(self)
        if problem:
            raise ConfigError(problem)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str | Source = "config") -> RunConfig:
        """A RunConfig from typed values (a YAML file's, a stored config's), each one checked and
        named with ``source`` (a Source, or the name of the file) if it is bad."""
        src = source if isinstance(source, Source) else file_source(source)
        settings = run_settings()
        unknown = sorted(str(k) for k in values if k not in settings)
        if unknown:
            raise ConfigError(f"{src.where}: unknown setting(s) {', '.join(unknown)}")
        return cls(**{k: settings[k].parse(v, name=src.spell(k), source=src) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, ValueError) as e:  # ValueError: bad UTF-8, a 5,000-digit int
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{path}: cannot read YAML config: {first}") from None
        except RecursionError:
            raise ConfigError(f"{path}: cannot read YAML config: nested too deeply") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config must be a mapping of setting: value")
        return cls.from_dict(values, source=file_source(path))


# Each RunConfig setting's range or choices; its type comes from the field's type hint.
RUN_RANGES: dict[str, dict[str, Any]] = {
    "num_clients": {"low": 1},
    "method": {"choices": ALL_METHODS},
    "threshold": {"low": 0.0, "low_open": True, "high": 1.0},  # tau
    "num_communication_rounds": {"low": 1},
    "client_selection_strategy": {"choices": ("random",)},
    "client_selection_frac": {"low": 0.0, "low_open": True, "high": 1.0},
    "min_clients": {"low": 1},
    "local_batch_size": {"low": 1},
    "local_micro_batch_size": {"low": 1},
    "local_num_epochs": {"low": 1},
    "local_learning_rate": {"low": 0.0},
    "local_max_steps": {"low": 1},
    "lr_schedule": {"choices": ("constant", "linear", "cosine")},
    "lr_min": {"low": 0.0},
    "local_lr_scheduler": {"choices": ("linear", "constant")},
    "eval_every": {"low": 0},
    "eval_every_samples": {"low": 1},
    "save_every": {"low": 0},
    "cutoff_len": {"low": 1},
    "pad_to_multiple_of": {"low": 1},
    "lora_r": {"low": 1},
    "lora_alpha": {"low": 1},
    "lora_dropout": {"low": 0.0, "high": 1.0, "high_open": True},
    "local_ranks": {"low": 1},
    "client_init": {"choices": CLIENT_INITS},
    "seed": {"low": 0},  # numpy refuses negative seeds
    "device": {"pattern": DEVICE_PATTERN, "described": DEVICE_WORDS},
    "precision": {"choices": ("auto", "bf16", "fp32")},
    "aggregation_dtype": {"choices": ("float64", "float32")},
    "wire_dtype": {"choices": ("float32", "bfloat16", "float16", "float64")},
    "max_samples_per_client": {"low": 1},
    "eval_samples": {"low": 1},
    "eval_scorer": {"choices": ("loglik", "generate")},
    "dp_clip_norm": {"low": 0.0},  # 0: no DP
    "dp_noise_multiplier": {"low": 0.0},
    "dp_delta": {"low": 0.0, "low_open": True, "high": 1.0, "high_open": True},
    "dp_mode": {"choices": DP_MODES},
}


@functools.cache
def run_settings() -> dict[str, Setting]:
    """Every RunConfig field's Setting: kind and None-ness from its type hint, range from RUN_RANGES."""
    hints = typing.get_type_hints(RunConfig)
    settings = {}
    for f in dataclasses.fields(RunConfig):
        hint, optional = hints[f.name], False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = True
        kind, item = (list, typing.get_args(hint)[0]) if typing.get_origin(hint) is list else (hint, None)
        settings[f.name] = Setting(kind, item, optional, **RUN_RANGES.get(f.name, {}))
    return settings


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
