"""The SEV key derivation function: NIST SP 800-108 in counter mode with HMAC-SHA-256.

K_i = HMAC-SHA-256(key, i (u32 LE) ‖ label ‖ 0x00 ‖ context ‖ L (u32 LE)), L in bits; the
output is the first L/8 bytes of K_1 ‖ K_2 ‖ ... This is the firmware's `nist_kdf.c`
(also sev-tool and virtee/sev). Little-endian counters are what the firmware does, and
what the published vector below needs.
"""

from __future__ import annotations

import hmac

KEY_SIZE = 16  # TEK, TIK, KEK, KIK and the master secret are all 128-bit

LABEL_MASTER = b"sev-master-secret"
LABEL_KEK = b"sev-kek"
LABEL_KIK = b"sev-kik"


def kdf(key: bytes, label: bytes, context: bytes = b"", length: int = KEY_SIZE) -> bytes:
    """SP 800-108 counter-mode KDF with HMAC-SHA-256, ``length`` bytes of output."""
    if length <= 0:
        raise ValueError("length must be positive")
    tail = label + b"\x00" + context + (length * 8).to_bytes(4, "little")
    out = bytearray()
    i = 1
    while len(out) < length:
        out += hmac.digest(key, i.to_bytes(4, "little") + tail, "sha256")
        i += 1
    return bytes(out[:length])


def derive_kek_kik(z: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """KEK and KIK from the ECDH shared secret ``z`` and the session nonce."""
    master = kdf(z, LABEL_MASTER, nonce)
    return kdf(master, LABEL_KEK), kdf(master, LABEL_KIK)
