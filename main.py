"""The FLoRIST paper's command line, mapped onto florist's RunConfig.

The flags are those of the authors' ``main.py`` (fire), so their README commands run unchanged::

    python main.py --global_model smollm2-135m --data_path ../shared/data/dolly \\
        --output_dir ./florist-smollm2-dolly/ --num_communication_rounds 1 --local_num_epochs 1 \\
        --florist True --threshold 0.9 --num_clients 8 --heter True

The method switches (--florist, --stacking/--flora, --flex, --ffa, --fedit, --zero_padding, and
the newer methods' --fedex, --fedsa, --rolora, --hetlora, --lorafair) pick the aggregation via
``florist.config.method_from_paper_flags``. Full fine-tuning (--full) and
AdaLoRA (--Adalora) are not supported. Our additions: --max_samples_per_client, --eval_samples,
--seed, --local_max_steps, --client_init (shared | per_client; default: the method's, as in the
authors' code), and client-level differential privacy: --dp_clip_norm C --dp_noise_multiplier z
--dp_delta 1e-5 --dp_mode local|central (florist.privacy). The equivalent florist command is ``florist run``.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

# Runnable as ``python main.py`` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from florist.config import DEFAULT_HETER_RANKS, DEFAULT_MODEL, ConfigError, RunConfig, method_from_paper_flags  # noqa: E402


def as_bool(value: Any, name: str) -> bool:
    """fire gives bools for True/False; accept the strings true/false/1/0 as well."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ConfigError(f"--{name} must be True or False, got {value!r}")


def as_list(value: Any, item: type, name: str) -> list:
    """A list from fire's parse: a list/tuple, a single value, or a comma-separated string."""
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [
            x for x in str(value).strip("[]() ").replace("'", "").replace('"', "").split(",") if x.strip()
        ]
    try:
        return [item(x.strip() if isinstance(x, str) else x) for x in items]
    except (TypeError, ValueError):
        raise ConfigError(
            f"--{name} must be a comma-separated list of {item.__name__}, got {value!r}"
        ) from None


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be a number, got {value!r}") from None


