"""``perplexity``: the sliding-window plan, parity with HF on the bundled trained model, CLI errors."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import mpt_relax
from mpt_relax.__main__ import main
from mpt_relax.errors import MPTRelaxError
from mpt_relax.tools import perplexity
from mpt_relax.tools.perplexity import PerplexityError, score, windows

TRAINED = Path(mpt_relax.__file__).resolve().parent / "data" / "tiny-mpt"


def heldout_sample(chars: int = 1500) -> str:
    """The start of the first held-out module (recorded in training.json) found in this
    interpreter's standard library: text the model did not train on."""
    record = json.loads((TRAINED / "training.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for entry in record["corpus"]["heldout"]:
        path = stdlib / Path(entry["path"]).name
        if path.is_file():
            return path.read_text(encoding="utf-8")[:chars]
    pytest.skip("none of the held-out modules is in this interpreter's standard library")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    return {q: mpt_relax.build(TRAINED, target="llvm", quantization=q, output=root / f"tiny-{q}", quiet=True)
            for q in ("q0f32", "q0f16", "q8f16_1", "q4f16_1")}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "heldout.txt"
    path.write_text(heldout_sample(), encoding="utf-8")
    return path


@pytest.mark.parametrize("n,context,stride", [(1000, 512, 256), (1000, 512, 512), (513, 512, 512), (2, 512, 1),
                                              (10, 4, 3), (7, 7, 7), (300, 128, 1)])
def test_windows_score_every_token_once(n, context, stride):
    plan = windows(n, context, stride)
    scored = []
    for start, end, new in plan:
        assert 0 <= start < end <= n and end - start <= context and 1 <= new <= end - start - 1
        scored += range(end - new, end)
    assert scored == sorted(set(scored))  # each token at most once, in order
    # every token but the first; disjoint windows (stride == context) also skip each window's
    # first token, which has no history in its window
    assert len(scored) == (n - math.ceil(n / context) if stride == context else n - 1)


def test_score_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 50)).astype(np.float32)  # a bigram "model": logits depend on the last id
    ids = rng.integers(0, 50, 300).tolist()
    out = score(lambda w, scored: table[np.asarray(w)], ids, context=64, stride=16)
    logp = table - np.log(np.exp(table.astype(np.float64)).sum(1, keepdims=True))
    expected = -np.mean([logp[a, b] for a, b in zip(ids[:-1], ids[1:])])
    assert out["scored_tokens"] == 299 and out["mean_nll"] == pytest.approx(expected, rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-12)


@pytest.mark.parametrize("quantization,rel", [("q0f32", 1e-4), ("q0f16", 1e-3)])
def test_perplexity_equals_hf(artifacts, text_file, quantization, rel):
    report = perplexity.run(artifacts[quantization], text_file, context=128, stride=64, compare_hf=True,
                            device="cpu")
    ours, hf = report["mpt_relax"], report["hf"]
    assert report["hf_model"] == str(TRAINED)
    assert ours["scored_tokens"] == hf["scored_tokens"] == report["tokens"] - 1
    assert abs(report["relative_difference"]) < rel, report
    assert 1 < ours["perplexity"] < 1000  # trained: far below the 4096-token vocabulary (random weights: ~4096)
    assert ours["tokens_per_s"] > 0 and report["bytes_per_weight"] == (4.0 if quantization == "q0f32" else 2.0)


@pytest.mark.parametrize("quantization,most", [("q8f16_1", 0.005), ("q4f16_1", 0.05)])
def test_quantized_perplexity_on_the_trained_model(artifacts, text_file, quantization, most):
    """Quantization accuracy where the weights are realistic (the trained model, held-out text):
    q8 within +0.5 % of fp16's perplexity, q4 within +5 % (the targets of the quantization table)."""
    base = perplexity.run(artifacts["q0f16"], text_file, context=128, stride=64, device="cpu")["mpt_relax"]
    got = perplexity.run(artifacts[quantization], text_file, context=128, stride=64, device="cpu")["mpt_relax"]
    assert got["scored_tokens"] == base["scored_tokens"]
    assert got["perplexity"] / base["perplexity"] - 1 < most, (got, base)


def test_cli_json(artifacts, text_file, capsys):
    assert main(["perplexity", "--artifact", str(artifacts["q0f32"]), "--text", str(text_file),
                 "--context", "64", "--stride", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["context"] == report["stride"] == 64 and report["hf"] is None
    assert report["mpt_relax"]["windows"] == math.ceil((report["tokens"] - 1) / 64)


@pytest.mark.parametrize("args,message", [
    (["--text", "MISSING"], "not found"),
    (["--text", "EMPTY"], "is empty"),
    (["--context", "513"], "larger than the artifact's context window of 512"),
    (["--stride", "0"], "stride must be in 1..context (512), got 0"),
    (["--context", "64", "--stride", "65"], "stride must be in 1..context (64), got 65"),
])
def test_cli_errors(artifacts, text_file, tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").write_text(" \n")
    args = [str(tmp_path / a) if a in ("MISSING", "EMPTY") else a for a in args]
    if "--text" not in args:
        args += ["--text", str(text_file)]
    assert main(["perplexity", "--artifact", str(artifacts["q0f32"]), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_errors_derive_from_the_package_base():
    assert issubclass(PerplexityError, MPTRelaxError)
    with pytest.raises(PerplexityError):
        windows(10, 1, 1)


def test_decode_scoring_and_int8_activations(artifacts, text_file, tmp_path):
    """--decode scores each token from a decode step: the same perplexity as one prefill per
    window on the exact path; int8 activations (decode only) within +1 % of it."""
    exact = artifacts["q4f16_1"]
    a8 = mpt_relax.build(TRAINED, target="llvm", quantization="q4f16_1", int8_activations=True,
                         output=tmp_path / "a8", quiet=True)
    prefilled = perplexity.run(exact, text_file, context=128, stride=64, device="cpu")["mpt_relax"]["perplexity"]
    decoded = perplexity.run(exact, text_file, context=128, stride=64, device="cpu", decode=True)
    assert decoded["logits_from"] == "decode"
    assert decoded["mpt_relax"]["perplexity"] == pytest.approx(prefilled, rel=1e-4)
    int8 = perplexity.run(a8, text_file, context=128, stride=64, device="cpu", decode=True)
    assert int8["quantization"] == "q4f16_1+a8"
    assert 0 < abs(int8["mpt_relax"]["perplexity"] / prefilled - 1) < 0.01, int8
