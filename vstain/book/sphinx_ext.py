"""A small Sphinx extension of the book (``_config.yml``: ``sphinx: extra_extensions``).

It imports nothing of the project, so the Sphinx build never imports papermill or the science.
"""
from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop repeated ``<script>`` entries: under Sphinx 7.4 the inline scripts of sphinx-thebe and
    sphinx-togglebutton are registered twice (once with ``filename=None``, once with ``''``), and the
    second ``const THEBE_JS_URL = ...`` throws a SyntaxError in every page."""
    seen, kept = set(), []
    for js in context.get("script_files", []):
        key = (str(getattr(js, "filename", js) or ""), tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"][:] = kept  # in place: it is the builder's per-page list


def setup(app) -> dict:
    app.connect("html-page-context", _dedupe_scripts, priority=950)  # after the themes add theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}
