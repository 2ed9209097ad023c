"""The models: profiles (hub id, LoRA targets, template, embedded GGUF), reading the base model once (download
stage), loading it for training or inference on the hardware at hand (dtype, 4-bit), and fingerprints of
local model directories."""
