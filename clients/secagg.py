"""Secure aggregation on a node: the stages of `fedlora.secagg.protocol` as Flower replies.

The training reply carries the node's two public keys and a commitment to its self-mask
seed instead of its factors; the quantised vector (`fedlora.secagg.vector`) and the secrets
wait in the node's `context.state` (ConfigRecord `STATE`, ArrayRecord `VECTOR`) for the
server's QUERY messages: share-keys (shares of the seed and of the mask key, sealed for each
neighbour), collect-masked (open the neighbours' shares, reply the masked vector, once),
consistency (when every site signs: sign the survivors the server names, once) and unmask
(for each neighbour the server names, the seed share if it survived or the key share if it
dropped, never both, once). Anything out of order, for another round, or asked twice is
refused: the node replies an error and drops out of the round.

A server may be hostile, so a node also refuses what only a hostile server asks for: no
neighbour (a sum of one), a threshold of half its holders or fewer, an unmask that names
fewer survivors among its holders than the threshold (an honest round cannot finish then;
a lying one could isolate a site). With `secagg-signing-key` (`fedlora client --auth-key`)
it signs its keys, and with `secagg-peers` it takes a neighbour's keys only when signed by a
distinct key of that list (`fedlora.secagg.signing`): no keys of the server's own; and it
unmasks only for the survivors it signed at consistency, signed by the threshold of its
holders: one set of survivors for every site. With `secagg-min-sites` it trains only for a
round that sampled that many sites and signs no smaller set of survivors.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import Tensor

from fedlora import wire
from fedlora.config import Settings
from fedlora.factors import flatten, from_peft, is_factor
from fedlora.secagg import protocol, signing
from fedlora.secagg.noise import noised_change, site_noise_std
from fedlora.secagg.vector import Layout, Quantizer, bits_for

STATE = "secagg-state"
VECTOR = "secagg-vector"
MASKED = "masked"  # ArrayRecord key of the masked vector in a collect-masked reply
SIGNING_KEY = "secagg-signing-key"  # node config: the key this node signs its keys with
PEERS = "secagg-peers"  # node config: the peers' public keys it accepts neighbours' keys from
MIN_SITES = "secagg-min-sites"  # node config: the fewest sites of a sum this node takes part in


class ProtocolRefused(ValueError):
    """A stage message this node will not answer (out of order, stale, or asked twice)."""


def ints(record: ConfigRecord, key: str, optional: bool = False) -> list[int]:
    """A list of integers of a record (ValueError, naming the key, for anything else; with
    `optional`, [] where the key is absent)."""
    if optional and key not in record:
        return []
    value = record.get(key)
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise ValueError(f"secure aggregation: {key!r} should be a list of integers")
    return [int(v) for v in value]


def blobs(record: ConfigRecord, key: str, optional: bool = False) -> list[bytes]:
    """A list of byte strings of a record (ValueError, naming the key, for anything else;
    with `optional`, [] where the key is absent)."""
    if optional and key not in record:
        return []
    value = record.get(key)
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise ValueError(f"secure aggregation: {key!r} should be a list of byte strings")
    return [v for v in value if isinstance(v, bytes)]


def blob(record: ConfigRecord, key: str) -> bytes:
    """A byte string of a record (ValueError, naming the key, for anything else)."""
    value = record.get(key)
    if not isinstance(value, bytes):
        raise ValueError(f"secure aggregation: {key!r} should be a byte string")
    return value


def integer(record: ConfigRecord, key: str) -> int:
    """An integer of a record (ValueError, naming the key, for anything else)."""
    value = record.get(key)
    if type(value) is not int:
        raise ValueError(f"secure aggregation: {key!r} should be an integer, got {value!r}")
    return int(value)


def node_key(path: str) -> signing.SigningKey:
    """The key this node signs with (`secagg-signing-key`), read from its file once while
    the file is unchanged (a resident node signs twice a round)."""
    try:
        stat = os.stat(path)
    except OSError:
        return signing.load_signing_key(path)  # which names what is wrong with the file
    return _node_key(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _node_key(path: str, mtime_ns: int, size: int) -> signing.SigningKey:
    return signing.load_signing_key(path)


def settings_of(msg: Message) -> ConfigRecord | None:
    """The secure-aggregation record of a server message (None: the round is not secure)."""
    return msg.content.config_records.get(wire.SECAGG)


def size_refusal(config: ConfigRecord, node_config: Mapping[str, Any]) -> str | None:
    """Why this node will not train for a secure sum of the sites the server says it sampled
    (None: it will): fewer than its `secagg-min-sites`. Fixed words and numbers only (sent to
    the server as they are)."""
    least = node_config.get(MIN_SITES)
    sites = integer(config, wire.SECAGG_SITES)
    if least is None or sites >= int(least):
        return None
    return (f"setting 'secure-aggregation': this node takes part only in sums of at least "
            f"{int(least)} sites (fedlora client --secagg-min-sites), and the server sampled "
            f"{sites} for this round; sample at least {int(least)} (min-train-nodes)")


def weight_ratio(num_examples: int, config: ConfigRecord) -> float:
    """What this site weighs in the secure sum: 1 with equal weights, else
    min(num-examples / max-weight, 1)."""
    if config.get(wire.SECAGG_EQUAL):
        return 1.0
    return min(num_examples / max(integer(config, wire.SECAGG_MAX_WEIGHT), 1), 1.0)


def with_noise(change: dict[str, Tensor], settings: Settings, rank: int,
               config: ConfigRecord) -> dict[str, Tensor]:
    """Distributed DP: this site's share of the Gaussian noise on its clipped change
    (`fedlora.secagg.noise`), sized by the sites the server sampled and secagg-dropout, drawn
    from a seed nobody else knows."""
    fed = settings.federation
    std = site_noise_std(fed.dp_noise_multiplier, fed.clip_norm,
                         integer(config, wire.SECAGG_SITES), integer(config, wire.SECAGG_DROPOUT))
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    return noised_change(change, std, settings.lora.scale(rank), generator)


def padded_rank(config: ConfigRecord) -> int | None:
    """The global rank a padded method's site lays its factors out at (None: the site sends
    its change at its own rank)."""
    value = config.get(wire.SECAGG_RANK)
    return None if value is None else integer(config, wire.SECAGG_RANK)


def padded(start: dict[str, Tensor], change: dict[str, Tensor], scale: float,
           global_rank: int) -> dict[str, Tensor]:
    """What a site of a padded method (hetlora) adds to the secure sum: its whole factors
    after training (`start` + `change`, PEFT scale at its own rank) in delta-W scale,
    zero-padded to `global_rank`; its plain tensors' change as they are."""
    after = {k: start[k].float() + v for k, v in change.items() if is_factor(k)}
    out = {k: v for k, v in change.items() if not is_factor(k)}
    for module, (b, a) in from_peft(after, scale).items():
        rank = b.shape[1]
        if rank > global_rank:
            raise ValueError(f"secure aggregation: this site's rank {rank} is above the "
                             f"global rank {global_rank} it is asked to pad to")
        big_b = b.new_zeros(b.shape[0], global_rank)
        big_a = a.new_zeros(global_rank, a.shape[1])
        big_b[:, :rank], big_a[:rank] = b, a
        out.update(flatten({module: (big_b, big_a)}))
    return out


