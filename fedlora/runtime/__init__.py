"""The Flower processes of a fedlora run: starting them, pacing them, stopping them.

None of these imports torch, or Flower at module level: Flower's processes run as
subprocesses, and `pacing` patches Flower's modules only in the process that calls it.
`import fedlora` imports `quiet` first.

- `superlink.py`   `run_app` / `run_simulation`: start a private `flower-superlink` (simulation
                   on loopback, or a deployment server behind the fleet gate), register the
                   allowed SuperNode keys, `flwr run` the app, read its status back, clean up
                   (`fedlora simulate`, `fedlora server`)
- `supernode.py`   `run_supernode`: a client node's `flower-supernode`, its guard shims (only
                   fedlora's ClientApp runs) and the supervisor of its resident ClientApp
                   worker (`fedlora client`)
- `processes.py`   start a run's processes, find them (Ray's included), stop them all by PID;
                   the output folder's claim against an earlier, killed run
- `pacing.py`      every wait Flower puts into a round, and the value fedlora gives it
- `app_config.py`  a run config written as the throw-away Flower app's pyproject.toml
- `quiet.py`       what quiet output hides of the dependencies' warnings (--verbose: nothing)
"""
