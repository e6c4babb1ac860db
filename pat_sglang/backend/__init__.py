"""The SGLang adapter (registration, radix paths, attention backend). Only this package imports sglang."""
