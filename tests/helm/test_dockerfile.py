"""deploy/docker/Dockerfile, read as text (no Docker engine needed).

Decision checked here: the image has `HEALTHCHECK NONE` in its run stages. Kubernetes ignores
Docker health checks and probes each service natively over gRPC, and one image runs four
services on four ports, so a single fixed health command would be wrong for three of them.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUN_STAGES = ("runtime", "runtime-with-models")
FINAL_STAGES = ("runtime", "runtime-with-models", "builder", "models")
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|PEPPER|CREDENTIAL", re.I)


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def stages() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: FROM {args}"
            current = found[words[2]] = Stage(words[2], words[0])
        else:
            assert current is not None, f"{keyword} before FROM"
            current.instructions.append((keyword, args))
    return found


def lineage(name: str) -> list[Stage]:
    """The stage and the stages it is built on, nearest first."""
    all_stages = stages()
    chain = [all_stages[name]]
    while chain[-1].base in all_stages:
        chain.append(all_stages[chain[-1].base])
    return chain


def env_pairs(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy `ENV NAME value`
        return {words[0]: " ".join(words[1:])}
    pairs = {}
    for word in words:
        name, _, value = word.partition("=")
        pairs[name] = value
    return pairs


def test_stages_and_default_target() -> None:
    names = list(stages())
    assert {"runtime", "models", "runtime-with-models", "builder"} <= set(names)
    assert names[-1] == "runtime", "a plain `docker build` must give the small runtime image"


def test_base_image_pinned_by_exact_version() -> None:
    all_stages = stages()
    external = {s.base for s in all_stages.values() if s.base not in all_stages}
    assert external == {"python:3.11.7-slim-bookworm"}
    for image in external:
        tag = image.partition(":")[2]
        assert tag and tag != "latest" and re.match(r"^\d+\.\d+\.\d+", tag), image


def test_final_stages_run_as_a_fixed_non_root_uid() -> None:
    for name in FINAL_STAGES:
        users = [u for stage in lineage(name) for u in reversed(stage.args("USER"))]
        assert users, f"{name} runs as root"
        effective = users[0]
        assert re.fullmatch(r"\d+(:\d+)?", effective), f"{name}: USER {effective} not numeric"
        assert int(effective.split(":")[0]) > 0, f"{name} runs as root"


def test_non_root_user_created_with_that_uid() -> None:
    base = stages()["base"]
    created = " ".join(base.args("RUN"))
    assert "--uid 10001" in created and "--gid 10001" in created
    assert stages()["runtime"].args("USER") == ["10001:10001"]


def test_no_secrets_in_env_or_args() -> None:
    for stage in stages().values():
        for keyword, args in stage.instructions:
            if keyword == "ENV":
                pairs = env_pairs(args)
            elif keyword == "ARG":
                name, _, default = args.partition("=")
                pairs = {name: default}
            else:
                continue
            for name, value in pairs.items():
                if SECRET_NAME.search(name):
                    assert not value.strip("\"'"), f"{stage.name}: {keyword} {name} has a value"


def test_no_secret_files_copied() -> None:
    for stage in stages().values():
        for sources in stage.args("COPY") + stage.args("ADD"):
            assert not re.search(r"\.env\b|\.pem\b|\.key\b|id_rsa|credentials", sources)


def test_pip_installs_only_pinned_requirements() -> None:
    installs = 0
    for stage in stages().values():
        for run in stage.args("RUN"):
            for command in re.split(r"&&|;", run):
                words = shlex.split(command)
                if words[:2] != ["pip", "install"]:
                    continue
                installs += 1
                specs, skip = [], False
                for i, word in enumerate(words[2:], start=2):
                    if skip:
                        skip = False
                    elif word in ("-r", "--requirement"):
                        path = words[i + 1]
                        assert path.startswith("requirements/"), path
                        assert (ROOT / path).is_file(), path
                        skip = True
                    elif word in ("--index-url", "--extra-index-url", "-c", "--constraint"):
                        skip = True
                    elif not word.startswith("-"):
                        specs.append(word)
                for spec in specs:
                    assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.+]+", spec), spec
    assert installs >= 3


def test_python_and_project_setup() -> None:
    env: dict[str, str] = {}
    for stage in lineage("runtime")[::-1]:
        for args in stage.args("ENV"):
            env.update(env_pairs(args))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["SPEECHMESH_MODEL_CACHE_DIR"] == "/models"
    assert "/app/gen" in env["PYTHONPATH"]
    runs = " ".join(args for stage in lineage("runtime") for args in stage.args("RUN"))
    assert "tools/gen_protos.py" in runs
    assert "requirements/runtime.txt" in runs
    assert "--no-deps -r requirements/nodeps.txt" in runs
    assert "torch" not in runs and "models.txt" not in runs, "torch stays out of runtime"


def test_models_target_builds_both_and_runtime_with_models_copies_them() -> None:
    runs = " ".join(stages()["models"].args("RUN"))
    assert "services.asr.build_models" in runs and "services.mt.build_models" in runs
    copies = stages()["runtime-with-models"].args("COPY")
    assert any(c.startswith("--from=models") and c.endswith("/models /models") for c in copies)
    assert stages()["runtime-with-models"].base == "app"


@pytest.mark.parametrize("name", RUN_STAGES)
def test_healthcheck_is_declared_none(name: str) -> None:
    assert stages()[name].args("HEALTHCHECK") == ["NONE"]
    assert "No HEALTHCHECK" in DOCKERFILE.read_text()


def test_dockerignore_allow_lists_the_context() -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start from nothing, then allow"
    allowed = [line[1:] for line in lines if line.startswith("!")]
    for private in (".venv", ".git", "gen", ".env", "tests", "bench", ".cache"):
        assert not any(a.startswith(private) for a in allowed), private
    for needed in ("requirements/", "protos/", "services/", "tools/gen_protos.py"):
        assert any(a.startswith(needed) for a in allowed), needed
