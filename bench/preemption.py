"""Preemption benchmark: seconds from SIGTERM to exit of `denser train`, and the cost of the
checkpoint manifest (SHA-256 of every file) when writing and when verifying on --resume.

    python -m bench.preemption                                    # the embedded model, sdpo (EMA teacher)
    python -m bench.preemption --model tiny --objective grpo
    python -m bench.preemption --baseline /tmp/denser-main        # the same cases with another denser tree too

With ``--baseline DIR`` (a source tree of denser, e.g. ``git archive main | tar -x -C DIR``) every case
runs twice, alternating: once with that tree first on PYTHONPATH, once with this one, so a change
is measured before and after under the same load.

Each case starts a run (no periodic checkpoints), waits until step 1's metrics row is written (step 2
is then in progress), waits DELAY seconds more and sends SIGTERM: the run abandons step 2 at its next
check point, writes the checkpoint of step 1 (model, optimizer, EMA teacher, RNG, manifest) and exits.
Launchers allow 30 s between SIGTERM and SIGKILL by default.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMES = re.compile(r"\(([0-9.]+) s from the signal to here, ([0-9.]+) s to save\)")


def stop_once(objective: str, model: str, delay: float, extra: list[str], tree: str | None = None) -> dict:
    from denser.trainers import checkpoint as ckpt

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory() as out:
        run = Path(out) / "run"
        cmd = [sys.executable, "-m", "denser", "train", "--objective", objective, "--model", model, "--steps", "3",
               "--cpu", "--no-progress", "--eval-size", "2", "--output-dir", str(run), *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        metrics = run / "metrics.jsonl"
        while proc.poll() is None and not (metrics.exists() and '"step": 1,' in metrics.read_text()):
            time.sleep(0.02)
        time.sleep(delay)
        t0 = time.monotonic()
        wall0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate()
        t_exit = time.monotonic() - t0
        saved = ckpt.latest_checkpoint(run)
        row = {"objective": objective, "model": model, "delay_s": delay, "rc": proc.returncode, "tree": tree or "this",
               "signal_to_exit_s": t_exit, "line": err.strip().splitlines()[-1] if err.strip() else ""}
        m = TIMES.search(row["line"])
        if m:
            row["to_check_point_s"], row["save_s"] = float(m.group(1)), float(m.group(2))
        if saved is not None:
            row["signal_to_complete_marker_s"] = (saved / ckpt.COMPLETE).stat().st_mtime - wall0
            row["complete_to_exit_s"] = t_exit - row["signal_to_complete_marker_s"]
            row.update(hashing(saved))
        return row


def hashing(path: Path) -> dict:
    """Seconds to build the manifest (the save) and to verify it (--resume), page cache warm."""
    from denser.trainers import checkpoint as ckpt

    files = [p for p in path.rglob("*") if p.is_file() and p.name != ckpt.COMPLETE]
    total = sum(p.stat().st_size for p in files)
    model = path / "model" / "model.safetensors"
    t = time.perf_counter()
    ckpt.file_digest(model)
    t_model = time.perf_counter() - t
    t = time.perf_counter()
    ckpt.manifest(path, 0)
    t_manifest = time.perf_counter() - t
    t = time.perf_counter()
    ckpt.verify_checkpoint(path)
    t_verify = time.perf_counter() - t
    return {"checkpoint_mb": total / 1e6, "model_mb": model.stat().st_size / 1e6, "hash_model_s": t_model,
            "manifest_s": t_manifest, "verify_s": t_verify}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.preemption", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--objective", default="sdpo")
    p.add_argument("--delays", default="0.2,2,5", help="seconds after step 1 ends at which SIGTERM is sent")
    p.add_argument("--baseline", default=None, help="another denser source tree, run alternately with this one")
    a, extra = p.parse_known_args(argv)
    trees = [a.baseline, None] if a.baseline else [None]
    rows = [stop_once(a.objective, a.model, float(d), extra, tree) for d in a.delays.split(",") for tree in trees]
    nan = float("nan")
    print(f"preemption, model={a.model}, objective={a.objective}, {os.cpu_count()} CPU threads, {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| code | SIGTERM after step 1 + | exit code | signal to exit s | to the check point s | save s | "
          "COMPLETE to exit s | checkpoint MB | SHA-256 of model.safetensors s | manifest (re-hash) s | verify s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'baseline' if r['tree'] != 'this' else 'this'} | {r['delay_s']:.1f} s | {r['rc']} | "
              f"{r['signal_to_exit_s']:.1f} | {r.get('to_check_point_s', nan):.1f} | {r.get('save_s', nan):.1f} | "
              f"{r.get('complete_to_exit_s', nan):.1f} | {r.get('checkpoint_mb', 0):.0f} | "
              f"{r.get('hash_model_s', nan):.2f} ({r.get('model_mb', 0):.0f} MB) | "
              f"{r.get('manifest_s', nan):.2f} | {r.get('verify_s', nan):.2f} |")
    for r in rows:
        print(f"  {r['tree']}, {r['delay_s']:.1f} s: {r['line']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
