"""py-spy on lmgate while a scenario runs: collapsed stacks to a file, top functions to JSON.

py-spy must be installed (``pip install py-spy``) and allowed to read the process (root, or
``ptrace_scope`` 0). Three modes, each with a blind spot (measured on this kind of machine with
a loop whose true split is known: 11.6 % in a syscall):

    nonblocking  (default) py-spy reads the stacks while lmgate runs. Self time is right (12.5 %),
                 but many stacks come out torn (their outer frames missing), so inclusive
                 shares are too low.
    blocking     py-spy pauses lmgate for each sample: whole stacks, but time in syscalls is
                 overstated about threefold (32 %): socket writes, and getpid() inside
                 asyncio.get_running_loop() on Python 3.11, look bigger than they are.
    native       blocking, plus C frames: the garbage collector (``gc_collect_main``), libc.
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
MODES = {"nonblocking": ["--nonblocking"], "blocking": [], "native": ["--native"]}
FRAME_LINE = re.compile(r":\d+\)$")
TOP = 25


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Recorder:
    def __init__(self, pid: int, out: Path, mode: str = "nonblocking") -> None:
        if mode not in MODES:
            raise ValueError(f"profile mode must be one of {', '.join(MODES)}")
        self.pid = pid
        self.out = out
        self.mode = mode
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def start(self) -> None:
        exe = py_spy()
        if exe is None:
            self.error = "py-spy not found (pip install py-spy)"
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        mode = MODES[self.mode]
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(self.pid), "--format", "raw", "--output", str(self.out),
             "--rate", str(RATE_HZ), *mode],
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
        return {"mode": self.mode, **summarise(self.out)}


# Frames every request passes through (process entry, server, middleware): shown in no
# inclusive list, they would only crowd it.
OUTER = {"_run_module_as_main", "_run_code", "<module>", "main", "Server.run", "asyncio_run", "Runner.run",
         "RequestResponseCycle.run_asgi", "ProxyHeadersMiddleware.__call__", "Starlette.__call__",
         "ServerErrorMiddleware.__call__"}
LOOP = "Runner.run (asyncio/runners.py)"
LOOP_LABEL = "[event loop: uvloop/C, syscalls]"


def summarise(path: Path) -> dict[str, Any]:
    """Sample shares: self per function, self per package, inclusive per lmgate (``proxy/``)
    function, and inclusive per library function (process entry and middleware left out)."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    mine: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(FRAME_LINE.sub(")", f)) for f in stack.split(";")]
        total += n
        leaf = frames[-1]
        own[LOOP_LABEL if leaf == LOOP else leaf] += n
        pkg[LOOP_LABEL if leaf == LOOP else _package(leaf)] += n
        for f in set(frames):
            if "(proxy/" in f and f.split(" (", 1)[0] not in ("<module>", "main"):
                mine[f] += n
            elif f.split(" (", 1)[0] not in OUTER:
                incl[f] += n

    for f in [f for f, n in incl.items() if n >= 0.9 * total]:  # wrappers around everything
        del incl[f]

    def top(c: Counter[str], k: int = TOP) -> list[list[Any]]:
        return [[f, n, round(100 * n / total, 1)] for f, n in c.most_common(k)] if total else []

    return {"file": os.fspath(path), "samples": total, "cpu_s": round(total / RATE_HZ, 2), "rate_hz": RATE_HZ,
            "self": top(own), "inclusive": top(incl), "lmgate_inclusive": top(mine),
            "by_package": top(pkg, 15)}


def _package(frame: str) -> str:
    where = frame.rpartition(" (")[2].rstrip(")")
    head = where.split("/", 1)[0]
    return head.removesuffix(".py")


def _short(frame: str) -> str:
    """``fn (/long/path/site-packages/pkg/mod.py)`` -> ``fn (pkg/mod.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "lib/python3":
                where = where.split("/", 1)[-1]
            break
    return f"{name} ({where})"


def text(name: str, prof: dict[str, Any], n: int = 12) -> str:
    if prof.get("error"):
        return f"profile {name}: {prof['error']}"
    head = (f"profile {name} ({prof.get('mode', '?')}): {prof['samples']} samples at {prof['rate_hz']} Hz "
            f"= {prof['cpu_s']} s on CPU ({prof['file']})")
    lines = [head]
    for key, title in (("by_package", "self% by package"), ("self", "self%  function"),
                       ("lmgate_inclusive", "incl%  lmgate (proxy/) function"),
                       ("inclusive", "incl%  library function")):
        lines.append(f"  {title}")
        lines += [f"  {pct:5.1f}  {f}" for f, _, pct in prof[key][:n]]
    return "\n".join(lines)
