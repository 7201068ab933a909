"""`florist aggregate` end to end: real peft client adapters in, an adapter peft loads out.

Every expected update is computed here from the clients' own peft parameters (dense
sum_k p_k s_k B_k A_k, dense SVDs), independently of florist's aggregators and of its reader.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_GUARD
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from florist.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = LlamaConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
Client = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module -> (A, B, scaling)


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def make_client(
    directory: Path, rank: int, seed: int, *, num_examples: int | None = None, shared_A: int | None = None
) -> Client:
    """Save a peft LoRA (alpha = 2r, random non-zero A and B) and return its factors.

    With ``shared_A`` (a seed) A is the first r rows of a common random matrix, as in FFA-LoRA.
    """
    model = get_peft_model(tiny_base(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    factors: Client = {}
    with torch.no_grad():
        for name, layer in model.base_model.model.named_modules():
            if not (hasattr(layer, "lora_A") and "default" in layer.lora_A):
                continue
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if shared_A is None:
                A.copy_(torch.randn(A.shape, generator=g) * 0.2)
            else:
                common = torch.randn(
                    64, A.shape[1], generator=torch.Generator().manual_seed(shared_A + len(name))
                )
                A.copy_(common[: A.shape[0]])
            B.copy_(torch.randn(B.shape, generator=g) * 0.2)
            factors[name] = (A.detach().clone(), B.detach().clone(), layer.scaling["default"])
    model.save_pretrained(str(directory))
    if num_examples is not None:
        (directory / "florist_client.json").write_text(json.dumps({"num_examples": num_examples}))
    return factors


def weights(counts: list[int]) -> list[float]:
    return [n / sum(counts) for n in counts]


def exact_delta(clients: list[Client], counts: list[int]) -> dict[str, torch.Tensor]:
    p = weights(counts)
    return {
        name: sum(p_k * s * (B.double() @ A.double()) for p_k, c in zip(p, clients) for A, B, s in [c[name]])
        for name in clients[0]
    }


def truncated(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def logits_by_hand(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    model = tiny_base()
    with torch.no_grad():
        for name, d in deltas.items():
            w = model.get_submodule(name).weight
            w += d.to(w.dtype)
        return model(IDS).logits


def logits_of(adapter_dir: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(tiny_base(), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(IDS).logits


def assert_same_model(adapter_dir: Path, deltas: dict[str, torch.Tensor]) -> None:
    got, want = logits_of(adapter_dir), logits_by_hand(deltas)
    assert not torch.allclose(want, logits_by_hand({}), atol=1e-3)  # the update is not negligible
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def aggregate(*args: str | Path) -> int:
    return main(["aggregate", *map(str, args)])


@pytest.fixture(scope="module")
def hetero(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Client], list[int]]:
    root = tmp_path_factory.mktemp("hetero")
    ranks, counts = [8, 4, 2], [30, 20, 10]
    dirs = [root / f"site{k}" for k in range(3)]
    clients = [make_client(d, r, seed=k + 1) for k, (d, r) in enumerate(zip(dirs, ranks))]
    return dirs, clients, counts


def _counts(counts: list[int]) -> str:
    return ",".join(map(str, counts))


def test_flora_is_exact_and_summary_is_complete(hetero, tmp_path: Path) -> None:
    dirs, clients, counts = hetero
    out = tmp_path / "out"
    assert aggregate("--method", "flora", "--out", out, "--num-examples", _counts(counts), *dirs) == 0
    assert_same_model(out, exact_delta(clients, counts))
    summary = json.loads((out / "summary.json").read_text())
    names = sorted(clients[0])
    assert summary["method"] == "flora" and summary["merge_into_base"] is True
    assert summary["ranks"] == {n: 14 for n in names}
    assert summary["eff"] == pytest.approx(1 / (14 * len(names)))
    assert [c["num_examples"] for c in summary["clients"]] == counts
    assert [c["dir"] for c in summary["clients"]] == [str(d) for d in dirs]
    assert [c["weight"] for c in summary["clients"]] == pytest.approx(weights(counts))
    # Bytes on the wire, from the shapes: up = each client's A and B; down = the rank-14 stack.
    up = sum(r * (64 + out_f) for r in (8, 4, 2) for out_f in (64, 32, 64, 32))
    down = 3 * sum(14 * (64 + out_f) for out_f in (64, 32, 64, 32))
    assert summary["communication"]["total"]["params_up"] == up
    assert summary["communication"]["total"]["bytes_down"] == 4 * down
    assert summary["florist_version"] and summary["seconds"]["total"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_florist_equals_the_truncated_svd(hetero, tmp_path: Path, tau: float) -> None:
    dirs, clients, counts = hetero
    out = tmp_path / "out"
    args = ["--method", "florist", "--threshold", str(tau), "--out", out, "--num-examples", _counts(counts)]
    assert aggregate(*args, *dirs) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = {}
    for name, delta in exact_delta(clients, counts).items():
        S = torch.linalg.svdvals(delta)
        energy = torch.cumsum(S**2, 0) / (S**2).sum()
        rank = 14 if tau == 1.0 else int((energy < tau - 1e-12).sum()) + 1
        assert summary["ranks"][name] == rank
        torch.testing.assert_close(
            torch.tensor(summary["singular_values"][name][:5], dtype=torch.float64),
            S[:5],
            rtol=1e-6,
            atol=1e-9,
        )
        expected[name] = truncated(delta, rank)
    if tau < 1:
        assert sum(summary["ranks"].values()) < 14 * len(clients[0])
    assert summary["threshold"] == tau
    assert_same_model(out, expected)


def test_flexlora_writes_one_loadable_adapter_per_client(hetero, tmp_path: Path) -> None:
    dirs, clients, counts = hetero
    out = tmp_path / "out"
    assert aggregate("--method", "flexlora", "--out", out, "--num-examples", _counts(counts), *dirs) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == ["client_0", "client_1", "client_2"]
    deltas = exact_delta(clients, counts)
    for k, rank in enumerate([8, 4, 2]):
        assert summary["clients"][k]["output"] == f"client_{k}"
        assert_same_model(out / f"client_{k}", {n: truncated(d, rank) for n, d in deltas.items()})


def test_zeropad_averages_padded_factors(hetero, tmp_path: Path) -> None:
    dirs, clients, counts = hetero
    out = tmp_path / "out"
    assert aggregate("--method", "zeropad", "--out", out, "--num-examples", _counts(counts), *dirs) == 0
    p = weights(counts)
    deltas = {}
    for name in clients[0]:
        A_bar, B_bar = (
            torch.zeros(8, 64, dtype=torch.float64),
            torch.zeros(clients[0][name][1].shape[0], 8, dtype=torch.float64),
        )
        for p_k, c in zip(p, clients):
            A, B, s = c[name]
            A_bar[: A.shape[0]] += p_k * A.double()
            B_bar[:, : B.shape[1]] += p_k * B.double()
        deltas[name] = 2.0 * B_bar @ A_bar  # every client has alpha = 2r, so s = 2 is kept
    assert_same_model(out / "client_0", deltas)  # the r_max client receives the whole average


def test_fedit_through_the_console_entry_point(tmp_path: Path) -> None:
    counts = [5, 15]
    dirs = [tmp_path / "a", tmp_path / "b"]
    clients = [make_client(d, 4, seed=10 + k, num_examples=n) for k, (d, n) in enumerate(zip(dirs, counts))]
    out = tmp_path / "out"
    # Run the `florist` console script exactly as pyproject.toml declares it, in a fresh process.
    entry = re.search(r'^florist = "(.+)"$', (REPO / "pyproject.toml").read_text(), re.M)[1]
    module, func = entry.split(":")
    script = f"import sys; from {module} import {func}; sys.exit({func}())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-c",
        script,
        "aggregate",
        "--method",
        "fedit",
        "--out",
        str(out),
        *map(str, dirs),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stderr
    assert "fedit over 2 clients" in proc.stdout
    p = weights(counts)
    deltas = {}
    for name in clients[0]:
        A_bar = sum(p_k * c[name][0].double() for p_k, c in zip(p, clients))
        B_bar = sum(p_k * c[name][1].double() for p_k, c in zip(p, clients))
        deltas[name] = 2.0 * B_bar @ A_bar
    assert_same_model(out, deltas)
    # FedIT is not the exact average: the cross terms are really there.
    exact = exact_delta(clients, counts)
    assert any(not torch.allclose(deltas[n], exact[n], atol=1e-4) for n in exact)


def _imports_of(args: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `florist ARGS` in a fresh process; return it and the heavy packages it imported."""
    heavy = ("torch", "peft", "transformers", "safetensors")
    script = (
        "import atexit, sys\n"
        f"atexit.register(lambda: print('IMPORTED', *[m for m in {heavy!r} if m in sys.modules]))\n"
        "from florist.cli import main\n"
        "sys.exit(main())"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("IMPORTED"))
    return proc, set(line.split()[1:])


