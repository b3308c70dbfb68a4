"""KDF, session blob and certificate chain of the emulated secure processor."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from cvmig.psp import certs as C
from cvmig.psp.api import SEV_CERT_SIZE, Batching, PlatformCerts, PspError, Status, packet_size
from cvmig.psp.kdf import derive_kek_kik, kdf
from cvmig.psp.packet import AEAD_RECORD, Channel
from cvmig.psp.session import TransportKeys, shared_secret, unwrap, wrap


def test_kdf_published_vector() -> None:
    # virtee/sev's test vector for the firmware's nist_kdf.
    out = kdf(bytes(16), b"sev-master-secret", bytes(16))
    assert out.hex() == "ab4d269fcc62bedb4511d56c386ce706"


def test_kdf_counter_blocks_and_separation() -> None:
    long = kdf(b"k" * 16, b"label", b"ctx", 48)
    assert len(long) == 48
    # Block 1 of a 48-byte output differs from a 16-byte output: L is in the input.
    assert long[:16] != kdf(b"k" * 16, b"label", b"ctx", 16)
    # Bytes 32.. are the second HMAC block: counter 2, little-endian, as the firmware does.
    tail = b"label\x00ctx" + (48 * 8).to_bytes(4, "little")
    assert long[32:48] == hmac.digest(b"k" * 16, (2).to_bytes(4, "little") + tail, "sha256")[:16]
    kek, kik = derive_kek_kik(b"z" * 48, b"n" * 16)
    assert kek != kik and len(kek) == len(kik) == 16


@pytest.fixture(scope="module")
def pki() -> tuple[C.AmdRoot, C.Owner]:
    return C.AmdRoot.generate(), C.Owner.generate()


@pytest.fixture(scope="module")
def ident(pki: tuple[C.AmdRoot, C.Owner]) -> C.PlatformIdentity:
    return C.PlatformIdentity.generate(*pki)


def _z_pair() -> tuple[bytes, bytes]:
    a, b = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    return shared_secret(a, b.public_key()), shared_secret(b, a.public_key())


def test_session_wrap_unwrap_and_layout() -> None:
    za, zb = _z_pair()
    assert za == zb and len(za) == 48
    blob, keys = wrap(za, 0x1)
    assert len(blob) == 128
    got = unwrap(zb, 0x1, blob)
    assert got == keys
    # POLICY_MAC at 0x60 is HMAC(TIK, policy LE); WRAP_MAC at 0x40 is HMAC(KIK, WRAP_TK).
    assert blob[0x60:] == hmac.digest(keys.tik, (1).to_bytes(4, "little"), "sha256")
    kek, kik = derive_kek_kik(za, blob[:16])
    assert blob[0x40:0x60] == hmac.digest(kik, blob[0x10:0x30], "sha256")
    # The wrapped keys are not the keys in clear.
    assert keys.tek not in blob and keys.tik not in blob


@settings(max_examples=40, deadline=None)
@given(pos=st.integers(0, 127), bit=st.integers(0, 7))
def test_session_blob_any_bit_flip_is_refused(pos: int, bit: int) -> None:
    za, zb = _z_pair()
    blob, _ = wrap(za, 0x21)
    bad = bytearray(blob)
    bad[pos] ^= 1 << bit
    with pytest.raises(PspError) as e:
        unwrap(zb, 0x21, bytes(bad))
    assert e.value.status == Status.BAD_MEASUREMENT


def test_session_policy_change_and_wrong_length() -> None:
    za, zb = _z_pair()
    blob, _ = wrap(za, 0x1)
    with pytest.raises(PspError) as e:
        unwrap(zb, 0x1 | 0x8, blob)  # hypervisor clears NOSEND... or sets anything else
    assert e.value.status == Status.BAD_MEASUREMENT and "POLICY_MAC" in str(e.value)
    with pytest.raises(PspError) as e:
        unwrap(zb, 0x1, blob[:127])
    assert e.value.status == Status.INVALID_LENGTH


def test_chain_formats(ident: C.PlatformIdentity) -> None:
    c = ident.certs
    for raw in (c.pdh, c.pek, c.oca, c.cek):
        assert len(raw) == SEV_CERT_SIZE
    assert C.SevCert.parse(c.pdh).usage == C.USAGE_PDH
    assert C.SevCert.parse(c.pek).usage == C.USAGE_PEK
    assert C.SevCert.parse(c.cek).usage == C.USAGE_CEK
    assert C.AmdCert.parse(c.ark, "ARK").usage == C.USAGE_ARK
    assert C.AmdCert.parse(c.ask, "ASK").usage == C.USAGE_ASK
    # RSA-2048: 64-byte fixed part + exponent, modulus, signature of 256 bytes each.
    assert len(c.ask) == 64 + 3 * 256
    assert PlatformCerts.from_bytes(c.to_bytes()) == c


def test_chain_validates(pki: tuple[C.AmdRoot, C.Owner], ident: C.PlatformIdentity) -> None:
    pek = C.validate_sev_chain(ident.certs, [pki[0].ark_cert])
    assert (pek.api_major, pek.api_minor) == (C.API_MAJOR, C.API_MINOR)
    C.validate_domain(ident.certs, pki[1].oca_cert)


def _flip(raw: bytes, pos: int) -> bytes:
    b = bytearray(raw)
    b[pos] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize(
    "field,pos",
    [
        ("pdh", 0x41C + 5),  # the PEK's signature on the PDH
        ("pdh", 0x20),  # the PDH's public key (signed body)
        ("pek", 0x624 + 5),  # the CEK's signature on the PEK (second slot)
        ("cek", 0x41C + 5),  # the ASK's RSA signature on the CEK
        ("ask", 100),  # ASK modulus area
        ("ask", -3),  # ASK signature
    ],
)
def test_chain_bad_signature(
    pki: tuple[C.AmdRoot, C.Owner], ident: C.PlatformIdentity, field: str, pos: int
) -> None:
    bad = dataclasses.replace(ident.certs, **{field: _flip(getattr(ident.certs, field), pos)})
    with pytest.raises(C.CertError) as e:
        C.validate_sev_chain(bad, [pki[0].ark_cert])
    if pos in (0x20, 100):
        # A changed key may not even be a valid key any more; either way it is refused.
        assert e.value.status in (Status.BAD_SIGNATURE, Status.INVALID_CERTIFICATE)
    else:
        assert e.value.status == Status.BAD_SIGNATURE


def test_domain_bad_oca_signature(pki: tuple[C.AmdRoot, C.Owner], ident: C.PlatformIdentity) -> None:
    # The PEK's first slot is the OCA's signature: only DOMAIN checks it.
    bad = dataclasses.replace(ident.certs, pek=_flip(ident.certs.pek, 0x41C + 5))
    C.validate_sev_chain(bad, [pki[0].ark_cert])
    with pytest.raises(C.CertError) as e:
        C.validate_domain(bad, pki[1].oca_cert)
    assert e.value.status == Status.BAD_SIGNATURE
    bad = dataclasses.replace(ident.certs, oca=_flip(ident.certs.oca, 0x41C + 5))
    with pytest.raises(C.CertError) as e:
        C.validate_domain(bad, pki[1].oca_cert)
    assert e.value.status == Status.BAD_SIGNATURE


def test_chain_wrong_root(pki: tuple[C.AmdRoot, C.Owner]) -> None:
    other = C.AmdRoot.generate()
    foreign = C.PlatformIdentity.generate(other, pki[1])
    with pytest.raises(C.CertError) as e:
        C.validate_sev_chain(foreign.certs, [pki[0].ark_cert])
    assert e.value.status == Status.BAD_SIGNATURE and "trust" in e.value.detail
    # A trusted ARK with a foreign ASK and CEK: the ASK is not certified by that ARK.
    mixed = dataclasses.replace(foreign.certs, ark=pki[0].ark_cert)
    with pytest.raises(C.CertError) as e:
        C.validate_sev_chain(mixed, [pki[0].ark_cert])
    assert e.value.status == Status.BAD_SIGNATURE
    # And it validates once that root is trusted.
    C.validate_sev_chain(foreign.certs, [pki[0].ark_cert, other.ark_cert])


def test_chain_wrong_usage(pki: tuple[C.AmdRoot, C.Owner], ident: C.PlatformIdentity) -> None:
    c = ident.certs
    for bad in (
        dataclasses.replace(c, pdh=c.pek),
        dataclasses.replace(c, pek=c.cek),
        dataclasses.replace(c, cek=c.oca),
        dataclasses.replace(c, ask=c.ark),
    ):
        with pytest.raises(C.CertError) as e:
            C.validate_sev_chain(bad, [pki[0].ark_cert])
        assert e.value.status == Status.INVALID_CERTIFICATE, e.value
    with pytest.raises(C.CertError) as e:
        C.validate_domain(dataclasses.replace(c, oca=c.pek), pki[1].oca_cert)
    assert e.value.status == Status.INVALID_CERTIFICATE
    with pytest.raises(C.CertError) as e:
        C.parse_pdh(c.pdh[:-1])
    assert e.value.status == Status.INVALID_CERTIFICATE


def test_domain_other_owner(pki: tuple[C.AmdRoot, C.Owner], ident: C.PlatformIdentity) -> None:
    stranger = C.PlatformIdentity.generate(pki[0], C.Owner.generate())
    C.validate_sev_chain(stranger.certs, [pki[0].ark_cert])  # a genuine AMD platform...
    with pytest.raises(C.CertError) as e:
        C.validate_domain(stranger.certs, pki[1].oca_cert)  # ...of another owner
    assert e.value.status == Status.POLICY_FAILURE
    # Swapping in our OCA does not help: the PEK is not signed by it.
    with pytest.raises(C.CertError) as e:
        C.validate_domain(dataclasses.replace(stranger.certs, oca=pki[1].oca_cert), pki[1].oca_cert)
    assert e.value.status == Status.BAD_SIGNATURE


def test_identity_save_load(tmp_path: object, pki: tuple[C.AmdRoot, C.Owner]) -> None:
    import pathlib

    d = pathlib.Path(str(tmp_path))
    pki[0].save(d / "r")
    pki[1].save(d / "o")
    r, o = C.AmdRoot.load(d / "r"), C.Owner.load(d / "o")
    assert r.ark_cert == pki[0].ark_cert and o.oca_cert == pki[1].oca_cert
    ident = C.PlatformIdentity.generate(r, o)
    C.validate_sev_chain(ident.certs, [pki[0].ark_cert])
    C.validate_domain(ident.certs, pki[1].oca_cert)


# --- guest memory encryption ----------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    pfns=st.lists(st.integers(0, 2**40), min_size=1, max_size=6, unique=True),
    seed=st.integers(0, 2**32 - 1),
)
def test_memcrypt_batch_equals_single_pages(pfns: list[int], seed: int) -> None:
    import numpy as np

    from cvmig.psp.memcrypt import MemoryCipher

    rng = np.random.default_rng(seed)
    mc = MemoryCipher(rng.bytes(32))
    pf = np.array(pfns, dtype=np.int64)
    pt = rng.integers(0, 256, (len(pf), 4096), dtype=np.uint8)
    batch = np.empty_like(pt)
    mc.encrypt_pages(pf, pt, batch)  # scattered: the ECB tweak path
    for i, p in enumerate(pfns):
        one = np.empty((1, 4096), dtype=np.uint8)
        mc.encrypt_pages(np.array([p]), pt[i : i + 1], one)  # single page: the CTR path
        assert np.array_equal(one[0], batch[i])
    run = np.arange(pfns[0], pfns[0] + len(pfns))
    ct_run = np.empty_like(pt)
    mc.encrypt_pages(run, pt, ct_run)  # contiguous run: CTR path over several pages
    back = np.empty_like(pt)
    mc.decrypt_pages(run[::-1].copy(), ct_run[::-1].copy(), back)  # reversed: ECB path
    assert np.array_equal(back[::-1], pt)
    dec = np.empty_like(pt)
    mc.decrypt_pages(pf, batch, dec)
    assert np.array_equal(dec, pt)
    # Same plaintext at another address: different ciphertext.
    other = np.empty((1, 4096), dtype=np.uint8)
    mc.encrypt_pages(np.array([pfns[0] + 1]), pt[:1], other)
    assert not np.array_equal(other[0], batch[0])


def test_memcrypt_tweak_is_the_block_index() -> None:
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from cvmig.psp.memcrypt import MemoryCipher

    vek = bytes(range(32))
    pt = np.zeros((1, 4096), dtype=np.uint8)
    ct = np.empty_like(pt)
    MemoryCipher(vek).encrypt_pages(np.array([3]), pt, ct)
    # Block 5 of page 3 sits at address 3*4096 + 5*16, block index 3*256 + 5.
    ecb = Cipher(algorithms.AES(vek[16:]), modes.ECB()).encryptor()
    t = ecb.update((3 * 256 + 5).to_bytes(16, "big"))
    k1 = Cipher(algorithms.AES(vek[:16]), modes.ECB()).encryptor()
    want = bytes(a ^ b for a, b in zip(k1.update(t), t, strict=True))
    assert ct[0, 80:96].tobytes() == want


# --- UPDATE_DATA packets and the finish trailer, computed independently -------------------
#
# Each check recomputes a packet from the documented layout (packet.py's docstring) with
# pyca/cryptography and hmac, from the transport keys alone, and compares bytes.

_TEK, _TIK = bytes(range(16)), bytes(range(0x40, 0x50))


def _channel(tek: bytes = _TEK, tik: bytes = _TIK) -> Channel:
    return Channel(TransportKeys(tek, tik))


def _pages(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4096), dtype=np.uint8)


def _seal_aead(ch: Channel, pfns: list[int], pt: np.ndarray) -> bytes:
    n = len(pfns)
    rec = np.empty((n, 4096 + 16), dtype=np.uint8)
    out = np.zeros(packet_size(Batching.AEAD, n), dtype=np.uint8)
    ch.seal_aead(np.array(pfns, dtype=np.int64), pt, rec, out)
    return out.tobytes()


def _aead_key(tek: bytes, tik: bytes) -> bytes:
    return hmac.digest(tik, b"\x17" + tek, "sha256")[:16]  # K_AEAD = HMAC(TIK, 0x17 ‖ TEK)[:16]


def test_aead_packet_matches_independent_aes_gcm() -> None:
    ch = _channel()
    gcm = AESGCM(_aead_key(_TEK, _TIK))
    seq0 = 0
    for pfns, seed in (([5, 0, 2**40], 1), ([7], 2), ([5, 5], 3)):  # huge GPA; a repeated page
        pt = _pages(len(pfns), seed)
        pkt = _seal_aead(ch, pfns, pt)
        n = len(pfns)
        assert len(pkt) == 16 + n * (8 + 4096 + 16)
        assert pkt[:16] == struct.pack("<IIQ", n, 0, seq0)  # count, FLAGS, first seq
        assert pkt[16 : 16 + 8 * n] == b"".join(struct.pack("<Q", p * 4096) for p in pfns)
        recs = pkt[16 + 8 * n :]
        for i, p in enumerate(pfns):
            seq = seq0 + i
            nonce = struct.pack("<Q", seq) + bytes(4)  # seq u64 LE ‖ 0 u32
            aad = b"\x16" + struct.pack("<QQ", seq, p * 4096)
            want = gcm.encrypt(nonce, pt[i].tobytes(), aad)  # ciphertext ‖ 16-byte tag
            assert recs[i * 4112 : (i + 1) * 4112] == want, (pfns, i)
        seq0 += n
        assert ch.seq == seq0
    # Known answer: one zero page at pfn 0, seq 0, under these keys (AES-GCM of 4096 zero
    # bytes); the tag pins the key derivation, the nonce and the AAD layout.
    zero = _seal_aead(_channel(), [0], _pages(1, 0) * 0)
    want = AESGCM(_aead_key(_TEK, _TIK)).encrypt(bytes(12), bytes(4096), b"\x16" + bytes(16))
    assert zero[24:] == want
    # K_AEAD is neither the TEK nor keyed by the TEK alone: GCM under the TEK differs.
    assert zero[24:] != AESGCM(_TEK).encrypt(bytes(12), bytes(4096), b"\x16" + bytes(16))


def test_aead_packet_opens_only_under_the_same_keys() -> None:
    pfns = np.array([3, 1, 4], dtype=np.int64)
    pt = _pages(3, 4)
    pkt = np.frombuffer(_seal_aead(_channel(), pfns.tolist(), pt), dtype=np.uint8)
    got = np.empty_like(pt)
    rx = _channel()
    seqs = rx.open_aead("T", pkt, pfns, np.empty_like(pkt), got)
    assert np.array_equal(got, pt) and seqs.tolist() == [0, 1, 2]
    assert AEAD_RECORD == 4112
    # Both keys feed K_AEAD: another TEK, or another TIK, and no tag verifies.
    for tek, tik in ((bytes(16), _TIK), (_TEK, bytes(16))):
        with pytest.raises(PspError) as e:
            _channel(tek, tik).open_aead(
                "T", pkt, pfns, np.empty_like(pkt), np.empty_like(pt)
            )
        assert e.value.status == Status.BAD_MEASUREMENT


@settings(max_examples=60, deadline=None)
@given(pos=st.integers(0, 16 + 2 * 8 + 2 * 4112 - 1), bit=st.integers(0, 7))
def test_aead_any_bit_flip_is_refused(pos: int, bit: int) -> None:
    pfns = np.array([6, 2], dtype=np.int64)
    pt = _pages(2, 5)
    pkt = np.frombuffer(bytearray(_seal_aead(_channel(), pfns.tolist(), pt)), dtype=np.uint8)
    pkt[pos] ^= 1 << bit
    with pytest.raises(PspError) as e:
        _channel().open_aead(
            "T", pkt, pfns, np.empty_like(pkt), np.empty_like(pt)
        )
    if pos < 4:
        want = Status.INVALID_LENGTH  # the count no longer matches the command
    elif pos < 8:
        want = Status.UNSUPPORTED  # FLAGS
    elif pos < 16:
        want = Status.BAD_MEASUREMENT  # the sequence number: another nonce and AAD
    elif pos < 32:
        want = Status.INVALID_ADDRESS  # a GPA: not the command's page
    else:
        want = Status.BAD_MEASUREMENT  # ciphertext or tag
    assert e.value.status == want


def test_sev_and_sg_packets_match_independent_computation() -> None:
    def ctr(iv: bytes, data: bytes) -> bytes:
        return Cipher(algorithms.AES(_TEK), modes.CTR(iv)).encryptor().update(data)

    # SEV (page/contig): FLAGS, IV, MAC = HMAC(TIK, 0x02 ‖ FLAGS ‖ IV ‖ len ‖ len ‖ ct), ct.
    pt = _pages(2, 6)
    out = np.empty(52 + 8192, dtype=np.uint8)
    _channel().seal(pt.reshape(-1), np.empty(8192, dtype=np.uint8), out)
    pkt = out.tobytes()
    flags, iv, mac = struct.unpack("<I16s32s", pkt[:52])
    assert flags == 0 and pkt[52:] == ctr(iv, pt.tobytes())
    assert mac == hmac.digest(
        _TIK, struct.pack("<BI16sII", 0x02, 0, iv, 8192, 8192) + pkt[52:], "sha256"
    )
    # sg: header MAC over (0x12 ‖ FLAGS ‖ IV ‖ sg header ‖ table); per page
    # HMAC(TIK, 0x13 ‖ seq ‖ GPA ‖ page ciphertext); one CTR stream from IV.
    pfns = [9, 3]
    out = np.empty(52 + 16 + 2 * (40 + 4096), dtype=np.uint8)
    _channel().seal_sg(
        np.array(pfns), pt, np.empty_like(pt), out
    )
    pkt = out.tobytes()
    flags, iv, mac = struct.unpack("<I16s32s", pkt[:52])
    sgh, table, data = pkt[52:68], pkt[68 : 68 + 80], pkt[68 + 80 :]
    assert flags == 0 and sgh == struct.pack("<IIQ", 2, 0, 0)
    assert data == ctr(iv, pt.tobytes())
    assert mac == hmac.digest(_TIK, struct.pack("<BI16s", 0x12, 0, iv) + sgh + table, "sha256")
    for i, p in enumerate(pfns):
        entry = table[40 * i : 40 * (i + 1)]
        assert entry[:8] == struct.pack("<Q", p * 4096)
        want = hmac.digest(
            _TIK, struct.pack("<BQQ", 0x13, i, p * 4096) + data[4096 * i : 4096 * (i + 1)], "sha256"
        )
        assert entry[8:] == want


def test_trailer_is_count_and_mac_over_count_and_format() -> None:
    stream = hashlib.sha256(b"pages").digest()  # any 32 bytes: the receiver compares them

    def mode_byte(trailer: bytes) -> int:
        """The format byte under the MAC: count ‖ stream ‖ HMAC(TIK, 0x15 ‖ count ‖ b ‖ stream)."""
        count, sent = trailer[:8], trailer[8:40]
        hits = [
            b for b in range(256)
            if hmac.digest(_TIK, b"\x15" + count + bytes([b]) + sent, "sha256") == trailer[40:]
        ]
        assert len(hits) == 1, "the trailer is not count ‖ stream ‖ HMAC(TIK, 0x15 ‖ count ‖ mode ‖ stream)"
        return hits[0]

    none = _channel()
    t = none.trailer(stream)
    assert len(t) == 72 and t[:8] == struct.pack("<Q", 0) and t[8:40] == stream
    assert mode_byte(t) == 0xFF  # no page sent
    byte = {}
    for m in Batching:
        ch = _channel()
        ch.bind_mode(ch.check_mode("T", m))
        ch.seq = 7
        t = ch.trailer(stream)
        assert t[:8] == struct.pack("<Q", 7)
        byte[m] = mode_byte(t)
        # A receiver bound to the same format, that imported the same pages, accepts it...
        rx = _channel()
        rx.bind_mode(rx.check_mode("T", m))
        rx.seq = 7
        rx.check_trailer("T", t, stream)
        # ...not if what it imported differs from what was sent...
        with pytest.raises(PspError) as e:
            rx.check_trailer("T", t, hashlib.sha256(b"other pages").digest())
        assert e.value.status == Status.BAD_MEASUREMENT and "not the last ones sent" in str(e.value)
        # ...nor if a sender's stream digest was swapped in transit (it is under the MAC)...
        with pytest.raises(PspError) as e:
            rx.check_trailer("T", t[:8] + bytes(32) + t[40:], bytes(32))
        assert e.value.status == Status.BAD_MEASUREMENT and "MAC" in str(e.value)
        # ...and one bound to no format, or to another, does not.
        for other in [None, *Batching]:
            if other is not None and (other is m or {other, m} == {Batching.PAGE, Batching.CONTIG}):
                continue
            rx = _channel()
            if other is not None:
                rx.bind_mode(rx.check_mode("T", other))
            rx.seq = 7
            with pytest.raises(PspError) as e:
                rx.check_trailer("T", t, stream)
            assert e.value.status == Status.BAD_MEASUREMENT, (m, other)
    # page and contig are one format (SEV's); sg, aead and "none" are each their own
    assert byte[Batching.PAGE] == byte[Batching.CONTIG]
    assert len({byte[Batching.PAGE], byte[Batching.SG], byte[Batching.AEAD], 0xFF}) == 4
    # the values are fixed by the format, not by the enum's order
    assert (byte[Batching.PAGE], byte[Batching.SG], byte[Batching.AEAD]) == (0, 2, 3)
