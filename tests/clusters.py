"""Real clusters on this one machine, for the tests: `ray start` heads and worker nodes (a worker node in its
own mount namespace with a private /tmp, so it cannot see the head's local folders, as on a real cluster),
and an S3-compatible server (moto) that every node reaches through AWS_ENDPOINT_URL. Everything is started on
127.0.0.1; Ray itself rewrites that to the machine's own address, so its traffic stays on this machine.

Everything is stopped by signalling the processes it started: `ray stop` would stop every Ray instance on
the machine.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import boto3
import pyarrow.fs as pafs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
PORTS_PER_NODE = 200  # each node's worker processes get their own range: all nodes share 127.0.0.1
_WORKER_RANGES = itertools.count(random.randrange(48))
# The test clusters' own token, in the environment: `ray start --head` makes none (only a local ray.init()
# writes ~/.ray/auth_token), and a private node could not read one from a file in the head's /tmp.
TOKEN = secrets.token_hex(32)


def process_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the process's name (its state, then its parent, ...); raises
    FileNotFoundError once the process is gone. The name, in parentheses, may hold spaces: split after its ")"."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: each is held until all are chosen, so the kernel cannot hand one out twice
    (Ray refuses to start when two of its components get the same port)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def client_env(**extra: str) -> dict[str, str]:
    """This interpreter's `python` and `ray` first on PATH, and token auth (Ray's local default) with the test
    clusters' own token."""
    path = f"{BIN}:{os.environ['PATH']}"
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "PATH": path, **extra}


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.HTTPError:
        return True  # up, and asking for the token
    except OSError:
        return False
    return True


def wait_for(condition, what: str, seconds: float = 120, process: subprocess.Popen | None = None) -> None:
    """Poll `condition` every second; fail, with the end of the process's log, if it exits or time runs out."""
    deadline = time.monotonic() + seconds
    while not condition():
        log = getattr(process, "log", None)
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        assert process is None or process.poll() is None, f"{what}: the process exited\n{tail}"
        assert time.monotonic() < deadline, f"{what}: not within {seconds:.0f} s\n{tail}"
        time.sleep(1)


