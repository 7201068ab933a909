"""The fast paths give the slow paths' answers: FLoRIST's modules side by side equal the sequential
single-threaded aggregation bit for bit; its float32 route stays within its stated error bound of
an independent float64 computation (dense product, dense SVD) and keeps float64's rank."""

from __future__ import annotations

import math

import pytest
import torch
from test_aggregation import dense_delta

from florist.aggregation import ClientUpdate, LoraFactors, get_aggregator
from florist.aggregation.linalg import (
    ENERGY_RTOL,
    certified_energy_rank,
    energy_rank,
    fix_signs,
    float32_error_bound,
    map_modules,
    product_svd,
    weighted_stack,
)

HETER_RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
NUM_EXAMPLES = [120, 75, 300, 40, 90, 210, 60, 105]


def uploads(
    ranks: list[int], shapes: dict[str, tuple[int, int]], *, seed: int = 0, kind: str = "random"
) -> list[ClientUpdate]:
    """Client uploads (float32, scaling 2) of three kinds: independent random factors (a flat
    spectrum), a shared A with small per-client changes (nearly rank-deficient A stack: shared client
    init), and B columns decaying over six orders of magnitude (a long spectral tail)."""
    g = torch.Generator().manual_seed(seed)
    common = {name: torch.randn(max(ranks), n, generator=g) / math.sqrt(n) for name, (_, n) in shapes.items()}
    out = []
    for k, r in enumerate(ranks):
        modules = {}
        for name, (m, n) in shapes.items():
            A = torch.randn(r, n, generator=g) / math.sqrt(n)
            if kind == "shared":
                A = common[name][:r] + 1e-3 * A
            B = torch.randn(m, r, generator=g) * 0.01
            if kind == "decay":
                B = B * torch.logspace(0, -6, r)
            modules[name] = LoraFactors(A=A, B=B, scaling=2.0)
        out.append(ClientUpdate(f"client_{k}", NUM_EXAMPLES[k % len(NUM_EXAMPLES)], modules))
    return out


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# --- modules side by side ------------------------------------------------------------------


def test_modules_side_by_side_equal_the_sequential_single_threaded_aggregation(threads) -> None:
    shapes = {f"model.layers.{i}.self_attn.{p}_proj": (192, 160) for i in range(3) for p in "qv"}
    updates = uploads(HETER_RANKS, shapes, seed=3)
    torch.set_num_threads(1)
    sequential = get_aggregator("florist", threshold=0.9, workers=1).aggregate(updates)
    torch.set_num_threads(2)
    side_by_side = get_aggregator("florist", threshold=0.9).aggregate(updates)
    assert torch.get_num_threads() == 2  # restored after the workers set theirs to 1
    assert sequential.ranks == side_by_side.ranks
    for name in shapes:
        a, b = sequential.adapter[name], side_by_side.adapter[name]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert a.A.is_contiguous() and a.B.is_contiguous() and b.A.is_contiguous() and b.B.is_contiguous()
        assert torch.equal(sequential.singular_values[name], side_by_side.singular_values[name])


def test_map_modules_keeps_the_order_and_runs_each_module_single_threaded(threads) -> None:
    torch.set_num_threads(2)
    seen = map_modules(lambda name: (name, torch.get_num_threads()), [f"m{i}" for i in range(7)])
    assert [name for name, _ in seen] == [f"m{i}" for i in range(7)]
    assert {n for _, n in seen} == {1}
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"):
        map_modules(lambda name: (_ for _ in ()).throw(RuntimeError("boom")), ["a", "b"])
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("rank", [5, 12, 40])
def test_factors_equal_the_signed_rotation_bit_for_bit(rank: int) -> None:
    """ProductSVD.factors writes U diag(S) and V^T in one pass each: the same numbers as fixing
    the signs first (fix_signs) and scaling after, zero-padded beyond the available directions."""
    g = torch.Generator().manual_seed(0)
    B, A = (
        torch.randn(50, 12, generator=g, dtype=torch.float64),
        torch.randn(12, 30, generator=g, dtype=torch.float64),
    )
    for decomposition in ("qr", "svd", "dense"):
        svd = product_svd(B, A, decomposition)
        k = min(rank, svd.S.shape[0])
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
        f = svd.factors(rank)
        # the reference: rotate back, fix signs, then scale
        from florist.aggregation.linalg import _rotate

        U = _rotate(svd.left, svd.left_tau, svd.core_U, k)
        V = _rotate(svd.right, svd.right_tau, svd.core_V, k)
        U, Vh = fix_signs(U, V.T)
        expected_B = torch.zeros(50, rank, dtype=torch.float64)
        expected_A = torch.zeros(rank, 30, dtype=torch.float64)
        expected_B[:, :k] = U * svd.S[:k]
        expected_A[:k] = Vh
        assert torch.equal(f.B, expected_B) and torch.equal(f.A, expected_A)
        assert f.A.is_contiguous() and f.B.is_contiguous()


