"""Git Re-Basin: merge checkpoints modulo permutation symmetries (Ainsworth, Hayase, Srinivasa, ICLR 2023).

A library: imports nothing from api/, worker/ or storage/.

merge_checkpoints(states, method=..., architecture=... | permutation_spec=..., dataset=..., eval_dataset=...):
- 2 states: B is aligned to A; >= 3: MergeMany (Algorithm 3; activation/STE: each aligned to model 0).
- Evaluation (barrier, curves, barrier.png) runs when there is a model and data, on the first of:
  eval_dataset's eval split, eval_dataset's inputs, dataset's eval split, dataset's training inputs
  (``report["evaluation"]["split"]`` says which). BN models get their statistics re-estimated ("BN reset")
  at every lambda and in merged.safetensors, on the dataset's training inputs (else the evaluation inputs;
  at most 2048 examples). With a bare permutation_spec there is no model: weight matching only, data ignored.
- Barrier (Definition 2.2): max over lambda of L(lambda) - ((1 - lambda) L(0) + lambda L(1)), on the held-out
  split (``barrier``, ``curves``) and on the training split (``barrier_train``, ``curves_train``: the dataset's
  inputs, else the eval dataset's ``inputs`` when it also has an eval split; at most 10000 examples, evenly
  strided; ``evaluation_train`` names the split).
- Option ``repair`` (matching.repair): "none" (plain interpolation), "reset" (BN statistics re-estimated),
  "repair" (REPAIR, Jordan et al. 2023: per-channel rescaling to the interpolated endpoint statistics, folded
  into weights and biases; in BN networks it is the reset). Left out: "reset" for BN networks, "repair"
  otherwise, "none" without data. Statistics come from the dataset's training inputs, else the evaluation
  data (``report["repair"]["data"]``); "reset"/"repair" without any data are refused. It shapes
  merged.safetensors and adds the ``aligned_repair`` curve; ``naive``/``aligned`` keep their meaning (BN
  models: reset at every lambda when there is data).
- Model folders (Hugging Face ``save_pretrained`` layout, matching.folders): ``load_folder(dir)`` gives the state
  dict and the ``FolderLayout``; ``merge_checkpoints(..., configs=[layout.config, ...])`` lets architecture ``hf``
  (matching.hf) build the model from config.json; ``write_artifacts(outcome, out, layout=...)`` writes the models as
  folders laid out the same way (``merged.tar``/``aligned.tar``, or directories with ``folders="dir"``).
- Options: seed, max_iter, lambdas (number of points, default 25), merge_lambda (0.5), steps (STE, 200),
  learning_rate (STE, 1e-3), batch_size (activation/STE, 256), repair.
- Partial merges (matching.zipped): option ``merge_until`` (a module, a spec permutation, or "sweep") merges
  everything up to the cut into a shared trunk and keeps the rest as two heads (``zipped.safetensors``;
  ``load_zipped(path)`` gives the model); ``label_sets`` adds ZipIt!'s joint accuracy (``joint_accuracy``).
"""

from matching.architectures import build_model, infer_options, list_architectures
from matching.errors import Cancelled, MatchingError
from matching.evaluate import Dataset, load_dataset
from matching.infer import infer_spec, verify_spec
from matching.merge import MergeOutcome, check_inputs, merge_checkpoints, write_artifacts
from matching.spec import PermutationSpec, apply_permutation, spec_from_json, spec_to_json
from matching.weight_matching import weight_matching
from matching.zipped import ZippedModel, load_zipped

__all__ = ["build_model", "infer_options", "list_architectures", "Cancelled", "MatchingError", "Dataset",
           "load_dataset", "infer_spec", "verify_spec", "MergeOutcome", "check_inputs", "merge_checkpoints",
           "write_artifacts", "PermutationSpec", "apply_permutation", "spec_from_json", "spec_to_json",
           "weight_matching", "ZippedModel", "load_zipped"]
