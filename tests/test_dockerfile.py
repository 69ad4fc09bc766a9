"""The Dockerfile cannot rot silently.

No container engine runs on CI, so the image is checked in two ways:

* its shape is read from the Dockerfile: the runtime stage is the last one, runs as a
  numeric non-root user, copies only the built virtual environment, has an exec-form
  ``pyegress`` entrypoint and an exec-form ``pyegress healthcheck`` HEALTHCHECK whose URL
  matches the admin port of the default command, and carries OCI labels; the ``init``
  target installs nftables and iptables;
* the build stage is **replayed**: its COPY steps copy from a build context made with the
  ``.dockerignore`` rules, its RUN steps run in ``/bin/sh`` in a temporary directory with
  its ENV (the virtual environment's path moved under the temporary directory), and
  ``pyegress -V`` is run from the environment the runtime stage copies. pip needs PyPI
  for the dependencies, as a real build does.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the logical line, continuations joined

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else None."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list)
        assert all(isinstance(v, str) for v in value)
        return [str(v) for v in value]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            out.update(_key_values(ins.args))
        return out

    def labels(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.all("LABEL"):
            out.update(_key_values(ins.args))
        return out


def _key_values(text: str) -> dict[str, str]:
    """``ENV``/``LABEL`` in the ``k=v k2="v 2"`` form (the only form this Dockerfile uses)."""
    out: dict[str, str] = {}
    for word in shlex.split(text):
        key, eq, value = word.partition("=")
        assert eq, f"expected key=value, got {word!r}"
        out[key] = value
    return out


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped, ``\\`` continuations joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif keyword == "ARG" and not stages:
            continue  # a global ARG before the first FROM
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append(Instruction(keyword, args.strip()))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())
BY_NAME = {s.name: s for s in STAGES if s.name}


def _copy_from(stage: Stage) -> list[tuple[str, list[str], str]]:
    """(from-stage, sources, destination) of each ``COPY --from=``."""
    out = []
    for ins in stage.all("COPY"):
        words = shlex.split(ins.args)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        for flag in flags:
            if flag.startswith("--from="):
                out.append((flag.removeprefix("--from="), paths[:-1], paths[-1]))
    return out


def _runtime_stage() -> Stage:
    return STAGES[-1]


def _build_stage() -> tuple[Stage, str]:
    """The stage the runtime stage copies its files from, and the path it copies."""
    copies = _copy_from(_runtime_stage())
    assert len(copies) == 1, "the runtime stage copies exactly one thing from the build"
    source_stage, sources, dest = copies[0]
    assert len(sources) == 1
    assert sources[0] == dest, "the environment keeps its path (its scripts' shebangs)"
    return BY_NAME[source_stage], dest


# -------------------------------------------------------------------------------------
# The image's shape


def test_the_runtime_image_is_the_last_stage_and_a_slim_python() -> None:
    runtime = _runtime_stage()
    assert runtime.name == "runtime"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text().splitlines()
    assert all(s.base == "${PYTHON_IMAGE}" for s in STAGES)
    assert [s.name for s in STAGES] == ["build", "init", "runtime"]


def test_the_runtime_stage_holds_only_the_built_environment() -> None:
    runtime = _runtime_stage()
    build, venv = _build_stage()
    assert build.env()["VIRTUAL_ENV"] == venv
    # No package manager and no build step in the final image: its only RUN adds the user.
    for ins in runtime.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|gcc|make)\b", ins.args), ins.args
    plain_copies = [i for i in runtime.all("COPY") if "--from=" not in i.args]
    assert plain_copies == [], "source files never reach the runtime image"
    # The build uninstalls pip and setuptools from the environment it hands over.
    assert any("pip uninstall --yes pip setuptools" in i.args for i in build.all("RUN"))


def test_the_runtime_user_is_numeric_and_not_root() -> None:
    user = _runtime_stage().last("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) == 10001
    assert gid.isdigit()
    assert int(gid) != 0
    # the deploy manifests' runAsUser and the redirect exclusion use the same number
    assert "10001" in (ROOT / "deploy" / "base" / "app" / "deployment.yaml").read_text()


def test_entrypoint_and_healthcheck_are_exec_form_pyegress() -> None:
    runtime = _runtime_stage()
    _, venv = _build_stage()
    entry = runtime.last("ENTRYPOINT").exec_form()
    assert entry == [f"{venv}/bin/pyegress"]
    health = runtime.last("HEALTHCHECK").args
    options, _, command = health.partition("CMD ")
    assert "--interval=" in options
    assert "--timeout=" in options
    assert json.loads(command) == [f"{venv}/bin/pyegress", "healthcheck"]
    # The healthcheck URL's port is the admin port the default command opens.
    url = runtime.env()["PYEGRESS_HEALTHCHECK_URL"]
    match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/readyz", url)
    assert match, url
    cmd = runtime.last("CMD").exec_form()
    assert cmd is not None
    assert cmd[cmd.index("-metrics") + 1] == f":{match.group(1)}"


def test_the_default_command_parses_with_the_cli() -> None:
    from pyegress.cli import build_parser, parse_nodes

    cmd = _runtime_stage().last("CMD").exec_form()
    assert cmd is not None
    args = build_parser().parse_args(cmd)
    listen, forward = parse_nodes(args)
    assert [n.kind for n in listen] == ["http"]
    assert forward == []


@pytest.mark.parametrize("stage", ["init", "runtime"])
def test_images_carry_oci_labels(stage: str) -> None:
    labels = BY_NAME[stage].labels()
    for key in ("title", "description", "licenses", "version"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"


def test_the_init_target_has_the_firewall_tools() -> None:
    init = BY_NAME["init"]
    installs = " ".join(i.args for i in init.all("RUN"))
    assert "nftables" in installs
    assert "iptables" in installs
    assert "rm -rf /var/lib/apt/lists/*" in installs
    assert _copy_from(init) == _copy_from(_runtime_stage())
    assert init.last("ENTRYPOINT").exec_form() == _runtime_stage().last("ENTRYPOINT").exec_form()


# -------------------------------------------------------------------------------------
# The build context


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per ``.dockerignore`` line (Go filepath.Match plus ``**``)."""
    out = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        out.append((negated, re.compile(regex)))
    return out


