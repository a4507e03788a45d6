"""The pipeline's same-host link (a Unix socket) on its own: framing, views, both directions at once, the end of a
peer, timeouts, and how two sides agree on a socket through a store. (The pipeline over it: test_pipeline.)"""

import contextlib
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from altgrad.dni import _links
from altgrad.dni._links import DTYPES, SocketLink, connect_socket

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "AF_UNIX") or sys.platform == "win32", reason="Unix sockets"
)


def pair(timeout: float = 10.0, max_queued: int = 8) -> tuple[SocketLink, SocketLink]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return SocketLink(a, timeout, max_queued), SocketLink(b, timeout, max_queued)


VIEWS = {
    "plain": lambda t: t,
    "transposed": lambda t: t.mT if t.dim() >= 2 else t,
    "expanded": lambda t: t[..., :1].expand_as(t) if t.dim() and t.shape[-1] else t,
    "flipped": lambda t: t.flip(0) if t.dim() else t,
    "negated": lambda t: t.neg(),
    "strided": lambda t: t[::2] if t.dim() else t,
}


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=6),
    dtype=st.sampled_from(DTYPES),
    view=st.sampled_from(sorted(VIEWS)),
    batch=st.integers(-(2**62), 2**62),
    special=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]),
)
def test_a_message_arrives_as_sent_for_any_shape_dtype_and_view(shape, dtype, view, batch, special):
    a, b = pair()
    base = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
    if special is not None and base.numel():
        base.view(-1)[0] = special
    sent = VIEWS[view](base)
    a.send(0, batch, sent, stage=0)
    status, got_batch, got = b.recv()
    assert (status, got_batch) == (0, batch)
    assert got.dtype == sent.dtype
    assert got.shape == sent.shape
    assert got.is_contiguous()
    if sent.numel():
        raw = [torch.empty(t.shape, dtype=t.dtype).copy_(t).view(-1).view(torch.uint8) for t in (got, sent)]
        assert torch.equal(*raw)  # exact: the bytes are copied, NaN included (compared as bytes)
    a.close()
    b.close()


