"""Tests for mpt_relax.tools.convert and the bfloat16_to_float16.py CLI, on tiny checkpoints made here."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mpt_relax.sizes import parse_bytes
from mpt_relax.tools import convert as convert_module
from mpt_relax.io.checkpoint import CheckpointError
from mpt_relax.tools.convert import ConversionError, convert_checkpoint

REPO = Path(__file__).resolve().parents[2]
INF, NAN = math.inf, math.nan


def planted_tensors() -> dict[str, torch.Tensor]:
    """Small tensors of every handled kind with planted out-of-range, tiny and non-finite values.

    Expected counts (see EXPECTED): "a" (bf16): 2 clamped, 2 flushed, 3 non-finite;
    "b" (fp32): 2 clamped (65519 and -7e4; 65504 itself is kept), 1 flushed (1e-10; 3e-8 rounds
    up to the smallest subnormal instead), 0 non-finite; "c" (fp16, copied): 1 non-finite;
    "f" (bf16): a NaN among in-range values, 1 non-finite; "g" (empty) and "h" (0-d) are edge cases.
    """
    a = torch.linspace(0.5, 2.0, 32).reshape(4, 8)
    a[0, :3] = torch.tensor([7e4, -1e5, 0.0])
    a[1, :3] = torch.tensor([1e-9, -2e-9, -0.0])
    a[2, :3] = torch.tensor([NAN, INF, -INF])
    b = torch.linspace(-3.0, 3.0, 16)
    b[:5] = torch.tensor([65519.0, -7e4, 65504.0, 1e-10, 3e-8])
    c = torch.linspace(-1.0, 1.0, 8).to(torch.float16)
    c[3] = INF
    return {
        "a": a.to(torch.bfloat16),
        "b": b,
        "c": c,
        "d": torch.tensor([1, -2, 3], dtype=torch.int64),
        "e": torch.tensor([True, False, True, True, False]),
        "f": torch.tensor([1.0, NAN, -2.0]).to(torch.bfloat16),
        "g": torch.zeros(0, 4, dtype=torch.bfloat16),
        "h": torch.tensor(3.5),
    }


EXPECTED = {  # name -> (clamped, flushed, nonfinite)
    "a": (2, 2, 3),
    "b": (2, 1, 0),
    "c": (0, 0, 1),
    "d": (0, 0, 0),
    "e": (0, 0, 0),
    "f": (0, 0, 1),
    "g": (0, 0, 0),
    "h": (0, 0, 0),
}
SHARDS = [["a", "b"], ["c", "d", "e", "f", "g", "h"]]


def expected_output(x: torch.Tensor) -> torch.Tensor:
    """The fp16 tensor the converter must write for bf16/fp32 ``x`` (inf stays inf)."""
    out = x.to(torch.float32).clamp(-65504, 65504).to(torch.float16)
    out[torch.isinf(x)] = x[torch.isinf(x)].to(torch.float16)
    return out


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits (NaN only has to be NaN in the same places)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.is_floating_point():
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        keep = ~torch.isnan(want)
        assert torch.equal(got[keep].view(torch.int16), want[keep].view(torch.int16))
    else:
        assert torch.equal(got, want)


def write_config(path: Path, model_type: str = "mpt") -> None:
    """A minimal config.json (transformers 5 style: has a ``dtype`` key)."""
    config = {"model_type": model_type, "d_model": 8, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))


def make_checkpoint(path: Path, fmt: str, tensors: dict | None = None, shards: list | None = None) -> Path:
    """Write ``tensors`` (default: planted_tensors) as an MPT checkpoint in format ``fmt``:
    "safetensors" / "bin" (sharded, with an index) or "safetensors-single" / "bin-single"."""
    tensors = planted_tensors() if tensors is None else tensors
    shards = SHARDS if shards is None else shards
    path.mkdir(parents=True)
    write_config(path)
    ext, stem, index = (
        ("safetensors", "model", "model.safetensors.index.json")
        if fmt.startswith("safetensors")
        else ("bin", "pytorch_model", "pytorch_model.bin.index.json")
    )
    save = (lambda d, f: save_file(d, str(f))) if ext == "safetensors" else (lambda d, f: torch.save(d, f))
    if fmt.endswith("-single"):
        save(tensors, path / f"{stem}.{ext}")
        return path
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        filename = f"{stem}-{k:05d}-of-{len(shards):05d}.{ext}"
        save({n: tensors[n] for n in names}, path / filename)
        weight_map.update({n: filename for n in names})
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def load_output(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a converted checkpoint, read through its index."""
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for filename in set(weight_map.values()):
        out.update(load_file(str(path / filename)))
    assert set(out) == set(weight_map)
    return out


