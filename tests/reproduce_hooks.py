"""Run reproduce.py's main with a test hook (tests/test_reproduce.py).

    python tests/reproduce_hooks.py interrupt-after:N [reproduce.py arguments]

interrupt-after:N  Ctrl-C right after the N-th judgment is written, wherever in the run that falls:
                   the interruption lands at a known point instead of racing a poller against the judges.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402
import reproduce  # noqa: E402


def main() -> int:
    hook, args = sys.argv[1], sys.argv[2:]
    if not hook.startswith("interrupt-after:"):
        raise SystemExit(f"unknown hook {hook!r}")
    n, written, real_write = int(hook.split(":")[1]), [], evaluate.write_record

    def write_record(f, record):
        real_write(f, record)
        if "verdict" in record:
            written.append(1)
            if len(written) == n:
                raise KeyboardInterrupt
    evaluate.write_record = write_record
    return reproduce.main(args)


if __name__ == "__main__":
    sys.exit(main())