def train_reply(context: Context, config: ConfigRecord, server_round: int,
                change: dict[str, Tensor], num_examples: int,
                group: Callable[[str], str] | None = None,
                trained: Collection[str] | None = None) -> tuple[ConfigRecord, int]:
    """After training: quantise weight x `change` (what this node's shared tensors moved
    from what it received) and keep it, with fresh keys and a fresh self-mask seed, in the
    node's state; (the public part for the server, values the range clipped). With weight
    groups (`group` of each key: lora-moe's experts), the site's weight goes to the groups it
    `trained` (None: all) and 0, with zero tensors, to the others."""
    layout = Layout.of({k: tuple(v.shape) for k, v in change.items()}, group)
    vector = layout.flatten({k: v.detach().double().cpu().numpy() for k, v in change.items()},
                            weight_ratio(num_examples, config), trained)
    clip = config.get(wire.SECAGG_CLIP)
    if not isinstance(clip, float):
        raise ValueError(f"secure aggregation: {wire.SECAGG_CLIP!r} should be a number")
    quantizer = Quantizer(clip, bits_for(integer(config, wire.SECAGG_SITES)),
                          len(layout.groups))
    x, clipped = quantizer.quantize(vector, np.random.default_rng(secrets.randbits(128)))
    c_key, s_key, seed = protocol.new_key(), protocol.new_key(), os.urandom(protocol.SEED_BYTES)
    public: dict[str, Any] = {wire.SECAGG_C_KEY: protocol.public_bytes(c_key),
                              wire.SECAGG_S_KEY: protocol.public_bytes(s_key),
                              wire.SECAGG_COMMITMENT: protocol.commitment(seed)}
    if (path := context.node_config.get(SIGNING_KEY)) is not None:  # fedlora client --auth-key
        public[wire.SECAGG_SIGNER], public[wire.SECAGG_SIGNATURE] = signing.sign(
            node_key(str(path)),
            signing.statement(context.run_id, server_round, context.node_id,
                              public[wire.SECAGG_C_KEY], public[wire.SECAGG_S_KEY]))
    context.state[STATE] = ConfigRecord({
        wire.SERVER_ROUND: server_round, "c": protocol.private_bytes(c_key),
        "s": protocol.private_bytes(s_key), "seed": seed, "stage": "train",
        "signer": public.get(wire.SECAGG_SIGNER, b"")})
    context.state[VECTOR] = ArrayRecord({"x": Array(x)})
    return ConfigRecord(public), clipped


