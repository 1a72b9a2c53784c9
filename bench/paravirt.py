#!/usr/bin/env python3
"""Emulated device vs paravirtual ring: exits and time for writing 4 KiB, from one run.

Each style runs RUNS times (interleaved); exits are the same every time, times are medians.
Needs /dev/kvm (root) and binutils. Usage: python bench/paravirt.py [RUNS]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import MissingTool, NotSupported, paravirt  # noqa: E402


def main(runs):
    try:
        c = paravirt.compare(runs=runs)
    except (NotSupported, MissingTool) as e:
        print(f"paravirt: skipped: {e}")
        return 0
    print(f"paravirt: write {len(paravirt.JOB)} bytes to a device, median of {runs} runs each")
    print(f"  {'path':<12} {'exits':>6}  {'by reason':<20} {'time':>10}")
    for style in paravirt.STYLES:
        exits = c.exits[style]
        reasons = " ".join(f"{k}={v}" for k, v in sorted(exits.items()))
        print(f"  {style:<12} {exits.total():>6}  {reasons:<20} {c.seconds[style] * 1e3:>7.3f} ms")
    print(f"  ratio emulated/paravirtual: exits {c.exit_ratio:.0f}x (goal >= 10x), "
          f"time {c.time_ratio:.0f}x (goal >= 5x)")
    return 0 if c.exit_ratio >= 10 and c.time_ratio >= 5 else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 11))
