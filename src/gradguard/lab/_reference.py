"""The lab's record of every claim at both scales, and the outcome it gives a new run.

``reference.json`` (shipped with the package) holds, per claim, whether it reproduced in
the quick and in the full lab, with the measurement, as measured when the record was made.
A claim that fails in a run is then *refuted* when it failed at every other scale on record
too, and *not reproduced at this scale* when another scale reproduced it (that result is
shown beside it). Rebuild the record after changing an experiment with
``make lab-reference`` (a full and a quick lab run, then :func:`main` on both).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gradguard.lab._records import Claim, Criterion, ExperimentResult, ScaleResult

REFERENCE_FILE = Path(__file__).with_name("reference.json")


@functools.cache
def load_reference(path: Path = REFERENCE_FILE) -> dict[str, dict[str, ScaleResult]]:
    """Return ``{"experiment/claim-id": {variant: ScaleResult}}``; empty if there is no record."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        key: {variant: ScaleResult(variant=variant, **r) for variant, r in by_variant.items()}
        for key, by_variant in data["claims"].items()
    }


def with_reference(
    result: ExperimentResult,
    quick: bool,
    reference: Mapping[str, Mapping[str, ScaleResult]] | None = None,
) -> ExperimentResult:
    """Return ``result`` with each claim's results at the other scale attached.

    Args:
        result: an experiment's result, measured at the quick or the full scale.
        quick: which scale ``result`` was measured at; the other one is attached.
        reference: the record; the shipped ``reference.json`` by default.
    """
    record = load_reference() if reference is None else reference
    other = "full" if quick else "quick"
    claims = []
    for claim in result.claims:
        found = record.get(f"{result.name}/{claim.id}", {}).get(other)
        claims.append(replace(claim, elsewhere=() if found is None else (found,)))
    return replace(result, claims=tuple(claims))


def build_reference(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The record made from ``results.json`` contents of a quick and a full lab run."""
    claims: dict[str, dict[str, Any]] = {}
    made_from = []
    for run in runs:
        variant = "quick" if run["quick"] else "full"
        made_from.append({k: run[k] for k in ("quick", "seed", "started_at", "versions")})
        for experiment in run["experiments"]:
            for claim in experiment["claims"]:
                measured = _measured_text(claim)
                claims.setdefault(f"{experiment['name']}/{claim['id']}", {})[variant] = {
                    "passed": bool(claim["passed"]),
                    "measured": measured,
                    "seeds": len(experiment["seeds"]),
                }
    return {"made_from": made_from, "claims": claims}


def _measured_text(claim: Mapping[str, Any]) -> str:
    values = tuple(float(v) for v in claim["values"])
    bounds = claim["threshold"]
    stored = Claim(
        id=claim["id"],
        source="",
        statement="",
        paper="",
        measured_on="",
        values=values,
        criterion=Criterion(bounds["low"], bounds["high"]),
        note="",
    )
    return f"{stored.measured_text()} ({claim['criterion']})"


def main(argv: Sequence[str]) -> int:
    """Write ``reference.json`` from the run directories given on the command line."""
    if len(argv) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    runs = [json.loads((Path(d) / "results.json").read_text(encoding="utf-8")) for d in argv]
    variants = {"quick" if r["quick"] else "full" for r in runs}
    if variants != {"quick", "full"}:
        print("give one quick and one full lab run directory", file=sys.stderr)
        return 2
    text = json.dumps(build_reference(runs), indent=1, ensure_ascii=False, sort_keys=True)
    REFERENCE_FILE.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {REFERENCE_FILE}")
    return 0
