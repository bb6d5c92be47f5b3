"""A hostile server against secure aggregation's nodes (clients.secagg, fedlora.secagg.signing).

The sites' keys travel through the server, which chooses the neighbours, the threshold and
whom it calls dropped. A node refuses what only a hostile server asks for: no neighbour, a
threshold of half its holders or fewer, an unmask that isolates a site by calling the others
dropped; and, with a list of its peers' keys, any neighbour key not signed by a distinct key
of that list for this run, round and node (a man in the middle, a sybil, a replayed
signature). The honest rounds through the same nodes still unmask to the plain sum.
Deployment across hosts with `--secagg-peers`: tests/test_multihost.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clients import secagg
from fedlora import wire
from fedlora.cli.certs import make_node_key
from fedlora.secagg import protocol, signing
from fedlora.secagg.vector import Quantizer, bits_for

RUN, ROUND = 5, 3
NODES = (11, 12, 13, 14)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """Node keys of four sites and of one the consortium never listed, and the peers file."""
    out = tmp_path_factory.mktemp("keys")
    for name in [*(f"site{n}" for n in NODES), "mallory"]:
        make_node_key(out, name)
    (out / "peers.txt").write_bytes(b"# the consortium\n" + b"".join(
        (out / f"site{n}.pub").read_bytes() for n in NODES))
    return out


class Fleet:
    """Real nodes (clients.secagg) of one round, each with its own context; the test plays
    the server, honest or not."""

    def __init__(self, keys: Path | None, peers: bool = True, server_round: int = ROUND,
                 run: int = RUN, nodes=NODES) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run, 0, 1
        self.nodes = list(nodes)
        self.ctx = {}
        for n in self.nodes:
            config: dict = {}
            if keys is not None:
                config[secagg.SIGNING_KEY] = str(keys / f"site{n}")
                if peers:
                    config[secagg.PEERS] = str(keys / "peers.txt")
            self.ctx[n] = Context(run_id=run, node_id=n, node_config=config,
                                  state=RecordDict(), run_config={})
        self.x = {n: torch.tensor([0.1 * i, -0.05 * i, 0.02]) for i, n in enumerate(self.nodes)}
        train = ConfigRecord({wire.SECAGG_SITES: len(self.nodes), wire.SECAGG_CLIP: 1.0,
                              wire.SECAGG_MAX_WEIGHT: 10, wire.SECAGG_EQUAL: True})
        self.pub = {n: secagg.train_reply(self.ctx[n], train, server_round,
                                          {"w": self.x[n]}, 5)[0] for n in self.nodes}
        self.round = server_round
        self.t = protocol.threshold(len(self.nodes), 1)

    def ask(self, node: int, stage: str, **values) -> RecordDict:
        """One stage message to `node`, as the server sends it; the node's reply content."""
        config = ConfigRecord({wire.SECAGG_STAGE: stage, wire.SERVER_ROUND: self.round,
                               **values})
        msg = Message(RecordDict({wire.SECAGG: config}), dst_node_id=node,
                      message_type=MessageType.QUERY)
        return secagg.stage(msg, self.ctx[node]).content

    def share_keys(self, node: int, peers=None, t=None, pub=None) -> dict[int, bytes]:
        """Stage share-keys for `node` (every other node its neighbour by default); the
        shares it sealed, by holder."""
        peers = [p for p in self.nodes if p != node] if peers is None else peers
        pub = pub or self.pub
        field = lambda key: [pub[p].get(key, b"") for p in peers]
        answer = self.ask(node, "share-keys", **{
            wire.SECAGG_NODES: peers, wire.SECAGG_THRESHOLD: self.t if t is None else t,
            wire.SECAGG_C_KEY: field(wire.SECAGG_C_KEY), wire.SECAGG_S_KEY: field(
                wire.SECAGG_S_KEY), wire.SECAGG_SIGNER: field(wire.SECAGG_SIGNER),
            wire.SECAGG_SIGNATURE: field(wire.SECAGG_SIGNATURE)})[wire.SECAGG]
        return dict(zip(answer[wire.SECAGG_NODES], answer[wire.SECAGG_SEALED]))

    def through_masking(self) -> np.ndarray:
        """Honest share-keys and collect-masked for every node: the sum of masked vectors."""
        sealed = {n: self.share_keys(n) for n in self.nodes}
        total = np.zeros(4, dtype=np.uint32)  # 3 values and the weight
        for n in self.nodes:
            senders = [p for p in self.nodes if p != n]
            reply = self.ask(n, "collect-masked", **{
                wire.SECAGG_NODES: senders, wire.SECAGG_SEALED: [sealed[p][n] for p in senders]})
            total += reply.array_records[secagg.MASKED][secagg.MASKED].numpy()
        return total


    def sign(self, node: int, survivors: list[int]) -> bytes:
        """Stage consistency: `node`'s signature of `survivors`."""
        answer = self.ask(node, "consistency", **{wire.SECAGG_SURVIVORS: survivors})
        return answer[wire.SECAGG][wire.SECAGG_SIGNATURE]

    def unmask(self, node: int, survivors: list[int], dropped: list[int],
               signatures: dict[int, bytes] | None = None, signed: list[int] | None = None
               ) -> ConfigRecord:
        proof = {} if signatures is None else {
            wire.SECAGG_SIGNED: signed or sorted(signatures),
            wire.SECAGG_SIGNATURE: [signatures.get(n, b"") for n in signed or
                                    sorted(signatures)]}
        return self.ask(node, "unmask", **{wire.SECAGG_SURVIVORS: survivors,
                                           wire.SECAGG_DROPPED: dropped, **proof})[wire.SECAGG]


