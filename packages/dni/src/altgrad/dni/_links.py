"""The messages between two neighbouring pipeline stages: one link per neighbour, two kinds of link.

A message is a header of ``HEADER`` int64 (status, batch index, dtype code, ndim, up to ``MAX_DIMS`` sizes)
and, when the status is 0, the tensor's bytes. A non-zero status is a *failure* header (``1 + the stage that
failed``), which carries no tensor.

* :class:`SocketLink`: neighbours on one host, tensors on the CPU. A Unix stream socket, non-blocking: a send
  goes to the kernel at once if it fits and waits in a queue otherwise (a copy), and every wait of the stage
  (for a message, or for room in the queue) moves both directions, so two stages can never block each other;
  what is still queued when a step ends goes on in a short-lived helper thread. About 40 µs a message of 64 KiB
  one way, against about 150 µs through gloo from Python. A peer whose process dies closes its socket, which the
  other side reads as the end of the stream after the messages sent before.
* :class:`GroupLink`: the process group's point-to-point calls (gloo, NCCL): any host, any device. A receiver
  posts a buffer of its current capacity; a message larger than that is announced first by a ``GROW`` header.

Both raise :class:`ConnectionError` when the peer is gone; the pipeline turns it into its own error.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import itertools
import os
import select
import socket
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

HEADER = 10  # int64: status, batch index, dtype code, ndim, up to 6 sizes
MAX_DIMS = HEADER - 4
HEADER_BYTES = 8 * HEADER
GROW = -1  # GroupLink: status of a header announcing a larger next message
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_PACK = struct.Struct(f"={HEADER}q")
# s a receiver polls before it sleeps (on a VM, waking a sleeping process costs its sender ~50 µs)
SPIN = 1e-3
SOCKET_BUFFER = 8 << 20  # bytes asked for the kernel's send buffer (it caps them at net.core.wmem_max)
_HELPER_POLL = 5e-3  # s the helper thread holds the link per wait
_EXIT_FLUSH = 30.0  # s a link's queued bytes get at interpreter exit
_LIVE: weakref.WeakSet[SocketLink] = weakref.WeakSet()


@atexit.register
def _finish_links() -> None:
    for link in list(_LIVE):
        link._finish(_EXIT_FLUSH)


Message = tuple[int, int, Tensor | None]  # status, batch, tensor (None for a failure header)


def header_fields(status: int, batch: int, tensor: Tensor | None, stage: int) -> list[int]:
    """The header's ints; ``stage`` names the sender in the error for a tensor no header can describe."""
    if tensor is None:
        return [status, batch] + [0] * (HEADER - 2)
    if tensor.dim() > MAX_DIMS or tensor.dtype not in DTYPES:
        raise ValueError(
            f"stage {stage} output must be a floating tensor of at most {MAX_DIMS} dims, got "
            f"{tensor.dtype} of shape {tuple(tensor.shape)}"
        )
    fields = [status, batch, DTYPES.index(tensor.dtype), tensor.dim(), *tensor.shape]
    return fields + [0] * (HEADER - len(fields))