def stage(msg: Message, context: Context) -> Message:
    """Answer one of the server's secure-aggregation QUERY messages."""
    config = settings_of(msg)
    assert config is not None
    name = str(config.get(wire.SECAGG_STAGE))
    state = context.state.config_records.get(STATE)
    server_round = config.get(wire.SERVER_ROUND)
    if state is None or state[wire.SERVER_ROUND] != server_round:
        raise ProtocolRefused(f"secure aggregation: stage {name!r} of round {server_round!r}, "
                              f"but this node trained no round of it (state for round "
                              f"{state[wire.SERVER_ROUND] if state else None!r})")
    handlers = {"share-keys": (("train",), share_keys),
                "collect-masked": (("share-keys",), masked),
                "consistency": (("collect-masked",), consistency),
                "unmask": (("collect-masked", "consistency"), unmask)}
    if name not in handlers:
        raise ProtocolRefused(f"secure aggregation: unknown stage {name!r}, expected one of "
                              f"{sorted(handlers)}")
    after, handler = handlers[name]
    if state["stage"] not in after:
        raise ProtocolRefused(f"secure aggregation: stage {name!r} must follow "
                              f"{' or '.join(map(repr, after))}, but this node's last stage "
                              f"was {state['stage']!r} (asked twice or out of order: refused)")
    content = handler(config, state, context)
    state["stage"] = name
    if name == "unmask":  # the round is over for this node: forget its secrets
        del context.state[STATE]
    return Message(content, reply_to=msg)


