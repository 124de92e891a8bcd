"""Decoding worker processes: the sampled frames of many videos at once, through shared memory.

:class:`DecodePool` starts ``n`` workers (``python -m trainers.video.workers CONFIG``) and
one shared-memory ring of ``n * slots`` slots that every worker maps. Commands and replies
are JSON lines on each worker's stdin and stdout (no pickle); frames travel only through
the ring. A worker decodes the videos it is given in order (:class:`SampledFrames`), packs
up to ``chunk`` frames of one size into one of its own free slots and reports the chunk; the
main process copies it out and frees the slot. Each worker owns its slots, so a worker whose
chunks are not being read blocks no other.

A video that cannot be decoded is reported (``error``) and its worker goes on with the next.
Closing the pool closes the workers' stdin (an idle worker exits at once), then terminates
those still running after a grace period; an aborted run terminates them at once. Workers
end with the main process (``PR_SET_PDEATHSIG`` on Linux, else at their next read of stdin)
and ignore SIGINT, which a terminal sends to the whole process group: the main process
shuts them down.
"""

from __future__ import annotations

import json
import mmap
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from kdstore.errors import ConfigError, DataError

from .decode import RESTART, DecodeOptions, SampledFrames, VideoSource, probe_hwaccel

SLOTS = 3  # shared-memory slots per worker: one being filled, two waiting to be read
TASKS = 2  # videos queued per worker, so that it starts the next without a round trip
START_TIMEOUT_S = 120.0
GRACE_S = 2.0  # how long a closing pool waits for busy workers before terminating them


@dataclass
class Chunk:
    """Sampled frames ``start : start + len(times)`` of video ``index``; ``frames`` (a view into
    shared memory) stays valid until ``release()``."""

    index: int
    start: int
    times: np.ndarray  # [n] seconds
    frames: np.ndarray  # [n, h, w, 3] uint8
    source_size: tuple[int, int]  # (height, width) of the frames before scaling
    release: Callable[[], None]


@dataclass
class Restarted:
    """Video ``index`` starts over: its chunks so far are void (see :data:`RESTART`)."""

    index: int


@dataclass
class Finished:
    """Video ``index`` is complete: ``frames`` sampled frames, ``decoded`` frames decoded."""

    index: int
    frames: int
    decoder: str
    decoded: int


@dataclass
class Failed:
    """Video ``index`` could not be decoded (a one-line reason); its chunks so far are void."""

    index: int
    message: str


Event = Chunk | Restarted | Finished | Failed


# ---------------------------------------------------------------------------------------
# Both sides: one video's messages


def _video_messages(index: int, source: VideoSource, options: DecodeOptions, chunk: int, slots) -> Iterator[dict]:
    """The messages of decoding one video: ``chunk``s of frames written into ``slots``, then
    ``done`` or ``error``. ``slots.acquire()`` gives (slot id, [slot_bytes] uint8 view)."""
    frames = SampledFrames(source, options)
    slot, view, start, times, shape, size = None, None, 0, [], None, None

    def chunk_message() -> dict:
        return {"op": "chunk", "index": index, "slot": slot, "start": start, "times": times, "shape": list(shape), "source": list(size)}

    try:
        for item in frames:
            if isinstance(item, str) and item == RESTART:
                if slot is not None:
                    slots.put_back(slot)
                slot, start, times = None, 0, []
                yield {"op": "restart", "index": index}
                continue
            t, image = item
            n = len(times)
            if slot is not None and (n == chunk or image.shape != shape or frames.source_size != size or (n + 1) * image.nbytes > slots.slot_bytes):
                yield chunk_message()
                slot, start, times, n = None, start + n, [], 0
            if slot is None:
                if image.nbytes > slots.slot_bytes:
                    raise DataError(f"{source.path}: a {image.shape[1]}x{image.shape[0]} frame ({image.nbytes / 2**20:.1f} MiB) "
                                    f"does not fit a shared-memory slot ({slots.slot_bytes / 2**20:.1f} MiB); scale frames in the decoder")
                slot, view = slots.acquire()
                shape, size = image.shape, frames.source_size
            view[n * image.nbytes : (n + 1) * image.nbytes].reshape(image.shape)[...] = image
            times.append(t)
        if slot is not None:
            yield chunk_message()
            slot, start = None, start + len(times)
        yield {"op": "done", "index": index, "frames": start, "decoder": frames.decoder, "decoded": frames.decoded}
    except DataError as e:
        if slot is not None:
            slots.put_back(slot)
        yield {"op": "error", "index": index, "message": str(e)}


