"""Certificates and keys for a deployment.

On the coordinator's host: `python -m server.certs OUT [--host NAME ...]` writes into OUT
  ca.pem, ca.key              a private certificate authority (keep ca.key offline in production)
  superlink.pem, superlink.key  the SuperLink's TLS certificate, signed by the CA, valid for the
                              given host names / IP addresses (default: localhost, 127.0.0.1)
On each site's own host: `python -m server.certs OUT --site NAME` writes
  NAME.key, NAME.pub          the SuperNode's EC P-384 key pair for node authentication; only
                              NAME.pub leaves the site (the coordinator registers it with
                              `flwr supernode register`); no one else ever holds NAME.key
Uses `cryptography` (a Flower dependency). Private keys are created with mode 0600 atomically (a
0600 temporary file renamed into place), never written first and restricted after.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from grata.ledger import write_private

VALID_DAYS = 365


def _write_key(path: Path, key, openssh: bool = False) -> None:
    """PKCS8 PEM for TLS keys; OpenSSH format for SuperNode keys (what flower-supernode reads)."""
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    write_private(path, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgrata"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("fedgrata CA")).issuer_name(_name("fedgrata CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    _write_key(out / "ca.key", key)
    (out / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(out: Path, ca_key, ca_cert: x509.Certificate, hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_key(out / "superlink.key", key)
    (out / "superlink.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_site_key(out: str | Path, name: str) -> Path:
    """A site's EC P-384 key pair for SuperNode authentication, made on the site's own host; returns
    the public key's path (the only part that leaves the site)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_key(out / f"{name}.key", key, openssh=True)
    pub = out / f"{name}.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return pub


def make_all(out: str | Path, hosts: list[str] | None = None) -> Path:
    """The coordinator's CA and SuperLink certificate; no site's key (each site makes its own)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(out)
    make_server_cert(out, ca_key, ca_cert, hosts or ["localhost", "127.0.0.1"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--host", action="append", help="a SuperLink host name or IP (repeat); default localhost, 127.0.0.1")
    parser.add_argument("--site", help="make this site's own key pair instead (run it on the site's host)")
    args = parser.parse_args()
    if args.site:
        print(f"public key (send this file, and only this, to the coordinator): {make_site_key(args.out, args.site)}")
    else:
        print(f"written to {make_all(args.out, args.host)}")


if __name__ == "__main__":
    main()
