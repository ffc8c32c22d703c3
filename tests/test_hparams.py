"""Strict, EasyEdit-compatible hyperparameter loading: every bad file gets a precise message."""

from __future__ import annotations

import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp, read_yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoHyperParams(MultimodalHyperParams):
    ALG_NAME: ClassVar[str] = "Demo"
    ALG_ALIASES: ClassVar[dict] = {"DEMO": "Demo"}
    ALG_REFUSED: ClassVar[dict] = {"Dem0": "Dem0 is another method."}
    layers: list[int] = hp([1], "Layers to edit.")
    lr: float = hp(1e-2, "Learning rate.")
    steps: int = hp(10, "Steps.")
    required_thing: str = hp(help="A required field.", kw_only=True)


def write(tmp_path, text):
    p = tmp_path / "demo.yaml"
    p.write_text(text)
    return p


def test_loads_with_or_without_suffix_and_coerces(tmp_path):
    p = write(tmp_path, "alg_name: DEMO\nmodel_name: m\nlr: '1e-3'\nsteps: 5.0\nrequired_thing: x\ndtype: bf16\n")
    h = DemoHyperParams.from_hparams(str(p)[:-5])
    assert h.alg_name == "Demo" and h.lr == 1e-3 and h.steps == 5 and h.dtype is torch.bfloat16
    assert h.name == "m" and h.layers == [1]
    h.batch_size = 1  # EasyEdit writes attributes
    assert DemoHyperParams.from_hparams(p).to_dict()["dtype"] == "bfloat16"


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    p = write(tmp_path, "alg_name: Demo\nrequired_thing: x\nlearning_rat: 1\n")
    with pytest.raises(HparamsError) as e:
        DemoHyperParams.from_hparams(p)
    msg = str(e.value)
    assert str(p) in msg and "'learning_rat'" in msg and "unknown hyperparameter" in msg


def test_unknown_key_close_match(tmp_path):
    p = write(tmp_path, "alg_name: Demo\nrequired_thing: x\nstep: 1\n")
    with pytest.raises(HparamsError, match=r"did you mean 'steps'"):
        DemoHyperParams.from_hparams(p)


def test_missing_keys_are_all_listed(tmp_path):
    p = write(tmp_path, "alg_name: Demo\n")
    with pytest.raises(HparamsError, match=r"missing required keys: required_thing"):
        DemoHyperParams.from_hparams(p)


def test_bad_yaml_and_wrong_types(tmp_path):
    with pytest.raises(HparamsError, match=r"not valid YAML"):
        DemoHyperParams.from_hparams(write(tmp_path, "alg_name: [Demo\n"))
    with pytest.raises(HparamsError, match=r"key 'steps': expected an integer, got 'many'"):
        DemoHyperParams.from_hparams(write(tmp_path, "alg_name: Demo\nrequired_thing: x\nsteps: many\n"))
    with pytest.raises(HparamsError, match=r"key 'dtype': unknown dtype 'float8'"):
        DemoHyperParams.from_hparams(write(tmp_path, "alg_name: Demo\nrequired_thing: x\ndtype: float8\n"))
    with pytest.raises(HparamsError, match=r"file not found"):
        DemoHyperParams.from_hparams(tmp_path / "nope.yaml")


def test_alg_name_checks(tmp_path):
    with pytest.raises(HparamsError, match=r"alg_name is 'Other' but this file is for 'Demo'"):
        DemoHyperParams.from_hparams(write(tmp_path, "alg_name: Other\nrequired_thing: x\n"))
    with pytest.raises(HparamsError, match=r"Dem0 is another method"):
        DemoHyperParams.from_hparams(write(tmp_path, "alg_name: Dem0\nrequired_thing: x\n"))


def test_every_field_of_the_base_has_help():
    assert all(MultimodalHyperParams.field_help().values())
    with pytest.raises(ValueError):
        hp(1)


