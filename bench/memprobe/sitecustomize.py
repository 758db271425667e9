"""A memory probe for bench/memory.py, loaded by ``PYTHONPATH=bench/memprobe``; inert unless ``MEMPROBE_DIR`` is set.

Every ``MEMPROBE_EVERY`` seconds (60) it appends one JSON line to ``$MEMPROBE_DIR/probe-<pid>.jsonl``: RSS, the
count of gc-tracked objects by type, glibc's ``mallinfo2`` (heap size, in use, free) and pymalloc's arenas and
bytes in use (from ``sys._debugmallocstats``). Nothing in the daemon imports it.
"""

from __future__ import annotations

import os

if os.environ.get("MEMPROBE_DIR"):
    import collections
    import ctypes
    import gc
    import json
    import re
    import sys
    import tempfile
    import threading
    import time

    _DIR = os.environ["MEMPROBE_DIR"]
    _EVERY = float(os.environ.get("MEMPROBE_EVERY", "60"))
    _FIELDS = (
        "arena",
        "ordblks",
        "smblks",
        "hblks",
        "hblkhd",
        "usmblks",
        "fsmblks",
        "uordblks",
        "fordblks",
        "keepcost",
    )

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]

    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2

    def _rss_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def _pymalloc() -> dict[str, int]:
        """sys._debugmallocstats writes to C stderr: point fd 2 at a file for the call."""
        fd, path = tempfile.mkstemp()
        saved = os.dup(2)
        try:
            os.dup2(fd, 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(fd)
        with open(path) as f:
            text = f.read()
        os.unlink(path)
        out = {}
        for key in ("arenas allocated current", "bytes in allocated blocks", "bytes in available blocks"):
            m = re.search(r"^#? ?" + re.escape(key) + r"\s*=\s*([\d,]+)", text, re.M)
            if m:
                out[key] = int(m.group(1).replace(",", ""))
        return out

    def _loop() -> None:
        t0 = time.monotonic()
        i = 0
        while True:
            time.sleep(_EVERY)
            i += 1
            types = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
            info = _libc.mallinfo2()
            record = {
                "i": i,
                "t": round(time.monotonic() - t0),
                "rss_mb": _rss_mb(),
                "threads": [t.name for t in threading.enumerate()],
                "objects": sum(types.values()),
                "malloc": {name: getattr(info, name) for name in _FIELDS},
                "pymalloc": _pymalloc(),
                "types": dict(types.most_common(400)),
            }
            with open(f"{_DIR}/probe-{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    threading.Thread(target=_loop, daemon=True, name="memprobe").start()
