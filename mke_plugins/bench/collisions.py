"""Which probes of a sequence ask about a fact the sequence itself edits, and what they should answer.

Why it exists: in a sequence of edits, a probe of one case may ask about a fact that another
edit of the same sequence changes (two edits of one entity). Such a probe *should* change, so
scoring it as locality punishes a method for generalising. The rule, from the facts each record
names (``entity`` / ``relation`` of the edit; ``loc_fact`` / ``m_loc_fact`` of the T-Loc / M-Loc
probe; ``entity`` / ``relation`` and optional ``derived_from`` of every fine-locality and
portability item):

* the *touched set* of a sequence is the facts its edits change; a probe is touched when its fact,
  or a fact in its ``derived_from``, is in it;
* a touched T-Loc or M-Loc probe is left out of locality (it *should* change) and counted, and
  the run says how many, naming the first: locality probes should come from facts no edit uses,
  as the lifelong world's locality pool guarantees (its sequences leave none out);
* a fine-locality probe touched by any edit of the sequence, and a portability probe touched by
  an edit other than its own case's, is never scored as locality or portability: it is scored as
  *cross-edit consistency*, token accuracy against the newest edited answer made so far (for its
  own fact the ``alt`` of the latest edit of that fact; for a derived fact the portability answer,
  same relation and form, of the latest edit of its source that has one). When no edit made so
  far gives an answer, the probe is counted as touched but unscored.

Data whose records carry no fact identities (MMEdit-style files, older worlds) still runs; the
plan counts the probes it could not check, and the bench says so in a note.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

from mke_hooks import MKEError
from mke_plugins.adapters.base import Query
from mke_plugins.core import scoring

from .probes import Probe, ProbeOutput, case_probes

Fact = tuple[str, str]
#: request keys of the T-Loc / M-Loc probes' facts, and how errors and notes name the probe
LOC_FACTS = {"locality": ("loc_fact", "T-Loc"), "multimodal_locality": ("m_loc_fact", "M-Loc")}
#: probe kinds that are scored as cross-edit consistency when another edit touches them
ITEM_KINDS = ("portability", "fine_locality")
CROSS_KIND = "cross_edit"


def _name(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def fact_of(obj: Any, where: str) -> Fact | None:
    """``(entity, relation)`` of a record, item or ``loc_fact`` dict; ``None`` when it names none.

    A dict that names one of the two but not the other is a data error (``where`` names it).
    """
    if not isinstance(obj, dict):
        if obj is None:
            return None
        raise MKEError(f"{where}: a fact is a JSON object with 'entity' and 'relation', got {type(obj).__name__}")
    entity, relation = _name(obj.get("entity")), _name(obj.get("relation"))
    if entity and relation:
        return entity, relation
    if entity and "relation" in obj:
        raise MKEError(f"{where}: 'relation' must be a non-empty string, got {obj.get('relation')!r}")
    if relation and "entity" in obj:
        raise MKEError(f"{where}: 'entity' must be a non-empty string, got {obj.get('entity')!r}")
    return None


def derived_of(item: dict[str, Any], where: str) -> tuple[Fact, ...]:
    """The facts in ``item['derived_from']`` (a list of ``{"entity", "relation"}``; absent: none)."""
    raw = item.get("derived_from")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise MKEError(f"{where}: 'derived_from' must be a list of {{'entity', 'relation'}} objects, got "
                       f"{type(raw).__name__}")
    out = []
    for j, f in enumerate(raw):
        fact = fact_of(f, f"{where}.derived_from[{j}]")
        if fact is None:
            raise MKEError(f"{where}.derived_from[{j}]: needs 'entity' and 'relation'")
        out.append(fact)
    return tuple(out)


@dataclass
class Touched:
    """A fine-locality or portability probe of a case that an edit of the sequence touches.

    ``events``: ``(position, probe)`` per edit that gives it an answer, in sequence order; the
    position is the edit's index in the sequence and ``probe`` the index (in the case's probe
    list) of the cross-edit probe asking for that edit's answer, ``None`` when it gives none.
    """

    kind: str
    item: int
    events: list[tuple[int, int | None]] = field(default_factory=list)

    def probe_at(self, made: int) -> int | None:
        """The cross-edit probe to score after the first ``made`` edits (``None``: no answer known yet)."""
        latest = [p for pos, p in self.events if pos < made]
        return latest[-1] if latest else None


@dataclass
class CasePlan:
    """The probes of one case in a sequence: touched items replaced by their cross-edit probes."""

    probes: list[Probe]
    touched: list[Touched] = field(default_factory=list)
    #: whether any fine-locality / portability probe of the case could be checked (it and the edits name facts)
    checked: bool = False


@dataclass
class SequencePlan:
    """The probe plans of one sequence (``cases``: request indices in edit order)."""

    cases: list[int]
    plans: list[CasePlan]
    #: probe kind -> probes whose fact the sequence could not check (no identity on probe or edits)
    unchecked: Counter = field(default_factory=Counter)
    #: edits without (entity, relation)
    anonymous_edits: int = 0
    #: facts edited more than once in the sequence
    repeated: list[Fact] = field(default_factory=list)
    #: "T-Loc" / "M-Loc" -> probes left out of locality because the sequence edits their fact
    left_out: Counter = field(default_factory=Counter)
    #: the first probe left out, described for the note
    first_left_out: str | None = None

    @property
    def n_touched(self) -> int:
        return sum(len(p.touched) for p in self.plans)


def _matching_answer(request: dict[str, Any], probe_item: dict[str, Any], fact: Fact) -> str | None:
    """The answer of ``request``'s portability item asking ``fact`` in the probe's form, if any."""
    form = str(probe_item.get("form", ""))
    for item in request.get("portability") or []:
        if not isinstance(item, dict) or str(item.get("form", "")) != form:
            continue
        if item.get("relation") != fact[1] or item.get("entity") not in (None, fact[0]):
            continue
        return str(item["answer"])
    return None


def _case_id(request: dict[str, Any], index: int) -> Any:
    return request.get("case_id", index)


def _check_locality(request: dict[str, Any], index: int, touched: dict[Fact, list[int]], n_edits: int,
                    plan: SequencePlan, present: set[str]) -> set[str]:
    """The T-Loc / M-Loc probe kinds of ``request`` whose fact the sequence edits (left out of locality)."""
    out: set[str] = set()
    for kind, (key, label) in LOC_FACTS.items():
        if kind not in present:
            continue
        where = f"case {_case_id(request, index)} (request {index}), {label} probe ({key})"
        fact = fact_of(request.get(key), where)
        if fact is None:
            plan.unchecked[label] += 1
            continue
        derived = derived_of(request[key], where) if isinstance(request.get(key), dict) else ()
        hit = next((f for f in (fact, *derived) if f in touched), None)
        if hit is not None:
            out.add(kind)
            plan.left_out[label] += 1
            if plan.first_left_out is None:
                plan.first_left_out = (f"{where} asks about {hit[0]} / {hit[1]}, which edit "
                                       f"{touched[hit][0] + 1} of {n_edits} changes")
    return out


def plan_sequence(requests: Sequence[dict[str, Any]], chunk: Sequence[int]) -> SequencePlan:
    """Classify every probe of the sequence ``chunk`` (request indices in edit order); see the module doc."""
    facts = [fact_of(requests[i], f"case {_case_id(requests[i], i)} (request {i})") for i in chunk]
    plan = SequencePlan(list(chunk), [])
    plan.anonymous_edits = sum(f is None for f in facts)
    touched: dict[Fact, list[int]] = {}
    if not plan.anonymous_edits:
        for pos, f in enumerate(facts):
            touched.setdefault(f, []).append(pos)  # type: ignore[arg-type]
    plan.repeated = [f for f, ps in touched.items() if len(ps) > 1]
    for pos, i in enumerate(chunk):
        request = requests[i]
        probes = case_probes(request)
        present = {p.kind for p in probes}
        if plan.anonymous_edits:
            plan.unchecked.update(_label(p.kind) for p in probes if p.kind in (*LOC_FACTS, *ITEM_KINDS))
            plan.plans.append(CasePlan(probes))
            continue
        drop = _check_locality(request, i, touched, len(chunk), plan, present)
        probes = [p for p in probes if p.kind not in drop]
        plan.plans.append(_case_plan(requests, chunk, pos, probes, touched, facts, plan))
    return plan


def _label(kind: str) -> str:
    return LOC_FACTS[kind][1] if kind in LOC_FACTS else kind.replace("_", "-")


def _case_plan(requests: Sequence[dict[str, Any]], chunk: Sequence[int], pos: int, probes: list[Probe],
               touched: dict[Fact, list[int]], facts: list[Fact | None], plan: SequencePlan) -> CasePlan:
    """One case's probes: untouched ones kept, touched ones replaced by one probe per answer they may need."""
    i = chunk[pos]
    request = requests[i]
    keep: list[Probe] = []
    extra: list[tuple[Touched, list[tuple[int, str | None]], Probe]] = []
    seen: Counter[str] = Counter()
    checked = False
    for probe in probes:
        if probe.kind not in ITEM_KINDS:
            keep.append(probe)
            continue
        j = seen[probe.kind]
        seen[probe.kind] += 1
        item = request[probe.kind][j]
        where = f"case {_case_id(request, i)} (request {i}), {probe.kind}[{j}]"
        fact = fact_of(item, where)
        if fact is None:
            plan.unchecked[_label(probe.kind)] += 1
            keep.append(probe)
            continue
        checked = True
        derived = derived_of(item, where)
        answers: list[tuple[int, str | None]] = []  # (position, answer) of every edit touching the probe
        for f in (fact, *derived):
            for p in touched.get(f, []):
                if f == fact:
                    answers.append((p, str(requests[chunk[p]]["target"])))
                else:
                    answers.append((p, _matching_answer(requests[chunk[p]], item, fact)))
        others = [a for a in answers if a[0] != pos]
        if not (others if probe.kind == "portability" else answers):
            keep.append(probe)
            continue
        answers.sort(key=lambda a: a[0])
        extra.append((Touched(probe.kind, j), answers, probe))
    out = CasePlan(keep, checked=checked)
    for t, answers, probe in extra:
        index_of: dict[str, int] = {}
        for p, answer in answers:
            if answer is None:
                t.events.append((p, None))
                continue
            if answer not in index_of:
                index_of[answer] = len(out.probes)
                out.probes.append(Probe(CROSS_KIND, Query(probe.query.image, probe.query.prompt, answer),
                                        tags=(probe.kind, *probe.tags[-1:])))
            t.events.append((p, index_of[answer]))
        out.touched.append(t)
    return out