def test_signed_keys_go_through_and_unmask_to_the_plain_sum(keys):
    """Every node signs its keys and the survivors, and checks both: the honest round's sum
    equals the plain sum."""
    fleet = Fleet(keys)
    assert all(fleet.pub[n][wire.SECAGG_SIGNER] == (keys / f"site{n}.pub").read_bytes()
               .rsplit(b" ", 1)[0] for n in NODES)
    total = fleet.through_masking()
    signatures = {n: fleet.sign(n, list(NODES)) for n in NODES}
    seeds: dict[int, list[bytes]] = {n: [] for n in NODES}
    for n in NODES:
        answer = fleet.unmask(n, list(NODES), [], signatures)
        for about, share in zip(answer[wire.SECAGG_SURVIVORS], answer[wire.SECAGG_SEED_SHARES]):
            seeds[about].append(share)
    plain = protocol.unmask(total, {n: protocol.rebuild(s, fleet.t) for n, s in seeds.items()},
                            {}, {}, {})
    quantizer = Quantizer(1.0, bits_for(len(NODES)), 1)
    summed = quantizer.dequantize(plain)[:3]
    expected = sum(x.double().numpy() for x in fleet.x.values())
    assert np.abs(summed - expected).max() <= len(NODES) / quantizer.levels


def test_a_server_that_swaps_in_keys_of_its_own_is_refused(keys):
    """A man in the middle: the server hands node 11 its own keys for node 12 (then every
    share 11 seals for 12 opens for the server). Unsigned, signed by a key outside the
    peers list, or under 12's real signature: refused each time."""
    fleet = Fleet(keys)
    mine = {wire.SECAGG_C_KEY: protocol.public_bytes(protocol.new_key()),
            wire.SECAGG_S_KEY: protocol.public_bytes(protocol.new_key())}
    mallory = signing.load_signing_key(keys / "mallory")
    signed_by_mallory = dict(zip((wire.SECAGG_SIGNER, wire.SECAGG_SIGNATURE), signing.sign(
        mallory, signing.statement(RUN, ROUND, 12, mine[wire.SECAGG_C_KEY],
                                   mine[wire.SECAGG_S_KEY]))))
    real = {k: fleet.pub[12][k] for k in (wire.SECAGG_SIGNER, wire.SECAGG_SIGNATURE)}
    for forged, reason in (({}, "unsigned"), (signed_by_mallory, "not in this node's"),
                           (real, "does not verify")):
        fleet = Fleet(keys)
        pub = {**fleet.pub, 12: ConfigRecord({**mine, **forged})}
        with pytest.raises(secagg.ProtocolRefused, match=reason):
            fleet.share_keys(11, pub=pub)


