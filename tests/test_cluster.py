"""cluster/: the manifests parse and validate, agree with pyproject.toml and with each other, give the
job the GPUs, storage, S3 credentials and entrypoint it expects, follow the docs' GPU advice, and hold no secrets."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
import subprocess
import sys
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
README = (CLUSTER / "README.md").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAY_VERSION = next(
    re.fullmatch(r"ray\[[\w,]+\]==([\w.]+)", dep)[1]
    for dep in PYPROJECT["project"]["dependencies"]
    if dep.startswith("ray[")
)
KUBERNETES_VERSION = "1.30"  # an old-enough API server: the manifests must not need newer pod fields
SHARED = "/mnt/shared"  # where every KubeRay pod mounts the shared volume
TOKEN_SECRET = "medvq-ray-token"
S3_SECRET = "medvq-s3"  # the pods' S3 credentials in rayjob-s3.yaml, made by hand as cluster/README.md says
S3_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}  # what the README's Secret must hold
BUCKET = "your-bucket-name"  # rayjob-s3.yaml's placeholder, which the README's sed replaces


def load(path):
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return documents[0] if len(documents) == 1 else documents


RAYJOB, RAYCLUSTER, AWS = load(KUBERAY / "rayjob.yaml"), load(KUBERAY / "raycluster.yaml"), load(CLUSTER / "aws.yaml")
RAYJOB_S3 = load(KUBERAY / "rayjob-s3.yaml")
KUBERAY_CLUSTERS = {"rayjob": RAYJOB["spec"]["rayClusterSpec"], "raycluster": RAYCLUSTER["spec"]}  # shared volume
EVERY_KUBERAY = {**KUBERAY_CLUSTERS, "rayjob-s3": RAYJOB_S3["spec"]["rayClusterSpec"]}
RAYJOBS = {"rayjob.yaml": RAYJOB, "rayjob-s3.yaml": RAYJOB_S3}


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [group["template"] for group in spec["workerGroupSpecs"]]


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def gpu_group(spec: dict) -> dict:
    (group,) = spec["workerGroupSpecs"]
    return group


def gib(quantity: str) -> float:
    return float(quantity.removesuffix("Gi"))


# ---- the KubeRay CRD fields, transcribed from ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go
# (KubeRay 1.6/1.7); pod templates are checked against Kubernetes' own schema below.
def _obj(properties: dict, required=()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


_ANY, _STR, _INT, _BOOL = {"type": "object"}, {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_GROUP = {"template": _ANY, "rayStartParams": _STR_MAP, "resources": _STR_MAP, "labels": _STR_MAP}
RAY_CLUSTER_SPEC = _obj(
    {
        "authOptions": _obj({"mode": {"enum": ["disabled", "token"]}, "secretName": _STR, "enableK8sTokenAuth": _BOOL}),
        "autoscalerOptions": _obj(
            {
                "idleTimeoutSeconds": _INT,
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "version": {"enum": ["v1", "v2"]},
                "resources": _ANY,
                "image": _STR,
                "imagePullPolicy": _STR,
                "securityContext": _ANY,
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "volumeMounts": {"type": "array"},
            }
        ),
        "enableInTreeAutoscaling": _BOOL,
        "rayVersion": _STR,
        "suspend": _BOOL,
        "managedBy": _STR,
        "headServiceAnnotations": _STR_MAP,
        "gcsFaultToleranceOptions": _ANY,
        "upgradeStrategy": _ANY,
        "headGroupSpec": _obj(
            {**_GROUP, "headService": _ANY, "enableIngress": _BOOL, "serviceType": _STR}, required=["template"]
        ),
        "workerGroupSpecs": {
            "type": "array",
            "items": _obj(
                {
                    **_GROUP,
                    "groupName": _STR,
                    "replicas": _INT,
                    "minReplicas": _INT,
                    "maxReplicas": _INT,
                    "idleTimeoutSeconds": _INT,
                    "numOfHosts": _INT,
                    "suspend": _BOOL,
                    "scaleStrategy": _ANY,
                },
                required=["groupName", "template"],
            ),
        },
    },
    required=["headGroupSpec"],
)
RAY_JOB_SPEC = _obj(
    {
        "entrypoint": _STR,
        "runtimeEnvYAML": _STR,
        "jobId": _STR,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "shutdownAfterJobFinishes": _BOOL,
        "ttlSecondsAfterFinished": _INT,
        "activeDeadlineSeconds": _INT,
        "backoffLimit": _INT,
        "suspend": _BOOL,
        "clusterSelector": _STR_MAP,
        "metadata": _STR_MAP,
        "submitterPodTemplate": _ANY,
        "submitterConfig": _ANY,
        "deletionStrategy": _ANY,
        "managedBy": _STR,
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": _STR,
    }
)
KUBERAY_SCHEMAS = {"RayCluster": RAY_CLUSTER_SPEC, "RayJob": RAY_JOB_SPEC}


def check_kuberay(resource: dict) -> None:
    """Raise jsonschema.ValidationError or kubernetes_validate.ValidationError if the resource is malformed."""
    assert resource["apiVersion"] == "ray.io/v1" and resource["metadata"]["name"]
    jsonschema.validate(resource["spec"], KUBERAY_SCHEMAS[resource["kind"]])
    spec = resource["spec"].get("rayClusterSpec", resource["spec"])
    for template in pod_templates(spec):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "group"}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda path: path.name)
def test_every_yaml_file_parses_into_mappings(path):
    documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert documents and all(isinstance(doc, dict) for doc in documents)


@pytest.mark.parametrize("resource", [RAYJOB, RAYCLUSTER, RAYJOB_S3], ids=["rayjob", "raycluster", "rayjob-s3"])
def test_kuberay_manifests_fit_the_crd_and_their_pods_fit_kubernetes(resource):
    check_kuberay(resource)


def test_the_kuberay_check_catches_a_misspelt_field():
    broken = {**RAYCLUSTER, "spec": {**RAYCLUSTER["spec"], "workerGroupSpec": []}}
    with pytest.raises(jsonschema.ValidationError):
        check_kuberay(broken)
    head = RAYCLUSTER["spec"]["headGroupSpec"]
    container = {**ray_container(head["template"]), "volumeMount": []}
    broken_pod = {**head, "template": {"spec": {"containers": [container]}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        check_kuberay({**RAYCLUSTER, "spec": {**RAYCLUSTER["spec"], "headGroupSpec": broken_pod}})


@pytest.mark.parametrize("name", ["shared-volume.yaml", "files-pod.yaml"])
def test_plain_kubernetes_manifests_validate(name):
    kubernetes_validate.validate(load(KUBERAY / name), KUBERNETES_VERSION, strict=True)


def test_aws_config_passes_the_ray_cluster_launchers_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(AWS))  # the JSON schema `ray up` checks, after its AWS defaults


# ---- one Ray version everywhere
def test_ray_version_is_pyprojects_everywhere():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M)[1] == RAY_VERSION
    base = re.search(r"^FROM (\S+)", dockerfile, re.M)[1]
    python = re.fullmatch(r"rayproject/ray:\$\{RAY_VERSION\}-py3(\d+)-gpu", base)
    assert python, f"the base image must be rayproject/ray:<pinned Ray>-py3XX-gpu, not {base}"
    lowest = PYPROJECT["project"]["requires-python"].removeprefix(">=").split(".")
    assert (3, int(python[1])) >= tuple(map(int, lowest))
    for spec in EVERY_KUBERAY.values():
        assert spec["rayVersion"] == RAY_VERSION
    images = [ray_container(t)["image"] for spec in EVERY_KUBERAY.values() for t in pod_templates(spec)]
    for image in [*images, AWS["docker"]["image"]]:
        assert image.endswith(f"-ray{RAY_VERSION}"), f"{image}: tag the image with the Ray it carries"
    assert len(set(images + [AWS["docker"]["image"]])) == 1
    assert f"rayproject/ray:{RAY_VERSION}-py3{python[1]}-gpu" in README


# ---- the pods the job expects
@pytest.mark.parametrize("spec", EVERY_KUBERAY.values(), ids=EVERY_KUBERAY.keys())
def test_the_head_has_no_gpu_and_the_workers_do(spec):
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in str(ray_container(head["template"])["resources"])
    worker = gpu_group(spec)["template"]
    resources = ray_container(worker)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] >= 1
    assert resources["requests"] == resources["limits"]  # Kubernetes wants GPU requests == limits
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["spec"]["tolerations"]


def volumes_by_mount(template: dict) -> dict[str, dict]:
    """{mount path: volume} of a pod template's Ray container."""
    volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
    return {mount["mountPath"]: volumes[mount["name"]] for mount in ray_container(template)["volumeMounts"]}