def test_two_sides_sending_more_than_the_kernel_holds_do_not_block_each_other():
    """Each side sends 12 messages of 1 MiB before it reads one (a blocking socket would deadlock: each kernel
    buffer holds far less); with at most 2 queued, every wait of a sender reads what the other sent."""
    a, b = pair(timeout=20.0, max_queued=2)
    n, size = 12, 1 << 18  # float32: 1 MiB
    out: dict[str, list] = {}

    def side(name: str, link: SocketLink, offset: float) -> None:
        try:
            for i in range(n):
                link.send(0, i, torch.full((size,), offset + i), stage=0)
            out[name] = [link.recv() for _ in range(n)]
            link.flush()
        except BaseException as exc:  # surfaced below
            out[name] = [exc]

    threads = [
        threading.Thread(target=side, args=("a", a, 0.0)),
        threading.Thread(target=side, args=("b", b, 100.0)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "the two sides blocked each other"
    for name, offset in (("a", 100.0), ("b", 0.0)):  # a receives b's messages and the other way round
        got = out[name]
        assert [m[:2] for m in got] == [(0, i) for i in range(n)], got[:1]
        for i, (_, _, tensor) in enumerate(got):
            assert tensor.shape == (size,)
            assert bool((tensor == offset + i).all())  # exact: small integers in float32, copied
    assert a.pending == 0
    assert b.pending == 0


def test_a_failure_header_sent_before_the_end_is_read_and_then_the_end():
    a, b = pair()
    a.send(0, 7, torch.ones(3), stage=0)
    a.post_failure(2)
    a.flush(timeout=1.0)
    a.close()
    assert b.recv()[:2] == (0, 7)
    assert b.recv() == (2, -1, None)
    with pytest.raises(ConnectionError, match=r"closed its connection .*end of stream"):
        b.recv()


def test_the_failure_header_is_found_behind_a_broken_send():
    """The peer failed, sent its failure header and exited: the send that finds the connection broken raises,
    and the header it sent first is still there to name the failure."""
    a, b = pair()
    b.post_failure(4)
    b.flush(timeout=1.0)
    b.close()

    def send_until_refused() -> None:
        for _ in range(100):  # the first send may still reach the kernel; a later one finds the peer gone
            a.send(0, 0, torch.ones(1 << 16), stage=0)

    with pytest.raises(ConnectionError, match="closed its connection"):
        send_until_refused()
    assert a.failure(timeout=1.0) == 4  # status 4: stage 3 failed


def test_a_peer_gone_inside_a_message_is_an_error_not_a_short_tensor():
    a_sock, b_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b = SocketLink(b_sock, 10.0, 8)
    head = _links._PACK.pack(*_links.header_fields(0, 1, torch.ones(4), 0))
    a_sock.sendall(head + bytes(8))  # 8 of the 16 bytes announced
    a_sock.close()
    with pytest.raises(ConnectionError, match="end of stream inside a message"):
        b.recv()
    assert b.failure(timeout=0.1) is None


def test_a_silent_peer_times_out_and_a_flush_with_a_deadline_gives_up_quietly():
    a, _b = pair(timeout=0.2, max_queued=100)
    with pytest.raises(TimeoutError, match=r"no message moved for 0\.2 s"):
        a.recv()
    for i in range(40):  # 40 MiB: far more than the kernel takes while b reads nothing
        a.send(0, i, torch.zeros(1 << 18), stage=0)
    assert a.pending > 0
    a.flush(timeout=0.1)  # gives up, no exception
    assert a.pending > 0


@pytest.mark.parametrize(
    ("tensor", "text"),
    [
        (torch.zeros(1, 1, 1, 1, 1, 1, 1), "at most 6 dims"),
        (torch.zeros(3, dtype=torch.int64), "torch.int64"),
    ],
)
def test_a_tensor_no_header_can_describe_is_refused_naming_the_stage(tensor, text):
    a, _b = pair()
    with pytest.raises(ValueError, match=f"stage 3 output must be a floating tensor.*{text}"):
        a.send(0, 0, tensor, stage=3)
    assert a.pending == 0  # nothing half-sent


def _agree(monkeypatch, dial_fails: bool) -> list:
    store = dist.HashStore()
    if dial_fails:  # a peer on another host (or network namespace) cannot connect to the listener's address
        monkeypatch.setattr(_links, "_dial", lambda address, wait, token: None)
    got: list = [None, None]

    def side(stage: int) -> None:
        got[stage] = connect_socket(store, "k", stage, 1 - stage, wait=10.0)

    threads = [threading.Thread(target=side, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return got


def test_two_stages_on_one_host_agree_on_a_connected_socket(monkeypatch):
    low, high = _agree(monkeypatch, dial_fails=False)
    assert low is not None
    assert high is not None
    a, b = SocketLink(low, 5.0, 4), SocketLink(high, 5.0, 4)
    b.send(0, 1, torch.arange(3.0), stage=1)
    assert a.recv()[1] == 1


def test_when_one_side_cannot_connect_both_fall_back(monkeypatch):
    assert _agree(monkeypatch, dial_fails=True) == [None, None]


def test_a_stage_blocked_elsewhere_after_its_step_does_not_hold_back_its_peer():
    """Stage a ends its step with most of a message still queued (more than the kernel takes) and blocks
    elsewhere (a collective, say: here an event only its peer's receipt sets). The helper thread started by
    release() hands the rest to the kernel; without it the peer would wait forever for the message."""
    a, b = pair(timeout=15.0)
    size = 4 * a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    received = threading.Event()
    got: list = []

    def peer() -> None:
        got.append(b.recv())
        received.set()

    thread = threading.Thread(target=peer)
    thread.start()
    a.send(0, 1, torch.arange(size // 4, dtype=torch.float32), stage=0)  # 4 bytes a number
    assert a.pending == 1  # the kernel took only part of it
    a.release()
    assert received.wait(10), "the peer never got the message queued at the end of the step"
    thread.join()
    status, batch, tensor = got[0]
    assert (status, batch) == (0, 1)
    sent = torch.arange(size // 4, dtype=torch.float32)
    assert torch.equal(tensor, sent)  # exact: integers below 2**24, copied
    a.send(0, 2, torch.ones(3), stage=0)  # the stage's thread takes the link back
    assert b.recv()[1] == 2
    a.close()
    b.close()


def test_a_failed_stage_ends_its_neighbours_wait_to_connect():
    store = dist.HashStore()
    store.set("failure", "stage 1 raised ValueError: boom")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="a stage failed before this link was connected"):
        connect_socket(store, "k", 0, 1, wait=30.0, abort="failure")
    assert time.monotonic() - start < 5.0  # polled, not the 30 s wait


def test_a_neighbour_that_never_comes_is_a_timeout_naming_the_wait():
    with pytest.raises(TimeoutError, match=r"did not connect within 0\.3 s"):
        connect_socket(dist.HashStore(), "k", 1, 0, wait=0.3)


def test_a_queued_message_is_a_copy_the_caller_may_change_at_once():
    a, b = pair()
    size = 4 * a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    sent = torch.arange(size // 4, dtype=torch.float32)  # 4 bytes a number: more than the kernel takes
    a.send(0, 0, sent, stage=0)
    assert a.pending == 1
    sent.fill_(7.0)  # the caller reuses its buffer (a data loader's, say) before the peer has read
    a.release()
    _, _, got = b.recv()
    assert torch.equal(
        got, torch.arange(size // 4, dtype=torch.float32)
    )  # exact: integers below 2**24, copied


def test_a_flush_to_a_closed_peer_raises():
    a, b = pair()
    b.close()
    with contextlib.suppress(ConnectionError):  # the send itself may already find the peer gone
        a.send(0, 0, torch.ones(4), stage=0)
    with pytest.raises(ConnectionError, match="closed its connection"):
        a.flush()


def test_the_listener_accepts_only_the_stage_that_presents_the_token():
    """Another process of the host connects to the published address first (and sends 16 bytes): it is closed,
    and the stage that connected with the token it published gets the link."""
    store = dist.HashStore()
    got: list = [None]
    listener = threading.Thread(
        target=lambda: got.__setitem__(0, connect_socket(store, "k", 1, 0, wait=10.0))
    )
    listener.start()
    store.wait(["k/0/address"])
    intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    intruder.connect(store.get("k/0/address").decode())
    intruder.sendall(b"x" * 16)
    low = connect_socket(store, "k", 0, 1, wait=10.0)
    listener.join(20)
    assert low is not None
    assert got[0] is not None
    intruder.settimeout(5.0)
    assert intruder.recv(1) == b""  # closed by the listener
    a, b = SocketLink(low, 5.0, 4), SocketLink(got[0], 5.0, 4)
    a.send(0, 3, torch.ones(2), stage=0)
    assert b.recv()[1] == 3


_EXITING_STAGE = """
import sys, torch, torch.distributed as dist
from altgrad.dni._links import SocketLink, connect_socket
link = SocketLink(connect_socket(dist.FileStore(sys.argv[1], 2), "k", 0, 1, 30.0), 30.0, 8)
numbers = int(sys.argv[2])
link.send(0, 1, torch.arange(numbers, dtype=torch.float32), 0)
assert link.pending == 1  # the kernel took only part of it
link.release()  # and the stage returns from its last step and exits, without flush()
"""


def test_a_stage_that_exits_after_its_last_step_still_delivers_what_it_queued(tmp_path):
    """gloo completes a stage's last sends after it returns; the socket link does too: an exit handler gives
    what is still queued to the peer (the helper thread is a daemon and would die with the interpreter)."""
    numbers = (
        4 * (8 << 20) // 4
    )  # 32 MiB of float32: more than any kernel send buffer here (at most 2 x 8 MiB)
    child = subprocess.Popen([sys.executable, "-c", _EXITING_STAGE, str(tmp_path / "store"), str(numbers)])
    try:
        link = SocketLink(
            connect_socket(dist.FileStore(str(tmp_path / "store"), 2), "k", 1, 0, 30.0), 30.0, 8
        )
        time.sleep(1.0)  # the child has reached its exit while most of the message waits in its queue
        status, batch, tensor = link.recv()
        assert child.wait(30) == 0
    finally:
        child.kill()
    assert (status, batch) == (0, 1)
    assert torch.equal(
        tensor, torch.arange(numbers, dtype=torch.float32)
    )  # exact: integers below 2**24, copied