def test_one_site_cannot_be_two_neighbours_nor_a_signature_replayed(keys):
    """A sybil: the server presents node 12's signed keys again as node 13's. A replay: 12's
    signed keys of another round or run. Both refused; without a peers list they pass (the node
    cannot tell), which is why docs/privacy.md asks for --secagg-peers."""
    fleet = Fleet(keys)
    with pytest.raises(secagg.ProtocolRefused, match="one site cannot be two neighbours"):
        fleet.share_keys(11, pub={**fleet.pub, 13: fleet.pub[12]})
    for earlier in (Fleet(keys, server_round=ROUND - 1), Fleet(keys, run=RUN + 1)):
        fleet = Fleet(keys)  # 12's keys and signature of another round, or of another run
        with pytest.raises(secagg.ProtocolRefused, match="does not verify for this run"):
            fleet.share_keys(11, pub={**fleet.pub, 12: earlier.pub[12]})
    unchecked = Fleet(keys, peers=False)
    assert unchecked.share_keys(11, pub={**unchecked.pub, 13: unchecked.pub[12]})


def test_a_node_refuses_no_neighbour_and_a_threshold_of_half_or_less():
    """A sum of one site is that site's update; with t of half the holders or fewer, a
    server can collect one site's seed from some holders and its mask key from others."""
    fleet = Fleet(None)
    with pytest.raises(secagg.ProtocolRefused, match="names no neighbour"):
        fleet.share_keys(11, peers=[])
    for t in (1, 2, 5):  # 4 holders: 3 or 4
        with pytest.raises(secagg.ProtocolRefused, match="expected 3 to 4"):
            Fleet(None).share_keys(11, t=t)
    assert len(Fleet(None).share_keys(11, t=4)) == 3


def test_an_unmask_that_isolates_one_site_is_refused():
    """The server calls every site but 11 dropped to each holder in turn (each holder
    alone in the survivors with 11), to rebuild 11's seed and its neighbours' mask keys and
    read 11's update alone. Each holder sees fewer survivors than the threshold: refused.
    The same holders answer an honest unmask."""
    fleet = Fleet(None)
    fleet.through_masking()
    for holder in (12, 13, 14):
        others = [n for n in NODES if n not in (11, holder)]
        with pytest.raises(secagg.ProtocolRefused, match="threshold 3"):
            fleet.ask(holder, "unmask", **{wire.SECAGG_SURVIVORS: [11, holder],
                                           wire.SECAGG_DROPPED: others})
    with pytest.raises(secagg.ProtocolRefused, match="not among them"):
        fleet.ask(11, "unmask", **{wire.SECAGG_SURVIVORS: [12, 13, 14],
                                   wire.SECAGG_DROPPED: []})
    fleet = Fleet(None)
    fleet.through_masking()
    answer = fleet.ask(12, "unmask", **{wire.SECAGG_SURVIVORS: [11, 12, 13],
                                        wire.SECAGG_DROPPED: [14]})[wire.SECAGG]
    assert answer[wire.SECAGG_SURVIVORS] == [11, 12, 13] and answer[wire.SECAGG_DROPPED] == [14]


