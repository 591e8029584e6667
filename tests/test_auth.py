"""The shared-secret challenge-response, one side against the other in memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hctserver.errors import AuthError, LeaderBusyError, ProtocolError
from hctserver.protocol import auth, wire

SECRET = b"a secret of thirty-two bytes...."


def run(follower: auth.FollowerAuth, leader: auth.LeaderAuth, cut: int = 0) -> None:
    """Pass bytes both ways until both are done; ``cut`` splits each
    message in two at that offset (any split must work)."""
    to_leader = follower.start()
    for _ in range(4):
        if cut and len(to_leader) > cut:
            back = leader.receive(to_leader[:cut]) + leader.receive(to_leader[cut:])
        else:
            back = leader.receive(to_leader)
        to_leader = follower.receive(back) if back else b""
        if follower.done and leader.done:
            return
    raise AssertionError("the exchange did not finish")


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=80))
def test_the_same_secret_passes_however_the_bytes_are_split(cut: int) -> None:
    f, ld = auth.FollowerAuth(SECRET), auth.LeaderAuth(SECRET)
    run(f, ld, cut)
    assert f.done and ld.done


def test_a_wrong_secret_is_refused_by_the_leader() -> None:
    f, ld = auth.FollowerAuth(b"x" * 32), auth.LeaderAuth(SECRET)
    with pytest.raises(auth.Refused) as e:
        run(f, ld)
    assert (e.value.reply, str(e.value)) == (
        auth.WRONG,
        "wrong shared secret (the follower's --auth-file differs)",
    )


def test_a_leader_without_the_secret_is_refused_by_the_follower() -> None:
    """An impostor that answers CHALLENGE but cannot make WELCOME."""
    f = auth.FollowerAuth(SECRET)
    f.start()
    f.receive(struct.pack("<ii", auth.CHALLENGE, 32) + b"n" * 32)
    with pytest.raises(AuthError, match="could not prove that it holds the shared secret"):
        f.receive(struct.pack("<ii", auth.WELCOME, 32) + b"m" * 32)


def test_a_proof_cannot_be_reflected() -> None:
    """The leader's WELCOME for one nonce pair is not a follower's PROOF."""
    fn, ln = b"f" * 32, b"l" * 32
    leader = auth.LeaderAuth(SECRET, ln)
    leader.receive(auth.FollowerAuth(SECRET, fn).start())
    welcome = auth.LeaderAuth(SECRET, ln)
    welcome.receive(auth.FollowerAuth(SECRET, fn).start())
    honest = auth.FollowerAuth(SECRET, fn)
    honest.start()
    proof = honest.receive(struct.pack("<ii", auth.CHALLENGE, 32) + ln)
    reply = welcome.receive(proof)  # the leader's WELCOME for (fn, ln)
    assert reply[:4] == struct.pack("<i", auth.WELCOME)
    reflected = struct.pack("<ii", auth.PROOF, 32) + reply[8:]
    with pytest.raises(AuthError):
        leader.receive(reflected)


@pytest.mark.parametrize(
    ("first", "said"),
    [
        (wire.encode_sync(0, bytes(16)), "it sent SYNC from cid 0"),
        (wire.encode_sub(0), "it sent SUB"),
        (struct.pack("<i", 77), "it sent a message of type 77"),
    ],
)
def test_a_client_without_the_extension_is_refused_at_its_first_message(first, said) -> None:
    with pytest.raises(auth.Refused) as e:
        auth.LeaderAuth(SECRET).receive(first)
    message, why = e.value.reply, str(e.value)
    assert message == auth.NEEDED and said in why


def test_leader_errors_during_the_exchange_are_typed() -> None:
    f = auth.FollowerAuth(SECRET)
    f.start()
    with pytest.raises(LeaderBusyError):
        f.receive(wire.encode_error("too many connections to the leader; retry later"))
    f = auth.FollowerAuth(SECRET)
    f.start()
    with pytest.raises(AuthError, match="does not know authentication"):
        f.receive(wire.encode_error(wire.INCOMPATIBLE))
    f = auth.FollowerAuth(SECRET)
    f.start()
    with pytest.raises(ProtocolError, match="expected message 21"):
        f.receive(struct.pack("<ii", 99, 4) + b"abcd")


def test_a_request_sent_before_welcome_is_a_protocol_error() -> None:
    f, ld = auth.FollowerAuth(SECRET), auth.LeaderAuth(SECRET)
    challenge = ld.receive(f.start())
    proof = f.receive(challenge)
    with pytest.raises(ProtocolError, match="before the WELCOME"):
        ld.receive(proof + wire.encode_sub(0))
