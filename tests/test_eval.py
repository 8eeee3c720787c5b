"""`mpcvit eval`: plaintext accuracy and the secure 2-party run through the service."""

from __future__ import annotations

import json

import pytest
from mpcvit.commands import main


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plaintext_eval_of_the_shipped_model(capsys):
    assert main(["eval", "--model", "demo", "--data", "fashion-mnist", "--limit", "200",
                 "--json"]) == 0
    res = _last_json(capsys)
    assert res["images"] == 200
    assert res["accuracy"] > 0.75  # the shipped checkpoint is trained (90.7% on all 10k)
    assert "agreement" not in res


def test_eval_of_a_config_with_random_weights(capsys):
    assert main(["eval", "--model", "vit_7_4_32", "--data", "synthetic:size=32,channels=3",
                 "--limit", "4", "--json"]) == 0
    assert _last_json(capsys)["images"] == 4


def test_eval_refuses_a_dataset_of_the_wrong_shape(capsys):
    assert main(["eval", "--model", "vit_7_4_32", "--data", "fashion-mnist", "--limit", "4"]) == 2
    assert "do not fit the model input" in capsys.readouterr().err


def test_eval_refuses_arch_with_a_checkpoint(capsys):
    assert main(["eval", "--model", "demo", "--arch", "scale+relu", "--data", "fashion-mnist",
                 "--limit", "4"]) == 2
    assert "a checkpoint carries its spec" in capsys.readouterr().err


@pytest.mark.slow
def test_secure_eval_agrees_with_plaintext(capsys):
    assert main(["eval", "--model", "demo", "--data", "fashion-mnist", "--limit", "2",
                 "--secure", "--json"]) == 0
    res = _last_json(capsys)
    assert res["agreement"] == 1.0
    assert res["max_abs_err"] < 0.05
    # the shipped demo's counts per image (docs/benchmarks.md, section 1.3)
    assert res["rounds"] == 89 and res["bytes"] > 1e6 and res["seconds"] > 0