def _bytes(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable memoryview that keeps the tensor alive.

    Through ctypes, not ``Tensor.numpy()``: torch does not install NumPy, and NumPy has no bfloat16.
    """
    buffer = (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
    buffer._tensor = tensor  # type: ignore[attr-defined]  # the memoryview keeps the buffer, the buffer this
    return memoryview(buffer).cast("B")


class SocketLink:
    """A link over a connected Unix stream socket (same host, CPU tensors).

    The stage's own thread moves the bytes, inside its calls. What is still queued when the stage leaves the
    pipeline's code (:meth:`release`, at the end of a step) is handed to the kernel by a helper thread, which
    gives the link back as soon as the stage calls again: a stage that blocks elsewhere between steps (a
    collective, a barrier, a checkpoint) never holds back a peer that waits for its message.

    Args:
        sock: The connected socket (made non-blocking here).
        timeout: Seconds a wait for the peer may last before :class:`TimeoutError` (the pipeline passes the
            store's timeout: a peer that is alive but never answers).
        max_queued: Messages a send may leave queued before it waits for the peer to take some.
    """

    def __init__(self, sock: socket.socket, timeout: float, max_queued: int) -> None:
        _LIVE.add(self)
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self.sock = sock
        self.timeout = timeout
        self.max_queued = max_queued
        self._out: deque[list[memoryview]] = deque()  # queued messages: their unsent parts, in order
        self._in: deque[Message] = deque()  # complete messages not yet taken
        self._head = bytearray(HEADER_BYTES)
        self._part = memoryview(self._head)  # where the next bytes read go: the header, or a tensor's bytes
        self._got = 0  # bytes of _part read
        self._tensor: Tensor | None = None  # the tensor whose bytes _part is
        self._eof: BaseException | None = None  # why nothing more can be read
        self._broken: BaseException | None = None  # why nothing more can be written
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._flags = getattr(socket, "MSG_NOSIGNAL", 0)
        self._lock = threading.Lock()  # the stage's thread or the helper moves bytes, never both
        self._wanted = False  # the stage's thread waits for the lock: the helper gives it back
        # a helper thread runs: set by release(), cleared by the helper holding the lock
        self._helping = False
        self._helper_error: BaseException | None = None
        self._closing = False

    @contextlib.contextmanager
    def _owned(self) -> Any:
        """The link for the stage's thread (the helper, if it is moving bytes, stops within ``_HELPER_POLL``)."""
        self._wanted = True
        with self._lock:
            self._wanted = False
            if self._helper_error is not None:
                error, self._helper_error = self._helper_error, None
                raise error
            yield

    def release(self) -> None:
        """The stage leaves the pipeline's code: a helper thread hands what is still queued to the kernel."""
        if self._out and self._broken is None and not self._helping:
            self._helping = True
            threading.Thread(target=self._help, name="altgrad-dni-link", daemon=True).start()

    def _help(self) -> None:
        """Move bytes until nothing is queued, or the stage's thread wants the link back (every decision is
        taken holding the link, so a release() after it always finds either this thread going on or none)."""
        while True:
            with self._lock:
                if self._closing or self._wanted or not self._out or self._broken is not None:
                    self._helping = False
                    return
                try:
                    self._pump(block=True, deadline=time.monotonic() + _HELPER_POLL)
                except BaseException as exc:  # raised to the stage at its next call
                    self._helper_error = exc
                    self._helping = False
                    return

    @property
    def pending(self) -> int:
        """Messages sent but not yet handed to the kernel."""
        return len(self._out)

    def send(self, status: int, batch: int, tensor: Tensor | None, stage: int) -> None:
        """Queue one message and hand what fits to the kernel; wait only while more than ``max_queued`` wait."""
        parts = [memoryview(_PACK.pack(*header_fields(status, batch, tensor, stage)))]
        if tensor is not None and status == 0 and tensor.numel():
            parts.append(_bytes(tensor.detach().contiguous()))
        with self._owned():
            if self._broken is not None:
                raise ConnectionError(f"the peer closed its connection ({self._broken})")
            self._out.append(parts)
            self._pump(block=False)
            if self._out and self._out[-1] is parts:  # the kernel did not take it all: the rest is copied, so
                parts[:] = [memoryview(bytes(p)) for p in parts]  # the caller may change its tensor at once
            while len(self._out) > self.max_queued:
                self._pump(block=True)

    def recv(self) -> Message:
        """The next message from the peer (waits for it: polling for up to ``SPIN`` s, then asleep)."""
        with self._owned():
            return self._recv()

    def _recv(self) -> Message:
        if not self._in and self._eof is None:
            end = time.perf_counter() + SPIN
            self._pump(block=False)
            while not self._in and self._eof is None and time.perf_counter() < end:
                os.sched_yield()
                self._pump(block=False)
        while not self._in:
            if self._eof is not None:
                raise ConnectionError(f"the peer closed its connection ({self._eof})")
            self._pump(block=True)
        return self._in.popleft()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is in the kernel (``timeout``: give up after that long, quietly)."""
        with self._owned():
            self._flush(timeout)

    def _flush(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._out:
            if not self._pump(block=True, deadline=deadline):
                return
        if self._broken is not None and timeout is None:
            raise ConnectionError(f"the peer closed its connection ({self._broken})")

    def post_failure(self, status: int) -> None:
        """Queue a failure header after what is queued (without waiting; :meth:`flush` with a timeout then)."""
        with self._owned():
            if self._broken is None:
                self._out.append([memoryview(_PACK.pack(*header_fields(status, -1, None, -1)))])
                self._pump(block=False)

    def failure(self, timeout: float) -> int | None:
        """The status of a failure header the peer sent before its connection ended (read for up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._owned():
            with contextlib.suppress(OSError):  # a broken link: what could be read is read
                while self._eof is None and self._pump(block=True, deadline=deadline):
                    pass
            return next((m[0] for m in self._in if m[0] != 0), None)

    def close(self) -> None:
        """Close the socket: the peer reads the end of the stream after what was handed to the kernel."""
        self._closing = True
        with self._lock, contextlib.suppress(OSError):
            self.sock.close()

    def _finish(self, timeout: float) -> None:
        """At interpreter exit: give the peer ``timeout`` s to take what is still queued (the helper thread is a
        daemon and dies with the interpreter; gloo's sends also complete after a stage returns)."""
        if self._out and not self._closing:
            with contextlib.suppress(Exception):
                self.flush(timeout)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.sock.close()

    # ------------------------------------------------------------------ the one loop that moves bytes
    def _pump(self, block: bool, deadline: float | None = None) -> bool:
        """Write what the kernel takes, read what has arrived; with ``block``, first wait until one can go on.

        Returns ``False`` only when ``deadline`` passed first; without one, a wait longer than ``timeout``
        raises :class:`TimeoutError`.
        """
        if block:
            limit = time.monotonic() + self.timeout if deadline is None else deadline
            events = (0 if self._eof is not None else select.POLLIN) | (select.POLLOUT if self._out else 0)
            if not events:  # nothing can move any more
                raise ConnectionError(f"the peer closed its connection ({self._eof or self._broken})")
            self._poll.modify(self.sock, events)
            while not self._poll.poll(max(0.0, limit - time.monotonic()) * 1000):
                if time.monotonic() >= limit:
                    if deadline is not None:
                        return False
                    raise TimeoutError(f"no message moved for {self.timeout:g} s")
        if self._out:
            self._write()
        if self._eof is None:
            self._read()
        return True

    def _write(self) -> None:
        """Hand the kernel what it takes of the queued messages, in one call (a header and its tensor together:
        the peer wakes once per message, not once per part)."""
        out = self._out
        while out:
            try:
                sent = self.sock.sendmsg(
                    [p for parts in itertools.islice(out, 16) for p in parts], (), self._flags
                )
            except BlockingIOError:
                return
            except OSError as exc:  # EPIPE, ECONNRESET: the peer is gone (what it sent first is still read)
                self._broken = exc
                out.clear()
                return
            while sent:
                parts = out[0]
                if sent < len(parts[0]):  # the kernel is full: the rest of this part waits
                    parts[0] = parts[0][sent:]
                    return
                sent -= len(parts.pop(0))
                if not parts:
                    out.popleft()

    def _read(self) -> None:
        while True:
            try:
                n = self.sock.recv_into(self._part[self._got :])
            except BlockingIOError:
                return
            except OSError as exc:
                self._eof = exc
                return
            if n == 0:
                inside = self._got or self._tensor is not None
                self._eof = EOFError("end of stream inside a message" if inside else "end of stream")
                return
            self._got += n
            if self._got < len(self._part):
                continue
            self._got = 0
            if self._tensor is not None:  # a tensor's bytes are complete
                self._in.append((0, _PACK.unpack(self._head)[1], self._tensor))
                self._tensor, self._part = None, memoryview(self._head)
            else:
                self._start_message()

    def _start_message(self) -> None:
        fields = _PACK.unpack(self._head)
        if fields[0] != 0:  # a failure header: no payload
            self._in.append((fields[0], fields[1], None))
            return
        if not 0 <= fields[2] < len(DTYPES) or not 0 <= fields[3] <= MAX_DIMS:
            raise ConnectionError(f"a corrupt message header from the peer: {list(fields)}")
        tensor = torch.empty(fields[4 : 4 + fields[3]], dtype=DTYPES[fields[2]])
        if tensor.numel() == 0:
            self._in.append((0, fields[1], tensor))
            return
        self._tensor = tensor
        self._part = _bytes(tensor)


class GroupLink:
    """A link through the process group's ``isend`` / ``irecv`` (gloo, NCCL; any host and device).

    Every message is one buffer of bytes, the header then the tensor; the receiver posts a buffer of its current
    capacity, so a larger message is announced first by a ``GROW`` header.
    """

    def __init__(
        self, peer: int, group: dist.ProcessGroup | None, device: torch.device, max_queued: int
    ) -> None:
        self.peer, self.group, self.device, self.max_queued = peer, group, device, max_queued
        self._sends: deque[tuple[Any, Tensor]] = deque()  # (work, message kept alive until sent)
        self._capacity_out = HEADER_BYTES  # bytes the peer can take in one message
        self._capacity_in = HEADER_BYTES

    @property
    def pending(self) -> int:
        return len(self._sends)

    def _header(self, fields: list[int]) -> Tensor:
        # one tensor from a list: a handful of element writes would each be a torch op (~50 µs per message)
        return torch.tensor(fields, dtype=torch.int64).view(torch.uint8).to(self.device)

    def _isend(self, message: Tensor) -> None:
        try:
            work = _work(dist.isend(message, self.peer, group=self.group))
        except RuntimeError as exc:
            raise ConnectionError(str(exc)) from exc
        self._sends.append((work, message))

    def send(self, status: int, batch: int, tensor: Tensor | None, stage: int) -> None:
        head = self._header(header_fields(status, batch, tensor, stage))
        if tensor is None or status != 0:
            self._isend(head)
            return
        flat = tensor.detach().reshape(-1)
        if flat.numel() and flat.stride(0) != 1:  # one element keeps any stride, which no byte view takes
            flat = torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat)
        message = torch.cat([head, flat.view(torch.uint8)])
        if message.numel() > self._capacity_out:
            fields = [GROW, batch, message.numel()] + [0] * (HEADER - 3)
            self._isend(self._header(fields))  # the receiver enlarges its buffer first
            self._capacity_out = message.numel()
        self._isend(message)
        while len(self._sends) > self.max_queued:
            self._wait_one()

    def _wait_one(self, timeout: float | None = None) -> None:
        work, _ = self._sends.popleft()
        try:
            if timeout is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=max(timeout, 1e-3)))  # 0 would mean no timeout
        except RuntimeError as exc:
            raise ConnectionError(str(exc)) from exc

    def recv(self) -> Message:
        while True:
            buf = torch.empty(self._capacity_in, dtype=torch.uint8, device=self.device)
            try:
                _work(dist.irecv(buf, self.peer, group=self.group)).wait()
            except RuntimeError as exc:
                raise ConnectionError(str(exc)) from exc
            # the header as Python ints in one op (indexing a tensor element by element is an op per field)
            head = buf[:HEADER_BYTES].view(torch.int64).tolist()
            if head[0] != GROW:
                break
            self._capacity_in = head[2]
        if head[0] != 0:
            return head[0], head[1], None
        dtype, shape = DTYPES[head[2]], head[4 : 4 + head[3]]
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        return 0, head[1], buf[HEADER_BYTES : HEADER_BYTES + nbytes].view(dtype).view(shape)

    def flush(self, timeout: float | None = None) -> None:
        while self._sends:
            self._wait_one(timeout)

    def post_failure(self, status: int) -> None:
        """Post a failure header (without waiting; :meth:`flush` with a timeout then)."""
        self._isend(self._header(header_fields(status, -1, None, -1)))

    def failure(self, timeout: float) -> int | None:
        """A failure header cannot be read past a broken connection here: ``None``."""
        return None

    def release(self) -> None:
        """Nothing to do: the process group's own threads complete the sends."""

    def close(self) -> None:
        pass