def test_check_given_names_the_class_and_validates(tmp_path):
    """What every apply function calls first: a wrong object says how to load the right one."""
    with pytest.raises(TypeError, match=r"Demo needs DemoHyperParams .*load_hparams\('Demo', \.\.\.\)\), got dict"):
        DemoHyperParams.check_given({"alg_name": "Demo"})

    class Strict(DemoHyperParams):
        def validate(self, *, path: str = "<dict>") -> None:
            raise HparamsError("steps must be even.", path=path, key="steps", fix="write 10.")

    p = write(tmp_path, "alg_name: Demo\nmodel_name: m\nrequired_thing: x\n")
    DemoHyperParams.check_given(DemoHyperParams.from_hparams(p))
    with pytest.raises(HparamsError, match="steps"):
        Strict.check_given(Strict.from_hparams(p))


@dataclass
class FloatsHyperParams(DemoHyperParams):
    ALG_NAME: ClassVar[str] = "Demo"
    margin: float | None = hp(None, "Optional float.")
    weights: list[float] = hp([1.0], "A list of floats.")
    cap: float = hp(float("inf"), "May be infinite.", finite=False)


@pytest.mark.parametrize("line, key, shown", [
    ("lr: .inf", "lr", "inf"), ("lr: -.inf", "lr", "-inf"), ("lr: .nan", "lr", "nan"),
    ("lr: inf", "lr", "inf"), ("lr: 1e999", "lr", "inf"), ("margin: .nan", "margin", "nan"),
    ("weights: [1.0, .inf]", "weights", "inf"),
])
def test_non_finite_floats_are_refused_on_loading(tmp_path, line, key, shown):
    p = write(tmp_path, f"alg_name: Demo\nmodel_name: m\nrequired_thing: x\n{line}\n")
    with pytest.raises(HparamsError, match=rf"demo.yaml: key '{key}': {shown} is not a finite number\. Fix: "):
        FloatsHyperParams.from_hparams(p)


def test_finite_false_fields_may_be_infinite(tmp_path):
    p = write(tmp_path, "alg_name: Demo\nmodel_name: m\nrequired_thing: x\ncap: .inf\nmargin: null\n")
    hp_obj = FloatsHyperParams.from_hparams(p)
    assert hp_obj.cap == float("inf") and hp_obj.margin is None
    FloatsHyperParams.check_given(hp_obj)


def test_check_given_refuses_floats_made_non_finite_after_loading(tmp_path):
    """An object mutated after loading (or built by hand) is caught before any weight changes."""
    obj = FloatsHyperParams.from_config({"alg_name": "Demo", "model_name": "m", "required_thing": "x"})
    obj.lr = float("nan")
    with pytest.raises(HparamsError, match=r"<hparams object>: key 'lr': nan is not a finite number"):
        FloatsHyperParams.check_given(obj)
    obj.lr, obj.weights = 1e-3, [float("-inf")]
    with pytest.raises(HparamsError, match=r"key 'weights': -inf is not a finite number"):
        FloatsHyperParams.check_given(obj)


@pytest.mark.parametrize("method, key, value", [
    ("FT", "lr", ".inf"), ("DECODE", "kl_weight", ".nan"), ("LDKE", "edit_lr", "inf"),
    ("LDKE", "weight_norm", "nan"), ("UniKE", "beta", "1e999"), ("LoRA", "lr", "-inf"),
])
def test_every_method_refuses_non_finite_floats(tmp_path, method, key, value):
    """The check is declared once in the base: every method's float fields get it without code of their own."""
    from mke_plugins.hparams import load_hparams, locate_hparams

    text = locate_hparams(method, "world").read_text()
    p = tmp_path / "bad.yaml"
    p.write_text(f"{text}\n{key}: {value}\n" if f"\n{key}:" not in text
                 else "\n".join(f"{key}: {value}" if ln.startswith(f"{key}:") else ln for ln in text.splitlines()))
    with pytest.raises(HparamsError, match=rf"bad.yaml: key '{key}': -?(inf|nan) is not a finite number"):
        load_hparams(method, str(p))
    good = load_hparams(method, "world")
    setattr(good, key, float(value.lstrip(".")))
    with pytest.raises(HparamsError, match=rf"key '{key}': -?(inf|nan) is not a finite number"):
        type(good).check_given(good)


