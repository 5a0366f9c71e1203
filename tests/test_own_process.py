"""What a process of its own sets for itself (fedtune.own_process): start-up imports outside
Python's cyclic garbage collector, glibc's allocator thresholds."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from fedtune.own_process import imports_outside_collection


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


_FAULTS = """
import resource, sys
from fedtune.own_process import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block = bytearray(40 * 2**20)  # above glibc's largest default mmap threshold (32 MiB)
    block[::4096] = bytes(len(block[::4096]))  # touch every page
    del block
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_a_freed_block_is_reused_not_faulted_in_again():
    """Ten 40 MiB blocks one after another: glibc maps each afresh (10,240 page faults a block)
    unless the thresholds keep the freed one, which the next reuses."""
    kept, faults = _faults("kept")
    if kept != "True":
        pytest.skip("no glibc mallopt here: nothing is set")
    _, plain = _faults("plain")
    assert plain >= 9 * 10_240 and faults < 3 * 10_240
