"""Test-only: a SuperNode that never sends its reply to one training message, so that a test
can SIGKILL it mid-round (after the server sent training, before the reply reached it).

tests/test_fleet16.py puts this folder on PYTHONPATH of some `fedlora client`s, so every Python
process below them imports this module at start-up. Only in the SuperNode process
(`clients.supernode`) does it act: it wraps flwr 1.41's `_push_messages` so that the reply to
training message number $FEDLORA_TEST_HOLD_AT_TRAIN (1 = the first this process answers) is
held: the process creates the file $FEDLORA_TEST_HELD and waits there until it is killed.
"""

import os
import threading


def _hold_reply(at: int, marker: str) -> None:
    """Wrap the SuperNode's reply push to hold reply number `at` to a training message."""
    from flwr.supernode import start_client_internal as loop

    original = loop._push_messages
    answered = [0]

    def push_messages(state, object_store, send, push_object):  # type: ignore[no-untyped-def]
        def hold_or_send(message, object_tree, runtime):  # type: ignore[no-untyped-def]
            if message.metadata.message_type == "train":
                answered[0] += 1
                if answered[0] == at:
                    with open(marker, "w") as fh:
                        fh.write(f"{message.metadata.reply_to_message_id}\n")
                    threading.Event().wait()  # until the test kills this process
            return send(message, object_tree, runtime)

        return original(state, object_store, hold_or_send, push_object)

    loop._push_messages = push_messages


with open("/proc/self/cmdline", "rb") as _fh:
    _argv = _fh.read().decode(errors="replace").split("\0")
if "clients.supernode" in _argv and os.environ.get("FEDLORA_TEST_HOLD_AT_TRAIN"):
    _hold_reply(int(os.environ["FEDLORA_TEST_HOLD_AT_TRAIN"]), os.environ["FEDLORA_TEST_HELD"])
