"""`fedlora certs`: a CA, a server certificate and node key pairs for a TLS deployment.

Writes into --out: `ca.key`/`ca.crt` (kept if they exist), `server.key`/`server.pem` for the
given host names and IPs (plus localhost and 127.0.0.1, which the server uses itself), and for
each --nodes name an ECDSA key pair `<name>` / `<name>.pub` in OpenSSH format, the form
Flower's SuperNode authentication takes. Give `ca.crt` to every node, `server.*` and the
`*.pub` files to the server (`fedlora server --certs-dir DIR --authorized-keys DIR/*.pub`),
and each private key to its node only.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

VALID_DAYS = 825


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `fedlora certs`."""
    p.add_argument("--out", type=Path, required=True, help="folder for the files")
    p.add_argument("--host", nargs="+", default=[],
                   help="names and IPs clients use to reach the server (its certificate is "
                        "valid for these, localhost and 127.0.0.1)")
    p.add_argument("--nodes", nargs="+", default=[], metavar="NAME",
                   help="make an authentication key pair for each node name")


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by the owner only."""
    path.write_bytes(data)
    os.chmod(path, 0o600)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def load_or_make_ca(out: Path):
    """The CA in `out` (made on first use): (private key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if (out / "ca.key").exists() and (out / "ca.crt").exists():
        key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
        return key, x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("fedlora CA"))
            .issuer_name(_name("fedlora CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    write_private(out / "ca.key", key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def subject_names(hosts: list[str]):
    """SAN entries: IPs as IP addresses, the rest as DNS names; always localhost, 127.0.0.1."""
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_server_cert(out: Path, hosts: list[str]) -> None:
    """server.key + server.pem signed by the CA, valid for `hosts`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, ca_cert = load_or_make_ca(out)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else "localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(subject_names(hosts)), critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_private(out / "server.key", key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (out / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(out: Path, name: str) -> None:
    """<name> (private) and <name>.pub: an ECDSA P-384 key pair in OpenSSH format."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    write_private(out / name, key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    (out / f"{name}.pub").write_bytes(public + f" fedlora-{name}\n".encode())


def run(args: argparse.Namespace) -> int:
    """Write the requested files and say what goes where."""
    if not args.host and not args.nodes:
        raise ValueError("nothing to make: pass --host (server certificate) and/or --nodes")
    bad = [n for n in args.nodes if not n.replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise ValueError(f"--nodes: names must be letters, digits, - or _, got {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.host:
        make_server_cert(args.out, args.host)
        print(f"server: {args.out}/server.pem + server.key for {', '.join(args.host)}; "
              f"CA: {args.out}/ca.crt (give it to every node)")
    for name in args.nodes:
        make_node_key(args.out, name)
        print(f"node {name}: private key {args.out}/{name} (to that node only), public key "
              f"{args.out}/{name}.pub (to the server's --authorized-keys)")
    if args.nodes:
        print("secure aggregation against a server that deviates: give every site all the "
              "sites' .pub files and start each with `fedlora client --auth-key <its key> "
              "--secagg-peers <those files>` (docs/privacy-secagg.md)")
    return 0