def build_config(
    *,
    global_model: str = DEFAULT_MODEL,
    data_path: str = "./data",
    output_dir: str = "./florist-output/",
    client_selection_strategy: str = "random",
    client_selection_frac: float = 1.0,
    num_communication_rounds: int = 1,
    num_clients: int = 8,
    local_batch_size: int = 128,
    local_micro_batch_size: int = 16,
    local_num_epochs: int = 1,
    local_learning_rate: float = 3e-4,
    local_val_set_size: int = 0,
    local_save_steps: int = 3,
    cutoff_len: int = 512,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target_modules: Any = ("q_proj", "v_proj"),
    train_on_inputs: Any = True,
    group_by_length: Any = True,
    resume_from_checkpoint: Any = None,
    prompt_template_name: str = "alpaca",
    stacking: Any = False,
    florist: Any = False,
    flora: Any = False,
    fedit: Any = False,
    flex: Any = False,
    ffa: Any = False,
    fedex: Any = False,
    fedsa: Any = False,
    rolora: Any = False,
    hetlora: Any = False,
    lorafair: Any = False,
    threshold: float = 0.9,
    dev_data_path: str | None = None,
    heter: Any = False,
    local_ranks: Any = tuple(DEFAULT_HETER_RANKS),
    zero_padding: Any = False,
    full: Any = False,
    Adalora: Any = False,  # noqa: N803 - the paper's flag name
    max_samples_per_client: int | None = None,
    eval_samples: int | None = None,
    seed: int = 42,
    local_max_steps: int | None = None,
    client_init: Any = None,
    dp_clip_norm: float = 0.0,
    dp_noise_multiplier: float = 0.0,
    dp_delta: float = 1e-5,
    dp_mode: str = "local",
) -> RunConfig:
    """The RunConfig for the paper's flags; unsupported combinations raise ConfigError."""
    if as_bool(full, "full"):
        raise ConfigError(
            "--full True (full fine-tuning) is not supported by florist; it fine-tunes LoRA adapters only"
        )
    if as_bool(Adalora, "Adalora"):
        raise ConfigError("--Adalora True is not supported by florist; use LoRA (the default)")
    if int(local_val_set_size) != 0:
        raise ConfigError(
            "--local_val_set_size is not supported (florist evaluates the global model on "
            "the held-out global_test.json and MMLU instead); leave it at 0"
        )
    heter_on = as_bool(heter, "heter")
    method = method_from_paper_flags(
        florist=as_bool(florist, "florist"),
        flora=as_bool(flora, "flora"),
        stacking=as_bool(stacking, "stacking"),
        flex=as_bool(flex, "flex"),
        ffa=as_bool(ffa, "ffa"),
        fedit=as_bool(fedit, "fedit"),
        zero_padding=as_bool(zero_padding, "zero_padding"),
        heter=heter_on,
        newer={
            name: as_bool(on, name)
            for name, on in (
                ("fedex", fedex),
                ("fedsa", fedsa),
                ("rolora", rolora),
                ("hetlora", hetlora),
                ("lorafair", lorafair),
            )
        },
    )
    resume = False
    if resume_from_checkpoint not in (None, False, "", "None", "False", "false"):
        resume = True
        if not isinstance(resume_from_checkpoint, bool) and str(resume_from_checkpoint).lower() != "true":
            # The paper passes a checkpoint path; florist keeps its checkpoint in output_dir.
            given = Path(str(resume_from_checkpoint)).resolve()
            out = Path(output_dir).resolve()
            if given not in (out, out / "checkpoint"):
                raise ConfigError(
                    f"--resume_from_checkpoint {resume_from_checkpoint}: florist resumes from "
                    f"{out / 'checkpoint'}; pass True or that path"
                )
    return RunConfig(
        global_model=str(global_model),
        data_path=str(data_path),
        output_dir=str(output_dir),
        num_clients=int(num_clients),
        method=method,
        threshold=float(threshold),
        num_communication_rounds=int(num_communication_rounds),
        client_selection_strategy=str(client_selection_strategy),
        client_selection_frac=float(client_selection_frac),
        local_batch_size=int(local_batch_size),
        local_micro_batch_size=int(local_micro_batch_size),
        local_num_epochs=int(local_num_epochs),
        local_learning_rate=float(local_learning_rate),
        local_max_steps=None if local_max_steps is None else int(local_max_steps),
        cutoff_len=int(cutoff_len),
        train_on_inputs=as_bool(train_on_inputs, "train_on_inputs"),
        group_by_length=as_bool(group_by_length, "group_by_length"),
        prompt_template_name=str(prompt_template_name),
        lora_r=int(lora_r),
        lora_alpha=int(lora_alpha),
        lora_dropout=float(lora_dropout),
        lora_target_modules=as_list(lora_target_modules, str, "lora_target_modules"),
        heter=heter_on,
        local_ranks=as_list(local_ranks, int, "local_ranks"),
        seed=int(seed),
        max_samples_per_client=None if max_samples_per_client is None else int(max_samples_per_client),
        eval_samples=None if eval_samples is None else int(eval_samples),
        dev_data_path=None if dev_data_path in (None, "") else str(dev_data_path),
        resume=resume,
        client_init=None if client_init in (None, "", "None", "auto") else str(client_init),
        dp_clip_norm=_number(dp_clip_norm, "dp_clip_norm"),
        dp_noise_multiplier=_number(dp_noise_multiplier, "dp_noise_multiplier"),
        dp_delta=_number(dp_delta, "dp_delta"),
        dp_mode=str(dp_mode),
    ).validate()


def main(**flags: Any) -> None:
    """Run the paper's command: train, print the summary, the MMLU accuracy and the Eff."""
    from florist.cli.run import format_summary
    from florist.errors import run_cli

    if flags.keys() & {"help", "h"}:  # **flags swallows fire's own --help
        from fire import helptext, trace

        print(helptext.HelpText(main, trace.FireTrace(main, name="main.py")))
        return

    def body() -> int:
        known = inspect.signature(build_config).parameters
        unknown = sorted(set(flags) - set(known))
        if unknown:  # fail before any work, not after training
            raise ConfigError(
                f"unknown flag(s): {', '.join('--' + u for u in unknown)}; see python main.py --help"
            )
        cfg = build_config(**flags)
        from florist.federation import run_federated

        metrics = run_federated(cfg)
        print(format_summary(metrics))
        mmlu = (metrics.get("eval_after") or {}).get("mmlu")
        if mmlu:
            print(
                f"MMLU accuracy: {100 * mmlu['accuracy_macro']:.2f}% ({mmlu['n_questions']} questions, {mmlu['scorer']})"
            )
        else:
            print("MMLU accuracy: not evaluated (no MMLU file; pass --dev_data_path mmlu_test_1444.jsonl)")
        print(f"Eff: {metrics['eff_total']:.4e} ({metrics['eff_total'] * 1e4:.2f} x 1e-4)")
        return 0

    code = run_cli(body)
    if code:
        sys.exit(code)


# fire documents and parses the flags from this signature: build_config's keyword arguments,
# plus **flags so that a misspelt flag reaches main (and is refused) instead of being left over.
main.__signature__ = inspect.signature(build_config).replace(  # type: ignore[attr-defined]
    parameters=[
        *inspect.signature(build_config).parameters.values(),
        inspect.Parameter("flags", inspect.Parameter.VAR_KEYWORD),
    ],
    return_annotation=None,
)
main.__doc__ = __doc__


if __name__ == "__main__":
    import fire

    fire.Fire(main)
