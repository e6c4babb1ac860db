"""Plans byte-identical to the recorded ones (tests/plan_golden.py): every workload x head configuration x page size
x eager / graph mode, fresh and followed through decode steps. A change that moves any plan array, launch or grid
fails here; re-record with ``python tests/plan_golden.py --write`` only for an intended change of the plans."""

from __future__ import annotations

import json

import plan_golden


def test_plans_match_the_golden_hashes():
    want = json.loads(plan_golden.GOLDEN.read_text())
    got = plan_golden.collect()
    bad = plan_golden.compare(got, want)
    assert not bad, f"{len(bad)} of {sum(len(v) for v in want.values())} plans differ:\n" + "\n".join(bad[:20])
