"""MkDocs hooks for the strict build (``hooks:`` in mkdocs.yml; not a page).

1. Links from a page to a file of the repository outside ``docs/`` (``../benchmarks/HISTORY.md``,
   right when reading the page on a forge) have no target in the site. With ``repo_url`` set they
   point at the forge's copy; without it the link becomes its text and the path, in code. A link
   to a path that does not exist is left alone, so the strict build still reports it.
2. The docstrings write parameters that share a description as one Args entry, ``a, b: ...``,
   which griffe's Google parser reads as one parameter named ``'a, b'`` and warns about twice.
   Those two warnings are dropped for such grouped names, and only for them.
3. The docstrings' reST markup that Markdown leaves as text: a role before a code span
   (``:func:`adapt```) shows as the code span alone (``~a.b.C`` as ``C``), and the ``::`` that
   introduces a literal block as ``:``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")
ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):<code>(?:~(?:[\w.]+\.)?)?")
LITERAL = re.compile(r"::</p>(\s*<(?:pre|div)\b)")
GROUPED = re.compile(
    r"(No type or annotation for parameter|Parameter) '(?P<name>\w+(, \w+)+)'"
    r"( does not appear in the function signature)?$"
)


class _KnownDocstringWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not GROUPED.search(record.getMessage())


def on_config(config: Any) -> Any:
    for name in ("mkdocs.plugins.griffe", "griffe"):
        logging.getLogger(name).addFilter(_KnownDocstringWarnings())
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    here = (Path(config["docs_dir"]) / page.file.src_path).parent

    def rewrite(match: re.Match[str]) -> str:
        target = (here / match["target"]).resolve()
        if not target.exists() or not target.is_relative_to(ROOT):
            return match[0]
        path = target.relative_to(ROOT).as_posix()
        if config.get("repo_url"):
            kind = "tree" if target.is_dir() else "blob"
            url = f"{config['repo_url'].rstrip('/')}/{kind}/HEAD/{path}{match['anchor'] or ''}"
            return f"[{match['text']}]({url})"
        text = match["text"]
        return text if Path(path).name in text else f"{text} (`{path}`)"

    return LINK.sub(rewrite, markdown)


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return LITERAL.sub(r":</p>\1", ROLE.sub("<code>", html))
