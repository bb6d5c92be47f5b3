"""SecAgg+ (Bell et al., CCS 2020): the steps of one round as pure functions.

A site i has two fresh key pairs per round: c (to encrypt what it sends its neighbours) and
s (whose ECDH secret with a neighbour j seeds their pairwise mask), and a fresh 32-byte
self-mask seed b_i. It sends its masked vector

    y_i = x_i + PRG(b_i) + sum_{j in N(i), j > i} PRG(s_ij) - sum_{j in N(i), j < i} PRG(s_ij)

(mod 2^32), over its neighbours N(i) in a ring of degree k (`neighbours`), after giving each
neighbour (and itself) one Shamir share of b_i and one of s_i's secret key, t of which
rebuild either. In the sum over the survivors the pairwise masks between survivors cancel;
the server then rebuilds b_i of every survivor and s_j's key of every neighbour that dropped
after sharing, and removes those masks (`unmask`). An honest site never reveals both
secrets of one neighbour, so the server learns the sum and nothing of one site's x_i.

Cryptography is Flower's (`flwr.common.secure_aggregation`: ECDH + HKDF key agreement,
Fernet authenticated encryption, Shamir sharing) and `cryptography`'s (curve keys; AES-256
in counter mode as the mask generator). Flower's own `pseudo_rand_gen` is not used: it folds
the seed to 32 bits and draws from Mersenne Twister, so a masked vector could be unmasked by
trying 2^32 seeds.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)

CURVE = ec.SECP384R1()
SEED_BYTES = 32


class ShareRefused(ValueError):
    """A share that does not open with the pairwise key, or is not for this round and pair."""


# ---- keys -----------------------------------------------------------------------------------
def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh private key on the protocol's curve."""
    return ec.generate_private_key(CURVE)


def public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The public half of `key`, as it crosses the wire (X9.62 uncompressed point)."""
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """`key` as bytes (PKCS8 DER), to keep between stages or to share."""
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_der_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("secure aggregation: expected an elliptic-curve private key")
    return key


def load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    """A public key from the wire; ValueError when it is not a point of the curve."""
    return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, data)


def agreed(own: bytes, peer_public: bytes) -> bytes:
    """The 32-byte secret two sites share: ECDH of one's private key (PKCS8 DER) and the
    other's public key, through HKDF-SHA256 (Flower's `generate_shared_key`)."""
    return base64.urlsafe_b64decode(generate_shared_key(load_private(own),
                                                        load_public(peer_public)))


def commitment(seed: bytes) -> bytes:
    """SHA-256 of a self-mask seed: what a site publishes so that the server can tell a
    rebuilt seed from a forged one (the seed is 256 random bits: the hash hides it)."""
    return hashlib.sha256(seed).digest()


# ---- the neighbour graph and the threshold ---------------------------------------------------
def neighbours(nodes: list[int], degree: int) -> dict[int, list[int]]:
    """SecAgg+'s graph: the sorted nodes on a ring, each joined to degree / 2 on either side
    (degree 0, or >= len(nodes) - 1: every other node, i.e. SecAgg)."""
    ring = sorted(nodes)
    n = len(ring)
    if degree <= 0 or degree >= n - 1:
        return {v: [u for u in ring if u != v] for v in ring}
    half = max(1, degree // 2)
    return {v: sorted({ring[(i + d) % n] for d in range(-half, half + 1) if d}) for i, v
            in enumerate(ring)}


def threshold(holders: int, dropout: int) -> int:
    """Shares that rebuild a secret held by `holders` sites (the owner and its neighbours)
    when up to `dropout` may drop, but never half or fewer (then the server could collect
    both secrets of one site by claiming it dropped to some and survived to others)."""
    return max(holders - dropout, holders // 2 + 1)


# ---- shares ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Share:
    """One site's shares of its two secrets, for one holder, in one round."""

    round: int
    src: int
    dst: int
    seed: bytes  # a share of the self-mask seed b_src
    key: bytes  # a share of s_src's private key

    def pack(self) -> bytes:
        head = b"".join(int(v).to_bytes(8, "little") for v in (self.round, self.src, self.dst))
        return head + len(self.seed).to_bytes(4, "little") + self.seed + self.key

    @classmethod
    def unpack(cls, data: bytes) -> Share:
        if len(data) < 28:
            raise ShareRefused(f"a share of {len(data)} bytes, expected at least 28")
        r, src, dst = (int.from_bytes(data[i:i + 8], "little") for i in (0, 8, 16))
        n = int.from_bytes(data[24:28], "little")
        return cls(r, src, dst, data[28:28 + n], data[28 + n:])


