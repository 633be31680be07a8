"""The docs hold together: every relative link in README.md and docs/*.md reaches a file, every
#anchor a heading of the page it names, and every docs page is linked from the README; every config
key they name in code exists in the schema or the group's YAML, every ``module.function`` they name
exists in that module (read with ``ast``, nothing imported), and every config mistake they show
fails in one line, exit 2, with nothing created. Plain text except that last test (in-process runs)."""

from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CODE_PAGES = [*PAGES, REPO / "benchmarks" / "README.md"]  # pages whose code names keys and functions

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*:")  # http:, https:, mailto: ...


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks, inline code blanked out."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, INLINE_CODE.sub("", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, as GitHub numbers repeats (``x``, ``x-1``, ``x-2``)."""
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            base = slug(m.group(2))
            seen[base] = seen.get(base, 0) + 1
    return {f"{base}-{i}" if i else base for base, n in seen.items() for i in range(n)}


def links(page: Path) -> list[tuple[int, str]]:
    return [(n, m.group(1)) for n, line in prose_lines(page.read_text(encoding="utf-8")) for m in LINK.finditer(line)]


def broken_links(page: Path) -> list[str]:
    """'file:line: target (why)' for every relative link of ``page`` that does not resolve."""
    problems = []
    for number, target in links(page):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(REPO)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where} (no heading with anchor #{anchor} in {dest.relative_to(REPO)})")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert broken_links(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.partition("#")[0]).resolve() for _, t in links(REPO / "README.md") if not EXTERNAL.match(t)}
    orphans = [str(p.relative_to(REPO)) for p in PAGES[1:] if p.resolve() not in linked]
    assert orphans == []


def test_the_checker_finds_a_broken_file_and_a_broken_anchor(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "other.md").write_text("# Other page\n\n## Its `key` section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](other.md) [ok](other.md#its-key-section) [ok](#page) [web](https://example.org/x)\n"
        "`[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](other.md#nowhere)\n"
    )
    assert broken_links(page) == [
        "page.md:7: missing.md (no such file: missing.md)",
        "page.md:7: other.md#nowhere (no heading with anchor #nowhere in other.md)",
    ]


# ---------------------------------------------------------------------------------------- names in code

# a module by its own name (resnet_sweep/<package>/<module>.py): the docs name modules, not packages
MODULES = {p.stem: p for p in (REPO / "resnet_sweep").rglob("*.py") if p.stem != "__init__"}
GROUPS = sorted(p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))
LOG10 = "_log10"
FILE_SUFFIXES = {
    "md",
    "py",
    "yaml",
    "yml",
    "png",
    "csv",
    "json",
    "db",
    "html",
    "pt",
    "txt",
    "log",
    "lock",
    "toml",
    "sh",
}
# group.key or module.name[.attr], not part of a longer dotted name, a path or a file name
DOTTED = re.compile(r"(?<![\w./\-])([a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")


