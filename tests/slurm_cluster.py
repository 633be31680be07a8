"""A one-node SLURM cluster on this machine, for the tests (and by hand: ``python tests/slurm_cluster.py``).

munged, slurmctld and slurmd run from the Debian packages (``apt-get install slurm-wlm munge``) as
the current user, with everything under one folder: the munge key and socket, ``slurm.conf``, the
controller's state, the node's spool and the logs. No cgroups (``proctrack/linuxproc``,
``task/none``), no accounting daemon (``sacct`` is unavailable; ``squeue`` and ``scontrol`` work),
and short timers so that a requeued job runs again within seconds (``cred_expire=10``,
``sched_interval=5``). Every client finds the cluster through ``SLURM_CONF``
(``Cluster.env``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why no cluster can start here (a binary missing), or None."""
    for name in (*DAEMONS, "sbatch", "squeue", "scontrol", "sinfo"):
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists():
            return f"{name} not found: apt-get install slurm-wlm munge"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 1024
    return 4096


@dataclass
class Cluster:
    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment a client (sbatch, squeue, submitit) needs to reach this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        host = socket.gethostname().split(".")[0]
        r = self.root
        self.conf.write_text(
            f"""ClusterName=resnetsweep
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmdUser={user}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )

    def start(self, timeout: float = 60) -> Cluster:
        r = self.root
        for d in ("munge", "state", "spool"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.write_conf()
        munge = r / "munge"
        self._spawn(
            [
                _binary("munged"),
                "--foreground",
                "--force",
                f"--socket={munge}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={munge}/munged.pid",
                f"--log-file={munge}/munged.log",
                f"--seed-file={munge}/munged.seed",
            ],
            "munged",
        )
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged did not create its socket")
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf)], "slurmd")
        self._wait(self.idle, timeout, "the node did not become idle")
        return self

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(
            subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        )

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{what}: {dead[0].args[0]} exited {dead[0].returncode}; see {self.root}/*.out")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f} s; see the logs in {self.root}")

    def run(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def idle(self) -> bool:
        out = self.run("sinfo", "-h", "-o", "%t", check=False).split()
        return bool(out) and all(state == "idle" for state in out)

    def jobs(self) -> list[dict[str, str]]:
        """squeue's jobs (all states it still shows): id, name, state, reason."""
        out = self.run("squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%r")
        return [dict(zip(("id", "name", "state", "reason"), line.split("|"))) for line in out.splitlines()]

    def stop(self) -> None:
        """Cancel what is left, wait until no job is running or completing (so that every
        slurmstepd has ended: slurmd's steps run in sessions of their own), then stop the daemons."""
        if self.procs and all(p.poll() is None for p in self.procs):
            try:
                self.run("scancel", "--state=PENDING,RUNNING,SUSPENDED", "--full", f"--user={os.getuid()}", check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and any(
                    j["state"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED") for j in self.jobs()
                ):
                    time.sleep(0.5)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # the controller is not answering: stop the daemons regardless
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()


if __name__ == "__main__":  # a cluster by hand: prints its SLURM_CONF, stops on Ctrl-C
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/resnet-sweep-slurm").resolve()
    started = time.monotonic()
    cluster = Cluster(root).start()
    print(f"cluster up in {time.monotonic() - started:.1f} s: export SLURM_CONF={cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    finally:
        cluster.stop()
