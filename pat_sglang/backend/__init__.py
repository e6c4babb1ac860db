"""The SGLang adapter: registration, radix paths, ``PatAttnBackend``. Only this package imports sglang."""

from __future__ import annotations


def register() -> None:
    """Register ``pat`` in SGLang's ``--attention-backend`` choices and backend registry, in this process.

    The ``pat_sglang.pth`` hook does this automatically (also in spawned scheduler processes); call this when that
    hook is off (``PAT_SGLANG_AUTOLOAD=0``) or the package was installed without it (some editable installs).
    """
    import sglang.srt.layers.attention.attention_registry as registry
    import sglang.srt.server_args as server_args

    import _pat_sglang_autoload as hook

    hook.add_choice(server_args)
    hook.add_factory(registry)
