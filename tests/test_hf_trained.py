"""Two small GPT-2 models (Hugging Face ``GPT2LMHeadModel``, a tiny config built here) trained from different
seeds on a local text corpus: the Python standard library's own source, read through a byte-level tokenizer
built in code. Head-aware weight matching and head-aware activation matching each lower the held-out loss
barrier below naive averaging and below the same matching with the heads held in place."""

import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import matching
from cli import demo
from matching.activation_matching import activation_matching
from matching.evaluate import barrier, interpolation_curve
from matching.spec import apply_permutation, fix_group_perms

LAMBDAS = [i / 10 for i in range(11)]
CORPUS = ("textwrap.py", "string/__init__.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py",
          "colorsys.py", "graphlib.py", "keyword.py", "operator.py", "copy.py", "pprint.py", "reprlib.py",
          "functools.py", "contextlib.py", "dataclasses.py", "enum.py", "argparse.py", "ast.py")
LENGTH = 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def byte_tokens(examples: int = 3072, held_out: int = 512, seed: int = 0):
    """Windows of the corpus as ids of its distinct bytes (a byte-level tokenizer); next-byte targets."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((root / name).read_bytes() for name in CORPUS if (root / name).exists())
    alphabet = sorted(set(text))
    ids = torch.tensor([alphabet.index(b) for b in range(256) if b in alphabet])  # byte -> id
    lookup = torch.zeros(256, dtype=torch.long)
    lookup[torch.tensor(alphabet)] = ids
    stream = lookup[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
    starts = torch.randperm(len(stream) - LENGTH - 1, generator=torch.Generator().manual_seed(seed))[:examples + held_out]
    windows = torch.stack([stream[s:s + LENGTH + 1] for s in starts.tolist()])
    inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    return len(alphabet), (inputs[:examples], targets[:examples], inputs[examples:], targets[examples:])


class Logits(nn.Module):
    """A causal LM that returns its next-token logits as a tensor (what matching.evaluate reads)."""

    def __init__(self, vocab: int):
        super().__init__()
        import transformers as tf

        tf.logging.set_verbosity_error()
        config = tf.GPT2Config(vocab_size=vocab, n_positions=LENGTH, n_embd=48, n_layer=2, n_head=4, bos_token_id=0,
                               eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.lm = tf.GPT2LMHeadModel(config)

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def trained():
    vocab, data = byte_tokens()
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Logits(vocab)
        demo.fit(model, data[0], data[1], torch.optim.Adam(model.parameters(), lr=3e-3), 3, seed)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return vocab, data, states


def test_head_aware_matching_lowers_the_barrier_below_naive_and_heads_fixed(trained):
    vocab, (x, y, x_eval, y_eval), states = trained
    model = Logits(vocab).eval()
    spec = matching.infer_spec(model, x_eval[:2])

    def barrier_of(aligned):
        return barrier(interpolation_curve(model, states[0], aligned, LAMBDAS, x_eval, y_eval)["loss"], LAMBDAS)

    found = {"naive": barrier_of(states[1])}
    for label, s in (("heads", spec), ("heads fixed", fix_group_perms(spec))):
        perms, _ = matching.weight_matching(s, *states, seed=0)
        found[f"weights, {label}"] = barrier_of(apply_permutation(s, perms, states[1]))
        perms, _ = activation_matching(s, model, *states, x[:1024])
        found[f"activations, {label}"] = barrier_of(apply_permutation(s, perms, states[1]))
    print({k: round(v, 4) for k, v in found.items()})
    for method in ("weights", "activations"):
        assert found[f"{method}, heads"] < found["naive"]
        assert found[f"{method}, heads"] < found[f"{method}, heads fixed"]
