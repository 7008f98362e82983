"""Sandbox benchmark: programs per second with the pool against one at a time, and the cost of the
sandbox per program against a bare ``python -c pass``.

    denser bench sandbox                          # 20 programs of each kind, workers = the number of cores
    denser bench sandbox --n 40 --workers 4
    denser bench sandbox --out-dir bench/results  # also write sandbox-cpu-<cores>core-<date>.json and .md there

Three programs: ``pass`` (the fixed cost: launcher, namespaces, interpreter start-up), a CPU-bound
loop of about 0.2 s, and ``time.sleep(0.2)`` (a program that waits: what the pool overlaps even on
one core). Each is run ``n`` times one at a time and ``n`` times through ``run_programs`` with
``--workers``. Seconds are wall-clock on whatever else the machine runs: the results record the
load average.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from denser.sandbox import Limits, Program, capabilities, default_workers, run_program, run_programs

PROGRAMS = {
    "pass": "pass",
    "cpu 0.2 s": "n = 0\nfor i in range(2_000_000):\n    n += i\n",
    "sleep 0.2 s": "import time\ntime.sleep(0.2)\n",
}


def measure(n: int, workers: int, argv: list[str]) -> dict:
    limits = Limits(cpu_s=10, wall_s=60)
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = (time.perf_counter() - t0) / n
    rows = []
    for name, src in PROGRAMS.items():
        t0 = time.perf_counter()
        for _ in range(n):
            run_program(src, limits=limits)
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = run_programs([Program(src, limits=limits)] * n, workers=workers)
        pooled = time.perf_counter() - t0
        assert all(r.status == "ok" for r in results), [r for r in results if r.status != "ok"][:1]
        rows.append({"program": name, "serial_s_per_program": serial / n, "pool_s_per_program": pooled / n,
                     "serial_programs_per_s": n / serial, "pool_programs_per_s": n / pooled,
                     "speedup": serial / pooled})
    caps = capabilities()
    return {
        "n": n, "workers": workers, "bare_python_s": bare,
        "sandbox_overhead_s": rows[0]["serial_s_per_program"] - bare,
        "rows": rows,
        "isolation": [k for k in ("network", "pid", "mount", "user", "uid") if getattr(caps, k)],
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": os.getloadavg()},
        "command": " ".join(["denser bench sandbox", *argv]),
        "date": _dt.date.today().isoformat(),
    }


def report(res: dict) -> str:
    lines = [
        f"sandbox: {res['n']} programs of each kind, pool of {res['workers']} workers; isolation: "
        f"{', '.join(res['isolation'])}; {res['machine']['cores']} cores, load average "
        f"{res['machine']['loadavg_before'][0]:.2f}",
        f"bare `python -c pass`: {res['bare_python_s'] * 1000:.0f} ms; sandbox overhead per program: "
        f"{res['sandbox_overhead_s'] * 1000:.0f} ms",
        "",
        "| program | one at a time (ms/program) | pool (ms/program) | programs/s one at a time | programs/s pool | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['program']} | {r['serial_s_per_program'] * 1000:.0f} | {r['pool_s_per_program'] * 1000:.0f} "
                     f"| {r['serial_programs_per_s']:.1f} | {r['pool_programs_per_s']:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="denser bench sandbox", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="programs of each kind (default: 20)")
    ap.add_argument("--workers", type=int, default=None, help="pool size (default: the number of cores)")
    ap.add_argument("--out-dir", default=None, help="also write sandbox-cpu-<cores>core-<date>.json and .md there")
    args = ap.parse_args(argv)
    if args.n < 1 or (args.workers is not None and args.workers < 1):
        ap.error("--n and --workers must be >= 1")
    caps = capabilities()
    if caps.error:
        print(f"denser bench sandbox: the sandbox cannot run programs here: {caps.error}", file=sys.stderr)
        return 2
    res = measure(args.n, args.workers or default_workers(), list(sys.argv[1:] if argv is None else argv))
    text = report(res)
    print(text)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"sandbox-cpu-{res['machine']['cores']}core-{res['date']}"
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / f"{stem}.md").write_text(f"# Sandbox benchmark ({res['date']})\n\nCommand: `{res['command']}`\n\n"
                                        f"Machine: {res['machine']['platform']}, Python {res['machine']['python']}\n\n"
                                        f"{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