def test_peers_and_keys_load_from_what_fedlora_certs_writes_and_bad_files_say_where(keys,
                                                                                   tmp_path):
    folder = signing.load_peers(keys)  # every .pub of the folder
    assert sorted(folder.values()) == sorted(["fedlora-mallory",
                                              *(f"fedlora-site{n}" for n in NODES)])
    assert len(signing.load_peers(keys / "peers.txt")) == len(NODES)
    bad = tmp_path / "bad.txt"
    bad.write_bytes((keys / "site11.pub").read_bytes() + b"ssh-rsa not-base64!\n")
    with pytest.raises(ValueError, match="bad.txt:2 is not an OpenSSH public key"):
        signing.load_peers(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no public key"):
        signing.load_peers(tmp_path / "empty")
    with pytest.raises(ValueError, match="not an unencrypted ECDSA or Ed25519"):
        signing.load_signing_key(keys / "site11.pub")


def test_fedlora_client_passes_its_auth_key_and_peers_to_the_node(keys, tmp_path):
    from fedlora.cli.client import add_arguments, node_config, supernode_flags

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--server", "127.0.0.1:1", "--insecure", "--name", "a"]
    config = node_config(parser.parse_args([*base, "--auth-key", str(keys / "site11"),
                                            "--secagg-peers", str(keys / "peers.txt")]))
    assert config[secagg.SIGNING_KEY] == str((keys / "site11").resolve())
    assert config[secagg.PEERS] == str((keys / "peers.txt").resolve())
    with pytest.raises(ValueError, match="--secagg-peers needs --auth-key"):
        node_config(parser.parse_args([*base, "--secagg-peers", str(keys / "peers.txt")]))
    assert node_config(parser.parse_args([*base, "--secagg-min-sites", "3"]))[
        secagg.MIN_SITES] == 3
    with pytest.raises(ValueError, match="--secagg-min-sites 1: expected 2 or more"):
        node_config(parser.parse_args([*base, "--secagg-min-sites", "1"]))
    with pytest.raises(FileNotFoundError, match="--secagg-peers: .*missing does not exist"):
        node_config(parser.parse_args([*base, "--auth-key", str(keys / "site11"),
                                       "--secagg-peers", str(tmp_path / "missing")]))
    with pytest.raises(FileNotFoundError, match="--auth-key: .*missing does not exist"):
        node_config(parser.parse_args([*base, "--auth-key", str(tmp_path / "missing")]))
    with pytest.raises(FileNotFoundError, match="--root-certificates: .*ca.crt does not exist"):
        supernode_flags(parser.parse_args(["--server", "127.0.0.1:1", "--root-certificates",
                                           str(tmp_path / "ca.crt")]), {})


def test_a_node_reads_its_signing_key_once_until_the_file_changes(keys, tmp_path):
    path = tmp_path / "site"
    path.write_bytes((keys / "site11").read_bytes())
    first = secagg.node_key(str(path))
    assert secagg.node_key(str(path)) is first  # the same object: not read again
    stamp = path.stat().st_mtime_ns
    path.write_bytes((keys / "site12").read_bytes())  # another key in its place, later
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    again = secagg.node_key(str(path))
    assert signing.public_line(again.public_key()) == signing.public_line(
        signing.load_signing_key(keys / "site12").public_key())
    assert signing.public_line(again.public_key()) != signing.public_line(first.public_key())
    path.unlink()
    with pytest.raises(ValueError, match="cannot read the node's key"):
        secagg.node_key(str(path))


def test_a_server_that_names_different_survivors_to_different_sites_is_refused(keys):
    """The lie the consistency stage is for: sites 11 and 12 sign all four as survivors, 13
    and 14 sign a set without 12 (the server would rebuild 12's mask key from them and its
    seed from the others). Each site finds fewer than t = 3 of its holders' signatures on
    the set it signed: refused. Unmasking before signing, or for a set other than the one
    the site signed, is refused too."""
    fleet = Fleet(keys)
    fleet.through_masking()
    everyone, without_12 = list(NODES), [11, 13, 14]
    signatures = {11: fleet.sign(11, everyone), 12: fleet.sign(12, everyone),
                  13: fleet.sign(13, without_12), 14: fleet.sign(14, without_12)}
    with pytest.raises(secagg.ProtocolRefused, match="2 of this node's holders signed"):
        fleet.unmask(11, everyone, [], signatures, everyone)
    with pytest.raises(secagg.ProtocolRefused, match="2 of this node's holders signed"):
        fleet.unmask(13, without_12, [12], signatures, without_12)
    with pytest.raises(secagg.ProtocolRefused, match="not the set this node signed"):
        fleet.unmask(14, everyone, [], signatures, everyone)
    fleet = Fleet(keys)
    fleet.through_masking()
    with pytest.raises(secagg.ProtocolRefused, match="the server skipped"):
        fleet.unmask(11, everyone, [])


def test_a_node_joins_no_sum_smaller_than_its_minimum(keys):
    """secagg-min-sites (fedlora client --secagg-min-sites): the node refuses to train for
    a round that sampled fewer sites, and to sign a smaller set of survivors."""
    train = ConfigRecord({wire.SECAGG_SITES: 4})
    assert secagg.size_refusal(train, {}) is None
    assert secagg.size_refusal(train, {secagg.MIN_SITES: 4}) is None
    reason = secagg.size_refusal(train, {secagg.MIN_SITES: 5})
    assert reason is not None and "at least 5 sites" in reason and "sampled 4" in reason
    fleet = Fleet(keys)
    fleet.ctx[11].node_config[secagg.MIN_SITES] = 4
    fleet.through_masking()
    with pytest.raises(secagg.ProtocolRefused, match="fewer than this node's secagg-min-sites=4"):
        fleet.sign(11, [11, 12, 13])
    assert fleet.sign(12, [11, 12, 13])  # a node without a minimum signs it
