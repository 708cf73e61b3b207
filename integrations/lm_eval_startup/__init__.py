"""Makes plain `lm_eval --model rcd` / `--model seqd` work: lm-eval 0.4.13 reads no entry points.

Installed as the top-level package `rcd_ext_lm_eval_startup` next to `rcd_ext_lm_eval.pth`,
which runs `install()` at interpreter start. `install()` only puts a finder on `sys.meta_path`;
it imports nothing (no torch, no lm_eval). The finder acts once, when `lm_eval.api.registry`
(where lm-eval keeps its model registry) finishes importing: it imports `lm_eval.models` (a
name -> "module:Class" table, cheap) so that lm-eval's built-in models stay registered, then
adds `rcd` and `seqd` as the same kind of lazy "module:Class" entries. Nothing of rcd_ext is
imported until lm-eval looks one of them up.

Why lm_eval.models first: `lm_eval.api.registry.get_model` fills the registry with the
built-ins only while it is empty, so registering ours into an empty registry would hide them.

Every failure is swallowed (and the finder removed): a broken or half-uninstalled rcd_ext must
never break `python` or lm-eval itself.
"""

from __future__ import annotations

import sys

REGISTRY_MODULE = "lm_eval.api.registry"
PACKAGE = "rcd_ext"
MODELS = {
    "rcd": "rcd_ext.integrations.lm_eval_model:RCDLM",
    "seqd": "rcd_ext.integrations.lm_eval_model:SeqDLM",
}


def register_models() -> list[str]:
    """Add the lazy `rcd` / `seqd` entries to lm-eval's model registry (names not yet taken).

    Returns the names added. Needs `lm_eval.api.registry` importable; imports no rcd_ext code.
    """
    import importlib.util

    if importlib.util.find_spec(PACKAGE) is None:  # rcd_ext uninstalled: leave lm-eval alone
        return []
    import lm_eval.models  # noqa: F401  registers the built-in models (lazy entries)
    from lm_eval.api.registry import model_registry

    added = []
    for name, target in MODELS.items():
        if name not in model_registry:
            model_registry.register(name, target=target)
            added.append(name)
    return added


class _LoaderAfterExec:
    """Wraps the registry module's loader: runs `register_models` once its code has run."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)

    def create_module(self, spec: object) -> object:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        try:
            register_models()
        except Exception:  # noqa: BLE001  never break lm-eval's own import
            pass


class RegistryFinder:
    """A `sys.meta_path` finder that answers only for `lm_eval.api.registry`, once."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        if fullname != REGISTRY_MODULE:
            return None
        uninstall()
        try:
            import importlib.util

            spec = importlib.util.find_spec(fullname)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderAfterExec(spec.loader)
            return spec
        except Exception:  # noqa: BLE001  let the normal import machinery try (and report)
            return None


def install() -> None:
    """Put the finder on `sys.meta_path` (first) unless it is there; a no-op if the registry
    module was already imported (then register right away)."""
    try:
        if REGISTRY_MODULE in sys.modules:
            register_models()
            return
        if not any(isinstance(finder, RegistryFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, RegistryFinder())
    except Exception:  # noqa: BLE001  never fail interpreter start
        pass


def uninstall() -> None:
    """Remove the finder from `sys.meta_path`."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, RegistryFinder)]
