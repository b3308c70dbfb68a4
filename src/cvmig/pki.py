"""`cvmig pki`: a test CA and host certificates for the TLS channel (`cvmig.wire.tls`).

Writes, under DIR::

    DIR/ca-cert.pem  DIR/ca-key.pem     the CA (kept here; reused to add hosts later)
    DIR/NAME/                           one host's --tls-creds directory, QEMU's layout:
        ca-cert.pem  server-cert.pem  server-key.pem  client-cert.pem  client-key.pem

Each host certificate names the host (CN and a DNS or IP subject alternative name; for
``localhost`` also 127.0.0.1 and ::1), so a source checks the destination it connected
to, and a destination's ``tls-authz`` can name the sources it accepts. Keys are ECDSA
P-256, written 0600. For tests and labs: a real deployment uses its own CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cvmig.wire.tls import (
    CA_CERT,
    CLIENT_CERT,
    CLIENT_KEY,
    FILES,
    SERVER_CERT,
    SERVER_KEY,
    TlsCreds,
)

CA_KEY = "ca-key.pem"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_LOCAL_IPS = ("127.0.0.1", "::1")


class PkiError(Exception):
    """Bad input or a directory we will not overwrite; the message says which."""


def check_hosts(hosts: Sequence[str]) -> list[str]:
    """Host names (DNS names or IP addresses), each once; PkiError names a bad one."""
    out: list[str] = []
    for raw in hosts:
        h = raw.strip()
        if not h:
            raise PkiError("--hosts: an empty name; give NAME[,NAME...]")
        if not _is_ip(h) and not _HOSTNAME.match(h):
            raise PkiError(f"--hosts: {h!r} is neither a host name nor an IP address")
        if h in out:
            raise PkiError(f"--hosts: {h!r} given twice")
        out.append(h)
    if not out:
        raise PkiError("--hosts: give at least one NAME")
    return out


def create(directory: str | Path, hosts: Sequence[str], days: int = 365) -> list[Path]:
    """Create (or reuse) the CA in ``directory`` and one credential directory per host;
    return the host directories. Nothing is overwritten."""
    names = check_hosts(hosts)
    if not 1 <= days <= 36500:
        raise PkiError(f"--days must be 1..36500, got {days}")
    root = Path(directory).expanduser()
    if root.exists() and not root.is_dir():
        raise PkiError(f"{root}: exists and is not a directory")
    for h in names:
        taken = [f for f in FILES if (root / h / f).exists()]
        if taken:
            raise PkiError(f"{root / h}: already holds {', '.join(taken)}; remove it or "
                           "choose another directory (nothing was written)")
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ca(root, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    out = []
    for h in names:
        d = root / h
        d.mkdir(exist_ok=True)
        _write(d / CA_CERT, ca_pem, 0o644)
        for cert_name, key_name, usage in (
                (SERVER_CERT, SERVER_KEY, ExtendedKeyUsageOID.SERVER_AUTH),
                (CLIENT_CERT, CLIENT_KEY, ExtendedKeyUsageOID.CLIENT_AUTH)):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _host_cert(h, key, ca_key, ca_cert, usage, days)
            _write(d / key_name, _key_pem(key), 0o600)
            _write(d / cert_name, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        out.append(d)
    return out


def _ca(root: Path, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in ``root``: reused if there, else made."""
    key_path, cert_path = root / CA_KEY, root / CA_CERT
    if key_path.exists() or cert_path.exists():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError, TypeError) as e:
            raise PkiError(f"{root}: holds a CA that cannot be reused ({e}); remove "
                           f"{CA_CERT} and {CA_KEY} or choose another directory") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path}: not an ECDSA key made by `cvmig pki`")
        return key, cert
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cvmig test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert


def _host_cert(host: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
               ca_cert: x509.Certificate, usage: x509.ObjectIdentifier,
               days: int) -> x509.Certificate:
    sans: list[x509.GeneralName] = [_san(host)]
    if host == "localhost":
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in _LOCAL_IPS]
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def _san(host: str) -> x509.GeneralName:
    if _is_ip(host):
        return x509.IPAddress(ipaddress.ip_address(host))
    return x509.DNSName(host)


def _is_ip(h: str) -> bool:
    try:
        ipaddress.ip_address(h)
    except ValueError:
        return False
    return True


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (a key is never world-readable, not
    even for a moment); an existing file is an error, not overwritten."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PkiError(f"{path}: already exists; nothing was overwritten") from None
    except OSError as e:
        raise PkiError(f"{path}: cannot create ({e.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed the public files' mode


@click.command("pki")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--hosts", default="localhost", show_default=True, metavar="NAME[,NAME...]",
              help="One credential directory per host (a DNS name or an IP address).")
@click.option("--days", default=365, show_default=True, type=int,
              help="How long the certificates are valid.")
def pki(directory: Path, hosts: str, days: int) -> None:
    """Create a test CA and host certificates for --tls-creds, in QEMU's x509 layout.

    Give each host its own DIRECTORY/NAME as --tls-creds (it holds the CA's certificate,
    not its key). Running again with new --hosts reuses the CA in DIRECTORY.
    """
    try:
        made = create(directory, hosts.split(","), days)
    except PkiError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"CA: {directory / CA_CERT} (its key: {directory / CA_KEY}, keep it private)")
    for d in made:
        click.echo(f"{d.name}: --tls-creds {d}")


# -- the --tls-* options, shared by `cvmig migrate`, `cvmig vm` and `cvmig resolve` ------
def tls_options(f: Any) -> Any:
    """--tls-creds, --tls-authz and --tls-hostname (QEMU's tls-creds, tls-authz and
    tls-hostname migration parameters)."""
    for opt in reversed([
        click.option("--tls-creds", default=None, metavar="DIR",
                     help="Mutual TLS: this host's credential directory in QEMU's x509 "
                          "layout (`cvmig pki`). Both sides need it; without it, control "
                          "frames and shared pages are protected by a CRC only."),
        click.option("--tls-authz", default=None, metavar="NAME[,NAME...]",
                     help="As a destination: admit only sources whose certificate names "
                          "one of these (default: any the CA signed)."),
        click.option("--tls-hostname", default=None, metavar="NAME",
                     help="As a source: the name the destination's certificate must "
                          "carry (default: the host in the URI)."),
    ]):
        f = opt(f)
    return f


def load_tls(tls_creds: str | None, tls_authz: str | None = None,
             tls_hostname: str | None = None) -> TlsCreds | None:
    """The options' credentials, checked now; ValueError in one line if they are bad."""
    if not tls_creds:
        if tls_authz or tls_hostname:
            raise ValueError("--tls-authz and --tls-hostname need --tls-creds DIR")
        return None
    authz = tls_authz.split(",") if tls_authz else []
    return TlsCreds.load(tls_creds, authz, tls_hostname)
