"""The resident ClientApp worker: one process per node that runs every ClientApp task of every
run, so the base model is loaded once per node (on the GPU where there is one) instead of once
per message.

Flower 1.41 starts a fresh `flwr-clientapp` process for each message a SuperNode receives
(train, evaluate, query), and each one imports torch, transformers and peft and loads the base
model again. It has no supported long-lived ClientApp (flwrlabs/flower#3670). fedlora keeps
Flower's own machinery for claiming a task and only moves the work:

    SuperNode -> SuperExec (Flower's, claims the task, gets its token)
              -> `flwr-clientapp` = clients/app_guard.py, a light process (no torch)
                 -- token over a Unix socket -->  this worker (torch, the model, the caches)

The worker then does what `flwr-clientapp` itself does with a token (pull the message, the
context and the app bundle from the SuperNode's runtime API, check the bundle, run
`clients.client_app:app`, push the reply and the updated context, heartbeat while it runs),
in this process, one task at a time. `context.state` still round-trips through the SuperNode
exactly as with Flower's own ClientApp process; the module-level caches of
`clients.client_app` (WORKSPACE: base models; DATA: tokenized splits) survive across messages
and rounds. An exception while handling a task becomes an error reply, as Flower's does, and
never ends the worker. A task of a new run (another app bundle hash or run id) is logged and
starts with a fresh data cache (the node's files may have changed between runs); the base
model stays loaded. `fedlora client` starts the worker beside its SuperNode and starts it
again if it dies (`fedlora.runtime.supernode.run_supernode`); `--isolation subprocess` runs
without it.

Code changes on the node need a restart of `fedlora client`: the worker imports fedlora once.
This relies on Flower internals (`flwr.supernode.runtime.run_clientapp` and the runtime HTTP
client); `check_flower` refuses any flwr other than 1.41.*.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.app_guard import BundleRefused, bundle_problem, node_logging
from fedlora.runtime.pacing import OBJECT_BACKOFF_S, TASK_INPUT_MAX_S

FLOWER_SERIES = "1.41."  # the flwr this worker's use of Flower internals was written for
log = logging.getLogger("fedlora.worker")


def check_flower(version: str | None = None) -> str | None:
    """Why the installed flwr cannot run the resident worker (None: it is 1.41.*)."""
    if version is None:
        from importlib.metadata import version as installed

        version = installed("flwr")
    if version.startswith(FLOWER_SERIES):
        return None
    return (f"the resident ClientApp worker uses Flower {FLOWER_SERIES}* internals, but flwr "
            f"{version} is installed: reinstall fedlora's pinned dependencies (make install), "
            f"or start the node with --isolation subprocess")


@dataclass
class Task:
    """What `flwr-clientapp` was started with: where the runtime API is, and the task token."""

    address: str
    token: str
    insecure: bool
    certificates: bytes | None


def parse_task(argv: list[str]) -> Task:
    """The task a `flwr-clientapp ARGV` command line describes (Flower's own parser)."""
    from flwr.common.args import try_obtain_flwr_app_token
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.cli.flwr_clientapp import _parse_args_run_flwr_clientapp

    args = _parse_args_run_flwr_clientapp().parse_args(argv)
    token = try_obtain_flwr_app_token(args)
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    return Task(args.runtime_api_address, token, bool(args.insecure), certificates)


class Worker:
    """Runs ClientApp tasks one after another in this process."""

    def __init__(self) -> None:
        """Import the ClientApp (torch, transformers, peft) once."""
        from clients import client_app

        self.client_app = client_app
        self.lock = threading.Lock()  # one task at a time: they share the model
        self.run: tuple[int, str] | None = None  # (run id, app bundle hash) of the last task

    def new_run(self, run_id: int, fab_hash: str) -> None:
        """A task of another run than the last: start it with a fresh data cache."""
        if self.run == (run_id, fab_hash):
            return
        if self.run is not None:
            log.info("a new run %d (app bundle %s): the base model stays loaded, the data "
                     "cache starts afresh", run_id, fab_hash[:12])
            self.client_app.DATA.clear()
        self.run = (run_id, fab_hash)

    def handle(self, argv: list[str]) -> int:
        """Run the task `flwr-clientapp ARGV` names; its exit code (0: the app succeeded)."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime import run_clientapp as runtime

        task = parse_task(argv)
        client, retries = runtime_client(task)
        message = context = reply = heartbeat = None
        status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
        stale = False
        try:
            heartbeat = HeartbeatSender(task_heartbeat(client))
            heartbeat.start()
            try:
                # Outside the lock: a task whose message never arrives (its run was stopped
                # while the SuperNode received it, and Flower leaves the task pending) must not
                # keep the next run's tasks waiting for the model.
                message, context, run, fab, identity = pull_task_input(client)
            except Exception as exc:
                if stale_token(exc):
                    log.warning("the SuperNode no longer honours this task's token (it gave "
                                "up waiting for it and starts the task again): skipped")
                    stale = True
                else:
                    log.exception("could not pull the task's input from the SuperNode")
                details = f"{type(exc)}:<'{exc}'>"
                return code
            with self.lock:
                try:
                    set_identity(identity)  # Flower's per-process task globals: this task's
                    problem = bundle_problem(fab.content)
                    if problem:
                        raise BundleRefused(f"refused by the node: {problem}")
                    self.new_run(run.run_id, fab.hash_str)
                    reply = self.client_app.app(message=message, context=context)
                    status, details, code = SubStatus.COMPLETED, "", 0
                except Exception as exc:  # the server gets an error reply, as from Flower's
                    log.exception("the ClientApp raised an exception")
                    details = f"{type(exc)}:<'{exc}'>"
                    if message is not None:
                        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                              reason=details), reply_to=message)
                if reply is not None and context is not None:
                    try:
                        runtime.push_message(client, reply, context)
                    except Exception:
                        log.exception("could not push the reply to the SuperNode")
                        status, details, code = SubStatus.FAILED, "reply not pushed", 1
        finally:
            retries.max_tries = 1  # as flwr-clientapp on exit: never block on the last push
            try:
                if not stale:  # nothing to report under a token the SuperNode dropped
                    runtime.push_task_output(client=client, context=context,
                                             sub_status=status, details=details)
            except Exception as exc:  # the token went stale while the task ran
                if not stale_token(exc):
                    raise
                log.warning("the SuperNode no longer honours this task's token: its "
                            "output is dropped")
            if heartbeat is not None:
                heartbeat.stop()
            client.close()
        return code


def set_identity(identity: tuple[int, int, int]) -> None:
    """Flower's TaskIdentity (task id, run id, node id) of the task about to run."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = identity


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any, tuple[int, int, int]]:
    """(message, context, run, app bundle, task identity) of the task: `pull_task_input` of
    Flower's run_clientapp, with fedlora's first back-off for message parts not stored yet
    (Flower's 1 s was often paid by a train message) and at most TASK_INPUT_MAX_S of waiting
    for them (Flower's: 2 hours)."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree

    res = client.PullTaskInput(PullTaskInputRequest())
    identity = (res.task_id, res.run.run_id, res.context.node_id)
    set_identity(identity)
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), \
        fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task at the SuperNode's runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=OBJECT_BACKOFF_S, max_time=TASK_INPUT_MAX_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's: not in the tree
    return message, context, run, fab, identity


def runtime_client(task: Task) -> tuple[Any, Any]:
    """An HTTP client of the SuperNode's runtime API carrying the task's token, as
    `flwr-clientapp` makes one, and its retry policy."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    retries = make_simple_http_retry_invoker()
    retries.should_giveup = stale_token_ends_the_task(retries.should_giveup)
    client = RuntimeHttpClient.from_server_address(
        server_address=task.address, insecure=task.insecure,
        root_certificates=task.certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(task.token)],
        retry_invoker=retries)
    return client, retries


