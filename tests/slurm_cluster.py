"""A real one-node SLURM cluster for the tests marked ``slurm`` (tests/test_slurm.py).

Where ``munged``, ``slurmctld`` and ``slurmd`` are installed (Debian: ``apt-get install slurm-wlm
munge``) and we are root, :func:`start_cluster` writes a ``slurm.conf`` for this host into a
directory of its own (its state, spool, logs, munge key and socket there too, on free ports),
starts munged, slurmctld and slurmd in the foreground as our own child processes, and waits until
``sinfo`` shows the node idle. Clients find the cluster through ``SLURM_CONF``
(:attr:`SlurmCluster.env`), which sbatch passes on to the jobs. Nothing outside the directory is
touched, so it runs beside any SLURM the machine may have. :meth:`SlurmCluster.stop` ends the
daemons it started (by their process ids). No cgroups: ``proctrack/linuxproc``, ``task/none``,
which work in a container; no accounting database (``sacct`` answers with an error, which
submitit bypasses: it then waits for a job's result file).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol")
PARTITION = "debug"


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run here (not installed, not root, or a daemon did not come up): tests skip."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _find(name: str) -> str | None:
    return shutil.which(name) or next((str(Path(folder) / name) for folder in ("/usr/sbin", "/sbin")
                                       if (Path(folder) / name).exists()), None)


@dataclass
class SlurmCluster:
    directory: Path
    conf: Path
    env: dict[str, str]
    node: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def command(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """A SLURM client command (sinfo, squeue, scontrol, ...) against this cluster; its stdout."""
        result = subprocess.run([_find(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True,
                                text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def job_states(self) -> dict[str, str]:
        """``squeue``'s view: job id (array tasks as ``<job>_<task>``) -> state, e.g. RUNNING, PENDING."""
        out = self.command("squeue", "--noheader", "--array", "--format=%i %T", check=False)
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
                         for path in sorted(self.directory.glob("*.log")))

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the node is idle (and so every job has left it)."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            dead = [process.args[0] for process in self.processes if process.poll() is not None]
            if dead:
                raise ClusterUnavailable(f"{', '.join(dead)} exited:\n{self.logs()}")
            state = self.command("sinfo", "--noheader", "--format=%T", f"--nodes={self.node}", check=False).strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise ClusterUnavailable(f"the node is {state or 'not reported'} after {timeout:.0f} s:\n{self.logs()}")

    def stop(self) -> None:
        """Cancel what is left of the jobs, then end the daemons this cluster started."""
        if all(process.poll() is None for process in self.processes):
            self.command("scancel", "--full", "--user", "root", check=False)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def slurm_conf(directory: Path, node_line: str, node: str, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
# A one-node cluster for kprune's tests (tests/slurm_cluster.py)
ClusterName=kprunetest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={directory / 'munge.socket'}
StateSaveLocation={directory / 'state'}
SlurmdSpoolDir={directory / 'spool'}
SlurmctldPidFile={directory / 'slurmctld.pid'}
SlurmdPidFile={directory / 'slurmd.pid'}
SlurmctldLogFile={directory / 'slurmctld.log'}
SlurmdLogFile={directory / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# A requeued or cancelled job is signalled, then killed this many seconds later.
KillWait=2
MinJobAge=300
SlurmdTimeout=60
InactiveLimit=0
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(directory: Path, timeout: float = 60) -> SlurmCluster:
    """A running one-node cluster in ``directory``, or :class:`ClusterUnavailable`."""
    missing = [name for name in DAEMONS if _find(name) is None]
    if missing:
        raise ClusterUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        raise ClusterUnavailable("the test cluster runs its daemons as root")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # munged refuses a key or socket in a directory others may write
    for sub in ("state", "spool"):
        (directory / sub).mkdir(exist_ok=True)
    key = directory / "munge.key"
    subprocess.run([_find("mungekey"), "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True)
    probe = subprocess.run([_find("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
    node_line = next((line for line in probe.stdout.splitlines() if line.startswith("NodeName=")), None)
    if node_line is None:
        raise ClusterUnavailable(f"slurmd -C did not describe this host: {probe.stderr.strip()}")
    node = node_line.split()[0].split("=", 1)[1]
    conf = directory / "slurm.conf"
    conf.write_text(slurm_conf(directory, node_line, node, _free_port(), _free_port()))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(directory, conf, env, node)

    def daemon(*args: str, log: str) -> None:
        with open(directory / log, "ab") as out:
            cluster.processes.append(subprocess.Popen([_find(args[0]), *args[1:]], env=env, stdout=out,
                                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                      start_new_session=True))

    try:
        daemon("munged", "--foreground", "--force", f"--socket={directory / 'munge.socket'}", f"--key-file={key}",
               f"--pid-file={directory / 'munged.pid'}", f"--log-file={directory / 'munged.log'}",
               f"--seed-file={directory / 'munged.seed'}", log="munged.out.log")
        deadline = time.monotonic() + timeout
        while not (directory / "munge.socket").exists():
            if time.monotonic() > deadline or cluster.processes[0].poll() is not None:
                raise ClusterUnavailable(f"munged did not start:\n{cluster.logs()}")
            time.sleep(0.1)
        daemon("slurmctld", "-D", "-c", "-i", "-f", str(conf), log="slurmctld.out.log")
        daemon("slurmd", "-D", "-f", str(conf), log="slurmd.out.log")
        cluster.wait_idle(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
