"""Start-up: the CLI module and ``neuro-ood --help`` import none of the heavy libraries; the
commands import what they need when they run (structural checks in a fresh interpreter, no timing)."""

import json
import subprocess
import sys

HEAVY = ("torch", "monai", "nflows", "sklearn", "matplotlib", "nibabel", "SimpleITK", "pandas", "scipy")


def _loaded_after(code: str) -> list[str]:
    """Heavy top-level modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_heavy_library():
    assert _loaded_after("import neuro_ood.cli.main") == []


def test_help_of_every_command_imports_no_heavy_library():
    code = ("import sys\nfrom neuro_ood.cli.main import app\n"
            "for args in (['--help'], ['score', '--help'], ['report', '--help'], ['train', '--help']):\n"
            "    try:\n        app(args, prog_name='neuro-ood', standalone_mode=False)\n"
            "    except SystemExit:\n        pass\n")
    assert _loaded_after(code) == []


def test_scoring_pipeline_leaves_simpleitk_to_registration_and_n4():
    """SimpleITK serves N4 and template registration only; a default scan is scored without it."""
    loaded = _loaded_after("import neuro_ood.pipelines.score")
    assert "torch" in loaded and "SimpleITK" not in loaded
