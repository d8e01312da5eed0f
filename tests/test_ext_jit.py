"""The development build: EOFD_JIT=1 compiles csrc/ with torch.utils.cpp_extension.load and
the ext backend runs on it (in a subprocess: one process can register the ops only once)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ninja")

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import eofd_kernels as ek
    from eofd_kernels.backends.ext_loader import load_error

    assert load_error() is None, load_error()
    assert "eofd_kernels._C" not in sys.modules
    with open("/proc/self/maps") as maps:
        assert "eofd_kernels_jit" in maps.read()
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 40, 24, generator=g, dtype=torch.float64) * 3 + 1
    s = (t + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64)).requires_grad_()
    loss = ek.eofd_loss(s, t, backend="ext")
    ref = ek.eofd_loss(s, t, backend="reference")
    (d_s,), (d_ref,) = torch.autograd.grad(loss, s), torch.autograd.grad(ref, s)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(d_s, d_ref, rtol=1e-12, atol=1e-15)
    print("ok")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_jit_build_runs_the_ext_backend(tmp_path):
    env = {**os.environ, "EOFD_JIT": "1", "TORCH_EXTENSIONS_DIR": str(tmp_path),
           "EOFD_BUILD_CUDA": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