def test_duplicate_key_names_file_key_and_lines(tmp_path):
    p = write(tmp_path, "alg_name: Demo\nrequired_thing: x\nlr: 0.1\nsteps: 3\nlr: 0.5\n")
    with pytest.raises(HparamsError) as e:
        DemoHyperParams.from_hparams(p)
    assert str(e.value).startswith(f"{p}: key 'lr': appears twice, on lines 3 and 5;")
    nested = write(tmp_path, "alg_name: Demo\nrequired_thing: x\nlayers: [1]\nextra:\n  a: 1\n  a: 2\n")
    with pytest.raises(HparamsError, match=r"key 'a': appears twice, on lines 5 and 6"):
        read_yaml(nested)
    merged = write(tmp_path, "base: &b {lr: 1}\nother:\n  <<: *b\n  lr: 2\n")
    assert read_yaml(merged)["other"] == {"lr": 2}  # a merge key is not a duplicate
    with pytest.raises(HparamsError, match=r"not valid YAML: .*python/object"):
        read_yaml(write(tmp_path, "alg_name: !!python/object/apply:os.getcwd []\n"))


def test_override_errors_name_the_override_not_the_file():
    from mke_plugins.bench.methods import bind, parse_method
    from mke_plugins.hparams import load_hparams

    cases = {"DECODE[max_stepz=3]": "key 'max_stepz': unknown hyperparameter 'max_stepz'",
             "DECODE[max_steps=abc]": "key 'max_steps': expected an integer, got 'abc'",
             "DECODE[max_steps=1.5]": "key 'max_steps': expected an integer, got 1.5"}
    for label, problem in cases.items():
        override = label[len("DECODE["):-1]
        with pytest.raises(HparamsError) as e:
            bind(parse_method(label), hparams_key="world", common={"device": "cpu"})
        assert str(e.value).startswith(f"override {override} in {label}: {problem}"), str(e.value)
        assert "world.yaml" not in str(e.value)
    with pytest.raises(HparamsError) as e:
        load_hparams("DECODE", "world", max_stepz=3)
    assert str(e.value).startswith("override max_stepz=3 in load_hparams('DECODE', 'world', ...): key "
                                   "'max_stepz': unknown hyperparameter 'max_stepz' for DECODEHyperParams. "
                                   "Fix: did you mean 'max_steps'")


# -- declarative constraints: hp(ge=, gt=, le=, lt=, nonempty=, distinct=) and Literal choices --------

@dataclass
class BoundedHyperParams(MultimodalHyperParams):
    ALG_NAME: ClassVar[str] = "Bounded"
    steps: int = hp(10, "Steps.", ge=1)
    lr: float = hp(1e-2, "Learning rate.", gt=0)
    share: float = hp(0.5, "A share.", ge=0, lt=1)
    cap: int = hp(5, "At most 10.", le=10)
    threshold: float | None = hp(None, "Optional, in [0, 1].", ge=0, le=1)
    layers: list[int] = hp([0, 1], "Layer indices.", ge=0, nonempty=True, distinct=True)
    mode: Literal["fast", "slow"] = hp("fast", "A choice.")
    masks: list[Literal["a", "b"]] = hp(["a"], "Choices in a list.")
    positions: int | Literal["all"] = hp("all", "'all' or a count >= 1.", ge=1)


def bounded(**values):
    return BoundedHyperParams.from_config({"alg_name": "Bounded", **values}, path="b.yaml")