def code_lines(text: str):
    """(line number, code): every line of a fenced block, every inline code span elsewhere."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif fenced:
            yield number, line
        else:
            for m in INLINE_CODE.finditer(line):
                yield number, m.group(0).strip("`")


@functools.cache
def config_keys(group: str) -> set[str]:
    """The keys a group has: its schema's fields (resnet_sweep/config/schema.py, read as text) and every
    key of its YAML files."""
    keys: set[str] = set()
    for path in (REPO / "conf" / group).rglob("*.yaml"):
        loaded = yaml.safe_load(path.read_text()) or {}
        keys |= {k for k in loaded if k != "defaults"} if isinstance(loaded, dict) else set()
    tree = ast.parse(MODULES["schema"].read_text())
    schemas = {n.id for n in ast.walk(tree) if isinstance(n, ast.Tuple) for n in n.elts if isinstance(n, ast.Name)}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in schemas and _schema_group(tree, node.name) == group:
            keys |= {f.target.id for f in node.body if isinstance(f, ast.AnnAssign)}
            for base in node.bases:  # DemoDataConf(DataConf)
                parent = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == base.id)
                keys |= {f.target.id for f in parent.body if isinstance(f, ast.AnnAssign)}
    return keys


def _schema_group(tree: ast.Module, cls: str) -> str | None:
    """The group ``schema.SCHEMAS`` registers the dataclass ``cls`` for."""
    for node in ast.walk(tree):
        is_entry = isinstance(node, ast.Tuple) and len(node.elts) == 3 and isinstance(node.elts[2], ast.Name)
        if is_entry and node.elts[2].id == cls and isinstance(node.elts[0], ast.Constant):
            return node.elts[0].value
    return None


@functools.cache
def module_names(module: str) -> dict[str, set[str]]:
    """The names ``resnet_sweep/<package>/<module>.py`` defines or imports at its top, each class
    with the names of its body (methods, fields)."""
    tree = ast.parse(MODULES[module].read_text())
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            body = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
            body |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
            body |= {t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
            names[node.name] = body
        elif isinstance(node, ast.Assign):
            names.update({t.id: set() for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: set() for a in node.names})
    return names


def unknown_names(page: Path) -> list[str]:
    """'file:line: name (why)' for every ``group.key`` that no schema or YAML of the group has and
    every ``module.name`` (``module.Class.method``) that its module in resnet_sweep does not define."""
    problems = []
    mistakes = {example for where, example in mistake_examples() if where == str(page.relative_to(REPO))}
    for number, code in code_lines(page.read_text(encoding="utf-8")):
        if code in mistakes:  # +trainer.max_epoch=3: a wrong key on purpose
            continue
        code = re.sub(r"\b(cfg|config)\.", "", code)  # cfg.trainer.max_epochs: the key trainer.max_epochs
        for m in DOTTED.finditer(code):
            first, second, third = m.groups()
            if second in FILE_SUFFIXES or (first not in MODULES and first not in GROUPS):
                continue
            where = f"{page.relative_to(REPO)}:{number}: {m.group(0)}"
            if first in GROUPS and second.removesuffix(LOG10) in config_keys(first):
                continue  # optimizer.lr_log10: the param logged beside optimizer.lr
            names = module_names(first) if first in MODULES else {}
            if second in names and (third is None or not names[second] or third in names[second]):
                continue
            problems.append(
                f"{where} (no key {second} in {first}"
                + (f", no {first}.{second} in resnet_sweep)" if first in MODULES else ")")
            )
    return problems


@pytest.mark.parametrize("page", CODE_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_key_and_function_named_in_code_exists(page):
    assert unknown_names(page) == []


def test_the_name_checker_finds_a_stale_key_and_a_stale_function(monkeypatch):
    page = REPO / "docs" / "configuration.md"
    text = (
        "`trainer.max_epochs=3` `data.tile_store` `optimizer.lr` `checks.check_overrides` `docs/data.md`\n"
        "`trainer.max_epoch=3` `data.crop_offset` `batches.Normalise` `job.train` `sweep_callback.SweepCallback.on_nothing`\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: text if self == page else _read(self))
    assert [p.split(": ", 1)[1].split(" (")[0] for p in unknown_names(page)] == [
        "trainer.max_epoch",
        "data.crop_offset",
        "batches.Normalise",
        "job.train",
        "sweep_callback.SweepCallback.on_nothing",
    ]


_read = Path.read_text

# ------------------------------------------------------------------------------------- config mistakes

EXAMPLE = re.compile(r"^\+?[a-z_][\w.]*=\S+$")  # key=value, as typed on the command line


def mistake_examples() -> list[tuple[str, str]]:
    """(page, override) for every ``key=value`` in inline code of a paragraph that speaks of config
    mistakes, or under a heading that does."""
    found = []
    for page in PAGES:
        under_heading = False
        for paragraph in re.split(r"\n\s*\n", page.read_text(encoding="utf-8")):
            if paragraph.lstrip().startswith("#"):
                under_heading = "mistake" in paragraph.lower()
                paragraph = paragraph.split("\n", 1)[1] if "\n" in paragraph else ""
            if under_heading or re.search(r"config mistake", paragraph, re.IGNORECASE):
                for span in INLINE_CODE.findall(paragraph):
                    if EXAMPLE.match(span.strip("`")):
                        found.append((str(page.relative_to(REPO)), span.strip("`")))
    return found


def test_the_docs_show_config_mistakes():
    shown = {example for _, example in mistake_examples()}
    assert {"optimizer.lr=abc", "backbone=resnet99", "trainer.batch_size=0"} <= shown


@pytest.mark.parametrize("page,override", mistake_examples())
def test_every_config_mistake_in_the_docs_is_one_line_exit_2_and_nothing_created(tmp_path, page, override):
    from conftest import run_app

    if override == "trainer.device=cuda" and __import__("torch").cuda.is_available():
        pytest.skip("a mistake only where CUDA is not available")
    short = ["backbone.weights=none", "trainer.max_epochs=1", "trainer.num_workers=0"]  # should it not fail
    proc = run_app(tmp_path, *short, override, check=False, store=False)
    assert proc.returncode == 2, f"{page}: {override}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing created"


# ---------------------------------------------------------------------------------------- the layers


def test_the_layer_picture_is_drawn_from_the_imports_and_no_package_imports_upward():
    """docs/architecture.md's picture equals what tools/layer_picture.py draws from the code now, and
    no package imports one in its own layer or above (the contract, read back from the graph)."""
    sys.path.insert(0, str(REPO / "tools"))
    import layer_picture

    assert layer_picture.in_doc() == layer_picture.picture(), "stale: run tools/layer_picture.py --write"
    assert layer_picture.upward_imports() == []
    packages = {p for layer in layer_picture.layers() for p in layer}
    on_disk = {p.name for p in (REPO / "resnet_sweep").iterdir() if (p / "__init__.py").exists()} | {"job"}
    assert packages == on_disk, "every subpackage is in the contract's layers"
