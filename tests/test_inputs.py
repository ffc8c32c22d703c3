"""Faults and hostile input: each ends in a one-line error that says what to fix, never a traceback.

Bench data (bad pictures, non-object records, blank or unspellable targets, prompts over the
context) is rejected before the first edit; ``--json``/``--plot``/``--model``/``--device`` and the
numeric options before the run; every command may be piped into ``head``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mke_hooks import MKEError
from mke_hooks.errors import RequestError
from mke_plugins.cli import main

WORLD_MODEL = Path(__file__).resolve().parents[1] / "mke_plugins" / "world" / "model" / "world-qwen2-vl"
#: a bench run that would be quick if it ran; the errors below must stop it before it starts
RUN = ["bench", "--methods", "FT", "--cases", "3", "--no-progress", "--no-generate", "--plot", ""]


@pytest.fixture(scope="module")
def world_model():
    from mke_plugins import world

    return world.load()


@pytest.fixture(scope="module")
def world_records() -> list[dict]:
    """The first three world records with absolute image paths (any folder can hold them)."""
    from mke_plugins import world

    root = world.data_dir()
    records = json.loads((root / "edit.json").read_text())[:3]
    for r in records:
        for key in ("image", "image_rephrase", "m_loc"):
            r[key] = str(root / r[key])
        for item in r["portability"] + r["fine_locality"]:
            if item.get("image"):
                item["image"] = str(root / item["image"])
    return records


def _data(tmp_path: Path, records: list) -> str:
    folder = tmp_path / "data"
    folder.mkdir(parents=True)
    (folder / "edit.json").write_text(json.dumps(records))
    return str(folder)


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """``main(argv)`` exits 2 with one line on stderr holding every needle, and prints no table."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.startswith("mke-plugins: error:")]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "wrote" not in captured.out
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- bench data: every record, picture and word checked before the first edit -------------------------
def test_truncated_and_non_image_pictures_name_the_record_and_file(tmp_path, capsys, world_records):
    recs = json.loads(json.dumps(world_records))
    truncated, fake = tmp_path / "truncated.png", tmp_path / "fake.png"
    truncated.write_bytes(Path(recs[2]["image"]).read_bytes()[:60])
    fake.write_text("not a picture")
    recs[2]["image"], recs[1]["m_loc"] = str(truncated), str(fake)
    data = _data(tmp_path, recs)
    _fails(capsys, RUN + ["--data", data], "record 1, field 'm_loc'", str(fake), "not a readable image")
    recs[1]["m_loc"] = world_records[1]["m_loc"]
    (Path(data) / "edit.json").write_text(json.dumps(recs))
    _fails(capsys, RUN + ["--data", data], "record 2, field 'image'", str(truncated), "truncated")


def test_a_list_of_non_objects_and_a_blank_target_name_the_record(tmp_path, capsys, world_records):
    _fails(capsys, RUN + ["--data", _data(tmp_path / "a", [1, 2])], "record 0: expected a JSON object", "got int")
    recs = json.loads(json.dumps(world_records))
    recs[1]["alt"] = "   "
    _fails(capsys, RUN + ["--data", _data(tmp_path / "b", recs)], "record 1: field 'alt' is blank")
    recs[1]["alt"], recs[2]["loc_ans"] = world_records[1]["alt"], " "
    _fails(capsys, RUN + ["--data", _data(tmp_path / "c", recs)], "record 2, field 'loc_ans': is blank")


def test_unspellable_target_and_overlong_prompt_stop_the_bench_before_any_edit(tmp_path, capsys, world_records):
    from mke_plugins.bench.runner import Bench, BenchConfig, methods_from

    recs = json.loads(json.dumps(world_records))
    recs[2]["alt"] = "Zürich"
    _fails(capsys, RUN + ["--data", _data(tmp_path / "a", recs)], "record 2, field 'alt'", "'Zürich'", "[UNK]")
    recs[2]["alt"], recs[1]["src"] = world_records[2]["alt"], " ".join(["what"] * 600) + "?"
    data = _data(tmp_path / "b", recs)
    _fails(capsys, RUN + ["--data", data], "record 1, field 'src'", "602 tokens", "context of 512 positions")
    with pytest.raises(MKEError, match="record 1, field 'src'"):  # raised while building: nothing was edited
        Bench(BenchConfig(methods=methods_from("FT"), data=data, cases=3, progress=False))


# -- options checked before the run ------------------------------------------------------------------
def test_unwritable_json_and_plot_paths_fail_before_the_run(tmp_path, capsys):
    a_file = tmp_path / "somefile.txt"
    a_file.write_text("x")
    _fails(capsys, RUN + ["--json", str(tmp_path)], f"--json {tmp_path}: is a folder")
    _fails(capsys, RUN + ["--json", str(a_file / "out.json")], f"{a_file} is a file")
    _fails(capsys, RUN + ["--plot", str(a_file / "out.png")], "--plot", f"{a_file} is a file")
    _fails(capsys, RUN + ["--plot", str(tmp_path / "out.xyz")], "cannot write .xyz files", ".png")


def test_a_missing_parent_folder_is_still_fine(tmp_path):
    from mke_plugins.bench.cli import check_outputs

    check_outputs(str(tmp_path / "new" / "deeper" / "r.json"), str(tmp_path / "new" / "r.png"))
    assert not (tmp_path / "new").exists()  # created when written, not by the check


