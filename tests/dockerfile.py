"""Reading pagoda's Dockerfiles in tests, without a container engine: the instructions of each
build stage, ENV with Docker's `$VAR`/`${VAR}` substitution, and what a stage's RUN commands do to
directories (create them, give them to group 0, make them group-writable)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, COPY, USER, VOLUME, ...
    value: str  # the rest of the logical line, continuation lines joined


@dataclass
class Stage:
    """One `FROM` and the instructions up to the next."""

    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [i.value for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV of this stage, in order, each value expanded with the variables set before it
        (a reference to a variable the stage does not set, such as the base image's PATH, stays)."""
        env: dict[str, str] = {}
        for value in self.values("ENV"):
            for pair in shlex.split(value):
                key, sep, raw = pair.partition("=")
                assert sep, f"ENV {value!r}: write ENV KEY=value"
                env[key] = expand(raw, env)
        return env

    def volumes(self) -> list[str]:
        return [path for value in self.values("VOLUME") for path in json.loads(value)]

    def commands(self) -> list[list[str]]:
        """Every shell command of every RUN (split at `&&` and `;`), ENV expanded, as argv lists."""
        env, out = self.env(), []
        for value in self.values("RUN"):
            for part in re.split(r"&&|;", value):
                if part.strip():
                    out.append(shlex.split(expand(part, env)))
        return out

    def dirs_made(self) -> set[str]:
        """Directories `mkdir -p` creates, with every parent they create on the way."""
        made: set[str] = set()
        for argv in self.commands():
            if argv[0] == "mkdir" and "-p" in argv:
                for path in (a for a in argv[1:] if not a.startswith("-")):
                    made.update(str(p) for p in [Path(path), *Path(path).parents] if str(p) != "/")
        return made

    def recursive_targets(self, command: str, first: set[str]) -> set[str]:
        """Paths a `<command> -R <first> ...` applies to, with its first operand one of `first`
        (e.g. the targets of `chgrp -R 0`, or of `chmod -R g=u`)."""
        targets: set[str] = set()
        for argv in self.commands():
            operands = [a for a in argv[1:] if not a.startswith("-")]
            if argv[0] == command and "-R" in argv and operands and operands[0] in first:
                targets.update(operands[1:])
        return targets


def expand(text: str, env: dict[str, str]) -> str:
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def parse(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile (comments dropped, continuation lines joined)."""
    stages: list[Stage] = []
    logical = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        logical += stripped
        if logical.endswith("\\"):
            logical = logical[:-1].rstrip() + " "
            continue
        keyword, _, value = logical.partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append(Stage(base=value.split()[0]))
        else:
            assert stages, f"{path}: {keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword.upper(), value.strip()))
    return stages


def is_under(path: str, roots: set[str]) -> bool:
    """True when `path` is one of `roots` or lies inside one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)
