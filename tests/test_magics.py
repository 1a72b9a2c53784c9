"""The IPython extension: %%sandbox runs a cell in a fresh container, with the command line's
options; the widget monitor follows a running container's memory and CPU."""
import pytest

import helpers
from helpers import magics, sandbox, widgets

root = pytest.mark.requires("root")


@pytest.fixture(scope="module")
def shell():
    from IPython.core.interactiveshell import InteractiveShell
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "helpers.notebook.magics")
    return ip


def test_the_package_is_the_extension(shell):
    """``%load_ext helpers`` (what the labs write) registers %%sandbox, on a shell without it."""
    cell = shell.magics_manager.magics["cell"]
    cell.pop("sandbox", None)
    shell.extension_manager.loaded.discard("helpers")
    assert "sandbox" not in cell
    shell.run_line_magic("load_ext", "helpers")
    assert cell.get("sandbox") is magics.sandbox_magic


def test_the_magic_is_registered(shell):
    assert "sandbox" in shell.magics_manager.magics["cell"]


def test_bad_options_are_a_usage_error(shell):
    from IPython.core.error import UsageError
    with pytest.raises(UsageError, match="unrecognized arguments"):
        magics.run_cell("--no-such-option", "true")
    with pytest.raises(helpers.BadInput, match="size"):
        magics.run_cell("--memory 64X", "true")


def test_help_prints_the_options(capsys):
    assert magics.run_cell("--help", "true") is None
    out = capsys.readouterr().out
    assert "%%sandbox" in out and "--memory" in out and "--privileged" in out


@root
def test_a_cell_runs_in_a_fresh_container(shell, capsys):
    shell.run_cell_magic("sandbox", "--memory 64M --cpus 0.5 --pids 32 --hostname box",
                         "hostname\necho $$\n")
    assert capsys.readouterr().out == "box\n1\n"
    shell.run_cell_magic("sandbox", "--memory 8M", "dd if=/dev/zero of=/dev/null bs=32M count=1")
    assert capsys.readouterr().out.splitlines()[-1] == "[exit status 137 (OOM-killed)]"


@root
def test_the_monitor_follows_a_container_until_it_ends():
    with sandbox.Sandbox(memory="64M", cpus=0.5) as box:
        watch = widgets.Monitor(box, every=0.05)
        text = watch._repr_mimebundle_()["text/plain"]     # what nbval compares: fixed values
        assert text.startswith("VBox(children=(HBox(children=(IntProgress(value=0, bar_style='info', "
                               "description='memory', max=64)")
        assert watch.memory_text.value == "0 of 64 MiB" and watch.status.value == "watching: sleep infinity"
        watch.start()
        box.exec("x=$(head -c 8000000 /dev/zero | tr '\\0' a); timeout 0.4 sh -c 'while :; do :; done'; true")
    watch.join(timeout=5)
    assert not watch._thread.is_alive() and len(watch.samples) >= 3
    assert watch.peak > 8_000_000 and max(s.cpus for s in watch.samples) > 0.2
    assert watch.memory_bar.bar_style == "success" and watch.status.value.startswith("ended")
    assert watch.memory_bar.max == 64 and watch.cpu_bar.max == 0.5
