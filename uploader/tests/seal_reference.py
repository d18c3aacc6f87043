"""Omi's "enhanced" encryption at rest, written independently of uploader::seal with Python's
`cryptography`, for tests/seal_python.rs to check the Rust against.

The secret is the environment's ENCRYPTION_SECRET, as Omi's backend reads it.

    seal_reference.py seal UID PLAINTEXT STORED SIZES
        Splits PLAINTEXT into chunks of the comma-separated SIZES (the last takes the rest),
        encrypts each as Omi's writer does (fresh random nonce) and writes the frames,
        concatenated, to STORED.
    seal_reference.py open UID STORED PLAINTEXT
        Decrypts every frame of STORED as Omi's reader does and writes the plaintexts,
        concatenated, to PLAINTEXT. Each frame is also encrypted again under its own nonce and
        must come out byte for byte as stored: the same format, not only a readable one.
"""

import os
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE = 12
TAG = 16


def user_key(uid: str) -> bytes:
    secret = os.environ["ENCRYPTION_SECRET"].encode("utf-8")
    if len(secret) < 32:
        sys.exit("ENCRYPTION_SECRET must be at least 32 bytes")
    kdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=uid.encode("utf-8"),
        info=b"user-data-encryption",
    )
    return kdf.derive(secret)


def seal(uid: str, plaintext: bytes, sizes: list) -> bytes:
    aead = AESGCM(user_key(uid))
    out = bytearray()
    at = 0
    for i, size in enumerate(sizes):
        end = len(plaintext) if i == len(sizes) - 1 else at + size
        nonce = os.urandom(NONCE)
        body = nonce + aead.encrypt(nonce, plaintext[at:end], None)
        out += struct.pack(">I", len(body)) + body
        at = end
    return bytes(out)


def open_(uid: str, stored: bytes) -> bytes:
    aead = AESGCM(user_key(uid))
    out = bytearray()
    at = 0
    while at < len(stored):
        if len(stored) - at < 4:
            sys.exit(f"truncated length at {at}")
        (length,) = struct.unpack_from(">I", stored, at)
        body = stored[at + 4 : at + 4 + length]
        if length < NONCE + TAG or len(body) != length:
            sys.exit(f"bad frame length {length} at {at}")
        nonce, sealed = body[:NONCE], body[NONCE:]
        plain = aead.decrypt(nonce, sealed, None)
        if aead.encrypt(nonce, plain, None) != sealed:
            sys.exit(f"frame at {at} is not what this writer writes")
        out += plain
        at += 4 + length
    return bytes(out)


def main() -> None:
    mode, uid, source, target = sys.argv[1:5]
    with open(source, "rb") as f:
        data = f.read()
    if mode == "seal":
        result = seal(uid, data, [int(s) for s in sys.argv[5].split(",")])
    elif mode == "open":
        result = open_(uid, data)
    else:
        sys.exit(f"unknown mode {mode!r}")
    with open(target, "wb") as f:
        f.write(result)


if __name__ == "__main__":
    main()
