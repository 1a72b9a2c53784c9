"""``python -m helpers sandbox run [options] -- command...``: docker run's names (lab 24)."""
import argparse
import sys

from helpers.containers.sandbox.container import run
from helpers.containers.sandbox.options import add_options, options
from helpers.containers.sandbox.spec import CommandNotFound
from helpers.errors import LabError


def main(argv: list[str] | None = None) -> int:
    """Run a command in a fresh container; the exit status is the container's (125: it could not
    start, 127: no such command in it)."""
    parser = argparse.ArgumentParser(prog="python -m helpers sandbox",
                                     description="a container from scratch, like docker run")
    sub = parser.add_subparsers(dest="action", required=True)
    add_options(sub.add_parser("run", help="run a command in a fresh container, then remove it"))
    sub.choices["run"].add_argument("command", nargs=argparse.REMAINDER,
                                    help="the command and its arguments (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: add -- and the command, e.g. -- sh -c 'hostname'")
    try:
        result = run(command, **options(args))
    except CommandNotFound as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 127
    except LabError as e:
        print(f"sandbox: {e}", file=sys.stderr)
        return 125
    sys.stdout.write(result.output)
    if not result.ok:
        print(f"sandbox: {result.summary()}", file=sys.stderr)
    return result.status
