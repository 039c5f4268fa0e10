"""Memory and speed of gym_vllm's session-affinity table at scale.

    .venv/bin/python bench/bench_sessions.py [--sessions 1000000]

Fills a SessionTable with N sessions (ids as the proxy makes them: 32 hex chars), measures the
memory it holds (tracemalloc) and the time per lookup and per insert, then checks the bound by
inserting N more into a table capped at N.
"""

import argparse
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gym_vllm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.sessions
    ids = [uuid.uuid4().hex for _ in range(n)]

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    table = gym_vllm.SessionTable(max_entries=n, idle_timeout_s=3600)
    started = time.perf_counter()
    for i, session in enumerate(ids):
        table.set(session, i % 3)
    insert_s = time.perf_counter() - started
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()

    started = time.perf_counter()
    for session in ids:
        table.get(session)
    lookup_s = time.perf_counter() - started

    for session in (uuid.uuid4().hex for _ in range(n)):  # N more: the oldest go, the size stays N
        table.set(session, 0)
    assert len(table) == n

    print("| sessions | table memory | per session | insert | lookup |")
    print("|---|---|---|---|---|")
    print(f"| {n:,} | {held / 2**20:.0f} MiB | {held / n:.0f} B | {insert_s / n * 1e6:.2f} µs | {lookup_s / n * 1e6:.2f} µs |")
    id_bytes = sys.getsizeof(ids[0])
    print(f"(plus the session id strings the table keeps alive, {id_bytes} B each: {(held + id_bytes * n) / 2**20:.0f} MiB in all; "
          f"the bound held at {len(table):,} after {n:,} more inserts)")


if __name__ == "__main__":
    main()
