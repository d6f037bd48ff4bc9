"""Corruption matrix: every kind of damage to a finished ladder store is caught by each CLI that reads
it (inspect_cache, train_side, evaluate) with exit status 2 and one `error:` line naming the file,
and nothing is written. The base store uses codec none, so every full shard file has the same size:
a swap or a copy can only be caught by the content hash, not by a size."""
from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import cache_activations
from pipeline import ladder_store as ls
from pipeline.config import CacheConfig
from tests.conftest import write_task

SPLITS = ("train", "validation", "test")


def cli(module, args):
    main = importlib.import_module(f"stages.{module}").main
    return CliRunner().invoke(main, args)  # exceptions caught: a traceback shows as exit code 1


@pytest.fixture(scope="module")
def pristine(tiny_bert, tmp_path_factory):
    """A finished cache (codec none, 32-token shards: 14 shard files per layer for train) and a side
    network trained on it, so that evaluate has a run to score."""
    root = tmp_path_factory.mktemp("integrity")
    task = write_task(root / "toy")
    cfg = CacheConfig(backbone=tiny_bert, task=task, out=str(root / "cache"), device="cpu", codec="none",
                      shard_tokens=32, chunk_tokens=16)
    cache_activations.run(cfg, log=lambda *a: None)
    res = cli("train_side", ["--params", "none", "--backbone", tiny_bert, "--task", task, "--cache",
                             str(root / "cache"), "--out", str(root / "run"), "--r", "4", "--epochs", "1",
                             "--batch-size", "16", "--device", "cpu", "--init", "magnitude"])
    assert res.exit_code == 0, res.output
    return tiny_bert, task, root


def flip(f: Path, at: int):
    data = bytearray(f.read_bytes())
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def swap(a: Path, b: Path):
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def copy_to(a: Path, b: Path):
    b.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(a, b)


def edit_text(f: Path, pattern, repl):
    """An edit that keeps the file's size (whitespace pads it), so that only the content hash can see it."""
    text = f.read_text()
    edited = re.sub(pattern, repl, text, count=1)
    assert edited != text and len(edited) == len(text)
    f.write_text(edited)


def edit_json(f: Path, fn):
    d = json.loads(f.read_text())
    fn(d)
    f.write_text(json.dumps(d))


def rerecord(s: Path, rel: str):
    """Rewrite the record so that it agrees with the file as it is now (with a valid digest)."""
    rec = json.loads((s / ls.PROGRESS).read_text())
    rec["files"][rel] = ls.file_entry(s / rel)
    ls.write_record(s, rec["fingerprint"], rec["shards"], rec["files"], rec["complete"])


def flip_behind_the_record(s: Path):
    """A byte flipped before its hash was taken (the record agrees with the damaged file): only zarr's
    crc32c can see it, and its ValueError must become the same clear error."""
    flip(s / SHARD, 100)
    rerecord(s, SHARD)


def shape_edited_with_the_record(s: Path):
    """Metadata and record edited together: the layout check (shape implied by offsets) still sees it."""
    edit_json(s / "layers/src_01/zarr.json", lambda d: d.update(shape=[d["shape"][0] + 100, d["shape"][1]]))
    rerecord(s, "layers/src_01/zarr.json")


SHARD = "layers/src_01/c/1/0"
CORRUPTIONS = {  # kind: (damage done to a store folder, regex the error line must match)
    "flipped byte in a chunk": (lambda s: flip(s / SHARD, 100), SHARD),
    "flipped byte in a shard index": (lambda s: flip(s / SHARD, -10), SHARD),
    "truncated shard": (lambda s: (s / SHARD).write_bytes((s / SHARD).read_bytes()[:500]), SHARD),
    "deleted shard file": (lambda s: (s / SHARD).unlink(), SHARD),
    "deleted offsets chunk": (lambda s: (s / "offsets/c/0").unlink(), "offsets/c/0"),
    "deleted labels chunk": (lambda s: (s / "labels/c/0").unlink(), "labels/c/0"),
    "flipped byte in token ids": (lambda s: flip(s / "src_ids/c/0", 30), "src_ids/c/0"),
    "two shard files swapped": (lambda s: swap(s / SHARD, s / "layers/src_01/c/2/0"), "layers/src_01/c/[12]/0"),
    "one shard copied over another": (lambda s: shutil.copy(s / "layers/src_01/c/2/0", s / SHARD), SHARD),
    "shard of another layer copied over": (lambda s: shutil.copy(s / "layers/src_00/c/1/0", s / SHARD), SHARD),
    "two layer folders swapped": (lambda s: swap(s / "layers/src_00", s / "layers/src_01"), "layers/src_0[01]/c/"),
    "shard copied to a new name": (lambda s: copy_to(s / SHARD, s / "layers/src_01/c/99/0"), "layers/src_01/c/99/0"),
    "zarr.json data_type edited": (lambda s: edit_text(s / "layers/src_01/zarr.json", '"float16"', '"int16"  '),
                                   "layers/src_01/zarr.json"),
    "zarr.json shape edited": (lambda s: edit_text(s / "layers/src_01/zarr.json", r'"shape": \[\s*(\d)',
                                                   lambda m: m.group(0)[:-1] + str(9 - int(m.group(1)))),
                               "layers/src_01/zarr.json"),
    "group attributes edited": (lambda s: edit_text(s / "zarr.json", '"max_length": 64', '"max_length": 32'),
                                "group metadata, file zarr.json"),
    "array metadata deleted": (lambda s: (s / "layers/src_01/zarr.json").unlink(), "layers/src_01/zarr.json"),
    "layer folder deleted": (lambda s: shutil.rmtree(s / "layers/src_02"), "layers/src_02/"),
    "_progress.json edited": (lambda s: edit_json(s / ls.PROGRESS, lambda d: d["shards"].update(src_01=3)),
                              ls.PROGRESS),
    "_progress.json truncated": (lambda s: (s / ls.PROGRESS).write_text((s / ls.PROGRESS).read_text()[:200]),
                                 ls.PROGRESS),
    "_progress.json deleted": (lambda s: (s / ls.PROGRESS).unlink(), ls.PROGRESS),
    "flipped byte behind the record (crc32c only)": (flip_behind_the_record, SHARD + ".*checksum"),
    "shape and record edited together": (shape_edited_with_the_record, "layers/src_01/zarr.json: shape"),
}
TOOLS = ("inspect_cache", "train_side", "evaluate")


