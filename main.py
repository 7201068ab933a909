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
--dp_delta 1e-5 --dp_mode local|central (florist.privacy); every other ``florist run`` setting is a
flag too (--device, --precision, ...). Every flag is checked as ``florist run`` checks it
(florist.settings): a bad value is one line naming the flag. The equivalent florist command is
``florist run``.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

# Runnable as ``python main.py`` from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from florist.config import (  # noqa: E402
    DEFAULT_HETER_RANKS,
    DEFAULT_MODEL,
    NEWER_METHODS,
    ConfigError,
    RunConfig,
    method_from_paper_flags,
    run_settings,
)
from florist.settings import MAIN_PY, Setting, show  # noqa: E402

# The authors' flags with their defaults (their main.py), then florist's own settings, each at
# RunConfig's default (method and resume come from the switches and --resume_from_checkpoint).
PAPER_DEFAULTS: dict[str, Any] = {
    "global_model": DEFAULT_MODEL,
    "data_path": "./data",
    "output_dir": "./florist-output/",
    "client_selection_strategy": "random",
    "client_selection_frac": 1.0,
    "num_communication_rounds": 1,
    "num_clients": 8,
    "local_batch_size": 128,
    "local_micro_batch_size": 16,
    "local_num_epochs": 1,
    "local_learning_rate": 3e-4,
    "local_val_set_size": 0,
    "local_save_steps": 3,
    "cutoff_len": 512,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": ("q_proj", "v_proj"),
    "train_on_inputs": True,
    "group_by_length": True,
    "resume_from_checkpoint": None,
    "prompt_template_name": "auto",  # the paper's alpaca for instruction data; the chat template for conversations
    "stacking": False,
    "florist": False,
    "flora": False,
    "fedit": False,
    "flex": False,
    "ffa": False,
    **{name: False for name in NEWER_METHODS},
    "threshold": 0.9,
    "dev_data_path": None,
    "heter": False,
    "local_ranks": tuple(DEFAULT_HETER_RANKS),
    "zero_padding": False,
    "full": False,
    "Adalora": False,
}
FLAGS: dict[str, Any] = PAPER_DEFAULTS | {
    f.name: getattr(RunConfig(), f.name)
    for f in dataclasses.fields(RunConfig)
    if f.name not in PAPER_DEFAULTS and f.name not in ("method", "resume")
}
# The paper's flags that are not RunConfig settings: the method switches, and flags florist
# refuses (full fine-tuning, AdaLoRA, a validation split) or ignores (save steps).
SWITCHES = ("stacking", "florist", "flora", "fedit", "flex", "ffa", *NEWER_METHODS, "zero_padding")
PAPER_FLAGS: dict[str, Setting] = {
    **{name: Setting(bool) for name in (*SWITCHES, "full", "Adalora")},
    "local_val_set_size": Setting(int, low=0),
    "local_save_steps": Setting(int, low=0),
}


def build_config(**given: Any) -> RunConfig:
    """The RunConfig for the paper's flags (FLAGS); a bad value or an unsupported combination
    raises ConfigError naming the flag. Each flag is checked as the Setting it maps to
    (RunConfig's, or PAPER_FLAGS)."""
    unknown = sorted(set(given) - set(FLAGS))
    if unknown:  # fail before any work, not after training
        raise ConfigError(
            f"unknown flag(s): {', '.join('--' + u for u in unknown)}; see python main.py --help"
        )
    flags = FLAGS | given
    paper = {
        name: PAPER_FLAGS[name].parse(flags.pop(name), name=f"--{name}", source=MAIN_PY)
        for name in PAPER_FLAGS
    }
    resume_from_checkpoint = flags.pop("resume_from_checkpoint")
    # As in the authors' code, an empty value (and "auto" for the init) means the default.
    if flags["client_init"] in ("", "None", "auto"):
        flags["client_init"] = None
    if flags["dev_data_path"] == "":
        flags["dev_data_path"] = None
    settings = run_settings()
    values = {name: settings[name].parse(v, name=f"--{name}", source=MAIN_PY) for name, v in flags.items()}
    if paper["full"]:
        raise ConfigError(
            "--full True (full fine-tuning) is not supported by florist; it fine-tunes LoRA adapters only"
        )
    if paper["Adalora"]:
        raise ConfigError("--Adalora True is not supported by florist; use LoRA (the default)")
    if paper["local_val_set_size"] != 0:
        raise ConfigError(
            "--local_val_set_size is not supported (florist evaluates the global model on "
            "the held-out global_test.json and MMLU instead); leave it at 0"
        )
    method = method_from_paper_flags(
        florist=paper["florist"],
        flora=paper["flora"],
        stacking=paper["stacking"],
        flex=paper["flex"],
        ffa=paper["ffa"],
        fedit=paper["fedit"],
        zero_padding=paper["zero_padding"],
        heter=values["heter"],
        newer={name: paper[name] for name in NEWER_METHODS},
    )
    return RunConfig(
        **values, method=method, resume=_resume(resume_from_checkpoint, values["output_dir"])
    ).validate()


def _resume(given: Any, output_dir: str) -> bool:
    """--resume_from_checkpoint: True, or the checkpoint's path (florist keeps it in output_dir)."""
    if given in (None, False, "", "None", "False", "false"):
        return False
    if given is True or str(given).lower() == "true":
        return True
    if isinstance(given, bool) or not isinstance(given, (str, int)):
        raise ConfigError(f"main.py: --resume_from_checkpoint must be True or a path, got {show(given)}")
    from florist.io import resolve_path

    out = resolve_path(output_dir, "--output_dir")
    if resolve_path(str(given), "--resume_from_checkpoint") not in (out, out / "checkpoint"):
        raise ConfigError(
            f"--resume_from_checkpoint {given}: florist resumes from {out / 'checkpoint'}; pass True or that path"
        )
    return True


def main(**flags: Any) -> None:
    """Run the paper's command: train, print the summary, the MMLU accuracy and the Eff."""
    from florist.cli.run import format_summary
    from florist.errors import run_cli

    if flags.keys() & {"help", "h"}:  # **flags swallows fire's own --help
        from fire import helptext, trace

        print(helptext.HelpText(main, trace.FireTrace(main, name="main.py")))
        return

    def body() -> int:
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


# fire documents and parses the flags from this signature: FLAGS as keyword arguments, plus
# **flags so that a misspelt flag reaches main (and is refused) instead of being left over.
main.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value) for name, value in FLAGS.items()]
    + [inspect.Parameter("flags", inspect.Parameter.VAR_KEYWORD)]
)
main.__doc__ = __doc__


if __name__ == "__main__":
    import fire

    fire.Fire(main)
