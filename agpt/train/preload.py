"""Imported by the host workers' fork server (agpt.train.workers.start_fork_server): it
imports what the workers run and loads the compiled host kernels there, once, so every worker
forked from the server starts with them loaded (each loading them itself took ~1 s on the H100
machine, after the server's own start)."""

from agpt.train.sources import load_host_kernels

load_host_kernels()
