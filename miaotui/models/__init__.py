"""Model definitions: the config dataclass and the Llama-family transformer."""
