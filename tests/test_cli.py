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


# -- plugin commands and offline stages (sample plugins from tests/sample_plugins.py) -----------
def _sample_registry(monkeypatch, names):
    """A registry with the built-ins plus the named sample plugins, used by the CLI and ``train``."""
    from importlib import metadata

    from mke_plugins import cli
    from mke_plugins import plugins as plugins_mod
    from mke_plugins import train as train_mod
    from mke_plugins.plugins import load_plugins
    from mke_plugins.registry import Registry

    eps = [metadata.EntryPoint(n, f"sample_plugins:{n}", "mke_plugins") for n in names]
    real = metadata.entry_points
    monkeypatch.setattr(plugins_mod.metadata, "entry_points",
                        lambda **kw: eps if kw.get("group") == "mke_plugins" else real(**kw))
    reg = Registry(load_plugins())
    monkeypatch.setattr(cli, "_registry", lambda: reg)
    monkeypatch.setattr(train_mod, "_registry", lambda: reg)
    return reg


def test_a_plugin_adds_a_command_and_a_taken_name_is_refused_naming_the_plugin(monkeypatch, capsys):
    from mke_plugins.cli import build_parser

    reg = _sample_registry(monkeypatch, ["commands", "taken_command", "raising_commands"])
    assert main(["hello", "--name", "mke"]) == 0
    out = capsys.readouterr()
    assert out.out == "hello, mke\n"
    assert ("plugin unknown ? (entry point taken_command = sample_plugins:taken_command): mke_register_commands "
            "raised PluginError: command 'bench' is already taken (a built-in command or another plugin's). "
            "Fix: give the command another name.") in out.err
    assert "(entry point raising_commands = sample_plugins:raising_commands): mke_register_commands raised " \
           "RuntimeError: boom while adding commands" in out.err
    assert any("mke_register_commands" in f.error for f in reg.failures)
    bench = next(a for a in build_parser()._actions if a.dest == "command").choices["bench"]
    assert bench.get_default("func").__module__ == "mke_plugins.bench.cli", "the built-in bench command stays"
    capsys.readouterr()
    assert main(["no-func"]) == 2
    assert "command 'no-func' sets no func" in capsys.readouterr().err


def test_train_overview_and_stage_help_show_the_common_and_the_stage_flags(monkeypatch, capsys):
    import pytest

    _sample_registry(monkeypatch, ["trainy"])
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: mke-plugins train METHOD" in out and "LDKE" in out and "UniKE" in out and "Trainy" in out
    assert main(["train"]) == 2 and "name the method" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "UniKE", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--hparams KEY|PATH", "--model DIR", "--data DIR|FILE", "--image-root DIR", "--out PATH",
                 "--device DEV", "--seed N", "--quiet", "qwen2vl-7b", "build UniKE's offline archive", "Defaults:"):
        assert flag in out, flag
    with pytest.raises(SystemExit):
        main(["train", "Trainy", "--help"])
    out = capsys.readouterr().out
    assert "Trainy options:" in out and "--steps STEPS" in out and "--hparams KEY|PATH" in out


def test_train_hands_the_stage_parsed_flags_and_seeded_hparams(monkeypatch, capsys, tmp_path):
    import random

    from mke_plugins.adapters.loading import seed_all

    import sample_plugins

    _sample_registry(monkeypatch, ["trainy"])
    yaml = tmp_path / "trainy.yaml"
    yaml.write_text("alg_name: Trainy\nmodel_name: some-model\nseed: 5\n")
    assert main(["train", "Trainy", "--hparams", str(yaml), "--steps", "9", "--seed", "11", "--out", "o.pt",
                 "--device", "1", "--quiet", "--model", "world"]) == 0
    args, hp = sample_plugins.SEEN["args"], sample_plugins.SEEN["hparams"]
    assert (args.method, args.hparams, args.out, args.quiet, args.options) == \
        ("Trainy", str(yaml), "o.pt", True, {"steps": 9})
    assert args.model.endswith("world-qwen2-vl") and hp.model_name == args.model == hp.name
    assert (hp.seed, hp.device) == (11, 1)  # --device 1 is EasyEdit's CUDA index
    seed_all(11)
    assert sample_plugins.SEEN["draw"] == random.random(), "load_hparams seeds every generator"
    yaml.write_text("alg_name: Trainy\nmodel_name: some-model\n")
    assert main(["train", "Trainy", "--hparams", str(yaml), "--device", "0"]) == 0
    assert sample_plugins.SEEN["hparams"].seed == 0
    assert main(["train", "Clashy", "--hparams", str(yaml)]) == 2
    err = capsys.readouterr().err
    assert "method 'Clashy': offline_flags cannot add its flags" in err and "--out" in err
    assert main(["train", "Trainy", "--hparams", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: file not found" in capsys.readouterr().err


def test_offline_flags_without_an_offline_stage_is_refused(monkeypatch):
    reg = _sample_registry(monkeypatch, ["trainy"])
    assert "Flagsonly" not in reg and "Trainy" in reg
    assert any("offline_flags is set but offline is not" in f.error for f in reg.failures)


def test_train_records_are_the_world_split_by_default_or_an_mmedit_file(tmp_path):
    import json
    import shutil

    from mke_plugins import world
    from mke_plugins.adapters.hf import Qwen2VLAdapter
    from mke_plugins.train import load_records

    adapter = Qwen2VLAdapter()
    records, label = load_records(None, adapter=adapter)
    assert label == f"world:seed{world.DEFAULT_SEED}" and len(records) == len(world.record_paths("train"))
    picture = world.record_paths("train")[0]["image"]
    shutil.copy(picture, tmp_path / "p.png")
    (tmp_path / "train.json").write_text(json.dumps([
        {"src": "what is it made of?", "alt": "glass", "image": "p.png", "rephrase": "its material?"},
        {"src": "skipped: no answer", "alt": "", "image": "p.png"}]))
    records, label = load_records(str(tmp_path), adapter=adapter)
    assert label == str(tmp_path / "train.json") and len(records) == 1
    rec = records[0]
    assert (rec["prompt"], rec["target"], rec["rephrase_prompt"]) == ("what is it made of?", "glass", "its material?")
    assert isinstance(rec["image"], list) and rec["image"][0].size  # qwen2-vl: a list of one PIL image
