"""HTTP layer: routes (v1, v2, ops), request reading and error responses."""
