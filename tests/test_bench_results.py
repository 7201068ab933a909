"""bench/results_newer.py's bookkeeping: its section survives bench/results.py's re-render
(bench/common.py), and FedSA's personalised records are paired with the right held-out records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402
import results_newer as rn  # noqa: E402


def test_the_newer_section_is_replaced_in_place_and_kept_across_a_rerender(tmp_path: Path) -> None:
    block = f"{common.START}\n## newer\nrow\n{common.END}\n"
    text = common.splice("# Results\n\nmain table\n", block)
    assert text.startswith("# Results\n\nmain table\n") and text.endswith(block)
    again = common.splice(text + "\nafter\n", f"{common.START}\nnew rows\n{common.END}\n")
    assert (
        again.count(common.START) == 1
        and "row\n" not in again
        and "new rows" in again
        and again.endswith("after\n")
    )
    (tmp_path / "results.md").write_text(text)
    (tmp_path / "results.json").write_text(json.dumps({"settings": [1], "newer_methods": {"rows": [2]}}))
    doc, md = common.keep_newer(tmp_path, {"settings": [3]}, "# Results\n\nre-rendered\n")
    assert doc == {"settings": [3], "newer_methods": {"rows": [2]}}
    assert md.startswith("# Results\n\nre-rendered\n") and md.rstrip("\n").endswith(block.rstrip("\n"))


def test_personalised_records_pair_with_the_clients_heldout_records() -> None:
    """Client k's own records sit at n_global + k * per_client in heldout.json; the paired difference
    is the token-weighted mean over the records both models scored (record 1 of client 0 was cut)."""
    row = {
        "eval_personal": {
            "clients": {
                "client_0": {"records": {"index": [0, 2], "loss_sum": [4.0, 6.0], "tokens": [2, 3]}},
                "client_1": {"records": {"index": [1], "loss_sum": [1.0], "tokens": [1]}},
            }
        }
    }
    mine = rn.personal_records(row, n_global=10, per_client=3)
    assert mine == {10: (4.0, 2), 12: (6.0, 3), 14: (1.0, 1)}
    other = {"records": {"index": [0, 10, 12, 14], "loss_sum": [9.0, 2.0, 9.0, 1.0], "tokens": [9, 2, 3, 1]}}
    p = rn.paired_on(mine, rn.by_index(other))
    assert p["n_records"] == 3
    assert p["delta"] == pytest.approx(((4 + 6 + 1) - (2 + 9 + 1)) / 6)
    assert p["ci95"][0] <= p["delta"] <= p["ci95"][1]


def test_the_seed_spread_is_weighed_only_for_a_difference_the_interval_resolves() -> None:
    assert common.beyond_seeds(-0.002, 0.001, [-0.007, 0.003]) == ""  # not resolved: nothing to weigh
    assert "larger than the 0.0010-nat spread" in common.beyond_seeds(-0.002, 0.001, [-0.003, -0.001])
    assert "so not a conclusion" in common.beyond_seeds(0.0005, 0.001, [0.0002, 0.0008])
    assert common.beyond_seeds(0.02, None, [0.01, 0.03]) == ""
