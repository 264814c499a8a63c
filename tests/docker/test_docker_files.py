"""The cluster files (docker/, configs/cluster-*.yaml, docs/CLUSTER.md) are checked by parsing.

No Docker engine, Kubernetes or cloud account is available where the tests run, so these tests
read the files and check what can go wrong without one: structure, the entrypoints and configs
they name, resources against the run config, versions against constraints.txt (the exact
versions tested), and that the images the cluster files use are the ones the docs tell to build.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import jobs._common
from pipeline.config import RunConfig, load_config
from pipeline.data.shards import expand_shards

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
RAYJOB = DOCKER / "kuberay-rayjob.yaml"
PVC = DOCKER / "kuberay-pvc.yaml"
RAY_UP = DOCKER / "cluster.yaml"
DOC = REPO / "docs" / "CLUSTER.md"
CONSTRAINTS = REPO / "constraints.txt"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
YAML_FILES = sorted(DOCKER.glob("*.yaml")) + sorted((REPO / "configs").glob("cluster-*.yaml"))
JOB_COMMAND = re.compile(r"python -m (jobs\.[a-z_][a-z0-9_]*)([^\n`]*)")
COMMAND_SEPARATORS = {"&&", "||", "|", ";", "&"}


# --- readers -------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: top level is not a mapping"
    return data


def pyproject() -> dict[str, Any]:
    import tomllib  # Python >= 3.11, the version the project is tested on

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_versions() -> dict[str, str]:
    """Canonical package name → version, for every ``name==version`` line of constraints.txt."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            [spec] = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and ARG defaults substituted."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    out = []
    for text in logical:
        keyword, _, rest = text.strip().partition(" ")
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest.strip())
        if keyword.upper() == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        out.append(Instruction(keyword.upper(), rest))
    return out


def instructions(kind: str, keyword: str) -> list[str]:
    return [i.args for i in dockerfile(DOCKERFILES[kind]) if i.keyword == keyword]


def app_dir() -> PurePosixPath:
    """The image's WORKDIR, where the repository is copied (the same in both images)."""
    dirs = {PurePosixPath(w) for kind in DOCKERFILES for w in instructions(kind, "WORKDIR")}
    assert len(dirs) == 1, f"the Dockerfiles disagree on WORKDIR: {dirs}"
    return dirs.pop()


