#!/usr/bin/env python3
"""Server-level A/B of attention backends on one SGLang server and traffic (pat_sglang.bench.ab_server; --help).
Run from the repository root (the default model config is configs/llama3-8b)."""

from pat_sglang.bench.ab_server import main

if __name__ == "__main__":
    main()
