"""Secure aggregation (SecAgg+) on real Flower processes: one SuperLink, three SuperNodes, ``flwr run``.

FedIT with ``secure_aggregation``: the server unmasks only the weighted sum of the uploads, through
Flower's own ``SecAggPlusWorkflow`` and ``secaggplus_mod``. Its global adapter must equal the
in-process FedIT adapter factor by factor within SecAgg+'s quantisation tolerance, which
``florist.flower.secagg.quantisation_bound`` states for these client sizes: every weighted value
is rounded stochastically to a step of 16 / 2**22 (Flower's clipping range 8, 2**22 levels), so a
coordinate of the average is off by less than m * 16 / 2**22 / sum_k (n_k / max_k n_k), here about
5.6e-6 for m = 3 clients of 6, 4 and 5 examples (plus 1e-6 for float32 on the wire).
"""

from __future__ import annotations

import pytest
from test_flower import RUN_TIMEOUT, flower_run
from test_flower_strategy import tiny_config
from test_privacy import assert_within_secagg_bound

from florist.federation import run_federated
from florist.flower.app_config import FlowerOptions
from florist.models import tiny_llama

pytestmark = [pytest.mark.flower, pytest.mark.slow]


def test_fedit_with_secure_aggregation_equals_in_process_fedit(flower_federation, tmp_path):
    fed, _, data, app = flower_federation  # its teardown checks that no Flower process survives
    cfg = tiny_config(data, tmp_path / "inproc", "fedit", heter=False, rounds=1)
    model, tokenizer = tiny_llama(seed=0)
    expected = run_federated(cfg, model=model, tokenizer=tokenizer)

    fcfg = tiny_config(data, tmp_path / "flower", "fedit", heter=False, rounds=1, secure_aggregation=True)
    options = FlowerOptions(round_timeout=RUN_TIMEOUT, node_wait_timeout=RUN_TIMEOUT)
    metrics = flower_run(fed, app, fcfg, options)

    sizes = [s["num_examples"] for s in expected["rounds"][0]["client_stats"].values()]
    worst, bound = assert_within_secagg_bound(
        tmp_path / "flower" / "adapter", tmp_path / "inproc" / "adapter", sizes
    )
    assert 0 < worst <= bound
    assert metrics["flower"]["failures"] == []
    assert metrics["rounds"][0]["clients"] == expected["rounds"][0]["clients"]
    assert metrics["config"]["secure_aggregation"] is True
    # No client's adapter crossed Flower in an ArrayRecord: only SecAgg+'s masked vectors did.
    assert metrics["rounds"][0]["wire"]["total"]["params_up"] == 0
