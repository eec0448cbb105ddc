"""``commpipe worker`` with one fault injected, for the tests that need a crash or a race at
an exact step of the worker (``python -m tests.integration.faulty_worker``).

``COMMPIPE_TEST_FAULT`` chooses it:

- ``kill-before-offset-commit:N``: SIGKILL the worker itself at its N-th input offset
  commit that has offsets to commit, after the changelog writes it covers were delivered
  and before the offsets are committed (agents/checkpoint.py, step 4).
- ``hold-fetch:N``: the N-th fetch with input records waits, handed over but not taken by
  the aggregating task, until a revocation of input partitions has begun;
  ``COMMPIPE_TEST_FAULT_FILE`` gets the records held, per partition, when the fetch starts
  waiting, and ``<that file>.taken`` the records of it the worker then applied.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any


def _kill_before_offset_commit(n: int) -> None:
    from agents.intake import Intake

    commit = Intake.commit
    calls = {"n": 0}

    async def killing(self: Intake, offsets: Any) -> None:
        calls["n"] += 1
        if calls["n"] >= n:
            print(f"fault: killed before committing {dict(offsets)}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        await commit(self, offsets)

    Intake.commit = killing  # type: ignore[method-assign]


def _hold_fetch(n: int, marker: str) -> None:
    from agents.app import Pipeline
    from agents.intake import Intake

    revoked = asyncio.Event()
    revoked_original = Pipeline._revoked
    next_original = Intake.next
    take_original = Intake.take
    state: dict[str, Any] = {"n": 0, "held": None}

    async def on_revoked(self: Pipeline, sender: Any, revoked_tps: Any, **kwargs: Any) -> None:
        if any(tp.topic == self.settings.topic for tp in revoked_tps):
            print("fault: a revocation of input partitions began", flush=True)
            revoked.set()
        await revoked_original(self, sender, revoked_tps, **kwargs)

    async def next_held(self: Intake) -> Any:
        fetched = await next_original(self)
        if any(batch.records for batch in fetched):
            state["n"] += 1
            if state["n"] == n:
                held = {b.partition: len(b.records) for b in fetched}
                revoked.clear()
                with open(marker, "w") as f:
                    json.dump(held, f)
                print(f"fault: holding a fetch of {held} until a revocation", flush=True)
                await asyncio.wait_for(revoked.wait(), 300)
                state["held"] = fetched
        return fetched

    def take(self: Intake, batches: Any) -> Any:
        taken = take_original(self, batches)
        if batches is state["held"]:
            with open(marker + ".taken", "w") as f:
                json.dump({b.partition: len(b.records) for b in taken}, f)
        return taken

    Pipeline._revoked = on_revoked  # type: ignore[method-assign]
    Intake.next = next_held  # type: ignore[method-assign]
    Intake.take = take  # type: ignore[method-assign]


def main() -> None:
    kind, _, arg = os.environ["COMMPIPE_TEST_FAULT"].partition(":")
    if kind == "kill-before-offset-commit":
        _kill_before_offset_commit(int(arg))
    elif kind == "hold-fetch":
        _hold_fetch(int(arg), os.environ["COMMPIPE_TEST_FAULT_FILE"])
    else:
        sys.exit(f"unknown COMMPIPE_TEST_FAULT {kind!r}")
    from pipeline.cli.main import main as cli

    sys.argv = ["commpipe", "worker"]
    cli()


if __name__ == "__main__":
    main()