def stale_token(exc: BaseException) -> bool:
    """Whether `exc` is the SuperNode's 401 for a task token it no longer honours."""
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 401


def stale_token_ends_the_task(should_giveup: Any) -> Any:
    """Flower's retry policy, except for a 401: the SuperNode no longer honours this task's
    token (it gave up waiting for the task, as when the hand-off waited in the socket's backlog
    while the worker imported torch on a loaded machine, and runs it again with a new token).
    Flower's policy then SIGINTs its own process, which here would end the worker with every
    task it holds and its loaded model; this one gives up on the request, which ends only this
    task."""
    def giveup(exc: Exception) -> bool:
        return True if stale_token(exc) else bool(should_giveup(exc))
    return giveup


def task_heartbeat(client: Any) -> Any:
    """The task heartbeat: Flower's own raises SIGINT in the process when the SuperNode no
    longer knows the task (which would end the worker); this one only logs it."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            if stale_token(err):  # the task's pulls and pushes fail and end it
                return True
            raise
        if not res.success:
            log.warning("the SuperNode no longer knows the task being run (its run was "
                        "stopped); its result will be discarded")
        return True
    return beat


def serve(sock: socket.socket, worker: Worker) -> None:
    """Answer hand-offs from `clients.app_guard` forever: one JSON line {"argv": [...]} in,
    one JSON line {"code": N} out, each connection in a thread of its own (tasks queue on the
    worker's lock; their heartbeats start at once)."""
    def answer(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            code = 1
            try:
                request = json.loads(stream.readline() or b"{}")
                code = worker.handle([str(a) for a in request.get("argv", [])])
            except BaseException:
                log.exception("a ClientApp task failed before it could run")
            try:
                stream.write(json.dumps({"code": code}).encode() + b"\n")
                stream.flush()
            except OSError:
                pass  # the hand-off process is gone; nothing waits for the code

    while True:
        conn, _ = sock.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """`python -m clients.worker --socket PATH`."""
    parser = argparse.ArgumentParser(
        prog="python -m clients.worker",
        description="fedlora's resident ClientApp worker (started by `fedlora client`).")
    parser.add_argument("--socket", type=Path, required=True,
                        help="Unix socket the node's flwr-clientapp hand-offs connect to")
    args = parser.parse_args(argv)
    node_logging()
    problem = check_flower()
    if problem:
        print(f"[fedlora] error: {problem}", file=sys.stderr, flush=True)
        return 2
    # Listen before the heavy imports: a task that comes meanwhile waits in the backlog.
    args.socket.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(args.socket))
    sock.listen(16)
    started = time.perf_counter()
    worker = Worker()
    log.info("ClientApp worker ready (pid %d, imports %.1f s): the base model is loaded once "
             "and kept across messages and runs", os.getpid(), time.perf_counter() - started)
    try:
        serve(sock, worker)
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()
        args.socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
