"""`agpt verify STORE`: independent consistency checks of a trie store (SPEC §6)."""

from __future__ import annotations

import json
import sys
import time

import click

from agpt.cli import cli


@cli.command("verify")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@click.option("--progress", is_flag=True, help="Report progress on stderr.")
def verify(store: str, as_json: bool, progress: bool) -> None:
    """Check the trie store STORE against its corpus; exit 1 if any check fails.

    Checks: partition table and spine, layer structure, radix <-> leveled agreement, full
    coverage of every start position (rolling path hashes of the corpus), count
    conservation, and the pruning rule for pruned stores. Memory stays bounded.
    """
    from agpt.verify import verify_store

    t0 = time.perf_counter()
    results = verify_store(store, progress=progress)
    ok = all(r.ok for r in results)
    if as_json:
        click.echo(json.dumps({"store": store, "ok": ok, "seconds": round(time.perf_counter() - t0, 3),
                               "checks": [r.to_dict() for r in results]}))
    else:
        for r in results:
            click.echo(r.line())
    if not ok:
        sys.exit(1)
