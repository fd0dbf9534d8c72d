"""gateway.ids: the same strings as uuid.uuid4() and secrets.token_urlsafe(), never repeated,
fresh in a forked child."""

from __future__ import annotations

import base64
import os
import uuid

from gateway.ids import token_urlsafe, uuid4_hex, uuid4_str


def test_ids_are_version_4_rfc_4122_uuids() -> None:
    for _ in range(5000):  # more than one 4 KiB buffer of random bytes
        text = uuid4_str()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        h = uuid4_hex()
        assert len(h) == 32 and uuid.UUID(hex=h).hex == h and uuid.UUID(hex=h).version == 4


def test_ids_do_not_repeat() -> None:
    ids = [uuid4_hex() for _ in range(20000)]
    assert len(set(ids)) == len(ids)


def test_url_safe_tokens_are_what_secrets_makes() -> None:
    tokens = [token_urlsafe(16) for _ in range(2000)]
    assert len(set(tokens)) == len(tokens)
    for t in tokens:
        assert len(t) == 22 and "=" not in t  # 16 bytes, base64url, unpadded
        assert len(base64.urlsafe_b64decode(t + "==")) == 16


def test_a_forked_child_does_not_reuse_the_parents_bytes() -> None:
    uuid4_hex()  # the parent has bytes buffered now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, uuid4_hex().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child != uuid4_hex()
