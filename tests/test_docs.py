"""The documentation resolves inside this repository.

Every reference in code, comments, docstrings, help texts, YAML comments, READMEs and tests must
point at something a user of this repository has. So no tracked text file names documents that
are not in the repository, numbered sections of such documents ("§"), issue numbers, or agents;
and every relative link in the READMEs and ``hooks/*.md`` lands on a file (and heading) that exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
THIS = PurePosixPath(Path(__file__).resolve().relative_to(ROOT).as_posix())

#: what no tracked text file may contain, with the reason shown on failure
FORBIDDEN: dict[str, re.Pattern[str]] = {
    "a design document outside this repository": re.compile(
        r"\.\./shared|shared/(specs|DESIGN|EASYEDIT|WORLD)|specs/(decode|ldke|asam|unike)\.md"
        r"|EASYEDIT\.md|WORLD\.md|DESIGN\.md"),
    "a numbered section of a document (write the fact, or cite an in-repo heading)": re.compile("\u00a7"),
    "an issue number": re.compile(r"\bissue [0-9#]", re.IGNORECASE),
    "agents": re.compile(r"\bagents?\b", re.IGNORECASE),
}

#: files whose hits are accepted (none)
ALLOWED: tuple[str, ...] = ()

#: READMEs whose relative links must resolve (plus every markdown file in hooks/)
LINKED_DOCS: tuple[str, ...] = ("README.md", "hooks/README.md", "examples/**/README.md",
                                "mke_plugins/**/README.md", "hooks/*.md")

_SKIP_DIRS = {".git", "__pycache__", ".venv", ".venv-host", "node_modules", ".pytest_cache"}


def tracked_files() -> list[PurePosixPath]:
    """The files git tracks (every file under the root, less caches and venvs, without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
    if not names:
        names = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                 if p.is_file() and not _SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]
    return sorted(PurePosixPath(n) for n in names)


def text_of(path: PurePosixPath) -> str | None:
    """The file's text, or None for a binary (NUL byte or not UTF-8) or vanished file."""
    try:
        data = (ROOT / path).read_bytes()
    except OSError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _matches(path: PurePosixPath, pattern: str) -> bool:
    """``pattern`` matches the whole relative path (``*`` never crosses a ``/``)."""
    parts = PurePosixPath(pattern).parts
    return len(parts) == len(path.parts) and path.match(pattern)


def allowed(path: PurePosixPath) -> bool:
    return any(_matches(path, p) for p in ALLOWED)


def forbidden_hits(files: list[PurePosixPath]) -> list[str]:
    hits = []
    for path in files:
        if path == THIS or allowed(path):
            continue
        text = text_of(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for why, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    hits.append(f"{path}:{lineno}: {why}: {line.strip()[:120]}")
    return hits


def test_no_reference_outside_the_repository() -> None:
    hits = forbidden_hits(tracked_files())
    assert not hits, ("these lines refer to documents, sections, issues or agents a user of this "
                      "repository cannot see; state the fact, or point at a file in the repository "
                      "(e.g. hooks/EASYEDIT-NOTES.md, the method's README):\n" + "\n".join(hits))


def test_forbidden_patterns_catch_what_they_should() -> None:
    # the forbidden samples are assembled from parts, so that no line of the repository spells one out
    samples = {"see ../" + "shared/" + "DESIGN" + ".md": True, "(" + "EASYEDIT" + ".md, restore)": True,
               "specs/" + "ldke.md": True, "the spec \u00a74": True, "issue " + "4 part 5": True,
               "Issue #12": True, "two agents": True, "magenta": False, "reagents": False,
               "hooks/EASYEDIT-NOTES.md": False, "scope=\"session\"": False, "MethodSpec": False}
    for text, expected in samples.items():
        assert any(p.search(text) for p in FORBIDDEN.values()) is expected, text


def test_nothing_is_allow_listed() -> None:
    assert not ALLOWED and not allowed(PurePosixPath("mke_plugins/methods/decode/decode_main.py"))


# -- relative links ---------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def linked_docs(files: list[PurePosixPath]) -> list[PurePosixPath]:
    return [f for f in files if f.suffix == ".md" and any(
        _matches(f, p) if "**" not in p else _glob_match(f, p) for p in LINKED_DOCS)]


def _glob_match(path: PurePosixPath, pattern: str) -> bool:
    """``a/**/b.md``: ``a/`` then any number of folders, then ``b.md`` (``*`` allowed)."""
    head, _, tail = pattern.partition("/**/")
    return path.as_posix().startswith(head + "/") and path.match(tail)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors of a markdown text (lower case, punctuation dropped, '-' for ' ')."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown)):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def link_problems(doc: PurePosixPath) -> list[str]:
    text = text_of(doc) or ""
    body = _CODE.sub("", _FENCE.sub("", text))
    problems = []
    for target in _LINK.findall(body) + _REF_DEF.findall(body):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        dest = (ROOT / doc.parent / path_part).resolve() if path_part else ROOT / doc
        if ROOT.resolve() not in dest.parents and dest != ROOT.resolve():
            problems.append(f"{doc}: link {target!r} leaves the repository")
            continue
        if not dest.exists():
            problems.append(f"{doc}: link {target!r} points at a missing file")
            continue
        if fragment and dest.is_file() and dest.suffix == ".md":
            if fragment.lower() not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{doc}: link {target!r}: no heading #{fragment} in {dest.name}")
    return problems


def test_readme_links_resolve() -> None:
    docs = linked_docs(tracked_files())
    names = {d.as_posix() for d in docs}
    assert {"README.md", "hooks/README.md", "mke_plugins/methods/decode/README.md",
            "hooks/EASYEDIT-NOTES.md", "examples/mke-hello/README.md"} <= names
    problems = [p for d in docs for p in link_problems(d)]
    assert not problems, "\n".join(problems)


def test_link_checker_catches_broken_links(tmp_path: Path) -> None:
    good = anchors("# Title\n\n## The family and its image type\n\n## easyeditor 0.0.1.dev0 (PyPI)\n")
    assert {"title", "the-family-and-its-image-type", "easyeditor-001dev0-pypi"} <= good
    body = "[a](../outside/notes.md) `[b](x.md)` [c](https://example.org) [d](README.md#nowhere)\n"
    targets = _LINK.findall(_CODE.sub("", body))
    assert targets == ["../outside/notes.md", "https://example.org", "README.md#nowhere"]
