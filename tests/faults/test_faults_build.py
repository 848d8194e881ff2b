"""Build output safety: nothing but an earlier artifact is ever replaced; complete-artifact check."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from faultkit import BUILD, assert_one_line, build_main, leftovers, run, tree_hash

import mpt_relax
from mpt_relax.compile import builder
from mpt_relax.io import artifact, staging


def test_unrelated_folder_is_refused_and_kept(tiny_ckpt, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    before = tree_hash(tmp_path)
    rc, err = build_main(capsys, "--model", tiny_ckpt, "--output", notes)
    assert rc == 1
    assert_one_line(err, str(notes), "not an mpt_relax artifact", "refusing")
    assert tree_hash(tmp_path) == before


def test_output_overlapping_the_model_is_refused(tiny_ckpt, tmp_path, capsys):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    before = tree_hash(tmp_path)
    for output in (ckpt, ckpt / "sub" / "art", tmp_path):  # equal, inside, containing
        rc, err = build_main(capsys, "--model", ckpt, "--output", output)
        assert rc == 1
        assert_one_line(err, "overlaps the input")
        assert tree_hash(tmp_path) == before


def test_regular_file_or_link_at_the_output_is_refused_not_moved(tiny_ckpt, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "file").write_text("precious")
    (tmp_path / "link").symlink_to(target)
    before = tree_hash(tmp_path)
    for name, words in (("file", ("not a directory",)), ("link", ("symbolic link",))):
        rc, err = build_main(capsys, "--model", tiny_ckpt, "--output", tmp_path / name)
        assert rc == 1
        assert_one_line(err, *words)
        assert tree_hash(tmp_path) == before and not leftovers(tmp_path, name)


def test_publish_directory_rechecks_before_the_rename(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(staging.OutputError, match="not an mpt_relax artifact"):
        with artifact.atomic_directory(out) as tmp:
            (tmp / "x").write_text("new")
            out.mkdir()
            (out / "user.txt").write_text("appeared meanwhile")
    assert (out / "user.txt").read_text() == "appeared meanwhile" and not leftovers(tmp_path, "out")


def test_artifact_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with artifact.atomic_directory(tmp_path / "out") as tmp:
            (tmp / artifact.CONFIG_FILE).write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_max_seq_len_zero_is_refused(tiny_ckpt, tmp_path, capsys):
    rc, err = build_main(capsys, "--model", tiny_ckpt, "--output", tmp_path / "a", "--max-seq-len", "0")
    assert rc == 2
    assert_one_line(err, "--max-seq-len", "at least 1", "--help")
    with pytest.raises(mpt_relax.ConfigError, match="max_seq_len"):
        mpt_relax.build(tiny_ckpt, output=tmp_path / "a", max_seq_len=0, quiet=True)
    assert not (tmp_path / "a").exists()


def _specs():
    from mpt_relax.compile import targets
    return [targets.resolve_target("llvm")]


@pytest.mark.parametrize("damage", ["delete shard", "truncate shard", "garbage tensor-cache", "delete library",
                                    "garbage mpt-config", "delete tokenizer"])
def test_up_to_date_needs_a_complete_artifact(tiny_ckpt, art_copy, damage):
    meta = json.loads((art_copy / artifact.CONFIG_FILE).read_text())
    fingerprint, specs = meta["fingerprint"], _specs()
    assert builder._up_to_date(art_copy, fingerprint, specs) and not artifact.missing_files(art_copy)
    shard = art_copy / "params_shard_0.bin"
    if damage == "delete shard":
        shard.unlink()
    elif damage == "truncate shard":
        shard.write_bytes(shard.read_bytes()[:-4])
    elif damage == "garbage tensor-cache":
        (art_copy / artifact.TENSOR_CACHE).write_text("{not json")
    elif damage == "delete library":
        (art_copy / meta["libraries"]["llvm"]).unlink()
    elif damage == "garbage mpt-config":
        (art_copy / artifact.CONFIG_FILE).write_text("[]")
    else:
        (art_copy / "tokenizer.json").unlink()
    assert not builder._up_to_date(art_copy, fingerprint, specs)
    assert artifact.is_artifact(art_copy)  # still ours: a rebuild may replace it


def test_broken_artifact_is_rebuilt_not_skipped(tiny_ckpt, art_copy, capsys):
    (art_copy / "params_shard_0.bin").unlink()
    rc, err = build_main(capsys, "--model", tiny_ckpt, "--output", art_copy)
    assert rc == 0 and "up to date" not in err
    assert not artifact.missing_files(art_copy) and not leftovers(art_copy.parent, art_copy.name)
    mpt_relax.Engine(art_copy, device="cpu").logits([1, 2, 3])


def test_up_to_date_artifact_is_skipped(tiny_ckpt, art_copy):
    before = tree_hash(art_copy)
    proc = run([BUILD, "--model", tiny_ckpt, "--output", art_copy, "--target", "llvm", "--quantization", "q0f32"])
    assert proc.returncode == 0 and "is up to date" in proc.stderr
    assert tree_hash(art_copy) == before
