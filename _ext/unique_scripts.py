"""Drop repeated <script> entries from each page.

sphinx-thebe 0.3.1 and sphinx-togglebutton register inline scripts with ``app.add_js_file(None,
body=...)`` after the HTML builder exists. Sphinx then stores each twice (in the registry, and in the
builder as filename ""), and it only deduplicates scripts that have a filename; the second
``const THEBE_JS_URL = ...`` throws "Identifier 'THEBE_JS_URL' has already been declared" on every
page. Dropping repeats per page fixes every such extension at once. The browser test
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
