"""One base model, many clients: a single peft wrapper whose LoRA adapter is swapped per client.

A federated simulation with K clients holds exactly ONE copy of the base model. The model is
wrapped by peft once; each client then gets a fresh (or received) LoRA in the one adapter slot,
trains it, and hands it back as plain tensors (:meth:`LoraHost.extract`) before the slot is
emptied for the next client. Clients therefore differ only in their LoRA factors, and memory
does not grow with the number of clients.

The base weights are the fp32 *master* copy: FLoRA and FLoRIST fold the global update into them
(:meth:`LoraHost.merge_into_base`), so they are never cast to a lower precision; mixed precision
is confined to ``torch.autocast`` in training and evaluation.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from florist.aggregation.base import Adapter, LoraFactors

SLOT = "florist"  # the client's adapter
EVAL_SLOT = "florist_eval"  # a temporary adapter for use_adapter()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # peft warns when the last adapter is deleted or a config looks unusual; both are intended.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


class MaskDropout(nn.Module):
    """Inverted dropout like ``nn.Dropout(p)``, with its mask drawn from 31-bit random integers.

    Each element is kept with probability 1 - p (to within 2⁻³¹) and scaled by 1 / (1 - p), as
    in ``nn.Dropout``; on the CPU ``bernoulli_`` costs about twice as much, and peft applies a
    dropout before every LoRA module (bench/training.py).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.threshold = round(self.p * 2**31)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        bits = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()  # [0, 2**31)
        return torch.where(bits >= self.threshold, x * (1.0 / (1.0 - self.p)), 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoraHost:
    """Wraps ``model`` (in place, never copied) with peft LoRA on ``target_modules``.

    ``target_modules`` follows peft: a module is targeted when its name equals an entry or ends
    with ``"." + entry`` (e.g. ``["q_proj", "v_proj"]``).
    """

    def __init__(self, model: nn.Module, target_modules: list[str], dropout: float = 0.0) -> None:
        if isinstance(model, PeftModel):
            raise ValueError("LoraHost wraps a plain transformers model, got a PeftModel")
        if not target_modules:
            raise ValueError("target_modules is empty: name at least one module, e.g. q_proj")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        self.target_modules = list(target_modules)
        # peft silently ignores a target that matches nothing while another one matches.
        names = [n for n, _ in model.named_modules()]
        for target in self.target_modules:
            if not any(n == target or n.endswith("." + target) for n in names):
                raise ValueError(f"LoRA target module {target!r} is not in the model (e.g. q_proj, v_proj)")
        # Wrap once with a placeholder adapter (this is how peft finds the targets and freezes
        # the base), then delete it: the slot stays empty until install().
        config = LoraConfig(r=1, lora_alpha=1, target_modules=self.target_modules, lora_dropout=self.dropout)
        with _quiet(), torch.random.fork_rng(devices=[]):
            try:
                self.peft: PeftModel = get_peft_model(model, config, adapter_name="florist_placeholder")
            except ValueError as e:
                raise ValueError(f"LoRA target modules {self.target_modules}: {e}") from None
            self.peft.delete_adapter("florist_placeholder")
        # The model to call is the plain transformers model itself (same object, now holding
        # the LoRA layers): it keeps generate(), config, etc., and its LoRA layers apply
        # whatever adapter is active. The PeftModel wrapper only manages the adapters.
        self.model: nn.Module = model
        self._layers: dict[str, LoraLayer] = {
            name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)
        }
        for name, layer in self._layers.items():
            if not isinstance(layer.get_base_layer(), nn.Linear):
                raise ValueError(
                    f"LoRA target {name!r} is a {type(layer.get_base_layer()).__name__}, not nn.Linear"
                )
        self._installed = False

    # --- what is adapted --------------------------------------------------------------------

    @property
    def module_names(self) -> list[str]:
        """Adapted modules in ``named_modules()`` order, e.g. ``model.layers.0.self_attn.q_proj``."""
        return list(self._layers)

    @property
    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """{name: (out_features, in_features)}: B is out x r, A is r x in."""
        shapes = {}
        for name, layer in self._layers.items():
            base = layer.get_base_layer()
            shapes[name] = (int(base.out_features), int(base.in_features))
        return shapes

    def base_weight(self, name: str) -> torch.Tensor:
        """The (fp32 master) base weight of an adapted module."""
        return self._layers[name].get_base_layer().weight

    @property
    def merge_dtype(self) -> torch.dtype:
        """The dtype ``merge_into_base`` forms updates in: float64 for a float64 base, else float32."""
        return max((_merge_dtype(self.base_weight(n)) for n in self._layers), key=lambda d: d.itemsize)

    @property
    def installed(self) -> bool:
        return self._installed

    # --- the client slot --------------------------------------------------------------------

    def install(
        self,
        rank: int,
        alpha: float,
        *,
        init: Adapter | None = None,
        generator: torch.Generator | None = None,
        frozen_A: dict[str, torch.Tensor] | None = None,
        init_rank: int | None = None,
        freeze: tuple[str, ...] = (),
    ) -> None:
        """Put a LoRA of ``rank`` and scaling ``alpha / rank`` in the slot (replacing any there).

        Fresh: A is Kaiming-uniform (a=sqrt(5), as peft) drawn from ``generator`` in module
        order, B = 0; with ``init_rank`` each module draws ``init_rank`` rows and keeps the first
        ``rank`` (the bound depends only on the input size), so clients of different ranks that
        share a generator share their init up to their own rank. With ``init``: A and B are copied and B is rescaled by
        ``init.scaling / (alpha / rank)`` so the effective update equals init's. With
        ``frozen_A`` (FFA-LoRA): A is the first ``rank`` rows of ``frozen_A[name]`` and is frozen.
        ``freeze`` names factors ("A", "B") that keep their installed values (RoLoRA's shared one).
        """
        if not set(freeze) <= {"A", "B"}:
            raise ValueError(f"freeze takes the factors A and B, got {freeze!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive finite number, got {alpha!r}")
        if init_rank is not None and init_rank < rank:
            raise ValueError(f"init_rank {init_rank} is below the LoRA rank {rank}")
        shapes = self.module_shapes
        if init is not None:
            self._check_adapter(init, "init adapter", rank=rank)
        if frozen_A is not None:
            for name, (_out, n_in) in shapes.items():
                a = frozen_A.get(name)
                if a is None:
                    raise ValueError(f"frozen_A has no entry for module {name!r}")
                if a.ndim != 2 or a.shape[0] < rank or a.shape[1] != n_in:
                    raise ValueError(
                        f"frozen_A[{name!r}] has shape {tuple(a.shape)}; need at least {rank} rows of {n_in} columns"
                    )
        self.remove()
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=self.module_names,
            lora_dropout=self.dropout,
            init_lora_weights=False,  # we initialise below, from the client's generator
        )
        # peft's own (discarded) initialisation must not consume the caller's RNG stream.
        with _quiet(), torch.random.fork_rng(devices=[]):
            self.peft.add_adapter(SLOT, config)
            self.peft.set_adapter(SLOT)
        if self.dropout > 0:
            for layer in self._layers.values():
                layer.lora_dropout[SLOT] = MaskDropout(self.dropout)
        self._installed = True
        scaling = alpha / rank
        with torch.no_grad():
            for name, layer in self._layers.items():
                A = layer.lora_A[SLOT].weight
                B = layer.lora_B[SLOT].weight
                if frozen_A is not None:
                    A.copy_(frozen_A[name][:rank])
                    A.requires_grad_(False)
                elif init is not None:
                    A.copy_(init[name].A)
                else:
                    fresh = torch.empty(init_rank or rank, A.shape[1], dtype=torch.float32)
                    nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                    A.copy_(fresh[:rank])
                if init is not None:
                    ratio = float(init[name].scaling) / scaling
                    src = init[name].B
                    B.copy_(src if ratio == 1.0 else src.to(torch.float64) * ratio)
                else:
                    B.zero_()
                for factor, weight in (("A", A), ("B", B)):
                    if factor in freeze:
                        weight.requires_grad_(False)

    def extract(self) -> Adapter:
        """The slot's LoRA as fp32 CPU copies, with scaling alpha / r."""
        if not self._installed:
            raise RuntimeError("no LoRA is installed; call install() first")
        out: Adapter = {}
        for name, layer in self._layers.items():
            A = layer.lora_A[SLOT].weight.detach().to("cpu", torch.float32, copy=True)
            B = layer.lora_B[SLOT].weight.detach().to("cpu", torch.float32, copy=True)
            out[name] = LoraFactors(A=A, B=B, scaling=float(layer.scaling[SLOT]))
        return out

    def remove(self) -> None:
        """Empty the slot: the model computes with its base weights only."""
        if self._installed:
            with _quiet():
                self.peft.delete_adapter(SLOT)
            self._installed = False

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The slot's LoRA parameters that train (FFA: only the Bs), in module order."""
        if not self._installed:
            return []
        params = []
        for layer in self._layers.values():
            params += [p for p in (layer.lora_A[SLOT].weight, layer.lora_B[SLOT].weight) if p.requires_grad]
        return params

    # --- the base weights -------------------------------------------------------------------

    @torch.no_grad()
    def merge_into_base(self, adapter: Adapter) -> None:
        """W += scaling * B @ A for every module of ``adapter``, in place, in sorted module order.

        The product is formed in float32 (float64 if the weight is float64) on the weight's
        device, so the result is reproducible bit for bit.
        """
        self._check_adapter(adapter, "merged adapter", partial=True)
        for name in sorted(adapter):
            f = adapter[name]
            W = self.base_weight(name)
            dtype = _merge_dtype(W)
            B = f.B.to(W.device, dtype) * f.scaling
            delta = B @ f.A.to(W.device, dtype)
            W.copy_((W.to(dtype) + delta).to(W.dtype))

    @contextlib.contextmanager
    def use_adapter(self, adapter: Adapter | None) -> Iterator[nn.Module]:
        """Evaluate with ``adapter`` (any per-module ranks; None = the bare base) active, unmerged.

        The slot's own LoRA, its trainable flags and the base weights are restored afterwards.
        """
        flags = [(p, p.requires_grad) for layer in self._layers.values() for p in layer.parameters()]
        if adapter is None:
            for layer in self._layers.values():
                layer.enable_adapters(False)
            try:
                yield self.model
            finally:
                for layer in self._layers.values():
                    layer.enable_adapters(True)
                for p, flag in flags:
                    p.requires_grad_(flag)
            return
        self._check_adapter(adapter, "evaluated adapter", partial=True)
        ranks = {name: f.rank for name, f in adapter.items()}
        # Scaling is folded into B, so every module gets alpha = r (peft scaling 1).
        patterns = {re.escape(name): r for name, r in ranks.items()}
        first = next(iter(ranks.values()))
        config = LoraConfig(
            r=first,
            lora_alpha=first,
            rank_pattern=patterns,
            alpha_pattern=dict(patterns),
            target_modules=sorted(adapter),
            lora_dropout=0.0,
            init_lora_weights=False,
        )
        with _quiet(), torch.random.fork_rng(devices=[]):
            self.peft.add_adapter(EVAL_SLOT, config)
        try:
            with torch.no_grad():
                for name, f in adapter.items():
                    layer = self._layers[name]
                    assert layer.r[EVAL_SLOT] == f.rank and layer.scaling[EVAL_SLOT] == 1.0
                    layer.lora_A[EVAL_SLOT].weight.copy_(f.A)
                    layer.lora_B[EVAL_SLOT].weight.copy_(f.B.to(torch.float32) * f.scaling)
            with _quiet():
                self.peft.set_adapter(EVAL_SLOT)
            yield self.model
        finally:
            with _quiet():
                self.peft.delete_adapter(EVAL_SLOT)
                if self._installed:
                    self.peft.set_adapter(SLOT)
            for p, flag in flags:
                p.requires_grad_(flag)

    def unload(self) -> nn.Module:
        """Take the LoRA layers out for good and return the plain transformers model.

        For saving merged weights with ``save_pretrained`` (parameter names without peft's
        ``base_layer``). The host is unusable afterwards.
        """
        self.remove()
        with _quiet():
            plain = self.peft.unload()
        self._layers = {}
        return plain

    # --- checks -----------------------------------------------------------------------------

    def _check_adapter(
        self, adapter: Adapter, what: str, *, rank: int | None = None, partial: bool = False
    ) -> None:
        shapes = self.module_shapes
        unknown = sorted(set(adapter) - set(shapes))
        if unknown:
            raise ValueError(f"{what}: module {unknown[0]!r} is not a LoRA target of this model")
        missing = sorted(set(shapes) - set(adapter))
        if missing and not partial:
            raise ValueError(f"{what}: module {missing[0]!r} is missing")
        for name, f in adapter.items():
            out_f, in_f = shapes[name]
            if (
                f.A.ndim != 2
                or f.B.ndim != 2
                or f.A.shape[1] != in_f
                or f.B.shape[0] != out_f
                or f.A.shape[0] != f.B.shape[1]
            ):
                raise ValueError(
                    f"{what}: module {name!r} has A {tuple(f.A.shape)} and B {tuple(f.B.shape)}, "
                    f"expected A (r, {in_f}) and B ({out_f}, r)"
                )
            if rank is not None and f.rank != rank:
                raise ValueError(f"{what}: module {name!r} has rank {f.rank}, expected {rank}")
            if not (math.isfinite(f.scaling) and f.scaling > 0):
                raise ValueError(f"{what}: module {name!r} has scaling {f.scaling!r}")
            if not (bool(torch.isfinite(f.A).all()) and bool(torch.isfinite(f.B).all())):
                raise ValueError(f"{what}: module {name!r} contains NaN or Inf")

    def __repr__(self) -> str:
        return f"LoraHost({len(self._layers)} modules, targets={self.target_modules}, installed={self._installed})"


def _merge_dtype(weight: torch.Tensor) -> torch.dtype:
    """Updates are formed in float32, or float64 for a float64 weight (bit-reproducible merges)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32