def test_aggregate_loads_only_torch_and_safetensors_and_its_help_nothing(good_pair, tmp_path: Path) -> None:
    # `--help` and bad arguments need no torch, so they answer at once.
    proc, imported = _imports_of(["aggregate", "--help"])
    assert proc.returncode == 0 and "--method" in proc.stdout and imported == set()
    proc, imported = _imports_of(
        ["aggregate", "--out", str(tmp_path / "o"), "--threshold", "2", *map(str, good_pair)]
    )
    assert proc.returncode == 2 and "--threshold must be a finite number in (0, 1], got 2" in proc.stderr
    assert imported == set()
    # Aggregating reads and writes PEFT directories without peft or transformers.
    out = tmp_path / "out"
    proc, imported = _imports_of(
        ["aggregate", "--method", "florist", "--out", str(out), *map(str, good_pair)]
    )
    assert proc.returncode == 0, proc.stderr
    assert imported == {"torch", "safetensors"}
    assert (out / "adapter_model.safetensors").is_file()


def test_ffa_is_exact_with_a_shared_frozen_A(tmp_path: Path) -> None:
    counts = [7, 3, 5]
    dirs = [tmp_path / f"c{k}" for k in range(3)]
    clients = [make_client(d, 4, seed=20 + k, shared_A=99) for k, d in enumerate(dirs)]
    out = tmp_path / "out"
    assert aggregate("--method", "ffa", "--out", out, "--num-examples", _counts(counts), *dirs) == 0
    assert_same_model(out, exact_delta(clients, counts))
    assert json.loads((out / "summary.json").read_text())["eff"] == pytest.approx(1 / (0.5 * 4 * 4))


