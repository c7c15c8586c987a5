"""A watchdog on collective progress: a dead or stalled rank ends the job, it never hangs it.

Why: when a rank is SIGKILLed or freezes, the others block in their next collective for ever.
MPICH's `mpiexec` kills the job when a rank dies, but `srun` does not by default, and no
launcher notices a rank that is alive but stuck (a deadlocked data loader, a dead NFS mount).

How: the main thread wraps every collective it waits in with `watch(label)`, which counts
collectives entered and notes when the current one began. A thread on every rank exchanges a
tiny heartbeat every `interval_s` on a communicator of its own, in a star around rank 0:

    rank r != 0 --(collectives entered, waiting?)--> rank 0
    rank 0 --(its table: every rank's count, waiting flag, heartbeat age)--> every rank

So rank 0 sees every rank, and every rank sees rank 0 and rank 0's view of the rest (one
interval late). When a rank has waited in one collective for longer than `timeout_s`, its
thread names the ranks that did not arrive: those whose count is lower (alive but busy
elsewhere, or frozen) and those that went silent (dead, or frozen outside Python), prints
that, and calls `MPI_Abort` with exit code 4. Non-root ranks give rank 0 a few intervals to
speak first, so one diagnosis is usually printed, not N.

Cost: one small message per rank per interval (about timeout_s / 10, at most 5 s) and a
few microseconds per collective in the main thread. Everything a rank waits for counts,
including rank 0 writing a checkpoint while the others wait for the verdict: set
`comm.timeout_s` above the longest such wait.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mpi4py import MPI

EXIT_WATCHDOG = 4

_BEAT, _TABLE, _BYE = 11, 12, 13  # message tags on the watchdog's own communicator


@dataclass(frozen=True)
class PeerView:
    """What is known of one rank: collectives entered, whether it is waiting in the last one,
    and how long ago it was last heard from (None: never)."""

    entered: int
    waiting: bool
    age_s: float | None


def diagnose(rank: int, entered: int, label: str, waited_s: float, timeout_s: float,
             peers: dict[int, PeerView], silent_after_s: float) -> tuple[list[int], str]:
    """The ranks that kept rank `rank` waiting in its collective #`entered`, and a report.

    A rank is named when it has not entered that collective yet (its count is lower) or when
    it has gone silent (no heartbeat for `silent_after_s`): it may have died inside it.
    """
    missing: list[int] = []
    lines: list[str] = []
    for peer in sorted(peers):
        view = peers[peer]
        silent = view.age_s is None or view.age_s > silent_after_s
        behind = view.entered < entered
        if not (silent or behind):
            continue
        missing.append(peer)
        heard = ("never sent a heartbeat" if view.age_s is None
                 else f"last heartbeat {view.age_s:.1f} s ago")
        where = (f"had entered {view.entered} collective(s)"
                 + (", waiting in the last one" if view.waiting else ", running outside MPI"))
        if silent:
            lines.append(f"  rank {peer}: dead, or frozen: {heard} (it {where} then)")
        else:
            lines.append(f"  rank {peer}: alive ({heard}) but has not arrived: it {where}")
    head = (f"mpiml: watchdog: rank {rank} waited {waited_s:.1f} s (comm.timeout_s = "
            f"{timeout_s:g}) in collective #{entered} ({label}); ")
    if missing:
        head += f"rank(s) {', '.join(map(str, missing))} did not arrive:\n"
    else:
        head += ("every rank reached it but it did not complete: a network or MPI failure, "
                 "or a rank that died inside it\n")
    hint = (f"mpiml: aborting the whole job (exit {EXIT_WATCHDOG}). HINT: if the job is only "
            "slow (a large checkpoint, a slow file system), raise comm.timeout_s\n")
    return missing, head + "".join(line + "\n" for line in lines) + hint


# MPI_Abort makes MPICH's mpiexec kill every process at once; output still in its pipes is
# lost with them (seen here: exit 4 with an empty stderr). A pause lets it reach the user.
FORWARD_GRACE_S = 1.0


def _abort_job(message: str) -> None:
    sys.stderr.write(message)
    sys.stderr.flush()
    time.sleep(FORWARD_GRACE_S)
    MPI.COMM_WORLD.Abort(EXIT_WATCHDOG)


class Watchdog:
    """Heartbeats and a timeout on every `watch`ed collective. Close it (or use `with`)."""

    def __init__(self, comm: MPI.Comm, timeout_s: float, interval_s: float | None = None,
                 on_timeout: Callable[[str], None] = _abort_job) -> None:
        self.comm: MPI.Comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout_s = float(timeout_s)
        self.interval_s = interval_s or min(5.0, max(0.1, self.timeout_s / 10))
        self.silent_after_s = 3 * self.interval_s + 0.5
        self.on_timeout = on_timeout
        self._entered = 0
        self._label = ""
        self._since: float | None = None  # when the main thread began waiting, or None
        self._started = time.monotonic()
        self._heard: dict[int, tuple[float, int, bool]] = {}  # root: rank -> (when, count, waiting)
        self._table: tuple[float, dict[int, PeerView]] | None = None  # others: root's, received
        self._pending: list[MPI.Request] = []
        self._fired = False
        self._byes: set[int] = set()  # ranks that said goodbye (they send nothing after it)
        self._stop = threading.Event()
        self._drained = False
        self._say_goodbye = True
        self._thread = threading.Thread(target=self._run, name="mpiml-watchdog", daemon=True)
        self._thread.start()

    # -- the main thread's side ---------------------------------------------------------------
    @contextmanager
    def watch(self, label: str) -> Iterator[None]:
        """Wrap one collective: the watchdog fires if it has not returned in `timeout_s`."""
        self._entered += 1
        self._label = label
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._receive()
                self._send_beat()
                self._check(time.monotonic())
            if self._say_goodbye:
                self._goodbye()
        except Exception as err:  # noqa: BLE001 - never die silently: the job would be unguarded
            sys.stderr.write(f"mpiml: watchdog on rank {self.rank} stopped: "
                             f"{type(err).__name__}: {err}\n")

    def _isend(self, obj: object, dest: int, tag: int) -> None:
        self._pending = [r for r in self._pending if not r.Test()]
        if len(self._pending) < 4 * self.size:  # a dead peer never takes them: do not pile up
            self._pending.append(self.comm.isend(obj, dest=dest, tag=tag))

    def _receive(self) -> None:
        """Take every message that has arrived (a goodbye may come before our own close)."""
        status = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            source, tag = status.Get_source(), status.Get_tag()
            msg = self.comm.recv(source=source, tag=tag)
            now = time.monotonic()
            if tag == _BEAT:
                self._heard[source] = (now, msg[0], msg[1])
            elif tag == _TABLE:
                self._table = (now, {r: PeerView(*v) for r, v in msg.items()})
            elif tag == _BYE:
                self._byes.add(source)

    def _send_beat(self) -> None:
        if self.rank != 0:
            self._isend((self._entered, self._since is not None), 0, _BEAT)
            return
        table = {0: (self._entered, self._since is not None, 0.0)}
        now = time.monotonic()
        for r, (when, entered, waiting) in self._heard.items():
            table[r] = (entered, waiting, now - when)
        for r in range(1, self.size):
            self._isend(table, r, _TABLE)

    def _peers(self, now: float) -> dict[int, PeerView]:
        """Every other rank as this rank knows it now."""
        never = PeerView(0, False, None)
        if self.rank == 0:
            return {r: (PeerView(self._heard[r][1], self._heard[r][2], now - self._heard[r][0])
                        if r in self._heard else never) for r in range(1, self.size)}
        if self._table is None:
            return {r: never for r in range(self.size) if r != self.rank}
        received, table = self._table
        late = now - received
        peers = {}
        for r in range(self.size):
            if r == self.rank:
                continue
            view = table.get(r, never)
            age = None if view.age_s is None else view.age_s + late
            peers[r] = PeerView(view.entered, view.waiting, age)
        return peers

    def _check(self, now: float) -> None:
        since = self._since
        if since is None or self._fired:
            return
        waited = now - since
        limit = self.timeout_s
        root_alive = self._table is not None and now - self._table[0] < self.silent_after_s
        if self.rank != 0 and root_alive:
            limit += 3 * self.interval_s  # rank 0 sees everyone: let it speak first
        if waited <= limit:
            return
        self._fired = True
        _, report = diagnose(self.rank, self._entered, self._label, waited, self.timeout_s,
                             self._peers(now), self.silent_after_s)
        self.on_timeout(report)

    def _goodbye(self) -> None:
        """Say goodbye and take every message still addressed to us, so MPI ends clean.

        Messages from one sender on one communicator arrive in order: once a peer's goodbye
        is here, nothing of it is left in flight.
        """
        peers = [0] if self.rank != 0 else list(range(1, self.size))
        for r in peers:
            self._isend(None, r, _BYE)
        deadline = time.monotonic() + max(self.timeout_s, 5.0)
        while not self._byes.issuperset(peers) and time.monotonic() < deadline:
            self._receive()
            time.sleep(0.005)
        while self._pending and time.monotonic() < deadline:
            self._pending = [r for r in self._pending if not r.Test()]
            time.sleep(0.005)
        self._drained = self._byes.issuperset(peers) and not self._pending
        if not self._drained:
            sys.stderr.write(f"mpiml: watchdog on rank {self.rank}: no goodbye from rank(s) "
                             f"{sorted(set(peers) - self._byes)}; leaving its messages\n")

    # -- life cycle -----------------------------------------------------------------------------
    def close(self, goodbye: bool = True) -> None:
        """Stop the thread. With `goodbye` every rank must call it (they exchange goodbyes);
        without, nothing waits for the others (this rank is failing alone)."""
        if self._thread.is_alive():
            self._say_goodbye = goodbye
            self._stop.set()
            self._thread.join(None if goodbye else self.interval_s + 1.0)
        if self._drained and self.comm != MPI.COMM_NULL and not MPI.Is_finalized():
            self.comm.Free()  # left alone if a peer never said goodbye: freeing could hang
        self.comm = MPI.COMM_NULL

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
