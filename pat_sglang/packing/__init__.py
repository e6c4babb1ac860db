"""CPU planning: prefix forest -> packs -> tile configs -> KV splits -> a frozen PatPlan, and the following of later
decode steps; ``Planner`` runs them all, configured by one ``PlanTuning``. Imports no SGLang."""

from pat_sglang.packing.build import build_plan
from pat_sglang.packing.forest import Forest, PrefixPath, check_forest_slots, forest_from_paths, forest_from_slots
from pat_sglang.packing.packs import ByteModel, Group, Packing, Policy, pack_forest
from pat_sglang.packing.plan import Launch, PatPlan
from pat_sglang.packing.planner import GraphLayout, Planner
from pat_sglang.packing.tiles import choose_tile
from pat_sglang.packing.tuning import DEFAULT_TUNING, PlanTuning, TileTables

__all__ = [
    "DEFAULT_TUNING",
    "ByteModel",
    "Forest",
    "GraphLayout",
    "Group",
    "Launch",
    "Packing",
    "PatPlan",
    "PlanTuning",
    "Planner",
    "Policy",
    "PrefixPath",
    "TileTables",
    "build_plan",
    "check_forest_slots",
    "choose_tile",
    "forest_from_paths",
    "forest_from_slots",
    "pack_forest",
]
