"""Third-party compression methods with bugs: each end raises the method's bug as it
was raised (or a ValueError / TypeError naming the method), never a misleading error of
the transfer's, and the receiver's checks hold whatever the method's bound says."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import pytest
import trio

import trio_multifd as m

from .helpers import PAGE, random_pages

PAGES = 64

Encode = Callable[[Sequence[memoryview]], object]
Decode = Callable[[bytes | bytearray | memoryview, Sequence[memoryview]], None]


def plain(runs: Sequence[memoryview]) -> bytes:
    return b"".join(runs)


def scatter(payload: bytes | bytearray | memoryview, runs: Sequence[memoryview]) -> None:
    at = 0
    for run in runs:
        run[:] = payload[at : at + len(run)]
        at += len(run)


def faulty(
    *,
    encode: Encode = plain,
    decode: Decode = scatter,
    bound: Callable[[int], object] = lambda page_bytes: page_bytes,
) -> m.Method:
    """A method that sends pages as they are, but for the behaviour given."""

    class FaultyEncoder(m.Encoder):
        def encode(self, runs: Sequence[memoryview]) -> bytes:
            return encode(runs)  # type: ignore[return-value]

    class FaultyDecoder(m.Decoder):
        def decode_into(
            self, payload: bytes | bytearray | memoryview, runs: Sequence[memoryview]
        ) -> None:
            decode(payload, runs)

    class Faulty(m.Method):
        name: ClassVar[str] = "faulty"
        flag: ClassVar[int] = 0x6
        levels: ClassVar[range | None] = None
        default_level: ClassVar[int | None] = None
        compresses: ClassVar[bool] = True

        def payload_bound(self, page_bytes: int) -> int:
            return bound(page_bytes)  # type: ignore[return-value]

        def new_encoder(self, level: int | None) -> m.Encoder:
            return FaultyEncoder()

        def new_decoder(self) -> m.Decoder:
            return FaultyDecoder()

    return Faulty()


@pytest.fixture
def register() -> Iterator[Callable[[m.Method], None]]:
    registered: list[str] = []

    def add(method: m.Method) -> None:
        m.register_method(method)
        registered.append(method.name)

    yield add
    for name in registered:
        m.unregister_method(name)


async def both_ends(method: m.Method) -> tuple[BaseException | None, BaseException | None]:
    """Transfer pages over TCP with ``method``, each end in a task of its own; return
    what each end's block raised."""
    source = m.RAMBlock("ram", random_pages(PAGES))
    target = m.RAMBlock("ram", bytearray(PAGES * PAGE))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    raised: dict[str, BaseException] = {}

    async def connect(channel: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    async def receive() -> None:
        try:
            async with m.open_receiver([target], channels=2, compression=method.name) as r:
                async with trio.open_nursery() as nursery:
                    await nursery.start(r.serve, listeners)
                    await r.wait_closed()
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            raised["receiver"] = exc

    async def send() -> None:
        try:
            async with m.open_sender(connect, channels=2, compression=method.name) as sender:
                await sender.queue_pages(source, range(0, source.size, PAGE))
        except BaseException as exc:
            raised["sender"] = exc

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(send)
    for listener in listeners:
        await listener.aclose()
    return raised.get("sender"), raised.get("receiver")


def raise_(exc: Exception) -> Callable[..., None]:
    def fail(*args: object) -> None:
        raise exc

    return fail


async def test_an_encoders_exception_leaves_the_sender_as_raised_naming_the_channel(
    register: Callable[[m.Method], None],
) -> None:
    register(faulty(encode=raise_(KeyError("encoder bug"))))
    sent, _ = await both_ends(m.get_method("faulty"))
    assert isinstance(sent, KeyError), repr(sent)
    assert sent.args == ("encoder bug",)
    assert any("of the sender" in note for note in sent.__notes__)


async def test_a_decoders_exception_leaves_the_receiver_as_raised_naming_the_channel(
    register: Callable[[m.Method], None],
) -> None:
    register(faulty(decode=raise_(ValueError("decoder bug"))))
    sent, received = await both_ends(m.get_method("faulty"))
    assert isinstance(received, ValueError), repr(received)
    assert str(received) == "decoder bug"
    assert any("of the receiver" in note for note in received.__notes__)
    assert isinstance(sent, m.MultiFDError)


@pytest.mark.parametrize(
    ("encode", "error", "message"),
    [
        (
            lambda runs: plain(runs) + b"!",
            ValueError,
            r"encode returned 262145 bytes .*1\.\.262144",
        ),
        (lambda runs: b"", ValueError, r"encode returned 0 bytes"),
        (lambda runs: "pages", TypeError, "encode returned str, not bytes"),
    ],
    ids=["past-the-bound", "empty", "str"],
)
async def test_a_payload_the_receiver_would_refuse_is_the_senders_own_error(
    register: Callable[[m.Method], None], encode: Encode, error: type[Exception], message: str
) -> None:
    register(faulty(encode=encode))
    sent, _ = await both_ends(m.get_method("faulty"))
    assert isinstance(sent, error), repr(sent)
    assert sent.args[0].startswith("compression method 'faulty': ")
    with pytest.raises(error, match=message):
        raise sent


@pytest.mark.parametrize("bound", [-1, 0, 4.5e6, None])
def test_a_payload_bound_that_is_no_positive_int_fails_open_receiver(
    register: Callable[[m.Method], None], bound: object
) -> None:
    register(faulty(bound=lambda page_bytes: bound))

    async def open_it() -> None:
        async with m.open_receiver([m.RAMBlock("ram", bytearray(PAGE))], compression="faulty"):
            pass  # pragma: no cover

    with pytest.raises(ValueError, match=r"'faulty': payload_bound\(524288\) returned"):
        trio.run(open_it)


async def test_a_claim_past_the_channels_buffer_is_refused_whatever_the_bound(
    register: Callable[[m.Method], None],
) -> None:
    # Larger for fewer pages than for a full packet: the buffer is the full packet's.
    full = 2**19
    register(
        faulty(
            bound=lambda page_bytes: page_bytes if page_bytes >= full else full + 2**20,
            encode=lambda runs: plain(runs) + bytes(full),
        )
    )
    _, received = await both_ends(m.get_method("faulty"))
    assert isinstance(received, m.PayloadSizeError), repr(received)
    assert received.limit == full
