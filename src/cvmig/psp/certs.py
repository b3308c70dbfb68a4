"""Platform identity: SEV-format and AMD-format certificates, the chain, and its checks.

Chain (sev-protocol.md §1.7): ARK (self-signed) → ASK → CEK → PEK → PDH, and OCA → PEK
(the PEK carries two signatures, by the CEK and by the owner's OCA).

* SEV certificate, 2084 bytes (sev-tool `sevapi.h`): version u32, API major/minor u8,
  2 reserved, key usage u32, key algo u32, a 1028-byte public-key area (curve u32, qx and
  qy as 72-byte little-endian values, zero padding), then two signature slots, each
  (usage u32, algo u32, 512 bytes). The signed body is everything before the first slot.
  An ECDSA signature is r and s as 72-byte little-endian values.
* AMD certificate (ARK, ASK): version u32, key id (16 B), certifying id (16 B), key usage
  u32, 16 reserved, public exponent size and modulus size in bits (u32 each), then the
  exponent, the modulus and the signature, each modulus-sized and little-endian. Signed
  with RSA-PSS over SHA-384 (salt = digest length). With RSA-4096 this is 64 + 3 × 512 =
  1600 bytes, the Milan ASK size.

Simplifications, on purpose: the emulated AMD root (ARK/ASK) is RSA-2048 by default to
keep start-up fast (RSA-4096 works: ``rsa_bits=4096``); the CEK is a fresh P-384 key, not
one derived from fuses, signed by the emulated ASK with RSA-PSS/SHA-256 (algo RSA-SHA256);
PEK and PDH are signed with ECDSA P-384 over SHA-256, as on hardware.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from cvmig.psp.api import SEV_CERT_SIZE, PlatformCerts, PspError, Status

# Key usage codes (SEV API spec; sev-tool sevapi.h).
USAGE_ARK = 0x0000
USAGE_ASK = 0x0013
USAGE_INVALID = 0x1000
USAGE_OCA = 0x1001
USAGE_PEK = 0x1002
USAGE_PDH = 0x1003
USAGE_CEK = 0x1004

# Algorithm codes.
ALGO_INVALID = 0x000
ALGO_RSA_SHA256 = 0x001
ALGO_ECDSA_SHA256 = 0x002
ALGO_ECDH_SHA256 = 0x003
ALGO_RSA_SHA384 = 0x101

CURVE_P384 = 2
ECC_COORD = 72  # bytes per coordinate / signature integer in the SEV format
SIG_AREA = 512
_BODY_END = 0x414  # signed body: version .. public key
_SLOTS = (0x414, 0x61C)  # (usage, algo, signature) slot offsets
CERT_VERSION = 1

# The firmware API version this emulated platform reports (policy bits 16-31 are checked
# against it): SEV API 0.24, the last legacy-SEV spec revision.
API_MAJOR = 0
API_MINOR = 24

AMD_CERT_FIXED = 64


class CertError(PspError):
    """A certificate failed a format or signature check."""

    def __init__(self, status: Status, detail: str) -> None:
        super().__init__("certificate check", status, detail)


def _le(n: int, size: int) -> bytes:
    return n.to_bytes(size, "little")


# --- SEV format ---------------------------------------------------------------------


@dataclass(frozen=True)
class SevCert:
    """A parsed 2084-byte SEV certificate."""

    raw: bytes
    api_major: int
    api_minor: int
    usage: int
    algo: int
    public_key: ec.EllipticCurvePublicKey

    @classmethod
    def parse(cls, raw: bytes, what: str = "certificate") -> SevCert:
        if len(raw) != SEV_CERT_SIZE:
            raise CertError(
                Status.INVALID_CERTIFICATE, f"{what}: {len(raw)} bytes, a SEV cert is 2084"
            )
        version, major, minor, usage, algo, curve = struct.unpack_from("<IBBxxIII", raw, 0)
        if version != CERT_VERSION:
            raise CertError(Status.INVALID_CERTIFICATE, f"{what}: version {version}")
        if curve != CURVE_P384:
            raise CertError(Status.INVALID_CERTIFICATE, f"{what}: curve {curve}, want P-384")
        qx = int.from_bytes(raw[0x14 : 0x14 + ECC_COORD], "little")
        qy = int.from_bytes(raw[0x14 + ECC_COORD : 0x14 + 2 * ECC_COORD], "little")
        try:
            key = ec.EllipticCurvePublicNumbers(qx, qy, ec.SECP384R1()).public_key()
        except ValueError as e:
            raise CertError(Status.INVALID_CERTIFICATE, f"{what}: bad public key: {e}") from e
        return cls(bytes(raw), major, minor, usage, algo, key)

    def slot(self, usage: int) -> tuple[int, bytes] | None:
        """(algo, signature area) of the signature slot made by a key of ``usage``."""
        for off in _SLOTS:
            u, a = struct.unpack_from("<II", self.raw, off)
            if u == usage and a != ALGO_INVALID:
                return a, self.raw[off + 8 : off + 8 + SIG_AREA]
        return None

    @property
    def body(self) -> bytes:
        return self.raw[:_BODY_END]

    def key_bytes(self) -> bytes:
        """The public-key area: what identifies the key (used to compare OCAs)."""
        return self.raw[0x10:_BODY_END]


def _ecc_key_area(key: ec.EllipticCurvePublicKey) -> bytes:
    n = key.public_numbers()
    area = struct.pack("<I", CURVE_P384) + _le(n.x, ECC_COORD) + _le(n.y, ECC_COORD)
    return area.ljust(1028, b"\x00")


def _ecdsa_sig(key: ec.EllipticCurvePrivateKey, body: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA256())))
    return (_le(r, ECC_COORD) + _le(s, ECC_COORD)).ljust(SIG_AREA, b"\x00")


def _rsa_pss(hash_alg: hashes.HashAlgorithm) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hash_alg), salt_length=hash_alg.digest_size)


def make_sev_cert(
    public_key: ec.EllipticCurvePublicKey,
    usage: int,
    algo: int,
    signers: list[tuple[int, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]],
) -> bytes:
    """Build and sign a SEV certificate; ``signers`` is up to two (usage, private key)."""
    body = struct.pack("<IBBxxII", CERT_VERSION, API_MAJOR, API_MINOR, usage, algo)
    body += _ecc_key_area(public_key)
    assert len(body) == _BODY_END
    slots = b""
    for s_usage, s_key in signers:
        if isinstance(s_key, rsa.RSAPrivateKey):
            sig = s_key.sign(body, _rsa_pss(hashes.SHA256()), hashes.SHA256())[::-1]
            slots += struct.pack("<II", s_usage, ALGO_RSA_SHA256) + sig.ljust(SIG_AREA, b"\x00")
        else:
            slots += struct.pack("<II", s_usage, ALGO_ECDSA_SHA256) + _ecdsa_sig(s_key, body)
    slots = slots.ljust(2 * (8 + SIG_AREA), b"\x00")
    # An empty slot is usage INVALID (0x1000), algo INVALID.
    raw = bytearray(body + slots)
    for off in _SLOTS[len(signers) :]:
        struct.pack_into("<I", raw, off, USAGE_INVALID)
    assert len(raw) == SEV_CERT_SIZE
    return bytes(raw)


def verify_sev_signed(
    cert: SevCert, signer_usage: int, signer: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    what: str,
) -> None:
    """Check ``cert`` carries a valid signature by ``signer`` (a key of ``signer_usage``)."""
    slot = cert.slot(signer_usage)
    if slot is None:
        raise CertError(
            Status.INVALID_CERTIFICATE, f"{what}: no signature by usage 0x{signer_usage:x}"
        )
    algo, sig = slot
    try:
        if isinstance(signer, rsa.RSAPublicKey):
            if algo != ALGO_RSA_SHA256:
                raise CertError(Status.INVALID_CERTIFICATE, f"{what}: signature algo 0x{algo:x}")
            nbytes = signer.key_size // 8
            signer.verify(
                sig[:nbytes][::-1], cert.body, _rsa_pss(hashes.SHA256()), hashes.SHA256()
            )
        else:
            if algo != ALGO_ECDSA_SHA256:
                raise CertError(Status.INVALID_CERTIFICATE, f"{what}: signature algo 0x{algo:x}")
            r = int.from_bytes(sig[:ECC_COORD], "little")
            s = int.from_bytes(sig[ECC_COORD : 2 * ECC_COORD], "little")
            signer.verify(encode_dss_signature(r, s), cert.body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as e:
        raise CertError(Status.BAD_SIGNATURE, f"{what}: signature does not verify") from e


# --- AMD format ---------------------------------------------------------------------


@dataclass(frozen=True)
class AmdCert:
    """A parsed AMD-format certificate (ARK or ASK)."""

    raw: bytes
    key_id: bytes
    certifying_id: bytes
    usage: int
    public_key: rsa.RSAPublicKey
    signature: bytes

    @classmethod
    def parse(cls, raw: bytes, what: str) -> AmdCert:
        if len(raw) < AMD_CERT_FIXED:
            raise CertError(Status.INVALID_CERTIFICATE, f"{what}: {len(raw)} bytes, too short")
        version = struct.unpack_from("<I", raw, 0)[0]
        key_id, cert_id = raw[4:20], raw[20:36]
        usage = struct.unpack_from("<I", raw, 36)[0]
        exp_bits, mod_bits = struct.unpack_from("<II", raw, 56)
        if version != 1 or mod_bits not in (2048, 4096) or exp_bits not in (2048, 4096):
            raise CertError(Status.INVALID_CERTIFICATE, f"{what}: bad AMD cert header")
        nb = mod_bits // 8
        eb = exp_bits // 8
        if len(raw) != AMD_CERT_FIXED + eb + 2 * nb:
            raise CertError(Status.INVALID_CERTIFICATE, f"{what}: length {len(raw)}")
        e = int.from_bytes(raw[64 : 64 + eb], "little")
        n = int.from_bytes(raw[64 + eb : 64 + eb + nb], "little")
        try:
            key = rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError as err:
            raise CertError(Status.INVALID_CERTIFICATE, f"{what}: bad RSA key: {err}") from err
        return cls(bytes(raw), key_id, cert_id, usage, key, raw[64 + eb + nb :][::-1])

    @property
    def body(self) -> bytes:
        return self.raw[: len(self.raw) - len(self.signature)]

    def verify_by(self, signer: rsa.RSAPublicKey, what: str) -> None:
        try:
            signer.verify(self.signature, self.body, _rsa_pss(hashes.SHA384()), hashes.SHA384())
        except InvalidSignature as e:
            raise CertError(Status.BAD_SIGNATURE, f"{what}: signature does not verify") from e


def make_amd_cert(
    public_key: rsa.RSAPublicKey, key_id: bytes, certifying_id: bytes, usage: int,
    signer: rsa.RSAPrivateKey,
) -> bytes:
    nums = public_key.public_numbers()
    nb = public_key.key_size // 8
    body = struct.pack("<I", 1) + key_id + certifying_id + struct.pack("<I", usage)
    body += b"\x00" * 16 + struct.pack("<II", public_key.key_size, public_key.key_size)
    body += _le(nums.e, nb) + _le(nums.n, nb)
    sig = signer.sign(body, _rsa_pss(hashes.SHA384()), hashes.SHA384())
    return body + sig[::-1]


# --- identities ---------------------------------------------------------------------


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_pem(data: bytes) -> object:
    return serialization.load_pem_private_key(data, password=None)


@dataclass(frozen=True)
class AmdRoot:
    """The emulated AMD root of trust: ARK (self-signed) and ASK (signed by the ARK).

    Every emulated platform's CEK is signed by the ASK; a platform trusts ARKs it is given.
    """

    ark_cert: bytes
    ask_cert: bytes
    ask_key: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, rsa_bits: int = 2048) -> AmdRoot:
        ark = rsa.generate_private_key(65537, rsa_bits)
        ask = rsa.generate_private_key(65537, rsa_bits)
        ark_id, ask_id = os.urandom(16), os.urandom(16)
        ark_cert = make_amd_cert(ark.public_key(), ark_id, ark_id, USAGE_ARK, ark)
        ask_cert = make_amd_cert(ask.public_key(), ask_id, ark_id, USAGE_ASK, ark)
        return cls(ark_cert, ask_cert, ask)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "ark.cert").write_bytes(self.ark_cert)
        (d / "ask.cert").write_bytes(self.ask_cert)
        key = d / "ask.pem"
        key.write_bytes(_pem(self.ask_key))
        key.chmod(0o600)

    @classmethod
    def load(cls, directory: str | Path) -> AmdRoot:
        d = Path(directory)
        key = _load_pem((d / "ask.pem").read_bytes())
        assert isinstance(key, rsa.RSAPrivateKey)
        return cls((d / "ark.cert").read_bytes(), (d / "ask.cert").read_bytes(), key)


@dataclass(frozen=True)
class Owner:
    """A platform owner's OCA (self-signed). Platforms of one owner form a DOMAIN."""

    oca_cert: bytes
    oca_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> Owner:
        key = ec.generate_private_key(ec.SECP384R1())
        cert = make_sev_cert(key.public_key(), USAGE_OCA, ALGO_ECDSA_SHA256, [(USAGE_OCA, key)])
        return cls(cert, key)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "oca.cert").write_bytes(self.oca_cert)
        key = d / "oca.pem"
        key.write_bytes(_pem(self.oca_key))
        key.chmod(0o600)

    @classmethod
    def load(cls, directory: str | Path) -> Owner:
        d = Path(directory)
        key = _load_pem((d / "oca.pem").read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls((d / "oca.cert").read_bytes(), key)


@dataclass(frozen=True)
class PlatformIdentity:
    """One platform's keys and certificates. The PDH private key never leaves the PSP."""

    certs: PlatformCerts
    pdh_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, root: AmdRoot, owner: Owner | None = None) -> PlatformIdentity:
        owner = owner or Owner.generate()  # a self-owned platform: its own OCA
        cek = ec.generate_private_key(ec.SECP384R1())
        pek = ec.generate_private_key(ec.SECP384R1())
        pdh = ec.generate_private_key(ec.SECP384R1())
        cek_cert = make_sev_cert(
            cek.public_key(), USAGE_CEK, ALGO_ECDSA_SHA256, [(USAGE_ASK, root.ask_key)]
        )
        pek_cert = make_sev_cert(
            pek.public_key(), USAGE_PEK, ALGO_ECDSA_SHA256,
            [(USAGE_OCA, owner.oca_key), (USAGE_CEK, cek)],
        )
        pdh_cert = make_sev_cert(pdh.public_key(), USAGE_PDH, ALGO_ECDH_SHA256, [(USAGE_PEK, pek)])
        certs = PlatformCerts(
            pdh=pdh_cert, pek=pek_cert, oca=owner.oca_cert, cek=cek_cert,
            ask=root.ask_cert, ark=root.ark_cert,
        )
        return cls(certs, pdh)