@pytest.mark.parametrize("key, value, problem", [
    ("steps", 0, "0 is out of range: steps must be >= 1. Fix: set steps to a value >= 1."),
    ("lr", 0.0, "0.0 is out of range: lr must be > 0."),
    ("share", 1.0, "1.0 is out of range: share must be >= 0 and < 1."),
    ("share", -0.1, "-0.1 is out of range: share must be >= 0 and < 1."),
    ("cap", 11, "11 is out of range: cap must be <= 10."),
    ("threshold", 1.5, "1.5 is out of range: threshold must be >= 0 and <= 1."),
    ("layers", [0, -1], "-1 is out of range: every element of layers must be >= 0."),
    ("layers", [], "the list is empty. Fix: list at least one value in layers."),
    ("layers", [1, 2, 1], "[1, 2, 1] repeats 1. Fix: list each value of layers once."),
    ("mode", "medium", "'medium' is not allowed. Fix: use one of ['fast', 'slow']."),
    ("masks", ["a", "c"], "'c' is not allowed."),
    ("positions", 0, "0 is out of range: positions must be >= 1."),
    ("positions", "some", "expected an integer, got 'some'."),
])
def test_constraints_are_checked_on_loading(key, value, problem):
    with pytest.raises(HparamsError) as err:
        bounded(**{key: value})
    assert str(err.value).startswith(f"b.yaml: key '{key}': {problem}"), str(err.value)
    assert err.value.key == key and err.value.fix


def test_values_within_bounds_load_unchanged():
    h = bounded(steps=1, lr=1e-9, share=0, cap=10, threshold=None, layers=[3], mode="slow",
                masks=["b", "a"], positions=4)
    assert (h.steps, h.share, h.cap, h.threshold, h.layers, h.mode, h.positions) == (1, 0.0, 10, None, [3], "slow", 4)
    assert bounded(threshold=1, positions="all").threshold == 1.0


@pytest.mark.parametrize("key, value, problem", [
    ("steps", 0, "0 is out of range: steps must be >= 1."),
    ("steps", 2.0, "expected an integer, got 2.0."),
    ("steps", True, "expected an integer, got True."),
    ("lr", "1e-3", "expected a number, got '1e-3'."),
    ("threshold", -1.0, "-1.0 is out of range: threshold must be >= 0 and <= 1."),
    ("threshold", "x", "expected a number or null, got 'x'."),
    ("layers", [0, 0], "[0, 0] repeats 0."),
    ("layers", (0, -2), "-2 is out of range: every element of layers must be >= 0."),
    ("mode", "medium", "'medium' is not allowed. Fix: set mode to one of ['fast', 'slow']."),
    ("masks", ["z"], "'z' is not allowed."),
])
def test_check_given_rechecks_an_object_changed_after_loading(key, value, problem):
    h = bounded()
    setattr(h, key, value)
    with pytest.raises(HparamsError) as err:
        BoundedHyperParams.check_given(h)
    assert str(err.value).startswith(f"<hparams object>: key '{key}': {problem}"), str(err.value)


def test_hp_refuses_bounds_that_are_not_numbers():
    for bad in ({"ge": "0"}, {"lt": float("inf")}, {"gt": True}):
        with pytest.raises(ValueError, match="must be a finite number"):
            hp(1, "help", **bad)


def world_hparams_of_every_class():
    from mke_plugins.hparams import load_hparams, locate_hparams
    from mke_plugins.methods.ldke.ldke_hparams import LDKETrainingHyperParams
    from mke_plugins.methods.unike.unike_hparams import UniKETrainingHparams

    objs = [load_hparams(m, "world") for m in ("DECODE", "LDKE", "ASAM", "UniKE", "FT", "LoRA")]
    for cls, method in ((LDKETrainingHyperParams, "LDKE"), (UniKETrainingHparams, "UniKE")):
        objs.append(cls.from_hparams(locate_hparams(method, "world").parent / "training" / "world.yaml"))
    return objs


def test_validate_never_changes_a_value():
    """validate holds only checks: calling it (or check_given) again leaves every value as loaded."""
    import copy

    for obj in world_hparams_of_every_class():
        before = copy.deepcopy(obj.to_dict())
        obj.validate(path="x")
        obj.validate(path="x")
        type(obj).check_given(obj)
        assert obj.to_dict() == before, type(obj).__name__


