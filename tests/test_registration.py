"""``--attention-backend pat`` registration through the installed ``.pth`` hook, each check in a fresh interpreter.

``make test`` installs the package from its wheel, as a user's ``pip install`` does, so the hook under test is the
real one (an editable install may not carry the ``.pth``).
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import sglang_env

sglang_env.require()

PROBE = str(Path(__file__).resolve().parent / "registration_probe.py")
ROOT = Path(__file__).resolve().parent.parent


def _probe(what: str, **env: str) -> str:
    # Run outside the repository so that the installed package, not the source tree, is what Python finds.
    out = subprocess.run(
        [sys.executable, PROBE, what], capture_output=True, text=True, timeout=300, cwd="/", env=os.environ | env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_pth_hook_is_installed():
    found = [p for p in site.getsitepackages() if (Path(p) / "pat_sglang.pth").exists()]
    assert found, "pat_sglang.pth is not in site-packages: install the wheel (make install), not an editable copy"


def test_choices_and_registry_in_a_fresh_interpreter():
    assert "choices True registry True" in _probe("choices")


def test_argparse_accepts_pat_for_both_flags():
    assert "parsed pat pat" in _probe("parse")


def test_launch_server_help_lists_pat():
    code = (
        "import runpy; import sglang_env; sglang_env.prepare(); "
        "runpy.run_module('sglang.launch_server', run_name='__main__', alter_sys=True)"
    )
    tests = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])  # sglang_env's folder
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=300, cwd="/",
                         env=os.environ | {"PYTHONPATH": tests})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    help_text = "".join(out.stdout.split())  # argparse wraps the choices list anywhere
    assert re.search(r"--attention-backend\{[^}]*,pat[,}]", help_text), out.stdout[:2000]


def test_spawned_child_resolves_the_factory():
    assert "child _pat_sglang_autoload.create_pat_backend" in _probe("spawn")


def test_autoload_off_then_explicit_register():
    out = _probe("explicit", PAT_SGLANG_AUTOLOAD="0")
    assert "before False False" in out and "after True True" in out


def test_server_args_accept_pat_and_keep_cuda_graphs():
    """SGLang's own validation takes the registered name as it is (0.5.10.post1 in ``ServerArgs.__post_init__``;
    0.5.23 resolves lazily: ``resolve_once()``, read through ``resolved_view``)."""
    from sglang.srt.server_args import ServerArgs

    import pat_sglang

    pat_sglang.register()
    args = ServerArgs(
        model_path=str(ROOT / "configs" / "llama3-8b"),
        attention_backend="pat",
        load_format="dummy",
        skip_tokenizer_init=True,
        device="cpu",
    )
    if hasattr(args, "resolve_once"):
        from sglang.srt.arg_groups.model_override_base import resolved_view

        args.resolve_once()
        args = resolved_view(args)
    assert args.attention_backend == "pat" and args.page_size == 1 and not args.disable_cuda_graph
