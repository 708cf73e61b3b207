"""What importing the light modules loads: the wrapper and the decoding loops run on any model,
so they must not pay for transformers (seconds) nor register the tiny dLLM as a side effect."""

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    return set(done.stdout.split())


@pytest.mark.parametrize("module", ["rcd_ext.wrapper", "rcd_ext.models.adapters",
                                    "rcd_ext.residual"])
def test_light_modules_do_not_import_transformers(module: str) -> None:
    loaded = _modules_after(f"import {module}")
    assert module in loaded
    assert "transformers" not in loaded
    assert "rcd_ext.models.tiny_dllm" not in loaded


def test_a_tiny_model_name_registers_it_with_the_auto_classes() -> None:
    code = ("from transformers import AutoConfig\n"
            "from rcd_ext.models import TinyDLLMConfig\n"
            "config = AutoConfig.for_model('rcd-tiny-dllm', vocab_size=13, mask_token_id=2)\n"
            "print(type(config) is TinyDLLMConfig)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    assert done.stdout.strip() == "True"


def test_unknown_name_of_the_models_package_is_an_attribute_error() -> None:
    import rcd_ext.models

    with pytest.raises(AttributeError, match="no attribute 'TinyModel'"):
        rcd_ext.models.TinyModel  # noqa: B018


def test_a_named_command_imports_only_its_own_module() -> None:
    code = ("from rcd_ext.cli import build_parser, command_names\n"
            "import sys\n"
            "build_parser(['info', '--help-not-parsed'])\n"
            "print(' '.join(m for m in sys.modules if m.startswith('rcd_ext.commands.')"
            " and not m.split('.')[-1].startswith('_')))\n"
            "build_parser([])\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('rcd_ext.commands.')"
            " and not m.split('.')[-1].startswith('_'))))\n"
            "print(' '.join('rcd_ext.commands.' + n for n in command_names()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=120)
    only_named, after_help, every = done.stdout.splitlines()
    assert only_named == "rcd_ext.commands.info"
    assert after_help == every and len(every.split()) >= 5
