"""Drop repeated <script> entries from each page.

Under Jupyter Book 1.0.4, the inline scripts of sphinx-thebe 0.3.1 and sphinx-togglebutton reach
each page twice (once with filename None, once with ""); the second ``const THEBE_JS_URL = ...``
throws "Identifier 'THEBE_JS_URL' has already been declared" on every page. The browser test
(tests/test_site.py) checks that no page throws.
"""

from __future__ import annotations


def _key(script) -> tuple:
    attributes = getattr(script, "attributes", {}) or {}
    # the same inline script arrives once with filename None and once with "": both mean "no file"
    return (getattr(script, "filename", str(script)) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))


def unique_scripts(app, pagename, templatename, context, doctree):
    seen, kept = set(), []
    for script in context.get("script_files", []):
        key = _key(script)
        if key not in seen:
            seen.add(key)
            kept.append(script)
    context["script_files"] = kept


def setup(app):
    app.connect("html-page-context", unique_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
