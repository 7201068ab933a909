"""The LM head applied to chosen hidden states only, with the model's logit soft-capping."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


class LMHead:
    """Logits (float32 tensors) for hidden states picked by the caller (scored positions only).

    With ``float32`` the projection itself runs in float32, whatever the model's dtype or
    autocast says: in bfloat16, logits near 10 are 0.06 apart, so MMLU's four letters often tie
    exactly and argmax would favour "A".
    """

    def __init__(self, model: PreTrainedModel, *, float32: bool = True) -> None:
        self.float32 = float32
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        plain = float32 and type(self.head) is torch.nn.Linear  # not, e.g., a LoRA-wrapped head
        self.weight = self.head.weight.float() if plain else None
        self.bias = self.head.bias.float() if plain and self.head.bias is not None else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        # Under autocast the projection would be cast back down to bfloat16.
        exact = (
            torch.autocast(hidden.device.type, enabled=False) if self.float32 else contextlib.nullcontext()
        )
        with exact:
            if self.weight is not None:
                logits = F.linear(hidden.float(), self.weight, self.bias)
            else:
                logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode for the duration; its training mode comes back after, errors too."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def body_in_bfloat16(model: PreTrainedModel) -> Iterator[None]:
    """Run the decoder's linear layers in bfloat16: bf16 copies of their float32 weights (cast
    once, not on every call as autocast alone would) and autocast for their inputs. The residual
    stream, norms and softmax stay float32, as autocast leaves them, and so does the LM head when
    applied through ``LMHead``. The original weights come back afterwards."""
    swapped = []
    for module in model.get_decoder().modules():
        w = getattr(module, "weight", None)
        if type(module) is torch.nn.Linear and w is not None and w.dtype == torch.float32:
            swapped.append((module, w))
            module.weight = torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
    try:
        with torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16):
            yield
    finally:
        for module, w in swapped:
            module.weight = w
