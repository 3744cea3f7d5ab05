"""The deployment-side modules must import without torch (the ONNX runner depends on them)."""

import subprocess
import sys
import textwrap


def test_imageio_and_preprocess_do_not_import_torch(tmp_path):
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('torch is blocked in this test')\n")
    code = textwrap.dedent("""
        import sys
        from PIL import Image
        from pipeline.core.imageio import load_rgb
        from pipeline.core.preprocess import Preprocessing, preprocess
        pp = Preprocessing(32, 36, "bicubic", (0.5,) * 3, (0.5,) * 3)
        assert preprocess(Image.new("RGB", (50, 40)), pp).shape == (3, 32, 32)
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
    """)
    env_path = f"{tmp_path}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_the_onnx_runner_imports_without_torch(tmp_path):
    """`pipeline.onnx` (runner, contract, sessions) is what apps import: no torch there."""
    blocker = tmp_path / "torch.py"
    blocker.write_text("raise ImportError('torch is blocked in this test')\n")
    code = textwrap.dedent("""
        import sys
        import pipeline.onnx.runner, pipeline.onnx.contract, pipeline.onnx.sessions
        assert "torch" not in sys.modules or sys.modules["torch"] is None
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
