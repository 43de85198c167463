"""Built-in models: ``gpt`` is the byte-level GPT that ``arbs train`` trains."""