def _event(msg: dict, slot_view: Callable[[int], np.ndarray], release: Callable[[int], None]) -> Event:
    """The main process's event for a worker's message."""
    op, index = msg["op"], msg["index"]
    if op == "chunk":
        shape, times = tuple(msg["shape"]), np.asarray(msg["times"], dtype=np.float64)
        frames = slot_view(msg["slot"])[: len(times) * int(np.prod(shape))].reshape(len(times), *shape)  # [n, h, w, 3]
        return Chunk(index, msg["start"], times, frames, tuple(msg["source"]), partial(release, msg["slot"]))
    if op == "restart":
        return Restarted(index)
    if op == "done":
        return Finished(index, msg["frames"], msg["decoder"], msg["decoded"])
    if op == "error":
        return Failed(index, msg["message"])
    raise RuntimeError(f"decoding worker: unknown message {msg}")


class _OneSlot:
    """The in-process decoder's single slot: each chunk is read before the next is made."""

    def __init__(self, slot_bytes: int):
        self.slot_bytes = slot_bytes
        self.buffer = np.empty(slot_bytes, np.uint8)

    def acquire(self) -> tuple[int, np.ndarray]:
        return 0, self.buffer

    def put_back(self, slot: int) -> None:
        pass


# ---------------------------------------------------------------------------------------
# Worker side