def strings(obj: Any) -> Iterator[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from strings(value)


def shell_words(text: str) -> list[str]:
    """Shell words of ``text``, quotes respected; operators (``&&``, ``;``, ``>``, ...) are words."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def shell_commands(text: str) -> list[list[str]]:
    """``text`` split into simple commands at ``&&``, ``||``, ``|``, ``;`` and ``&``."""
    commands: list[list[str]] = [[]]
    for word in shell_words(text):
        if word in COMMAND_SEPARATORS:
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def markdown_code(text: str) -> list[str]:
    """Fenced code blocks and inline code spans of a markdown text, continuations joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", prose.replace("\n", " "))
    return [re.sub(r"\\\n\s*", " ", b) for b in blocks] + spans


@dataclass(frozen=True)
class JobCommand:
    source: str
    module: str
    argv: tuple[str, ...]

    def option(self, name: str) -> str | None:
        if name in self.argv:
            index = self.argv.index(name)
            return self.argv[index + 1] if index + 1 < len(self.argv) else None
        return None


def job_commands() -> list[JobCommand]:
    """Every ``python -m jobs.<name> ...`` in the cluster files, the Dockerfiles and the doc."""
    texts = [(p.name, s) for p in (RAYJOB, RAY_UP) for s in strings(load_yaml(p))]
    texts += [(p.name, i.args) for p in DOCKERFILES.values() for i in dockerfile(p) if i.keyword == "RUN"]
    texts += [(DOC.name, code) for code in markdown_code(DOC.read_text())]
    found = []
    lines = [(source, line) for source, text in texts for line in text.splitlines()]
    for source, line in lines:
        for match in JOB_COMMAND.finditer(re.sub(r"\s+", " ", line)):
            words = shell_commands(match[2])[0] if match[2].strip() else []
            redirect = next((i for i, w in enumerate(words) if w[0] in "<>"), len(words))
            found.append(JobCommand(source, match[1], tuple(words[:redirect])))
    return found


def shared_mounts() -> set[str]:
    """Paths mounted on every pod of the RayJob and bind-mounted into every `ray up` container."""
    spec = load_yaml(RAYJOB)["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    per_pod = [{m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])} for pod in pods]
    k8s = set.intersection(*per_pod)
    options = " ".join(load_yaml(RAY_UP)["docker"].get("run_options", []))
    ray_up = {target for _, target in re.findall(r"(?:--volume|-v)[ =]([^\s:]+):([^\s:]+)", options)}
    return k8s & ray_up


def named_configs() -> dict[str, Path]:
    """``--config`` value → file in the repository (paths in the image map through WORKDIR)."""
    found = {}
    for cmd in job_commands():
        value = cmd.option("--config")
        if value is None:
            continue
        path = PurePosixPath(value)
        if path.is_absolute():
            assert path.is_relative_to(app_dir()), (
                f"{cmd.source}: --config {value} is not inside the image's copy of the repository ({app_dir()})")
            path = path.relative_to(app_dir())
        found[value] = REPO / path
    return found


def container_resources(container: dict[str, Any]) -> tuple[float, float]:
    """(CPUs, GPUs) a container's limits give Ray."""
    limits = container["resources"]["limits"]
    cpu = str(limits["cpu"])
    cpus = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    return cpus, float(limits.get("nvidia.com/gpu", 0))


def actors_per_node(cpus: float, gpus: float, config: RunConfig) -> int:
    res = config.resources
    fits = [math.floor(cpus / res.num_cpus)]
    if res.num_gpus > 0:
        fits.append(math.floor(gpus / res.num_gpus))
    return max(0, min(fits))


def build_commands() -> dict[str, str]:
    """Image tag → Dockerfile, from the ``docker build -f F ... -t IMAGE`` lines of the doc."""
    built = {}
    for code in markdown_code(DOC.read_text()):
        for line in code.splitlines():
            tokens = shlex.split(line) if line.strip().startswith("docker build") else []
            if tokens:
                built[tokens[tokens.index("-t") + 1]] = tokens[tokens.index("-f") + 1]
    return built


# --- YAML structure ------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_files_parse(path: Path) -> None:
    assert load_yaml(path)


def test_rayjob_structure() -> None:
    job = load_yaml(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.prune ")
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned_versions()["ray"]
    head = cluster["headGroupSpec"]
    assert str(head["rayStartParams"]["num-cpus"]) == "0", "the head runs the driver only"
    assert [c["image"] for c in head["template"]["spec"]["containers"]]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any(container_resources(c)[1] >= 1 for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            requests = container["resources"]["requests"]
            assert requests["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]


def test_rayjob_auth_is_consistent() -> None:
    """With token auth every process must say token: nothing may force RAY_AUTH_MODE=disabled."""
    spec = load_yaml(RAYJOB)["spec"]
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    assert "RAY_AUTH_MODE" not in yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars", {})
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    env = [e["name"] for p in pods for c in p["template"]["spec"]["containers"] for e in c.get("env", [])]
    assert "RAY_AUTH_MODE" not in env


def test_rayjob_volumes_are_shared_claims() -> None:
    pvc = load_yaml(PVC)
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    cluster = load_yaml(RAYJOB)["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        volumes = pod["template"]["spec"]["volumes"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}
    assert shared_mounts(), "no path is mounted on every pod and every `ray up` container"


def test_ray_up_cluster_matches_rays_schema() -> None:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = load_yaml(RAY_UP)
    jsonschema.validate(cluster, schema)  # the schema `ray up` validates against (Ray 2.60.0)
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert types[cluster["head_node_type"]]["resources"].get("CPU") == 0
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 for t in types.values())
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cluster["worker_start_ray_commands"])
    assert "HF_HUB_OFFLINE=1" in " ".join(cluster["docker"]["run_options"])


# --- entrypoints and configs ---------------------------------------------------------------


def test_cluster_files_name_entrypoints() -> None:
    sources = {cmd.source for cmd in job_commands()}
    assert {RAYJOB.name, RAY_UP.name, DOC.name, *(p.name for p in DOCKERFILES.values())} <= sources


def test_entrypoint_modules_exist_and_answer_help() -> None:
    modules = sorted({cmd.module for cmd in job_commands()})
    for module in modules:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin and Path(spec.origin).is_relative_to(REPO), module
        assert callable(getattr(importlib.import_module(module), "main", None)), f"{module} has no main()"
    runs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for m in modules}
    for module, proc in runs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"python -m {module} --help: exit {proc.returncode}: {err[-500:]}"
        assert out.startswith("usage:")


def test_entrypoint_flags_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each named command line parses with its job's own parser (the job itself is not run)."""
    parsed = []
    monkeypatch.setattr(jobs._common, "run_cli", lambda run, args: parsed.append(args) or 0)
    commands = [c for c in job_commands() if c.argv and "--help" not in c.argv]
    assert commands
    for count, cmd in enumerate(commands, start=1):
        main = importlib.import_module(cmd.module).main
        try:
            code = main(list(cmd.argv))
        except SystemExit as exc:
            pytest.fail(f"{cmd.source}: python -m {cmd.module} {' '.join(cmd.argv)}: rejected (exit {exc.code})")
        assert code == 0 and len(parsed) == count, f"{cmd.module} did not go through standalone()"
        if cmd.option("--config"):
            assert parsed[-1].config == cmd.option("--config")


def test_named_configs_exist() -> None:
    configs = named_configs()
    assert configs, "no --config named in the cluster files"
    for value, path in configs.items():
        assert path.is_file(), f"--config {value}: {path.relative_to(REPO)} is not in the repository"


def rerooted(data: dict[str, Any], roots: set[str], base: Path, where: str) -> dict[str, Any]:
    """``data`` with every absolute path moved under ``base``; each must lie on a shared mount."""
    def move(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: move(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [move(v) for v in obj]
        if isinstance(obj, str) and obj.startswith("/"):
            assert any(PurePosixPath(obj).is_relative_to(r) for r in roots), (
                f"{where}: {obj} is not on a volume every node mounts ({sorted(roots)})")
            return str(base) + obj
        return obj
    return move(copy.deepcopy(data))


def make_inputs(data: dict[str, Any]) -> None:
    """Stub files for the inputs a config names (shards, sizes, trajectory manifest)."""
    def touch(path: str, text: str = "") -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)

    for section in ("data", "target"):
        part = data.get(section) or {}
        if part.get("shards"):
            for url in expand_shards(part["shards"]):
                touch(url)
        if part.get("sizes"):
            touch(part["sizes"], "{}")
    if (data.get("trajectory") or {}).get("path"):
        touch(str(Path(data["trajectory"]["path"]) / "trajectory.json"), "{}")


def test_named_configs_validate(tmp_path: Path) -> None:
    """load_config accepts each config once its paths exist: on the cluster, the shared volume."""
    roots = shared_mounts()
    for value, path in named_configs().items():
        data = load_yaml(path)
        RunConfig.model_validate(data)  # schema alone (unknown keys, types, rules)
        moved = rerooted(data, roots, tmp_path, path.name)
        make_inputs(moved)
        copy_path = tmp_path / path.name
        copy_path.write_text(yaml.safe_dump(moved))
        config = load_config(copy_path)  # schema + path checks, exactly as the job runs them
        # The configs these files submit run on their GPU workers.
        assert config.resources.num_gpus > 0 and config.score.device in ("cuda", "auto"), value


def test_run_dirs_are_on_the_shared_volume() -> None:
    roots = shared_mounts()
    run_dirs = [(c.source, c.option("--run-dir")) for c in job_commands() if c.module == "jobs.prune" and c.argv
                and "--help" not in c.argv]
    assert run_dirs
    for source, run_dir in run_dirs:
        assert run_dir and any(PurePosixPath(run_dir).is_relative_to(r) for r in roots), (
            f"{source}: --run-dir {run_dir} is not on the shared volume {sorted(roots)}")


def test_clusters_host_every_actor_at_once() -> None:
    configs = [RunConfig.model_validate(load_yaml(p)) for p in named_configs().values()]
    cluster = load_yaml(RAYJOB)["spec"]["rayClusterSpec"]
    ray_up = load_yaml(RAY_UP)
    for config in configs:
        k8s = sum(actors_per_node(*container_resources(c), config) * g["maxReplicas"]
                  for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
        assert k8s >= config.resources.actors, f"RayJob fits {k8s} of {config.resources.actors} actors"
        workers = [t for name, t in ray_up["available_node_types"].items() if name != ray_up["head_node_type"]]
        per_node = [actors_per_node(t["resources"].get("CPU", 0), t["resources"].get("GPU", 0), config)
                    for t in workers]
        up = sum(n * t["max_workers"] for n, t in zip(per_node, workers))
        assert up >= config.resources.actors, f"`ray up` cluster fits {up} of {config.resources.actors} actors"
        assert ray_up["max_workers"] >= math.ceil(config.resources.actors / max(per_node)), "cluster max_workers"


# --- Dockerfiles ---------------------------------------------------------------------------

BASE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<major>\d)(?P<minor>\d+)-(?P<platform>cpu|cu\d{3})")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_base_is_pinned_ray(kind: str) -> None:
    froms = instructions(kind, "FROM")
    assert len(froms) == 1
    match = BASE.fullmatch(froms[0])
    assert match, f"FROM {froms[0]} is not rayproject/ray:<ray>-py<XY>-<cpu|cuXYZ>"
    assert match["ray"] == pinned_versions()["ray"]
    python = f"{match['major']}.{match['minor']}"
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(f"{python}.0")
    assert (match["platform"] == "cpu") == (kind == "cpu")


def test_dockerfiles_share_the_python() -> None:
    pythons = {BASE.fullmatch(instructions(k, "FROM")[0])["minor"] for k in DOCKERFILES}
    assert len(pythons) == 1


def pip_installs(kind: str) -> list[list[str]]:
    """The argument lists of every ``pip install`` in the Dockerfile's RUN instructions."""
    found = []
    for run in instructions(kind, "RUN"):
        for words in shell_commands(run):
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                found.append(words[words.index("install") + 1:])
    return found


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_pins_match_the_constraints(kind: str) -> None:
    pins = pinned_versions()
    seen = {}
    for args in pip_installs(kind):
        for token in args:
            if "==" in token:
                req = Requirement(token)
                seen[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    assert {"torch", "torchvision"} <= set(seen), f"torch/torchvision not pinned in {kind} image"
    for name, version in seen.items():
        assert pins.get(name) == version, f"{kind}: {name}=={version}, constraints.txt pins {pins.get(name)}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_installs_the_repo_with_the_constraints(kind: str) -> None:
    """The package is installed with ``-c`` the copied constraints.txt, so the image holds the
    tested versions (pyproject.toml alone allows ranges)."""
    repo_installs = [a for a in pip_installs(kind)
                     if re.sub(r"\[[a-z0-9,]+\]$", "", a[-1]) in (".", str(app_dir()))]
    assert len(repo_installs) == 1, f"{kind}: expected one `pip install` of the repository"
    args = repo_installs[0]
    given = [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("-c", "--constraint")]
    given += [a.split("=", 1)[1] for a in args if a.startswith("--constraint=")]
    assert given, f"{kind}: the repository is installed without -c constraints.txt"
    for path in given:
        path = PurePosixPath(path)
        path = path.relative_to(app_dir()) if path.is_absolute() else path
        assert REPO / path == CONSTRAINTS, f"{kind}: -c {path} is not the repository's constraints.txt"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_torch_comes_from_the_right_index(kind: str) -> None:
    platform = BASE.fullmatch(instructions(kind, "FROM")[0])["platform"]
    torch_installs = [a for a in pip_installs(kind) if any(t.startswith("torch==") for t in a)]
    assert len(torch_installs) == 1
    args = torch_installs[0]
    assert args[args.index("--index-url") + 1] == f"https://download.pytorch.org/whl/{platform}"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_installs_the_copied_repo(kind: str) -> None:
    copies = [shlex.split(c) for c in instructions(kind, "COPY")]
    sources = [t for c in copies for t in c[:-1] if not t.startswith("--")]
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} missing"
    assert copies and copies[-1][-2:] == [".", str(app_dir())], "the repository is copied to WORKDIR"
    targets = [re.sub(r"\[[a-z0-9,]+\]$", "", args[-1]) for args in pip_installs(kind)]  # `.[s3]` is `.`
    assert any(t in (".", str(app_dir())) for t in targets), "no `pip install .`"
    env = " ".join(instructions(kind, "ENV"))
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env)
    assert "DIFFIN_MODEL_CONFIGS" not in env, "model configs are package data: the wheel carries them"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (or a parent folder) matches a root-anchored .dockerignore pattern."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pat.strip("/")) for p in prefixes for pat in patterns)


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = [l.strip() for l in (REPO / ".dockerignore").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "re-includes are not modelled by this test"
    for excluded in (".git", ".venv/bin/python", "data/openmoji/00000.tar", "runs/demo/run_summary.json",
                     "pipeline/__pycache__/config.cpython-311.pyc"):
        assert dockerignored(excluded, patterns), f"{excluded} would be sent to the Docker daemon"
    needed = ["pyproject.toml", "constraints.txt", "README.md", "pipeline/data/shards.py", "jobs/prune.py",
              *(str(p.relative_to(REPO)) for p in named_configs().values()),
              *(str(p.relative_to(REPO)) for p in (REPO / "configs" / "models").glob("*.json"))]
    for path in needed:
        assert (REPO / path).exists() and not dockerignored(path, patterns), f"{path} left out of the image"


# --- images --------------------------------------------------------------------------------


def test_cluster_images_are_the_documented_builds() -> None:
    built = build_commands()
    assert set(built.values()) == {f"docker/{p.name}" for p in DOCKERFILES.values()}
    version = pyproject()["project"]["version"]
    for image in built:
        assert image.rsplit(":", 1)[1].startswith(version), f"{image}: tag does not carry version {version}"
    gpu_image = next(i for i, f in built.items() if f == "docker/Dockerfile.gpu")
    cluster = load_yaml(RAYJOB)["spec"]["rayClusterSpec"]
    for pod in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        for container in pod["template"]["spec"]["containers"]:
            assert container["image"] in built, f"{container['image']} is not built by docs/CLUSTER.md"
            if container_resources(container)[1] > 0:
                assert container["image"] == gpu_image
    docker = load_yaml(RAY_UP)["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            assert docker[key] in built, f"cluster.yaml docker.{key} {docker[key]} is not built by docs/CLUSTER.md"
    assert docker.get("worker_image", docker["image"]) == gpu_image
    for kind, path in DOCKERFILES.items():  # the build line in each Dockerfile's header agrees
        header = re.search(r"docker build -f (\S+) -t (\S+) \.", path.read_text())
        assert header and built.get(header[2]) == header[1] == f"docker/{path.name}"