def assert_nothing_left(parent: Path, *keep: str) -> None:
    """``parent`` holds only the entries named in ``keep`` (no output, temp or backup dirs)."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-single", "bin", "bin-single"])
def test_values_and_counts_for_every_input_format(tmp_path, fmt):
    src = make_checkpoint(tmp_path / "src", fmt)
    report = convert_checkpoint(src, tmp_path / "out")
    out = load_output(tmp_path / "out")
    source = planted_tensors()
    for name, x in source.items():
        want = expected_output(x) if x.dtype in (torch.bfloat16, torch.float32) else x
        assert_bits_equal(out[name], want)
    assert out["a"][0, 0] == 65504 and out["a"][0, 1] == -65504 and out["b"][0] == 65504
    assert torch.isinf(out["a"][2, 1]) and torch.isnan(out["a"][2, 0])
    assert out["b"][4] == 2.0**-24  # just above half the smallest subnormal: kept, not flushed
    counts = {t.name: (t.clamped, t.flushed, t.nonfinite) for t in report.tensors}
    assert counts == EXPECTED
    assert (report.clamped, report.flushed, report.nonfinite) == (4, 3, 5)
    assert report.verified == len(source)
    assert report.input_bytes == 32 * 2 + 16 * 4 + 8 * 2 + 3 * 8 + 5 + 3 * 2 + 4
    assert report.output_bytes == 32 * 2 + 16 * 2 + 8 * 2 + 3 * 8 + 5 + 3 * 2 + 2


def test_output_shards_index_and_config(tmp_path):
    src = make_checkpoint(tmp_path / "src", "safetensors")
    report = convert_checkpoint(src, tmp_path / "out", shard_size=64)
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = "model-{:05d}-of-00003.safetensors".format
    expected = {"a": 1, "b": 2, "c": 2, "d": 3, "e": 3, "f": 3, "g": 3, "h": 3}
    assert index["weight_map"] == {name: shard(k) for name, k in expected.items()}
    assert report.shards == [shard(1), shard(2), shard(3)]
    sizes = [sum(t.numel() * t.element_size() for t in load_file(str(out / shard(k))).values()) for k in (1, 2, 3)]
    assert sizes == [64, 48, 37]  # greedy in read order, each at most shard_size
    assert index["metadata"]["total_size"] == sum(sizes) == report.output_bytes
    config = json.loads((out / "config.json").read_text())
    assert config == {"model_type": "mpt", "d_model": 8, "dtype": "float16", "torch_dtype": "float16"}


def test_other_files_copied_weights_not(tmp_path):
    src = make_checkpoint(tmp_path / "src", "safetensors")
    extra = {
        "tokenizer.json": '{"version": "1.0"}',
        "tokenizer_config.json": '{"model_max_length": 2048}',
        "special_tokens_map.json": '{"eos_token": "<|endoftext|>"}',
        "generation_config.json": '{"eos_token_id": 0}',
        "configuration_mpt.py": "# remote code\n",
    }
    for name, text in extra.items():
        (src / name).write_text(text)
    (src / "pytorch_model.bin").write_bytes(b"stale weights")
    (src / ".gitattributes").write_text("*.bin lfs\n")
    (src / "onnx").mkdir()
    report = convert_checkpoint(src, tmp_path / "out")
    out = tmp_path / "out"
    for name, text in extra.items():
        assert (out / name).read_text() == text
    weights = ["model.safetensors.index.json", "model-00001-of-00001.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*extra, "config.json", *weights])
    assert sorted(report.copied_files) == sorted(extra)
    skipped = [".gitattributes (hidden)", "onnx/ (directory)", "pytorch_model.bin (weights not converted)"]
    assert report.skipped_files == skipped


def test_existing_destination_refused_then_replaced_with_force(tmp_path):
    src = make_checkpoint(tmp_path / "src", "safetensors")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "marker").write_text("old")
    with pytest.raises(ConversionError, match="already exists"):
        convert_checkpoint(src, dst)
    assert (dst / "marker").read_text() == "old"
    convert_checkpoint(src, dst, force=True)
    assert not (dst / "marker").exists() and (dst / "model.safetensors.index.json").is_file()
    assert_nothing_left(tmp_path, "src", "out")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_shard_leaves_nothing(tmp_path, fmt):
    src = make_checkpoint(tmp_path / "src", fmt)
    shard = sorted(src.glob(f"*.{fmt}"))[1]
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        convert_checkpoint(src, tmp_path / "out")
    assert_nothing_left(tmp_path, "src")


def test_index_naming_missing_shard(tmp_path):
    src = make_checkpoint(tmp_path / "src", "safetensors")
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        convert_checkpoint(src, tmp_path / "out")
    assert_nothing_left(tmp_path, "src")


def test_index_listing_tensor_no_shard_holds(tmp_path):
    src = make_checkpoint(tmp_path / "src", "bin")
    index = json.loads((src / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "pytorch_model-00001-of-00002.bin"
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="lm_head.weight"):
        convert_checkpoint(src, tmp_path / "out")
    assert_nothing_left(tmp_path, "src")


def test_non_mpt_config_needs_any_arch(tmp_path):
    src = make_checkpoint(tmp_path / "src", "safetensors")
    write_config(src, model_type="llama")
    with pytest.raises(ConversionError, match="any-arch"):
        convert_checkpoint(src, tmp_path / "out")
    assert_nothing_left(tmp_path, "src")
    report = convert_checkpoint(src, tmp_path / "out", any_arch=True)
    assert len(report.warnings) == 1 and "'llama'" in report.warnings[0]


def test_strict_refuses_clamping_and_leaves_nothing(tmp_path):
    tensors = {"tiny": torch.tensor([1e-9, 1.0]).to(torch.bfloat16), "big": torch.tensor([1e5, 1.0]).to(torch.bfloat16)}
    src = make_checkpoint(tmp_path / "src", "safetensors", tensors, [["tiny"], ["big"]])
    with pytest.raises(ConversionError, match="big has 1 value"):  # fails while writing the second shard
        convert_checkpoint(src, tmp_path / "out", strict=True)
    assert_nothing_left(tmp_path, "src")
    del tensors["big"]
    ok = make_checkpoint(tmp_path / "ok", "safetensors", tensors, [["tiny"]])
    assert convert_checkpoint(ok, tmp_path / "ok-out", strict=True).flushed == 1  # flushing is allowed


def test_interrupt_leaves_nothing(tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "src", "safetensors")
    real_write, calls = convert_module._write_tensor, []

    def interrupted_write(*args):
        calls.append(args[0].name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(*args)

    monkeypatch.setattr(convert_module, "_write_tensor", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, tmp_path / "out")
    assert len(calls) == 3
    assert_nothing_left(tmp_path, "src")


def test_not_enough_disk_space(tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "src", "safetensors")
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda _: type("Usage", (), {"free": 10_000})())
    with pytest.raises(ConversionError, match="not enough disk space"):
        convert_checkpoint(src, tmp_path / "out")
    assert_nothing_left(tmp_path, "src")


def test_verification_catches_a_wrong_cast(tmp_path, monkeypatch):
    src = make_checkpoint(tmp_path / "src", "safetensors")
    real_cast = convert_module._cast_chunk

    def off_by_one_ulp(x, out):
        out, *counts = real_cast(x, out)
        return (out.view(torch.int16) ^ 1).view(torch.float16), *counts

    monkeypatch.setattr(convert_module, "_cast_chunk", off_by_one_ulp)
    with pytest.raises(ConversionError, match="verification failed: a differs"):
        convert_checkpoint(src, tmp_path / "out")
    assert_nothing_left(tmp_path, "src")
    report = convert_checkpoint(src, tmp_path / "out", verify=False)
    assert report.verified is None and "verification skipped" in report.summary()


def test_round_trip_through_transformers(tmp_path):
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    config = MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=64, attn_config={"attn_pdrop": 0})
    model = MptForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 1
    report = convert_checkpoint(tmp_path / "src", tmp_path / "out", shard_size=100_000)
    assert len(report.shards) > 1

    converted, info = MptForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert {p.dtype for p in converted.parameters()} == {torch.float16}  # config.json now says float16
    bf16 = MptForCausalLM.from_pretrained(tmp_path / "src")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        got = converted.float()(ids).logits
        want = bf16.half().float()(ids).logits  # torch's own bf16 -> fp16 cast, nothing to clamp here
        from_bf16 = bf16.float()(ids).logits  # bf16 -> fp32 differs only where tiny weights lose bits in fp16
    assert torch.equal(got, want)
    torch.testing.assert_close(got, from_bf16, rtol=1e-3, atol=1e-3)
    assert got.argmax(-1).unique().numel() > 3  # logits that actually depend on the input and weights


def load_cli():
    """The repo-root script bfloat16_to_float16.py as a module."""
    spec = importlib.util.spec_from_file_location("bfloat16_to_float16", REPO / "bfloat16_to_float16.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_in_process(tmp_path, monkeypatch, capsys):
    cli = load_cli()
    assert parse_bytes("2GB") == 2 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes("64") == 64
    make_checkpoint(tmp_path / "mpt-tiny", "bin")
    monkeypatch.setattr(cli, "MODELS_DIR", tmp_path)
    assert cli.main(["--model", "mpt-tiny", "--quiet", "--shard-size", "100B"]) == 0
    assert "clamped to +-65504: 4; flushed to zero: 3; NaN/inf passed through: 5" in capsys.readouterr().out
    assert len(list((tmp_path / "mpt-tiny-float16").glob("model-*-of-00002.safetensors"))) == 2
    assert cli.main(["--model", "mpt-tiny", "--strict", "--force"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "strict" in err
    assert (tmp_path / "mpt-tiny-float16").is_dir()  # the failed --force run kept the old output


def test_cli_missing_directory_subprocess(tmp_path):
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [sys.executable, str(REPO / "bfloat16_to_float16.py"), "--model-path", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == f"error: checkpoint directory {missing} does not exist\n"
    assert not (tmp_path / "no-such-model-float16").exists()
