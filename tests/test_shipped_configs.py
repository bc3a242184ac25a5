"""``juap configs``: the experiment files ship inside the package, are listed, copied out and run by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from juap.commands.cli import main
from juap.commands.shipped import CONFIG_DIR, copy_configs, list_configs, resolve_config, shipped_path
from juap.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_list_names_every_shipped_file(capsys):
    names = list_configs()
    assert "embedded/claims.yaml" in names and "imagenet/_base.yaml" in names
    assert len(names) == len(list(CONFIG_DIR.rglob("*.yaml"))) >= 30
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {n}\n" in out for n in names)


def test_copy_one_brings_its_bases_and_refuses_to_overwrite(tmp_path, capsys):
    # chestxray/table2 extends chestxray/_base.yaml, which extends ../imagenet/_base.yaml
    assert main(["configs", "chestxray/table2_fooling_ratio", "--out", str(tmp_path)]) == 0
    got = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml"))
    assert got == ["chestxray/_base.yaml", "chestxray/table2_fooling_ratio.yaml", "imagenet/_base.yaml"]
    assert (tmp_path / "imagenet/_base.yaml").read_bytes() == (
        CONFIG_DIR / "imagenet/_base.yaml"
    ).read_bytes()
    # a second table of the same folder shares the identical bases: only the new file is written
    assert [p.name for p in copy_configs("chestxray/table3_discrepancy.yaml", tmp_path)] == [
        "table3_discrepancy.yaml"
    ]
    (tmp_path / "chestxray/_base.yaml").write_text("# edited\n")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match="refusing to overwrite .*chestxray/_base.yaml"):
        copy_configs("chestxray/table4_jap_pgd.yaml", tmp_path)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    assert main(["configs", "chestxray/table4_jap_pgd.yaml", "--out", str(tmp_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_unknown_name_and_missing_out_are_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="did you mean .*embedded/claims.yaml"):
        shipped_path("claims")
    assert main(["configs", "no/such.yaml", "--out", str(tmp_path)]) == 2
    assert main(["configs", "embedded/claims.yaml"]) == 2
    assert "--out" in capsys.readouterr().err


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config("embedded/claims.yaml") == CONFIG_DIR / "embedded/claims.yaml"
    (tmp_path / "embedded").mkdir()
    (tmp_path / "embedded/claims.yaml").write_text("name: mine\n")
    assert resolve_config("embedded/claims.yaml") == Path("embedded/claims.yaml")


def test_run_and_config_take_a_shipped_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no such files here: the shipped ones are used
    assert main(["run", "embedded/table4_jap_pgd.yaml", "--list"]) == 0
    assert "cells; * = in shard 1/1" in capsys.readouterr().out
    from juap.commands.cli import _budget_given, _resolve_shipped, build_parser

    args = build_parser().parse_args(["train-rts", "--config", "intel/rts_resnet18", "--out", "x"])
    _resolve_shipped(args)
    assert Path(args.config) == CONFIG_DIR / "intel/rts_resnet18.yaml"
    args = build_parser().parse_args(["evaluate", "-p", "p", "--config", "embedded/_base.yaml"])
    _resolve_shipped(args)
    assert isinstance(_budget_given(args), bool)


def test_the_wheel_ships_the_configs_and_the_command_lists_them(tmp_path):
    """Build a wheel (from a copy of the tree, so no build/ folder lands in it), install it into a bare
    target folder, and list the configs from there (about 7 s)."""
    pytest.importorskip("setuptools")  # the build backend, used without isolation (no downloads)
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(tree),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("juap-*.whl")
    inside = set(zipfile.ZipFile(wheel).namelist())
    assert {f"juap/configs/{n}" for n in list_configs()} <= inside
    assert "juap/configs/README.md" in inside
    from juap.commands.zoo import zoo_names

    zoo = {f"juap/zoo/{n}.png" for n in zoo_names()}
    assert zoo and zoo <= inside  # the perturbation zoo ships too
    zoo_bytes = sum(zipfile.ZipFile(wheel).getinfo(n).compress_size for n in zoo)
    assert zoo_bytes < 512 * 1024, f"the zoo adds {zoo_bytes / 1024:.0f} KiB to the wheel"
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        cwd=tmp_path,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import juap, sys; from juap.commands.cli import main; print(juap.__file__); "
    code += "sys.exit(main(['configs']))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith(str(target))  # the installed copy, not the source tree
    assert "  embedded/claims.yaml\n" in out and "  intel/rts_resnet18.yaml\n" in out
    copied = tmp_path / "copied"
    subprocess.run(
        [sys.executable, "-c", code.replace("['configs']", f"['configs', 'all', '--out', {str(copied)!r}]")],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    assert len(list(copied.rglob("*.yaml"))) == len(list_configs())
