"""The OpenAI API: chat completions and completions (request models, tools, response builders)."""