# --- chain validation (what SEND_START does under the SEV and DOMAIN policy bits) ----


def _expect_usage(cert: SevCert, usage: int, algo: int, what: str) -> None:
    if cert.usage != usage:
        raise CertError(
            Status.INVALID_CERTIFICATE, f"{what}: key usage 0x{cert.usage:x}, want 0x{usage:x}"
        )
    if cert.algo != algo:
        raise CertError(Status.INVALID_CERTIFICATE, f"{what}: key algo 0x{cert.algo:x}")


def parse_pdh(raw: bytes, what: str = "PDH") -> SevCert:
    """Format sanity check of a PDH (all RECEIVE_START does with the sender's PDH)."""
    cert = SevCert.parse(raw, what)
    _expect_usage(cert, USAGE_PDH, ALGO_ECDH_SHA256, what)
    return cert


def validate_sev_chain(target: PlatformCerts, trusted_arks: list[bytes]) -> SevCert:
    """ARK → ASK → CEK → PEK → PDH, the ARK being one this platform trusts. Returns the PEK
    (its API version is the receiver's)."""
    ark = AmdCert.parse(target.ark, "ARK")
    if ark.usage != USAGE_ARK or ark.certifying_id != ark.key_id:
        raise CertError(Status.INVALID_CERTIFICATE, "ARK: not a self-certified root key")
    trusted = {AmdCert.parse(a, "trusted ARK").body for a in trusted_arks}
    if ark.body not in trusted:
        raise CertError(Status.BAD_SIGNATURE, "ARK: not a root this platform trusts")
    ark.verify_by(ark.public_key, "ARK")
    ask = AmdCert.parse(target.ask, "ASK")
    if ask.usage != USAGE_ASK:
        raise CertError(Status.INVALID_CERTIFICATE, f"ASK: key usage 0x{ask.usage:x}")
    if ask.certifying_id != ark.key_id:
        raise CertError(Status.BAD_SIGNATURE, "ASK: not certified by this ARK")
    ask.verify_by(ark.public_key, "ASK")
    cek = SevCert.parse(target.cek, "CEK")
    _expect_usage(cek, USAGE_CEK, ALGO_ECDSA_SHA256, "CEK")
    verify_sev_signed(cek, USAGE_ASK, ask.public_key, "CEK")
    pek = SevCert.parse(target.pek, "PEK")
    _expect_usage(pek, USAGE_PEK, ALGO_ECDSA_SHA256, "PEK")
    verify_sev_signed(pek, USAGE_CEK, cek.public_key, "PEK")
    pdh = parse_pdh(target.pdh)
    verify_sev_signed(pdh, USAGE_PEK, pek.public_key, "PDH")
    return pek


