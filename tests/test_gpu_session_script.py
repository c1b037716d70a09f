"""``benchmarks/gpu_session.sh`` on CPU: the script parses, and every ``python3 -m
benchmarks.X ...`` command it runs is accepted by that module's argument parser; its
``setup`` joins the wheels ``benchmarks/gpu_wheels.sh`` split, whose pins match this machine.

A lent GPU comes with minutes of device time; a flag renamed in a benchmark but not in the
script would waste them. Each command is parsed, never run: ``ArgumentParser.parse_args`` is
wrapped to stop right after parsing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess

import pytest

from tests.trainer_helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
WHEELS = ROOT / "benchmarks" / "gpu_wheels.sh"


class Parsed(Exception):
    """Raised by the wrapped ``parse_args`` once the command line was accepted."""


def script_commands() -> list[tuple[str, list[str]]]:
    """``(module, argv)`` for each benchmark command in the script, shell variables given
    sample values: ``$OUT`` a folder, each grid of the ``all`` loop, each loss of its loop,
    and the extra arguments the ``all`` step passes to ``fused``."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    grids = re.search(r"for grid in ([^;]+);", text).group(1).split()
    fused_extra = [
        shlex.split(m.group(1).replace("$OUT", "/tmp/out"))
        for m in re.finditer(r"^\s+fused (--[^\n]+)$", text, re.M)
    ]
    commands = []
    for line in re.findall(r"python3 -m (benchmarks\.\w+[^|;\n]*)", text):
        words = shlex.split(line.split("2>&1")[0].replace('${2:+-k "$2"}', ""))
        module, argv = words[0], [w.replace("$OUT", "/tmp/out") for w in words[1:]]
        if '"$@"' in line or "$@" in argv:
            argv = [w for w in argv if w != "$@"]
            commands += [(module, argv + extra) for extra in [[], *fused_extra]]
        elif "${1:-gpu}" in argv:
            commands += [(module, [g if w == "${1:-gpu}" else w for w in argv]) for g in grids]
        elif "$loss" in argv:
            commands += [(module, [x if w == "$loss" else w for w in argv]) for x in ("dpo", "kto")]
        else:
            commands.append((module, argv))
    return commands


@pytest.mark.parametrize("script", [SCRIPT, WHEELS], ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_script_names_every_benchmark_and_grid():
    modules = {m for m, _ in script_commands()}
    assert modules == {
        "benchmarks.fused_bench",
        "benchmarks.run",
        "benchmarks.memory_check",
        "benchmarks.packing",
        "benchmarks.trl_step",
    }


@pytest.mark.parametrize("module, argv", script_commands(), ids=lambda v: str(v)[:60])
def test_each_command_line_is_accepted(module, argv, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # a bad flag or choice exits with status 2 here
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    main = importlib.import_module(module).main
    with pytest.raises(Parsed):
        main(argv)


def test_every_test_file_the_script_runs_exists():
    named = set(re.findall(r"tests/[\w*]+\.py", SCRIPT.read_text()))
    assert "tests/test_losses_*.py" in named
    for pattern in sorted(named):
        assert list(ROOT.glob(pattern)), f"gpu_session.sh names {pattern}, which matches no file"


def test_wheel_pins_match_what_is_installed_here():
    """The peers' wheels carried to the GPU are the versions the suite ran against here."""
    pins = dict(re.findall(r"([\w.-]+)==([\w.]+)", WHEELS.read_text()))
    assert {"trl", "liger_kernel", "quack-kernels", "cut-cross-entropy"} <= set(pins)
    checked = 0
    for name, pinned in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a CUDA-only peer (QuACK, CCE) is not installed on the CPU machine
        assert installed == pinned, f"gpu_wheels.sh pins {name}=={pinned}, here {installed}"
        checked += 1
    assert checked >= 3  # trl, datasets, liger_kernel at least (the dev extra installs them)


def test_setup_joins_split_wheels(tmp_path):
    """``setup`` joins ``.whl/X.part-aa`` and ``.whl-b/X.part-ab`` byte for byte and installs
    the joined wheel with the whole ones; a part missing leaves that wheel out, with a
    message, and the rest still installs. ``python3`` and ``nvidia-smi`` are stubs."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "gpu_session.sh").write_text(SCRIPT.read_text())
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl-b").mkdir()
    (tmp_path / ".whl" / "small-1.0-py3-none-any.whl").write_bytes(b"small")
    big = os.urandom(3001)
    (tmp_path / ".whl" / "big-1.0-py3-none-any.whl.part-aa").write_bytes(big[:1500])
    (tmp_path / ".whl-b" / "big-1.0-py3-none-any.whl.part-ab").write_bytes(big[1500:])
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    log = tmp_path / "calls.log"
    for name in ("python3", "nvidia-smi"):
        (stubs / name).write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
        (stubs / name).chmod(0o755)
    joined = tmp_path / "joined"
    env = dict(os.environ, PATH=f"{stubs}:{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    env["JOINED"] = str(joined)

    def setup():
        log.write_text("")
        done = subprocess.run(
            ["bash", "benchmarks/gpu_session.sh", "setup"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        pip = next(line for line in log.read_text().splitlines() if "--target" in line)
        return pip.split(), done.stderr

    pip, _ = setup()
    assert (joined / "big-1.0-py3-none-any.whl").read_bytes() == big
    assert ".whl/small-1.0-py3-none-any.whl" in pip
    assert str(joined / "big-1.0-py3-none-any.whl") in pip

    (tmp_path / ".whl-b" / "big-1.0-py3-none-any.whl.part-ab").unlink()
    (joined / "big-1.0-py3-none-any.whl").unlink()
    pip, stderr = setup()
    assert ".whl/small-1.0-py3-none-any.whl" in pip
    assert not any("big-1.0" in arg for arg in pip)
    assert "big-1.0-py3-none-any.whl: part ab not here" in stderr
