"""Start-up imports outside Python's cyclic garbage collector (fedtune.startup_collection)."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from fedtune.startup_collection import imports_outside_collection


@pytest.fixture
def collection_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()


def test_a_shared_process_only_pauses_collection(collection_restored):
    frozen = gc.get_freeze_count()
    with imports_outside_collection(owns_process=False):
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_a_process_of_its_own_freezes_what_the_imports_made(collection_restored):
    with imports_outside_collection(owns_process=True):
        made = [[] for _ in range(1000)]  # tracked containers, as imports make
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() >= len(made)


def test_collection_resumes_when_an_import_fails(collection_restored):
    with pytest.raises(ModuleNotFoundError), imports_outside_collection(owns_process=False):
        import fedtune_no_such_module  # noqa: F401
    assert gc.isenabled()


def test_collection_stays_off_where_the_caller_turned_it_off(collection_restored):
    gc.disable()
    with imports_outside_collection(owns_process=False):
        pass
    assert not gc.isenabled()


def test_only_the_command_line_process_owns_its_process():
    """``main()`` (the ``fedtune`` script, ``python -m fedtune``) owns its process; a caller
    that passes its arguments (a test) does not."""
    probe = ("import sys; from fedtune import cli; seen = []\n"
             "cli.COMMANDS['config'] = lambda args, console: seen.append(args.owns_process) or 0\n"
             "cli.main(['config']); sys.argv = ['fedtune', 'config']; cli.main(); print(seen)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[False, True]"
