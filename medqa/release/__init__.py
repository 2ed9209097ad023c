"""Release: the released adapter and its model card (release stage), merged and GGUF exports, and publishing to
the Hugging Face hub."""
