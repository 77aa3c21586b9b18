"""Building blocks of transformer models (norm, rotary embedding, attention, linear).

Layers know nothing of the engine: caches and positions arrive as arguments.
"""
