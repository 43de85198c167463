"""Models: ``gpt`` is the built-in byte-level GPT that ``arbs train`` trains; ``hf`` brings a local Hugging Face
causal LM (Llama, Mistral, Qwen2, GPT-2) into integer-only form (norms folded; transformers imported on use)."""