def _work(work: Any) -> Any:
    """The work handle of a point-to-point call (``None`` only for ranks outside the group, never here)."""
    if work is None:
        raise RuntimeError(
            "point-to-point call returned no work handle: this rank is not in the process group"
        )
    return work


def _address() -> str:
    token = f"altgrad-dni-{os.getpid()}-{os.urandom(8).hex()}"
    if sys.platform == "linux":
        return "\0" + token  # abstract namespace: no file to leave behind
    return os.path.join(tempfile.gettempdir(), token + ".sock")


def connect_socket(
    store: Any, key: str, stage: int, peer_stage: int, wait: float, abort: str | None = None
) -> socket.socket | None:
    """A Unix socket to ``peer_stage``'s process when it runs on this host, else ``None`` (both sides agree).

    The higher stage listens and publishes its address in the store under ``key``; the lower one tries to
    connect and publishes whether it could (a peer on another host, or in another network namespace, cannot).
    The connecting side first sends a random token, which it publishes too: the listener accepts only the
    connection that presents it (an abstract address is visible to every process of the host).
    Each side waits at most ``wait`` s for the other (:class:`TimeoutError`), and stops waiting with
    :class:`ConnectionError` as soon as the store holds ``abort`` (a stage failed: the peer may never come).
    """
    addr_key, ok_key = f"{key}/{min(stage, peer_stage)}/address", f"{key}/{min(stage, peer_stage)}/connected"
    if stage > peer_stage:
        return _listen(store, addr_key, ok_key, wait, abort)
    _wait_key(store, addr_key, wait, abort)
    address = store.get(addr_key).decode()
    token = os.urandom(16)
    # an address on this host answers at once: the dial does not need the whole wait
    conn = _dial(address, min(wait, 60.0), token) if address else None
    store.set(ok_key, "1" + token.hex() if conn is not None else "0")
    return conn