def test_model_folder_without_weights_or_with_an_empty_config(tmp_path, capsys):
    no_weights, empty = tmp_path / "no-weights", tmp_path / "empty"
    no_weights.mkdir()
    empty.mkdir()
    (no_weights / "config.json").write_text((WORLD_MODEL / "config.json").read_text())
    (empty / "config.json").write_text("")
    _fails(capsys, RUN + ["--model", str(no_weights)], f"--model {no_weights}: no weights there", "config.json")
    _fails(capsys, RUN + ["--model", str(empty)], f"--model {empty}: config.json is empty")
    (empty / "config.json").write_text('{"hidden_size": 8}')
    _fails(capsys, RUN + ["--model", str(empty)], "no 'model_type'")


def test_device_and_numeric_options(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(capsys, RUN + ["--device", "cuda"], "--device cuda: ", "use --device cpu")
    _fails(capsys, RUN + ["--device", "banana"], "--device 'banana' is not a device name")
    _fails(capsys, RUN + ["--probe-batch", "0"], "--probe-batch must be at least 1", "got 0")
    _fails(capsys, RUN + ["--threads", "-1"], "--threads must be at least 1", "got -1")


def test_verbose_adds_the_traceback(capsys):
    assert main(RUN + ["--threads", "0", "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("--threads must be at least 1 (or left out for the "
                                                        "default), got 0")
    assert main(["-v", "hparams", "FT", "wrld"]) == 2
    assert "Traceback" in capsys.readouterr().err


# -- pipes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["hparams", "DECODE", "qwen2vl-7b"], ["methods"], ["bench", "--help"]])
def test_every_command_behaves_in_a_closed_pipe(argv):
    """`mke-plugins ... | head -1`: the reader is gone before the first write; exit quietly."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "mke_plugins", *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode in (0, 1), proc.stderr  # argparse's --help ignores it itself


# -- check_spellable / check_context ------------------------------------------------------------------
def _req(target: str, prompt: str = "Rytroux is made of what?", **extra) -> dict:
    return {"prompt": prompt, "target": target, "image": None, **extra}


@pytest.mark.parametrize("word", ["Zürich", "東京", "papers"])
def test_words_the_world_tokenizer_cannot_spell(world_model, word):
    from mke_plugins.core.requests import check_spellable

    _, processor = world_model
    for tok in (processor, processor.tokenizer):  # an HF processor or its tokenizer
        with pytest.raises(RequestError, match=f"request #1, field 'target': the tokenizer cannot spell '{word}'"):
            check_spellable([_req("paper"), _req(word)], tok)
    with pytest.raises(RequestError, match=f"request #0, field 'fine_locality\\[1\\].prompt'.*'{word}'"):
        check_spellable([_req("paper", fine_locality=[{"prompt": "Rytroux eats what?", "answer": "bread"},
                                                       {"prompt": f"{word} eats what?", "answer": "bread"}])],
                        processor)
    check_spellable(_req("paper"), processor)  # a bare dict, all words known


def test_byte_level_tokenizer_never_fails():
    from mke_plugins.core.requests import check_spellable, unknown_words
    from mke_plugins.testing.tiny import train_tokenizer

    tok = train_tokenizer(["<|endoftext|>"], vocab_size=300, unk="<|endoftext|>")
    check_spellable([_req("東京", prompt="Zürich <|endoftext|> papers")], tok)
    assert unknown_words(tok, "Zürich 東京") == []


def test_slow_tokenizer_is_checked_word_by_word():
    from mke_plugins.core.requests import check_spellable, unknown_words

    class Slow:
        unk_token, unk_token_id, is_fast = "<unk>", 0, False
        vocab = {"<unk>": 0, "paper": 1, "what?": 2}

        def __call__(self, text, add_special_tokens=False, **kwargs):
            return {"input_ids": [self.vocab.get(w, 0) for w in text.split()]}

    assert unknown_words(Slow(), "what? Zürich paper") == ["Zürich"]
    with pytest.raises(RequestError, match="request #0, field 'prompt'.*'Zürich'"):
        check_spellable([_req("paper", prompt="what? Zürich")], Slow())


def test_prompt_over_the_context_names_count_and_limit(world_model):
    from mke_plugins.core.requests import check_context

    model, processor = world_model
    with pytest.raises(RequestError, match=r"request #0, field 'rephrase_prompt': is 513 tokens with its answer, "
                                           r"more than the model's context of 512 positions "
                                           r"\(config.text_config.max_position_embeddings\)"):
        check_context([_req("paper", rephrase_prompt=" ".join(["what"] * 512))], processor, model)
    check_context([_req("paper", prompt=" ".join(["what"] * 511))], processor, model)


def test_easyedit_apply_checks_before_the_method_runs(world_model):
    from mke_plugins.core.requests import check_tokens
    from mke_plugins.easyedit import make_apply
    from mke_plugins.registry import get_registry

    model, processor = world_model
    apply = make_apply(get_registry().get("FT"))
    with pytest.raises(RequestError, match="request #0, field 'target': the tokenizer cannot spell 'Zürich'"):
        apply(model, processor, _req("Zürich"), hparams=None)  # hparams=None: the method is never reached
    with pytest.raises(RequestError, match="request #0, field 'prompt': is 601 tokens"):
        apply(model, processor, [_req("paper", prompt=" ".join(["what"] * 600))], hparams=None)
    check_tokens([_req("paper")], processor, model)


def test_a_bad_override_is_reported_before_the_model_loads(capsys, monkeypatch):
    import mke_plugins.bench.runner as runner

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the methods' hparams were checked")

    monkeypatch.setattr(runner, "load_model", no_load)
    assert main(["bench", "--methods", "DECODE[max_stepz=3]", "--cases", "1"]) == 2
    assert "override max_stepz=3 in DECODE[max_stepz=3]" in capsys.readouterr().err