# --- bad input: exit 2, one line naming the client directory (and module), OUT untouched ----

Q1 = "model.layers.1.self_attn.q_proj"


def _key(name: str, factor: str) -> str:
    return f"base_model.model.{name}.lora_{factor}.weight"


def _edit_tensors(directory: Path, fn) -> None:
    weights_file = directory / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    fn(tensors)
    save_file(tensors, weights_file)


def _rename(module: str, to: str):
    def fn(t: dict) -> None:
        for factor in "AB":
            t[_key(to, factor)] = t.pop(_key(module, factor))

    return fn


def _edit_config(directory: Path, **fields) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _poison(value: float):
    def fn(t: dict) -> None:
        t[_key(Q1, "B")][1, 2] = value

    return fn


def _fewer_modules(d: Path) -> None:
    _edit_tensors(d, lambda t: [t.pop(k) for k in list(t) if "v_proj" in k])


def _other_A(d: Path) -> None:
    _edit_tensors(d, lambda t: t[_key(Q1, "A")].add_(1e-3))


def _padded(d: Path) -> None:
    # Still a valid adapter, just bigger than client 0's (8 KiB) and than --max-bytes.
    weights_file = d / "adapter_model.safetensors"
    save_file(load_file(weights_file), weights_file, metadata={"padding": "x" * 5000})