def _wait_key(store: Any, key: str, wait: float, abort: str | None) -> None:
    deadline, delay = time.monotonic() + wait, 1e-4
    while not store.check([key]):
        if abort is not None and store.check([abort]):
            raise ConnectionError("a stage failed before this link was connected")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the neighbouring stage did not connect within {wait:g} s")
        time.sleep(delay)
        delay = min(2 * delay, 0.05)


def _listen(store: Any, addr_key: str, ok_key: str, wait: float, abort: str | None) -> socket.socket | None:
    """Listen, publish the address ("" if none), and accept once the peer says it connected."""
    address = _address()
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except (AttributeError, OSError):  # no Unix sockets here
        store.set(addr_key, "")
        _wait_key(store, ok_key, wait, abort)
        return None
    try:
        try:
            listener.bind(address)
            listener.listen(8)
        except OSError:
            address = ""
        store.set(addr_key, address)
        _wait_key(store, ok_key, wait, abort)
        answer = store.get(ok_key).decode()
        if not answer.startswith("1"):
            return None
        return _accept(listener, bytes.fromhex(answer[1:]), wait)
    finally:
        listener.close()
        if address and not address.startswith("\0"):
            with contextlib.suppress(OSError):
                os.unlink(address)


def _accept(listener: socket.socket, token: bytes, wait: float) -> socket.socket:
    """The first connection that presents ``token`` (others are closed)."""
    deadline = time.monotonic() + wait
    while True:
        listener.settimeout(max(1e-3, deadline - time.monotonic()))
        conn = listener.accept()[0]  # socket.timeout (a TimeoutError) once the deadline passes
        try:
            conn.settimeout(max(1e-3, min(5.0, deadline - time.monotonic())))
            got = b""
            while len(got) < len(token):
                chunk = conn.recv(len(token) - len(got))
                if not chunk:
                    break
                got += chunk
        except OSError:
            got = b""
        if got == token:
            return conn
        conn.close()


def _dial(address: str, wait: float, token: bytes) -> socket.socket | None:
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except (AttributeError, OSError):
        return None
    try:
        conn.settimeout(wait)
        conn.connect(address)
        conn.sendall(token)
    except OSError:
        conn.close()
        return None
    return conn
