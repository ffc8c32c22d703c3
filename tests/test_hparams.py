"""Strict, EasyEdit-compatible hyperparameter loading: every bad file gets a precise message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp, read_yaml


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