def _traversal_id(d: Path) -> None:
    (d / "florist_client.json").write_text(json.dumps({"num_examples": 3, "client_id": "../../../tmp/evil"}))


class _Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def _pickle(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()
    torch.save({_key(Q1, "A"): _Bomb(d.parent / "PWNED")}, d / "adapter_model.bin")


# problem -> (how client 1 is broken, extra CLI args, text the error must contain, names the module)
BAD_INPUT = {
    "rank mismatch": (
        lambda d: _edit_tensors(d, lambda t: t.update({_key(Q1, "B"): t[_key(Q1, "B")][:, :3].contiguous()})),
        [],
        "rank mismatch",
        True,
    ),
    "modules differ": (_fewer_modules, [], "modules differ", False),
    "nan": (lambda d: _edit_tensors(d, _poison(float("nan"))), [], "NaN or Inf", True),
    "inf": (lambda d: _edit_tensors(d, _poison(float("-inf"))), [], "NaN or Inf", True),
    "missing safetensors": (
        lambda d: (d / "adapter_model.safetensors").unlink(),
        [],
        "missing adapter_model.safetensors",
        False,
    ),
    "corrupt safetensors": (
        lambda d: (d / "adapter_model.safetensors").write_bytes(
            (d / "adapter_model.safetensors").read_bytes()[:-37]
        ),
        [],
        "not a valid safetensors",
        False,
    ),
    "pickle": (_pickle, [], "pickle", False),
    "zero examples": (lambda d: None, ["--num-examples", "4,0"], "must be from 1 to 2**53", False),
    "digit separators": (lambda d: None, ["--num-examples", "4,1_000"], "not a plain decimal integer", False),
    "non-ASCII digits": (lambda d: None, ["--num-examples", "4,\u0664\u0665"], "not a plain decimal", False),
    "zero examples file": (
        lambda d: (d / "florist_client.json").write_text('{"num_examples": 0}'),
        [],
        "an integer from 1 to 2**53",
        False,
    ),
    "10**400 examples": (  # once an OverflowError traceback in the FedAvg weights
        lambda d: (d / "florist_client.json").write_text('{"num_examples": 1' + "0" * 400 + "}"),
        [],
        "an integer from 1 to 2**53, got 'a 401-digit number'",
        False,
    ),
    "deeply nested config": (  # once a RecursionError traceback
        lambda d: (d / "adapter_config.json").write_text("[" * 100_000),
        [],
        "adapter_config.json is nested too deeply",
        False,
    ),
    "module path traversal": (
        lambda d: _edit_tensors(d, _rename(Q1, "../../../x")),
        [],
        "does not name a module",
        False,
    ),
    "modules outside target_modules": (
        lambda d: _edit_config(d, target_modules=["k_proj", "o_proj"]),
        [],
        "not covered by adapter_config.json's target_modules",
        False,  # names the first module it meets
    ),
    # Untrusted regexes run against module names with no time limit: the catastrophic ones are
    # refused before any matching (this case would take hours if "(q+)+" were run).
    "exponential target_modules": (
        lambda d: _edit_config(d, target_modules="(" + "[a-z_.0-9]+" + ")+$"),
        [],
        "exponential backtracking",
        False,
    ),
    "exponential rank_pattern key": (
        lambda d: _edit_config(d, rank_pattern={"(q|q_|_)*x": 4}),
        [],
        "rank_pattern key '(q|q_|_)*x' repeats a group that holds a repeat or an alternation",
        False,
    ),
    "backreference alpha_pattern key": (
        lambda d: _edit_config(d, alpha_pattern={r"(q)\1": 4}),
        [],
        "uses a backreference",
        False,
    ),
    "ffa A differ": (_other_A, ["--method", "ffa"], "shared frozen A", True),
    "oversized": (_padded, ["--max-bytes", "9000"], "more than the limit of 9000", False),
    "path traversal id": (_traversal_id, [], "unsafe client id", False),
}


@pytest.fixture(scope="module")
def good_pair(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("pair")
    dirs = [root / "site_a", root / "site_b"]
    for k, d in enumerate(dirs):
        make_client(d, 4, seed=30 + k, num_examples=4, shared_A=7)
    return dirs


# Every problem with no OUT yet; a few representative ones with an earlier output in OUT.
CASES = [(p, False) for p in sorted(BAD_INPUT)] + [(p, True) for p in ("nan", "pickle", "ffa A differ")]


@pytest.mark.parametrize("problem,existing_out", CASES)
def test_bad_input_fails_cleanly(good_pair, tmp_path: Path, capsys, problem: str, existing_out: bool) -> None:
    breaker, extra, text, names_module = BAD_INPUT[problem]
    dirs = [tmp_path / d.name for d in good_pair]
    for src, dst in zip(good_pair, dirs):
        shutil.copytree(src, dst)
    breaker(dirs[1])
    out = tmp_path / "out"
    if existing_out:
        assert aggregate("--method", "fedit", "--out", out, *good_pair) == 0
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        extra = [*extra, "--overwrite"]
    capsys.readouterr()
    args = ["--method", "fedit", *extra] if "--method" not in extra else extra
    assert aggregate(*args, "--out", out, *dirs) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("florist: error:"), err
    assert text in err and str(dirs[1]) in err, err
    if names_module:
        assert f"module '{Q1}'" in err, err
    if existing_out:
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    else:
        assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # no temporary leftovers
    assert not (tmp_path / "PWNED").exists()


def test_argument_errors(good_pair, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    cases = [
        ([], "zero clients"),
        (["--method", "flora", "--threshold", "0.5", *good_pair], "--threshold applies to --method florist"),
        (["--threshold", "1.5", *good_pair], "(0, 1]"),
        (["--decomposition", "qr", "--method", "fedit", *good_pair], "does not apply"),
        (["--num-examples", "1,2,3", *good_pair], "3 values for 2"),
        ([good_pair[0], good_pair[0]], "given twice"),
    ]
    for args, text in cases:
        capsys.readouterr()
        assert aggregate("--out", out, *args) == 2, args
        assert text in capsys.readouterr().err
        assert not out.exists()
    # An existing directory that is not ours is never replaced, even with --overwrite.
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert aggregate("--out", out, *good_pair) == 2
    assert aggregate("--out", out, "--overwrite", *good_pair) == 2
    assert "not a florist aggregate output" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("method", ["flora", "florist"])
def test_float32_overflow_is_an_error_not_an_inf_adapter(
    good_pair, tmp_path: Path, capsys, method: str
) -> None:
    dirs = [tmp_path / d.name for d in good_pair]
    for src, dst in zip(good_pair, dirs):
        shutil.copytree(src, dst)
    # Finite in the upload (3e38 < float32 max), but scaling 2 takes it past float32.
    _edit_tensors(dirs[1], lambda t: t[_key(Q1, "B")].fill_(3e38))
    out = tmp_path / "out"
    assert aggregate("--method", method, "--dtype", "float32", "--out", out, *dirs) == 2
    err = capsys.readouterr().err
    assert "float32" in err and "--dtype float64" in err, err
    assert not out.exists()
    # float64 arithmetic is finite, but adapters are written in float32, where it would be Inf
    # (once written as such, with exit 0).
    assert aggregate("--method", method, "--out", out, *dirs) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"module '{Q1}'" in err and "overflows float32" in err, err
    assert "--dtype" not in err and not out.exists()
    # What does fit float32 is written, and is finite.
    _edit_tensors(dirs[1], lambda t: t[_key(Q1, "B")].fill_(1e30))
    assert aggregate("--method", method, "--out", out, *dirs) == 0
    written = load_file(out / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in written.values())
