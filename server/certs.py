"""Certificates and keys for a deployment: `python -m server.certs OUT [--host NAME ...] [--nodes N]`.

Writes into OUT:
  ca.pem, ca.key              a private certificate authority (keep ca.key offline in production)
  superlink.pem, superlink.key  the SuperLink's TLS certificate, signed by the CA, valid for the
                              given host names / IP addresses (default: localhost, 127.0.0.1)
  node<i>.key, node<i>.pub    each SuperNode's EC P-384 key pair for node authentication; the
                              public keys are registered with the SuperLink (`flwr supernode register`)
Uses `cryptography` (a Flower dependency); private keys are written with mode 0600.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _write_key(path: Path, key, openssh: bool = False) -> None:
    """PKCS8 PEM for TLS keys; OpenSSH format for SuperNode keys (what flower-supernode reads)."""
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    os.chmod(path, 0o600)


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


def make_node_keys(out: Path, index: int) -> Path:
    """An EC P-384 key pair for SuperNode authentication; returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_key(out / f"node{index}.key", key, openssh=True)
    pub = out / f"node{index}.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return pub


def make_all(out: str | Path, hosts: list[str] | None = None, nodes: int = 2) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(out)
    make_server_cert(out, ca_key, ca_cert, hosts or ["localhost", "127.0.0.1"])
    for i in range(nodes):
        make_node_keys(out, i)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--host", action="append", help="a SuperLink host name or IP (repeat); default localhost, 127.0.0.1")
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    print(f"written to {make_all(args.out, args.host, args.nodes)}")


if __name__ == "__main__":
    main()
