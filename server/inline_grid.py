"""A Grid that runs every node's ClientApp in this process, one message at a time.

For tests and quick debugging (`engine=inline`): deterministic, no simulation engine to start. The
ClientApp sees the same Message and Context objects as under Flower's engines; an exception in it
becomes an error reply, as Flower's runtime makes it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

CLIENT_EXCEPTION = 1  # an error code for "the ClientApp raised"
POLL_S = 0.05  # how often a round with a timeout looks at the clock


class InlineGrid(Grid):
    def __init__(self, app: ClientApp, node_configs: list[dict], run_id: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """clock: seconds, for round timeouts; a test passes one it controls, so that a stalled site is
        left out when the test says the time is up, not when a loaded machine happens to be slow."""
        self.app, self.clock = app, clock
        self.contexts = {100 + i: Context(run_id=run_id, node_id=100 + i, node_config=dict(nc), state=RecordDict(),
                                          run_config={}) for i, nc in enumerate(node_configs)}
        self._pending: dict[str, Message] = {}
        self._run = None
        # Flower stamps new messages with the running task's identity; here this process is the task
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, run_id, SUPERLINK_NODE_ID

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def _handle(self, msg: Message) -> Message:
        try:
            return self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001 - what Flower's runtime does: an error reply
            return Message(Error(CLIENT_EXCEPTION, f"{type(exc).__name__}: {exc}"), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._handle(self._pending.pop(mid)) for mid in message_ids]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Without a timeout the nodes run one after another; with one, side by side in threads, and the
        replies not back in time are left out (as a SuperLink leaves out a stalled node's)."""
        ids = list(self.push_messages(messages))
        if timeout is None:
            return self.pull_messages(ids)
        pool = ThreadPoolExecutor(max_workers=max(1, len(ids)))
        futures = [pool.submit(self._handle, self._pending.pop(mid)) for mid in ids]
        deadline, pending = self.clock() + timeout, set(futures)
        while pending and self.clock() < deadline:
            pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED).not_done
        pool.shutdown(wait=False)
        return [f.result() for f in futures if f not in pending]


__all__ = ["InlineGrid"]