def _ignored(relpath: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


def make_context(dest: Path) -> list[str]:
    """Copy the repository into ``dest`` as Docker would send it (``.dockerignore``
    applied); return the relative paths copied."""
    patterns = _ignore_patterns()
    copied = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if not path.is_file() or rel.startswith(".git/") or _ignored(rel, patterns):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(rel)
    return copied


def test_the_context_is_the_package_and_its_metadata(tmp_path: Path) -> None:
    copied = make_context(tmp_path)
    assert "pyproject.toml" in copied
    assert "README.md" in copied
    assert "pyegress/cli.py" in copied
    assert "pyegress/py.typed" in copied
    tops = {rel.split("/", 1)[0] for rel in copied}
    assert tops == {"pyproject.toml", "README.md", "pyegress"}
    assert not any("__pycache__" in rel or rel.endswith(".pyc") for rel in copied)


# -------------------------------------------------------------------------------------
# The replay


def _replay(stage: Stage, context: Path, root: Path, env: dict[str, str]) -> None:
    """Run ``stage``'s WORKDIR, ENV, COPY and RUN steps with absolute paths moved under
    ``root``."""
    workdir = root
    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            assert ins.args.startswith("/")
            workdir = root / ins.args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "ENV":
            for key, value in _key_values(ins.args).items():
                if value.startswith("/"):
                    value = str(root / value.lstrip("/"))
                env[key] = value
        elif ins.keyword == "COPY":
            words = shlex.split(ins.args)
            assert not any(w.startswith("--") for w in words), "COPY flags in the build stage"
            *sources, dest = words
            target = workdir / dest
            for source in sources:
                src = context / source
                assert src.exists(), f"COPY {source}: not in the build context"
                if src.is_dir():
                    shutil.copytree(src, target, dirs_exist_ok=True)
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
                else:
                    shutil.copy2(src, target)
        elif ins.keyword == "RUN":
            assert not ins.args.startswith("["), "exec-form RUN is not replayed"
            assert "/opt/" not in ins.args, "use $VIRTUAL_ENV, not a literal path"
            done = subprocess.run(
                ["/bin/sh", "-c", ins.args],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=540,
                check=False,
            )
            assert done.returncode == 0, f"RUN {ins.args}\n{done.stdout}\n{done.stderr}"
        elif ins.keyword not in ("ARG", "LABEL"):
            raise AssertionError(f"the replay does not know {ins.keyword}")


@pytest.mark.timeout(600)
def test_the_build_steps_install_a_working_pyegress(tmp_path: Path) -> None:
    context = tmp_path / "context"
    make_context(context)
    root = tmp_path / "image"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # The base image's `python`: this interpreter (its venv module makes a fresh one).
    (bindir / "python").symlink_to(sys.executable)
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(tmp_path / "home")
    build, venv = _build_stage()
    _replay(build, context, root, env)

    runtime = _runtime_stage()
    entry = runtime.last("ENTRYPOINT").exec_form()
    assert entry is not None
    program = root / entry[0].lstrip("/")
    assert program.is_relative_to(root / venv.lstrip("/"))
    clean = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [str(program), "-V"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    from pyegress import __version__

    assert done.stdout.startswith(f"pyegress {__version__} "), done.stdout
    # The environment holds the runtime dependencies and not the build tools.
    listing = subprocess.run(
        [str(program.parent / "python"), "-c", "import uvloop, h2, cryptography, yaml, pyroute2"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert not (program.parent / "pip").exists()
    # The installed package is a copy, not a link back to the source tree.
    location = subprocess.run(
        [str(program.parent / "python"), "-c", "import pyegress; print(pyegress.__file__)"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert location.stdout.startswith(str(root / venv.lstrip("/"))), location.stdout
    # The healthcheck subcommand answers (exit 1: nothing listens on the admin port).
    health = subprocess.run(
        [str(program), "healthcheck", "--url", "http://127.0.0.1:9/readyz", "--timeout", "1"],
        env=clean,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert health.returncode == 1, health.stderr
    assert "pyegress healthcheck:" in health.stderr
