"""``broker._h2client``: client connections ask for larger frames and take them; a frame's
debug text is hyperframe's, without hexlifying the whole body."""

from __future__ import annotations

import binascii

import h2.config
import h2.connection
import h2.events
import h2.settings
import hyperframe.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st

import broker.client  # noqa: F401  (installs both)
from broker import _h2client

Codes = h2.settings.SettingCodes


def _hyperframes_own(data: bytes | None) -> str:
    """hyperframe 6.1's function, as it reads (the one :func:`install` replaces)."""
    if not data:
        return "None"
    text = binascii.hexlify(data).decode("ascii")
    if len(text) > 20:
        text = text[:20] + "..."
    return "<hex:" + text + ">"


@given(data=st.one_of(st.none(), st.binary(max_size=64)))
def test_the_text_is_hyperframes(data: bytes | None) -> None:
    assert _h2client._raw_data_repr(data) == _hyperframes_own(data)


def test_the_frame_text_is_installed_and_reads_as_before() -> None:
    assert hyperframe.frame._raw_data_repr is _h2client._raw_data_repr
    frame = hyperframe.frame.DataFrame(1, data=b"\x01" * 16384)
    assert repr(frame) == "DataFrame(stream_id=1, flags=[]): <hex:01010101010101010101...>"


def test_the_frame_text_is_left_alone_when_hyperframe_writes_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hyperframe.frame, "_raw_data_repr", lambda data: f"<{len(data or b'')}>")
    assert _h2client._install_frame_text() is False
    assert hyperframe.frame._raw_data_repr(b"abc") == "<3>"


def _pair(
    client_settings: dict[Codes, int] | None = None, *, as_httpcore: bool = False
) -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    """A client and a server connection, the client's first SETTINGS sent (set up as
    httpcore sets up its connections, when ``as_httpcore``) and both handshakes done."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    if as_httpcore:
        client.local_settings = h2.settings.Settings(
            client=True, initial_values={Codes.ENABLE_PUSH: 0, Codes.MAX_CONCURRENT_STREAMS: 100}
        )
        del client.local_settings[Codes.ENABLE_CONNECT_PROTOCOL]
    if client_settings:
        client.local_settings = h2.settings.Settings(client=True, initial_values=client_settings)
        client.max_inbound_frame_size = client.local_settings.max_frame_size
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    events = server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    settings = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
    server.received = {code: change.new_value for code, change in settings.changed_settings.items()}  # type: ignore[attr-defined]
    return client, server


def test_a_client_asks_for_larger_frames_and_takes_them() -> None:
    client, server = _pair(as_httpcore=True)
    assert server.received[Codes.MAX_FRAME_SIZE] == _h2client.FRAME_SIZE  # type: ignore[attr-defined]
    assert Codes.ENABLE_CONNECT_PROTOCOL not in server.received  # type: ignore[attr-defined]
    assert server.max_outbound_frame_size == _h2client.FRAME_SIZE
    assert client.max_inbound_frame_size == _h2client.FRAME_SIZE
    stream = client.get_next_available_stream_id()
    client.send_headers(
        stream,
        [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")],
        end_stream=True,
    )
    client.increment_flow_control_window(1 << 20)  # as httpcore opens its windows
    client.increment_flow_control_window(1 << 20, stream_id=stream)
    server.receive_data(client.data_to_send())
    server.send_headers(stream, [(":status", "200")])
    body = bytes(200_000)
    server.send_data(stream, body, end_stream=True)
    data = [
        e
        for e in client.receive_data(server.data_to_send())
        if isinstance(e, h2.events.DataReceived)
    ]
    assert [len(e.data) for e in data] == [200_000]  # one frame, not thirteen


def test_a_client_that_chose_its_frame_size_keeps_it_and_servers_are_untouched() -> None:
    client, server = _pair({Codes.MAX_FRAME_SIZE: 32768})
    assert server.received[Codes.MAX_FRAME_SIZE] == 32768  # type: ignore[attr-defined]
    assert client.max_inbound_frame_size == 32768
    assert server.max_inbound_frame_size == 16384
    assert server.local_settings.max_frame_size == 16384


def test_installing_twice_wraps_once() -> None:
    wrapped = h2.connection.H2Connection.initiate_connection
    assert _h2client.install() is True
    assert h2.connection.H2Connection.initiate_connection is wrapped
