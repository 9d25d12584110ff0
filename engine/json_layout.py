"""How constrained output lays out JSON, for every grammar built from a JSON schema: a response
format's, any JSON object's, and a forced tool call's (built router-side, compiled here). One
layout, so what the grammar allows is what the model writes unconstrained. MLX-free: the router
imports it."""

# llguidance's JSON options: fixed separators, no free whitespace
JSON_OPTIONS = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
