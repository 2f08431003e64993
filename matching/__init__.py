"""Git Re-Basin: merge checkpoints modulo permutation symmetries (Ainsworth, Hayase, Srinivasa, ICLR 2023).

A library: imports nothing from api/, worker/ or storage/.
"""

from matching.architectures import build_model, infer_options, list_architectures
from matching.errors import Cancelled, MatchingError
from matching.evaluate import Dataset, load_dataset
from matching.infer import infer_spec, verify_spec
from matching.merge import MergeOutcome, check_inputs, merge_checkpoints, write_artifacts
from matching.spec import PermutationSpec, apply_permutation, spec_from_json, spec_to_json
from matching.weight_matching import weight_matching

__all__ = ["build_model", "infer_options", "list_architectures", "Cancelled", "MatchingError", "Dataset",
           "load_dataset", "infer_spec", "verify_spec", "MergeOutcome", "check_inputs", "merge_checkpoints",
           "write_artifacts", "PermutationSpec", "apply_permutation", "spec_from_json", "spec_to_json",
           "weight_matching"]
