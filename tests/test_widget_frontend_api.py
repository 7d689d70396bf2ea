"""web/phase_trainer.js against the real ComfyUI frontend (the `comfyui-frontend-package` pip package).

CI has no ComfyUI server, but it can install the frontend ComfyUI serves. These checks catch the two ways the
extension silently does nothing: an import path that 404s once ComfyUI serves the file, and a frontend that
no longer has an API or hook the extension relies on. Skips without the package; fails under CI=true.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

REPO = Path(__file__).resolve().parent.parent
WEB = REPO / "web"
EXTENSION = WEB / "phase_trainer.js"
PACK = "phase-trainer"  # any custom_nodes folder name: ComfyUI serves WEB_DIRECTORY at /extensions/<it>/


def _static_root() -> Path:
    if os.environ.get("PT_FRONTEND_STATIC"):
        return Path(os.environ["PT_FRONTEND_STATIC"])
    try:
        import comfyui_frontend_package
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("comfyui-frontend-package is not installed (CI installs it: see .ci/run)")
        pytest.skip("comfyui-frontend-package is not installed (pip install comfyui-frontend-package)")
    root = Path(comfyui_frontend_package.__file__).parent / "static"
    assert (root / "index.html").is_file(), f"no index.html in {root}: the package layout changed"
    return root


@pytest.fixture(scope="module")
def static_root() -> Path:
    return _static_root()


@lru_cache(maxsize=1)
def _bundle(root: str) -> str:
    # The frontend is ~40 MB of minified JS chunks; the names we look for survive minification because they
    # are property names and string literals.
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(Path(root, "assets").glob("*.js")))


def _imports(source: Path) -> list[tuple[str, str]]:
    """(imported names, specifier) for each static import in an ES module."""
    return re.findall(r'^\s*import\s+(?:\{([^}]*)\}\s+from\s+)?["\']([^"\']+)["\']', source.read_text(), re.M)


def _served_url(base: str, specifier: str) -> str:
    return urlparse(urljoin(base, specifier)).path


def test_extension_imports_resolve_to_frontend_files(static_root):
    imports = _imports(EXTENSION)
    specifiers = [spec for _, spec in imports]
    assert specifiers == ["../../scripts/app.js", "../../scripts/api.js", "./plot.js"], specifiers
    for names, spec in imports:
        # ComfyUI serves the frontend at / and our web/ folder at /extensions/<pack>/.
        path = _served_url(f"http://127.0.0.1:8188/extensions/{PACK}/phase_trainer.js", spec)
        if path.startswith(f"/extensions/{PACK}/"):
            target = WEB / path[len(f"/extensions/{PACK}/"):]
        else:
            target = static_root / path.lstrip("/")
        assert target.is_file(), f"{spec} -> {path} -> {target} does not exist"
        # Behind a reverse proxy under a sub-path, the same relative import must stay inside it (a path
        # with one ../ too many still works at / because URLs clamp at the root, but not under /comfy/).
        sub = _served_url(f"http://example.org/comfy/extensions/{PACK}/phase_trainer.js", spec)
        assert sub == "/comfy" + path, (spec, sub)
        for name in filter(None, (n.strip() for n in names.split(","))):
            text = target.read_text()
            assert re.search(rf"export\s+(const|function|class)\s+{name}\b", text), f"{target} does not export {name}"


def test_plot_module_has_no_imports_and_no_side_effects():
    # ComfyUI imports every .js file under WEB_DIRECTORY as an extension, so plot.js is loaded on its own too.
    source = (WEB / "plot.js").read_text()
    assert _imports(WEB / "plot.js") == []
    assert "registerExtension" not in source and "comfyAPI" not in source
    top_level_calls = [line for line in source.splitlines() if re.match(r"^[A-Za-z_$][\w$.]*\(", line)]
    assert top_level_calls == []


def test_web_directory_matches_the_import_depth():
    init = REPO / "__init__.py"
    if not init.exists():
        pytest.skip("the pack's __init__.py does not exist yet")
    match = re.search(r"""WEB_DIRECTORY\s*=\s*["']([^"']+)["']""", init.read_text())
    assert match, "__init__.py sets no WEB_DIRECTORY"
    assert Path(match.group(1)).as_posix().strip("./") == "web", match.group(1)


# What the extension calls or relies on, and how the frontend bundle shows that it exists. The patterns hold
# for frontend 1.35.9 (shipped with ComfyUI v0.8.0) and 1.58.1 (latest on PyPI, 2026-11), two different
# minifiers; set PT_FRONTEND_STATIC to check another copy.
FRONTEND_API = {
    "node.addDOMWidget(name, type, element, options)": r"\.prototype\.addDOMWidget=function\(\w+,\w+,\w+,\w+=\{\}\)",
    "DOM widget options.getMinHeight drives its layout": r"this\.options\.getMinHeight\?\.\(\)",
    "widgets with serialize=false stay out of widgets_values": r"serialize===!1\)continue",
    "app.registerExtension": r"registerExtension\(\w+\)\{",
    "the setup hook": r"invokeExtensionsAsync\([`\"]setup[`\"]\)",
    "the beforeRegisterNodeDef hook": r"invokeExtensionsAsync\([`\"]beforeRegisterNodeDef[`\"],",
    "node.onExecuted(output) on the executed message": r"\.onExecuted\(\w+\.output\)",
    "node.onConfigure after properties are restored":
        r"this\.properties\[\w+\]=\w+\.properties\[\w+\].{0,4000}this\.onConfigure\?\.\(",
    "node.onRemoved when a node leaves the graph": r"\.onRemoved\?\.\(\)",
    "app.rootGraph (the graph execution ids start from)": r"get rootGraph\(\)\{return this\.rootGraph",
    "graph.getNodeById": r"getNodeById\(\w+\)\{",
    "a subgraph node's .subgraph holds its inner graph": r"\.subgraph\.getNodeById\(|\w\.subgraph,\w\.slice\(",
    "api is an EventTarget": r"class ComfyApi extends EventTarget|ComfyApi=class extends EventTarget",
    "api.addEventListener registers a custom message type":
        r"addEventListener\((\w+),\w+,\w+\)\{super\.addEventListener\(.{0,60}?\),this\.(?:#\w+|_registered)\.add\(\1\)",
    "custom messages arrive as CustomEvent(type, {detail: data})":
        r"\.has\((\w+)\.type\)\)?\??\s*super\.dispatchEvent\(new CustomEvent\(\1\.type,\{detail:\1\.data\}\)\)",
}


@pytest.mark.parametrize("what", list(FRONTEND_API))
def test_frontend_bundle_has_the_api_we_use(static_root, what):
    found = re.search(FRONTEND_API[what], _bundle(str(static_root)), re.S) is not None
    assert found, f"the frontend in {static_root} lacks: {what} (pattern {FRONTEND_API[what]!r})"


def test_extension_uses_those_apis():
    # The other half: the extension really calls what the bundle test looks for.
    source = EXTENSION.read_text()
    for needle in ["app.registerExtension(", "api.addEventListener(LIVE_EVENT", "node.addDOMWidget(", "getMinHeight:",
                   "serialize: false", "setup()", "beforeRegisterNodeDef(", '"onExecuted"', '"onConfigure"',
                   '"onRemoved"', '"onNodeCreated"', "new ResizeObserver(", "app.rootGraph", "getNodeById(",
                   "node.subgraph"]:
        assert needle in source, needle
    assert re.search(r'const LIVE_EVENT = "phase_trainer\.metrics"', source)
    assert re.search(r'new Set\(\["PhaseTrainerTrain", "PhaseTrainerPlotMetrics"\]\)', source)