def validate_domain(target: PlatformCerts, local_oca: bytes) -> None:
    """OCA → PEK → PDH, and the target's OCA must be this platform's (same owner)."""
    oca = SevCert.parse(target.oca, "OCA")
    _expect_usage(oca, USAGE_OCA, ALGO_ECDSA_SHA256, "OCA")
    verify_sev_signed(oca, USAGE_OCA, oca.public_key, "OCA")
    pek = SevCert.parse(target.pek, "PEK")
    _expect_usage(pek, USAGE_PEK, ALGO_ECDSA_SHA256, "PEK")
    verify_sev_signed(pek, USAGE_OCA, oca.public_key, "PEK")
    pdh = parse_pdh(target.pdh)
    verify_sev_signed(pdh, USAGE_PEK, pek.public_key, "PDH")
    if oca.key_bytes() != SevCert.parse(local_oca, "local OCA").key_bytes():
        raise CertError(Status.POLICY_FAILURE, "DOMAIN: the target's OCA is not this owner's")


# --- the default emulated PKI, shared by every PSP on this machine ---------------------


def pki_dir() -> Path:
    """Where the emulated AMD root and the default owner live (``$CVMIG_PKI_DIR``)."""
    env = os.environ.get("CVMIG_PKI_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cvmig" / "pki"


def default_pki() -> tuple[AmdRoot, Owner]:
    """The machine's emulated AMD root and default owner, created once (under a file lock,
    so PSPs started together agree) so that every emulated host chains to the same ARK."""
    d = pki_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (d / "amd-root" / "ask.pem").exists():
            AmdRoot.generate().save(d / "amd-root")
        if not (d / "owner" / "oca.pem").exists():
            Owner.generate().save(d / "owner")
        return AmdRoot.load(d / "amd-root"), Owner.load(d / "owner")
