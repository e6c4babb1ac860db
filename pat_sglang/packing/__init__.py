"""CPU planning: prefix forest -> packs -> tile configs -> KV splits -> a frozen PatPlan. Imports no SGLang."""

from pat_sglang.packing.forest import Forest, PrefixPath, check_forest_slots, forest_from_paths, forest_from_slots
from pat_sglang.packing.packs import ByteModel, Group, Packing, Policy, pack_forest
from pat_sglang.packing.plan import Launch, PatPlan, build_plan
from pat_sglang.packing.tiles import choose_tile

__all__ = [
    "ByteModel",
    "Forest",
    "Group",
    "Launch",
    "Packing",
    "PatPlan",
    "Policy",
    "PrefixPath",
    "build_plan",
    "check_forest_slots",
    "choose_tile",
    "forest_from_paths",
    "forest_from_slots",
    "pack_forest",
]