@pytest.mark.parametrize("spec", EVERY_KUBERAY.values(), ids=EVERY_KUBERAY.keys())
def test_every_pod_has_shm_in_memory(spec):
    for template in pod_templates(spec):
        assert volumes_by_mount(template)["/dev/shm"]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("spec", KUBERAY_CLUSTERS.values(), ids=KUBERAY_CLUSTERS.keys())
def test_every_pod_of_the_shared_volume_manifests_mounts_it(spec):
    claim = load(KUBERAY / "shared-volume.yaml")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # every worker pod writes checkpoints
    for template in pod_templates(spec):
        assert volumes_by_mount(template)[SHARED]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


@pytest.mark.parametrize("spec", EVERY_KUBERAY.values(), ids=EVERY_KUBERAY.keys())
def test_token_auth_comes_from_a_secret_reference(spec):
    assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    for template in pod_templates(spec):
        for env in ray_container(template).get("env", []):
            assert not (env["name"].startswith("RAY_AUTH_TOKEN") and "value" in env)


def test_rayjob_runs_the_same_pods_as_raycluster_and_shuts_down():
    for spec in KUBERAY_CLUSTERS.values():
        assert spec["headGroupSpec"] == RAYCLUSTER["spec"]["headGroupSpec"]
        assert gpu_group(spec)["template"] == gpu_group(RAYCLUSTER["spec"])["template"]
    assert RAYJOB["spec"]["shutdownAfterJobFinishes"] is True
    group = gpu_group(RAYJOB["spec"]["rayClusterSpec"])
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]  # no autoscaler: all from the start
    # The image's code is the job's working directory, which only the submitter-pod mode uploads.
    workdir = re.search(r"^WORKDIR (\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)[1]
    assert yaml.safe_load(RAYJOB["spec"]["runtimeEnvYAML"]) == {"working_dir": workdir}
    assert RAYJOB["spec"]["submissionMode"] == "K8sJobMode"


def pod_without(template: dict, mount_path: str | None = None) -> dict:
    """A copy of a pod template whose Ray container has no envFrom, nor the volume mounted at `mount_path`."""
    template = copy.deepcopy(template)
    container = ray_container(template)
    container.pop("envFrom", None)
    if mount_path:
        (name,) = [mount["name"] for mount in container["volumeMounts"] if mount["mountPath"] == mount_path]
        container["volumeMounts"] = [mount for mount in container["volumeMounts"] if mount["name"] != name]
        template["spec"]["volumes"] = [volume for volume in template["spec"]["volumes"] if volume["name"] != name]
    return template


def test_rayjob_s3_is_rayjob_with_s3_credentials_from_a_secret_instead_of_the_volume():
    s3, shared = copy.deepcopy(RAYJOB_S3), copy.deepcopy(RAYJOB)
    for job, mount_path in ((s3, None), (shared, SHARED)):
        spec = job["spec"]["rayClusterSpec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            group["template"] = pod_without(group["template"], mount_path)
        del job["spec"]["entrypoint"], job["metadata"]
    assert s3 == shared
    for template in pod_templates(RAYJOB_S3["spec"]["rayClusterSpec"]):
        assert ray_container(template)["envFrom"] == [{"secretRef": {"name": S3_SECRET}}]
        assert "env" not in ray_container(template) and SHARED not in str(template)


def test_rayjob_s3_reads_and_writes_the_bucket_the_readme_fills_and_reads_back():
    flag = flags(shlex.split(RAYJOB_S3["spec"]["entrypoint"]))
    data, out = flag["--data-root"], flag["--out"]
    assert data.startswith(f"s3://{BUCKET}/") and out.startswith(f"s3://{BUCKET}/") and "--storage" not in flag
    assert RAYJOB_S3["spec"]["entrypoint"] in README
    assert RAYJOB_S3["metadata"]["name"] != RAYJOB["metadata"]["name"]  # both can run in one namespace
    secret = next(
        line for line in README.splitlines() if line.startswith(f"kubectl create secret generic {S3_SECRET} ")
    )
    assert S3_KEYS <= set(re.findall(r"--from-literal=(\w+)=", secret))
    assert "AWS_ENDPOINT_URL" in README
    in_readme = lambda uri: uri.replace(f"s3://{BUCKET}/", "s3://$BUCKET/")  # the README's commands say $BUCKET
    assert re.search(rf'^aws s3 sync medmnist "{re.escape(in_readme(data))}"', README, re.M)
    assert re.search(rf'^aws s3 cp --recursive "{re.escape(in_readme(out))}" ', README, re.M)
    assert f'sed -i "s#{BUCKET}#$BUCKET#" cluster/kuberay/rayjob-s3.yaml' in README
    assert "kubectl apply -f cluster/kuberay/rayjob-s3.yaml" in README


def test_aws_has_a_cpu_head_and_gpu_workers_with_token_auth():
    types = AWS["available_node_types"]
    assert types[AWS["head_node_type"]]["resources"]["GPU"] == 0
    (worker,) = [t for name, t in types.items() if name != AWS["head_node_type"]]
    assert worker["resources"]["GPU"] >= 1 and 0 <= worker["min_workers"] <= worker["max_workers"] <= AWS["max_workers"]
    assert "Arn" not in worker["node_config"].get("IamInstanceProfile", {})  # a name, never an account's ARN
    assert AWS["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "-e RAY_AUTH_MODE=token" in AWS["docker"]["run_options"]


def test_the_data_upload_commands_import_what_exists():
    lines = [line for line in README.splitlines() if "verified_file" in line]
    imports = {pair for line in lines for pair in re.findall(r"from ([\w.]+) import (\w+)", line)}
    assert len(lines) == 2 and imports  # KubeRay with S3, and AWS
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name), f"aws.yaml imports {module}.{name}"


# ---- the entrypoint and every sweep command in the docs
def sweep_commands() -> dict[str, list[str]]:
    """Each `python jobs/sweep.py ...` command: the RayJobs' entrypoints and the README's, as argv."""
    commands, in_code = {name: shlex.split(job["spec"]["entrypoint"]) for name, job in RAYJOBS.items()}, False
    for number, line in enumerate(README.splitlines(), start=1):
        in_code = in_code != line.startswith("```")
        if in_code and "jobs/sweep.py" in line:
            commands[f"README.md line {number}"] = shlex.split(line.split(" -- ")[-1].split("#")[0])
    return commands


def flags(argv: list[str]) -> dict[str, str | None]:
    assert argv[:2] == ["python", "jobs/sweep.py"], argv
    values, rest = {}, argv[2:]
    for i, word in enumerate(rest):
        if word.startswith("--"):
            following = rest[i + 1] if i + 1 < len(rest) else None
            values[word] = None if following is None or following.startswith("--") else following
    return values


def gpu_demand(flag: dict) -> tuple[float, float, float]:
    """(GPUs for all concurrent trials, GPUs of one worker, CPUs of one worker) a sweep command asks for."""
    workers, gpus_per_trial = int(flag.get("--workers-per-trial", 1)), float(flag["--gpus-per-trial"])
    return (
        gpus_per_trial * int(flag["--max-concurrent-trials"]),
        gpus_per_trial / workers,
        float(flag.get("--cpus-per-worker", 1)),
    )


def kuberay_capacity(spec: dict) -> tuple[float, float, float]:
    """(GPUs at most, GPUs of one pod, CPUs of one pod) of a KubeRay GPU worker group."""
    group = gpu_group(spec)
    limits = ray_container(group["template"])["resources"]["limits"]
    return group["maxReplicas"] * limits["nvidia.com/gpu"], limits["nvidia.com/gpu"], float(limits["cpu"])


def aws_capacity() -> tuple[float, float, float]:
    worker = AWS["available_node_types"]["gpu_worker"]
    return worker["max_workers"] * worker["resources"]["GPU"], worker["resources"]["GPU"], worker["resources"]["CPU"]


def test_rayjob_entrypoint_uses_the_shared_volume_and_is_in_the_readme():
    flag = flags(shlex.split(RAYJOB["spec"]["entrypoint"]))
    for name in ("--data-root", "--out", "--storage"):
        assert flag[name].startswith(SHARED + "/"), f"{name} must be on the shared volume"
    assert RAYJOB["spec"]["entrypoint"] in README


def test_the_s3_commands_keep_everything_on_s3_as_the_multinode_test_runs_it():
    on_s3 = [flags(argv) for argv in sweep_commands().values() if flags(argv)["--data-root"].startswith("s3://")]
    assert len(on_s3) == 3  # rayjob-s3.yaml's entrypoint, the README's copy of it, and the AWS command
    for flag in on_s3:
        assert flag["--out"].startswith("s3://") and "--storage" not in flag  # storage: OUT/ray_results, on S3


def capacities_for(argv: list[str]) -> list[tuple[float, float, float]]:
    """The clusters a sweep command is written for: a RayJob's own pods for its entrypoint (and the README's copy of
    it), else the shared-volume KubeRay clusters or AWS, by where its storage is."""
    for job in RAYJOBS.values():
        if argv == shlex.split(job["spec"]["entrypoint"]):
            return [kuberay_capacity(job["spec"]["rayClusterSpec"])]
    flag = flags(argv)
    if (flag.get("--storage") or flag["--out"]).startswith(SHARED):
        return [kuberay_capacity(spec) for spec in KUBERAY_CLUSTERS.values()]
    return [aws_capacity()]


@pytest.mark.parametrize("source, argv", sweep_commands().items())
def test_every_sweep_command_fills_the_cluster_it_is_written_for(source, argv):
    flag = flags(argv)
    storage = flag.get("--storage") or f"{flag['--out']}/ray_results"
    capacities = capacities_for(argv)
    assert storage.startswith((SHARED, "s3://")), "cluster storage must be shared by every node"
    assert flag["--data-root"].startswith((SHARED, "s3://")), "every node reads the data"
    total, per_worker, cpus = gpu_demand(flag)
    for gpus, gpus_per_node, cpus_per_node in capacities:
        assert total == gpus, f"{source}: asks for {total:g} GPUs at once, the cluster has {gpus:g}"
        assert per_worker <= gpus_per_node and cpus <= cpus_per_node, f"{source}: a worker must fit in a node"


def test_the_gpu_advice_is_in_the_docs():
    advice = (REPO / "docs" / "behaviour.md").read_text().split("## On a GPU")[1].split("\n## ")[0]
    assert "`--batch-size 128` to `jobs/sweep.py`" in advice
    assert "one worker (`--workers-per-trial 1`" in advice and "holds a quarter of a GPU" in advice


@pytest.mark.parametrize("source, argv", sweep_commands().items())
def test_every_sweep_command_follows_the_docs_gpu_advice(source, argv):
    """docs/behaviour.md, "On a GPU": batch 128, and a 28x28 trial is one worker on (at most) one GPU."""
    flag = flags(argv)
    assert flag.get("--batch-size") == "128", f"{source}: a GPU sweep trains at batch 128"
    assert int(flag.get("--size", 28)) == 28 and int(flag.get("--workers-per-trial", 1)) == 1, source
    assert float(flag["--gpus-per-trial"]) <= 1, source


@pytest.mark.parametrize("source, argv", sweep_commands().items())
def test_every_sweep_command_parses_with_the_jobs_own_flags(source, argv):
    from jobs.sweep import parser, sweep_from_args, with_gpus

    job_flags, flag = parser(), flags(argv)
    args = job_flags.parse_args(argv[2:])
    sweep = with_gpus(sweep_from_args(args, job_flags), args.gpus_per_trial, cluster_gpus=capacities_for(argv)[0][0])
    assert sweep.base.batch_size == int(flag["--batch-size"]) and sweep.base.accelerator == flag["--accelerator"]
    assert sweep.base.workers * sweep.base.gpus_per_worker == float(flag["--gpus-per-trial"])
    assert sweep.max_concurrent_trials == int(flag["--max-concurrent-trials"])
    assert sweep.base.data_root == flag["--data-root"]


def test_the_readme_table_has_the_manifests_numbers():
    rows = {
        cells[0]: cells[1:]
        for line in README.splitlines()
        if line.startswith("| ")
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    rayjob_gpus, raycluster_gpus, aws_gpus = (
        kuberay_capacity(KUBERAY_CLUSTERS["rayjob"])[0],
        kuberay_capacity(RAYCLUSTER["spec"])[0],
        aws_capacity()[0],
    )
    assert rows["GPUs, at most"] == [f"{rayjob_gpus:g}", f"{raycluster_gpus:g}", f"{aws_gpus:g}"]
    for cell, spec in zip(rows["head"], KUBERAY_CLUSTERS.values()):
        limits = ray_container(spec["headGroupSpec"]["template"])["resources"]["limits"]
        assert cell == f"{limits['cpu']} CPUs, {gib(limits['memory']):g} GiB, no GPU"
    for cell, spec in zip(rows["each GPU worker"], KUBERAY_CLUSTERS.values()):
        limits = ray_container(gpu_group(spec)["template"])["resources"]["limits"]
        assert cell == f"{limits['nvidia.com/gpu']} GPU, {limits['cpu']} CPUs, {gib(limits['memory']):g} GiB"
    rayjob, raycluster = gpu_group(KUBERAY_CLUSTERS["rayjob"]), gpu_group(RAYCLUSTER["spec"])
    assert rows["GPU workers"][0].startswith(f"{rayjob['replicas']} pods")
    assert rows["GPU workers"][1].startswith(f"{raycluster['minReplicas']} to {raycluster['maxReplicas']} pods")
    head, worker = AWS["available_node_types"]["head"], AWS["available_node_types"]["gpu_worker"]
    assert rows["head"][2].startswith(f"{head['node_config']['InstanceType']}: {head['resources']['CPU']} vCPUs")
    assert rows["GPU workers"][2].startswith(
        f"{worker['min_workers']} to {worker['max_workers']} {worker['node_config']['InstanceType']}"
    )
    assert rows["each GPU worker"][2].startswith(f"{worker['resources']['GPU']} ")
    assert f"{worker['resources']['CPU']} vCPUs" in rows["each GPU worker"][2]


@pytest.mark.integration
def test_jobs_sweep_accepts_every_flag_the_cluster_docs_use():
    help_text = subprocess.run(
        [sys.executable, "jobs/sweep.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    for source, argv in sweep_commands().items():
        for name in flags(argv):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", help_text), f"{source}: {name} is not a flag"


# ---- what goes into the image, and what never goes into a file
def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is left out when it, or a folder above it, matches a pattern."""

    def regex(pattern: str) -> str:
        parts = re.split(r"(\*\*/|\*|\?)", pattern)
        return "".join({"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part)) for part in parts)

    prefixes = ["/".join(path.split("/")[: i + 1]) for i in range(path.count("/") + 1)]
    return any(re.fullmatch(regex(pattern), prefix) for pattern in patterns for prefix in prefixes)


def test_dockerignore_keeps_data_and_outputs_out_and_the_code_in():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert not any(pattern.startswith("!") for pattern in patterns)  # keeps the matcher above exact
    for path in (
        "out/model.ckpt",
        "runs/sweep/latents/part-0.parquet",
        "results/plot.png",
        "bloodmnist.npz",
        "data/medmnist/bloodmnist.npz",
        ".venv/bin/python",
        ".git/HEAD",
        "medvq/__pycache__/data.pyc",
        "runs/sweep/ray_results/x.json",
        "lightning_logs/version_0/hparams.yaml",
    ):
        assert dockerignored(path, patterns), f"{path} would go into the image"
    needed = ["pyproject.toml", "README.md"] + [
        str(path.relative_to(REPO)) for folder in ("medvq", "jobs") for path in (REPO / folder).glob("*.py")
    ]
    for path in needed:
        assert not dockerignored(path, patterns), f"{path} is needed in the image"


SECRET_PATTERNS = {
    "an AWS access key": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    # the key itself (40 characters) after its name; the name alone, as a Secret's key or a shell variable, is fine
    "an AWS secret key": r"(?i)aws_secret_access_key\W{1,4}[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
    "a private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "an account id": r"(?<![\d.])\d{12}(?![\d.])",
    "an ARN": r"arn:aws[\w-]*:",
    "a literal Ray token": r"RAY_AUTH_TOKEN=['\"]?[A-Za-z0-9_-]{16,}",
    "a Kubernetes Secret": r"kind:\s*Secret\b",
    "a GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{20,}",
}


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(CLUSTER.rglob("*")) if p.is_file()] + [REPO / ".dockerignore"],
    ids=lambda path: str(path.relative_to(REPO)),
)
def test_no_secrets_in_cluster_files(path):
    text = path.read_text()
    for what, pattern in SECRET_PATTERNS.items():
        assert not re.search(pattern, text), f"{path.name} holds {what}"


def test_the_secret_check_finds_a_key_but_not_its_name():
    found = lambda text: {what for what, pattern in SECRET_PATTERNS.items() if re.search(pattern, text)}
    example = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # the example secret key of AWS's documentation
    for leaked in (
        f"aws_secret_access_key = {example}",
        f'AWS_SECRET_ACCESS_KEY="{example}"',
        f"AWS_SECRET_ACCESS_KEY: {example}",
    ):
        assert found(leaked) == {"an AWS secret key"}, leaked
    assert found("AKIAIOSFODNN7EXAMPLE") == {"an AWS access key"}
    (secret_command,) = [line for line in README.splitlines() if "AWS_SECRET_ACCESS_KEY" in line]
    assert found(secret_command) == set()
