"""What every HTTP API of the router shares: error shapes, strict request parsing and its error
messages, SSE framing, the API key check and the request-size limit. No API's own shapes here."""
