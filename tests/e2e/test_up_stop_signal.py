"""`openlora up` stops on SIGTERM or Ctrl-C from any point of its watch loop. Its signal handler sets the
supervisor's stop flag while the main thread may be inside that flag's own `wait`: a `threading.Event`
there deadlocks (`Event.set` waits for the lock the interrupted `Event.wait` holds), and `up` then
ignores every later signal until it is killed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.e2e.test_up import REPO_ROOT

# The handler sets the flag on every signal of a burst (about 5,000 a second) while the main thread
# waits on it in a loop, as `Supervisor.run` does: every moment of `wait` is interrupted many times.
_BURST = textwrap.dedent(
    """
    import os, signal, sys, time
    from openlora.commands.supervise import Supervisor, StopFlag

    flag = StopFlag()
    handled = 0

    def on_signal(*_):
        global handled
        handled += 1
        flag.set()

    signal.signal(signal.SIGUSR1, on_signal)
    parent = os.getpid()
    sender = os.fork()
    if sender == 0:
        while True:
            try:
                os.kill(parent, signal.SIGUSR1)
            except ProcessLookupError:
                os._exit(0)
            time.sleep(0.0002)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        flag.wait(0.001)
    assert Supervisor([]).run(flag) == 0  # a set flag ends the watch at once
    os.kill(sender, signal.SIGKILL)
    os.waitpid(sender, 0)
    print("handled", handled, flush=True)
    """
)


def test_a_burst_of_stop_signals_never_blocks_the_handler_or_the_watch():
    done = subprocess.run(
        [sys.executable, "-c", _BURST], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    handled = int(done.stdout.split()[-1])
    assert handled > 1000  # the burst did reach the loop many times


def test_a_stop_ends_a_long_wait_at_once():
    script = textwrap.dedent(
        """
        import os, signal, threading
        from openlora.commands.supervise import StopFlag

        flag = StopFlag()
        signal.signal(signal.SIGUSR1, lambda *_: flag.set())
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        assert flag.wait(3600)  # the subprocess's timeout below is far shorter than this wait
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