class _Worker:
    """A worker's slots and inbox: ``acquire`` reads commands until one of its slots is free."""

    def __init__(self, ring: np.ndarray, slot_ids: list[int], slot_bytes: int):
        self.ring, self.slot_bytes = ring, slot_bytes
        self.free = deque(slot_ids)
        self.tasks: deque[tuple[int, VideoSource]] = deque()
        self.inbox = sys.stdin.buffer

    def read(self) -> None:
        """Handle one command; exit on EOF (the pool closed or the main process died)."""
        line = self.inbox.readline()
        if not line:
            raise SystemExit(0)
        cmd = json.loads(line)
        if cmd["op"] == "free":
            self.free.append(cmd["slot"])
        elif cmd["op"] == "video":
            self.tasks.append((cmd["index"], VideoSource(cmd["video"], Path(cmd["path"]), cmd["folder"])))
        else:
            raise RuntimeError(f"unknown command {cmd}")

    def acquire(self) -> tuple[int, np.ndarray]:
        while not self.free:
            self.read()
        slot = self.free.popleft()
        return slot, self.ring[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def put_back(self, slot: int) -> None:
        self.free.appendleft(slot)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when its parent exits (Linux); exit if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def worker_main(config: dict) -> None:
    """A decoding worker: see the module doc; ``config`` comes from :class:`DecodePool`."""
    _die_with_parent(config["parent"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints go to stderr, not into the protocol

    def send(msg: dict) -> None:
        try:
            out.write(json.dumps(msg).encode() + b"\n")
        except OSError:  # the main process is gone
            os._exit(0)

    fd = os.open(config["ring"], os.O_RDWR)
    ring = np.frombuffer(mmap.mmap(fd, config["ring_bytes"]), np.uint8)
    os.close(fd)
    options = DecodeOptions(**config["options"])
    note = probe_hwaccel(options.hwaccel, options.hw_device) if options.hwaccel else None
    if note:
        options = replace(options, hwaccel=None)
    worker = _Worker(ring, config["slots"], config["slot_bytes"])
    send({"op": "ready", "note": note})
    try:
        while True:
            while not worker.tasks:
                worker.read()
            index, source = worker.tasks.popleft()
            for msg in _video_messages(index, source, options, config["chunk"], worker):
                send(msg)
    except Exception as e:  # not a bad video: the run stops, with this reason
        kind = "config" if isinstance(e, ConfigError) else "crash"
        send({"op": "fatal", "kind": kind, "message": f"{type(e).__name__}: {e}" if kind == "crash" else str(e)})
        raise


# ---------------------------------------------------------------------------------------
# Main-process side


class _Ring:
    """A shared-memory file mapped by the main process and every worker (``/dev/shm`` when it
    has room, else the temp folder); unlinked once the workers have mapped it."""

    def __init__(self, size: int):
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        if folder == "/dev/shm":
            st = os.statvfs(folder)
            if st.f_bavail * st.f_frsize < 2 * size:
                folder = tempfile.gettempdir()
        self.path = os.path.join(folder, f"kdstore-frames-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.size = size
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self.array = np.frombuffer(mmap.mmap(fd, size), np.uint8)
        finally:
            os.close(fd)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@dataclass
class _Proc:
    proc: subprocess.Popen
    slots: list[int]
    tasks: deque[int] = field(default_factory=deque)  # video indices given to it, oldest first
    buffer: bytes = b""

    def send(self, msg: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # it died: its stdout's EOF reports that
            pass


class DecodePool:
    """Decode ``sources`` with :class:`SampledFrames` in ``workers`` processes (0: in this
    process) and iterate over the :data:`Event` s, videos interleaved, each video's in order.

    Use it as a context manager, or call :meth:`close`: leaving early (an exception, a
    ``break``) terminates the workers. ``notes`` collects one-line remarks (a hardware
    decoder that could not be used).
    """

    def __init__(self, sources: Sequence[VideoSource], options: DecodeOptions, workers: int, chunk: int,
                 slot_mib: float = 8.0):
        self.sources, self.options, self.workers, self.chunk = list(sources), options, workers, chunk
        self.slot_bytes = int(slot_mib * 2**20)
        self.notes: list[str] = []
        self._procs: list[_Proc] = []
        self._ring: _Ring | None = None

    def __enter__(self) -> DecodePool:
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abort=exc_type is not None)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids."""
        return [p.proc.pid for p in self._procs]

    def __iter__(self) -> Iterator[Event]:
        return self._in_process() if self.workers <= 0 else self._from_workers()

    def _in_process(self) -> Iterator[Event]:
        options = self.options
        if options.hwaccel and (note := probe_hwaccel(options.hwaccel, options.hw_device)):
            self.notes.append(note)
            options = replace(options, hwaccel=None)
        slot = _OneSlot(self.slot_bytes)
        for index, source in enumerate(self.sources):
            for msg in _video_messages(index, source, options, self.chunk, slot):
                yield _event(msg, lambda _: slot.buffer, lambda _: None)

    def start(self) -> None:
        """Start the worker processes now (they import and probe while this process prepares
        the device); iterating waits until they are ready. Iterating starts them if needed."""
        n = min(self.workers, len(self.sources))
        if n <= 0 or self._procs:
            return
        self._ring = _Ring(n * SLOTS * self.slot_bytes)
        config = {"options": asdict(self.options), "ring": self._ring.path, "ring_bytes": self._ring.size,
                  "slot_bytes": self.slot_bytes, "chunk": self.chunk, "parent": os.getpid()}
        root = str(Path(__file__).resolve().parents[2])  # the workers import this package from here
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        for w in range(n):
            slots = list(range(w * SLOTS, (w + 1) * SLOTS))
            cmd = [sys.executable, "-m", "trainers.video.workers", json.dumps({**config, "slots": slots})]
            self._procs.append(_Proc(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env), slots))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for p in self._procs:
            msg = self._next_message(p, deadline)
            if msg is None or msg.get("op") != "ready":
                raise RuntimeError(f"decoding worker {p.proc.pid} did not start (exit code {p.proc.poll()}; its error is above)")
            if msg["note"] and msg["note"] not in self.notes:
                self.notes.append(msg["note"])
        self._ring.unlink()  # every worker has it mapped: nothing is left behind, however this process ends

    def _next_message(self, p: _Proc, deadline: float) -> dict | None:
        """The next message of one worker (startup only); None on EOF or timeout."""
        while b"\n" not in p.buffer:
            sel = selectors.DefaultSelector()
            sel.register(p.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(max(0.0, deadline - time.monotonic()))
            sel.close()
            data = os.read(p.proc.stdout.fileno(), 1 << 16) if ready else b""
            if not data:
                return None
            p.buffer += data
        line, p.buffer = p.buffer.split(b"\n", 1)
        return json.loads(line)

    def _give(self, p: _Proc, pending: deque[int]) -> None:
        while pending and len(p.tasks) < TASKS:
            index = pending.popleft()
            s = self.sources[index]
            p.tasks.append(index)
            p.send({"op": "video", "index": index, "video": s.video, "path": str(s.path), "folder": s.is_folder})

    def _free(self, p: _Proc, slot: int) -> None:
        p.send({"op": "free", "slot": slot})

    def _from_workers(self) -> Iterator[Event]:
        if not self.sources:
            return
        completed = False
        try:
            self.start()
            self._wait_ready()
            ring, sb = self._ring.array, self.slot_bytes
            pending = deque(range(len(self.sources)))
            remaining = len(self.sources)
            sel = selectors.DefaultSelector()
            for p in self._procs:
                sel.register(p.proc.stdout, selectors.EVENT_READ, p)
                self._give(p, pending)
            while remaining:
                if not sel.get_map():
                    raise RuntimeError("every decoding worker died")
                for key, _ in sel.select():
                    p: _Proc = key.data
                    data = os.read(p.proc.stdout.fileno(), 1 << 16)
                    if not data:  # the worker died: its video is bad, the ones queued behind it go to others
                        sel.unregister(p.proc.stdout)
                        code = p.proc.wait()
                        if p.tasks:
                            index = p.tasks.popleft()
                            remaining -= 1
                            pending.extendleft(reversed(p.tasks))
                            p.tasks.clear()
                            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                            yield Failed(index, f"{self.sources[index].path}: the decoding process died ({how})")
                            for q in self._procs:
                                if q.proc.poll() is None:
                                    self._give(q, pending)
                        continue
                    *lines, p.buffer = (p.buffer + data).split(b"\n")
                    for line in lines:
                        msg = json.loads(line)
                        if msg["op"] == "fatal":
                            raise (ConfigError if msg["kind"] == "config" else RuntimeError)(
                                msg["message"] if msg["kind"] == "config" else f"decoding worker {p.proc.pid}: {msg['message']}")
                        if msg["op"] in ("done", "error"):
                            p.tasks.remove(msg["index"])
                            remaining -= 1
                            self._give(p, pending)
                        yield _event(msg, lambda slot: ring[slot * sb : (slot + 1) * sb], partial(self._free, p))
            sel.close()
            completed = True
        finally:
            self.close(abort=not completed)

    def close(self, abort: bool = False) -> None:
        """End the workers: idle ones exit when their stdin closes; with ``abort``, or after
        :data:`GRACE_S`, the rest are terminated, then killed."""
        for p in self._procs:
            try:
                p.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + (0.0 if abort else GRACE_S)
        for p in self._procs:
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.proc.terminate()
        for p in self._procs:
            try:
                p.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
            p.proc.stdout.close()
        self._procs = []
        if self._ring is not None:
            self._ring.unlink()


if __name__ == "__main__":
    worker_main(json.loads(sys.argv[1]))
