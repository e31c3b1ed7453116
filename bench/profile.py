"""py-spy on lmgate while a scenario runs: collapsed stacks to a file, top functions to JSON.

py-spy must be installed (``pip install py-spy``) and allowed to read the process (root, or
``ptrace_scope`` 0). Sampling is ``--nonblocking`` so lmgate is not paused for each sample.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 200
FRAME_LINE = re.compile(r":\d+\)$")
TOP = 25


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Recorder:
    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def start(self) -> None:
        exe = py_spy()
        if exe is None:
            self.error = "py-spy not found (pip install py-spy)"
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--format", "raw", "--output", str(self.out),
             "--rate", str(RATE_HZ), "--nonblocking"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {"error": self.error}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            output, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            output, _ = self.proc.communicate(timeout=5)
        if not self.out.exists():
            return {"error": "py-spy wrote nothing: " + output.decode(errors="replace")[-500:]}
        return summarise(self.out)


def summarise(path: Path) -> dict[str, Any]:
    """Self and inclusive sample shares per function (line numbers folded together)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [FRAME_LINE.sub(")", f) for f in stack.split(";")]
        frames = [_short(f) for f in frames]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    def top(c: Counter[str]) -> list[list[Any]]:
        return [[f, n, round(100 * n / total, 1)] for f, n in c.most_common(TOP)] if total else []
    return {"file": os.fspath(path), "samples": total, "rate_hz": RATE_HZ, "self": top(own), "inclusive": top(incl)}


def _short(frame: str) -> str:
    """``fn (/long/path/site-packages/pkg/mod.py)`` -> ``fn (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    else:
        parts = where.split("/")
        where = "/".join(parts[-2:])
    return f"{name} ({where})"


def text(name: str, prof: dict[str, Any], n: int = 12) -> str:
    if prof.get("error"):
        return f"profile {name}: {prof['error']}"
    lines = [f"profile {name}: {prof['samples']} samples at {prof['rate_hz']} Hz ({prof['file']})",
             "  self%  function"]
    lines += [f"  {pct:5.1f}  {f}" for f, _, pct in prof["self"][:n]]
    lines.append("  incl%  function")
    lines += [f"  {pct:5.1f}  {f}" for f, _, pct in prof["inclusive"][:n]]
    return "\n".join(lines)