def split_secrets(server_round: int, me: int, holders: list[int], seed: bytes,
                  s_key: bytes, t: int) -> dict[int, Share]:
    """Shamir t-of-len(holders) shares of the self-mask seed and of s's private key, one
    per holder (the site itself among them)."""
    holders = sorted(holders)
    if not 1 <= t <= len(holders):
        raise ValueError(f"secure aggregation: threshold {t} for {len(holders)} holders")
    seeds, keys = create_shares(seed, t, len(holders)), create_shares(s_key, t, len(holders))
    return {h: Share(server_round, me, h, seeds[i], keys[i]) for i, h in enumerate(holders)}


def seal(share: Share, own_c_key: bytes, peer_c_public: bytes) -> bytes:
    """`share` encrypted and authenticated for its holder (Fernet under the pair's key)."""
    return encrypt(base64.urlsafe_b64encode(agreed(own_c_key, peer_c_public)), share.pack())


def open_share(sealed: bytes, own_c_key: bytes, sender_c_public: bytes, server_round: int,
               sender: int, me: int) -> Share:
    """The share `sender` sealed for this site in this round; ShareRefused when it does not
    open with the pair's key (forged, altered or from another round's keys) or names
    another round, sender or holder (replayed or redirected)."""
    try:
        key = base64.urlsafe_b64encode(agreed(own_c_key, sender_c_public))
        share = Share.unpack(decrypt(key, sealed))
    except (InvalidToken, InvalidTag, ValueError) as err:
        raise ShareRefused(f"the share from node {sender} does not open with the key it "
                           f"agreed with node {me} this round ({type(err).__name__}): "
                           f"forged or altered") from None
    if (share.round, share.src, share.dst) != (server_round, sender, me):
        raise ShareRefused(f"the share from node {sender} says round {share.round}, from "
                           f"{share.src} to {share.dst}; expected round {server_round}, from "
                           f"{sender} to {me}: replayed or redirected")
    return share


def rebuild(shares: list[bytes], t: int) -> bytes:
    """The secret of at least t shares (ValueError with fewer)."""
    if len(shares) < t:
        raise ValueError(f"{len(shares)} shares, {t} needed")
    return combine_shares(shares[:t])


# ---- masks ----------------------------------------------------------------------------------
def prg(seed: bytes, size: int) -> np.ndarray:
    """`size` uniform integers mod 2^32 from a 32-byte seed: AES-256-CTR's key stream."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed of {len(seed)} bytes, expected {SEED_BYTES}")
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(stream.update(bytes(4 * size)), dtype=np.uint32).copy()


def pair_mask(me: int, peer: int, own_s_key: bytes, peer_s_public: bytes,
              size: int) -> np.ndarray:
    """What `me` adds for the pair (me, peer): +PRG(s_ij) when me < peer, else -PRG(s_ij)
    (mod 2^32), so that the pair's masks cancel in the sum."""
    mask = prg(agreed(own_s_key, peer_s_public), size)
    return mask if me < peer else np.negative(mask)  # uint32: -m wraps mod 2^32


def masked(x: np.ndarray, me: int, seed: bytes, own_s_key: bytes,
           peers_s_public: dict[int, bytes]) -> np.ndarray:
    """y = x + PRG(b) + the pairwise masks with `peers` (the neighbours that shared), mod 2^32."""
    y = x.astype(np.uint32) + prg(seed, x.size)
    for peer, public in sorted(peers_s_public.items()):
        y += pair_mask(me, peer, own_s_key, public, x.size)
    return y


def unmask(total: np.ndarray, seeds: dict[int, bytes], dropped_keys: dict[int, bytes],
           s_public: dict[int, bytes], peers: dict[int, list[int]]) -> np.ndarray:
    """The sum of the survivors' x from the sum of their masked vectors: minus each
    survivor's PRG(b_i) (`seeds`: survivor -> b_i), minus the masks every survivor added
    for a neighbour that dropped after sharing (`dropped_keys`: node -> s's private key;
    `peers`: node -> its neighbours that shared)."""
    out = total.astype(np.uint32).copy()
    for seed in seeds.values():
        out -= prg(seed, out.size)
    for gone, key in dropped_keys.items():
        for survivor in peers[gone]:
            if survivor in seeds:  # survivor added pair_mask(survivor, gone, ...)
                out -= pair_mask(survivor, gone, key, s_public[survivor], out.size)
    return out