# --- the float32 route and its bound -------------------------------------------------------

BOUND_CASES = [
    ("random", HETER_RANKS, (768, 640)),
    ("shared", [16] * 8, (640, 768)),
    ("decay", HETER_RANKS, (1024, 384)),
    ("random", [8, 4, 2, 2], (300, 200)),
    ("random", [1], (512, 2752)),  # one direction, a wide module (Llama's MLP aspect): rounding dominates
]


@pytest.mark.parametrize("kind,ranks,shape", BOUND_CASES)
def test_float32_route_is_within_its_error_bound_of_dense_float64(threads, kind, ranks, shape) -> None:
    """The float32 route against the float64 SVD of the dense weighted sum of the same uploads:
    singular values within eps, the whole decomposition within eps in Frobenius norm, FLoRIST's
    rank equal to float64's, and its truncation within 2 eps of the best one."""
    torch.set_num_threads(1)
    name = "model.layers.0.self_attn.q_proj"
    updates = uploads(ranks, {name: shape}, seed=11, kind=kind)
    weights32 = torch.tensor([u.num_examples for u in updates], dtype=torch.float32)
    weights32 /= weights32.sum()
    B32, A32 = weighted_stack(updates, name, weights32, torch.float32)
    eps = float32_error_bound(B32, A32)
    M = dense_delta(updates, name)  # the float64 sum of the uploads, independent of florist's code
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    svd32 = product_svd(B32, A32)
    n = svd32.S.shape[0]
    assert (svd32.S.double() - S[:n]).abs().max() <= eps
    assert all(float(s) <= eps for s in S[n:])  # nothing the float32 route left out
    full = svd32.factors(n)
    assert torch.linalg.matrix_norm(full.B.double() @ full.A.double() - M) <= eps
    for tau in (0.5, 0.8, 0.9, 0.95, 0.99):
        p64 = energy_rank(S, tau, shape)
        p32 = certified_energy_rank(svd32.S, tau, eps)
        assert p32 in (None, p64)
        result = get_aggregator("florist", threshold=tau, dtype=torch.float32).aggregate(updates)
        f = result.adapter[name]
        assert f.rank == p64 and f.A.dtype == torch.float32
        best = torch.linalg.matrix_norm(M - (U[:, :p64] * S[:p64]) @ Vh[:p64])
        assert torch.linalg.matrix_norm(M - f.B.double() @ f.A.double()) <= best + 2 * eps
        assert (p32 is None) == (name in result.options["float64_modules"])


