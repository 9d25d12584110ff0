"""The OpenAI Responses API (`/v1/responses`) over the router's event stream."""
