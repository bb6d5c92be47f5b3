"""Test-only: a SuperNode that dies between pushing a reply message and pushing its arrays.

tests/test_multihost.py puts this folder on PYTHONPATH of one `fedlora client`, so every Python
process below it imports this module at start-up. Only in the SuperNode process
(`clients.supernode`) does it act: it wraps flwr 1.41's `_push_messages` so that, once the
reply to training message number $FEDLORA_TEST_DIE_AT_TRAIN (1 = the first this process
answers) has been pushed, and before any of its parts are, the process SIGKILLs itself. The
server then holds that reply message and never its arrays, as when a machine loses power in
between. It dies once: it first creates the file $FEDLORA_TEST_DIED.
"""

import os
import signal


def _cmdline() -> list[str]:
    with open("/proc/self/cmdline", "rb") as fh:
        return fh.read().decode(errors="replace").split("\0")


def _die_before_arrays(at: int, marker: str) -> None:
    """Wrap the SuperNode's reply push to SIGKILL this process between message and parts."""
    from flwr.supernode import start_client_internal as loop

    original = loop._push_messages
    answered = [0]

    def push_messages(state, object_store, send, push_object):  # type: ignore[no-untyped-def]
        def send_then_die(message, object_tree, runtime):  # type: ignore[no-untyped-def]
            pushed = send(message, object_tree, runtime)  # the reply message is on the server
            if message.metadata.message_type == "train":
                answered[0] += 1
                if answered[0] == at and not os.path.exists(marker):
                    with open(marker, "w") as fh:
                        fh.write(f"{message.metadata.reply_to_message_id}\n")
                    os.kill(os.getpid(), signal.SIGKILL)
            return pushed

        return original(state, object_store, send_then_die, push_object)

    loop._push_messages = push_messages


if "clients.supernode" in _cmdline() and os.environ.get("FEDLORA_TEST_DIE_AT_TRAIN"):
    _die_before_arrays(int(os.environ["FEDLORA_TEST_DIE_AT_TRAIN"]),
                       os.environ["FEDLORA_TEST_DIED"])