def test_normalize_fills_derived_values_before_any_check():
    from mke_plugins.methods.unike.unike_hparams import UniKETrainingHparams

    h = UniKETrainingHparams.from_config({"alg": "UNIKE", "enc_lr": 3e-4, "enc_epochs": 7})
    assert (h.alg, h.lr, h.max_epochs) == ("UniKE", 3e-4, 7)
    assert UniKETrainingHparams(enc_lr=2e-4, max_iters=5).max_epochs is None  # direct construction too
    with pytest.raises(HparamsError, match="key 'alg': 'unike' is not allowed"):
        UniKETrainingHparams.from_config({"alg": "unike"})


# -- bundled files: one prefix syntax, @<key>/<relative path> -------------------------------------------

def test_bundled_prefixes_resolve_through_one_table(tmp_path):
    from mke_plugins.methods.ldke import archives_dir as ldke_archives
    from mke_plugins.methods.unike import archives_dir as unike_archives
    from mke_plugins.world import data_dir, model_path

    p = write(tmp_path, 'alg_name: Demo\nrequired_thing: "@ldke/world.pt"\nmodel_name: "@world-model"\n'
                        'coco_image: "@world-data"\nrephrase_image: "@world-data/images"\nname: "@unike/world.pt"\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = DemoHyperParams.from_hparams(p)
    assert h.model_name == str(model_path()) and h.coco_image == str(data_dir())
    assert h.rephrase_image == str(data_dir() / "images")
    assert h.required_thing == str(ldke_archives() / "world.pt") and h.name == str(unike_archives() / "world.pt")


@pytest.mark.parametrize("old, new", [("@world", "@world-model"), ("@bundled/world.pt", "@unike/world.pt")])
def test_old_spellings_still_resolve_with_a_deprecation_warning(tmp_path, old, new):
    from mke_plugins.bundled import resolve_bundled

    p = write(tmp_path, f'alg_name: Demo\nrequired_thing: "{old}"\n')
    with pytest.warns(DeprecationWarning, match=rf"demo.yaml: key 'required_thing': '{old}' is a deprecated "
                                                rf"spelling; write '{new}'"):
        h = DemoHyperParams.from_hparams(p)
    assert h.required_thing == resolve_bundled(new)


def test_bundled_table_registration_and_unknown_keys(monkeypatch, tmp_path):
    from mke_plugins import bundled

    monkeypatch.setattr(bundled, "BUNDLED_ROOTS", dict(bundled.BUNDLED_ROOTS))
    bundled.register_bundled("demo-files", lambda: tmp_path)
    assert bundled.resolve_bundled("@demo-files/a/b.txt") == str(tmp_path / "a" / "b.txt")
    assert "demo-files" in bundled.bundled_keys()
    with pytest.raises(ValueError, match="'@demo-files' is already registered"):
        bundled.register_bundled("demo-files", lambda: tmp_path / "other")
    bundled.register_bundled("world-model", "mke_plugins.world:model_path")  # the same root again: no-op
    with pytest.raises(ValueError, match="must start with a letter"):
        bundled.register_bundled("@bad", lambda: tmp_path)
    for value in ("@world-train", "@nobody/x", "plain/path", 3, None):  # unknown keys are left as written
        assert bundled.resolve_bundled(value) == value
    bundled.register_bundled("broken", "no_such_module_xyz:root")
    with pytest.raises(HparamsError, match=r"key 'archive': '@broken/x': the folder of '@broken' cannot be found"):
        bundled.resolve_bundled("@broken/x", key="archive")


def test_every_bundled_yaml_uses_the_current_spelling():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert len(world_hparams_of_every_class()) == 8


def test_the_host_layer_does_not_import_the_world():
    code = ("import sys, mke_plugins.hparams, mke_plugins.bundled, mke_plugins.trainer_hparams; "
            "print('mke_plugins.world' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for module in ("hparams", "bundled", "trainer_hparams"):
        assert "world" not in "".join(ln for ln in (ROOT / "mke_plugins" / f"{module}.py").read_text().splitlines()
                                      if ln.startswith(("import ", "from ")))