def tool_args(tool, tiny_bert, task, cache_dir, run, out):
    if tool == "inspect_cache":
        return [str(cache_dir / "train.zarr")]
    if tool == "train_side":
        return ["--params", "none", "--backbone", tiny_bert, "--task", task, "--cache", str(cache_dir), "--out",
                str(out), "--r", "4", "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--init", "magnitude"]
    return ["--params", "none", "--run", str(run), "--cache", str(cache_dir), "--split", "test", "--out", str(out),
            "--device", "cpu"]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_is_caught_with_one_error_naming_the_file(kind, tool, pristine, tmp_path):
    tiny_bert, task, root = pristine
    damage, where = CORRUPTIONS[kind]
    cache_dir = tmp_path / "cache"
    shutil.copytree(root / "cache", cache_dir)
    for split in SPLITS:  # every split: each tool meets the damage in whatever it reads first
        damage(cache_dir / f"{split}.zarr")
    out = tmp_path / "out"
    res = cli(tool, tool_args(tool, tiny_bert, task, cache_dir, root / "run", out))
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1, (res.exit_code, res.output[-2000:])
    assert re.search(where, errors[0]) and "rerun stage one" in errors[0], errors[0]
    assert not [p for p in out.rglob("*") if p.is_file()] if out.exists() else True  # nothing written


def test_the_pristine_store_passes_every_tool(pristine, tmp_path):
    """The control of the matrix above: the same tools on the undamaged copy succeed."""
    tiny_bert, task, root = pristine
    res = cli("inspect_cache", ["--verify", str(root / "cache" / "train.zarr")])
    assert res.exit_code == 0 and ": ok, " in res.output, res.output
    for tool in TOOLS:
        res = cli(tool, tool_args(tool, tiny_bert, task, root / "cache", root / "run", tmp_path / tool))
        assert res.exit_code == 0, (tool, res.output[-2000:])


def test_every_file_of_a_store_is_in_its_record_with_its_sha256(pristine):
    tiny_bert, task, root = pristine
    s = root / "cache" / "train.zarr"
    rec = json.loads((s / ls.PROGRESS).read_text())
    on_disk = {p.relative_to(s).as_posix() for p in s.rglob("*") if p.is_file()} - {ls.PROGRESS}
    assert on_disk == {k for k, v in rec["files"].items() if v is not None}
    assert len([k for k in on_disk if k.startswith("layers/src_01/c/")]) == rec["shards"]["src_01"] >= 10
    for rel in on_disk:
        assert rec["files"][rel] == {"bytes": (s / rel).stat().st_size, "sha256": ls.sha256_file(s / rel)}


def test_verify_reports_the_damaged_file(pristine, tmp_path):
    tiny_bert, task, root = pristine
    shutil.copytree(root / "cache" / "train.zarr", tmp_path / "train.zarr")
    swap(tmp_path / "train.zarr" / SHARD, tmp_path / "train.zarr" / "layers/src_01/c/2/0")
    res = cli("inspect_cache", ["--verify", str(tmp_path / "train.zarr")])
    assert res.exit_code == 2 and "layers/src_01/c/1/0: content differs" in res.output, res.output


def test_the_command_the_error_gives_rebuilds_the_damaged_store(pristine, tmp_path):
    """The advice in the error line works: its stage-one command replaces the damaged store with a good one."""
    import shlex

    tiny_bert, task, root = pristine
    cache_dir = tmp_path / "cache"
    shutil.copytree(root / "cache", cache_dir)
    swap(cache_dir / "train.zarr" / SHARD, cache_dir / "train.zarr" / "layers/src_01/c/2/0")
    err = cli("inspect_cache", [str(cache_dir / "train.zarr")]).output
    command = shlex.split(re.search(r"\(python -m stages\.cache_activations ([^)]*)\)", err).group(1))
    res = cli("cache_activations", command + ["--params", "none", "--backbone", tiny_bert, "--task", task,
                                              "--device", "cpu", "--codec", "none", "--shard-tokens", "32",
                                              "--chunk-tokens", "16"])
    assert res.exit_code == 0, res.output
    assert cli("inspect_cache", ["--verify", str(cache_dir / "train.zarr")]).exit_code == 0