def cross_edit_scores(plan: CasePlan, post: Sequence[ProbeOutput], made: int) -> dict[str, Any]:
    """Cross-edit consistency of one case after the first ``made`` edits of its sequence.

    ``cross_edit_consistency``: mean token accuracy of the touched probes against their newest
    edited answer (``None``: none scored); ``cross_edit_success``: mean of their all-tokens-right
    flags; ``cross_edit_n``: probes scored; ``cross_edit_unscored``: touched probes with no answer yet.
    The two counts are ``None`` when no probe of the case could be checked (no fact identities).
    """
    if not plan.checked:
        return {"cross_edit_consistency": None, "cross_edit_success": None, "cross_edit_n": None,
                "cross_edit_unscored": None}
    accs, oks, unscored = [], [], 0
    for t in plan.touched:
        k = t.probe_at(made)
        if k is None:
            unscored += 1
            continue
        accs.append(post[k].acc)
        oks.append(post[k].success)
    return {"cross_edit_consistency": scoring.mean_or_none(accs), "cross_edit_success": scoring.mean_or_none(oks),
            "cross_edit_n": len(accs), "cross_edit_unscored": unscored}


def plan_notes(plans: Sequence[SequencePlan]) -> list[str]:
    """What the run could not check, and facts edited twice in a sequence, as notes for the result."""
    notes = []
    unchecked = sum((p.unchecked for p in plans), Counter())
    anonymous = sum(p.anonymous_edits for p in plans)
    if unchecked or anonymous:
        what = ", ".join(f"{n} {k}" for k, n in sorted(unchecked.items()))
        why = (f"{anonymous} edit(s) name no (entity, relation)" if anonymous else
               "their records name no fact (loc_fact / m_loc_fact, entity and relation on each item)")
        notes.append(f"cannot check collisions between probes and edits for {what or 'no'} probe(s): {why}; "
                     f"they are scored as locality / portability even where an edit of their sequence "
                     f"changed their fact")
    left_out = sum((p.left_out for p in plans), Counter())
    if left_out:
        first = next(p.first_left_out for p in plans if p.first_left_out)
        what = " and ".join(f"{n} {k}" for k, n in sorted(left_out.items()))
        notes.append(f"{what} probe(s) ask about a fact their own sequence edits (e.g. {first}): left out of "
                     f"locality, since they should change; draw locality probes from facts no edit uses "
                     f"(the lifelong world's pool: --world lifelong)")
    repeated = [f for p in plans for f in p.repeated]
    if repeated:
        shown = ", ".join(f"{e} / {r}" for e, r in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        notes.append(f"{len(repeated)} fact(s) are edited more than once in a sequence ({shown}); the earlier "
                     f"edit's reliability is still scored against its own target")
    touched = sum(p.n_touched for p in plans)
    if touched:
        notes.append(f"{touched} fine-locality / portability probe(s) ask about a fact another edit of their "
                     f"sequence changes: scored as cross-edit consistency, not locality")
    return notes
