"""The mke-plugins command: listings, resolved hparams, helpful errors."""

from __future__ import annotations

import json

from mke_plugins.cli import main


def test_methods_json_lists_builtin_baselines(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name in ("FT", "LoRA"):
        row = rows[name]
        assert row["plugin"] == "mke_plugins.methods.baselines" and row["summary"]
        assert "world" in row["hparams_models"]
        assert row["easyedit"].startswith("not injected")


def test_plugins_text_and_json(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "mke_plugins.methods.baselines  [mke-plugins" in out and "built-in]: FT, LoRA" in out
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any(p["name"] == "mke_plugins.methods.baselines" for p in data["plugins"])


def test_hparams_prints_the_resolved_yaml(capsys):
    assert main(["hparams", "FT", "world", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# FT on world: ") and "ft/world.yaml" in out.splitlines()[0]
    assert "\nalg_name: FT\n# Model path (also the family key for EasyEdit)" in out
    assert "world-qwen2-vl" in out


def test_unknown_method_and_model_errors(capsys):
    assert main(["hparams", "Ft", "world"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'Ft'. Did you mean: FT?" in err
    assert main(["hparams", "FT", "wrld"]) == 2
    err = capsys.readouterr().err
    assert "method 'FT' has no hyperparameters for model 'wrld'. Fix: did you mean 'world'?" in err
    assert main(["train", "FT"]) == 2
    assert "method 'FT' has no offline stage to train" in capsys.readouterr().err