def test_certified_rank_is_the_energy_rank_or_says_it_cannot_tell() -> None:
    S = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    for tau in (0.3, 0.7, 0.8, 0.9, 0.95, 0.999):
        assert certified_energy_rank(S, tau, 0.0) == energy_rank(S, tau, (10, 10))
        assert certified_energy_rank(S, tau, 1e-9) == energy_rank(S, tau, (10, 10))
    assert certified_energy_rank(S, 1.0, 0.0) is None  # tau = 1: a question for float64 alone
    assert certified_energy_rank(S, 0.9, 10.0) is None  # the error swamps the spectrum
    assert certified_energy_rank(torch.zeros(3), 0.9, 0.0) is None  # an all-zero update
    ratio2 = float((S[:2] ** 2).sum() / (S**2).sum())
    assert certified_energy_rank(S, ratio2, 1e-6) is None  # the cut-off sits exactly on tau
    # within float64's own slack of tau: float64 keeps 2 directions, which the bounds cannot show
    assert energy_rank(S, ratio2 + ENERGY_RTOL / 2, (10, 10)) == 2
    assert certified_energy_rank(S, ratio2 + ENERGY_RTOL / 2, 1e-15) is None
    assert (
        certified_energy_rank(S, ratio2 + 4 * ENERGY_RTOL, 1e-15)
        == 3
        == energy_rank(S, ratio2 + 4 * ENERGY_RTOL, (10, 10))
    )
    assert certified_energy_rank(S, ratio2 - 1e-3, 1e-6) == 2


