"""Weight files: converting Hugging Face / GGUF experts into kt_kernel's
canonical files (`kt-kernel convert`, convert.py, which documents the file
format), and loading any of them into a KTMoEWrapper (load_weights,
loader.py). Modules: safetensors_io (strict reader, streaming writer),
hf_checkpoint, gguf_input, common (formats, exact dequantisation)."""
