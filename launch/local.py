#!/usr/bin/env python
"""Start N JAX processes on this machine, as N hosts would be started by SLURM or a TPU pod.

    python launch/local.py -n 2 --cpu_devices 2 -- python -m terdit_jax.main --config configs/demo.py

Each process gets JAX_COORDINATOR_ADDRESS=localhost:<port>, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i, which
terdit_jax.parallel.initialize_distributed passes to jax.distributed.initialize. With --cpu_devices K every
process runs on the CPU with K simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=K); with
--gpus_per_process G, process i sees GPUs [i·G, (i+1)·G) through CUDA_VISIBLE_DEVICES. Output lines are prefixed
with the process id. SIGTERM/SIGINT are forwarded to every process (preemption test); the exit status is the first
non-zero one of the processes (0 if all succeed), and a failed process makes the others stop.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num_processes", type=int, required=True)
    ap.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
    ap.add_argument("--cpu_devices", type=int, default=0, help="simulated CPU devices per process (0 = real devices)")
    ap.add_argument("--gpus_per_process", type=int, default=0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    port = args.port or free_port()
    procs = []
    for i in range(args.num_processes):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
               "JAX_NUM_PROCESSES": str(args.num_processes), "JAX_PROCESS_ID": str(i)}
        if args.cpu_devices:
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
        if args.gpus_per_process:
            g = args.gpus_per_process
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * g + k) for k in range(g))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      bufsize=1))

    def pump(i, p):
        for line in p.stdout:
            sys.stdout.write(f"[p{i}] {line}")
            sys.stdout.flush()

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for th in threads:
        th.start()

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    remaining = set(range(len(procs)))
    while remaining:
        for i in list(remaining):
            try:
                rc = procs[i].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            remaining.discard(i)
            if rc and not status:
                status = rc
                for j in remaining:  # a dead peer would leave the others blocked in a collective
                    procs[j].terminate()
    for th in threads:
        th.join(timeout=5)
    return status


if __name__ == "__main__":
    sys.exit(main())
