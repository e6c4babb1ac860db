"""Run in a fresh interpreter by test_registration.py: what does SGLang see of ``pat``?

python tests/registration_probe.py choices|parse|spawn|explicit
"""

from __future__ import annotations

import multiprocessing as mp
import sys

import sglang_env  # this file's folder is on sys.path: it runs as a script

assert sglang_env.prepare()


def _child_factory(queue) -> None:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    factory = ATTENTION_BACKENDS.get("pat")
    queue.put(None if factory is None else f"{factory.__module__}.{factory.__name__}")


def main(what: str) -> None:
    if what == "choices":
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

        print("choices", "pat" in ATTENTION_BACKEND_CHOICES, "registry", "pat" in ATTENTION_BACKENDS)
    elif what == "parse":
        import argparse

        from sglang.srt.server_args import ServerArgs

        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        args = parser.parse_args(
            ["--model-path", "m", "--attention-backend", "pat", "--decode-attention-backend", "pat"]
        )
        print("parsed", args.attention_backend, args.decode_attention_backend)
    elif what == "spawn":
        import sglang.srt.server_args  # noqa: F401 - the launcher has it loaded when it spawns schedulers

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_child_factory, args=(queue,))
        child.start()
        print("child", queue.get(timeout=120))
        child.join()
    elif what == "explicit":
        from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
        from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

        import pat_sglang

        print("before", "pat" in ATTENTION_BACKEND_CHOICES, "pat" in ATTENTION_BACKENDS)
        pat_sglang.register()
        print("after", "pat" in ATTENTION_BACKEND_CHOICES, "pat" in ATTENTION_BACKENDS)


if __name__ == "__main__":
    main(sys.argv[1])
