"""The metadata lives in setup.cfg; this file adds only the project URLs, which are configurable.

tf_moe has no public URL yet, so none is written in the repository. Set them when building:

    TF_MOE_PROJECT_URLS="Source=https://host/you/tf_moe; Issues=https://host/you/tf_moe/issues" \
        python -m build

`label=URL` pairs separated by `;` or newlines; each becomes a `Project-URL` of the wheel and the
sdist. A wheel built from an sdist keeps the sdist's URLs (read back from its PKG-INFO) unless
the variable is set again. Unset and outside an sdist: no project URLs.
"""

import email.parser
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _urls_from_environment(text):
    urls = {}
    for item in text.replace("\n", ";").split(";"):
        if not item.strip():
            continue
        label, sep, url = item.partition("=")
        label, url = label.strip(), url.strip()
        if not sep or not label or not url.startswith(("https://", "http://")):
            raise SystemExit(f"TF_MOE_PROJECT_URLS: expected `label=https://...` pairs separated "
                             f"by ';', got {item.strip()!r}")
        urls[label] = url
    return urls


def _urls_from_sdist():
    """The Project-URLs of the sdist this is built from (its top-level PKG-INFO), if any."""
    try:
        with open(os.path.join(HERE, "PKG-INFO"), encoding="utf-8") as f:
            headers = email.parser.Parser().parse(f, headersonly=True)
    except OSError:
        return {}
    pairs = (value.partition(",") for value in headers.get_all("Project-URL") or [])
    return {label.strip(): url.strip() for label, _, url in pairs}


def project_urls():
    text = os.environ.get("TF_MOE_PROJECT_URLS")
    return _urls_from_environment(text) if text is not None else _urls_from_sdist()


setup(project_urls=project_urls())