def test_float32_redoes_in_float64_the_modules_it_cannot_certify(threads) -> None:
    """Equal singular values put the cut-off exactly on tau: float32 rounding could pick either
    rank, so that module is recomputed in float64 and equals the float64 aggregation (as float32)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(96, 4, generator=g, dtype=torch.float64))
    P, _ = torch.linalg.qr(torch.randn(80, 4, generator=g, dtype=torch.float64))
    tie = LoraFactors(A=P.T.float().contiguous(), B=Q.float(), scaling=2.0)
    plain = uploads([4], {"other": (96, 80)}, seed=2)[0].modules["other"]
    updates = [ClientUpdate("c0", 10, {"tie": tie, "other": plain})]
    r32 = get_aggregator("florist", threshold=0.5, dtype=torch.float32).aggregate(updates)
    r64 = get_aggregator("florist", threshold=0.5).aggregate(updates)
    assert r32.options["float64_modules"] == ["tie"]
    assert r32.ranks == r64.ranks
    assert torch.equal(r32.adapter["tie"].A, r64.adapter["tie"].A.float())
    assert torch.equal(r32.adapter["tie"].B, r64.adapter["tie"].B.float())
    assert "float64_modules" not in r64.options


# --- MMLU loglik with a bf16 body ----------------------------------------------------------


def test_body_in_bfloat16_swaps_the_decoder_linears_only_and_restores_them() -> None:
    from florist.evaluation.head import body_in_bfloat16
    from florist.models import tiny_llama

    model, _ = tiny_llama(seed=2)
    linears = {n: m.weight for n, m in model.get_decoder().named_modules() if type(m) is torch.nn.Linear}
    head = model.lm_head.weight
    with body_in_bfloat16(model):
        assert torch.is_autocast_enabled("cpu")
        for name, m in model.get_decoder().named_modules():
            if name in linears:
                assert m.weight.dtype == torch.bfloat16
                assert torch.equal(m.weight, linears[name].to(torch.bfloat16))
        assert model.lm_head.weight is head and head.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    for name, m in model.get_decoder().named_modules():
        if name in linears:
            assert m.weight is linears[name]


def test_checked_precision_rescores_exactly_the_close_calls_in_float32(monkeypatch) -> None:
    """ "checked" = the bf16-body scores, except that every question whose two best letters are closer
    than CHECK_MARGIN carries its float32 scores, bit for bit."""
    import florist.evaluation.mmlu as mmlu
    from florist.models import tiny_llama

    model, tok = tiny_llama(seed=3)
    prompts = [mmlu.build_prompt(q) for q in _hand_questions()]
    exact = mmlu.loglik_letter_scores(model, tok, prompts, batch_size=3, progress=False)
    body = mmlu.loglik_letter_scores(model, tok, prompts, batch_size=3, progress=False, precision="bfloat16")
    assert not torch.equal(exact, body)  # the bf16 body does change the scores
    best = body.topk(2, -1).values
    gaps = (best[:, 0] - best[:, 1]).tolist()
    margin = sorted(gaps)[len(gaps) // 2]  # half the questions are "close"
    monkeypatch.setattr(mmlu, "CHECK_MARGIN", margin)
    checked, rescored = mmlu.checked_letter_scores(model, tok, prompts, precision="checked", batch_size=3)
    assert rescored == [i for i, g in enumerate(gaps) if g < margin] and rescored
    for i in range(len(prompts)):
        # rescoring runs a subset in its own batches: float32 up to batch-shape rounding
        if i in rescored:
            torch.testing.assert_close(checked[i], exact[i], rtol=1e-5, atol=2e-5)
        else:
            assert torch.equal(checked[i], body[i])
    monkeypatch.setattr(mmlu, "CHECK_MARGIN", float("inf"))
    all_rescored = mmlu.loglik_letter_scores(
        model, tok, prompts, batch_size=3, progress=False, precision="checked"
    )
    assert torch.equal(all_rescored, exact)
    with pytest.raises(ValueError, match="precision"):
        mmlu.loglik_letter_scores(model, tok, prompts, precision="int8")


def _hand_questions() -> list:
    from florist.evaluation.mmlu import MMLUQuestion

    return [
        MMLUQuestion("algebra", "What is 2 + 2?", ("3", "4", "5", "22"), 1),
        MMLUQuestion("algebra", "Which is prime? " + "Think carefully. " * 6, ("4", "6", "7", "9"), 2),
        MMLUQuestion("history", "Who crossed the Rubicon?", ("Caesar", "Cicero", "Nero", "Cato"), 0),
        MMLUQuestion(
            "history", "In which year did the Berlin wall fall? " * 3, ("1961", "1989", "1990", "1991"), 1
        ),
        MMLUQuestion(
            "biology", "Which organelle makes ATP?", ("Nucleus", "Ribosome", "Mitochondrion", "Golgi"), 2
        ),
        MMLUQuestion(
            "biology", "DNA is made of?", ("Amino acids", "Nucleotides", "Lipids", "Sugars only"), 1
        ),
    ]


def test_checked_predictions_equal_float32_on_real_mmlu_with_smollm2(mmlu_subset) -> None:
    """On a stratified part of the 1,444 questions the checked precision (bf16 body) predicts exactly
    what float32 does, and the bf16 body moves no gap between two letters by CHECK_MARGIN or more:
    the assumption "checked" rests on (bench/evaluation.py checks all 1,444)."""
    from florist.evaluation.mmlu import CHECK_MARGIN, checked_letter_scores, load_mmlu, prepare_questions
    from florist.evaluation.mmlu import loglik_letter_scores as scores_of
    from florist.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    # 8 questions: bf16 matmuls are slow on a CPU without native bf16, and this runs three passes.
    _, prompts = prepare_questions(
        load_mmlu(mmlu_subset), batch_size=8, seed=7, max_questions=8, kshot=0, dev=None
    )
    exact = scores_of(model, tok, prompts, progress=False)
    body = scores_of(model, tok, prompts, progress=False, precision="bfloat16")
    shift = ((body[:, :, None] - body[:, None, :]) - (exact[:, :, None] - exact[:, None, :])).abs().amax()
    assert shift < CHECK_MARGIN
    checked, rescored = checked_letter_scores(model, tok, prompts, precision="checked", progress=False)
    assert torch.equal(checked.argmax(-1), exact.argmax(-1))
    best = body.topk(2, -1).values
    assert rescored == torch.nonzero(best[:, 0] - best[:, 1] < CHECK_MARGIN).flatten().tolist()
    assert len(rescored) < len(prompts)


def test_evaluate_mmlu_reports_its_precision_and_what_it_rescored() -> None:
    from florist.evaluation.mmlu import evaluate_mmlu
    from florist.models import tiny_llama

    model, tok = tiny_llama(seed=3)
    questions = _hand_questions()
    checked = evaluate_mmlu(model, tok, questions, precision="checked", progress=False)
    reference = evaluate_mmlu(model, tok, questions, progress=False)
    assert checked["precision"] == "checked" and 0 <= checked["rescored_float32"] <= len(questions)
    assert "rescored_float32" not in reference and reference["precision"] == "float32"
    with pytest.raises(ValueError, match="precision"):
        evaluate_mmlu(model, tok, questions, precision="half")