def share_keys(config: ConfigRecord, state: ConfigRecord, context: Context) -> RecordDict:
    """Shamir shares of the seed and of s's private key for the neighbours and this node,
    each sealed for its holder; the neighbours' public keys are kept for the next stages."""
    me, nodes = context.node_id, ints(config, wire.SECAGG_NODES)
    c_keys, s_keys = blobs(config, wire.SECAGG_C_KEY), blobs(config, wire.SECAGG_S_KEY)
    if me in nodes or len(set(nodes)) != len(nodes) or not len(nodes) == len(c_keys) == \
            len(s_keys):
        raise ProtocolRefused(f"secure aggregation: share-keys names neighbours {nodes} with "
                              f"{len(c_keys)} and {len(s_keys)} keys; expected distinct nodes "
                              f"other than this one ({me}), one key pair each")
    if not nodes:
        raise ProtocolRefused("secure aggregation: share-keys names no neighbour, so the sum "
                              "would be this node's update alone: refused")
    t, floor = integer(config, wire.SECAGG_THRESHOLD), (len(nodes) + 1) // 2 + 1
    if not floor <= t <= len(nodes) + 1:
        raise ProtocolRefused(f"secure aggregation: share-keys asks for a threshold of {t} "
                              f"shares among {len(nodes) + 1} holders; expected {floor} to "
                              f"{len(nodes) + 1} (more than half, or a server could collect "
                              f"both secrets of one site): refused")
    if (peers := context.node_config.get(PEERS)) is not None:  # fedlora client --secagg-peers
        signers = blobs(config, wire.SECAGG_SIGNER, optional=True)
        signatures = blobs(config, wire.SECAGG_SIGNATURE, optional=True)
        if not len(signers) == len(signatures) == len(nodes):
            signers = signatures = [b""] * len(nodes)
        try:
            signing.check_neighbours(
                signing.load_peers(str(peers)), blob(state, "signer"), context.run_id,
                integer(state, wire.SERVER_ROUND),
                [signing.SignedKeys(*keys) for keys in zip(nodes, c_keys, s_keys, signers,
                                                           signatures)])
        except signing.SignatureRefused as err:
            raise ProtocolRefused(str(err)) from None
        state["signers"] = signers  # to check their signatures of the survivors at unmask
    shares = protocol.split_secrets(integer(state, wire.SERVER_ROUND), me, [*nodes, me],
                                    blob(state, "seed"), blob(state, "s"), t)
    mine = shares.pop(me)
    state.update({"nodes": nodes, "c-keys": c_keys, "s-keys": s_keys, "threshold": t,
                  "held-nodes": [me], "held-seeds": [mine.seed], "held-keys": [mine.key]})
    own = blob(state, "c")
    sealed = [protocol.seal(shares[n], own, key) for n, key in zip(nodes, c_keys)]
    return RecordDict({wire.SECAGG: ConfigRecord({wire.SECAGG_NODES: nodes,
                                                  wire.SECAGG_SEALED: sealed})})


def masked(config: ConfigRecord, state: ConfigRecord, context: Context) -> RecordDict:
    """Open the shares the neighbours sealed for this node (any that does not open, or is
    for another round or pair, refuses the stage), then the masked vector, with pairwise
    masks for exactly the neighbours whose shares arrived."""
    me, server_round = context.node_id, integer(state, wire.SERVER_ROUND)
    known = dict(zip(ints(state, "nodes"), zip(blobs(state, "c-keys"), blobs(state, "s-keys"))))
    senders, sealed = ints(config, wire.SECAGG_NODES), blobs(config, wire.SECAGG_SEALED)
    if len(senders) != len(sealed) or len(set(senders)) != len(senders) or \
            not set(senders) <= set(known):
        raise ProtocolRefused(f"secure aggregation: shares from {senders}, expected at most "
                              f"one from each neighbour {sorted(known)}")
    nodes, seeds, keys = (ints(state, "held-nodes"), blobs(state, "held-seeds"),
                          blobs(state, "held-keys"))
    own = blob(state, "c")
    for sender, data in zip(senders, sealed):
        share = protocol.open_share(data, own, known[sender][0], server_round, sender, me)
        nodes.append(sender)
        seeds.append(share.seed)
        keys.append(share.key)
    state.update({"held-nodes": nodes, "held-seeds": seeds, "held-keys": keys})
    x = context.state.array_records[VECTOR]["x"].numpy()
    y = protocol.masked(x, me, blob(state, "seed"), blob(state, "s"),
                        {n: known[n][1] for n in senders})
    del context.state[VECTOR]
    return RecordDict({MASKED: ArrayRecord({MASKED: Array(y)})})


def consistency(config: ConfigRecord, state: ConfigRecord, context: Context) -> RecordDict:
    """Sign the set of survivors the server names (this node among them), once; a node with
    a peers list then unmasks only for this same set."""
    me, survivors = context.node_id, ints(config, wire.SECAGG_SURVIVORS)
    if me not in survivors or len(set(survivors)) != len(survivors):
        raise ProtocolRefused(f"secure aggregation: consistency names survivors {survivors}; "
                              f"expected distinct nodes, this one ({me}) among them")
    least = int(context.node_config.get(MIN_SITES, 0))
    if len(survivors) < least:
        raise ProtocolRefused(f"secure aggregation: consistency names {len(survivors)} "
                              f"survivors, fewer than this node's secagg-min-sites={least}")
    if (path := context.node_config.get(SIGNING_KEY)) is None:
        raise ProtocolRefused("secure aggregation: consistency asks this node to sign the "
                              "survivors, but it has no key to sign with (fedlora client "
                              "--auth-key)")
    _, signature = signing.sign(node_key(str(path)), signing.survivors_statement(
        context.run_id, integer(state, wire.SERVER_ROUND), survivors))
    state["signed"] = sorted(survivors)
    return RecordDict({wire.SECAGG: ConfigRecord({wire.SECAGG_SIGNATURE: signature})})


