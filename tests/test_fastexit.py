"""The autoseg program's exit: everything a normal exit shows is kept, only the module teardown is skipped."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120)


def test_the_status_buffered_output_and_atexit_handlers_survive(tmp_path):
    log = tmp_path / "log.txt"
    r = _python(f"""
        import atexit, logging, sys
        from autoseg.fastexit import exit_process
        logging.basicConfig(filename={str(log)!r}, level=logging.INFO)
        logging.getLogger("t").info("logged line")
        atexit.register(lambda: print("handler ran"))
        sys.stdout.write("no newline, still buffered")
        sys.stderr.write("to stderr")
        exit_process(3)
        print("never")
    """)
    assert r.returncode == 3
    assert r.stdout == "no newline, still bufferedhandler ran\n"
    assert r.stderr == "to stderr"
    assert log.read_text() == "INFO:t:logged line\n"


def test_a_running_thread_that_is_not_a_daemon_is_waited_for():
    r = _python("""
        import threading, time
        from autoseg.fastexit import exit_process
        def work():
            time.sleep(0.5)
            print("thread finished", flush=True)
        threading.Thread(target=work).start()
        exit_process(0)
    """)
    assert (r.returncode, r.stdout) == (0, "thread finished\n")


def test_a_temporary_directory_is_removed_at_exit(tmp_path):
    r = _python("""
        import tempfile
        from autoseg.fastexit import exit_process
        keep = tempfile.TemporaryDirectory()
        print(keep.name)
        exit_process(0)
    """)
    assert r.returncode == 0
    assert not Path(r.stdout.strip()).exists()


def test_python_m_autoseg_returns_the_commands_status_and_message(tmp_path):
    missing = tmp_path / "nowhere"
    r = subprocess.run([sys.executable, "-m", "autoseg", "verify", str(missing)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert str(missing) in r.stderr
    ok = subprocess.run([sys.executable, "-m", "autoseg", "--version"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("autoseg ")
