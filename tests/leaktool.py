"""The workplace's independent leak check, for the tests that ask it too: found beside the
checkout (``../shared/tools/leaks``), in /work/shared, or where ``CNLAB_LEAKS_TOOL`` says;
``LEAKS`` is None on a machine without it, and each test says what it then does."""
import os
import subprocess
from pathlib import Path

LEAKS = next((p for p in (Path(os.environ.get("CNLAB_LEAKS_TOOL", "/nonexistent")),
                          Path(__file__).resolve().parents[2] / "shared" / "tools" / "leaks",
                          Path("/work/shared/tools/leaks")) if p.is_file()), None)
MISSING = "the independent leak check (../shared/tools/leaks, or CNLAB_LEAKS_TOOL) is not on this machine"


def run(timeout: float = 60) -> str:
    """What it prints: a line per leak, then ``leaks: N``."""
    assert LEAKS is not None, MISSING
    return subprocess.run(["bash", str(LEAKS)], capture_output=True, text=True, timeout=timeout).stdout
