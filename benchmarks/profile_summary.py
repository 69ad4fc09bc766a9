"""Summarise py-spy raw (collapsed) stacks written by ``run.py --profile DIR``.

    .venv/bin/python benchmarks/profile_summary.py DIR/pyegress-rate.txt [--top 15]

Prints, per file, the functions with the most samples on top of the stack (self) and
the most samples anywhere on the stack (inclusive, counted once per sample), as a
share of all samples. Idle samples (the event loop waiting in epoll) are counted and
shown apart, so the shares say where the busy time goes.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# "name (path/to/file.py:123)" -> "name (file.py)"; line numbers merged.
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<path>[^()]*?)(?::\d+)?\)$")
_IDLE = ("select (selectors.py)", "poll (selectors.py)", "run_once (uvloop")
_WAITING = ("wait (threading.py)", "get (queue.py)", "_worker (")


def frame_label(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("path")
    short = "/".join(path.split("/")[-2:]) if "pyegress/" in path else path.split("/")[-1]
    return f"{m.group('name')} ({short})"


def parse(lines: Sequence[str]) -> list[tuple[list[str], int]]:
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        if not line or " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [frame_label(f) for f in stack.split(";")]
        # Drop the process / thread pseudo-frames py-spy puts first.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        stacks.append((frames, int(count)))
    return stacks


def summarise(stacks: list[tuple[list[str], int]], top: int) -> str:
    total = sum(c for _, c in stacks)
    idle = sum(c for f, c in stacks if f and f[-1].startswith(_IDLE))
    waiting = sum(c for f, c in stacks if f and any(f[-1].startswith(w) for w in _WAITING))
    busy = [(f, c) for f, c in stacks if f and not f[-1].startswith(_IDLE)]
    busy = [(f, c) for f, c in busy if not any(f[-1].startswith(w) for w in _WAITING)]
    busy_total = max(1, sum(c for _, c in busy))
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for frames, count in busy:
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [
        f"samples {total}: busy {busy_total}, event loop idle {idle}, "
        f"other threads waiting {waiting}",
        "",
        f"self time (share of busy samples), top {top}:",
    ]
    out += [f"  {100 * c / busy_total:5.1f}%  {name}" for name, c in own.most_common(top)]
    out += ["", f"inclusive (share of busy samples), top {top}:"]
    out += [f"  {100 * c / busy_total:5.1f}%  {name}" for name, c in incl.most_common(top)]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    for path in args.files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError as exc:
            print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"== {path.name}")
        print(summarise(parse(lines), args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
