"""Two nodes on one machine, for tests/serve/test_remote_logs.py.

``python two_nodes.py serve MNT --state S1 ...``: `deployfs serve` (node n1) with a second
node on the same store, as a cluster will have it: n2's record (its address and log port),
alive, and n2's own node agent and runtime with their own state directory (so its instances'
output is on "its" disk, not n1's); and n1's view reads other nodes' logs (RemoteLogs).
``python two_nodes.py logserver DIR ADDRESS PORT``: n2's log server, a process of its own
(so that killing it is n2 gone, for n1's view).

n2 is given by the environment: DEPLOYFS_N2_STATE, DEPLOYFS_N2_ADDRESS, DEPLOYFS_N2_LOG_PORT.
"""

import os
import sys
from functools import partial

import trio


def serve() -> None:
    from deployfs.cli.serve import main
    from deployfs.node.agent import NodeAgent
    from deployfs.node.runtime import LocalRuntime
    from deployfs.serve import local
    from deployfs.state.logclient import RemoteLogs
    from deployfs.state.records import INSTANCES, NodeRecord

    state, address, port = (os.environ[f"DEPLOYFS_N2_{k}"] for k in ("STATE", "ADDRESS", "LOG_PORT"))
    source = local.local_source

    def with_remote_logs(node, metrics=None, remote_logs=RemoteLogs()):  # type: ignore[no-untyped-def]
        return source(node, metrics, remote_logs=RemoteLogs())

    run = local.LocalNode.run

    async def two_nodes(self, *, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
        async with trio.open_nursery() as nursery:
            async def n1(*, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
                await run(self, task_status=task_status)
                nursery.cancel_scope.cancel()  # shutdown stopped n1's and n2's instances: n2's agent goes too
            await nursery.start(n1)
            nodes = self.engine.nodes
            nodes.put(NodeRecord("n2", address, log_port=int(port)))
            alive = nodes.alive
            nodes.alive = lambda name: name == "n2" or alive(name)
            agent = NodeAgent(self.store.records, LocalRuntime(state, ports=(21150, 21199)), "n2",
                              events=self.engine.events, state_dir=state, cache=self.store.cache(INSTANCES))
            await nursery.start(agent.run)
            task_status.started()

    local.local_source = with_remote_logs  # type: ignore[assignment]
    local.LocalNode.run = two_nodes  # type: ignore[method-assign]
    main()


def logserver(log_dir: str, address: str, port: str) -> None:
    from deployfs.node.logserver import LogServer
    trio.run(partial(LogServer(log_dir, address, int(port)).run))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()  # its arguments are `deployfs serve`'s
    else:
        logserver(*sys.argv[2:])