def consistent_refusal(config: ConfigRecord, state: ConfigRecord, context: Context,
                       survivors: list[int], dropped: list[int]) -> str | None:
    """Why a node with a peers list refuses this unmask (None: it does not): it must have
    signed the survivors, the server must name that same set to it, and at least the
    threshold of its holders must have signed that set."""
    if state["stage"] != "consistency":
        return ("this node has a peers list and unmasks only after it signed the survivors "
                "(the consistency stage), which the server skipped")
    signed = ints(state, "signed")
    claimed = ints(config, wire.SECAGG_SIGNED, optional=True)
    sigs = blobs(config, wire.SECAGG_SIGNATURE, optional=True)
    holders = {context.node_id, *ints(state, "nodes")}
    if sorted(claimed) != signed or len(sigs) != len(claimed) or \
            set(survivors) != set(signed) & holders or set(dropped) & set(signed):
        return (f"the survivors of this unmask ({sorted(survivors)} of its holders, signed "
                f"set {sorted(claimed)}) are not the set this node signed ({signed})")
    signers = dict(zip(ints(state, "nodes"), blobs(state, "signers")))
    signers[context.node_id] = blob(state, "signer")
    statement = signing.survivors_statement(context.run_id, integer(state, wire.SERVER_ROUND),
                                            signed)
    valid = [n for n, sig in zip(claimed, sigs)
             if n in signers and signing.valid(signers[n], sig, statement)]
    t = integer(state, "threshold")
    if len(valid) < t:
        return (f"{len(valid)} of this node's holders signed the survivors ({sorted(valid)}), "
                f"{t} needed: the server may have named other survivors to other sites")
    return None


def unmask(config: ConfigRecord, state: ConfigRecord, context: Context) -> RecordDict:
    """For each node the server says survived, this node's share of its seed; for each it
    says dropped, the share of its mask key; a node named in both lists, or this node among
    the dropped, refuses the stage (the server would learn both secrets of one site)."""
    survivors = ints(config, wire.SECAGG_SURVIVORS)
    dropped = ints(config, wire.SECAGG_DROPPED)
    both = sorted(set(survivors) & set(dropped)) + [context.node_id] * (
        context.node_id in dropped)
    if both:
        raise ProtocolRefused(f"secure aggregation: unmask names node(s) {both} both as "
                              f"survived and as dropped: refused")
    # Each survivor's seed needs t shares from its holders that survived: a server naming
    # fewer than t survivors among this node's own holders (this node among them) is asking
    # for secrets no honest round needs, e.g. to isolate one site by calling the rest dropped.
    holders = {context.node_id, *ints(state, "nodes")}
    named = sorted(set(survivors) & holders)
    t = integer(state, "threshold")
    if context.node_id not in survivors or len(named) < t:
        among = "among them" if context.node_id in survivors else "not among them"
        raise ProtocolRefused(f"secure aggregation: unmask names {len(named)} survivor(s) "
                              f"among this node's {len(holders)} holders ({named}), this node "
                              f"{among}; an honest round has this node and at least the "
                              f"threshold {t} there: refused")
    if context.node_config.get(PEERS) is not None and \
            (why := consistent_refusal(config, state, context, survivors, dropped)):
        raise ProtocolRefused(f"secure aggregation: {why}: refused")
    held = {n: i for i, n in enumerate(ints(state, "held-nodes"))}
    seed_shares, key_shares = blobs(state, "held-seeds"), blobs(state, "held-keys")
    seeds = [n for n in survivors if n in held]
    keys = [n for n in dropped if n in held]
    return RecordDict({wire.SECAGG: ConfigRecord({
        wire.SECAGG_SURVIVORS: seeds, wire.SECAGG_DROPPED: keys,
        wire.SECAGG_SEED_SHARES: [seed_shares[held[n]] for n in seeds],
        wire.SECAGG_KEY_SHARES: [key_shares[held[n]] for n in keys]})})
