import subprocess
import sys


def test_import_renderfarm_pulls_in_no_heavy_dependency():
    code = (
        "import sys, renderfarm, renderfarm.cli\n"
        "heavy = [m for m in ('torch', 'ray', 'diffusers', 'transformers', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == ""


def test_public_surface_is_all():
    import renderfarm

    assert {"Client", "AsyncClient", "Job", "Result", "ImageSpec", "InvalidJobError"} <= set(renderfarm.__all__)
    assert all(hasattr(renderfarm, name) for name in renderfarm.__all__)
