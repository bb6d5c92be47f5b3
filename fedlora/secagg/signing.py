"""Secure-aggregation keys signed with the nodes' own keys, checked against a list of peers.

The sites' secure-aggregation keys travel through the server. A server that may be hostile
could hand a site keys of its own in place of a neighbour's (a man in the middle: every share
would then open for the server) or run sites of its own inside a neighbourhood (sybils). The
defence of Bell et al. (CCS 2020, the malicious setting) is a public-key infrastructure: every
site signs its round keys with a long-lived key that the other sites know without the server.

fedlora uses the key a node already has: the private key it authenticates with
(`fedlora client --auth-key`, from `fedlora certs`). The list of the other sites' public keys
(`--secagg-peers`: the consortium's .pub files, or one file of OpenSSH public keys) is the
node's own; the server cannot change it. A site signs

    domain | run | round | its node id | its c public key | its s public key

and a site that holds a list of peers accepts a neighbour only when its keys carry a valid
signature by a key of that list, no two neighbours (and not itself) share a signer, and the
statement names this run, round and that neighbour's node id (so a signature cannot be
replayed into another run, round or neighbour).

Before unmasking, every survivor signs the set of survivors the server names
(`survivors_statement`, the consistency stage), and a site that holds a list of peers
reveals its shares only for that same set, signed by at least the threshold of its
holders: a server cannot tell some sites that a site dropped and others that it survived.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

DOMAIN = b"fedlora secure-aggregation keys v1"
SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class SignatureRefused(ValueError):
    """A neighbour's keys without a valid signature by a distinct key of the peers list."""


def statement(run_id: int, server_round: int, node_id: int, c_key: bytes, s_key: bytes) -> bytes:
    """What a site signs: its two public keys of this run, round and node id."""
    head = b"".join(int(v).to_bytes(8, "little", signed=False)
                    for v in (run_id, server_round, node_id))
    return b"".join([DOMAIN, head, len(c_key).to_bytes(4, "little"), c_key,
                     len(s_key).to_bytes(4, "little"), s_key])


def survivors_statement(run_id: int, server_round: int, survivors: list[int]) -> bytes:
    """What a site signs at the consistency stage: the set of sites whose masked vectors the
    server says it holds (Bell et al.'s consistency check: one set for every site)."""
    return b"".join([DOMAIN, b" survivors", *(int(v).to_bytes(8, "little", signed=False)
                                             for v in (run_id, server_round,
                                                       *sorted(survivors)))])


def public_line(key: PublicKey) -> bytes:
    """A public key as one OpenSSH line without comment (how peers are compared)."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def load_signing_key(path: str | Path) -> SigningKey:
    """A node's private key (OpenSSH or PEM, as `fedlora certs` writes it); ValueError that
    names the file for anything else."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"secure aggregation: cannot read the node's key {path}: "
                         f"{err.strerror}") from None
    key: object
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            key = None
    if not isinstance(key, SigningKey):
        raise ValueError(f"secure aggregation: {path} is not an unencrypted ECDSA or Ed25519 "
                         f"private key in OpenSSH or PEM form (`fedlora certs --nodes NAME` "
                         f"writes one)")
    return key


def load_peers(path: str | Path) -> dict[bytes, str]:
    """The peers' public keys (OpenSSH line -> a name for messages) from a folder of *.pub
    files or from one file of OpenSSH public key lines (blank lines and # comments skipped);
    ValueError naming the file and line for anything unreadable, or for no key at all."""
    path = Path(path)
    files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
    peers: dict[bytes, str] = {}
    for file in files:
        try:
            lines = file.read_bytes().splitlines()
        except OSError as err:
            raise ValueError(f"--secagg-peers: cannot read {file}: {err.strerror}") from None
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                key = serialization.load_ssh_public_key(line)
            except (ValueError, TypeError, IndexError):
                raise ValueError(f"--secagg-peers: {file}:{number} is not an OpenSSH public key "
                                 f"line (like the .pub files `fedlora certs` writes)") from None
            if not isinstance(key, PublicKey):
                raise ValueError(f"--secagg-peers: {file}:{number} is not an ECDSA or Ed25519 "
                                 f"key")
            parts = line.split()
            name = parts[2].decode(errors="replace") if len(parts) > 2 else \
                f"{file.name}:{number}"
            peers[public_line(key)] = name
    if not peers:
        raise ValueError(f"--secagg-peers: no public key in {path} (expected a folder of .pub "
                         f"files or a file of OpenSSH public key lines)")
    return peers


def sign(key: SigningKey, message: bytes) -> tuple[bytes, bytes]:
    """(the signer's public key line, the signature of `message`)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(message)
    else:
        signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    return public_line(key.public_key()), signature


def valid(signer: bytes, signature: bytes, message: bytes) -> bool:
    """Whether `signature` of `message` verifies under the public key line `signer`."""
    try:
        key = serialization.load_ssh_public_key(signer)
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, IndexError):
        return False
    return True


@dataclass(frozen=True)
class SignedKeys:
    """One neighbour's keys as the server relays them."""

    node: int
    c_key: bytes
    s_key: bytes
    signer: bytes  # b"": unsigned
    signature: bytes


def check_neighbours(peers: dict[bytes, str], own_signer: bytes, run_id: int,
                     server_round: int, neighbours: list[SignedKeys]) -> None:
    """SignatureRefused unless every neighbour's keys are signed, for this run, round and its
    node id, by a key of `peers`, and no two of them (nor this node, `own_signer`) share one."""
    seen = {own_signer: "this node"} if own_signer else {}
    for n in neighbours:
        if not n.signer:
            raise SignatureRefused(
                f"secure aggregation: node {n.node}'s keys are unsigned, and this node accepts "
                f"only keys signed by a key of its --secagg-peers (every site needs --auth-key; "
                f"a server that relays unsigned keys could have put its own in their place)")
        if n.signer not in peers:
            raise SignatureRefused(
                f"secure aggregation: node {n.node}'s keys are signed by a key that is not in "
                f"this node's --secagg-peers: refused (a site of the consortium must be in the "
                f"list; otherwise the server may be running a site of its own)")
        if n.signer in seen:
            raise SignatureRefused(
                f"secure aggregation: node {n.node}'s keys are signed by {peers[n.signer]!r}, "
                f"which also signed {seen[n.signer]}'s: one site cannot be two neighbours")
        if not valid(n.signer, n.signature,
                     statement(run_id, server_round, n.node, n.c_key, n.s_key)):
            raise SignatureRefused(
                f"secure aggregation: the signature on node {n.node}'s keys (by "
                f"{peers[n.signer]!r}) does not verify for this run, round and node: the keys "
                f"were replaced or the signature replayed; refused")
        seen[n.signer] = f"node {n.node}"
