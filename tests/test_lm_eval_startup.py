"""The .pth startup hook behind plain `lm_eval --model rcd`: cheap, lazy and harmless.

Each check runs a fresh interpreter of this venv (where `pip install -e .` or the wheel put
`rcd_ext_lm_eval.pth` into site-packages).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

PTH = Path(sysconfig.get_paths()["purelib"]) / "rcd_ext_lm_eval.pth"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_python(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path),
                                                         env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)
    return done


def test_the_pth_file_is_installed_in_site_packages() -> None:
    assert PTH.is_file(), (f"{PTH} is missing: reinstall the package "
                           "(pip install --no-build-isolation -e .)")
    assert "rcd_ext_lm_eval_startup" in PTH.read_text()


def test_interpreter_start_imports_neither_torch_nor_lm_eval() -> None:
    done = run_python("""
        import sys
        from rcd_ext_lm_eval_startup import RegistryFinder
        assert any(isinstance(f, RegistryFinder) for f in sys.meta_path), sys.meta_path
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "lm_eval", "rcd_ext",
                                                                     "transformers", "numpy"))
        assert not heavy, heavy
        print("clean")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr


def test_lm_eval_finds_rcd_and_seqd_lazily_beside_its_built_in_models() -> None:
    # get_model("rcd") itself (it imports torch) runs in test_lm_eval_cli's real CLI runs
    done = run_python("""
        import sys
        from lm_eval.api.registry import model_registry
        entries = model_registry._objs
        assert entries["rcd"] == "rcd_ext.integrations.lm_eval_model:RCDLM", entries.get("rcd")
        assert entries["seqd"] == "rcd_ext.integrations.lm_eval_model:SeqDLM"
        assert entries["hf"] == "lm_eval.models.huggingface:HFLM"  # built-ins still there
        assert "torch" not in sys.modules and "rcd_ext" not in sys.modules
        print("found")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "found", done.stderr


def test_a_missing_rcd_ext_leaves_lm_eval_untouched() -> None:
    done = run_python("""
        import rcd_ext_lm_eval_startup as startup
        startup.PACKAGE = "no_such_package_for_rcd_test"  # as if rcd_ext were uninstalled
        import sys
        from lm_eval.api.registry import model_registry
        # lm-eval's own state: an empty registry that get_model fills with the built-ins
        assert len(model_registry) == 0 and "lm_eval.models" not in sys.modules
        print("untouched")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "untouched", done.stderr


def test_a_broken_rcd_ext_breaks_only_its_own_models() -> None:
    done = run_python("""
        import importlib.machinery
        import sys

        class Broken:  # an rcd_ext whose import fails, found before the installed one
            def create_module(self, spec):
                return None
            def exec_module(self, module):
                raise RuntimeError("broken install")

        class BrokenFinder:
            def find_spec(self, name, path, target=None):
                if name == "rcd_ext":
                    return importlib.machinery.ModuleSpec(name, Broken(), is_package=True)
                return None

        sys.meta_path.insert(0, BrokenFinder())
        from lm_eval.api.registry import get_model, model_registry
        assert "hf" in model_registry and "rcd" in model_registry
        try:
            get_model("rcd")
        except RuntimeError as error:
            print("refused:", error)
    """)
    assert done.returncode == 0 and done.stdout.strip() == "refused: broken install", done.stderr


def test_a_broken_startup_module_never_stops_the_interpreter(tmp_path) -> None:
    (tmp_path / "rcd_ext_lm_eval_startup").mkdir()
    (tmp_path / "rcd_ext_lm_eval_startup" / "__init__.py").write_text("raise SyntaxError('x')\n")
    done = run_python("print('started')", extra_path=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "started"
    assert done.stderr == ""


def test_register_models_never_overrides_a_taken_name() -> None:
    done = run_python("""
        from lm_eval.api.registry import model_registry
        import rcd_ext_lm_eval_startup as startup
        assert startup.register_models() == []  # the finder already added both
        model_registry._clear()
        model_registry.register("rcd", target="somebody.else:Model")
        assert startup.register_models() == ["seqd"]
        assert model_registry._objs["rcd"] == "somebody.else:Model"
        print("kept")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "kept", done.stderr
