"""The documents of the repository stand on their own: every relative link in them resolves to a file inside the
repository, and none points outside it (someone who clones the project must be able to follow every link)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_resolves_inside_the_repository():
    bad = []
    for doc in _documents():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+://|mailto:|#", target):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                bad.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not bad, bad


def test_no_document_or_module_cites_a_file_outside_the_repository():
    cited = []
    sources = _documents() + [p for d in ("anpyc_core", "adapters", "export", "apps", "cli")
                              for p in (ROOT / d).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        for needle in ("METHOD.md", "STYLE.md", "shared/design", "../shared"):
            if needle in text:
                cited.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not cited, cited
    assert (ROOT / "docs" / "method.md").is_file()
