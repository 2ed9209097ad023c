"""A merged Llama-family model (Llama, Mistral, SmolLM2: one architecture) as a GGUF file for
llama.cpp, Ollama and LM Studio, and an Ollama Modelfile beside it.

Built on the `gguf` package: its writer, its tensor name map, its vocabulary readers
(`SpecialVocab` for merges, special token ids and the chat template) and its q8_0 quantiser.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medqa.errors import PipelineError

GGUF_TYPES = ("f16", "q8_0")
LLAMA_FAMILY = ("llama", "mistral")


def _permute_for_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """q/k projection rows reordered from transformers' rotate-half layout to GGML's interleaved
    pairs (what llama.cpp's converter does; transformers' GGUF loader undoes it)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor_data(tensor: Any, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw type) of one tensor: 1-D tensors (norms) in float32, 2-D weights in f16 or q8_0."""
    import gguf

    data = tensor.float().numpy()
    if data.ndim == 1:
        return data.astype(np.float32), None
    if gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def _add_config(writer: Any, config: dict, gguf_type: str) -> None:
    import gguf

    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if gguf_type == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)


def _add_tokenizer(writer: Any, tokenizer_dir: Path, tokenizer: Any, chat_template: str | None) -> None:
    """The vocabulary (gpt2-style byte-level BPE, as SmolLM2 and Llama 3; or llama's byte-fallback
    BPE / SentencePiece, as Mistral), special token ids, merges and the chat template."""
    import gguf

    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    byte_level = tokenizer_json["model"]["type"] == "BPE" and not tokenizer_json["model"].get("byte_fallback")
    if byte_level:
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
        added = set(tokenizer.added_tokens_decoder) - special
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                 else gguf.TokenType.NORMAL for i in range(len(tokens))]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    else:
        vocab = gguf.LlamaHfVocab(tokenizer_dir)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(tokenizer_dir, load_merges=byte_level, n_vocab=len(tokenizer))
    if chat_template:
        special_vocab.chat_template = chat_template
    special_vocab.add_to_gguf(writer, quiet=True)


def write_gguf(model: Any, tokenizer_dir: Path, out_file: Path, gguf_type: str = "f16",
               chat_template: str | None = None) -> None:
    """Write a merged model (plain transformers weights, no peft layers) as one GGUF file: weights in
    `gguf_type`, the tokenizer saved in `tokenizer_dir`, and `chat_template` (default: the
    tokenizer's)."""
    import gguf
    import torch
    from transformers import AutoTokenizer

    if gguf_type not in GGUF_TYPES:
        raise PipelineError(f"--gguf-type is {gguf_type!r}, expected one of {', '.join(GGUF_TYPES)}")
    config = model.config.to_dict()
    if config.get("model_type") not in LLAMA_FAMILY:
        raise PipelineError(f"GGUF export supports the Llama family ({', '.join(LLAMA_FAMILY)}), not "
                            f"{config.get('model_type')!r}: export safetensors and convert with llama.cpp")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])

    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(out_file.stem)
    _add_config(writer, config, gguf_type)
    _add_tokenizer(writer, tokenizer_dir, tokenizer, chat_template or tokenizer.chat_template)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads the output projection from the token embeddings
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = torch.from_numpy(_permute_for_rope(tensor.float().numpy(), n_head if "q_proj" in name else n_kv))
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PipelineError(f"GGUF export: no GGUF name for the tensor {name}")
        data, raw_type = _tensor_data(tensor, gguf_type)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ollama_template(fmt: Any) -> str:
    """The pipeline's prompt format (`prompts.PromptFormat`) as an Ollama TEMPLATE: the prompt
    rendered around stand-ins for the system prompt and the user's message, which become Ollama's
    `{{ .System }}` and `{{ .Prompt }}`."""
    system, user = "\x00SYSTEM\x00", "\x00PROMPT\x00"
    rendered = fmt.prompt(system, user)
    if user not in rendered:
        raise PipelineError("the prompt format drops the user's message: no Ollama template can be made from it")
    return rendered.replace(system, "{{ .System }}").replace(user, "{{ .Prompt }}")


def ollama_modelfile(fmt: Any, system: str, gguf_file: str) -> str:
    """An Ollama Modelfile for `gguf_file` beside it: the pipeline's template and system prompt,
    stopping at the end-of-turn marker, greedy as the eval stages decode."""
    for text in (system, ollama_template(fmt)):
        if '"""' in text:
            raise PipelineError('a Modelfile cannot quote a text that contains """')
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{ollama_template(fmt)}"""', f'SYSTEM """{system}"""']
    if fmt.end_of_turn:
        lines.append(f'PARAMETER stop "{fmt.end_of_turn}"')
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
