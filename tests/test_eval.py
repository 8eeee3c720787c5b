"""`mpcvit eval`: plaintext accuracy and the secure 2-party run through the service."""

from __future__ import annotations

import json

import pytest
from mpcvit.party.cli import main


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plaintext_eval_reports_accuracy(capsys):
    assert main(["eval", "--model", "demo", "--arch", "scale+relu", "--data", "fashion-mnist",
                 "--limit", "64", "--json"]) == 0
    res = _last_json(capsys)
    assert res["images"] == 64 and 0.0 <= res["accuracy"] <= 1.0
    assert "agreement" not in res


def test_eval_refuses_a_dataset_of_the_wrong_shape(capsys):
    assert main(["eval", "--model", "vit_7_4_32", "--data", "fashion-mnist", "--limit", "4"]) == 2
    assert "do not fit the model input" in capsys.readouterr().err


@pytest.mark.slow
def test_secure_eval_agrees_with_plaintext(capsys):
    assert main(["eval", "--model", "demo", "--arch", "relu_softmax+relu", "--data",
                 "fashion-mnist", "--limit", "2", "--secure", "--json"]) == 0
    res = _last_json(capsys)
    assert res["agreement"] == 1.0
    assert res["max_abs_err"] < 0.05
    assert res["rounds"] > 100 and res["bytes"] > 1e6 and res["seconds"] > 0
