"""The 128-byte session blob: TEK and TIK wrapped under KEK/KIK (sev-protocol.md §1.3).

| 0x00 | 16 | NONCE (the KDF context)                                  |
| 0x10 | 32 | WRAP_TK = AES-128-CTR(KEK, WRAP_IV) over TEK ‖ TIK      |
| 0x30 | 16 | WRAP_IV                                                   |
| 0x40 | 32 | WRAP_MAC = HMAC-SHA-256(KIK, WRAP_TK)                     |
| 0x60 | 32 | POLICY_MAC = HMAC-SHA-256(TIK, policy as u32 LE)          |

Extension: a session that moves one of cvmig's own packet formats (sg, aead) negotiates
it here, so that it is covered by the session's keys from the start; SEV's format
(page/contig) keeps SEV's 128 bytes exactly.

| 0x80 | 4  | FORMAT (u32 LE: 2 = sg, 3 = aead; the trailer's format byte)          |
| 0x84 | 32 | FORMAT_MAC = HMAC-SHA-256(TIK, 0x19 ‖ FORMAT)                        |

KEK and KIK come from Z = ECDH(P-384) between one side's PDH private key and the other's
PDH public key (48-byte x-coordinate), through the SP 800-108 KDF.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cvmig.psp.api import SESSION_SIZE, PspError, Status
from cvmig.psp.kdf import KEY_SIZE, derive_kek_kik


@dataclass(frozen=True)
class TransportKeys:
    """TEK (AES-128-CTR key for packets) and TIK (HMAC key for packets)."""

    tek: bytes
    tik: bytes


def _ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def shared_secret(local_pdh: ec.EllipticCurvePrivateKey, peer_pdh: ec.EllipticCurvePublicKey) -> bytes:
    """Z: the raw P-384 ECDH output (x-coordinate, 48 bytes), as the firmware uses it."""
    return local_pdh.exchange(ec.ECDH(), peer_pdh)


def policy_mac(tik: bytes, policy: int) -> bytes:
    return hmac.digest(tik, policy.to_bytes(4, "little"), "sha256")


CTX_FORMAT = 0x19  # extension: the negotiated packet format
FORMAT_EXT_SIZE = 36


def format_ext(tik: bytes, code: int) -> bytes:
    """The session blob's extension negotiating packet format ``code``."""
    c = code.to_bytes(4, "little")
    return c + hmac.digest(tik, bytes([CTX_FORMAT]) + c, "sha256")


def check_format_ext(tik: bytes, ext: bytes) -> int:
    """The format code the extension negotiates; refused if its MAC does not verify."""
    if len(ext) != FORMAT_EXT_SIZE or not hmac.compare_digest(format_ext(tik, int.from_bytes(
            ext[:4], "little"))[4:], ext[4:]):
        raise PspError("RECEIVE_START", Status.BAD_MEASUREMENT,
                       "FORMAT_MAC does not verify (the negotiated packet format was changed)")
    return int.from_bytes(ext[:4], "little")


def wrap(z: bytes, policy: int, keys: TransportKeys | None = None) -> tuple[bytes, TransportKeys]:
    """Sender side: fresh TEK/TIK (unless given), nonce and WRAP_IV; returns (blob, keys)."""
    keys = keys or TransportKeys(os.urandom(KEY_SIZE), os.urandom(KEY_SIZE))
    nonce, wrap_iv = os.urandom(16), os.urandom(16)
    kek, kik = derive_kek_kik(z, nonce)
    wrap_tk = _ctr(kek, wrap_iv, keys.tek + keys.tik)
    blob = (
        nonce + wrap_tk + wrap_iv + hmac.digest(kik, wrap_tk, "sha256")
        + policy_mac(keys.tik, policy)
    )
    assert len(blob) == SESSION_SIZE
    return blob, keys


def unwrap(z: bytes, policy: int, blob: bytes) -> TransportKeys:
    """Receiver side: check WRAP_MAC, unwrap, check POLICY_MAC (in that order)."""
    if len(blob) != SESSION_SIZE:
        raise PspError(
            "RECEIVE_START", Status.INVALID_LENGTH, f"session blob is {len(blob)} bytes, want 128"
        )
    nonce, wrap_tk, wrap_iv = blob[0:16], blob[16:48], blob[48:64]
    wrap_mac, pol_mac = blob[64:96], blob[96:128]
    kek, kik = derive_kek_kik(z, nonce)
    if not hmac.compare_digest(hmac.digest(kik, wrap_tk, "sha256"), wrap_mac):
        raise PspError(
            "RECEIVE_START", Status.BAD_MEASUREMENT,
            "session blob WRAP_MAC does not verify (tampered blob or wrong PDH pair)",
        )
    tk = _ctr(kek, wrap_iv, wrap_tk)
    keys = TransportKeys(tk[:KEY_SIZE], tk[KEY_SIZE:])
    if not hmac.compare_digest(policy_mac(keys.tik, policy), pol_mac):
        raise PspError(
            "RECEIVE_START", Status.BAD_MEASUREMENT, "POLICY_MAC does not verify (policy changed)"
        )
    return keys
