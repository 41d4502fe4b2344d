"""``lorafit review``: a local page to check and fix captions by hand (server, caption store, static page)."""