class Processes:
    """Processes started for a test, each in its own process group, and their scratch folders: at the end every
    group is killed, then the folders removed."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []
        self.folders: list[str] = []

    def folder(self, prefix: str, parent: str | None = None) -> Path:
        self.folders.append(tempfile.mkdtemp(prefix=prefix, dir=parent))
        return Path(self.folders[-1])

    def start(self, command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "w") as output:
            process = subprocess.Popen(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        process.log = log  # for wait_for's messages
        self.started.append(process)
        return process

    def stop(self) -> None:
        """SIGKILL to every group: `ray start --block` takes ~30 s to wind down on SIGTERM, and nothing of a
        test cluster needs to outlive it (each node's session folder goes with it)."""
        for process in self.started:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.started:
            process.wait()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


NODE_PORTS = (
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def _node_ports(ports: list[int] | None = None) -> list[str]:
    """Every port a Ray node opens (`ports`, else chosen free now), and a worker port range of its own. The ranges
    lie below the kernel's ephemeral ports, which free_ports() hands out, and above Ray's client port 10001."""
    first = 10200 + PORTS_PER_NODE * (next(_WORKER_RANGES) % 48)
    ports = ports or free_ports(len(NODE_PORTS))
    return [
        *(f"--{name}={port}" for name, port in zip(NODE_PORTS, ports, strict=True)),
        f"--min-worker-port={first}",
        f"--max-worker-port={first + PORTS_PER_NODE - 1}",
    ]


@dataclass
class Cluster:
    address: str  # the GCS, for ray.init and `ray start --address`
    dashboard: str  # the job API, for `ray job submit`
    env: dict[str, str]  # what every node and client of it runs with
    logs: Path

    def nodes(self) -> list[dict]:
        """The alive nodes, as `ray list nodes` reports them."""
        listed = subprocess.run(
            [RAY, "list", "nodes", "--address", self.address, "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr[-2000:]
        nodes = json.loads(listed.stdout) if listed.stdout.lstrip().startswith("[") else []  # else "No resource"
        return [node for node in nodes if node["state"] == "ALIVE"]

    def actors(self, class_name: str) -> list[dict]:
        """Every actor of that class the cluster has had, alive or dead, with its node and process id."""
        listed = subprocess.run(
            [
                RAY,
                "list",
                "actors",
                "--address",
                self.address,
                "--format",
                "json",
                "--detail",
                "--filter",
                f"class_name={class_name}",
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr[-2000:]
        return json.loads(listed.stdout) if listed.stdout.lstrip().startswith("[") else []

    def job_status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED; UNKNOWN when the job API did not answer."""
        status = subprocess.run(
            [RAY, "job", "status", "--address", self.dashboard, job_id],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        said = (status.stdout + status.stderr).lower()  # "Job 'raysubmit_...' succeeded", "... is currently running"
        return next(
            (word.upper() for word in ("succeeded", "failed", "stopped", "running", "pending") if word in said),
            "UNKNOWN",
        )

    def job_logs(self, job_id: str) -> str:
        logs = subprocess.run(
            [RAY, "job", "logs", "--address", self.dashboard, job_id],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return logs.stdout + logs.stderr

    def submit(
        self, *command: str, timeout: float = 600, working_dir: bool = True, wait: bool = True
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` of `command`, from the repository root, to the end (or, not `wait`ing,
        until it is submitted). Without `working_dir` the job runs in this checkout, for clusters whose
        nodes all share this machine's files (Ray's fake autoscaler: there, the job's unpacked working_dir
        vanished under its driver once the trials ended)."""
        shipped = ["--working-dir", "."] if working_dir else []
        command = command if working_dir else ("sh", "-c", f"cd {shlex.quote(str(REPO))} && {shlex.join(command)}")
        return subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                self.dashboard,
                *shipped,
                *([] if wait else ["--no-wait"]),
                "--",
                *command,
            ],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def start_head(processes: Processes, env: dict[str, str], *flags: str, port: int | None = None) -> Cluster:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir (`ray start` records its address there,
    which only `ray stop` removes: in the shared /tmp/ray later jobs here would wait for a dead cluster).
    Short, in /tmp: Ray's socket paths inside it must stay under 108 characters."""
    gcs, dashboard, client, *node_ports = free_ports(3 + len(NODE_PORTS))  # all distinct
    port = port or gcs
    temp_dir = processes.folder("ray-")
    # RAY_ADDRESS where the cluster starts: its processes then find it even if other instances run here.
    env = {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    head = processes.start(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--ray-client-server-port={client}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
            "--object-store-memory=400000000",
            *_node_ports(node_ports),
            *flags,
        ],
        env,
        temp_dir / "head.log",
    )
    cluster = Cluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, temp_dir)
    wait_for(lambda: answers(f"{cluster.dashboard}/api/version"), "ray start --head", process=head)
    wait_for(cluster.nodes, "the head node listed", process=head)
    return cluster


def start_private_node(processes: Processes, cluster: Cluster, cpus: int) -> None:
    """A worker node in its own mount namespace with an empty tmpfs on /tmp: it sees the machine's files but
    none of the head's /tmp, as a node of a real cluster sees none of the head's local disk."""
    known = len(cluster.nodes())
    start = shlex.join(
        [
            RAY,
            "start",
            "--block",
            f"--address={cluster.address}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--object-store-memory=400000000",
            *_node_ports(),
        ]
    )
    log = cluster.logs / f"node-{known}.log"
    private_tmp = "mount -t tmpfs tmpfs /tmp"
    if REPO.is_relative_to("/tmp"):  # a checkout (and its .venv) in /tmp: every node still runs its code
        private_tmp = f"mount --bind {REPO} /mnt && {private_tmp} && mkdir -p {REPO} && mount --bind /mnt {REPO}"
    isolated = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{private_tmp} && exec {start}"]
    node = processes.start(isolated, cluster.env, log)
    wait_for(lambda: len(cluster.nodes()) > known, f"worker node {known} (log {log})", process=node)


def start_s3(processes: Processes, bucket: str) -> dict[str, str]:
    """moto's S3 server on 127.0.0.1 with one bucket; returns the environment that points AWS SDKs (and so
    pyarrow and Ray) at it, the way every AWS SDK reads it."""
    port = free_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    server = processes.start(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        {**os.environ, **env},
        processes.folder("moto-") / "moto.log",
    )
    wait_for(lambda: answers(env["AWS_ENDPOINT_URL"]), "moto_server", process=server)
    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    return env


def s3_filesystem() -> pafs.FileSystem:
    """pyarrow's S3 filesystem as medvq (and Ray) get it, from a URI: endpoint and keys from the environment
    (pyarrow's S3FileSystem() constructor alone ignores AWS_ENDPOINT_URL)."""
    return pafs.FileSystem.from_uri("s3://bucket")[0]
