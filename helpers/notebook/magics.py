"""The course's IPython extension: ``%load_ext helpers``, then a ``%%sandbox`` cell magic.

    %%sandbox --memory 64M --cpus 0.5 --pids 32 --hostname box
    hostname; ps

runs the cell as a shell script (``sh -c``) in a fresh container from helpers.sandbox and
prints what it printed; a line in brackets says how it ended when that was not exit status 0.
The options are those of ``python -m helpers sandbox run``: one parser, two front ends.

Used in: 24-container-from-scratch, book/containers/container-from-scratch.
"""
import argparse
import shlex

from helpers.containers import sandbox


class _Stop(Exception):
    """--help was printed: nothing more to do."""


class _Parser(argparse.ArgumentParser):
    """argparse, reporting mistakes the IPython way instead of exiting the kernel."""

    def error(self, message):
        from IPython.core.error import UsageError
        raise UsageError(f"%%sandbox: {message}\n{self.format_usage()}")

    def exit(self, status=0, message=None):
        if message:
            print(message)
        raise _Stop


def parser():
    return sandbox.add_options(_Parser(
        prog="%%sandbox", description="run the cell as a shell script in a fresh container"))


def run_cell(line, cell):
    """What ``%%sandbox LINE`` does with CELL: returns the Result (or None after --help)."""
    try:
        args = parser().parse_args(shlex.split(line))
    except _Stop:
        return None
    options = sandbox.options(args)
    result = sandbox.run(cell, **options)
    print(result.output, end="" if result.output.endswith("\n") or not result.output else "\n")
    if not result.ok or result.oom_killed or result.pids_limited:
        print(f"[{result.summary()}]")
    return result


def sandbox_magic(line, cell):
    """%%sandbox [--memory 64M] [--cpus 0.5] [--pids 32] [--hostname box] ... : run the cell as a
    shell script in a fresh container (see ``python -m helpers sandbox run --help``)."""
    run_cell(line, cell)


def load_ipython_extension(ipython):
    ipython.register_magic_function(sandbox_magic, magic_kind="cell", magic_name="sandbox")
